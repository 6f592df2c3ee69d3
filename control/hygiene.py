"""Find and remove what crashed runs left in /dev/shm: ring segments and doorbells.

Only a ring's creator unlinks it, so a writer killed with SIGKILL leaves its segment
(`<prefix>-<pid>-<random>`) and doorbells (`sem.<prefix>-db-<pid>-<random>`) behind.
Nothing of that breaks the next run (names are random), but it costs memory; these
helpers (and `embxfer ring ls|rm`) list them and remove those whose creator is gone.

A prefix is matched whole, as the ring module writes it (`ring._check_prefix`): prefix
`embxfer` finds `embxfer-123-ab12` and `sem.embxfer-db-123-ab12`, never the entries
of prefix `embxfertest`, and nothing else in /dev/shm (another program's segments,
another prefix's doorbells) is listed, read or removed.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from dataclasses import dataclass

import posix_ipc

from ._process import process_alive
from .ring import _STATIC, RING_MAGIC, SHM_DIR, _check_prefix

# <prefix>-<pid>-<hex> (ring segment) or <prefix>-db-<pid>-<hex> (doorbell); a prefix
# has no '-', so the split is unambiguous.
_NAME_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9_.]{1,24})-(?P<db>db-)?(?P<pid>\d{1,10})-[0-9a-f]{1,32}$")


@dataclass(frozen=True)
class SegmentInfo:
    name: str  # as given to posix_ipc, without the leading slash
    kind: str  # "ring" (a segment with a ring header), "segment" (unreadable header) or "doorbell"
    size: int
    creator_pid: int  # 0 when unknown
    alive: bool  # the creator still runs (same start time when the header records it)


def _read_header(path: str) -> bytes:
    """The first bytes of a regular file, without following a link or blocking on a FIFO
    someone planted under one of our names; b"" when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""  # not ours to read (another user's segment), or not a file
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, _STATIC.size)
    finally:
        os.close(fd)


def _describe_segment(entry: str, pid: int) -> SegmentInfo:
    path = os.path.join(SHM_DIR, entry)
    size = os.lstat(path).st_size
    start_ticks = 0
    kind = "segment"
    header = _read_header(path)
    if len(header) == _STATIC.size and struct.unpack_from("Q", header)[0] == RING_MAGIC:
        fields = _STATIC.unpack(header)
        pid, start_ticks, kind = fields[8], fields[9], "ring"
    return SegmentInfo(entry, kind, size, pid, process_alive(pid, start_ticks))


def list_segments(prefix: str = "embxfer") -> list[SegmentInfo]:
    """Ring segments and doorbell semaphores in /dev/shm named with `prefix` (a prefix
    as `RingWriter.create` takes it: 1-24 characters from [A-Za-z0-9_.])."""
    _check_prefix(prefix)
    found = []
    for entry in sorted(os.listdir(SHM_DIR)):
        is_semaphore = entry.startswith("sem.")
        name = entry[4:] if is_semaphore else entry
        match = _NAME_RE.match(name)
        # A doorbell is a semaphore named <prefix>-db-..., a ring a segment named <prefix>-...
        if match is None or match["prefix"] != prefix or bool(match["db"]) != is_semaphore:
            continue
        pid = int(match["pid"])
        try:
            if is_semaphore:
                size = os.lstat(os.path.join(SHM_DIR, entry)).st_size
                found.append(SegmentInfo(name, "doorbell", size, pid, process_alive(pid)))
            else:
                found.append(_describe_segment(entry, pid))
        except FileNotFoundError:
            continue  # removed while we looked
    return found


def remove_segments(
    names: list[str] | None = None, stale_only: bool = True, prefix: str = "embxfer"
) -> list[str]:
    """Unlink the listed entries (default: all with `prefix`); with `stale_only`, only those
    whose creator is gone. Names are as `list_segments(prefix)` reports them; a name that
    it does not report raises ValueError. Entries this user may not unlink are skipped.
    The removed names."""
    candidates = list_segments(prefix)
    if names is not None:
        wanted = {name.lstrip("/") for name in names}
        candidates = [info for info in candidates if info.name in wanted]
        unknown = wanted - {info.name for info in candidates}
        if unknown:
            raise ValueError(
                f"no such segment or doorbell with prefix {prefix!r} in {SHM_DIR}: {', '.join(sorted(unknown))}"
            )
    removed = []
    for info in candidates:
        if stale_only and info.alive:
            continue
        if _unlink(info):
            removed.append(info.name)
    return removed


def remove_own_segments(prefix: str = "embxfer", pid: int | None = None) -> list[str]:
    """Unlink every entry with `prefix` that process `pid` (default: this one) created,
    whether or not its handles are still open: the last resort of a process that must
    exit before its own tear-down finished. The removed names."""
    pid = os.getpid() if pid is None else pid
    removed = []
    for info in list_segments(prefix):
        if info.creator_pid != pid:
            continue
        if _unlink(info):
            removed.append(info.name)
    return removed


def _unlink(info: SegmentInfo) -> bool:
    """Unlink one entry; False if it was gone meanwhile or is another user's."""
    try:
        if info.kind == "doorbell":
            posix_ipc.unlink_semaphore("/" + info.name)
        else:
            posix_ipc.unlink_shared_memory("/" + info.name)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        return False
    return True


__all__ = ["SegmentInfo", "list_segments", "remove_own_segments", "remove_segments"]
