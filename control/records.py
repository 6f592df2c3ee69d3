"""Control records: what a transfer, resume, completion, abort, announce and TP decision
look like on the wire.

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
    RESUME      request_id, round, sent_tokens, allocated_tokens, src_rank, dst_rank
                                                                          48 bytes
    COMPLETION  request_id, round, sent_tokens, total_tokens, src_rank, dst_rank,
                flags u8                                                  49 bytes
    ABORT       request_id, reason u8, src_rank, dst_rank, message length u16,
                message (UTF-8, at most MAX_MESSAGE_BYTES)       27 + message
    ANNOUNCE    request_id, total_tokens, src_rank, dst_rank              32 bytes
    MEMBER      src_rank, state u8 (1 draining, 2 left)                    9 bytes
    DECISION    request_id, round, action u8, sent_tokens, total_tokens,
                allocated_tokens, src_rank, mrope_delta, hash length u8,
                content hash (at most 32 bytes), block list     58 + hash + blocks

A TRANSFER describes one staging message (one P2P send) of an encoder rank: its
segments, in the staging layout's order, each a stretch `[start, start + count)` of one
round of one request. The first round's segments carry N (`total_tokens`) and the mrope
delta; the receiver takes them from the first round only (SPEC R3). A RESUME carries no
block list: with two-sided P2P the receiver unpacks into its own blocks, so the encoder
only needs how much it may send (`allocated_tokens`, whole blocks: R2); the blocks
travel to the language TP followers in DECISION, which must apply exactly them.

Block lists keep their order (token order follows block order) and are written in the
smaller of two forms, both with the narrowest item width (1, 2 or 3 bytes) that holds
the largest index (indices are at most MAX_BLOCK_INDEX = 2**24 - 1)::

    block list  block count u32 | item count u32 | form u8 | item width u8 | items
    form 0      empty list, no items
    form 1      plain: one item per block
    form 2      runs:  (start, length - 1) per maximal run of consecutive indices

Runs are used only when they are strictly shorter than the plain form, so a list of n
blocks never takes more than 10 + 3 * n bytes. **One encoding per record**: `decode`
accepts only what `encode` writes (narrowest width, the shorter form, maximal runs,
exact lengths), so `encode(decode(data)) == data` for every accepted `data`.

**Bounded by the receiver**: `decode(data, limits)` rejects a block list longer than
`limits.max_blocks` or an index past `limits.max_block_index`, and a TRANSFER with more
than `limits.max_segments` segments, from the headers, before anything is expanded: a
72-byte record can never make the receiver build a million-entry list.
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
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, NamedTuple

MAGIC = b"EX"
VERSION = 2

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
    RESUME = 2
    COMPLETION = 3
    ABORT = 4
    ANNOUNCE = 5
    DECISION = 6
    MEMBER = 7


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


class MemberState(IntEnum):
    DRAINING = 1  # takes no new requests, finishes those in flight
    LEFT = 2  # gone on purpose: nothing of it is in flight


_ACTIONS = {action.value: action for action in DecisionAction}
COMPLETION_CACHED = 1  # Completion.flags: served from the language side's cache, no data moved


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


def _blocks_field(record: Decision) -> tuple[int, ...]:
    value = record.blocks
    owner = type(record).__name__
    if isinstance(value, (str, bytes, bytearray)) or not hasattr(value, "__len__"):
        raise RecordError(f"{owner}.blocks={value!r:.60}: expected a sequence of block indices")
    if len(value) > MAX_BLOCKS:
        raise RecordError(f"{owner}.blocks: {len(value)} blocks, expected at most {MAX_BLOCKS}")
    if any(type(b) is bool for b in value):
        raise RecordError(f"{owner}.blocks={value!r:.60}: expected integer block indices, not bool")
    try:
        blocks = tuple(map(operator.index, value))
    except TypeError:
        raise RecordError(f"{owner}.blocks={value!r:.60}: expected integer block indices") from None
    if blocks and (min(blocks) < 0 or max(blocks) > MAX_BLOCK_INDEX):
        bad = min(blocks) if min(blocks) < 0 else max(blocks)
        raise RecordError(f"{owner}.blocks: index {bad} outside [0, {MAX_BLOCK_INDEX}]")
    if len(set(blocks)) != len(blocks):
        raise RecordError(f"{owner}.blocks: an index repeats (a block holds one part of one request)")
    object.__setattr__(record, "blocks", blocks)
    return blocks


def _check_allocation(record: object, blocks_count: int, allocated_tokens: int) -> None:
    # allocated_tokens == len(blocks) * block_size (SPEC R2); block_size is not on the
    # wire, so what can be checked is that such a block_size >= 1 exists.
    owner = type(record).__name__
    if not blocks_count:
        if allocated_tokens != 0:
            raise RecordError(
                f"{owner}.allocated_tokens={allocated_tokens}: expected 0 with an empty block list"
            )
    elif allocated_tokens < blocks_count or allocated_tokens % blocks_count:
        raise RecordError(
            f"{owner}.allocated_tokens={allocated_tokens}: expected len(blocks) * block_size "
            f"with {blocks_count} blocks"
        )


def _check_progress(record: object, sent_tokens: int, total_tokens: int) -> None:
    if sent_tokens > total_tokens:
        owner = type(record).__name__
        raise RecordError(f"{owner}.sent_tokens={sent_tokens}: expected at most total_tokens={total_tokens}")


# -------------------------------------------------------------------- block lists


def _item_width(largest: int) -> int:
    return 1 if largest <= 0xFF else 2 if largest <= 0xFFFF else 3


def _runs(blocks: tuple[int, ...]) -> list[int]:
    """(start, length - 1) of each maximal run of consecutive indices, flattened."""
    items = [blocks[0], 0]
    for previous, block in zip(blocks, blocks[1:]):  # noqa: B905 - offset by one on purpose
        if block == previous + 1:
            items[-1] += 1
        else:
            items += (block, 0)
    return items


def _encode_blocks(blocks: tuple[int, ...]) -> bytes:
    count = len(blocks)
    if count == 0:
        return _BLOCKS_HEADER.pack(0, 0, _FORM_EMPTY, 1)
    width = _item_width(max(blocks))
    runs = _runs(blocks)
    if len(runs) < count:
        items, form = runs, _FORM_RUNS
    else:
        items, form = blocks, _FORM_PLAIN
    if width == 1:
        packed = bytes(items)
    elif width == 2:
        packed = struct.pack(f"<{len(items)}H", *items)
    else:
        packed = b"".join(item.to_bytes(3, "little") for item in items)
    return _BLOCKS_HEADER.pack(count, len(items), form, width) + packed


def _decode_blocks(owner: str, data: memoryview, offset: int, limits: Limits) -> tuple[tuple[int, ...], int]:
    """(blocks, offset after the list); counts are checked against `limits` before
    anything is expanded, and only the canonical encoding is accepted."""
    if len(data) - offset < _BLOCKS_HEADER.size:
        raise RecordError(f"{owner}.blocks: truncated block-list header")
    count, item_count, form, width = _BLOCKS_HEADER.unpack_from(data, offset)
    start = offset
    offset += _BLOCKS_HEADER.size
    if count > limits.max_blocks:
        raise RecordError(f"{owner}.blocks: count {count}, this receiver holds at most {limits.max_blocks} blocks")
    if width not in (1, 2, 3):
        raise RecordError(f"{owner}.blocks: item width {width}, expected 1, 2 or 3")
    if form == _FORM_EMPTY:
        if count or item_count or width != 1:
            raise RecordError(f"{owner}.blocks: empty form with count {count}, items {item_count}, width {width}")
        return (), offset
    if form == _FORM_PLAIN:
        if item_count != count or count == 0:
            raise RecordError(f"{owner}.blocks: plain form with count {count}, items {item_count}")
    elif form == _FORM_RUNS:
        if item_count % 2 or not 0 < item_count < count:
            raise RecordError(f"{owner}.blocks: runs form with count {count}, items {item_count}")
    else:
        raise RecordError(f"{owner}.blocks: form {form}, expected 0 (empty), 1 (plain) or 2 (runs)")
    end = offset + item_count * width
    if end > len(data):
        raise RecordError(f"{owner}.blocks: {item_count} items of {width} bytes overrun the record")
    raw = bytes(data[offset:end])
    if width == 1:
        items = list(raw)
    elif width == 2:
        items = list(struct.unpack(f"<{item_count}H", raw))
    else:
        items = [int.from_bytes(raw[i : i + 3], "little") for i in range(0, len(raw), 3)]
    if form == _FORM_PLAIN:
        blocks = tuple(items)
    else:
        if sum(items[1::2]) + item_count // 2 != count:
            raise RecordError(f"{owner}.blocks: runs cover {sum(items[1::2]) + item_count // 2} blocks, "
                              f"header says {count}")
        blocks = tuple(b for first, extra in zip(items[0::2], items[1::2], strict=True)
                       for b in range(first, first + extra + 1))
    if max(blocks) > limits.max_block_index:
        raise RecordError(f"{owner}.blocks: index {max(blocks)}, this receiver's pool has "
                          f"{limits.max_block_index + 1} blocks")
    if len(set(blocks)) != count:
        raise RecordError(f"{owner}.blocks: runs overlap or an index repeats")
    if _encode_blocks(blocks) != bytes(data[start:end]):
        raise RecordError(f"{owner}.blocks: not the canonical encoding (narrowest width, shorter form, "
                          "maximal runs)")
    return blocks, end


def block_list_bytes(max_blocks: int, max_block_index: int = MAX_BLOCK_INDEX) -> int:
    """Largest encoded block list of at most `max_blocks` indices up to `max_block_index`."""
    return _BLOCKS_HEADER.size + _item_width(max(0, max_block_index)) * max_blocks


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
class Resume(_Record):
    """Language leader -> encoder: send round `round`, starting at `sent_tokens`, at most
    `allocated_tokens` tokens (whole blocks, R2). Round 0 is the initial announce."""

    request_id: int
    round: int
    sent_tokens: int
    allocated_tokens: int
    src_rank: int
    dst_rank: int

    RECORD_TYPE: ClassVar[RecordType] = RecordType.RESUME
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<6q")

    def __post_init__(self) -> None:
        _int_field(self, "request_id", 0)
        _int_field(self, "round", 0)
        _int_field(self, "sent_tokens", 0)
        _int_field(self, "allocated_tokens", 1)
        _ranks(self)

    def _body(self) -> bytes:
        return self._FIXED.pack(self.request_id, self.round, self.sent_tokens, self.allocated_tokens,
                                self.src_rank, self.dst_rank)

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> Resume:
        _expect_size(cls, body, cls._FIXED.size)
        request_id, round_, sent, allocated, src, dst = values = cls._FIXED.unpack_from(body)
        if request_id < 0 or round_ < 0 or sent < 0 or allocated < 1 or src < 0 or dst < BROADCAST_RANK:
            return cls(*values)  # raises, naming the field
        return cls.trusted(request_id=request_id, round=round_, sent_tokens=sent, allocated_tokens=allocated,
                           src_rank=src, dst_rank=dst)


@dataclass(frozen=True)
class Completion(_Record):
    """A language rank read round `round` (follower -> leader), or the request is complete
    (leader -> encoder leader; `flags & COMPLETION_CACHED`: served from the cache)."""

    request_id: int
    round: int
    sent_tokens: int
    total_tokens: int
    src_rank: int
    dst_rank: int
    flags: int = 0

    RECORD_TYPE: ClassVar[RecordType] = RecordType.COMPLETION
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<6qB")

    def __post_init__(self) -> None:
        _int_field(self, "request_id", 0)
        _int_field(self, "round", 0)
        sent = _int_field(self, "sent_tokens", 0)
        total = _int_field(self, "total_tokens", 0)
        _ranks(self)
        _int_field(self, "flags", 0, COMPLETION_CACHED)
        _check_progress(self, sent, total)

    def _body(self) -> bytes:
        return self._FIXED.pack(self.request_id, self.round, self.sent_tokens, self.total_tokens,
                                self.src_rank, self.dst_rank, self.flags)

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> Completion:
        _expect_size(cls, body, cls._FIXED.size)
        request_id, round_, sent, total, src, dst, flags = values = cls._FIXED.unpack_from(body)
        if request_id < 0 or round_ < 0 or sent < 0 or total < sent or src < 0 or dst < BROADCAST_RANK \
                or flags > COMPLETION_CACHED:
            return cls(*values)  # raises, naming the field
        return cls.trusted(request_id=request_id, round=round_, sent_tokens=sent, total_tokens=total,
                           src_rank=src, dst_rank=dst, flags=flags)


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


@dataclass(frozen=True)
class Decision(_Record):
    """The TP leader's decision that every rank applies to its own pool (SPEC R4, section 8).

    total_tokens 0 means "not known yet" (an ADMIT before the first transfer). For ADMIT
    and RESUME, allocated_tokens must be len(blocks) * block_size. CACHED names the
    cache entry in `content_hash`."""

    request_id: int
    round: int
    action: DecisionAction
    sent_tokens: int
    total_tokens: int
    allocated_tokens: int
    blocks: tuple[int, ...]
    src_rank: int
    mrope_delta: int
    content_hash: bytes = b""

    RECORD_TYPE: ClassVar[RecordType] = RecordType.DECISION
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<qqBqqqqqB")

    def __post_init__(self) -> None:
        _int_field(self, "request_id", 0)
        _int_field(self, "round", 0)
        _enum_field(self, "action", DecisionAction)
        sent = _int_field(self, "sent_tokens", 0)
        total = _int_field(self, "total_tokens", 0)
        allocated = _int_field(self, "allocated_tokens", 0)
        blocks = _blocks_field(self)
        _ranks(self, dst=False)
        _int_field(self, "mrope_delta", _INT64_MIN)
        if not isinstance(self.content_hash, bytes) or len(self.content_hash) > MAX_HASH_BYTES:
            raise RecordError(f"Decision.content_hash={self.content_hash!r:.60}: expected at most "
                              f"{MAX_HASH_BYTES} bytes")
        if total:
            _check_progress(self, sent, total)
        if self.action in (DecisionAction.ADMIT, DecisionAction.RESUME):
            _check_allocation(self, len(blocks), allocated)

    def _body(self) -> bytes:
        fixed = self._FIXED.pack(
            self.request_id, self.round, self.action, self.sent_tokens, self.total_tokens,
            self.allocated_tokens, self.src_rank, self.mrope_delta, len(self.content_hash),
        )
        return fixed + self.content_hash + _encode_blocks(self.blocks)

    @classmethod
    def _parse(cls, body: memoryview, limits: Limits) -> Decision:
        if len(body) < cls._FIXED.size:
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        request_id, round_, action, sent, total, allocated, src, delta, hash_size = cls._FIXED.unpack_from(body)
        if hash_size > MAX_HASH_BYTES:
            raise RecordError(f"Decision.content_hash: length {hash_size}, expected at most {MAX_HASH_BYTES}")
        offset = cls._FIXED.size + hash_size
        if offset > len(body):
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        content_hash = bytes(body[cls._FIXED.size : offset])
        blocks, end = _decode_blocks(cls.__name__, body, offset, limits)
        _expect_size(cls, body, end)
        values = (request_id, round_, action, sent, total, allocated, blocks, src, delta, content_hash)
        # The block list is checked already (range, repeats, canonical form); what is left
        # of __post_init__ is a few comparisons.
        if request_id < 0 or round_ < 0 or sent < 0 or total < 0 or allocated < 0 or src < 0 \
                or action not in _ACTIONS or (total and sent > total) \
                or (action <= DecisionAction.RESUME and (len(blocks) == 0) != (allocated == 0)) \
                or (blocks and (allocated < len(blocks) or allocated % len(blocks))):
            return cls(*values)  # raises, naming the field
        return cls.trusted(request_id=request_id, round=round_, action=_ACTIONS[action], sent_tokens=sent,
                           total_tokens=total, allocated_tokens=allocated, blocks=blocks, src_rank=src,
                           mrope_delta=delta, content_hash=content_hash)


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


Record = Transfer | Resume | Completion | Abort | Announce | Decision | Member

_BY_TYPE: dict[int, type[_Record]] = {
    cls.RECORD_TYPE: cls for cls in (Transfer, Resume, Completion, Abort, Announce, Decision, Member)
}


def _expect_size(cls: type, body: memoryview, size: int) -> None:
    if len(body) != size:
        raise RecordError(f"{cls.__name__}: body of {len(body)} bytes, expected {size}")


def max_record_bytes(limits: Limits = DEFAULT_LIMITS) -> int:
    """Largest encoded record a receiver with these `limits` accepts. Size a ring slot
    from this (plus the ring's slot header, see `ring.slot_bytes_for`)."""
    largest_body = max(
        Transfer._FIXED.size + limits.max_segments * _SEGMENT.size,
        Resume._FIXED.size,
        Completion._FIXED.size,
        Abort._FIXED.size + MAX_MESSAGE_BYTES,
        Announce._FIXED.size,
        Decision._FIXED.size + MAX_HASH_BYTES + block_list_bytes(limits.max_blocks, limits.max_block_index),
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
    if len(view) > max_record_bytes(limits):
        raise RecordError(f"record of {len(view)} bytes, expected at most {max_record_bytes(limits)}")
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
    "Completion",
    "Decision",
    "DecisionAction",
    "Member",
    "MemberState",
    "Record",
    "RecordError",
    "RecordType",
    "Resume",
    "Segment",
    "Transfer",
    "UNBOUNDED",
    "VERSION",
    "block_list_bytes",
    "clip_message",
    "decode",
    "decode_frame",
    "encode",
    "encode_frame",
    "max_record_bytes",
]
