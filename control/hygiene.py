"""Find and remove what crashed runs left in /dev/shm: ring segments and doorbells.

Only a ring's creator unlinks it, so a writer killed with SIGKILL leaves its segment
(`<prefix>-<pid>-<random>`) and doorbells (`sem.<prefix>-db-<pid>-<random>`) behind.
Nothing of that breaks the next run (names are random), but it costs memory; these
helpers (and `embxfer ring ls|rm`) list them and remove those whose creator is gone.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

import posix_ipc

from ._process import process_alive
from .ring import _STATIC, RING_MAGIC

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9_.]+)-(?:db-)?(?P<pid>\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class SegmentInfo:
    name: str  # as given to posix_ipc, without the leading slash
    kind: str  # "ring" (a segment with a ring header), "segment" (unreadable header) or "doorbell"
    size: int
    creator_pid: int  # 0 when unknown
    alive: bool  # the creator still runs (same start time when the header records it)


def _describe_segment(entry: str) -> SegmentInfo:
    path = os.path.join(SHM_DIR, entry)
    size = os.stat(path).st_size
    match = _NAME_RE.match(entry)
    pid = int(match["pid"]) if match else 0
    start_ticks = 0
    kind = "segment"
    try:
        with open(path, "rb") as segment:
            header = segment.read(_STATIC.size)
        if len(header) == _STATIC.size and struct.unpack_from("Q", header)[0] == RING_MAGIC:
            fields = _STATIC.unpack(header)
            pid, start_ticks, kind = fields[8], fields[9], "ring"
    except OSError:
        pass  # not ours to read (another user's segment)
    return SegmentInfo(entry, kind, size, pid, process_alive(pid, start_ticks))


def list_segments(prefix: str = "embxfer") -> list[SegmentInfo]:
    """Ring segments and doorbell semaphores in /dev/shm whose name starts with `prefix`."""
    found = []
    for entry in sorted(os.listdir(SHM_DIR)):
        try:
            if entry.startswith("sem.") and entry[4:].startswith(prefix):
                name = entry[4:]
                match = _NAME_RE.match(name)
                pid = int(match["pid"]) if match else 0
                size = os.stat(os.path.join(SHM_DIR, entry)).st_size
                found.append(SegmentInfo(name, "doorbell", size, pid, process_alive(pid)))
            elif entry.startswith(prefix):
                found.append(_describe_segment(entry))
        except FileNotFoundError:
            continue  # removed while we looked
    return found


def remove_segments(
    names: list[str] | None = None, stale_only: bool = True, prefix: str = "embxfer"
) -> list[str]:
    """Unlink the listed entries (default: all with `prefix`); with `stale_only`, only those
    whose creator is gone. Names are as `list_segments` reports them. The removed names."""
    candidates = list_segments(prefix if names is None else "")
    if names is not None:
        wanted = {name.lstrip("/") for name in names}
        candidates = [info for info in candidates if info.name in wanted]
        unknown = wanted - {info.name for info in candidates}
        if unknown:
            raise ValueError(f"no such segment or doorbell in {SHM_DIR}: {', '.join(sorted(unknown))}")
    removed = []
    for info in candidates:
        if stale_only and info.alive:
            continue
        try:
            if info.kind == "doorbell":
                posix_ipc.unlink_semaphore("/" + info.name)
            else:
                posix_ipc.unlink_shared_memory("/" + info.name)
        except posix_ipc.ExistentialError:
            continue
        removed.append(info.name)
    return removed


__all__ = ["SegmentInfo", "list_segments", "remove_segments"]
