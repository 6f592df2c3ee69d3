"""Control records: what a transfer, allocation (first or resume), completion, abort,
announce, member state and TP decision look like on the wire.

Every record is a frozen dataclass with `to_bytes()` / `from_bytes()`; `encode()` and
`decode()` do the same for any record type. No pickle: a fixed little-endian layout,
versioned, validated field by field before anything uses it. Anything malformed raises
`RecordError` (a `ValueError`) that names the field, the value and what was expected.

Wire layout (all integers little-endian)::

    header   8 bytes   magic b"EX" | version u8 | record type u8 | body length u32
    body     per type  fixed fields (int64 unless noted), then the variable part

    TRANSFER    src_rank, dst_rank, message, nbytes, segment count u16,
                then per segment: request_id, round u32, start u32, count u32,
                total_tokens u32, mrope_delta                      34 + 32 * segments
    ALLOCATIONS src_rank, dst_rank, count u32, then per request:
                request_id, round u32, sent_tokens u32, allocated_tokens u32
                                                                   20 + 20 * count
    COMPLETIONS src_rank, dst_rank, count u32, then per request:
                request_id, round u32, sent_tokens u32, total_tokens u32, flags u8
                                                                   20 + 21 * count
    ABORT       request_id, reason u8, src_rank, dst_rank, message length u16,
                message (UTF-8, at most MAX_MESSAGE_BYTES)       27 + message
    ANNOUNCE    request_id, total_tokens, src_rank, dst_rank              32 bytes
    MEMBER      src_rank, state u8 (1 draining, 2 left)                    9 bytes
    DECISIONS   src_rank, dst_rank, count u32, items u32, then per request:
                request_id, round u32, action u8, sent_tokens u32, total_tokens u32,
                allocated_tokens u32, mrope_delta, block form u8, item count u32,
                hash length u8, content hash (32 bytes, zero past its length); then
                the item area, 24-bit items      24 + 71 * count + 3 * items

A TRANSFER describes one staging message (one P2P send) of an encoder rank: its
segments, in the staging layout's order, each a stretch `[start, start + count)` of one
round of one request. The first round's segments carry N (`total_tokens`) and the mrope
delta; the receiver takes them from the first round only (SPEC R3).

Allocations, completions and decisions are **batch records**: one per step and peer, an
array of fixed-size entries (numpy reads them in one call), so a step that admits 256
requests writes one ALLOCATIONS record, not 256. An allocation carries no block list:
with two-sided P2P the receiver unpacks into its own memory, so the encoder only needs
how much it may send (`allocated_tokens`, whole blocks: R2); the blocks travel to the
language TP followers in DECISIONS, which must apply exactly them, in order. A
decision's blocks are its maximal runs of consecutive indices (token order follows
block order), plain or as runs, whichever is shorter (`Decisions`). **One encoding per
record**: fixed layouts, the shorter form, maximal runs, zero padding, so
`encode(decode(data)) == data` for every accepted `data`.

**Bounded by the receiver**: `decode(data, limits)` rejects a decision of more than
`limits.max_blocks` blocks or with an index past `limits.max_block_index`, and a TRANSFER
with more than `limits.max_segments` segments, from the headers and runs, before anything
is expanded: a 72-byte record can never make the receiver build a million-entry list
(a batch's entries are views of the bytes that arrived; the blocks of one DECISIONS
record are at most one pool, as its sender cuts them).
`max_record_bytes(limits)` is the largest record such a receiver accepts; ring slots are
sized from it (`ring.slot_bytes_for`), so any allocation of the pool fits one slot.

**Bounded by default**: `limits` defaults to `DEFAULT_LIMITS`, what a default-configured
language rank holds (a pool of DEFAULT_POOL_BLOCKS blocks, DEFAULT_MAX_SEGMENTS segments
a message), so a caller that forgets the argument decodes small, never up to the wire's
maxima. A receiver passes the limits of its own pool (`Config.limits`); the wire's
maxima (`UNBOUNDED`, `Limits.unbounded()`) are an explicit choice, for tests and tools.

Several records may travel back to back in one ring slot or network message (a
*frame*): `encode_frame` / `decode_frame`.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, NamedTuple

import numpy as np

MAGIC = b"EX"
VERSION = 3

MAX_MESSAGE_BYTES = 512
# The most blocks one block list carries, so the largest pool a receiver may have
# (`Config.language_pool_blocks` is checked against this same constant).
MAX_BLOCKS = 1 << 20
MAX_BLOCK_INDEX = (1 << 24) - 1
MAX_SEGMENTS = 4096
# What a default-configured language rank holds (`Config().language_pool_blocks`,
# `Config().max_segments_per_message`; a test keeps the two in step): the default limits.
DEFAULT_POOL_BLOCKS = 1024
DEFAULT_MAX_SEGMENTS = 64
MAX_HASH_BYTES = 32
BROADCAST_RANK = -1

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_U32_MAX = (1 << 32) - 1

_HEADER = struct.Struct("<2sBBI")
_BLOCKS_HEADER = struct.Struct("<IIBB")
_SEGMENT = struct.Struct("<qIIIIq")
_FORM_EMPTY, _FORM_PLAIN, _FORM_RUNS = 0, 1, 2


class RecordError(ValueError):
    """A record that cannot be built or decoded; the message names field, value and expectation."""


class RecordType(IntEnum):
    TRANSFER = 1
    ALLOCATIONS = 2
    COMPLETIONS = 3
    ABORT = 4
    ANNOUNCE = 5
    DECISIONS = 6
    MEMBER = 7
    PAYLOAD_INFO = 8
    HELD = 9
    ANNOUNCEMENTS = 10


class AbortReason(IntEnum):
    USER = 1
    TIMEOUT = 2
    PEER_DEAD = 3
    INVALID = 4
    SHUTDOWN = 5
    INTERNAL = 6
    BUDGET = 7


class DecisionAction(IntEnum):
    ADMIT = 1
    RESUME = 2
    COMPLETE = 3
    FAIL = 4
    FREE = 5
    CACHED = 6
    PIN = 7  # keep the cached item `content_hash` for request `request_id` until it ends


class MemberState(IntEnum):
    DRAINING = 1  # takes no new requests, finishes those in flight
    LEFT = 2  # gone on purpose: nothing of it is in flight


_ACTIONS = {action.value: action for action in DecisionAction}
COMPLETION_CACHED = 1  # Completions flags: served from the language side's cache, no data moved


@dataclass(frozen=True)
class Limits:
    """What a receiver can use: block lists of at most `max_blocks` blocks with indices at
    most `max_block_index`, TRANSFERs of at most `max_segments` segments. A receiver with
    a pool of n blocks uses `Limits.for_pool(n, ...)`; `Limits()` is a default-configured
    pool's (DEFAULT_LIMITS), `Limits.unbounded()` the wire's maxima."""

    max_blocks: int = DEFAULT_POOL_BLOCKS
    max_segments: int = DEFAULT_MAX_SEGMENTS
    max_block_index: int = DEFAULT_POOL_BLOCKS - 1

    @classmethod
    def for_pool(cls, pool_blocks: int, max_segments: int = DEFAULT_MAX_SEGMENTS) -> Limits:
        return cls(max_blocks=pool_blocks, max_segments=max_segments, max_block_index=pool_blocks - 1)

    @classmethod
    def unbounded(cls) -> Limits:
        """The most the wire format can say: block lists of MAX_BLOCKS blocks with indices
        up to MAX_BLOCK_INDEX, MAX_SEGMENTS segments. For tests and tools that decode
        records of any pool; a receiver uses its own pool's limits."""
        return cls(max_blocks=MAX_BLOCKS, max_segments=MAX_SEGMENTS, max_block_index=MAX_BLOCK_INDEX)

    def __post_init__(self) -> None:
        for name, low, high in (("max_blocks", 0, MAX_BLOCKS), ("max_segments", 1, MAX_SEGMENTS),
                                ("max_block_index", -1, MAX_BLOCK_INDEX)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"Limits.{name}={value!r}: expected an integer in [{low}, {high}]")


DEFAULT_LIMITS = Limits()
UNBOUNDED = Limits.unbounded()
# The old name of UNBOUNDED, kept while runtime/bus.py still passes it; new code says
# UNBOUNDED (or, better, the receiver's own limits).
NO_LIMITS = UNBOUNDED


# ---------------------------------------------------------------------------- checks


def _int_field(record: object, name: str, low: int, high: int = _INT64_MAX) -> int:
    value = getattr(record, name)
    if type(value) is not int:
        if isinstance(value, bool):
            raise RecordError(f"{type(record).__name__}.{name}={value!r}: expected an integer")
        try:
            value = operator.index(value)
        except TypeError:
            raise RecordError(f"{type(record).__name__}.{name}={value!r}: expected an integer") from None
        object.__setattr__(record, name, value)
    if not low <= value <= high:
        raise RecordError(
            f"{type(record).__name__}.{name}={value}: expected an integer in [{low}, {high}]"
        )
    return value


def _enum_field(record: object, name: str, enum: type[IntEnum]) -> None:
    value = getattr(record, name)
    try:
        member = enum(value) if not isinstance(value, bool) else None
    except ValueError:
        member = None
    if member is None:
        allowed = ", ".join(f"{m.name}={m.value}" for m in enum)
        raise RecordError(f"{type(record).__name__}.{name}={value!r}: expected one of {allowed}")
    object.__setattr__(record, name, member)


def _ranks(record: object, *, dst: bool = True) -> None:
    _int_field(record, "src_rank", 0)
    if dst:
        _int_field(record, "dst_rank", BROADCAST_RANK)


def _check_progress(record: object, sent_tokens: int, total_tokens: int) -> None:
    if sent_tokens > total_tokens:
        owner = type(record).__name__
        raise RecordError(f"{owner}.sent_tokens={sent_tokens}: expected at most total_tokens={total_tokens}")


# ------------------------------------------------------------------------ records


class _Record:
    RECORD_TYPE: ClassVar[RecordType]

    def to_bytes(self) -> bytes:
        body = self._body()
        return _HEADER.pack(MAGIC, VERSION, self.RECORD_TYPE, len(body)) + body

    @classmethod
    def trusted(cls, **fields: object) -> Record:
        """A record made from values the caller computed itself and knows to be valid (an
        endpoint's own allocations and counters), without the field checks: the hot path
        builds several per request. Whatever arrives from a peer is checked in `decode`."""
        record = object.__new__(cls)
        record.__dict__.update(fields)
        return record

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Record:
        record = decode(data, limits)
        if not isinstance(record, cls):
            raise RecordError(f"expected a {cls.__name__} record, got {type(record).__name__}")
        return record

    def _body(self) -> bytes:  # pragma: no cover - every record overrides it
        raise NotImplementedError


class Segment(NamedTuple):
    """One stretch of a staging message: tokens `[start, start + count)` of round `round`
    of request `request_id`, whose total is `total_tokens` with mrope delta
    `mrope_delta` (both meaningful in round 0 only, repeated after it and checked)."""

    request_id: int
    round: int
    start: int
    count: int
    total_tokens: int
    mrope_delta: int


def _check_segment(index: int, segment: object) -> Segment:
    where = f"Transfer.segments[{index}]"
    if not isinstance(segment, tuple) or len(segment) != 6:
        raise RecordError(f"{where}={segment!r:.80}: expected a Segment")
    for name, value in zip(Segment._fields, segment, strict=True):
        if type(value) is not int:
            raise RecordError(f"{where}.{name}={value!r}: expected an integer")
    request_id, round_, start, count, total, delta = segment
    for name, value, low, high in (("request_id", request_id, 0, _INT64_MAX), ("round", round_, 0, _U32_MAX),
                                   ("start", start, 0, _U32_MAX), ("count", count, 1, _U32_MAX),
                                   ("total_tokens", total, 1, _U32_MAX), ("mrope_delta", delta, _INT64_MIN, _INT64_MAX)):
        if not low <= value <= high:
            raise RecordError(f"{where}.{name}={value}: expected an integer in [{low}, {high}]")
    if start + count > total:
        raise RecordError(f"{where}: tokens [{start}, {start + count}) past total_tokens={total}")
    return segment if type(segment) is Segment else Segment(*segment)


@dataclass(frozen=True)
class Transfer(_Record):
    """Encoder rank -> the language ranks it serves: what staging message number `message`
    of its stream holds (`nbytes` bytes: the staging layout of the segments' counts)."""

    src_rank: int
    dst_rank: int
    message: int
    nbytes: int
    segments: tuple[Segment, ...]

    RECORD_TYPE: ClassVar[RecordType] = RecordType.TRANSFER
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<qqqqH")

    def __post_init__(self) -> None:
        _ranks(self)
        _int_field(self, "message", 0)
        _int_field(self, "nbytes", 1)
        segments = self.segments
        if not isinstance(segments, (tuple, list)) or not 1 <= len(segments) <= MAX_SEGMENTS:
            raise RecordError(f"Transfer.segments: {len(segments) if hasattr(segments, '__len__') else segments!r}"
                              f" segments, expected 1..{MAX_SEGMENTS}")
        object.__setattr__(self, "segments", tuple(_check_segment(i, seg) for i, seg in enumerate(segments)))

    def _body(self) -> bytes:
        fixed = self._FIXED.pack(self.src_rank, self.dst_rank, self.message, self.nbytes, len(self.segments))
        return fixed + b"".join(_SEGMENT.pack(*segment) for segment in self.segments)

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> Transfer:
        if len(body) < cls._FIXED.size:
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        src, dst, message, nbytes, count = cls._FIXED.unpack_from(body)
        if not 1 <= count <= limits.max_segments:
            raise RecordError(f"Transfer: {count} segments, this receiver takes 1..{limits.max_segments}")
        _expect_size(cls, body, cls._FIXED.size + count * _SEGMENT.size)
        segments = tuple(map(Segment._make, _SEGMENT.iter_unpack(body[cls._FIXED.size :])))
        # Unpacked integers are integers and the u32 fields are in range: only the bounds
        # that the format does not imply are left to check (what __post_init__ would do).
        for index, (request_id, _, start, count, total, _) in enumerate(segments):
            if request_id < 0 or count < 1 or total < 1 or start + count > total:
                _check_segment(index, segments[index])
        if src < 0 or dst < BROADCAST_RANK or message < 0 or nbytes < 1:
            return cls(src, dst, message, nbytes, segments)  # raises, naming the field
        record = object.__new__(cls)
        for name, value in (("src_rank", src), ("dst_rank", dst), ("message", message), ("nbytes", nbytes),
                            ("segments", segments)):
            object.__setattr__(record, name, value)
        return record


@dataclass(frozen=True)
class Abort(_Record):
    """Either side gives up on a request. `message` is at most MAX_MESSAGE_BYTES of UTF-8;
    use `clip_message()` to shorten arbitrary text first."""

    request_id: int
    reason: AbortReason
    message: str
    src_rank: int
    dst_rank: int

    RECORD_TYPE: ClassVar[RecordType] = RecordType.ABORT
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<qBqqH")

    def __post_init__(self) -> None:
        _int_field(self, "request_id", 0)
        _enum_field(self, "reason", AbortReason)
        if not isinstance(self.message, str):
            raise RecordError(f"Abort.message={self.message!r:.60}: expected a str")
        try:
            size = len(self.message.encode("utf-8"))
        except UnicodeEncodeError:
            raise RecordError("Abort.message: contains lone surrogates, not valid UTF-8") from None
        if size > MAX_MESSAGE_BYTES:
            raise RecordError(
                f"Abort.message: {size} bytes of UTF-8, expected at most {MAX_MESSAGE_BYTES} "
                "(clip_message() shortens it)"
            )
        _ranks(self)

    def _body(self) -> bytes:
        text = self.message.encode("utf-8")
        fixed = self._FIXED.pack(self.request_id, self.reason, self.src_rank, self.dst_rank, len(text))
        return fixed + text

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> Abort:
        if len(body) < cls._FIXED.size:
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        request_id, reason, src, dst, size = cls._FIXED.unpack_from(body)
        if size > MAX_MESSAGE_BYTES:
            raise RecordError(f"Abort.message: length {size}, expected at most {MAX_MESSAGE_BYTES}")
        _expect_size(cls, body, cls._FIXED.size + size)
        try:
            message = bytes(body[cls._FIXED.size:]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(f"Abort.message: not valid UTF-8 ({exc.reason})") from None
        return cls(request_id, reason, message, src, dst)


@dataclass(frozen=True)
class Announce(_Record):
    """Encoder leader -> language leader: request `request_id` will have `total_tokens`
    tokens (known after preprocessing, before the payload exists), so its first
    allocation can be exact."""

    request_id: int
    total_tokens: int
    src_rank: int
    dst_rank: int

    RECORD_TYPE: ClassVar[RecordType] = RecordType.ANNOUNCE
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<4q")

    def __post_init__(self) -> None:
        _int_field(self, "request_id", 0)
        _int_field(self, "total_tokens", 1)
        _ranks(self)

    def _body(self) -> bytes:
        return self._FIXED.pack(self.request_id, self.total_tokens, self.src_rank, self.dst_rank)

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> Announce:
        _expect_size(cls, body, cls._FIXED.size)
        return cls(*cls._FIXED.unpack_from(body))



# ------------------------------------------------------------------ batch records
#
# Allocations, completions and decisions travel as one record per step and peer, whatever
# the number of requests in it: a fixed header, then an array of fixed-size entries that
# numpy reads in one call (and a run array for the decisions' blocks). What the sender
# packs in one record is cut to fit one frame (`entries_that_fit`).

_ALLOCATION = np.dtype([("request_id", "<i8"), ("round", "<u4"), ("sent_tokens", "<u4"),
                        ("allocated_tokens", "<u4")])
_COMPLETION = np.dtype([("request_id", "<i8"), ("round", "<u4"), ("sent_tokens", "<u4"),
                        ("total_tokens", "<u4"), ("flags", "u1")])
_DECISION = np.dtype([("request_id", "<i8"), ("round", "<u4"), ("action", "u1"), ("sent_tokens", "<u4"),
                      ("total_tokens", "<u4"), ("allocated_tokens", "<u4"), ("mrope_delta", "<i8"),
                      ("form", "u1"), ("items", "<u4"), ("hash_length", "u1"), ("content_hash", "S32")])


def entries(dtype: np.dtype, count: int) -> np.ndarray:
    """An uninitialised entry array for a batch record of `count` requests."""
    return np.zeros(count, dtype=dtype)


@dataclass(frozen=True, eq=False)
class _Batch(_Record):
    """A record of `entries` (a numpy structured array) from `src_rank` to `dst_rank`."""

    src_rank: int
    dst_rank: int
    entries: np.ndarray

    ENTRY: ClassVar[np.dtype]
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<qqI")

    def __post_init__(self) -> None:
        _ranks(self)
        self._check_entries(self.entries, RecordError)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    @classmethod
    def _check_entries(cls, array: object, error: type[Exception]) -> None:
        if not isinstance(array, np.ndarray) or array.dtype != cls.ENTRY or array.ndim != 1 or not len(array):
            raise error(f"{cls.__name__}.entries: expected a non-empty 1-D array of {cls.ENTRY}")
        if (array["request_id"] < 0).any():
            raise error(f"{cls.__name__}.entries.request_id: a negative id")

    def _body(self) -> bytes:
        return self._FIXED.pack(self.src_rank, self.dst_rank, len(self.entries)) + self.entries.tobytes()

    @classmethod
    def of(cls, src_rank: int, dst_rank: int, rows: list[tuple[int, ...]]) -> _Batch:
        """A record of tuples in ENTRY's field order, computed by the caller itself (not
        checked again: see `trusted`)."""
        return cls.trusted(src_rank=src_rank, dst_rank=dst_rank, entries=np.array(rows, dtype=cls.ENTRY))

    def _rows(self, item: type) -> list:
        """Each entry as `item(*fields, src_rank)` (a few entries as tuples, many by column:
        whichever costs less)."""
        e, src = self.entries, self.src_rank
        if len(e) <= _SMALL_BATCH:
            return [item(*row, src) for row in e.tolist()]
        columns = [e[name].tolist() for name in self.ENTRY.names]
        return [item(*row, src) for row in zip(*columns, strict=True)]

    @classmethod
    def _check_rows(cls, rows: list[tuple], error: type[Exception]) -> None:
        """`_check_entries` of a few entries, in plain Python (a tenth of the vectorized
        checks' fixed cost); the same rules (a property test holds the two together)."""
        cls._check_entries(np.array(rows, dtype=cls.ENTRY), error)

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> _Batch:
        if len(body) < cls._FIXED.size:
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        src, dst, count = cls._FIXED.unpack_from(body)
        _expect_size(cls, body, cls._FIXED.size + count * cls.ENTRY.itemsize)
        array = np.frombuffer(body, dtype=cls.ENTRY, count=count, offset=cls._FIXED.size)
        if 0 < count <= _SMALL_BATCH:
            cls._check_rows(array.tolist(), RecordError)
        else:
            cls._check_entries(array, RecordError)
        if src < 0 or dst < BROADCAST_RANK:
            raise RecordError(f"{cls.__name__}: src_rank={src}, dst_rank={dst}")
        return cls.trusted(src_rank=src, dst_rank=dst, entries=array)

    @classmethod
    def entries_that_fit(cls, frame_bytes: int) -> int:
        return max(1, (frame_bytes - _HEADER.size - cls._FIXED.size) // cls.ENTRY.itemsize)


class Allocation(NamedTuple):
    """One entry of an ALLOCATIONS record, with the record's source."""

    request_id: int
    round: int
    sent_tokens: int
    allocated_tokens: int
    src_rank: int


class Completion(NamedTuple):
    """One entry of a COMPLETIONS record, with the record's source."""

    request_id: int
    round: int
    sent_tokens: int
    total_tokens: int
    flags: int
    src_rank: int


@dataclass(frozen=True, eq=False)
class Allocations(_Batch):
    """Language leader -> encoder leader: for each request, send round `round`, starting at
    `sent_tokens`, at most `allocated_tokens` tokens (whole blocks, R2). Round 0 is the
    first allocation, later rounds are resumes. `of` takes (request_id, round,
    sent_tokens, allocated_tokens) tuples."""

    RECORD_TYPE: ClassVar[RecordType] = RecordType.ALLOCATIONS
    ENTRY: ClassVar[np.dtype] = _ALLOCATION

    def items(self) -> list[Allocation]:
        return self._rows(Allocation)

    @classmethod
    def _check_entries(cls, array: object, error: type[Exception]) -> None:
        super()._check_entries(array, error)
        if (array["allocated_tokens"] < 1).any():
            raise error("Allocations.entries.allocated_tokens: expected >= 1")

    @classmethod
    def _check_rows(cls, rows: list[tuple], error: type[Exception]) -> None:
        for request_id, _, _, allocated_tokens in rows:
            if request_id < 0:
                raise error("Allocations.entries.request_id: a negative id")
            if allocated_tokens < 1:
                raise error("Allocations.entries.allocated_tokens: expected >= 1")


@dataclass(frozen=True, eq=False)
class Completions(_Batch):
    """A language rank read round `round` of each request (follower -> leader), or each
    request is complete (leader -> encoder leader; `flags & COMPLETION_CACHED`: served
    from the cache, no data moved). `of` takes (request_id, round, sent_tokens,
    total_tokens, flags) tuples."""

    RECORD_TYPE: ClassVar[RecordType] = RecordType.COMPLETIONS
    ENTRY: ClassVar[np.dtype] = _COMPLETION

    def items(self) -> list[Completion]:
        return self._rows(Completion)

    @classmethod
    def _check_entries(cls, array: object, error: type[Exception]) -> None:
        super()._check_entries(array, error)
        if (array["flags"] > COMPLETION_CACHED).any():
            raise error(f"Completions.entries.flags: expected 0 or {COMPLETION_CACHED}")
        if (array["sent_tokens"] > array["total_tokens"]).any():
            raise error("Completions.entries.sent_tokens: expected at most total_tokens")

    @classmethod
    def _check_rows(cls, rows: list[tuple], error: type[Exception]) -> None:
        for request_id, _, sent_tokens, total_tokens, flags in rows:
            if request_id < 0:
                raise error("Completions.entries.request_id: a negative id")
            if flags > COMPLETION_CACHED:
                raise error(f"Completions.entries.flags: expected 0 or {COMPLETION_CACHED}")
            if sent_tokens > total_tokens:
                raise error("Completions.entries.sent_tokens: expected at most total_tokens")


_ANNOUNCEMENT = np.dtype([("request_id", "<i8"), ("total_tokens", "<u4")])


@dataclass(frozen=True, eq=False)
class Announcements(_Batch):
    """Encoder leader -> language leader: for each request, its size `total_tokens` (the
    rows that travel), for submits whose first allocation has not come (`Announce` for
    one, from the engine). What the language leader does with it is `Announce`'s. `of`
    takes (request_id, total_tokens) tuples."""

    RECORD_TYPE: ClassVar[RecordType] = RecordType.ANNOUNCEMENTS
    ENTRY: ClassVar[np.dtype] = _ANNOUNCEMENT

    @classmethod
    def _check_entries(cls, array: object, error: type[Exception]) -> None:
        super()._check_entries(array, error)
        if (array["total_tokens"] < 1).any():
            raise error("Announcements.entries.total_tokens: expected >= 1")

    @classmethod
    def _check_rows(cls, rows: list[tuple], error: type[Exception]) -> None:
        for request_id, total_tokens in rows:
            if request_id < 0:
                raise error("Announcements.entries.request_id: a negative id")
            if total_tokens < 1:
                raise error("Announcements.entries.total_tokens: expected >= 1")


class Decision(NamedTuple):
    """One entry of a DECISIONS record, with its blocks and the record's source."""

    request_id: int
    round: int
    action: DecisionAction
    sent_tokens: int
    total_tokens: int
    allocated_tokens: int
    mrope_delta: int
    content_hash: bytes
    blocks: np.ndarray
    src_rank: int


@dataclass(frozen=True, eq=False)
class Decisions(_Batch):
    """The TP leader's decisions, in the order it made them, that every rank applies to its
    own pool (SPEC R4, section 8). total_tokens 0 means "not known yet" (an ADMIT before
    the first transfer). For ADMIT and RESUME, allocated_tokens is len(blocks) *
    block_size. CACHED and COMPLETE may name a cache entry in `content_hash`.

    Blocks keep their order (token order follows block order). Entry i's blocks are its
    `items` 24-bit items of the record's item area (after those of the entries before
    it), in one of two forms, the shorter one (`form`): 1, plain, one item per block; 2,
    runs, (first block, length - 1) per maximal run of consecutive indices, used only
    when strictly shorter than plain; 0, no blocks. So one scattered allocation of n
    blocks never takes more than 3 * n bytes."""

    items: np.ndarray  # int64 values of the item area (each < 2**24)

    RECORD_TYPE: ClassVar[RecordType] = RecordType.DECISIONS
    ENTRY: ClassVar[np.dtype] = _DECISION
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<qqII")

    def __post_init__(self) -> None:
        _ranks(self)
        self._check_entries(self.entries, RecordError)
        self._check_items(self.entries, self.items, NO_BOUND, RecordError)

    @classmethod
    def _check_entries(cls, array: object, error: type[Exception]) -> None:
        super()._check_entries(array, error)
        if not _IS_ACTION[array["action"]].all():
            raise error(f"Decisions.entries.action: expected one of {sorted(_ACTION_VALUES)}")
        total = array["total_tokens"]
        if ((total > 0) & (array["sent_tokens"] > total)).any():
            raise error("Decisions.entries.sent_tokens: expected at most total_tokens")
        lengths = array["hash_length"]
        if (lengths > MAX_HASH_BYTES).any():
            raise error(f"Decisions.entries.hash_length: expected at most {MAX_HASH_BYTES}")
        # One encoding: the bytes past a hash's length are zero.
        offset = _DECISION.fields["content_hash"][1]
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(len(array), _DECISION.itemsize)
        raw = raw[:, offset : offset + MAX_HASH_BYTES]
        if (raw[np.arange(MAX_HASH_BYTES) >= lengths[:, None].astype(np.int64)] != 0).any():
            raise error("Decisions.entries.content_hash: bytes past hash_length are not zero")
        form, items = array["form"], array["items"]
        if (form > _FORM_RUNS).any() or ((form == _FORM_EMPTY) != (items == 0)).any() \
                or ((form == _FORM_RUNS) & (items % 2 == 1)).any():
            raise error("Decisions.entries: a block form and item count that do not go together")

    @staticmethod
    def _layout(array: np.ndarray, items: np.ndarray, limits: Limits, error: type[Exception]) -> tuple:
        """Check the item area against the entries and `limits` (vectorized, nothing
        expanded beyond what the receiver's pool could hold per entry); returns
        (block counts per entry, the expanded blocks, their owners)."""
        counts = array["items"].astype(np.int64)
        if int(counts.sum()) != len(items):
            raise error(f"Decisions.items: the entries name {int(counts.sum())} items, the record has {len(items)}")
        n = len(array)
        form = array["form"]
        blocks_per_entry = np.where(form == _FORM_PLAIN, counts, 0)
        owner = np.repeat(np.arange(n), counts)
        first = np.cumsum(counts) - counts
        position = np.arange(len(items)) - first[owner]
        is_run = form[owner] == _FORM_RUNS
        run_starts = items[is_run & (position % 2 == 0)]
        run_lengths = items[is_run & (position % 2 == 1)] + 1
        run_owner = owner[is_run & (position % 2 == 0)]
        if len(run_starts):
            blocks_per_entry = blocks_per_entry + np.bincount(run_owner, weights=run_lengths, minlength=n).astype(
                np.int64)
        if (blocks_per_entry > limits.max_blocks).any():
            raise error(f"Decisions: {int(blocks_per_entry.max())} blocks for one request, this receiver holds at "
                        f"most {limits.max_blocks}")
        if int(blocks_per_entry.sum()) > limits.max_blocks:
            # The sender cuts its records so that one never allocates more than the pool:
            # what a record expands to is bounded by the receiver's pool, whatever its length.
            raise error(f"Decisions: {int(blocks_per_entry.sum())} blocks in one record, this receiver holds at "
                        f"most {limits.max_blocks}")
        runs_per_entry = counts // 2
        if ((form == _FORM_RUNS) & (2 * runs_per_entry >= blocks_per_entry)).any():
            raise error("Decisions: runs used where the plain form is not longer (not canonical)")
        if len(run_starts) > 1:
            same = run_owner[1:] == run_owner[:-1]
            if (same & (run_starts[1:] == run_starts[:-1] + run_lengths[:-1])).any():
                raise error("Decisions: two runs of one request that should be one (not canonical)")
        plain = items[~is_run]
        plain_owner = owner[~is_run]
        if len(plain) > 1:
            continues = (plain_owner[1:] == plain_owner[:-1]) & (plain[1:] == plain[:-1] + 1)
            plain_runs = counts - np.bincount(plain_owner[1:][continues], minlength=n)
            if ((form == _FORM_PLAIN) & (2 * plain_runs < counts)).any():
                raise error("Decisions: plain form where runs are shorter (not canonical)")
        # The highest index from the plain items and the runs' ends, before any run is expanded.
        highest = max(int(plain.max()) if len(plain) else -1,
                      int((run_starts + run_lengths - 1).max()) if len(run_starts) else -1)
        if highest > limits.max_block_index:
            raise error(f"Decisions: block index {highest}, this receiver's pool has "
                        f"{limits.max_block_index + 1} blocks")
        if len(run_starts):
            offsets = np.concatenate(([0], np.cumsum(run_lengths)[:-1]))
            expanded = np.repeat(run_starts - offsets, run_lengths) + np.arange(int(run_lengths.sum()))
            expanded_owner = np.repeat(run_owner, run_lengths)
            blocks = np.concatenate((plain, expanded))
            block_owner = np.concatenate((plain_owner, expanded_owner))
            # token order within an entry: entries are plain or runs, never both
            order = np.argsort(block_owner, kind="stable")
            blocks, block_owner = blocks[order], block_owner[order]
        else:
            blocks, block_owner = plain, plain_owner
        keys = np.sort(block_owner * (1 << 24) + blocks)
        if (keys[1:] == keys[:-1]).any():
            raise error("Decisions: a block index repeats within one request (a block holds one part of one request)")
        allocated = array["allocated_tokens"].astype(np.int64)
        allocating = _IS_ALLOCATING[array["action"]]
        bad = allocating & ((blocks_per_entry == 0) != (allocated == 0))
        bad |= allocating & (blocks_per_entry > 0) & (
            (allocated < blocks_per_entry) | (allocated % np.maximum(blocks_per_entry, 1) != 0))
        if bad.any():
            raise error("Decisions.entries.allocated_tokens: expected len(blocks) * block_size")
        return blocks_per_entry, blocks, block_owner

    @classmethod
    def _check_items(cls, array: np.ndarray, items: object, limits: Limits, error: type[Exception]) -> None:
        if not isinstance(items, np.ndarray) or items.ndim != 1 or (len(items) and (
                int(items.min()) < 0 or int(items.max()) > MAX_BLOCK_INDEX)):
            raise error(f"Decisions.items: expected a 1-D array of values in [0, {MAX_BLOCK_INDEX}]")
        cls._layout(array, items.astype(np.int64), limits, error)

    def _body(self) -> bytes:
        fixed = self._FIXED.pack(self.src_rank, self.dst_rank, len(self.entries), len(self.items))
        packed = self.items.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        return fixed + self.entries.tobytes() + packed

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> Decisions:
        if len(body) < cls._FIXED.size:
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        src, dst, count, item_count = cls._FIXED.unpack_from(body)
        entries_end = cls._FIXED.size + count * _DECISION.itemsize
        _expect_size(cls, body, entries_end + 3 * item_count)
        array = np.frombuffer(body, dtype=_DECISION, count=count, offset=cls._FIXED.size)
        raw = np.frombuffer(body, dtype=np.uint8, count=3 * item_count, offset=entries_end).reshape(-1, 3)
        items = raw[:, 0].astype(np.int64) | (raw[:, 1].astype(np.int64) << 8) | (raw[:, 2].astype(np.int64) << 16)
        if count <= _SMALL_BATCH and item_count <= limits.max_blocks:
            # A few entries (the record of one step's few requests): the same checks in
            # plain Python cost a tenth of the vectorized ones' fixed cost.
            _check_small_decisions(body, cls._FIXED.size, count, items.tolist(), limits)
        else:
            cls._check_entries(array, RecordError)
            cls._layout(array, items, limits, RecordError)
        if src < 0 or dst < BROADCAST_RANK:
            raise RecordError(f"{cls.__name__}: src_rank={src}, dst_rank={dst}")
        return cls.trusted(src_rank=src, dst_rank=dst, entries=array, items=items)

    @classmethod
    def of(cls, src_rank: int, items: list[tuple], dst_rank: int = BROADCAST_RANK) -> Decisions:
        """A record of (request_id, round, action, sent_tokens, total_tokens,
        allocated_tokens, mrope_delta, content_hash, blocks) tuples the caller computed
        itself (not checked again: see `trusted`); blocks a list or an array of ints."""
        if len(items) <= _SMALL_BATCH:  # a few: row by row (a tenth of the columns' fixed cost)
            rows, area = [], []
            for request_id, round_, action, sent, total, allocated, delta, content_hash, blocks in items:
                form, values = _block_items(blocks)
                area.extend(values)
                rows.append((request_id, round_, action, sent, total, allocated, delta, form, len(values),
                             len(content_hash), content_hash))
            return cls.trusted(src_rank=src_rank, dst_rank=dst_rank, entries=np.array(rows, dtype=_DECISION),
                               items=np.array(area, dtype=np.int64))
        out = entries(_DECISION, len(items))
        columns = list(zip(*items, strict=True))  # one column per field: numpy converts each at once
        for column, name in enumerate(("request_id", "round", "action", "sent_tokens", "total_tokens",
                                       "allocated_tokens", "mrope_delta")):
            out[name] = columns[column]
        block_lists = columns[8]
        counts = list(map(len, block_lists))
        if max(counts) <= 2:  # runs are never shorter (most requests hold a block or two)
            area = [block for blocks in block_lists for block in blocks]
            out["items"] = counts
            out["form"] = np.minimum(out["items"], _FORM_PLAIN)  # plain, or empty without blocks
        else:
            area, forms, counts = [], [], []
            for blocks in block_lists:
                form, values = _block_items(blocks)
                forms.append(form)
                counts.append(len(values))
                area.extend(values)
            out["form"], out["items"] = forms, counts
        hashes = columns[7]
        if any(hashes):
            out["content_hash"] = hashes
            out["hash_length"] = list(map(len, hashes))
        return cls.trusted(src_rank=src_rank, dst_rank=dst_rank, entries=out, items=np.array(area, dtype=np.int64))

    def decisions(self) -> list[Decision]:
        e, src = self.entries, self.src_rank
        lengths = e["hash_length"].tolist()
        hashes = [bytes(h).ljust(MAX_HASH_BYTES, b"\0")[:n] if n else b"" for h, n in
                  zip(e["content_hash"].tolist(), lengths, strict=False)]
        actions = [_ACTIONS[a] for a in e["action"].tolist()]
        return [Decision(*row, src) for row in zip(
            e["request_id"].tolist(), e["round"].tolist(), actions, e["sent_tokens"].tolist(),
            e["total_tokens"].tolist(), e["allocated_tokens"].tolist(), e["mrope_delta"].tolist(), hashes,
            self.blocks(), strict=False)]

    def block_lists(self) -> list[list[int]]:
        """Each entry's block indices as a list of ints, in token order (what a follower
        claims): the item area sliced once when no entry uses runs."""
        if (self.entries["form"] == _FORM_RUNS).any():
            return [blocks.tolist() for blocks in self.blocks()]
        flat, out, offset = self.items.tolist(), [], 0
        for count in self.entries["items"].tolist():
            out.append(flat[offset : offset + count])
            offset += count
        return out

    def blocks(self) -> list[np.ndarray]:
        """Each entry's block indices (int64), in token order."""
        result = []
        offset = 0
        for form, count in zip(self.entries["form"].tolist(), self.entries["items"].tolist(), strict=False):
            values = self.items[offset : offset + count]
            offset += count
            if form == _FORM_RUNS:
                starts, lengths = values[0::2], values[1::2] + 1
                shift = np.concatenate(([0], np.cumsum(lengths)[:-1]))
                values = np.repeat(starts - shift, lengths) + np.arange(int(lengths.sum()))
            result.append(values)
        return result

    @classmethod
    def bytes_for(cls, entries: int, items: int) -> int:
        return _HEADER.size + cls._FIXED.size + entries * _DECISION.itemsize + 3 * items


_SMALL_BATCH = 8
_DECISION_ROW = struct.Struct("<qIBIIIqBIB32s")
assert _DECISION_ROW.size == _DECISION.itemsize


def _check_small_decisions(body: memoryview, offset: int, count: int, items: list[int], limits: Limits) -> None:
    """`Decisions._check_entries` and `_layout` for a record of a few entries, entry by
    entry: the same rules, the same messages (tests/control check that both accept
    exactly the same bytes)."""
    if count < 1:
        raise RecordError(f"Decisions.entries: expected a non-empty 1-D array of {_DECISION}")
    rows = [_DECISION_ROW.unpack_from(body, offset + i * _DECISION_ROW.size) for i in range(count)]
    for request_id, _, action, sent, total, _, _, form, item_count, hash_length, content_hash in rows:
        if request_id < 0:
            raise RecordError("Decisions.entries.request_id: a negative id")
        if action not in _ACTIONS:
            raise RecordError(f"Decisions.entries.action: expected one of {sorted(_ACTIONS)}")
        if total > 0 and sent > total:
            raise RecordError("Decisions.entries.sent_tokens: expected at most total_tokens")
        if hash_length > MAX_HASH_BYTES:
            raise RecordError(f"Decisions.entries.hash_length: expected at most {MAX_HASH_BYTES}")
        if content_hash[hash_length:].strip(b"\0"):
            raise RecordError("Decisions.entries.content_hash: bytes past hash_length are not zero")
        if form > _FORM_RUNS or (form == _FORM_EMPTY) != (item_count == 0) or (form == _FORM_RUNS and item_count % 2):
            raise RecordError("Decisions.entries: a block form and item count that do not go together")
    named = sum(row[8] for row in rows)
    if named != len(items):
        raise RecordError(f"Decisions.items: the entries name {named} items, the record has {len(items)}")
    position = 0
    layouts = []
    for row in rows:
        form, item_count = row[7], row[8]
        values = items[position : position + item_count]
        position += item_count
        if form == _FORM_RUNS:
            starts, lengths = values[0::2], [v + 1 for v in values[1::2]]
            layouts.append((row, form, values, starts, lengths, sum(lengths)))
        else:
            layouts.append((row, form, values, (), (), item_count))
    for *_, blocks_here in layouts:
        if blocks_here > limits.max_blocks:
            raise RecordError(f"Decisions: {blocks_here} blocks for one request, this receiver holds at most "
                              f"{limits.max_blocks}")
    total_blocks = sum(layout[5] for layout in layouts)
    if total_blocks > limits.max_blocks:
        raise RecordError(f"Decisions: {total_blocks} blocks in one record, this receiver holds at most "
                          f"{limits.max_blocks}")
    for row, form, values, starts, lengths, blocks_here in layouts:
        if form == _FORM_RUNS:
            if 2 * len(starts) >= blocks_here:
                raise RecordError("Decisions: runs used where the plain form is not longer (not canonical)")
            for k in range(1, len(starts)):
                if starts[k] == starts[k - 1] + lengths[k - 1]:
                    raise RecordError("Decisions: two runs of one request that should be one (not canonical)")
            highest = max(s + n - 1 for s, n in zip(starts, lengths, strict=True))
        else:
            if values and 2 * (1 + sum(1 for a, b in zip(values, values[1:], strict=False) if b != a + 1)) < len(values):
                raise RecordError("Decisions: plain form where runs are shorter (not canonical)")
            highest = max(values) if values else -1
        if highest > limits.max_block_index:  # before anything is expanded
            raise RecordError(f"Decisions: block index {highest}, this receiver's pool has "
                              f"{limits.max_block_index + 1} blocks")
        expanded = [b for s, n in zip(starts, lengths, strict=True) for b in range(s, s + n)] if starts else values
        if len(set(expanded)) != len(expanded):
            raise RecordError("Decisions: a block index repeats within one request (a block holds one part of one "
                              "request)")
        action, allocated = row[2], row[5]
        if action in (DecisionAction.ADMIT, DecisionAction.RESUME):
            if (blocks_here == 0) != (allocated == 0) or (blocks_here and (allocated < blocks_here
                                                                           or allocated % blocks_here)):
                raise RecordError("Decisions.entries.allocated_tokens: expected len(blocks) * block_size")


def _block_items(blocks: Sequence[int]) -> tuple[int, Sequence[int]]:
    """(form, items) of one block list (a list or an array of ints): the shorter of plain
    and maximal runs."""
    n = len(blocks)
    if n <= 2:  # runs take two items each: never shorter (and most requests hold a block or two)
        return (_FORM_PLAIN if n else _FORM_EMPTY), blocks
    blocks = np.asarray(blocks, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    if 2 * (len(breaks) + 1) >= n:
        return _FORM_PLAIN, blocks.tolist()
    firsts = np.concatenate(([0], breaks))
    runs = np.empty(2 * len(firsts), dtype=np.int64)
    runs[0::2] = blocks[firsts]
    runs[1::2] = np.diff(np.concatenate((firsts, [n]))) - 1
    return _FORM_RUNS, runs.tolist()


_FORM_EMPTY, _FORM_PLAIN, _FORM_RUNS = 0, 1, 2
_ALLOCATING = np.array([DecisionAction.ADMIT, DecisionAction.RESUME], dtype=np.uint8)
_ACTION_VALUES = np.array([action.value for action in DecisionAction], dtype=np.uint8)
# Lookup tables over every uint8 value (an index, not a set search: a fraction of np.isin's cost).
_IS_ACTION = np.zeros(256, dtype=bool)
_IS_ACTION[_ACTION_VALUES] = True
_IS_ALLOCATING = np.zeros(256, dtype=bool)
_IS_ALLOCATING[_ALLOCATING] = True
NO_BOUND = Limits.unbounded()


@dataclass(frozen=True)
class Member(_Record):
    """A member says what becomes of it (to every peer that reads it): DRAINING, then LEFT."""

    src_rank: int
    state: MemberState

    RECORD_TYPE: ClassVar[RecordType] = RecordType.MEMBER
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<qB")

    def __post_init__(self) -> None:
        _ranks(self, dst=False)
        _enum_field(self, "state", MemberState)

    def _body(self) -> bytes:
        return self._FIXED.pack(self.src_rank, self.state)

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> Member:
        _expect_size(cls, body, cls._FIXED.size)
        return cls(*cls._FIXED.unpack_from(body))




# ------------------------------------------------------------- what travels with a payload

MAX_ITEMS = 32
MAX_METADATA_ENTRIES = 8
MAX_METADATA_BYTES = 1024
MAX_NAME_BYTES = 24
MAX_METADATA_DIMS = 4
# Metadata dtypes on the wire (code -> numpy dtype string); bfloat16 travels as its bits.
METADATA_DTYPES = {1: "<i4", 2: "<i8", 3: "<f4", 4: "<f8", 5: "u1", 6: "<i2", 7: "<u2", 8: "<f2"}
_ITEM = struct.Struct("<B32sIIB3i")
_METADATA_HEAD = struct.Struct("<BBB")


class PayloadItem(NamedTuple):
    """A multimodal item of a payload: rows `[start, start + count)`, their content hash,
    whether the encoder skipped them (the language side holds them), and, for a skipped
    item, its first row's mrope positions in this request (`anchor`: t, h, w)."""

    content_hash: bytes
    start: int
    count: int
    skipped: bool = False
    anchor: tuple[int, int, int] = (0, 0, 0)


class Metadata(NamedTuple):
    """One small named tensor that travels with a payload: `dtype` a METADATA_DTYPES code,
    `shape`, and its raw little-endian bytes."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class PayloadInfo(_Record):
    """Encoder rank -> the language ranks it serves (`dst_rank`: their incarnation), just
    before the request's first segment: the payload's rows (`total_tokens`, the output's
    N), its items and its metadata. Sent only for payloads that skip items or carry metadata;
    the rows on the wire are then the non-skipped ones, in order."""

    src_rank: int
    dst_rank: int
    request_id: int
    total_tokens: int
    items: tuple[PayloadItem, ...] = ()
    metadata: tuple[Metadata, ...] = ()

    RECORD_TYPE: ClassVar[RecordType] = RecordType.PAYLOAD_INFO
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<qqqIBB")

    def __post_init__(self) -> None:
        _ranks(self)
        _int_field(self, "request_id", 0)
        _int_field(self, "total_tokens", 1, _U32_MAX)
        _check_info(self.total_tokens, tuple(self.items), tuple(self.metadata))
        object.__setattr__(self, "items", tuple(PayloadItem(*i) for i in self.items))
        object.__setattr__(self, "metadata", tuple(Metadata(*m) for m in self.metadata))

    @property
    def wire_tokens(self) -> int:
        """The rows that travel: all but the skipped items'."""
        return self.total_tokens - sum(item.count for item in self.items if item.skipped)

    def _body(self) -> bytes:
        parts = [self._FIXED.pack(self.src_rank, self.dst_rank, self.request_id, self.total_tokens,
                                  len(self.items), len(self.metadata))]
        for item in self.items:
            parts.append(_ITEM.pack(len(item.content_hash), item.content_hash, item.start, item.count,
                                    int(item.skipped), *item.anchor))
        for entry in self.metadata:
            name = entry.name.encode()
            parts.append(_METADATA_HEAD.pack(len(name), entry.dtype, len(entry.shape)) + name
                         + struct.pack(f"<{len(entry.shape)}I", *entry.shape) + entry.data)
        return b"".join(parts)

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> PayloadInfo:
        if len(body) < cls._FIXED.size:
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        src, dst, request_id, total, item_count, metadata_count = cls._FIXED.unpack_from(body)
        if item_count > MAX_ITEMS or metadata_count > MAX_METADATA_ENTRIES:
            raise RecordError(f"PayloadInfo: {item_count} items, {metadata_count} metadata entries; expected at "
                              f"most {MAX_ITEMS} and {MAX_METADATA_ENTRIES}")
        offset = cls._FIXED.size
        if len(body) < offset + item_count * _ITEM.size:
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        items = []
        for _ in range(item_count):
            length, raw_hash, start, count, skipped, *anchor = _ITEM.unpack_from(body, offset)
            offset += _ITEM.size
            if length > MAX_HASH_BYTES or raw_hash[length:].strip(b"\0") or skipped > 1:
                raise RecordError("PayloadInfo.items: a content hash or flag that is not canonical")
            items.append(PayloadItem(raw_hash[:length], start, count, bool(skipped), tuple(anchor)))
        metadata = []
        for _ in range(metadata_count):
            if len(body) < offset + _METADATA_HEAD.size:
                raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
            name_length, dtype, dims = _METADATA_HEAD.unpack_from(body, offset)
            offset += _METADATA_HEAD.size
            if name_length > MAX_NAME_BYTES or dims > MAX_METADATA_DIMS or dtype not in METADATA_DTYPES:
                raise RecordError(f"PayloadInfo.metadata: name of {name_length} bytes, {dims} dims, dtype {dtype}")
            end = offset + name_length + 4 * dims
            if len(body) < end:
                raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
            try:
                name = bytes(body[offset : offset + name_length]).decode("ascii")
            except UnicodeDecodeError:
                raise RecordError("PayloadInfo.metadata: a name that is not ASCII") from None
            shape = struct.unpack_from(f"<{dims}I", body, offset + name_length)
            size = np.dtype(METADATA_DTYPES[dtype]).itemsize
            for dim in shape:
                size *= dim
            if size > MAX_METADATA_BYTES or len(body) < end + size:
                raise RecordError(f"PayloadInfo.metadata[{name!r}]: {size} bytes, at most {MAX_METADATA_BYTES}")
            metadata.append(Metadata(name, dtype, tuple(shape), bytes(body[end : end + size])))
            offset = end + size
        _expect_size(cls, body, offset)
        return cls(src, dst, request_id, total, tuple(items), tuple(metadata))


def _check_info(total: int, items: tuple, metadata: tuple) -> None:
    """The rules of a PayloadInfo (also `Payload`'s, on the encoder side)."""
    if len(items) > MAX_ITEMS:
        raise RecordError(f"PayloadInfo.items: {len(items)} items, expected at most {MAX_ITEMS}")
    end = 0
    for index, item in enumerate(items):
        content_hash, start, count = item[0], item[1], item[2]
        if not isinstance(content_hash, bytes) or not 1 <= len(content_hash) <= MAX_HASH_BYTES:
            raise RecordError(f"PayloadInfo.items[{index}].content_hash: expected 1..{MAX_HASH_BYTES} bytes")
        if type(start) is not int or type(count) is not int or start < end or count < 1 or start + count > total:
            raise RecordError(f"PayloadInfo.items[{index}]: rows [{start}, {start}+{count}) expected inside "
                              f"[{end}, {total}), after the item before it")
        end = start + count
        if len(item) > 4 and (len(item[4]) != 3 or any(type(a) is not int or not -(1 << 31) <= a < 1 << 31
                                                       for a in item[4])):
            raise RecordError(f"PayloadInfo.items[{index}].anchor: expected three int32 positions")
    if sum(item[2] for item in items if len(item) > 3 and item[3]) >= total:
        raise RecordError("PayloadInfo.items: every row skipped (a request sends at least one row)")
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise RecordError(f"PayloadInfo.metadata: {len(metadata)} entries, expected at most {MAX_METADATA_ENTRIES}")
    names = set()
    total_bytes = 0
    for entry in metadata:
        name, dtype, shape, data = entry
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_BYTES or not name.isascii() \
                or not all(c.isalnum() or c in "_.-" for c in name) or name in names:
            raise RecordError(f"PayloadInfo.metadata: name {name!r}: expected 1..{MAX_NAME_BYTES} characters from "
                              "[A-Za-z0-9_.-], each name once")
        names.add(name)
        if dtype not in METADATA_DTYPES or len(shape) > MAX_METADATA_DIMS:
            raise RecordError(f"PayloadInfo.metadata[{name!r}]: dtype {dtype}, shape {shape}")
        expected = np.dtype(METADATA_DTYPES[dtype]).itemsize * int(np.prod(shape, dtype=np.int64))
        if len(data) != expected:
            raise RecordError(f"PayloadInfo.metadata[{name!r}]: {len(data)} bytes for shape {shape}, expected "
                              f"{expected}")
        total_bytes += expected
    if total_bytes > MAX_METADATA_BYTES:
        raise RecordError(f"PayloadInfo.metadata: {total_bytes} bytes in all, expected at most {MAX_METADATA_BYTES}")


PAYLOAD_INFO_MAX_BYTES = (_HEADER.size + PayloadInfo._FIXED.size + MAX_ITEMS * _ITEM.size
                          + MAX_METADATA_ENTRIES * (_METADATA_HEAD.size + MAX_NAME_BYTES + 4 * MAX_METADATA_DIMS)
                          + MAX_METADATA_BYTES)


class Held(NamedTuple):
    """One entry of a HELD record: the language side holds item `content_hash` of request
    `request_id` (pinned until the request ends)."""

    request_id: int
    content_hash: bytes
    src_rank: int


_HELD = np.dtype([("request_id", "<i8"), ("hash_length", "u1"), ("content_hash", "S32")])


@dataclass(frozen=True, eq=False)
class HeldItems(_Batch):
    """Language leader -> encoder leader: items of admitted requests that the language
    side holds in its cache (the encoder engine may skip them: `Sender.lookup_items`)."""

    RECORD_TYPE: ClassVar[RecordType] = RecordType.HELD
    ENTRY: ClassVar[np.dtype] = _HELD

    @classmethod
    def _check_entries(cls, array: object, error: type[Exception]) -> None:
        super()._check_entries(array, error)
        lengths = array["hash_length"]
        if ((lengths < 1) | (lengths > MAX_HASH_BYTES)).any():
            raise error(f"HeldItems.entries.hash_length: expected 1..{MAX_HASH_BYTES}")
        offset = _HELD.fields["content_hash"][1]
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(len(array), _HELD.itemsize)
        raw = raw[:, offset : offset + MAX_HASH_BYTES]
        if (raw[np.arange(MAX_HASH_BYTES) >= lengths[:, None].astype(np.int64)] != 0).any():
            raise error("HeldItems.entries.content_hash: bytes past hash_length are not zero")

    @classmethod
    def _check_rows(cls, rows: list[tuple], error: type[Exception]) -> None:
        # A row's hash is read without its trailing zero bytes: it is no longer than
        # hash_length exactly when every byte past hash_length is zero.
        for request_id, hash_length, content_hash in rows:
            if request_id < 0:
                raise error("HeldItems.entries.request_id: a negative id")
            if not 1 <= hash_length <= MAX_HASH_BYTES:
                raise error(f"HeldItems.entries.hash_length: expected 1..{MAX_HASH_BYTES}")
            if len(content_hash) > hash_length:
                raise error("HeldItems.entries.content_hash: bytes past hash_length are not zero")

    @classmethod
    def of(cls, src_rank: int, dst_rank: int, items: list[tuple[int, bytes]]) -> HeldItems:
        out = entries(_HELD, len(items))
        out["request_id"] = [rid for rid, _ in items]
        out["content_hash"] = [h for _, h in items]
        out["hash_length"] = [len(h) for _, h in items]
        return cls.trusted(src_rank=src_rank, dst_rank=dst_rank, entries=out)

    def items(self) -> list[Held]:
        e, src = self.entries, self.src_rank
        return [Held(rid, bytes(h).ljust(MAX_HASH_BYTES, b"\0")[:n], src) for rid, h, n in
                zip(e["request_id"].tolist(), e["content_hash"].tolist(), e["hash_length"].tolist(), strict=True)]


Record = (Transfer | Allocations | Completions | Abort | Announce | Announcements | Decisions | Member | PayloadInfo
          | HeldItems)

_BY_TYPE: dict[int, type[_Record]] = {
    cls.RECORD_TYPE: cls for cls in (Transfer, Allocations, Completions, Abort, Announce, Announcements, Decisions,
                                     Member, PayloadInfo, HeldItems)
}


def _expect_size(cls: type, body: memoryview, size: int) -> None:
    if len(body) != size:
        raise RecordError(f"{cls.__name__}: body of {len(body)} bytes, expected {size}")


def max_record_bytes(limits: Limits = DEFAULT_LIMITS) -> int:
    """Largest record about one request a receiver with these `limits` accepts: a TRANSFER
    of `max_segments` segments, an ABORT with the longest message, or a DECISIONS record
    of one allocation of the whole pool scattered block by block. Size a ring slot from
    this (plus the ring's slot header, see `ring.slot_bytes_for`); batch records are cut
    by their sender to fit its frame (`entries_that_fit`)."""
    largest_body = max(
        Transfer._FIXED.size + limits.max_segments * _SEGMENT.size,
        Abort._FIXED.size + MAX_MESSAGE_BYTES,
        Announce._FIXED.size,
        Decisions.bytes_for(1, limits.max_blocks) - _HEADER.size,
        Allocations._FIXED.size + Allocations.ENTRY.itemsize,
        Completions._FIXED.size + Completions.ENTRY.itemsize,
        PAYLOAD_INFO_MAX_BYTES - _HEADER.size,
    )
    return _HEADER.size + largest_body


# The largest record the wire format allows (any receiver accepts at most this).
MAX_RECORD_BYTES = max_record_bytes(UNBOUNDED)


def clip_message(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`text` shortened to at most `limit` bytes of UTF-8, cut on a character boundary."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw.decode("utf-8")
    return raw[:limit].decode("utf-8", "ignore")


def encode(record: Record) -> bytes:
    """The wire bytes of any record."""
    if not isinstance(record, _Record):
        raise RecordError(f"encode: expected a record, got {type(record).__name__}")
    return record.to_bytes()


def _view(data: object) -> memoryview:
    """`data` as a 1-D byte view; RecordError for anything else (never TypeError)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"decode: expected bytes, got {type(data).__name__}")
    try:
        view = memoryview(data)
        if view.ndim != 1 or not view.c_contiguous:
            raise RecordError(f"decode: expected a contiguous 1-D byte buffer, got {view.ndim}-D"
                              f"{'' if view.c_contiguous else ' non-contiguous'}")
        return view.cast("B") if view.format != "B" else view
    except (ValueError, TypeError) as exc:  # a released view, an odd format
        raise RecordError(f"decode: unusable buffer ({exc})") from None


def _decode_one(view: memoryview, offset: int, limits: Limits) -> tuple[Record, int]:
    if len(view) - offset < _HEADER.size:
        raise RecordError(f"record of {len(view) - offset} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, record_type, body_length = _HEADER.unpack_from(view, offset)
    if magic != MAGIC:
        raise RecordError(f"record magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise RecordError(f"record version {version}, expected {VERSION}")
    cls = _BY_TYPE.get(record_type)
    if cls is None:
        raise RecordError(f"record type {record_type}, expected one of {sorted(_BY_TYPE)}")
    end = offset + _HEADER.size + body_length
    if end > len(view):
        raise RecordError(f"{cls.__name__}: header says {body_length} body bytes, got {len(view) - offset - _HEADER.size}")
    return cls._parse(view[offset + _HEADER.size : end], limits), end  # type: ignore[attr-defined]


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Record:
    """The one record in `data`; RecordError if anything about it is malformed or more than
    a receiver with `limits` can use (by default a default-configured pool's: pass the
    receiver's own, or UNBOUNDED on purpose)."""
    view = _view(data)
    record, end = _decode_one(view, 0, limits)
    if end != len(view):
        raise RecordError(f"{type(record).__name__}: {len(view) - end} bytes after the record")
    return record


def encode_frame(records: list[Record] | tuple[Record, ...]) -> bytes:
    """Several records back to back: one ring slot or one network message."""
    return b"".join(encode(record) for record in records)


def decode_frame(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS,
                 wanted: frozenset[int] | None = None) -> tuple[list[Record], str | None]:
    """The records of a frame, and why the rest of it was dropped (None if nothing was).
    Decoding stops at the first malformed record: nothing after it can be framed. With
    `wanted` (record types), records of other types are stepped over by their header
    without being decoded (a ring carries every record to every reader; an encoder rank
    has no use for the language ranks' decisions)."""
    view = _view(data)
    records: list[Record] = []
    offset = 0
    while offset < len(view):
        try:
            if wanted is not None:
                skipped = _skip(view, offset, wanted)
                if skipped:
                    offset = skipped
                    continue
            record, offset = _decode_one(view, offset, limits)
        except RecordError as exc:
            return records, str(exc)
        records.append(record)
    return records, None


def _skip(view: memoryview, offset: int, wanted: frozenset[int]) -> int:
    """The offset after the record at `offset` if its type is not wanted, else 0."""
    if len(view) - offset < _HEADER.size:
        return 0
    magic, version, record_type, body_length = _HEADER.unpack_from(view, offset)
    if record_type in wanted or magic != MAGIC or version != VERSION or record_type not in _BY_TYPE:
        return 0  # decoded (or refused, with the reason) the usual way
    end = offset + _HEADER.size + body_length
    if end > len(view):
        return 0
    return end


__all__ = [
    "BROADCAST_RANK",
    "COMPLETION_CACHED",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_SEGMENTS",
    "DEFAULT_POOL_BLOCKS",
    "Limits",
    "MAX_BLOCKS",
    "MAX_BLOCK_INDEX",
    "MAX_HASH_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_RECORD_BYTES",
    "MAX_SEGMENTS",
    "NO_LIMITS",
    "Abort",
    "AbortReason",
    "Announce",
    "Announcements",
    "Allocation",
    "Allocations",
    "Completion",
    "Completions",
    "Decision",
    "Decisions",
    "DecisionAction",
    "Member",
    "MemberState",
    "HeldItems",
    "Metadata",
    "PayloadInfo",
    "PayloadItem",
    "Record",
    "RecordError",
    "RecordType",
    "Segment",
    "Transfer",
    "UNBOUNDED",
    "VERSION",
    "clip_message",
    "decode",
    "decode_frame",
    "encode",
    "encode_frame",
    "max_record_bytes",
]
