"""Control records: round trips of every type (the batch records ALLOCATIONS, COMPLETIONS
and DECISIONS with many entries each), one canonical encoding, malformed and corrupted
input, decoding bounded by what the receiver can use before anything is expanded, and
the slot sizes derived from the largest record."""

from __future__ import annotations

import dataclasses
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embxfer.control import records as rec
from embxfer.control.records import (
    DEFAULT_LIMITS,
    MAX_BLOCK_INDEX,
    MAX_HASH_BYTES,
    MAX_MESSAGE_BYTES,
    UNBOUNDED,
    Abort,
    AbortReason,
    Allocation,
    Allocations,
    Announce,
    Announcements,
    Completion,
    Completions,
    DecisionAction,
    Decisions,
    HeldItems,
    Limits,
    Member,
    MemberState,
    RecordError,
    RecordType,
    Segment,
    Transfer,
    decode,
    decode_frame,
    encode,
    max_record_bytes,
)
from embxfer.control.ring import SLOT_HEADER_BYTES, slot_bytes_for

U32_MAX = (1 << 32) - 1
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
NONNEG = st.integers(0, (1 << 63) - 1)
U32 = st.integers(0, U32_MAX)
RANK = st.integers(0, 1 << 20)
DST = st.integers(-1, 1 << 20)
ADMIT, RESUME = DecisionAction.ADMIT, DecisionAction.RESUME
POOL_1024 = Limits.for_pool(1024, 64)


def blocks(values) -> np.ndarray:
    return np.array(list(values), dtype=np.int64)


def scattered(pool_blocks: int) -> np.ndarray:
    """Every block of a pool with no two consecutive in token order: no run is longer than
    one block, so the plain form is the shorter one and takes one item per block."""
    return blocks([*range(pool_blocks - 1, 0, -2), *range(0, pool_blocks, 2)])


# ----------------------------------------------------------------------- strategies


@st.composite
def block_lists(draw, max_size: int = 200) -> np.ndarray:
    """Contiguous, scattered (no two neighbours consecutive), mixed (runs and singletons
    in any order) or empty; indices small, middling or up to the 24-bit maximum."""
    shape = draw(st.sampled_from(["empty", "contiguous", "scattered", "mixed"]))
    high = draw(st.sampled_from([255, 65535, MAX_BLOCK_INDEX]))
    if shape == "empty":
        return blocks(())
    if shape == "contiguous":
        length = draw(st.integers(1, max_size))
        start = draw(st.integers(0, high + 1 - length))
        return blocks(range(start, start + length))
    if shape == "scattered":
        halves = draw(st.lists(st.integers(0, high // 2), min_size=1, max_size=max_size, unique=True))
        return blocks(2 * half for half in halves)
    pieces, used = [], set()
    for _ in range(draw(st.integers(1, 10))):
        start = draw(st.integers(0, high))
        length = draw(st.sampled_from([1, 1, 2, 3, 5, 17, 40]))
        piece = [b for b in range(start, min(start + length, high + 1)) if b not in used]
        used.update(piece)
        pieces.append(piece)
    return blocks(b for piece in draw(st.permutations(pieces)) for b in piece)


HASHES = st.one_of(
    st.binary(max_size=MAX_HASH_BYTES),
    # hashes that end in zero bytes: the length, not the padding, says where they end
    st.binary(max_size=MAX_HASH_BYTES - 1).flatmap(
        lambda h: st.integers(1, MAX_HASH_BYTES - len(h)).map(lambda zeros: h + bytes(zeros))),
)


@st.composite
def allocation_entries(draw) -> tuple[int, int, int, int]:
    return draw(NONNEG), draw(U32), draw(U32), draw(st.integers(1, U32_MAX))


@st.composite
def completion_entries(draw) -> tuple[int, int, int, int, int]:
    total = draw(U32)
    return draw(NONNEG), draw(U32), draw(st.integers(0, total)), total, draw(st.sampled_from([0, 1]))


@st.composite
def decision_entries(draw, blocks=None) -> tuple:
    block_list = draw(blocks if blocks is not None else block_lists())
    action = draw(st.sampled_from(DecisionAction))
    total = draw(st.one_of(st.just(0), U32))  # 0: not known yet, sent_tokens unbounded
    sent = draw(st.integers(0, total or U32_MAX))
    if action in (ADMIT, RESUME):  # len(blocks) * block_size
        allocated = len(block_list) * draw(st.integers(1, U32_MAX // max(len(block_list), 1)))
    else:
        allocated = draw(U32)
    return draw(NONNEG), draw(U32), action, sent, total, allocated, draw(INT64), draw(HASHES), block_list


def allocations_records():
    return st.builds(Allocations.of, RANK, DST, st.lists(allocation_entries(), min_size=1, max_size=8))


def completions_records():
    return st.builds(Completions.of, RANK, DST, st.lists(completion_entries(), min_size=1, max_size=8))


def announcement_entries():
    return st.tuples(NONNEG, st.integers(1, U32_MAX))


def announcements_records():
    return st.builds(Announcements.of, RANK, DST, st.lists(announcement_entries(), min_size=1, max_size=8))


def decisions_records():
    return st.builds(lambda src, items, dst: Decisions.of(src, items, dst),
                     RANK, st.lists(decision_entries(), min_size=1, max_size=24), DST)


@st.composite
def segments(draw) -> Segment:
    total = draw(st.integers(1, U32_MAX))
    start = draw(st.integers(0, total - 1))
    count = draw(st.integers(1, total - start))
    return Segment(draw(NONNEG), draw(U32), start, count, total, draw(INT64))


def transfers():
    return st.builds(Transfer, RANK, DST, NONNEG, st.integers(1, 1 << 40),
                     st.lists(segments(), min_size=1, max_size=20).map(tuple))


def aborts():
    return st.builds(Abort, NONNEG, st.sampled_from(AbortReason), st.text(max_size=600).map(rec.clip_message),
                     RANK, DST)


def announces():
    return st.builds(Announce, NONNEG, st.integers(1, 1 << 40), RANK, DST)


def members():
    return st.builds(Member, RANK, st.sampled_from(MemberState))


BATCH_RECORD = st.one_of(allocations_records(), completions_records(), decisions_records(), announcements_records())
ANY_RECORD = st.one_of(BATCH_RECORD, transfers(), aborts(), announces(), members())


def rebuilt(record: rec.Record) -> rec.Record:
    """`record` through its checked constructor (every field validated): what decode
    returns must pass it, whichever shortcut decode took."""
    return dataclasses.replace(record)


# ------------------------------------------------------------ the documented layout
#
# DECISIONS records written by hand from the module docstring's layout, independently of
# the implementation's dtype: the malformed ones below cannot be built any other way.

_DECISIONS_FIXED = struct.Struct("<qqII")
_DECISION_ENTRY = struct.Struct("<qIBIIIqBIB32s")
_PLAIN, _RUNS = 1, 2


def entry(form: int, items: int, allocated: int, *, action: int = ADMIT, request_id: int = 9, sent: int = 0,
          total: int = 0, hash_length: int = 0, content_hash: bytes = b"") -> bytes:
    return _DECISION_ENTRY.pack(request_id, 0, action, sent, total, allocated, 0, form, items, hash_length,
                                content_hash)


def raw_decisions(entries: list[bytes], items: list[int], *, item_count: int | None = None, src: int = 1,
                  dst: int = -1) -> bytes:
    body = _DECISIONS_FIXED.pack(src, dst, len(entries), len(items) if item_count is None else item_count)
    body += b"".join(entries) + b"".join(value.to_bytes(3, "little") for value in items)
    return struct.pack("<2sBBI", b"EX", rec.VERSION, RecordType.DECISIONS, len(body)) + body


def test_the_documented_layout_is_what_encode_writes():
    runs = blocks(range(40, 50))
    record = Decisions.of(1, [(9, 0, ADMIT, 0, 0, 10 * 128, 0, b"", runs),
                              (9, 0, RESUME, 0, 0, 2 * 128, 0, b"ab\0", blocks([7, 3]))], -1)
    assert encode(record) == raw_decisions(
        [entry(_RUNS, 2, 10 * 128), entry(_PLAIN, 2, 2 * 128, action=RESUME, hash_length=3, content_hash=b"ab")],
        [40, 9, 7, 3])
    assert len(encode(record)) == Decisions.bytes_for(2, 4) == 8 + 24 + 71 * 2 + 3 * 4
    allocations = Allocations.of(1, 0, [(5, 1, 128, 256)] * 3)
    assert encode(allocations) == struct.pack("<2sBBIqqI", b"EX", rec.VERSION, RecordType.ALLOCATIONS,
                                              20 + 60, 1, 0, 3) + struct.pack("<qIII", 5, 1, 128, 256) * 3
    completions = Completions.of(1, 0, [(5, 1, 128, 256, 1)] * 2)
    assert len(encode(completions)) == 8 + 20 + 21 * 2


# -------------------------------------------------------------------- round trips


@settings(max_examples=250, deadline=None)
@given(ANY_RECORD)
def test_every_record_type_round_trips(record):
    data = encode(record)  # indices up to MAX_BLOCK_INDEX: decoded with the wire's maxima
    decoded = decode(data, UNBOUNDED)
    assert decoded == record and type(decoded) is type(record)
    assert encode(decoded) == data == record.to_bytes()
    assert type(record).from_bytes(data, UNBOUNDED) == record
    assert decode(bytearray(data), UNBOUNDED) == record and decode(memoryview(data), UNBOUNDED) == record
    assert rebuilt(decoded) == record  # what decode returns passes the checked constructor
    assert decode_frame(data + data, UNBOUNDED) == ([record, record], None)
    if not isinstance(record, (Allocations, Completions, Decisions, Announcements)) or len(record) == 1:
        assert len(data) <= max_record_bytes(UNBOUNDED) == rec.MAX_RECORD_BYTES


@settings(max_examples=150, deadline=None)
@given(RANK, DST, st.lists(allocation_entries(), min_size=1, max_size=8),
       st.lists(completion_entries(), min_size=1, max_size=8))
def test_batch_entries_read_back_as_written(src, dst, allocations, completions):
    record = decode(encode(Allocations.of(src, dst, allocations)))
    assert (record.src_rank, record.dst_rank, len(record)) == (src, dst, len(allocations))
    assert record.items() == [Allocation(*item, src) for item in allocations]
    assert len(encode(record)) == 8 + 20 + 20 * len(allocations)
    record = decode(encode(Completions.of(src, dst, completions)))
    assert record.items() == [Completion(*item, src) for item in completions]
    assert len(encode(record)) == 8 + 20 + 21 * len(completions)


def maximal_runs(block_list: np.ndarray) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for block in block_list.tolist():
        if runs and block == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs


@settings(max_examples=200, deadline=None)
@given(RANK, st.lists(decision_entries(), min_size=1, max_size=24))
def test_decisions_give_each_entrys_blocks_in_token_order_in_the_shorter_form(src, items):
    # (up to 24 entries: `of` builds a few row by row and more column by column)
    record = Decisions.of(src, items)
    data = encode(record)
    decoded = decode(data, UNBOUNDED)
    assert decoded.dst_rank == rec.BROADCAST_RANK
    area = 0
    for index, (item, decision) in enumerate(zip(items, decoded.decisions(), strict=True)):
        assert tuple(decision[:8]) == item[:8] and decision.src_rank == src
        assert type(decision.action) is DecisionAction and type(decision.content_hash) is bytes
        assert decision.blocks.dtype == np.int64 and decision.blocks.tolist() == item[8].tolist()
        runs = maximal_runs(item[8])
        # plain unless runs are strictly shorter; runs are maximal
        form = 0 if not len(item[8]) else _RUNS if 2 * len(runs) < len(item[8]) else _PLAIN
        assert decoded.entries["form"][index] == form
        assert decoded.entries["items"][index] == {0: 0, _PLAIN: len(item[8]), _RUNS: 2 * len(runs)}[form]
        area += int(decoded.entries["items"][index])
    assert len(data) == Decisions.bytes_for(len(items), area)
    assert [b.tolist() for b in decoded.blocks()] == [item[8].tolist() for item in items]


FEW_BLOCKS = st.lists(st.integers(0, 1 << 20), max_size=2, unique=True).map(lambda b: np.array(b, dtype=np.int64))


@settings(max_examples=100, deadline=None)
@given(RANK, st.lists(decision_entries(FEW_BLOCKS), min_size=1, max_size=40))
def test_decisions_of_a_steps_many_short_allocations_is_the_entry_by_entry_encoding(src, items):
    # a step's batch (each request a block or two) is built column by column: the same
    # bytes as the record made of its entries one at a time
    record = Decisions.of(src, items)
    singles = [Decisions.of(src, [item]) for item in items]
    assert record.entries.tobytes() == b"".join(r.entries.tobytes() for r in singles)
    assert record.items.tolist() == [b for r in singles for b in r.items.tolist()]
    assert decode(encode(record), UNBOUNDED) == record


def test_runs_make_contiguous_lists_small_and_keep_token_order():
    contiguous = Decisions.of(2, [(7, 1, RESUME, 8192, 0, 782 * 128, 5, b"", blocks(range(5000, 5782)))])
    assert len(encode(contiguous)) == Decisions.bytes_for(1, 2) < 110
    assert decode(encode(contiguous), Limits.for_pool(6000)).decisions()[0].blocks.tolist() == list(range(5000, 5782))
    mixed = blocks([9, *range(20, 30), 3, *range(100, 110), 4])  # a run is not moved to its neighbour
    decoded = decode(encode(Decisions.of(2, [(7, 1, RESUME, 0, 0, len(mixed), 5, b"", mixed)])))
    assert decoded.entries["form"][0] == _RUNS and decoded.decisions()[0].blocks.tolist() == mixed.tolist()
    for short, form in (([4, 5], _PLAIN), ([4, 5, 6], _RUNS), ([1, 2, 5, 6], _PLAIN), ([1, 2, 3, 6, 7, 8], _RUNS)):
        record = Decisions.of(2, [(7, 1, ADMIT, 0, 0, len(short), 0, b"", blocks(short))])
        assert record.entries["form"][0] == form  # the shorter form; plain when they tie
        assert decode(encode(record)).decisions()[0].blocks.tolist() == short


# ---------------------------------------------------------------------- corruption


def assert_refused_or_canonical(raw: bytes) -> bool:
    """Decoding `raw` raises RecordError or gives a valid record whose one encoding is
    `raw`; True if it decoded."""
    decoded = False
    for limits in (UNBOUNDED, DEFAULT_LIMITS):
        try:
            record = decode(raw, limits)
        except RecordError:
            continue
        assert encode(record) == raw
        assert encode(rebuilt(record)) == raw
        decoded = True
    return decoded


@settings(max_examples=300, deadline=None)
@given(ANY_RECORD, st.data())
def test_any_corruption_raises_record_error_or_decodes_to_a_valid_record(record, data):
    raw = bytearray(encode(record))
    if data.draw(st.booleans()):
        bit = data.draw(st.integers(0, 8 * len(raw) - 1))
        raw[bit // 8] ^= 1 << (bit % 8)
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([None, len(raw) - 1, len(raw) + 3]))
    if cut is not None:
        raw = raw[:cut] if cut < len(raw) else raw + bytes(cut - len(raw))
    assert_refused_or_canonical(bytes(raw))


def representative_batches() -> list[rec.Record]:
    return [
        Allocations.of(3, 0, [(1, 0, 0, 384), (2, 4, 1024, 128)]),
        Completions.of(3, 0, [(1, 0, 5, 10, 0), (2, 0, 0, 0, 1)]),
        Decisions.of(3, [(1, 0, ADMIT, 0, 0, 6 * 128, -2, b"", blocks([7, 8, 9, 10, 500, 501])),
                         (2, 1, RESUME, 256, 900, 3 * 16, 0, b"h\0\0", blocks([3, 1, 2])),
                         (4, 0, DecisionAction.CACHED, 0, 0, 0, 0, bytes(range(1, 33)), blocks(()))]),
    ]


@pytest.mark.parametrize("record", representative_batches(), ids=["allocations", "completions", "decisions"])
def test_every_single_bit_flip_is_refused_or_canonical(record):
    data = encode(record)
    assert decode(data) == record
    accepted = 0
    for bit in range(8 * len(data)):
        raw = bytearray(data)
        raw[bit // 8] ^= 1 << (bit % 8)
        accepted += assert_refused_or_canonical(bytes(raw))
    assert 0 < accepted < 8 * len(data)  # ids, rounds, counts still decode; framing, forms, areas do not


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    # a valid header and a random body: the bytes reach every type's parser
    st.builds(lambda kind, body: struct.pack("<2sBBI", b"EX", rec.VERSION, kind, len(body)) + body,
              st.sampled_from(RecordType), st.binary(max_size=300)),
))
def test_random_bytes_never_crash_the_decoder(raw):
    assert_refused_or_canonical(raw)


# ------------------------------------------------- canonical forms and malformed areas


@pytest.mark.parametrize(
    "entries, items, message",
    [
        ([entry(_RUNS, 2, 2 * 128)], [4, 1], "not canonical"),  # one run of 2 blocks: plain ties
        ([entry(_RUNS, 4, 2 * 128)], [1, 0, 5, 0], "not canonical"),  # two runs of one block
        ([entry(_RUNS, 4, 7 * 128)], [1, 2, 4, 3], "should be one"),  # [1..3], [4..7] not maximal
        ([entry(_PLAIN, 3, 3 * 128)], [4, 5, 6], "not canonical"),  # runs are shorter
        ([entry(_PLAIN, 6, 6 * 128)], [1, 2, 3, 9, 10, 11], "not canonical"),
        ([entry(_PLAIN, 3, 3 * 128, hash_length=2, content_hash=b"ab\x05")], [1, 5, 9], "not zero"),
        ([entry(0, 0, 0, hash_length=0, content_hash=b"\x01")], [], "not zero"),
        ([entry(0, 0, 0, hash_length=MAX_HASH_BYTES + 1)], [], "hash_length"),
        ([entry(0, 3, 3 * 128)], [1, 5, 9], "do not go together"),  # empty form with items
        ([entry(_PLAIN, 0, 0)], [], "do not go together"),  # plain form without items
        ([entry(3, 3, 3 * 128)], [1, 5, 9], "do not go together"),  # no form 3
        ([entry(_RUNS, 3, 5 * 128)], [1, 4, 9], "do not go together"),  # runs come in pairs
        ([entry(_PLAIN, 3, 3 * 128)], [4, 9, 4], "repeats"),
        ([entry(_RUNS, 4, 8 * 128)], [1, 2, 2, 4], "repeats"),  # [1..3] and [2..6] overlap
        ([entry(_PLAIN, 3, 1000)], [1, 5, 9], "allocated_tokens"),  # not len(blocks) * block_size
        ([entry(_PLAIN, 3, 0)], [1, 5, 9], "allocated_tokens"),
        ([entry(0, 0, 128)], [], "allocated_tokens"),  # tokens without blocks
        ([entry(_PLAIN, 3, 384, action=0)], [1, 5, 9], "action"),
        ([entry(_PLAIN, 3, 384, action=8)], [1, 5, 9], "action"),
        ([entry(_PLAIN, 3, 384, sent=11, total=10)], [1, 5, 9], "sent_tokens"),
        ([entry(_PLAIN, 3, 384, request_id=-1)], [1, 5, 9], "request_id"),
        ([entry(_PLAIN, 3, 384), entry(_PLAIN, 1, 128)], [1, 5, 9], "the entries name 4 items"),
        ([], [], "non-empty"),
    ],
)
def test_malformed_and_non_canonical_decisions_are_refused(entries, items, message):
    data = raw_decisions(entries, items)
    for limits in (DEFAULT_LIMITS, UNBOUNDED):
        with pytest.raises(RecordError, match=message):
            decode(data, limits)


def test_what_the_canonical_checks_accept_is_what_encode_writes():
    """The refusals above are not over-eager: the same blocks in their one encoding decode."""
    for form, items, block_list in ((_RUNS, [1, 6], range(1, 8)), (_PLAIN, [4, 5], [4, 5]),
                                    (_PLAIN, [1, 2, 5, 6], [1, 2, 5, 6]), (_RUNS, [1, 2, 9, 2], [1, 2, 3, 9, 10, 11])):
        data = raw_decisions([entry(form, len(items), 128 * len(block_list))], items)
        assert decode(data) == Decisions.of(1, [(9, 0, ADMIT, 0, 0, 128 * len(block_list), 0, b"",
                                                 blocks(block_list))])


@pytest.mark.parametrize("data, message", [
    (raw_decisions([entry(_PLAIN, 3, 384)], [1, 5, 9], item_count=4), "body of"),  # header says 4 items
    (raw_decisions([entry(_PLAIN, 3, 384)], [1, 5, 9])[:-1], "body bytes"),
    (raw_decisions([entry(_PLAIN, 3, 384)], [1, 5, 9], src=-1), "src_rank=-1"),
    (raw_decisions([entry(_PLAIN, 3, 384)], [1, 5, 9], dst=-2), "dst_rank=-2"),
])
def test_decisions_headers_that_disagree_with_the_body_are_refused(data, message):
    with pytest.raises(RecordError, match=message):
        decode(data)


# --------------------------------------------------------- bounded before expansion


def refused_with_peak(data: bytes, limits: Limits, message: str) -> int:
    """Decode `data` expecting a refusal that says `message`; the peak of what numpy and
    Python allocated meanwhile."""
    decode(encode(Completions.of(0, 1, [(1, 0, 0, 0, 0)])))  # imports and caches warm
    tracemalloc.start()
    try:
        with pytest.raises(RecordError, match=message):
            decode(data, limits)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_tiny_record_claiming_a_huge_run_is_refused_from_its_runs():
    """A ~100-byte DECISIONS record claiming one run of 2**24 blocks: a receiver with a
    1024-block pool refuses it from the run's length, quickly, without building anything
    near the size of the claim (the wire's maxima refuse it too: MAX_BLOCKS < 2**24)."""
    data = raw_decisions([entry(_RUNS, 2, 128)], [0, (1 << 24) - 1])
    assert len(data) < 110
    fastest = float("inf")
    for _ in range(5):  # the best of a few: the machine is shared
        started = time.perf_counter()
        with pytest.raises(RecordError, match="at most 1024"):
            decode(data, POOL_1024)
        fastest = min(fastest, time.perf_counter() - started)
    assert fastest < 0.005
    assert refused_with_peak(data, POOL_1024, "at most 1024") < 64 * 1024  # 2**24 int64 would be 128 MiB
    with pytest.raises(RecordError, match=f"at most {rec.MAX_BLOCKS}"):
        decode(data, UNBOUNDED)


def test_indices_past_the_pool_are_refused_before_runs_are_expanded():
    """Runs that end past the receiver's last block are refused from their starts and
    lengths: neither many pool-sized runs at the top of the 24-bit range nor one long run
    against limits whose largest index is small make the receiver expand them first."""
    top = raw_decisions([entry(_RUNS, 2, 1024 * 128, request_id=i) for i in range(400)],
                        [(1 << 24) - 1024, 1023] * 400)
    assert len(top) < 32 * 1024
    # expanded, 400 runs of 1024 blocks would be 3.2 MB per int64 array
    assert refused_with_peak(top, POOL_1024, "pool has 1024 blocks|blocks in one record") < 512 * 1024
    long = raw_decisions([entry(_RUNS, 2, rec.MAX_BLOCKS)], [0, rec.MAX_BLOCKS - 1])
    narrow = Limits(max_blocks=rec.MAX_BLOCKS, max_block_index=1023)
    assert refused_with_peak(long, narrow, "block index 1048575, this receiver's pool has 1024") < 64 * 1024
    for record_blocks in ([1000 + i for i in range(0, 60, 2)], range(1000, 1030), [1024], [5, 1 << 23]):
        data = encode(Decisions.of(0, [(1, 0, ADMIT, 0, 0, 128 * len(record_blocks), 0, b"",
                                        blocks(record_blocks))]))
        with pytest.raises(RecordError, match="pool has 1024 blocks"):
            decode(data, POOL_1024)
        assert decode(data, UNBOUNDED).decisions()[0].blocks.tolist() == list(record_blocks)  # a larger pool's


def test_one_record_names_at_most_a_pool_of_blocks():
    """Its sender cuts it so: what a DECISIONS record expands to is bounded by the
    receiver's pool, whatever the number of entries."""
    within = [(i, 0, ADMIT, 0, 0, 128 * 512, 0, b"", blocks(range(512 * i, 512 * (i + 1)))) for i in range(2)]
    assert len(decode(encode(Decisions.of(0, within)), POOL_1024).decisions()) == 2
    over = [(i, 0, ADMIT, 0, 0, 128 * 512, 0, b"", blocks(range(0, 512))) for i in range(3)]
    with pytest.raises(RecordError, match="1536 blocks in one record, this receiver holds at most 1024"):
        decode(encode(Decisions.of(0, over)), POOL_1024)


def test_item_counts_that_do_not_match_the_area_are_refused_before_it_is_read():
    for data, message in (
        (raw_decisions([entry(_PLAIN, 3, 384)], [1, 5, 9], item_count=U32_MAX), "body of"),
        (raw_decisions([entry(_PLAIN, U32_MAX, 384)], [1, 5, 9]), f"the entries name {U32_MAX} items, the record has 3"),
        (raw_decisions([entry(_RUNS, 1 << 31, 384)], [1, 5]), "the entries name"),
    ):
        assert len(data) < 120
        assert refused_with_peak(data, POOL_1024, message) < 64 * 1024


def test_a_pool_sized_allocation_is_accepted_and_one_block_more_is_not():
    whole = Decisions.of(0, [(1, 0, ADMIT, 0, 0, 1024 * 16, 0, b"", blocks(range(1024)))])
    assert decode(encode(whole), POOL_1024).decisions()[0].blocks.tolist() == list(range(1024))
    over = raw_decisions([entry(_RUNS, 2, 1025 * 16)], [0, 1024])
    with pytest.raises(RecordError, match="1025 blocks for one request, this receiver holds at most 1024"):
        decode(over, POOL_1024)
    plain = Decisions.of(0, [(1, 0, ADMIT, 0, 0, 1025, 0, b"", scattered(1026)[:1025])])
    with pytest.raises(RecordError, match="1025 blocks for one request"):
        decode(encode(plain), Limits(max_blocks=1024, max_block_index=2047))


def test_decoding_is_bounded_by_default():
    """A caller that passes no limits gets a default-configured pool's (1024 blocks, 64
    segments), never the wire's maxima, which are asked for by name."""
    assert DEFAULT_LIMITS == Limits() == Limits.for_pool(rec.DEFAULT_POOL_BLOCKS, rec.DEFAULT_MAX_SEGMENTS)
    assert (DEFAULT_LIMITS.max_blocks, DEFAULT_LIMITS.max_block_index, DEFAULT_LIMITS.max_segments) == (1024, 1023, 64)
    assert (UNBOUNDED.max_blocks, UNBOUNDED.max_segments, UNBOUNDED.max_block_index) == (
        rec.MAX_BLOCKS, rec.MAX_SEGMENTS, MAX_BLOCK_INDEX)
    huge = raw_decisions([entry(_RUNS, 2, 128)], [0, (1 << 24) - 1])
    for call in (lambda: decode(huge), lambda: Decisions.from_bytes(huge)):
        with pytest.raises(RecordError, match="at most 1024"):
            call()
    assert "at most 1024" in decode_frame(huge)[1]
    far = encode(Decisions.of(0, [(1, 0, ADMIT, 0, 0, 128, 0, b"", blocks([5000]))]))
    with pytest.raises(RecordError, match="pool has 1024 blocks"):
        decode(far)
    assert decode(far, UNBOUNDED).decisions()[0].blocks.tolist() == [5000]
    many = encode(Transfer(0, -1, 0, 1, tuple(Segment(i, 0, 0, 1, 1, 0) for i in range(65))))
    with pytest.raises(RecordError, match="65 segments"):
        decode(many)
    assert len(decode(many, UNBOUNDED).segments) == 65
    assert max_record_bytes() == max_record_bytes(DEFAULT_LIMITS) < rec.MAX_RECORD_BYTES


@pytest.mark.parametrize("field, value", [("max_blocks", rec.MAX_BLOCKS + 1), ("max_segments", 0),
                                          ("max_block_index", MAX_BLOCK_INDEX + 1), ("max_blocks", True),
                                          ("max_segments", 2.0)])
def test_bad_limits_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"Limits.{field}="):
        Limits(**{field: value})


# ------------------------------------------------------------------- slot sizing


def worst_decision(pool_blocks: int, block_size: int = 1) -> Decisions:
    """The largest record about one request a receiver of this pool accepts: one
    allocation of every block, scattered, with the longest hash."""
    return Decisions.of(0, [(1, 3, RESUME, 0, 0, pool_blocks * block_size, 0, b"h" * MAX_HASH_BYTES,
                             scattered(pool_blocks))])


def largest_payload_info() -> rec.PayloadInfo:
    """Every item a payload may declare and every byte of metadata, in the most entries."""
    items = tuple(rec.PayloadItem(b"h" * rec.MAX_HASH_BYTES, 10 * i, 10, i % 2 == 1, (1, 2, 3))
                  for i in range(rec.MAX_ITEMS))
    per_entry = rec.MAX_METADATA_BYTES // rec.MAX_METADATA_ENTRIES
    metadata = tuple(rec.Metadata(f"{i}".rjust(rec.MAX_NAME_BYTES, "m"), 5, (1, 1, 1, per_entry),
                                  bytes(per_entry)) for i in range(rec.MAX_METADATA_ENTRIES))
    return rec.PayloadInfo(0, 1, 7, 10 * rec.MAX_ITEMS + 1, items, metadata)


def largest_others(limits: Limits) -> tuple[rec.Record, ...]:
    """The largest TRANSFER, ABORT, PAYLOAD_INFO and one-entry ALLOCATIONS and COMPLETIONS
    `limits` allow."""
    return (Transfer(0, -1, 0, 1, tuple(Segment(i, 0, 0, 1, 1, 0) for i in range(limits.max_segments))),
            Abort(1, AbortReason.USER, "x" * MAX_MESSAGE_BYTES, 0, -1), largest_payload_info(),
            Allocations.of(0, 1, [(1, 0, 0, 1)]), Completions.of(0, 1, [(1, 0, 0, 0, 0)]))


def test_the_default_pool_fits_a_4096_byte_slot():
    """The default 1024-block pool: even an allocation of all of it with no two blocks
    consecutive fits one 4096-byte ring slot, and is the largest record that pool takes."""
    data = encode(worst_decision(1024, 128))
    assert decode(data, POOL_1024) == worst_decision(1024, 128)
    assert len(data) == max_record_bytes(POOL_1024) == max_record_bytes()  # tight
    assert slot_bytes_for(max_record_bytes(POOL_1024)) <= 4096


@pytest.mark.parametrize("pool_blocks", [1, 2, 256, 4096, 70_000])
def test_a_fully_fragmented_pool_fits_its_derived_slot(pool_blocks):
    """Block size 1, no two blocks consecutive: the largest allocation a pool of n blocks
    can make fits a ring slot sized from that pool, and the bound is that record's size."""
    limits = Limits.for_pool(pool_blocks, 64)
    decision = worst_decision(pool_blocks)
    data = encode(decision)
    assert decode(data, limits) == decision
    assert len(data) <= max_record_bytes(limits) <= slot_bytes_for(max_record_bytes(limits)) - SLOT_HEADER_BYTES
    # the bound is the largest of the records it names, each as encoded
    assert max_record_bytes(limits) == max(len(data), *map(len, map(encode, largest_others(limits))))


def test_max_record_bytes_is_tight_for_the_wires_maxima():
    data = encode(worst_decision(rec.MAX_BLOCKS))
    assert len(data) == max_record_bytes(UNBOUNDED) == rec.MAX_RECORD_BYTES
    assert decode(data, UNBOUNDED).decisions()[0].blocks.tolist() == scattered(rec.MAX_BLOCKS).tolist()
    for record in largest_others(UNBOUNDED):
        assert len(encode(record)) <= max_record_bytes(UNBOUNDED)
        assert decode(encode(record), UNBOUNDED) == record


@pytest.mark.parametrize("kind, entry_bytes", [(Allocations, 20), (Completions, 21), (Announcements, 12)])
@pytest.mark.parametrize("frame_bytes", [64, 100, 4096, 65536])
def test_a_batch_cut_with_entries_that_fit_fits_its_frame(kind, entry_bytes, frame_bytes):
    fit = kind.entries_that_fit(frame_bytes)
    one = {Allocations: (1, 0, 0, 1), Completions: (1, 0, 0, 1, 0), Announcements: (1, 1)}[kind]
    assert len(encode(kind.of(0, 1, [one] * fit))) <= frame_bytes < len(encode(kind.of(0, 1, [one] * (fit + 1))))
    assert len(encode(kind.of(0, 1, [one] * fit))) == 28 + entry_bytes * fit


# ------------------------------------------------------------ validation, headers


def test_batch_records_are_validated_on_construction():
    def allocations(*entry: int) -> Allocations:
        return Allocations(src_rank=0, dst_rank=1, entries=Allocations.of(0, 1, [entry]).entries)

    def completions(*entry: int) -> Completions:
        return Completions(src_rank=0, dst_rank=1, entries=Completions.of(0, 1, [entry]).entries)

    def decisions(*entry, src_rank: int = 0) -> Decisions:
        unchecked = Decisions.of(0, [(*entry[:8], blocks(entry[8]))])
        return Decisions(src_rank=src_rank, dst_rank=-1, entries=unchecked.entries, items=unchecked.items)

    assert allocations(1, 0, 0, 128).items() == [Allocation(1, 0, 0, 128, 0)]
    with pytest.raises(RecordError, match="request_id"):
        allocations(-1, 0, 0, 128)
    with pytest.raises(RecordError, match="allocated_tokens"):
        allocations(1, 0, 0, 0)
    with pytest.raises(RecordError, match="sent_tokens"):
        completions(1, 0, 11, 10, 0)
    with pytest.raises(RecordError, match="flags"):
        completions(1, 0, 5, 10, 2)
    with pytest.raises(RecordError, match="request_id"):
        completions(-5, 0, 5, 10, 0)
    assert decisions(1, 0, ADMIT, 0, 0, 384, 0, b"", [1, 2, 9]).decisions()[0].blocks.tolist() == [1, 2, 9]
    with pytest.raises(RecordError, match="repeats"):
        decisions(1, 0, RESUME, 0, 0, 384, 0, b"", [1, 2, 1])
    with pytest.raises(RecordError, match="repeats"):
        decisions(1, 0, RESUME, 0, 0, 6 * 128, 0, b"", [1, 2, 3, 4, 5, 3])
    with pytest.raises(RecordError, match="allocated_tokens"):
        decisions(1, 0, RESUME, 0, 0, 1000, 0, b"", [1, 2, 3])  # not len(blocks) * block_size
    with pytest.raises(RecordError, match="allocated_tokens"):
        decisions(1, 0, ADMIT, 0, 0, 128, 0, b"", [])
    with pytest.raises(RecordError, match="allocated_tokens"):
        decisions(1, 0, ADMIT, 0, 0, 0, 0, b"", [4])
    with pytest.raises(RecordError, match="hash_length"):
        decisions(1, 0, DecisionAction.CACHED, 0, 0, 0, 0, b"x" * (MAX_HASH_BYTES + 1), [])
    with pytest.raises(RecordError, match="request_id"):
        decisions(-1, 0, DecisionAction.FREE, 0, 0, 0, 0, b"", [])
    with pytest.raises(RecordError, match="sent_tokens"):
        decisions(1, 0, DecisionAction.COMPLETE, 11, 10, 0, 0, b"", [])
    with pytest.raises(RecordError, match="src_rank=-1"):
        decisions(1, 0, DecisionAction.FREE, 0, 0, 0, 0, b"", [], src_rank=-1)
    good = Allocations.of(0, 1, [(1, 0, 0, 128)])
    with pytest.raises(RecordError, match="dst_rank=-2"):
        dataclasses.replace(good, dst_rank=-2)
    with pytest.raises(RecordError, match="entries"):
        dataclasses.replace(good, entries=good.entries[:0])  # a batch of nothing
    with pytest.raises(RecordError, match="entries"):
        dataclasses.replace(good, entries=Completions.of(0, 1, [(1, 0, 0, 0, 0)]).entries)
    with pytest.raises(RecordError, match="entries"):
        dataclasses.replace(good, entries=[(1, 0, 0, 128)])
    one = Decisions.of(0, [(1, 0, ADMIT, 0, 0, 128, 0, b"", blocks([3]))])
    with pytest.raises(RecordError, match="items"):
        dataclasses.replace(one, items=np.array([MAX_BLOCK_INDEX + 1]))
    with pytest.raises(RecordError, match="items"):
        dataclasses.replace(one, items=[3])


def test_the_other_records_are_validated_on_construction_and_decoding():
    with pytest.raises(RecordError, match="past total_tokens"):
        Transfer(0, -1, 0, 64, (Segment(1, 0, 90, 20, 100, 0),))
    with pytest.raises(RecordError, match="count=0"):
        Transfer(0, -1, 0, 64, (Segment(1, 0, 0, 0, 100, 0),))
    with pytest.raises(RecordError, match="segments"):
        Transfer(0, -1, 0, 64, ())
    with pytest.raises(RecordError, match="dst_rank=-2"):
        Announce(1, 10, 0, -2)
    with pytest.raises(RecordError, match="reason"):
        Abort(1, 9, "x", 0, 1)
    with pytest.raises(RecordError, match="at most 512"):
        Abort(1, AbortReason.USER, "é" * 300, 0, 1)
    with pytest.raises(RecordError, match="total_tokens=0"):
        Announce(1, 0, 0, 1)
    with pytest.raises(RecordError, match="request_id"):
        Announce(1 << 63, 1, 0, 1)
    with pytest.raises(RecordError, match="integer"):
        Announce(True, 1, 0, 1)
    with pytest.raises(RecordError, match="state"):
        Member(0, 3)
    with pytest.raises(RecordError, match="src_rank=-1"):
        Member(-1, MemberState.LEFT)
    # decoding validates the same way: a negative request id on the wire is refused
    raw = bytearray(encode(Completions.of(0, 1, [(1, 0, 0, 0, 0)])))
    raw[28:36] = struct.pack("<q", -5)
    with pytest.raises(RecordError, match="request_id"):
        decode(bytes(raw))
    raw = bytearray(encode(Transfer(0, -1, 0, 64, (Segment(1, 0, 0, 5, 10, 0),))))
    raw[8 + 34 : 8 + 42] = struct.pack("<q", -3)
    with pytest.raises(RecordError, match="request_id=-3"):
        decode(bytes(raw))


def test_malformed_headers_are_rejected():
    good = encode(Completions.of(0, 1, [(1, 0, 5, 10, 0)]))
    with pytest.raises(RecordError, match="magic"):
        decode(b"XX" + good[2:])
    with pytest.raises(RecordError, match="version"):
        decode(good[:2] + bytes([rec.VERSION - 1]) + good[3:])
    with pytest.raises(RecordError, match="record type"):
        decode(good[:3] + bytes([99]) + good[4:])
    with pytest.raises(RecordError, match="after the record"):
        decode(good + b"\0")
    with pytest.raises(RecordError, match="body bytes"):
        decode(good[:-1])
    with pytest.raises(RecordError, match="header"):
        decode(good[:5])
    with pytest.raises(RecordError, match="body of 8388608 bytes, expected 41"):  # the count says one entry
        decode(good[:4] + struct.pack("<I", 1 << 23) + good[8:] + bytes((1 << 23) - len(good) + 8))
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
    with pytest.raises(RecordError, match="expected a Transfer record, got Completions"):
        Transfer.from_bytes(good)


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


# ------------------------------------------------------------------------- frames


def test_a_frame_stops_at_the_first_malformed_record():
    allocations = encode(Allocations.of(0, 1, [(1, 0, 0, 128), (2, 0, 0, 256)]))
    completions = encode(Completions.of(0, 1, [(1, 0, 5, 10, 0)]))
    bad_version = completions[:2] + bytes([rec.VERSION + 1]) + completions[3:]
    records, error = decode_frame(allocations + completions + bad_version + allocations)
    assert records == [decode(allocations), decode(completions)] and "version" in error
    not_canonical = raw_decisions([entry(_PLAIN, 3, 384)], [4, 5, 6])
    records, error = decode_frame(completions + not_canonical + completions)
    assert records == [decode(completions)] and "not canonical" in error
    records, error = decode_frame(allocations + completions[:-1])
    assert records == [decode(allocations)] and "body bytes" in error
    assert decode_frame(b"") == ([], None)
    assert decode_frame(rec.encode_frame([decode(allocations), decode(completions)])) == (
        [decode(allocations), decode(completions)], None)


def test_wanted_steps_over_other_record_types_without_decoding_them():
    """An encoder rank takes allocations and completions; the language ranks' decisions on
    the same ring are stepped over by their header, even one it could not decode."""
    allocations = encode(Allocations.of(0, 1, [(1, 0, 0, 128)]))
    completions = encode(Completions.of(0, 1, [(1, 0, 5, 10, 0)]))
    huge = raw_decisions([entry(_RUNS, 2, 128)], [0, (1 << 24) - 1])  # refused if it were decoded
    member = encode(Member(2, MemberState.DRAINING))
    wanted = frozenset({RecordType.ALLOCATIONS, RecordType.COMPLETIONS})
    frame = allocations + huge + completions + member + allocations
    assert decode_frame(frame, DEFAULT_LIMITS, wanted) == (
        [decode(allocations), decode(completions), decode(allocations)], None)
    records, error = decode_frame(frame)
    assert records == [decode(allocations)] and "at most 1024" in error
    # a wanted record that is malformed still stops the frame
    records, error = decode_frame(allocations + huge + completions[:-1], DEFAULT_LIMITS, wanted)
    assert records == [decode(allocations)] and "body bytes" in error
    # an unwanted record whose header claims more than the frame holds is not stepped over
    records, error = decode_frame(allocations + huge[:-1], DEFAULT_LIMITS, wanted)
    assert records == [decode(allocations)] and "body bytes" in error


def verdict(raw: bytes, limits: Limits) -> str:
    try:
        return encode(decode(raw, limits)).hex()
    except RecordError:
        return "refused"


@settings(max_examples=300, deadline=None)
@given(RANK, st.one_of(
    st.lists(decision_entries(), min_size=1, max_size=8).map(lambda items: (Decisions, items)),
    st.lists(allocation_entries(), min_size=1, max_size=8).map(lambda items: (Allocations, items)),
    st.lists(completion_entries(), min_size=1, max_size=8).map(lambda items: (Completions, items)),
    st.lists(announcement_entries(), min_size=1, max_size=8).map(lambda items: (Announcements, items)),
    st.lists(st.tuples(NONNEG, st.binary(min_size=1, max_size=MAX_HASH_BYTES)), min_size=1, max_size=8).map(
        lambda items: (HeldItems, items))), st.data())
def test_the_small_record_checks_and_the_vectorized_ones_agree(src, batch, data):
    """A batch record of a few entries (DECISIONS, ALLOCATIONS, COMPLETIONS, ANNOUNCEMENTS,
    HELD) is checked entry by entry in plain Python, a larger one with numpy: on any bytes, valid or
    corrupted, both accept exactly the same and refuse exactly the same (against a small
    pool, so the bounds are exercised too)."""
    kind, items = batch
    raw = bytearray(encode(kind.of(src, items) if kind is Decisions else kind.of(src, 7, items)))
    for _ in range(data.draw(st.integers(0, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    for limits in (Limits.for_pool(64), UNBOUNDED):
        small = verdict(bytes(raw), limits)
        saved = rec._SMALL_BATCH
        rec._SMALL_BATCH = 0
        try:
            vectorized = verdict(bytes(raw), limits)
        finally:
            rec._SMALL_BATCH = saved
        assert small == vectorized
