"""A single-writer, multi-reader ring of byte records in POSIX shared memory.

One writer process publishes records; any number of reader processes (up to
`max_readers`) each read every record published after they attached, in order, through
their own cursor. The vocabulary is the LMAX Disruptor's: a *sequence* numbers every
record (1, 2, 3, ...), the writer's *head* is the last sequence published, a reader's
*cursor* is the last sequence it consumed, and the writer may reuse the slot of sequence
`s` only when every reader's cursor is >= `s` (backpressure, never overwrite).

Memory layout (one segment, native byte order, every offset a multiple of 64)::

    0     static header (written once, before `magic`)
          magic u64 | version u32 | header_bytes u32 | slots u32 | slot_bytes u32 |
          max_readers u32 | reader_entry_bytes u32 | segment_bytes u64 |
          writer_pid i64 | writer_start_ticks u64 | created_ns u64
    64    head u64                                 <- writer, every publish (own line)
    128   writer_state u64 (1 open, 2 closed) | writer_heartbeat_ns u64 |
          writer_parked u64                        <- writer, rarely
    192   writer doorbell name (64 bytes, NUL padded)
    256   reader entry 0 (192 bytes = three lines)
            +0    cursor u64                       <- reader, every record (own line)
            +64   pid i64 | start_ticks u64 | parked u64 | heartbeat_ns u64
                                                   (heartbeat 0: attaching, see below)
            +128  doorbell name (64 bytes)
          reader entry 1 ... reader entry max_readers-1
    256 + 192 * max_readers
          slot 0 .. slot slots-1, `slot_bytes` each; sequence s lives in slot (s-1) % slots
            +0    sequence u64  (0 = never written)
            +8    length u32
            +12   checksum u32  (crc32 of the payload, seeded with the low 32 bits of
                                 the sequence, so a stale slot cannot pass for a new one)
            +16   payload (length bytes, at most slot_bytes - 16)

Publishing (seqlock style, payload first): the writer copies the payload, then length
and checksum, then the slot's sequence, then the head. A reader delivers sequence `s`
only if the slot holds sequence `s`, the length fits, the checksum matches and the
sequence still reads `s` after the copy; it stores its cursor only after that. A writer
killed before storing the sequence leaves a slot that no reader delivers.

Memory ordering. CPython has no fences; an aligned 8-byte store or load through a native
`struct` format, or through a memoryview of the segment cast to native "Q" words (what
the per-record paths use), is one instruction. On x86-64 (TSO) stores become visible in
program order and loads are not reordered with loads, so publish-after-write needs
nothing more. The one store->load pattern in the ring is parking (Dekker: "I parked, then I
look for work" against "I published, then I look for parked readers"); both sides
execute a full fence between the store and the load, obtained from an uncontended
lock acquire/release (a `lock`-prefixed instruction on x86-64). The checksum backs the
ordering argument up: on a weakly ordered CPU a torn slot is caught and re-read, and a
parked reader re-checks every PARK_SLICE_S anyway, which bounds any missed wake-up.

Attaching: a reader claims a free entry under the attach lock with cursor 0 and
heartbeat 0, then reads the head, stores its cursor there and only then its first
heartbeat. Cursor 0 holds the writer back from the moment the entry shows, so no record
after that head is overwritten before the reader gets it; heartbeat 0 says the entry is
still *attaching*: records published now may be at or below the head it is about to
read, and they are not its. `PeerInfo.attached` reports the difference. A writer that
saw a reader attached knows that reader gets every record it publishes from then on
(the reader read the head before its heartbeat showed, and the head only grows); one
that acts on an attaching entry would lose the records between (on a young ring, up to
a slot count of them).

Waiting (wait strategy "spin, then park"): a reader polls for `spin_s`, then sets its
`parked` word, fences, re-polls, and sleeps on its `Doorbell` (a POSIX counting
semaphore). After every publish the writer fences, reads all readers' `parked` words
(one comparison of a strided view of them against zeros) and posts the doorbell of each
parked reader. The semaphore counts, so a post that arrives before the reader sleeps is
not lost; the reader drains stale counts before re-polling. A blocked writer parks the same way on its own doorbell and
readers post it after consuming. See the `Doorbell` and `wait_any` docstrings.

Liveness: the writer and each reader record pid, process start time and a heartbeat
timestamp (CLOCK_MONOTONIC ns). A participant is dead when its process is gone (or a
zombie, or the pid was reused) or, if the caller gives a staleness threshold, when its
heartbeat is older. A writer blocked on a dead reader raises `PeerDeadError` within one
PARK_SLICE_S; a reader whose writer died (or closed the ring) gets every record that was
completely published and then `PeerDeadError`.

Deadlines: every `timeout`, `spin_s` and `stale_after` is a finite number of seconds
>= 0 (an int or a float, not a bool); anything else (nan, inf, a negative, a string)
raises ValueError naming the argument. `publish(data, timeout=0)` never spins nor
parks: on a full ring it raises RingFullError (or PeerDeadError) at once, after one
look at the cursors and one liveness check of the readers it waits for.

Threads: a `RingWriter` or `RingReader` belongs to the thread that publishes or reads
through it (`publish`, `poll`, `read`, `wait_any`, `evict`, `close`). `heartbeat()` is
the exception: it only stores an aligned 8-byte timestamp, under a per-handle lock that
`close` also takes, so a helper thread may keep a participant alive while its owner is
busy (a SIGSTOPped process still goes stale: its helper thread stops too), and a
heartbeat after `close` does nothing. Any other use of a closed handle raises
`RingClosedError`; `close` is idempotent.

Hygiene: segment and doorbell names are `<prefix>-<pid>-<random>` and
`<prefix>-db-<pid>-<random>`, created mode 0600; only the creator unlinks. `create`
checks the segment against the free space of /dev/shm (and MAX_SEGMENT_BYTES) before
it creates anything, then reserves its pages (posix_fallocate), so a ring that was
created cannot fault on a full /dev/shm later. See `hygiene.py` for the clean-up of
what a crashed run left.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import posix_ipc

from ._process import process_alive, process_start_ticks
from .deadlines import check_seconds

RING_MAGIC = int.from_bytes(b"EBXRING1", "little")
RING_VERSION = 1
HEADER_BYTES = 256
READER_ENTRY_BYTES = 192
SLOT_HEADER_BYTES = 16
CACHE_LINE = 64
MAX_READERS = 64
MAX_SLOTS = 1 << 20
MAX_SLOT_BYTES = 1 << 24
# A control ring holds records of a few kB; a segment beyond this is a mistake.
MAX_SEGMENT_BYTES = 1 << 32
NAME_FIELD_BYTES = 64
# Longest a parked participant sleeps before it re-checks by itself (liveness, heartbeat):
# each such wake costs a few hundred us of Python, so an idle engine pays it 4 times a second.
PARK_SLICE_S = 0.25
DEFAULT_SPIN_S = 50e-6
SHM_DIR = "/dev/shm"
# posix_ipc turns a very long semaphore wait into an overflowed timespec (an immediate
# BusyError); longer waits are taken in pieces of this length.
_LONGEST_SEMAPHORE_WAIT_S = 86400.0

_OPEN, _CLOSED = 1, 2
_STATIC = struct.Struct("=QIIIIIIQqQQ")
_U64 = struct.Struct("Q")  # native: one aligned 8-byte load/store
_I64 = struct.Struct("q")
_SLOT_HEADER = struct.Struct("QII")
_SIZE_CHECKSUM = struct.Struct("II")
_ENTRY_COLD = struct.Struct("qQQQ")  # pid, start_ticks, parked, heartbeat_ns
# The per-record paths call these bound methods directly (no attribute look-up per call).
_load_size_checksum = _SIZE_CHECKSUM.unpack_from
_store_size_checksum = _SIZE_CHECKSUM.pack_into
_INF = float("inf")

_HEAD = 64
_WRITER_STATE = 128
_WRITER_HEARTBEAT = 136
_WRITER_PARKED = 144
_WRITER_DOORBELL = 192
_TABLE = HEADER_BYTES
_CURSOR = 0
_PID = 64
_PARKED = 80
_HEARTBEAT = 88
_DOORBELL = 128
# The same places as indices of 8-byte words (see `_words`).
_HEAD_WORD = _HEAD // 8
_WRITER_PARKED_WORD = _WRITER_PARKED // 8
_ENTRY_WORDS = READER_ENTRY_BYTES // 8

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.]{1,24}$")
# What attach/open accept: the names this module makes, and any like them. posix_ipc
# is never handed a NUL (it crashes the interpreter) nor a second '/'.
_SEGMENT_NAME_RE = re.compile(r"^/?(?=[A-Za-z0-9_.-]*[A-Za-z0-9])[A-Za-z0-9_.-]{1,250}$")
_crc32 = zlib.crc32
_monotonic = time.monotonic
_monotonic_ns = time.monotonic_ns

# A full memory fence from Python: acquiring and releasing an uncontended lock executes
# atomic read-modify-write instructions (lock cmpxchg / lock xadd on x86-64).
_fence_lock = threading.Lock()
_fence_acquire = _fence_lock.acquire
_fence_release = _fence_lock.release


def _fence() -> None:
    _fence_acquire()
    _fence_release()


def _words(mm: mmap.mmap) -> memoryview:
    """The segment as native 8-byte words: `words[offset // 8]` is one aligned 8-byte load
    (or store), like a native `struct` "Q" but without a call. Made once per handle and
    released before the segment is unmapped."""
    return memoryview(mm).cast("Q")


class RingError(Exception):
    """Base class of the ring's errors."""


class RingClosedError(RingError):
    """A ring handle (or doorbell) was used after `close`."""


class IncompatibleRingError(RingError):
    """The segment is not a ring of this version and shape."""


class RingFullError(RingError):
    """`publish` waited its whole deadline for a slow reader; `.slowest` names it."""

    def __init__(self, message: str, slowest: PeerInfo) -> None:
        super().__init__(message)
        self.slowest = slowest


class PeerDeadError(RingError):
    """A participant the caller depends on is gone; `.peer` names it."""

    def __init__(self, message: str, peer: PeerInfo) -> None:
        super().__init__(message)
        self.peer = peer


class RingCorruptError(RingError):
    """A published record failed validation; it was counted and skipped, never delivered."""

    def __init__(self, message: str, sequence: int) -> None:
        super().__init__(message)
        self.sequence = sequence


@dataclass(frozen=True)
class PeerInfo:
    """One participant of a ring as its header describes it."""

    role: str  # "writer" or "reader"
    index: int  # reader entry; -1 for the writer
    pid: int
    cursor: int  # last sequence consumed (reader) or published (writer)
    lag: int  # records published and not yet consumed by this reader (0 for the writer)
    heartbeat_age_s: float  # 0.0 for a reader still attaching
    alive: bool  # process running (not a zombie, same start time); False for a closed writer
    parked: bool
    # A reader: its attach has stored its cursor (records published from now on are all
    # its); False while it attaches. Always True for the writer.
    attached: bool = True

    def describe(self) -> str:
        who = "writer" if self.role == "writer" else f"reader #{self.index}"
        state = "alive" if self.alive else "dead"
        return (
            f"{who} (pid {self.pid}, {state}, cursor {self.cursor}, lag {self.lag}, "
            f"heartbeat {self.heartbeat_age_s:.3f}s ago)"
        )


@dataclass(frozen=True)
class ReaderStats:
    delivered: int  # records returned to the caller
    retried: int  # slots that failed validation once and passed on a re-read
    rejected: int  # records that kept failing validation: counted, skipped, never delivered


def slot_bytes_for(record_bytes: int) -> int:
    """Smallest valid `slot_bytes` whose payload holds `record_bytes` bytes."""
    if record_bytes < 0:
        raise ValueError(f"record_bytes={record_bytes}: expected >= 0")
    return -(-(record_bytes + SLOT_HEADER_BYTES) // CACHE_LINE) * CACHE_LINE


def segment_bytes(slots: int, slot_bytes: int, max_readers: int) -> int:
    return HEADER_BYTES + READER_ENTRY_BYTES * max_readers + slots * slot_bytes


def _shm_name(name: str) -> str:
    return name if name.startswith("/") else "/" + name


def _check_seconds(where: str, argument: str, value: object) -> float:
    return check_seconds(f"{where}: {argument}", value)


def _check_segment_name(where: str, name: object) -> str:
    """`name` with its leading '/', if it can name a ring segment or a doorbell."""
    if not isinstance(name, str) or not _SEGMENT_NAME_RE.match(name):
        raise ValueError(
            f"{where}: name={name!r}: expected a name such as 'embxfer-1234-0123456789abcdef' "
            "(1-250 characters from [A-Za-z0-9_.-], at most one leading '/')"
        )
    return _shm_name(name)


def _format_bytes(count: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.3g} {unit}"
    return f"{count} bytes"


def _byte_view(data: object, where: str) -> bytes | bytearray | memoryview:
    """`data` as something `len` counts in bytes and a slice assignment copies whole:
    bytes, a bytearray, or a C-contiguous 1-D memoryview of unsigned bytes."""
    if isinstance(data, (bytes, bytearray)):
        return data
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{where}: expected bytes, a bytearray or a buffer of unsigned bytes, got {type(data).__name__}"
        ) from None
    except ValueError:
        raise ValueError(f"{where}: the memoryview was released") from None
    if view.format != "B" or view.ndim != 1:
        raise ValueError(
            f"{where}: expected a 1-D buffer of unsigned bytes (format 'B'), got format "
            f"{view.format!r} with itemsize {view.itemsize} and ndim {view.ndim} "
            "(memoryview.cast('B') reinterprets a contiguous buffer as bytes)"
        )
    if not view.c_contiguous:
        raise ValueError(f"{where}: the buffer is not contiguous (copy it with bytes(view) first)")
    return view


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"prefix={prefix!r}: expected 1-24 characters from [A-Za-z0-9_.] (names are "
            "<prefix>-<pid>-<random>)"
        )


def _write_name(mm: mmap.mmap, offset: int, name: str) -> None:
    raw = name.encode("ascii")
    if len(raw) >= NAME_FIELD_BYTES:
        raise ValueError(f"name {name!r} is longer than {NAME_FIELD_BYTES - 1} bytes")
    mm[offset : offset + NAME_FIELD_BYTES] = raw.ljust(NAME_FIELD_BYTES, b"\0")


def _read_name(mm: mmap.mmap, offset: int) -> str:
    return mm[offset : offset + NAME_FIELD_BYTES].split(b"\0", 1)[0].decode("ascii", "replace")


class Doorbell:
    """A per-process wake-up: a POSIX counting semaphore that every ring this process
    reads (or writes) posts when it has work for it.

    A process that reads several rings attaches all its readers with one doorbell and
    parks on it once (`wait_any`). Posts count, so one that arrives before `wait` is not
    lost; `drain` drops counts left over from posts that raced with a wake-up.
    """

    def __init__(self, semaphore: posix_ipc.Semaphore, owner: bool) -> None:
        self._semaphore = semaphore
        self._owner = owner
        self.name: str = semaphore.name

    @classmethod
    def create(cls, prefix: str = "embxfer") -> Doorbell:
        """A new doorbell named `/<prefix>-db-<pid>-<random>`, mode 0600; its creator unlinks it."""
        _check_prefix(prefix)
        for _ in range(16):
            name = f"/{prefix}-db-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                semaphore = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
            except posix_ipc.ExistentialError:
                continue
            return cls(semaphore, owner=True)
        raise RingError(f"could not create a doorbell with prefix {prefix!r}")

    @classmethod
    def open(cls, name: str) -> Doorbell:
        """Another process's doorbell, to ring it; closing it does not unlink it."""
        path = _check_segment_name("Doorbell.open", name)
        try:
            return cls(posix_ipc.Semaphore(path), owner=False)
        except posix_ipc.ExistentialError:
            raise RingError(f"no doorbell named {name!r}") from None
        except (posix_ipc.Error, OSError) as exc:
            raise RingError(f"doorbell {name!r} cannot be opened: {exc}") from None

    def _open_semaphore(self) -> posix_ipc.Semaphore:
        semaphore = self._semaphore
        if semaphore is None:
            raise RingClosedError(f"doorbell {self.name} is closed")
        return semaphore

    def wait(self, timeout: float) -> bool:
        """Sleep until rung or `timeout` seconds (finite, >= 0) pass; True if rung."""
        return self._sleep(_check_seconds("Doorbell.wait", "timeout", timeout))

    def _sleep(self, timeout: float) -> bool:
        semaphore = self._open_semaphore()
        if timeout <= _LONGEST_SEMAPHORE_WAIT_S:
            try:
                semaphore.acquire(timeout)
            except posix_ipc.BusyError:
                return False
            return True
        deadline = _monotonic() + timeout
        while True:
            remaining = deadline - _monotonic()
            if remaining <= 0:
                return False
            try:
                semaphore.acquire(min(remaining, _LONGEST_SEMAPHORE_WAIT_S))
            except posix_ipc.BusyError:
                continue
            return True

    def ring(self) -> None:
        self._open_semaphore().release()

    def drain(self) -> int:
        """Take every pending post without sleeping; the number taken."""
        semaphore = self._open_semaphore()
        taken = 0
        while semaphore.value > 0:
            try:
                semaphore.acquire(0)
            except posix_ipc.BusyError:
                break
            taken += 1
        return taken

    def close(self) -> None:
        """Release the handle; the creator also unlinks the name. Idempotent."""
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is None:
            return
        if self._owner:
            try:
                semaphore.unlink()
            except posix_ipc.ExistentialError:
                pass
        semaphore.close()

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _DoorbellCache:
    """Doorbells of other participants, opened by name on first use."""

    def __init__(self) -> None:
        self._by_name: dict[str, posix_ipc.Semaphore | None] = {}

    def ring(self, name: str) -> None:
        semaphore = self._by_name.get(name, False)
        if semaphore is False:
            try:
                # The name comes from the shared header: only a well-formed one reaches posix_ipc.
                semaphore = posix_ipc.Semaphore(_shm_name(name)) if _SEGMENT_NAME_RE.match(name) else None
            except (posix_ipc.Error, ValueError, OSError):
                semaphore = None  # its owner is gone; nobody is left to wake
            self._by_name[name] = semaphore
        if semaphore is not None:
            semaphore.release()

    def close(self) -> None:
        for semaphore in self._by_name.values():
            if semaphore is not None:
                semaphore.close()
        self._by_name.clear()


def _writer_info(mm: mmap.mmap, now_ns: int) -> PeerInfo:
    (_, _, _, _, _, _, _, _, writer_pid, writer_start, _) = _STATIC.unpack_from(mm, 0)
    head = _U64.unpack_from(mm, _HEAD)[0]
    state, heartbeat, parked = struct.unpack_from("QQQ", mm, _WRITER_STATE)
    return PeerInfo(
        "writer", -1, writer_pid, head, 0, (now_ns - heartbeat) / 1e9,
        state == _OPEN and process_alive(writer_pid, writer_start), bool(parked),
    )


def _reader_info(mm: mmap.mmap, index: int, head: int, now_ns: int) -> PeerInfo | None:
    entry = _TABLE + index * READER_ENTRY_BYTES
    pid, start, parked, heartbeat = _ENTRY_COLD.unpack_from(mm, entry + _PID)
    if pid == 0:
        return None
    cursor = _U64.unpack_from(mm, entry + _CURSOR)[0]
    return PeerInfo(
        "reader", index, pid, cursor, max(0, head - cursor),
        (now_ns - heartbeat) / 1e9 if heartbeat else 0.0, process_alive(pid, start), bool(parked),
        attached=heartbeat != 0,
    )


def _reader_infos(mm: mmap.mmap, max_readers: int, now_ns: int) -> list[PeerInfo]:
    head = _U64.unpack_from(mm, _HEAD)[0]
    infos = (_reader_info(mm, index, head, now_ns) for index in range(max_readers))
    return [info for info in infos if info is not None]


def _peer_infos(mm: mmap.mmap, max_readers: int, now_ns: int) -> list[PeerInfo]:
    return [_writer_info(mm, now_ns), *_reader_infos(mm, max_readers, now_ns)]


def _dead(peers: list[PeerInfo], stale_after: float | None) -> list[PeerInfo]:
    """The peers whose process is gone, or (when `stale_after` is given, already checked)
    whose heartbeat is older than that many seconds."""
    return [
        peer
        for peer in peers
        if not peer.alive or (stale_after is not None and peer.heartbeat_age_s > stale_after)
    ]


class RingWriter:
    """The single writer of a ring; it creates the segment and is the only one to unlink it."""

    def __init__(
        self,
        shm: posix_ipc.SharedMemory,
        mm: mmap.mmap,
        slots: int,
        slot_bytes: int,
        max_readers: int,
        doorbell: Doorbell,
        owns_doorbell: bool,
    ) -> None:
        self._shm = shm
        self._mm = mm
        self._slots = slots
        self._slot_bytes = slot_bytes
        self._max_readers = max_readers
        self._capacity = slot_bytes - SLOT_HEADER_BYTES
        self._slot_base = HEADER_BYTES + READER_ENTRY_BYTES * max_readers
        self._doorbell = doorbell
        self._owns_doorbell = owns_doorbell
        self._reader_doorbells = _DoorbellCache()
        self._next = 1
        self._limit = slots  # highest sequence publishable without looking at cursors again
        self._words = _words(mm)
        # All readers' parked words as one strided view, compared whole against zeros after
        # every publish; all (cursor, pid) pairs in one struct call when room runs out.
        first_parked = (_TABLE + _PARKED) // 8
        self._parked_words = self._words[first_parked : first_parked + _ENTRY_WORDS * max_readers : _ENTRY_WORDS]
        self._nobody_parked = memoryview(bytes(8 * max_readers)).cast("Q")
        self._cursor_words = struct.Struct("@" + "Q56xq120x" * max_readers)
        self.name: str = shm.name.lstrip("/")
        self._closed = False
        # Taken by heartbeat() (any thread) and close(): no heartbeat lands on an unmapped
        # segment. The publishing path never takes it.
        self._lifecycle_lock = threading.Lock()

    @classmethod
    def create(
        cls,
        slots: int,
        slot_bytes: int,
        max_readers: int,
        prefix: str = "embxfer",
        doorbell: Doorbell | None = None,
    ) -> RingWriter:
        """A new ring segment `/<prefix>-<pid>-<random>` (mode 0600).

        slots >= 2; slot_bytes a multiple of 64 holding SLOT_HEADER_BYTES + the largest
        record (see `slot_bytes_for`, `records.max_record_bytes`); max_readers in
        [1, MAX_READERS]. `doorbell` is this process's wake-up for a blocked publish
        (created, and closed with the ring, when not given). A segment that /dev/shm has
        no room for, or larger than MAX_SEGMENT_BYTES, is refused before anything is
        created; the segment's pages are reserved at creation.
        """
        for field, value, low, high in (
            ("slots", slots, 2, MAX_SLOTS),
            ("slot_bytes", slot_bytes, CACHE_LINE, MAX_SLOT_BYTES),
            ("max_readers", max_readers, 1, MAX_READERS),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"RingWriter.create: {field}={value!r}, expected an integer in [{low}, {high}]")
        if slot_bytes % CACHE_LINE:
            raise ValueError(f"RingWriter.create: slot_bytes={slot_bytes}, expected a multiple of {CACHE_LINE}")
        _check_prefix(prefix)
        if doorbell is not None:
            if not isinstance(doorbell, Doorbell):
                raise TypeError(f"RingWriter.create: doorbell={doorbell!r}, expected a Doorbell or None")
            doorbell._open_semaphore()
        size = segment_bytes(slots, slot_bytes, max_readers)
        _check_room_for(size, slots, slot_bytes)
        shm = None
        for _ in range(16):
            name = f"/{prefix}-{os.getpid()}-{secrets.token_hex(8)}"
            try:
                shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
                break
            except posix_ipc.ExistentialError:
                continue
        if shm is None:
            raise RingError(f"could not create a ring segment with prefix {prefix!r}")
        owns_doorbell = doorbell is None
        try:
            _reserve(shm, size)
            mm = mmap.mmap(shm.fd, size)
            if doorbell is None:
                doorbell = Doorbell.create(prefix)
        except BaseException:
            shm.unlink()
            shm.close_fd()
            raise
        now = _monotonic_ns()
        struct.pack_into("QQQ", mm, _WRITER_STATE, _OPEN, now, 0)
        _write_name(mm, _WRITER_DOORBELL, doorbell.name)
        pid = os.getpid()
        _STATIC.pack_into(
            mm, 0, 0, RING_VERSION, HEADER_BYTES, slots, slot_bytes, max_readers,
            READER_ENTRY_BYTES, size, pid, process_start_ticks(pid), time.time_ns(),
        )
        _U64.pack_into(mm, 0, RING_MAGIC)  # last: an attacher never sees a half-made header
        return cls(shm, mm, slots, slot_bytes, max_readers, doorbell, owns_doorbell)

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    @property
    def capacity(self) -> int:
        """Largest payload one record may have."""
        return self._capacity

    @property
    def head(self) -> int:
        """Last sequence published (0 before the first)."""
        return self._next - 1

    def _closed_error(self) -> RingClosedError:
        return RingClosedError(f"ring {self.name}: the writer was closed")

    def publish(self, data: bytes | bytearray | memoryview, timeout: float = 10.0) -> int:
        """Publish one record; its sequence.

        `data` is bytes, a bytearray or a contiguous 1-D buffer of unsigned bytes. When
        the ring is full, waits up to `timeout` seconds (finite, >= 0) for room, then
        raises RingFullError naming the slowest reader; raises PeerDeadError as soon as
        a reader it waits for is found dead. With timeout=0 it never waits: a full ring
        raises at once."""
        if self._closed:
            raise self._closed_error()
        if type(data) is not bytes:
            data = _byte_view(data, f"ring {self.name}: publish")
        # check_seconds's own fast path, inlined: this is the per-record path.
        if type(timeout) is not float or not 0.0 <= timeout < _INF:
            timeout = _check_seconds("RingWriter.publish", "timeout", timeout)
        size = len(data)
        if size > self._capacity:
            raise ValueError(
                f"record of {size} bytes does not fit ring {self.name}: slot_bytes={self._slot_bytes} "
                f"holds at most {self._capacity} (size slots with slot_bytes_for(max_record_bytes(...)))"
            )
        sequence = self._next
        if sequence > self._limit:
            self._wait_for_room(sequence, timeout)
        mm = self._mm
        words = self._words
        offset = self._slot_base + (sequence - 1) % self._slots * self._slot_bytes
        start = offset + SLOT_HEADER_BYTES
        mm[start : start + size] = data
        _store_size_checksum(mm, offset + 8, size, _crc32(data, sequence & 0xFFFFFFFF))
        words[offset >> 3] = sequence
        words[_HEAD_WORD] = sequence
        self._next = sequence + 1
        _fence_acquire()
        _fence_release()
        if self._parked_words != self._nobody_parked:
            self._ring_parked_readers()
        return sequence

    def _ring_parked_readers(self) -> None:
        for index, parked in enumerate(self._parked_words.tolist()):
            if parked:
                entry = _TABLE + index * READER_ENTRY_BYTES
                self._reader_doorbells.ring(_read_name(self._mm, entry + _DOORBELL))

    def _has_room(self, sequence: int) -> bool:
        """Looks at the cursors again; True if `sequence` may overwrite its slot."""
        words = self._cursor_words.unpack_from(self._mm, _TABLE)
        lowest = self._next - 1
        for index in range(self._max_readers):
            if words[2 * index + 1] and words[2 * index] < lowest:
                lowest = words[2 * index]
        self._limit = lowest + self._slots
        return sequence <= self._limit

    def _blocking_readers(self, sequence: int) -> list[PeerInfo]:
        """The readers whose cursor keeps `sequence` out of its slot (a /proc look each)."""
        needed = sequence - self._slots
        words = self._cursor_words.unpack_from(self._mm, _TABLE)
        head, now_ns = self._next - 1, _monotonic_ns()
        infos = (
            _reader_info(self._mm, index, head, now_ns)
            for index in range(self._max_readers)
            if words[2 * index + 1] and words[2 * index] < needed
        )
        return [info for info in infos if info is not None and info.cursor < needed]

    def _wait_for_room(self, sequence: int, timeout: float) -> None:
        # A reader that attaches after a look at the cursors starts at a head at least as
        # new as that look, so the limit computed here stays safe for it (see attach).
        start = _monotonic()
        deadline = start + timeout
        spin_until = start + min(DEFAULT_SPIN_S, timeout)
        last_check = start
        while not self._has_room(sequence):
            now = _monotonic()
            if now < spin_until:
                continue
            expired = now >= deadline
            if expired or now - last_check >= PARK_SLICE_S:
                last_check = now
                self.heartbeat()
                self._raise_for_blocking_readers(sequence, timeout, expired)
                continue  # nobody blocks any more, or not yet expired: look again first
            self._park_until_room(sequence, min(PARK_SLICE_S, deadline - now))

    def _raise_for_blocking_readers(self, sequence: int, timeout: float, expired: bool) -> None:
        blocking = self._blocking_readers(sequence)
        for peer in blocking:
            if not peer.alive:
                raise PeerDeadError(
                    f"ring {self.name}: publish of record {sequence} waits for "
                    f"{peer.describe()}, whose process is gone",
                    peer,
                )
        if expired and blocking:
            slowest = min(blocking, key=lambda peer: peer.cursor)
            waited = "(publish timeout 0)" if timeout == 0 else f"for {timeout:.3f}s"
            raise RingFullError(
                f"ring {self.name} full {waited}: record {sequence} waits for the slowest "
                f"reader, {slowest.describe()}",
                slowest,
            )

    def _park_until_room(self, sequence: int, seconds: float) -> None:
        mm = self._mm
        _U64.pack_into(mm, _WRITER_PARKED, 1)
        try:
            _fence()
            self._doorbell.drain()
            if not self._has_room(sequence):  # a reader that moved before our parked word showed
                self._doorbell._sleep(max(0.0, seconds))
        finally:
            _U64.pack_into(mm, _WRITER_PARKED, 0)

    def heartbeat(self) -> None:
        """Store the current time as the writer's heartbeat. Safe from any thread (one
        aligned 8-byte store under the handle's lifecycle lock); does nothing once closed."""
        with self._lifecycle_lock:
            if not self._closed:
                _U64.pack_into(self._mm, _WRITER_HEARTBEAT, _monotonic_ns())

    def readers(self) -> list[PeerInfo]:
        """The readers with an entry: index, pid, cursor, lag, heartbeat age, alive, attached
        (False while one attaches: see the module docstring)."""
        if self._closed:
            raise self._closed_error()
        return _reader_infos(self._mm, self._max_readers, _monotonic_ns())

    def dead_peers(self, stale_after: float | None = None) -> list[PeerInfo]:
        """Attached readers whose process is gone, or whose heartbeat is older than
        `stale_after` seconds (finite, >= 0) when given."""
        if stale_after is not None:
            stale_after = _check_seconds("RingWriter.dead_peers", "stale_after", stale_after)
        return _dead(self.readers(), stale_after)

    def evict(self, index: int) -> None:
        """Free the entry of reader `index`, whose process must be dead, so that publish
        no longer waits for it."""
        if self._closed:
            raise self._closed_error()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self._max_readers:
            raise ValueError(f"evict: index={index!r}, expected an integer in [0, {self._max_readers})")
        entry = _TABLE + index * READER_ENTRY_BYTES
        with _AttachLock(self._shm.fd):
            pid, start, _, _ = _ENTRY_COLD.unpack_from(self._mm, entry + _PID)
            if pid and process_alive(pid, start):
                raise RingError(f"evict: reader #{index} (pid {pid}) is alive; it must close itself")
            _ENTRY_COLD.pack_into(self._mm, entry + _PID, 0, 0, 0, 0)
        self._limit = 0  # look at the cursors again before the next publish

    def close(self) -> None:
        """Mark the ring closed, wake every parked reader, unmap and unlink. Idempotent."""
        with self._lifecycle_lock:
            if self._closed:
                return
            self._closed = True
            try:
                _U64.pack_into(self._mm, _WRITER_STATE, _CLOSED)
                _fence()
                self._ring_parked_readers()
            finally:
                self._reader_doorbells.close()
                self._parked_words.release()
                self._words.release()
                self._mm.close()
                try:
                    self._shm.unlink()
                except posix_ipc.ExistentialError:
                    pass
                self._shm.close_fd()
                if self._owns_doorbell:
                    self._doorbell.close()

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_room_for(size: int, slots: int, slot_bytes: int) -> None:
    """Refuse a segment /dev/shm cannot hold, or one beyond MAX_SEGMENT_BYTES."""
    shape = f"{slots} slots of {_format_bytes(slot_bytes)}"
    try:
        fs = os.statvfs(SHM_DIR)
    except OSError:
        fs = None  # no /dev/shm to ask: posix_fallocate is the check then
    if fs is not None and size > fs.f_bavail * fs.f_frsize:
        raise RingError(
            f"RingWriter.create: a ring of {_format_bytes(size)} ({shape}) does not fit {SHM_DIR}: "
            f"{_format_bytes(fs.f_bavail * fs.f_frsize)} free"
        )
    if size > MAX_SEGMENT_BYTES:
        raise ValueError(
            f"RingWriter.create: a ring of {_format_bytes(size)} ({shape}) is larger than "
            f"MAX_SEGMENT_BYTES ({_format_bytes(MAX_SEGMENT_BYTES)}); control records need a few kB a slot"
        )


def _reserve(shm: posix_ipc.SharedMemory, size: int) -> None:
    """Allocate the segment's pages now: a full /dev/shm fails here, with a message,
    not later as a SIGBUS in the middle of a publish."""
    try:
        os.posix_fallocate(shm.fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise RingError(
                f"RingWriter.create: a ring of {_format_bytes(size)} does not fit {SHM_DIR}: {exc.strerror}"
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


class _AttachLock:
    """Serialises attach/detach/evict across processes: flock on the segment's fd.

    The kernel drops it when its holder dies, and its syscalls order memory."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


class RingReader:
    """One reader of a ring: its own cursor, starting after the head at attach time."""

    def __init__(
        self,
        shm: posix_ipc.SharedMemory,
        mm: mmap.mmap,
        index: int,
        doorbell: Doorbell,
        owns_doorbell: bool,
        spin_s: float,
    ) -> None:
        (_, _, _, slots, slot_bytes, max_readers, _, _, _, _, _) = _STATIC.unpack_from(mm, 0)
        self._shm = shm
        self._mm = mm
        self._slots = slots
        self._slot_bytes = slot_bytes
        self._max_readers = max_readers
        self._capacity = slot_bytes - SLOT_HEADER_BYTES
        self._slot_base = HEADER_BYTES + READER_ENTRY_BYTES * max_readers
        self._entry = _TABLE + index * READER_ENTRY_BYTES
        self._cursor_offset = self._entry + _CURSOR
        self._words = _words(mm)
        self._cursor_word = self._cursor_offset // 8
        self._parked_offset = self._entry + _PARKED
        self._doorbell = doorbell
        self._owns_doorbell = owns_doorbell
        self._writer_doorbell = _DoorbellCache()
        self._writer_doorbell_name = _read_name(mm, _WRITER_DOORBELL)
        self.index = index
        self.name: str = shm.name.lstrip("/")
        self.spin_s = spin_s
        self._next = 1
        self._first = 1  # the first sequence this reader was to deliver (see stats)
        self._retried = 0
        self._rejected = 0
        self._liveness_checked_at = float("-inf")
        self._closed = False
        # Taken by heartbeat() (any thread) and close(): see RingWriter.
        self._lifecycle_lock = threading.Lock()

    @classmethod
    def attach(
        cls, name: str, doorbell: Doorbell | None = None, spin_s: float = DEFAULT_SPIN_S
    ) -> RingReader:
        """Take a free reader entry of ring `name`; the reader sees every record published
        after this returns. `doorbell` is shared by all rings this process reads (a private
        one is created, and closed with the reader, when not given). `spin_s` is how long
        `read` polls before it parks (finite, >= 0)."""
        path = _check_segment_name("RingReader.attach", name)
        spin_s = _check_seconds("RingReader.attach", "spin_s", spin_s)
        if doorbell is not None:
            if not isinstance(doorbell, Doorbell):
                raise TypeError(f"RingReader.attach: doorbell={doorbell!r}, expected a Doorbell or None")
            doorbell._open_semaphore()
        try:
            shm = posix_ipc.SharedMemory(path)
        except posix_ipc.ExistentialError:
            raise RingError(f"no ring segment named {name!r}") from None
        except posix_ipc.PermissionsError:
            raise RingError(
                f"ring {name!r}: permission denied (segments are mode 0600: attach as the user that created it)"
            ) from None
        except (posix_ipc.Error, OSError) as exc:
            raise RingError(f"ring {name!r} cannot be opened: {exc}") from None
        try:
            mm = cls._map_checked(shm, name)
        except BaseException:
            shm.close_fd()
            raise
        owns_doorbell = doorbell is None
        try:
            if doorbell is None:
                prefix = shm.name.lstrip("/").split("-", 1)[0]
                doorbell = Doorbell.create(prefix if _PREFIX_RE.match(prefix) else "embxfer")
            index = cls._claim_entry(shm, mm, name, doorbell)
        except BaseException:
            if owns_doorbell and doorbell is not None:
                doorbell.close()
            mm.close()
            shm.close_fd()
            raise
        reader = cls(shm, mm, index, doorbell, owns_doorbell, spin_s)
        # The entry is visible (the flock syscalls ordered it) with cursor 0, which holds the
        # writer back; only now read the head, so no record after it can be overwritten.
        # The first heartbeat, after the cursor, marks the entry attached (module docstring).
        head = _U64.unpack_from(mm, _HEAD)[0]
        _U64.pack_into(mm, reader._cursor_offset, head)
        reader._next = reader._first = head + 1
        reader.heartbeat()
        reader._wake_writer_if_parked()
        return reader

    @staticmethod
    def _map_checked(shm: posix_ipc.SharedMemory, name: str) -> mmap.mmap:
        size = shm.size
        if size < HEADER_BYTES:
            raise IncompatibleRingError(f"segment {name!r} has {size} bytes, too small for a ring header")
        mm = mmap.mmap(shm.fd, size)
        try:
            (magic, version, header_bytes, slots, slot_bytes, max_readers, entry_bytes, declared, _, _, _) = (
                _STATIC.unpack_from(mm, 0)
            )
            if magic != RING_MAGIC:
                raise IncompatibleRingError(
                    f"segment {name!r} is not an embxfer ring (magic {magic:#x}, expected {RING_MAGIC:#x})"
                )
            if version != RING_VERSION:
                raise IncompatibleRingError(
                    f"ring {name!r} has layout version {version}, this embxfer reads version {RING_VERSION}"
                )
            shape_ok = (
                header_bytes == HEADER_BYTES
                and entry_bytes == READER_ENTRY_BYTES
                and 2 <= slots <= MAX_SLOTS
                and CACHE_LINE <= slot_bytes <= MAX_SLOT_BYTES
                and slot_bytes % CACHE_LINE == 0
                and 1 <= max_readers <= MAX_READERS
                and declared == segment_bytes(slots, slot_bytes, max_readers) == size
            )
            if not shape_ok:
                raise IncompatibleRingError(
                    f"ring {name!r} has an inconsistent shape: {size} bytes, header {header_bytes}, "
                    f"entries {entry_bytes}, {slots} slots of {slot_bytes}, {max_readers} readers, "
                    f"declared size {declared}"
                )
        except BaseException:
            mm.close()
            raise
        return mm

    @staticmethod
    def _claim_entry(shm: posix_ipc.SharedMemory, mm: mmap.mmap, name: str, doorbell: Doorbell) -> int:
        max_readers = _STATIC.unpack_from(mm, 0)[5]
        pid = os.getpid()
        with _AttachLock(shm.fd):
            for index in range(max_readers):
                entry = _TABLE + index * READER_ENTRY_BYTES
                owner, owner_start, _, _ = _ENTRY_COLD.unpack_from(mm, entry + _PID)
                if owner and process_alive(owner, owner_start):
                    continue
                # Cursor 0 before the pid: the writer never sees this entry with a stale cursor.
                # Heartbeat 0: attaching, until attach has stored the cursor.
                _U64.pack_into(mm, entry + _CURSOR, 0)
                _write_name(mm, entry + _DOORBELL, doorbell.name)
                _ENTRY_COLD.pack_into(mm, entry + _PID, pid, process_start_ticks(pid), 0, 0)
                return index
        raise RingError(f"ring {name!r}: all {max_readers} reader entries are taken by live processes")

    @property
    def next_sequence(self) -> int:
        """Sequence of the next record this reader will deliver."""
        return self._next

    @property
    def doorbell(self) -> Doorbell:
        return self._doorbell

    @property
    def pending(self) -> int:
        """Records published and not yet delivered to this reader."""
        if self._closed:
            raise self._closed_error()
        return max(0, _U64.unpack_from(self._mm, _HEAD)[0] - (self._next - 1))

    @property
    def stats(self) -> ReaderStats:
        # Every sequence this reader moved past was either delivered or rejected.
        delivered = self._next - self._first - self._rejected
        return ReaderStats(delivered, self._retried, self._rejected)

    def poll(self) -> bytes | None:
        """The next record, or None if none is published yet; never blocks.

        Raises RingCorruptError (after counting and skipping it) for a record that keeps
        failing validation; the following poll continues with the next record."""
        if self._closed:
            raise self._closed_error()
        expected = self._next
        words = self._words
        offset = self._slot_base + (expected - 1) % self._slots * self._slot_bytes
        # The sequence first, then length and checksum: loads are not reordered with loads.
        if words[offset >> 3] != expected:
            if words[_HEAD_WORD] < expected:
                return None  # not published yet: the usual case for an idle ring
            return self._poll_slow(expected, offset)
        mm = self._mm
        size, checksum = _load_size_checksum(mm, offset + 8)
        if size > self._capacity:
            return self._poll_slow(expected, offset)
        start = offset + SLOT_HEADER_BYTES
        data = mm[start : start + size]
        if _crc32(data, expected & 0xFFFFFFFF) != checksum or words[offset >> 3] != expected:
            return self._poll_slow(expected, offset)
        # _advance, inlined: this is the per-record path
        words[self._cursor_word] = expected
        self._next = expected + 1
        _fence_acquire()
        _fence_release()
        if words[_WRITER_PARKED_WORD]:
            self._writer_doorbell.ring(self._writer_doorbell_name)
        return data

    def poll_many(self, max_records: int) -> list[bytes]:
        """The records published and not yet delivered, in order, at most `max_records`
        (an int >= 1); an empty list if there are none. Never blocks.

        Each record is validated as by `poll`; the cursor is stored, and a parked writer
        woken, once for the whole batch. A record that fails validation ends the batch
        before it, and the next call (or `poll`) counts, skips and reports it
        (RingCorruptError) like `poll`."""
        if self._closed:
            raise self._closed_error()
        if type(max_records) is not int or max_records < 1:
            raise ValueError(f"RingReader.poll_many: max_records={max_records!r}, expected an int >= 1")
        first = expected = self._next
        words = self._words
        mm = self._mm
        slot_base, slots, slot_bytes, capacity = self._slot_base, self._slots, self._slot_bytes, self._capacity
        records = []
        while expected - first < max_records:
            offset = slot_base + (expected - 1) % slots * slot_bytes
            if words[offset >> 3] != expected:
                break
            size, checksum = _load_size_checksum(mm, offset + 8)
            if size > capacity:
                break
            start = offset + SLOT_HEADER_BYTES
            data = mm[start : start + size]
            if _crc32(data, expected & 0xFFFFFFFF) != checksum or words[offset >> 3] != expected:
                break
            records.append(data)
            expected += 1
        if not records:
            data = self.poll()  # nothing yet, or the first record needs poll's slow path
            return [] if data is None else [data]
        self._advance(expected - 1)
        return records

    def _advance(self, sequence: int) -> None:
        _U64.pack_into(self._mm, self._cursor_offset, sequence)
        self._next = sequence + 1
        _fence()
        if _U64.unpack_from(self._mm, _WRITER_PARKED)[0]:
            self._writer_doorbell.ring(self._writer_doorbell_name)

    def _poll_slow(self, expected: int, offset: int) -> bytes | None:
        mm = self._mm
        if _U64.unpack_from(mm, _HEAD)[0] < expected:
            return None  # not published yet: the usual case for an idle ring
        # Published, so the slot must hold it. On a weakly ordered CPU a slot can read wrong
        # while the writer's stores drain from its store buffer (nanoseconds; a descheduled
        # writer has drained them); one that stays wrong over a few re-reads is corrupt (or
        # this reader was evicted and lapped).
        problem = ""
        for attempt in range(16):
            sequence, size, checksum = _SLOT_HEADER.unpack_from(mm, offset)
            if sequence != expected:
                problem = f"slot holds sequence {sequence}"
            elif size > self._capacity:
                problem = f"length {size} exceeds the slot payload of {self._capacity}"
            else:
                start = offset + SLOT_HEADER_BYTES
                data = mm[start : start + size]
                if _crc32(data, expected & 0xFFFFFFFF) != checksum:
                    problem = "checksum mismatch"
                elif _U64.unpack_from(mm, offset)[0] != expected:
                    problem = "sequence changed while reading"
                else:
                    if attempt:
                        self._retried += 1
                    self._advance(expected)
                    return data
        self._rejected += 1
        self._advance(expected)
        raise RingCorruptError(f"ring {self.name}: record {expected} rejected ({problem}); skipped", expected)

    def read(self, timeout: float, spin_s: float | None = None) -> bytes | None:
        """The next record, waiting up to `timeout` seconds: polls for `spin_s` (default:
        the reader's), then parks on its doorbell; both finite and >= 0. None on timeout.
        Raises PeerDeadError once the writer is gone (or closed the ring) and every
        record it completed has been delivered."""
        if spin_s is None:
            spin_s = self.spin_s
        # check_seconds's own fast path, inlined: read is called once per record.
        if type(timeout) is not float or not 0.0 <= timeout < _INF:
            timeout = _check_seconds("RingReader.read", "timeout", timeout)
        if type(spin_s) is not float or not 0.0 <= spin_s < _INF:
            spin_s = _check_seconds("RingReader.read", "spin_s", spin_s)
        data = self.poll()
        if data is not None:
            return data
        found = _wait_any((self,), self._doorbell, timeout, spin_s)
        return None if found is None else found[1]

    def heartbeat(self) -> None:
        """Store the current time as this reader's heartbeat. Safe from any thread (one
        aligned 8-byte store under the handle's lifecycle lock); does nothing once closed."""
        with self._lifecycle_lock:
            if not self._closed:
                _U64.pack_into(self._mm, self._entry + _HEARTBEAT, _monotonic_ns())

    def _closed_error(self) -> RingClosedError:
        return RingClosedError(f"ring {self.name}: reader #{self.index} was closed")

    def _set_parked(self, parked: int) -> None:
        _U64.pack_into(self._mm, self._parked_offset, parked)

    def _wake_writer_if_parked(self) -> None:
        _fence()
        if _U64.unpack_from(self._mm, _WRITER_PARKED)[0]:
            self._writer_doorbell.ring(self._writer_doorbell_name)

    def writer(self) -> PeerInfo:
        """The writer: pid, head, heartbeat age, alive (False once gone or closed)."""
        if self._closed:
            raise self._closed_error()
        return _writer_info(self._mm, _monotonic_ns())

    def writer_alive(self) -> bool:
        """False once the writer's process is gone or it closed the ring."""
        return self.writer().alive

    def readers(self) -> list[PeerInfo]:
        """Every attached reader of this ring, this one included."""
        if self._closed:
            raise self._closed_error()
        return _reader_infos(self._mm, self._max_readers, _monotonic_ns())

    def dead_peers(self, stale_after: float | None = None) -> list[PeerInfo]:
        """The writer and readers of this ring whose process is gone (or whose heartbeat is
        older than `stale_after` seconds, finite and >= 0, when given)."""
        if self._closed:
            raise self._closed_error()
        if stale_after is not None:
            stale_after = _check_seconds("RingReader.dead_peers", "stale_after", stale_after)
        return _dead(_peer_infos(self._mm, self._max_readers, _monotonic_ns()), stale_after)

    def _raise_if_writer_dead(self, now: float) -> None:
        # At most once per PARK_SLICE_S: an event loop calling read/wait_any with tiny
        # timeouts must not pay a /proc lookup on every call.
        if now - self._liveness_checked_at < PARK_SLICE_S:
            return
        self._liveness_checked_at = now
        writer = self.writer()
        if not writer.alive:
            closed = _U64.unpack_from(self._mm, _WRITER_STATE)[0] == _CLOSED
            why = "closed the ring" if closed else "is gone"
            raise PeerDeadError(f"ring {self.name}: the {writer.describe()} {why}", writer)

    def close(self) -> None:
        """Give the reader entry back (the segment stays). Idempotent."""
        with self._lifecycle_lock:
            if self._closed:
                return
            self._closed = True
            try:
                with _AttachLock(self._shm.fd):
                    _ENTRY_COLD.pack_into(self._mm, self._entry + _PID, 0, 0, 0, 0)
                self._wake_writer_if_parked()
            finally:
                self._writer_doorbell.close()
                self._words.release()
                self._mm.close()
                self._shm.close_fd()
                if self._owns_doorbell:
                    self._doorbell.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wait_any(
    readers: Sequence[RingReader],
    doorbell: Doorbell,
    timeout: float,
    spin_s: float = DEFAULT_SPIN_S,
) -> tuple[RingReader, bytes] | None:
    """The first record available on any of `readers` (all attached with `doorbell`), as
    (reader, record); None after `timeout` seconds.

    Spins for `spin_s`, then parks: sets every reader's parked word, fences, drains stale
    posts, polls every reader once more and only then sleeps on the doorbell. A writer
    that publishes after the poll sees a parked word (its own fence comes between its
    publish and that look) and posts; a post before the sleep stays counted. Every
    PARK_SLICE_S the parked reader wakes by itself to heartbeat and check its writers.
    `timeout` and `spin_s` are finite numbers of seconds >= 0.
    """
    timeout = _check_seconds("wait_any", "timeout", timeout)
    spin_s = _check_seconds("wait_any", "spin_s", spin_s)
    if not isinstance(doorbell, Doorbell):
        raise TypeError(f"wait_any: doorbell={doorbell!r}, expected a Doorbell")
    doorbell._open_semaphore()
    for reader in readers:
        if not isinstance(reader, RingReader):
            raise TypeError(f"wait_any: {reader!r} is not a RingReader")
        if reader._closed:
            raise reader._closed_error()
        if reader._doorbell is not doorbell and reader._doorbell.name != doorbell.name:
            raise ValueError(f"wait_any: reader of ring {reader.name} was attached with another doorbell")
    return _wait_any(readers, doorbell, timeout, spin_s)


def _wait_any(
    readers: Sequence[RingReader], doorbell: Doorbell, timeout: float, spin_s: float
) -> tuple[RingReader, bytes] | None:
    start = _monotonic()
    deadline = start + timeout
    spin_until = start + min(spin_s, timeout)
    while True:
        for reader in readers:
            data = reader.poll()
            if data is not None:
                return reader, data
        if _monotonic() >= spin_until:
            break
    last_check = start
    while True:
        for reader in readers:
            reader._set_parked(1)
        _fence()
        doorbell.drain()
        try:
            for reader in readers:
                data = reader.poll()
                if data is not None:
                    return reader, data
            now = _monotonic()
            if now >= deadline:
                for reader in readers:
                    reader._raise_if_writer_dead(now)
                return None
            rung = doorbell._sleep(min(PARK_SLICE_S, deadline - now))
        finally:
            for reader in readers:
                reader._set_parked(0)
        now = _monotonic()
        if not rung or now - last_check >= PARK_SLICE_S:
            last_check = now
            for reader in readers:
                reader.heartbeat()
                if not reader.pending:
                    reader._raise_if_writer_dead(now)


__all__ = [
    "DEFAULT_SPIN_S",
    "MAX_SEGMENT_BYTES",
    "PARK_SLICE_S",
    "SLOT_HEADER_BYTES",
    "Doorbell",
    "IncompatibleRingError",
    "PeerDeadError",
    "PeerInfo",
    "ReaderStats",
    "RingClosedError",
    "RingCorruptError",
    "RingError",
    "RingFullError",
    "RingReader",
    "RingWriter",
    "segment_bytes",
    "slot_bytes_for",
    "wait_any",
]
