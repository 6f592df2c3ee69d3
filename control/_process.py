"""Is a process (still) there? Shared by the ring and the hygiene helpers.

A pid alone is not an identity: a killed process stays a zombie until its parent reaps
it (kill(pid, 0) still succeeds), and a pid can be reused. So a participant records
its pid and its start time (field 22 of /proc/<pid>/stat, in clock ticks since boot),
and "alive" means: the pid exists, is not a zombie, and started at that time.
"""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[bytes] | None:
    # os.open/os.read rather than open(): no buffered file object for one short read
    # (half the cost; a full ring checks its blocking readers on every publish(timeout=0)).
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)  # one line of a few hundred bytes: comm is at most 16
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(b")") + 2 :].split()


def process_start_ticks(pid: int) -> int:
    """Start time of `pid` in clock ticks since boot; 0 where /proc cannot tell."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else 0


def process_alive(pid: int, start_ticks: int = 0) -> bool:
    """True if `pid` runs and (when start_ticks is non-zero) is the process that started then."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process, but it exists
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc to consult: existence is all we know
    if fields[0] in (b"Z", b"X"):
        return False
    return not (start_ticks and len(fields) > 19 and int(fields[19]) != start_ticks)
