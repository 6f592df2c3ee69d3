"""Control records: round trips of every type, compact block lists, malformed input, one
canonical encoding, and decoding bounded by what the receiver can use."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embxfer.control import records as rec
from embxfer.control.records import (
    MAX_BLOCK_INDEX,
    MAX_MESSAGE_BYTES,
    UNBOUNDED,
    Abort,
    AbortReason,
    Announce,
    Completion,
    Decision,
    DecisionAction,
    Limits,
    RecordError,
    Resume,
    Segment,
    Transfer,
    decode,
    encode,
    max_record_bytes,
)

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
NONNEG = st.integers(0, (1 << 63) - 1)
RANK = st.integers(0, 1 << 20)
DST = st.integers(-1, 1 << 20)


@st.composite
def block_lists(draw, max_size: int = 300):
    """Fragmented, run-heavy and mixed lists, small and large indices, any order."""
    shape = draw(st.sampled_from(["random", "runs", "empty"]))
    if shape == "empty":
        return ()
    high = draw(st.sampled_from([255, 65535, MAX_BLOCK_INDEX]))
    if shape == "random":
        return tuple(draw(st.lists(st.integers(0, high), max_size=max_size, unique=True)))
    blocks: list[int] = []
    used: set[int] = set()
    for _ in range(draw(st.integers(1, 8))):
        start = draw(st.integers(0, high))
        length = draw(st.integers(1, 64))
        run = [b for b in range(start, min(start + length, high + 1)) if b not in used]
        used.update(run)
        blocks += run
    return tuple(blocks)


@st.composite
def segments(draw):
    total = draw(st.integers(1, (1 << 32) - 1))
    start = draw(st.integers(0, total - 1))
    count = draw(st.integers(1, min(total - start, (1 << 32) - 1)))
    return Segment(draw(NONNEG), draw(st.integers(0, (1 << 32) - 1)), start, count, total, draw(INT64))


@st.composite
def transfers(draw):
    return Transfer(draw(RANK), draw(DST), draw(NONNEG), draw(st.integers(1, 1 << 40)),
                    tuple(draw(st.lists(segments(), min_size=1, max_size=20))))


@st.composite
def resumes(draw):
    return Resume(draw(NONNEG), draw(NONNEG), draw(NONNEG), draw(st.integers(1, 1 << 40)), draw(RANK), draw(DST))


@st.composite
def completions(draw):
    total = draw(NONNEG)
    return Completion(draw(NONNEG), draw(NONNEG), draw(st.integers(0, total)), total, draw(RANK), draw(DST),
                      draw(st.integers(0, 1)))


@st.composite
def aborts(draw):
    message = rec.clip_message(draw(st.text(max_size=600)))
    return Abort(draw(NONNEG), draw(st.sampled_from(AbortReason)), message, draw(RANK), draw(DST))


@st.composite
def announces(draw):
    return Announce(draw(NONNEG), draw(st.integers(1, 1 << 40)), draw(RANK), draw(DST))


@st.composite
def decisions(draw):
    blocks = draw(block_lists())
    total = draw(NONNEG)
    return Decision(
        draw(NONNEG), draw(NONNEG), draw(st.sampled_from(DecisionAction)), draw(st.integers(0, total)), total,
        len(blocks) * draw(st.integers(1, 4096)), blocks, draw(RANK), draw(INT64),
        draw(st.binary(max_size=32)),
    )


ANY_RECORD = st.one_of(transfers(), resumes(), completions(), aborts(), announces(), decisions())


@settings(max_examples=400, deadline=None)
@given(ANY_RECORD)
def test_every_record_type_round_trips(record):
    data = encode(record)  # block indices up to MAX_BLOCK_INDEX: decoded with the wire's maxima
    assert decode(data, UNBOUNDED) == record
    assert type(record).from_bytes(data, UNBOUNDED) == record
    assert record.to_bytes() == data
    assert decode(bytearray(data), UNBOUNDED) == record and decode(memoryview(data), UNBOUNDED) == record
    assert len(data) <= max_record_bytes(UNBOUNDED) == rec.MAX_RECORD_BYTES
    assert rec.decode_frame(data + data, UNBOUNDED) == ([record, record], None)


@settings(max_examples=300, deadline=None)
@given(ANY_RECORD, st.data())
def test_any_corruption_raises_record_error_or_decodes_to_a_valid_record(record, data):
    raw = bytearray(encode(record))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([None, len(raw) - 1, len(raw) + 3]))
    if cut is not None:
        raw = raw[:cut] if cut < len(raw) else raw + b"\0" * (cut - len(raw))
    for limits in (UNBOUNDED, rec.DEFAULT_LIMITS):
        try:
            decoded = decode(bytes(raw), limits)
        except RecordError:
            continue
        assert encode(decoded) == bytes(raw)  # whatever decodes is valid, in its one canonical encoding


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(raw):
    for limits in (UNBOUNDED, rec.DEFAULT_LIMITS):
        try:
            record = decode(raw, limits)
        except RecordError:
            continue
        assert encode(record) == raw


def test_the_default_pool_fits_a_4096_byte_slot():
    """The default 1024-block pool: even an allocation of all of it with no two blocks
    consecutive fits one 4096-byte ring slot."""
    blocks = tuple(range(0, 1024, 2)) + tuple(range(1023, 0, -2))
    decision = Decision(1, 3, DecisionAction.RESUME, 8192, 100_000, 1024 * 128, blocks, 0, 0, b"h" * 32)
    limits = Limits.for_pool(1024, 64)
    assert len(encode(decision)) <= max_record_bytes(limits)
    assert max_record_bytes(limits) + 16 <= 4096


def test_a_fully_fragmented_pool_fits_its_derived_slot():
    """Block size 1, every other block: the largest allocation a pool of n blocks can make
    still fits a ring slot sized from that pool (SPEC: impossible by construction)."""
    from embxfer.control.ring import slot_bytes_for

    for pool_blocks in (256, 4096, 70_000):
        limits = Limits.for_pool(pool_blocks, 64)
        worst = tuple(range(pool_blocks - 1, -1, -2)) + tuple(range(0, pool_blocks, 2))  # no runs at all
        decision = Decision(1, 3, DecisionAction.RESUME, 0, 0, len(worst), worst, 0, 0, b"h" * 32)
        data = encode(decision)
        assert len(data) <= max_record_bytes(limits) <= slot_bytes_for(max_record_bytes(limits)) - 16
        assert decode(data, limits) == decision


def test_runs_make_contiguous_lists_small():
    decision = Decision(7, 1, DecisionAction.RESUME, 8192, 0, 782 * 128, tuple(range(5000, 5782)), 2, 5)
    assert len(encode(decision)) < 100
    assert decode(encode(decision), Limits.for_pool(6000)).blocks == tuple(range(5000, 5782))


def _with_blocks_section(section: bytes) -> bytes:
    body = struct.pack("<qqBqqqqqB", 1, 1, DecisionAction.ADMIT, 0, 0, 3 * 128, 0, 1, 0) + section
    return struct.pack("<2sBBI", b"EX", rec.VERSION, rec.RecordType.DECISION, len(body)) + body


@pytest.mark.parametrize(
    "section, message",
    [
        (struct.pack("<IIBB", 3, 4, 2, 1) + bytes([1, 0, 2, 0]), "runs form"),  # as long as plain
        (struct.pack("<IIBB", 5, 4, 2, 1) + bytes([1, 2, 3, 1]), "overlap"),  # runs [1..3] and [3, 4]
        (struct.pack("<IIBB", 3, 3, 1, 1) + bytes([4, 5, 4]), "repeat"),
        (struct.pack("<IIBB", 9, 2, 2, 1) + bytes([1, 5]), "cover"),
        (struct.pack("<IIBB", 3, 3, 1, 4) + bytes(12), "width"),
        (struct.pack("<IIBB", 3, 3, 7, 1) + bytes(3), "form"),
        (struct.pack("<IIBB", 3, 3, 1, 1) + bytes([1, 2]), "overrun"),
        (struct.pack("<IIBB", 3, 0, 0, 1), "empty form"),
        (struct.pack("<IIBB", 1 << 21, 1 << 21, 1, 1), "at most"),
        (struct.pack("<IIB", 3, 3, 1), "truncated"),
        (struct.pack("<IIBB", 3, 3, 1, 2) + struct.pack("<3H", 4, 9, 1), "canonical"),  # wider than needed
        (struct.pack("<IIBB", 3, 3, 1, 1) + bytes([4, 5, 6]), "canonical"),  # runs would be shorter
        (struct.pack("<IIBB", 9, 4, 2, 1) + bytes([1, 3, 5, 4]), "canonical"),  # runs [1..4], [5..9] merge
    ],
)
def test_malformed_block_lists_are_rejected(section, message):
    with pytest.raises(RecordError, match=message):
        decode(_with_blocks_section(section))


def test_block_lists_are_bounded_by_the_receivers_pool_before_expansion():
    """A 76-byte DECISION claiming one run of 1,048,576 blocks is refused from its header,
    in well under a millisecond, by a receiver whose pool has 1024 blocks."""
    import time

    section = struct.pack("<IIBB", 1 << 20, 2, 2, 1) + bytes([0, 255])
    data = _with_blocks_section(section)
    assert len(data) < 80
    limits = Limits.for_pool(1024, 64)
    started = time.perf_counter()
    with pytest.raises(RecordError, match="at most 1024 blocks"):
        decode(data, limits)
    assert time.perf_counter() - started < 0.01
    inside = Decision(1, 0, DecisionAction.ADMIT, 0, 0, 128, (1024,), 0, 0)
    with pytest.raises(RecordError, match="pool has 1024 blocks"):
        decode(encode(inside), limits)
    many = Transfer(0, -1, 0, 1, tuple(Segment(i, 0, 0, 1, 1, 0) for i in range(65)))
    with pytest.raises(RecordError, match="65 segments"):
        decode(encode(many), limits)


def test_decoding_is_bounded_by_default():
    """A caller that passes no limits gets a default-configured pool's (1024 blocks, 64
    segments), never the wire's maxima: the 76-byte million-block record is refused from
    its header; the wire's maxima are asked for by name."""
    assert rec.DEFAULT_LIMITS == Limits() == Limits.for_pool(rec.DEFAULT_POOL_BLOCKS, rec.DEFAULT_MAX_SEGMENTS)
    assert (UNBOUNDED.max_blocks, UNBOUNDED.max_segments, UNBOUNDED.max_block_index) == (
        rec.MAX_BLOCKS, rec.MAX_SEGMENTS, MAX_BLOCK_INDEX)
    huge = _with_blocks_section(struct.pack("<IIBB", 1 << 20, 2, 2, 1) + bytes([0, 255]))
    for call in (lambda: decode(huge), lambda: Decision.from_bytes(huge)):
        with pytest.raises(RecordError, match="at most 1024 blocks"):
            call()
    assert "at most 1024 blocks" in rec.decode_frame(huge)[1]
    far = encode(Decision(1, 0, DecisionAction.ADMIT, 0, 0, 128, (5000,), 0, 0))
    with pytest.raises(RecordError, match="pool has 1024 blocks"):
        decode(far)
    assert decode(far, UNBOUNDED).blocks == (5000,)
    many = encode(Transfer(0, -1, 0, 1, tuple(Segment(i, 0, 0, 1, 1, 0) for i in range(65))))
    with pytest.raises(RecordError, match="65 segments"):
        decode(many)
    assert len(decode(many, UNBOUNDED).segments) == 65
    assert max_record_bytes() == max_record_bytes(rec.DEFAULT_LIMITS) < rec.MAX_RECORD_BYTES


@pytest.mark.parametrize("field, value", [("max_blocks", rec.MAX_BLOCKS + 1), ("max_segments", 0),
                                          ("max_block_index", MAX_BLOCK_INDEX + 1), ("max_blocks", True),
                                          ("max_segments", 2.0)])
def test_bad_limits_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"Limits.{field}="):
        Limits(**{field: value})


def test_malformed_headers_are_rejected():
    good = encode(Completion(1, 0, 5, 10, 0, 1))
    with pytest.raises(RecordError, match="magic"):
        decode(b"XX" + good[2:])
    with pytest.raises(RecordError, match="version"):
        decode(good[:2] + bytes([1]) + good[3:])
    with pytest.raises(RecordError, match="record type"):
        decode(good[:3] + bytes([99]) + good[4:])
    with pytest.raises(RecordError, match="after the record"):
        decode(good + b"\0")  # trailing byte
    with pytest.raises(RecordError, match="body bytes"):
        decode(good[:-1])
    with pytest.raises(RecordError, match="header"):
        decode(good[:5])
    with pytest.raises(RecordError, match="at most"):
        decode(good[:4] + struct.pack("<I", 1 << 23) + bytes(1 << 23))
    with pytest.raises(RecordError, match="expected bytes"):
        decode("not bytes")  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="contiguous"):
        decode(memoryview(good)[::2])
    released = memoryview(bytearray(good))
    released.release()
    with pytest.raises(RecordError, match="unusable"):
        decode(released)
    import array

    assert decode(memoryview(array.array("B", good))) == decode(good)
    with pytest.raises(RecordError, match="Transfer"):
        Transfer.from_bytes(good)


def test_field_values_are_validated_on_construction_and_decoding():
    with pytest.raises(RecordError, match="request_id=-1"):
        Completion(-1, 0, 0, 0, 0, 1)
    with pytest.raises(RecordError, match="past total_tokens"):
        Transfer(0, -1, 0, 64, (Segment(1, 0, 90, 20, 100, 0),))
    with pytest.raises(RecordError, match="count=0"):
        Transfer(0, -1, 0, 64, (Segment(1, 0, 0, 0, 100, 0),))
    with pytest.raises(RecordError, match="segments"):
        Transfer(0, -1, 0, 64, ())
    with pytest.raises(RecordError, match="dst_rank=-2"):
        Completion(1, 0, 0, 0, 0, -2)
    with pytest.raises(RecordError, match="allocated_tokens=0"):
        Resume(1, 1, 0, 0, 0, 1)
    with pytest.raises(RecordError, match="allocated_tokens=1000"):
        Decision(1, 1, DecisionAction.RESUME, 0, 0, 1000, (1, 2, 3), 0, 0)  # not len(blocks) * block_size
    with pytest.raises(RecordError, match="repeats"):
        Decision(1, 1, DecisionAction.RESUME, 0, 0, 384, (1, 2, 1), 0, 0)
    with pytest.raises(RecordError, match="outside"):
        Decision(1, 1, DecisionAction.RESUME, 0, 0, 128, (MAX_BLOCK_INDEX + 1,), 0, 0)
    with pytest.raises(RecordError, match="integer"):
        Decision(1, 1, DecisionAction.RESUME, 0, 0, 128, (1.5,), 0, 0)
    with pytest.raises(RecordError, match="content_hash"):
        Decision(1, 1, DecisionAction.CACHED, 0, 0, 0, (), 0, 0, b"x" * 33)
    with pytest.raises(RecordError, match="reason"):
        Abort(1, 9, "x", 0, 1)
    with pytest.raises(RecordError, match="at most 512"):
        Abort(1, AbortReason.USER, "é" * 300, 0, 1)
    with pytest.raises(RecordError, match="action"):
        Decision(1, 0, 0, 0, 0, 0, (), 0, 0)
    with pytest.raises(RecordError, match="total_tokens=0"):
        Announce(1, 0, 0, 1)
    with pytest.raises(RecordError, match="flags=2"):
        Completion(1, 0, 0, 0, 0, 1, 2)
    with pytest.raises(RecordError, match="request_id"):
        Completion(1 << 63, 0, 0, 0, 0, 1)
    with pytest.raises(RecordError, match="integer"):
        Completion(True, 0, 0, 0, 0, 1)
    # decoding validates the same way: a negative request id on the wire is refused
    raw = bytearray(encode(Completion(1, 0, 0, 0, 0, 1)))
    raw[8:16] = struct.pack("<q", -5)
    with pytest.raises(RecordError, match="request_id=-5"):
        decode(bytes(raw))
    raw = bytearray(encode(Transfer(0, -1, 0, 64, (Segment(1, 0, 0, 5, 10, 0),))))
    raw[8 + 34 : 8 + 42] = struct.pack("<q", -3)
    with pytest.raises(RecordError, match="request_id=-3"):
        decode(bytes(raw))


def test_a_frame_stops_at_the_first_malformed_record():
    good = encode(Completion(1, 0, 5, 10, 0, 1))
    records, error = rec.decode_frame(good + b"EX\x09" + good[3:] + good)
    assert records == [decode(good)] and "version" in error
    assert rec.decode_frame(b"") == ([], None)


def test_abort_messages_are_capped_and_utf8_checked():
    assert len(rec.clip_message("é" * 400).encode()) <= MAX_MESSAGE_BYTES
    record = Abort(4, AbortReason.PEER_DEAD, rec.clip_message("x" * 1000), 1, -1)
    assert decode(encode(record)).message == "x" * MAX_MESSAGE_BYTES
    raw = bytearray(encode(Abort(4, AbortReason.USER, "ab", 1, -1)))
    raw[-2:] = b"\xff\xfe"
    with pytest.raises(RecordError, match="UTF-8"):
        decode(bytes(raw))
    raw = bytearray(encode(Abort(4, AbortReason.USER, "", 1, -1))) + bytes(MAX_MESSAGE_BYTES + 1)
    raw[-(MAX_MESSAGE_BYTES + 3) : -(MAX_MESSAGE_BYTES + 1)] = struct.pack("<H", MAX_MESSAGE_BYTES + 1)
    raw[4:8] = struct.pack("<I", len(raw) - 8)
    with pytest.raises(RecordError, match="length 513, expected at most"):
        decode(bytes(raw))


def test_block_lists_accept_any_integer_sequence_and_store_a_tuple():
    import numpy as np

    decision = Decision(1, 1, DecisionAction.RESUME, 0, 0, 3 * 128, [9, 3, 4], 0, 1)
    assert decision.blocks == (9, 3, 4)
    assert Decision(1, 1, DecisionAction.RESUME, 0, 0, 3 * 128, np.array([9, 3, 4]), 0, 1) == decision
    assert decode(encode(decision)).blocks == (9, 3, 4)  # order kept (token order)
