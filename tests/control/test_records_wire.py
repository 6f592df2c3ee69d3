"""Control records: round trips of every type, compact block lists, malformed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embxfer.control import records as rec
from embxfer.control.records import (
    MAX_BLOCK_INDEX,
    MAX_MESSAGE_BYTES,
    Abort,
    AbortReason,
    Completion,
    Decision,
    DecisionAction,
    Heartbeat,
    RecordError,
    Resume,
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
def transfers(draw):
    total = draw(st.integers(0, 1 << 40))
    sent = draw(st.integers(0, total))
    return Transfer(
        draw(NONNEG), draw(NONNEG), total, sent, draw(st.integers(0, total - sent)), draw(INT64),
        draw(RANK), draw(DST), draw(st.integers(1, 1 << 30)),
    )


@st.composite
def resumes(draw):
    blocks = draw(block_lists())
    block_size = draw(st.integers(1, 4096))
    return Resume(draw(NONNEG), draw(NONNEG), draw(NONNEG), len(blocks) * block_size, blocks, draw(RANK), draw(DST))


@st.composite
def completions(draw):
    total = draw(NONNEG)
    return Completion(draw(NONNEG), draw(NONNEG), draw(st.integers(0, total)), total, draw(RANK), draw(DST))


@st.composite
def aborts(draw):
    message = rec.clip_message(draw(st.text(max_size=600)))
    return Abort(draw(NONNEG), draw(st.sampled_from(AbortReason)), message, draw(RANK), draw(DST))


@st.composite
def heartbeats(draw):
    return Heartbeat(draw(RANK), draw(st.integers(1, 1 << 22)), draw(NONNEG), draw(st.integers(0, 16)))


@st.composite
def decisions(draw):
    blocks = draw(block_lists())
    total = draw(NONNEG)
    return Decision(
        draw(NONNEG), draw(NONNEG), draw(st.sampled_from(DecisionAction)), draw(st.integers(0, total)), total,
        len(blocks) * draw(st.integers(1, 4096)), blocks, draw(RANK), draw(INT64),
    )


ANY_RECORD = st.one_of(transfers(), resumes(), completions(), aborts(), heartbeats(), decisions())


@settings(max_examples=400, deadline=None)
@given(ANY_RECORD)
def test_every_record_type_round_trips(record):
    data = encode(record)
    assert decode(data) == record
    assert type(record).from_bytes(data) == record
    assert record.to_bytes() == data
    assert decode(bytearray(data)) == record and decode(memoryview(data)) == record
    blocks = getattr(record, "blocks", ())
    assert len(data) <= max_record_bytes(len(blocks))


@settings(max_examples=300, deadline=None)
@given(ANY_RECORD, st.data())
def test_any_corruption_raises_record_error_or_decodes_to_a_valid_record(record, data):
    raw = bytearray(encode(record))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([None, len(raw) - 1, len(raw) + 3]))
    if cut is not None:
        raw = raw[:cut] if cut < len(raw) else raw + b"\0" * (cut - len(raw))
    try:
        decoded = decode(bytes(raw))
    except RecordError:
        return
    assert decode(encode(decoded)) == decoded  # whatever decodes is a valid record


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(raw):
    try:
        decode(raw)
    except RecordError:
        pass


def test_fragmented_thousand_block_decision_fits_a_4096_byte_slot():
    blocks = tuple(range(0, 2000, 2))  # 1000 blocks, no two consecutive
    decision = Decision(1, 3, DecisionAction.RESUME, 8192, 100_000, 128_000, blocks, 0, 0)
    assert len(encode(decision)) <= max_record_bytes(1000) == 3075
    assert max_record_bytes(1000) + 16 <= 4096
    assert max_record_bytes(1000, max_block_index=65535) == 2075
    far = tuple(range(MAX_BLOCK_INDEX - 1999, MAX_BLOCK_INDEX + 1, 2))
    assert len(encode(Resume(1, 1, 0, 1000 * 128, far, 0, 1))) <= max_record_bytes(1000)


def test_runs_make_contiguous_lists_small():
    resume = Resume(7, 1, 8192, 782 * 128, tuple(range(5000, 5782)), 2, 5)
    assert len(encode(resume)) < 80
    assert decode(encode(resume)).blocks == tuple(range(5000, 5782))


def _with_blocks_section(section: bytes) -> bytes:
    body = struct.pack("<6q", 1, 1, 0, 3 * 128, 0, 1) + section
    return struct.pack("<2sBBI", b"EX", 1, rec.RecordType.RESUME, len(body)) + body


@pytest.mark.parametrize(
    "section, message",
    [
        (struct.pack("<IIBB", 3, 4, 2, 1) + bytes([1, 1, 2, 0]), "overlap"),  # runs [1,2] and [2]
        (struct.pack("<IIBB", 3, 3, 1, 1) + bytes([4, 5, 4]), "repeat"),
        (struct.pack("<IIBB", 3, 2, 2, 1) + bytes([1, 5]), "cover"),
        (struct.pack("<IIBB", 3, 3, 1, 4) + bytes(12), "width"),
        (struct.pack("<IIBB", 3, 3, 7, 1) + bytes(3), "form"),
        (struct.pack("<IIBB", 3, 3, 1, 1) + bytes([1, 2]), "overrun"),
        (struct.pack("<IIBB", 3, 0, 0, 1), "empty form"),
        (struct.pack("<IIBB", 1 << 21, 1 << 21, 1, 1), "at most"),
        (struct.pack("<IIBB", 3, 2, 2, 3) + (0xFFFFFF).to_bytes(3, "little") + (2).to_bytes(3, "little"), "past"),
        (struct.pack("<IIB", 3, 3, 1), "truncated"),
    ],
)
def test_malformed_block_lists_are_rejected(section, message):
    with pytest.raises(RecordError, match=message):
        decode(_with_blocks_section(section))


def test_malformed_headers_are_rejected():
    good = encode(Completion(1, 0, 5, 10, 0, 1))
    with pytest.raises(RecordError, match="magic"):
        decode(b"XX" + good[2:])
    with pytest.raises(RecordError, match="version"):
        decode(good[:2] + bytes([2]) + good[3:])
    with pytest.raises(RecordError, match="record type"):
        decode(good[:3] + bytes([99]) + good[4:])
    with pytest.raises(RecordError, match="body bytes"):
        decode(good + b"\0")  # trailing byte
    with pytest.raises(RecordError, match="body bytes"):
        decode(good[:-1])
    with pytest.raises(RecordError, match="header"):
        decode(good[:5])
    with pytest.raises(RecordError, match="at most"):
        decode(good[:4] + struct.pack("<I", 1 << 23) + bytes(1 << 23))
    with pytest.raises(RecordError, match="expected bytes"):
        decode("not bytes")  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="Transfer"):
        Transfer.from_bytes(good)


def test_field_values_are_validated_on_construction_and_decoding():
    with pytest.raises(RecordError, match="request_id=-1"):
        Completion(-1, 0, 0, 0, 0, 1)
    with pytest.raises(RecordError, match="sent_tokens \\+ round_tokens"):
        Transfer(1, 0, 100, 90, 20, 0, 0, 1, 16)
    with pytest.raises(RecordError, match="chunk_tokens=0"):
        Transfer(1, 0, 100, 0, 20, 0, 0, 1, 0)
    with pytest.raises(RecordError, match="dst_rank=-2"):
        Completion(1, 0, 0, 0, 0, -2)
    with pytest.raises(RecordError, match="allocated_tokens=1000"):
        Resume(1, 1, 0, 1000, (1, 2, 3), 0, 1)  # 1000 is not len(blocks) * block_size
    with pytest.raises(RecordError, match="repeats"):
        Resume(1, 1, 0, 384, (1, 2, 1), 0, 1)
    with pytest.raises(RecordError, match="outside"):
        Resume(1, 1, 0, 128, (MAX_BLOCK_INDEX + 1,), 0, 1)
    with pytest.raises(RecordError, match="integer"):
        Resume(1, 1, 0, 128, (1.5,), 0, 1)
    with pytest.raises(RecordError, match="reason"):
        Abort(1, 9, "x", 0, 1)
    with pytest.raises(RecordError, match="at most 512"):
        Abort(1, AbortReason.USER, "é" * 300, 0, 1)
    with pytest.raises(RecordError, match="action"):
        Decision(1, 0, 0, 0, 0, 0, (), 0, 0)
    with pytest.raises(RecordError, match="pid=0"):
        Heartbeat(0, 0, 1, 0)
    with pytest.raises(RecordError, match="request_id"):
        Completion(1 << 63, 0, 0, 0, 0, 1)
    with pytest.raises(RecordError, match="integer"):
        Completion(True, 0, 0, 0, 0, 1)
    # decoding validates the same way: a negative request id on the wire is refused
    raw = bytearray(encode(Completion(1, 0, 0, 0, 0, 1)))
    raw[8:16] = struct.pack("<q", -5)
    with pytest.raises(RecordError, match="request_id=-5"):
        decode(bytes(raw))


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

    resume = Resume(1, 1, 0, 3 * 128, [9, 3, 4], 0, 1)
    assert resume.blocks == (9, 3, 4)
    assert Resume(1, 1, 0, 3 * 128, np.array([9, 3, 4]), 0, 1) == resume
    assert decode(encode(resume)).blocks == (9, 3, 4)  # order kept (token order)
