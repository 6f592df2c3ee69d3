"""Control records: what a transfer, resume, completion, abort, heartbeat and TP decision
look like on the wire.

Every record is a frozen dataclass with `to_bytes()` / `from_bytes()`; `encode()` and
`decode()` do the same for any record type. No pickle: a fixed little-endian layout,
versioned, validated field by field before anything uses it. Anything malformed raises
`RecordError` (a `ValueError`) that names the field, the value and what was expected.

Wire layout (all integers little-endian)::

    header   8 bytes   magic b"EX" | version u8 | record type u8 | body length u32
    body     per type  fixed fields (int64 unless noted), then the variable part

    TRANSFER    request_id, round, total_tokens, sent_tokens, round_tokens, mrope_delta,
                src_rank, dst_rank, chunk_tokens                          72 bytes
    RESUME      request_id, round, sent_tokens, allocated_tokens, src_rank, dst_rank
                + block list                                            48 + blocks
    COMPLETION  request_id, round, sent_tokens, total_tokens, src_rank, dst_rank
                                                                          48 bytes
    ABORT       request_id, reason u8, src_rank, dst_rank, message length u16,
                message (UTF-8, at most MAX_MESSAGE_BYTES)       27 + message
    HEARTBEAT   src_rank, pid, timestamp_ns, role                         32 bytes
    DECISION    request_id, round, action u8, sent_tokens, total_tokens,
                allocated_tokens, src_rank, mrope_delta                 57 + blocks

Block lists keep their order (token order follows block order) and are written in the
smaller of two forms, both with a fixed item width of 1, 2 or 3 bytes chosen from the
largest index (indices are at most MAX_BLOCK_INDEX = 2**24 - 1)::

    block list  block count u32 | item count u32 | form u8 | item width u8 | items
    form 0      empty list, no items
    form 1      plain: one item per block
    form 2      runs:  (start, length - 1) per run of consecutive indices

Runs are used only when they are shorter than the plain form, so a list of n blocks
never takes more than 10 + 3 * n bytes (10 + 2 * n while indices stay below 65536).
`max_record_bytes(max_blocks)` turns that into the largest record of any type; a
resume or decision for 1000 fully fragmented blocks is at most 3075 bytes and fits a
4096-byte ring slot.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

import numpy as np

MAGIC = b"EX"
VERSION = 1

MAX_MESSAGE_BYTES = 512
MAX_BLOCKS = 1 << 20
MAX_BLOCK_INDEX = (1 << 24) - 1
BROADCAST_RANK = -1

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

_HEADER = struct.Struct("<2sBBI")
_BLOCKS_HEADER = struct.Struct("<IIBB")
_FORM_EMPTY, _FORM_PLAIN, _FORM_RUNS = 0, 1, 2


class RecordError(ValueError):
    """A record that cannot be built or decoded; the message names field, value and expectation."""


class RecordType(IntEnum):
    TRANSFER = 1
    RESUME = 2
    COMPLETION = 3
    ABORT = 4
    HEARTBEAT = 5
    DECISION = 6


class AbortReason(IntEnum):
    USER = 1
    TIMEOUT = 2
    PEER_DEAD = 3
    INVALID = 4
    SHUTDOWN = 5
    INTERNAL = 6


class DecisionAction(IntEnum):
    ADMIT = 1
    RESUME = 2
    COMPLETE = 3
    FAIL = 4
    FREE = 5


# ---------------------------------------------------------------------------- checks


def _int_field(record: object, name: str, low: int, high: int = _INT64_MAX) -> int:
    value = getattr(record, name)
    if isinstance(value, bool):
        raise RecordError(f"{type(record).__name__}.{name}={value!r}: expected an integer")
    try:
        value = operator.index(value)
    except TypeError:
        raise RecordError(f"{type(record).__name__}.{name}={value!r}: expected an integer") from None
    if not low <= value <= high:
        raise RecordError(
            f"{type(record).__name__}.{name}={value}: expected an integer in [{low}, {high}]"
        )
    object.__setattr__(record, name, value)
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


def _blocks_field(record: Resume | Decision) -> tuple[int, ...]:
    value = record.blocks
    owner = type(record).__name__
    if isinstance(value, (str, bytes, bytearray)) or not hasattr(value, "__len__"):
        raise RecordError(f"{owner}.blocks={value!r:.60}: expected a sequence of block indices")
    if len(value) > MAX_BLOCKS:
        raise RecordError(f"{owner}.blocks: {len(value)} blocks, expected at most {MAX_BLOCKS}")
    try:
        blocks = tuple(map(operator.index, value))
    except TypeError:
        raise RecordError(f"{owner}.blocks={value!r:.60}: expected integer block indices") from None
    if any(type(b) is bool for b in value):
        raise RecordError(f"{owner}.blocks={value!r:.60}: expected integer block indices, not bool")
    if blocks and (min(blocks) < 0 or max(blocks) > MAX_BLOCK_INDEX):
        bad = min(blocks) if min(blocks) < 0 else max(blocks)
        raise RecordError(f"{owner}.blocks: index {bad} outside [0, {MAX_BLOCK_INDEX}]")
    if len(set(blocks)) != len(blocks):
        raise RecordError(f"{owner}.blocks: an index repeats (a block holds one part of one request)")
    object.__setattr__(record, "blocks", blocks)
    return blocks


def _check_allocation(record: object, blocks: tuple[int, ...], allocated_tokens: int) -> None:
    # allocated_tokens == len(blocks) * block_size (SPEC R2); block_size is not on the
    # wire, so what can be checked is that such a block_size >= 1 exists.
    owner = type(record).__name__
    if not blocks:
        if allocated_tokens != 0:
            raise RecordError(
                f"{owner}.allocated_tokens={allocated_tokens}: expected 0 with an empty block list"
            )
    elif allocated_tokens < len(blocks) or allocated_tokens % len(blocks):
        raise RecordError(
            f"{owner}.allocated_tokens={allocated_tokens}: expected len(blocks) * block_size "
            f"with {len(blocks)} blocks"
        )


def _check_progress(record: object, sent_tokens: int, total_tokens: int, extra: int = 0) -> None:
    if sent_tokens + extra > total_tokens:
        owner = type(record).__name__
        what = "sent_tokens + round_tokens" if extra else "sent_tokens"
        raise RecordError(
            f"{owner}.{what}={sent_tokens + extra}: expected at most total_tokens={total_tokens}"
        )


# -------------------------------------------------------------------- block lists


def _item_width(largest: int) -> int:
    return 1 if largest <= 0xFF else 2 if largest <= 0xFFFF else 3


def _encode_blocks(blocks: tuple[int, ...]) -> bytes:
    count = len(blocks)
    if count == 0:
        return _BLOCKS_HEADER.pack(0, 0, _FORM_EMPTY, 1)
    indices = np.fromiter(blocks, dtype=np.int64, count=count)
    width = _item_width(int(indices.max()))
    run_starts = np.flatnonzero(np.diff(indices) != 1) + 1
    if 2 * (len(run_starts) + 1) < count:
        bounds = np.concatenate(([0], run_starts, [count]))
        items = np.empty(2 * (len(bounds) - 1), dtype=np.int64)
        items[0::2] = indices[bounds[:-1]]
        items[1::2] = np.diff(bounds) - 1
        form = _FORM_RUNS
    else:
        items = indices
        form = _FORM_PLAIN
    packed = items.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :width].tobytes()
    return _BLOCKS_HEADER.pack(count, len(items), form, width) + packed


def _decode_blocks(owner: str, data: memoryview, offset: int) -> tuple[tuple[int, ...], int]:
    """(blocks, offset after the list); every count and index is checked before use."""
    if len(data) - offset < _BLOCKS_HEADER.size:
        raise RecordError(f"{owner}.blocks: truncated block-list header")
    count, item_count, form, width = _BLOCKS_HEADER.unpack_from(data, offset)
    offset += _BLOCKS_HEADER.size
    if count > MAX_BLOCKS:
        raise RecordError(f"{owner}.blocks: count {count}, expected at most {MAX_BLOCKS}")
    if width not in (1, 2, 3):
        raise RecordError(f"{owner}.blocks: item width {width}, expected 1, 2 or 3")
    if form == _FORM_EMPTY:
        if count or item_count:
            raise RecordError(f"{owner}.blocks: empty form with count {count}, items {item_count}")
        return (), offset
    if form == _FORM_PLAIN:
        if item_count != count or count == 0:
            raise RecordError(f"{owner}.blocks: plain form with count {count}, items {item_count}")
    elif form == _FORM_RUNS:
        if item_count % 2 or not 0 < item_count // 2 <= count:
            raise RecordError(f"{owner}.blocks: runs form with count {count}, items {item_count}")
    else:
        raise RecordError(f"{owner}.blocks: form {form}, expected 0 (empty), 1 (plain) or 2 (runs)")
    end = offset + item_count * width
    if end > len(data):
        raise RecordError(f"{owner}.blocks: {item_count} items of {width} bytes overrun the record")
    padded = np.zeros((item_count, 4), dtype=np.uint8)
    padded[:, :width] = np.frombuffer(data, dtype=np.uint8, count=item_count * width, offset=offset).reshape(
        item_count, width
    )
    items = padded.view("<u4").reshape(item_count).astype(np.int64)
    if form == _FORM_PLAIN:
        indices = items
    else:
        starts, lengths = items[0::2], items[1::2] + 1
        if int(lengths.sum()) != count:
            raise RecordError(f"{owner}.blocks: runs cover {int(lengths.sum())} blocks, header says {count}")
        last = starts + lengths - 1
        if int(last.max()) > MAX_BLOCK_INDEX:
            raise RecordError(f"{owner}.blocks: run ends at {int(last.max())}, past {MAX_BLOCK_INDEX}")
        run_offsets = np.cumsum(lengths) - lengths
        indices = np.repeat(starts - run_offsets, lengths) + np.arange(count, dtype=np.int64)
    if len(np.unique(indices)) != count:
        raise RecordError(f"{owner}.blocks: runs overlap or an index repeats")
    return tuple(indices.tolist()), end


# ------------------------------------------------------------------------ records


class _Record:
    RECORD_TYPE: ClassVar[RecordType]

    def to_bytes(self) -> bytes:
        body = self._body()
        return _HEADER.pack(MAGIC, VERSION, self.RECORD_TYPE, len(body)) + body

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Record:
        record = decode(data)
        if not isinstance(record, cls):
            raise RecordError(f"expected a {cls.__name__} record, got {type(record).__name__}")
        return record

    def _body(self) -> bytes:  # pragma: no cover - every record overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Transfer(_Record):
    """Encoder -> language rank: round `round` carries tokens [sent_tokens,
    sent_tokens + round_tokens) of the request, as P2P messages of chunk_tokens tokens."""

    request_id: int
    round: int
    total_tokens: int
    sent_tokens: int
    round_tokens: int
    mrope_delta: int
    src_rank: int
    dst_rank: int
    chunk_tokens: int

    RECORD_TYPE: ClassVar[RecordType] = RecordType.TRANSFER
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<9q")

    def __post_init__(self) -> None:
        _int_field(self, "request_id", 0)
        _int_field(self, "round", 0)
        total = _int_field(self, "total_tokens", 0)
        sent = _int_field(self, "sent_tokens", 0)
        this_round = _int_field(self, "round_tokens", 0)
        _int_field(self, "mrope_delta", _INT64_MIN)
        _ranks(self)
        _int_field(self, "chunk_tokens", 1)
        _check_progress(self, sent, total, this_round)

    def _body(self) -> bytes:
        return self._FIXED.pack(
            self.request_id, self.round, self.total_tokens, self.sent_tokens, self.round_tokens,
            self.mrope_delta, self.src_rank, self.dst_rank, self.chunk_tokens,
        )

    @classmethod
    def _parse(cls, body: memoryview) -> Transfer:
        _expect_size(cls, body, cls._FIXED.size)
        return cls(*cls._FIXED.unpack_from(body))


@dataclass(frozen=True)
class Resume(_Record):
    """Language leader -> encoder: destination blocks for the next round (round 0 is the
    initial announce, sent_tokens 0)."""

    request_id: int
    round: int
    sent_tokens: int
    allocated_tokens: int
    blocks: tuple[int, ...]
    src_rank: int
    dst_rank: int

    RECORD_TYPE: ClassVar[RecordType] = RecordType.RESUME
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<6q")

    def __post_init__(self) -> None:
        _int_field(self, "request_id", 0)
        _int_field(self, "round", 0)
        _int_field(self, "sent_tokens", 0)
        allocated = _int_field(self, "allocated_tokens", 0)
        blocks = _blocks_field(self)
        _ranks(self)
        _check_allocation(self, blocks, allocated)

    def _body(self) -> bytes:
        fixed = self._FIXED.pack(
            self.request_id, self.round, self.sent_tokens, self.allocated_tokens,
            self.src_rank, self.dst_rank,
        )
        return fixed + _encode_blocks(self.blocks)

    @classmethod
    def _parse(cls, body: memoryview) -> Resume:
        if len(body) < cls._FIXED.size:
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        request_id, round_, sent, allocated, src, dst = cls._FIXED.unpack_from(body)
        blocks, end = _decode_blocks(cls.__name__, body, cls._FIXED.size)
        _expect_size(cls, body, end)
        return cls(request_id, round_, sent, allocated, blocks, src, dst)


@dataclass(frozen=True)
class Completion(_Record):
    request_id: int
    round: int
    sent_tokens: int
    total_tokens: int
    src_rank: int
    dst_rank: int

    RECORD_TYPE: ClassVar[RecordType] = RecordType.COMPLETION
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<6q")

    def __post_init__(self) -> None:
        _int_field(self, "request_id", 0)
        _int_field(self, "round", 0)
        sent = _int_field(self, "sent_tokens", 0)
        total = _int_field(self, "total_tokens", 0)
        _ranks(self)
        _check_progress(self, sent, total)

    def _body(self) -> bytes:
        return self._FIXED.pack(
            self.request_id, self.round, self.sent_tokens, self.total_tokens,
            self.src_rank, self.dst_rank,
        )

    @classmethod
    def _parse(cls, body: memoryview) -> Completion:
        _expect_size(cls, body, cls._FIXED.size)
        return cls(*cls._FIXED.unpack_from(body))


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
    def _parse(cls, body: memoryview) -> Abort:
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
class Heartbeat(_Record):
    src_rank: int
    pid: int
    timestamp_ns: int
    role: int

    RECORD_TYPE: ClassVar[RecordType] = RecordType.HEARTBEAT
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<4q")

    def __post_init__(self) -> None:
        _ranks(self, dst=False)
        _int_field(self, "pid", 1)
        _int_field(self, "timestamp_ns", 0)
        _int_field(self, "role", 0)

    def _body(self) -> bytes:
        return self._FIXED.pack(self.src_rank, self.pid, self.timestamp_ns, self.role)

    @classmethod
    def _parse(cls, body: memoryview) -> Heartbeat:
        _expect_size(cls, body, cls._FIXED.size)
        return cls(*cls._FIXED.unpack_from(body))


@dataclass(frozen=True)
class Decision(_Record):
    """The TP leader's decision that every rank applies to its own pool (SPEC R4, section 8).

    total_tokens 0 means "not known yet" (an ADMIT before the first transfer). For ADMIT
    and RESUME, allocated_tokens must be len(blocks) * block_size."""

    request_id: int
    round: int
    action: DecisionAction
    sent_tokens: int
    total_tokens: int
    allocated_tokens: int
    blocks: tuple[int, ...]
    src_rank: int
    mrope_delta: int

    RECORD_TYPE: ClassVar[RecordType] = RecordType.DECISION
    _FIXED: ClassVar[struct.Struct] = struct.Struct("<qqBqqqqq")

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
        if total:
            _check_progress(self, sent, total)
        if self.action in (DecisionAction.ADMIT, DecisionAction.RESUME):
            _check_allocation(self, blocks, allocated)

    def _body(self) -> bytes:
        fixed = self._FIXED.pack(
            self.request_id, self.round, self.action, self.sent_tokens, self.total_tokens,
            self.allocated_tokens, self.src_rank, self.mrope_delta,
        )
        return fixed + _encode_blocks(self.blocks)

    @classmethod
    def _parse(cls, body: memoryview) -> Decision:
        if len(body) < cls._FIXED.size:
            raise RecordError(f"{cls.__name__}: body of {len(body)} bytes is truncated")
        request_id, round_, action, sent, total, allocated, src, delta = cls._FIXED.unpack_from(body)
        blocks, end = _decode_blocks(cls.__name__, body, cls._FIXED.size)
        _expect_size(cls, body, end)
        return cls(request_id, round_, action, sent, total, allocated, blocks, src, delta)


Record = Transfer | Resume | Completion | Abort | Heartbeat | Decision

_BY_TYPE: dict[int, type[_Record]] = {
    cls.RECORD_TYPE: cls for cls in (Transfer, Resume, Completion, Abort, Heartbeat, Decision)
}


def _expect_size(cls: type, body: memoryview, size: int) -> None:
    if len(body) != size:
        raise RecordError(f"{cls.__name__}: body of {len(body)} bytes, expected {size}")


def max_record_bytes(max_blocks: int, max_block_index: int = MAX_BLOCK_INDEX) -> int:
    """Largest encoded record of any type whose block list holds at most `max_blocks`
    indices, none above `max_block_index`. Size a ring slot from this (plus the ring's
    slot header, see `ring.slot_bytes_for`)."""
    if not 0 <= max_blocks <= MAX_BLOCKS:
        raise ValueError(f"max_blocks={max_blocks}: expected an integer in [0, {MAX_BLOCKS}]")
    if not 0 <= max_block_index <= MAX_BLOCK_INDEX:
        raise ValueError(f"max_block_index={max_block_index}: expected [0, {MAX_BLOCK_INDEX}]")
    blocks = _BLOCKS_HEADER.size + _item_width(max_block_index) * max_blocks
    largest_body = max(
        Transfer._FIXED.size,
        Resume._FIXED.size + blocks,
        Completion._FIXED.size,
        Abort._FIXED.size + MAX_MESSAGE_BYTES,
        Heartbeat._FIXED.size,
        Decision._FIXED.size + blocks,
    )
    return _HEADER.size + largest_body


MAX_RECORD_BYTES = max_record_bytes(MAX_BLOCKS)


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


def decode(data: bytes | bytearray | memoryview) -> Record:
    """The record in `data`; RecordError if anything about it is malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"decode: expected bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if len(view) < _HEADER.size:
        raise RecordError(f"record of {len(view)} bytes is shorter than the {_HEADER.size}-byte header")
    if len(view) > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(view)} bytes, expected at most {MAX_RECORD_BYTES}")
    magic, version, record_type, body_length = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise RecordError(f"record magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise RecordError(f"record version {version}, expected {VERSION}")
    cls = _BY_TYPE.get(record_type)
    if cls is None:
        raise RecordError(f"record type {record_type}, expected one of {sorted(_BY_TYPE)}")
    if body_length != len(view) - _HEADER.size:
        raise RecordError(
            f"{cls.__name__}: header says {body_length} body bytes, got {len(view) - _HEADER.size}"
        )
    return cls._parse(view[_HEADER.size:])  # type: ignore[attr-defined]


__all__ = [
    "BROADCAST_RANK",
    "MAX_BLOCKS",
    "MAX_BLOCK_INDEX",
    "MAX_MESSAGE_BYTES",
    "MAX_RECORD_BYTES",
    "Abort",
    "AbortReason",
    "Completion",
    "Decision",
    "DecisionAction",
    "Heartbeat",
    "Record",
    "RecordError",
    "RecordType",
    "Resume",
    "Transfer",
    "VERSION",
    "clip_message",
    "decode",
    "encode",
    "max_record_bytes",
]
