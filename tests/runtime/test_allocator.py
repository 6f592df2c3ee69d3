"""BlockAllocator: LIFO reuse, all-or-nothing allocation, claims, and errors that change nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from embxfer import BlockAllocator
from embxfer.runtime import allocated_tokens, blocks_for_tokens


def snapshot(alloc: BlockAllocator) -> tuple:
    """Everything observable: counts, which blocks are free, and the order the free blocks
    would be handed out in (drained from a copy, so the allocator itself is untouched)."""
    drained = copy.deepcopy(alloc)
    order = drained.allocate(drained.num_free * drained.block_size) if drained.num_free else []
    free_set = frozenset(b for b in range(alloc.num_blocks) if alloc.is_free(b))
    return alloc.num_free, alloc.num_used, free_set, tuple(order)


# ---------------------------------------------------------------- sizes (SPEC R2)


@pytest.mark.parametrize(
    "tokens, block_size, blocks",
    [(1, 128, 1), (127, 128, 1), (128, 128, 1), (129, 128, 2), (1000, 128, 8), (8192, 128, 64), (9168, 128, 72),
     (5, 1, 5), (1025, 1024, 2)],
)
def test_blocks_for_tokens_rounds_up(tokens, block_size, blocks):
    assert blocks_for_tokens(tokens, block_size) == blocks
    assert BlockAllocator(100, block_size).blocks_for(tokens) == blocks


def test_default_1000_tokens_block_128_is_8_blocks_1024_tokens():
    alloc = BlockAllocator(16, 128)
    blocks = alloc.allocate(1000)
    assert len(blocks) == 8
    assert alloc.allocated_tokens(blocks) == 1024
    assert allocated_tokens(blocks, 128) == 1024 == len(blocks) * alloc.block_size


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 8, 9, 15, 16, 17, 40])
def test_allocated_tokens_is_blocks_times_block_size(tokens):
    alloc = BlockAllocator(10, 4)
    blocks = alloc.allocate(tokens)
    assert blocks is not None
    assert alloc.allocated_tokens(blocks) == len(blocks) * 4
    assert alloc.allocated_tokens(blocks) >= tokens > alloc.allocated_tokens(blocks) - 4


# ---------------------------------------------------------------- allocation


def test_fresh_allocator_hands_out_distinct_in_range_blocks():
    alloc = BlockAllocator(6, 2)
    a = alloc.allocate(5)  # 3 blocks
    b = alloc.allocate(6)  # 3 blocks
    assert len(a) == 3 and len(b) == 3
    assert sorted(a + b) == list(range(6))
    assert alloc.num_free == 0 and alloc.num_used == 6
    assert all(not alloc.is_free(i) for i in range(6))


def test_lifo_free_then_allocate_returns_same_indices_in_same_order():
    alloc = BlockAllocator(20, 8)
    first = alloc.allocate(8 * 5)
    alloc.allocate(8 * 3)
    shuffled = [first[3], first[0], first[4], first[1], first[2]]
    alloc.free(shuffled)
    assert alloc.allocate(8 * 5) == shuffled


def test_lifo_last_freed_list_comes_first():
    alloc = BlockAllocator(10, 1)
    a = alloc.allocate(3)
    b = alloc.allocate(3)
    alloc.free(a)
    alloc.free(b)
    assert alloc.allocate(3) == b
    assert alloc.allocate(3) == a


def test_smaller_allocation_after_free_reuses_head_of_freed_list():
    alloc = BlockAllocator(10, 4)
    blocks = alloc.allocate(4 * 6)
    alloc.free(blocks)
    assert alloc.allocate(4 * 2) == blocks[:2]


def test_allocate_is_all_or_nothing():
    alloc = BlockAllocator(5, 10)
    held = alloc.allocate(30)
    before = snapshot(alloc)
    assert alloc.allocate(21) is None  # needs 3 blocks, 2 free
    assert snapshot(alloc) == before
    assert alloc.allocate(20) is not None
    assert alloc.num_free == 0
    assert alloc.allocate(1) is None
    alloc.free(held)
    assert alloc.num_free == 3


def test_allocate_available_without_cap_takes_what_is_free():
    alloc = BlockAllocator(8, 4)
    alloc.allocate(4 * 5)
    got = alloc.allocate_available(4 * 10)
    assert len(got) == 3
    assert alloc.num_free == 0
    assert alloc.allocate_available(1) is None


def test_allocate_available_takes_only_what_is_needed_when_room():
    alloc = BlockAllocator(8, 4)
    got = alloc.allocate_available(9)
    assert len(got) == 3
    assert alloc.num_free == 5


@pytest.mark.parametrize(
    "cap, expected",
    [(0, 6), (4 * 2, 2), (4 * 2 + 3, 2), (1, 1), (3, 1), (4 * 100, 6)],
    ids=["no-cap", "exact", "rounded-down", "below-one-block", "below-one-block-3", "above-need"],
)
def test_allocate_available_with_cap(cap, expected):
    alloc = BlockAllocator(20, 4)
    got = alloc.allocate_available(4 * 6, max_tokens=cap)
    assert len(got) == expected
    assert alloc.num_used == expected
    assert alloc.allocated_tokens(got) == expected * 4


def test_allocate_available_reuses_freed_blocks_first():
    alloc = BlockAllocator(10, 2)
    blocks = alloc.allocate(2 * 4)
    alloc.free(blocks)
    assert alloc.allocate_available(2 * 10, max_tokens=2 * 3) == blocks[:3]


def test_allocate_available_none_when_pool_full_changes_nothing():
    alloc = BlockAllocator(3, 2)
    alloc.allocate(6)
    before = snapshot(alloc)
    assert alloc.allocate_available(10) is None
    assert alloc.allocate_available(10, max_tokens=2) is None
    assert snapshot(alloc) == before


# ---------------------------------------------------------------- claim


def test_claim_takes_exactly_the_named_blocks():
    alloc = BlockAllocator(8, 4)
    alloc.claim([5, 2, 7])
    assert alloc.num_used == 3
    assert [alloc.is_free(b) for b in range(8)] == [True, True, False, True, True, False, True, False]
    rest = alloc.allocate(4 * 5)
    assert sorted(rest) == [0, 1, 3, 4, 6]
    assert alloc.allocate(1) is None


def test_claim_accepts_any_iterable():
    alloc = BlockAllocator(8, 4)
    alloc.claim(iter([1, 2]))
    assert not alloc.is_free(1) and not alloc.is_free(2)
    assert alloc.num_used == 2


def test_claimed_blocks_can_be_freed_and_reused_lifo():
    alloc = BlockAllocator(8, 4)
    alloc.claim([6, 3])
    alloc.free([6, 3])
    assert alloc.allocate(8) == [6, 3]


def test_claim_of_empty_list_changes_nothing():
    alloc = BlockAllocator(4, 4)
    before = snapshot(alloc)
    alloc.claim([])
    alloc.free([])
    assert snapshot(alloc) == before


def test_follower_claim_matches_leader_allocation():
    leader, follower = BlockAllocator(16, 8), BlockAllocator(16, 8)
    for tokens in (20, 9, 33):
        blocks = leader.allocate(tokens)
        follower.claim(blocks)
    freed = leader.allocate(8)
    follower.claim(freed)
    leader.free(freed)
    follower.free(freed)
    assert snapshot(leader)[:3] == snapshot(follower)[:3]


# ---------------------------------------------------------------- errors leave state unchanged


def busy_allocator() -> tuple[BlockAllocator, list[int]]:
    alloc = BlockAllocator(10, 4)
    held = alloc.allocate(4 * 4)
    other = alloc.allocate(4 * 2)
    alloc.free(other)  # other is free again, on top of the stack
    return alloc, held


@pytest.mark.parametrize(
    "action, match",
    [
        (lambda a, held: a.free(held + [held[0]]), "twice"),
        (lambda a, held: a.free([held[0], held[0]]), "twice"),
        (lambda a, held: a.free([held[0], 9]), "not allocated"),  # foreign: never handed out
        (lambda a, held: a.free([held[1], 10]), "out of range"),
        (lambda a, held: a.free([held[1], -1]), "out of range"),
        (lambda a, held: a.free([held[0], 1.0]), "integer"),
        (lambda a, held: a.free([True]), "integer"),
        (lambda a, held: a.claim([9, held[2]]), "in use"),
        (lambda a, held: a.claim([8, 9, 8]), "twice"),
        (lambda a, held: a.claim([8, 10]), "out of range"),
        (lambda a, held: a.claim([-3]), "out of range"),
        (lambda a, held: a.allocate(0), "num_tokens"),
        (lambda a, held: a.allocate(-5), "num_tokens"),
        (lambda a, held: a.allocate(3.0), "num_tokens"),
        (lambda a, held: a.allocate(True), "num_tokens"),
        (lambda a, held: a.allocate_available(0), "num_tokens"),
        (lambda a, held: a.allocate_available(4, max_tokens=-1), "max_tokens"),
        (lambda a, held: a.allocate_available(4, max_tokens=2.5), "max_tokens"),
    ],
    ids=[
        "free-dup-in-list", "free-same-twice", "free-foreign", "free-out-of-range", "free-negative",
        "free-float", "free-bool", "claim-in-use", "claim-dup", "claim-out-of-range", "claim-negative",
        "alloc-zero", "alloc-negative", "alloc-float", "alloc-bool", "available-zero",
        "available-negative-cap", "available-float-cap",
    ],
)
def test_errors_raise_and_change_nothing(action, match):
    alloc, held = busy_allocator()
    before = snapshot(alloc)
    with pytest.raises(ValueError, match=match):
        action(alloc, held)
    assert snapshot(alloc) == before


def test_double_free_after_a_valid_free():
    alloc = BlockAllocator(4, 4)
    blocks = alloc.allocate(8)
    alloc.free(blocks)
    before = snapshot(alloc)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(blocks)
    assert snapshot(alloc) == before


@pytest.mark.parametrize("block", [-1, 4, 100])
def test_is_free_rejects_out_of_range(block):
    alloc = BlockAllocator(4, 4)
    alloc.allocate(16)
    with pytest.raises(ValueError, match="out of range"):
        alloc.is_free(block)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (-1, 4), (4, 0), (4, -2), (2.0, 4), (4, True)])
def test_constructor_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="BlockAllocator"):
        BlockAllocator(num_blocks, block_size)


# ---------------------------------------------------------------- random sequences (hypothesis)

NUM_BLOCKS, BLOCK_SIZE = 12, 4


class AllocatorMachine(RuleBasedStateMachine):
    """A model of who holds which block, checked against the allocator after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
        self.holders: list[list[int]] = []
        self.handed_out: set[int] = set()

    def _take(self, blocks: list[int]) -> None:
        assert len(set(blocks)) == len(blocks), f"duplicate index in {blocks}"
        assert not (set(blocks) & self.handed_out), f"{blocks} overlaps {self.handed_out}"
        assert all(0 <= b < NUM_BLOCKS for b in blocks)
        self.handed_out |= set(blocks)
        self.holders.append(blocks)

    @rule(tokens=st.integers(1, NUM_BLOCKS * BLOCK_SIZE + 8))
    def allocate(self, tokens):
        free_before = self.alloc.num_free
        blocks = self.alloc.allocate(tokens)
        need = -(-tokens // BLOCK_SIZE)
        if need > free_before:
            assert blocks is None
            assert self.alloc.num_free == free_before
        else:
            assert blocks is not None and len(blocks) == need
            assert self.alloc.allocated_tokens(blocks) == need * BLOCK_SIZE
            self._take(blocks)

    @rule(tokens=st.integers(1, NUM_BLOCKS * BLOCK_SIZE + 8), cap=st.integers(0, 5 * BLOCK_SIZE))
    def allocate_available(self, tokens, cap):
        free_before = self.alloc.num_free
        blocks = self.alloc.allocate_available(tokens, max_tokens=cap)
        want = -(-tokens // BLOCK_SIZE)
        if cap:
            want = min(want, max(1, cap // BLOCK_SIZE))
        expected = min(want, free_before)
        if expected == 0:
            assert blocks is None
        else:
            assert len(blocks) == expected
            self._take(blocks)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def free_one_holder(self, data):
        index = data.draw(st.integers(0, len(self.holders) - 1))
        blocks = self.holders.pop(index)
        # free_held (the runtime's path for a request's own list: a run goes by slices)
        # must leave exactly the state free does, the stack order too.
        getattr(self.alloc, data.draw(st.sampled_from(["free", "free_held"])))(blocks)
        self.handed_out -= set(blocks)
        # LIFO: the very next allocation of the same size hands the same indices back.
        again = self.alloc.allocate(len(blocks) * BLOCK_SIZE)
        assert again == blocks
        self._take(again)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def free_part_of_holder(self, data):
        index = data.draw(st.integers(0, len(self.holders) - 1))
        blocks = self.holders[index]
        part = data.draw(st.lists(st.sampled_from(blocks), unique=True, min_size=1))
        self.alloc.free(part)
        self.handed_out -= set(part)
        rest = [b for b in blocks if b not in part]
        if rest:
            self.holders[index] = rest
        else:
            self.holders.pop(index)

    @rule(data=st.data())
    def claim_free_blocks(self, data):
        free = [b for b in range(NUM_BLOCKS) if b not in self.handed_out]
        if not free:
            return
        wanted = data.draw(st.lists(st.sampled_from(free), unique=True, min_size=1, max_size=4))
        self.alloc.claim(wanted)
        self._take(wanted)

    @rule(data=st.data())
    def bad_call_changes_nothing(self, data):
        held = sorted(self.handed_out)
        free = [b for b in range(NUM_BLOCKS) if b not in self.handed_out]
        choices = [
            ("free", [data.draw(st.sampled_from([-1, NUM_BLOCKS, NUM_BLOCKS + 7]))]),
            ("claim", [data.draw(st.sampled_from([-2, NUM_BLOCKS]))]),
            ("allocate", data.draw(st.integers(-3, 0))),
        ]
        if free:
            choices.append(("free", [data.draw(st.sampled_from(free))]))  # double free / foreign
        if held:
            b = data.draw(st.sampled_from(held))
            choices.append(("claim", [b]))  # in use
            choices.append(("free", [b, b]))  # duplicate in one call
            if free:
                choices.append(("free", [b, free[0]]))  # one good, one bad: nothing freed
        method, argument = data.draw(st.sampled_from(choices))
        before = snapshot(self.alloc)
        with pytest.raises(ValueError):
            getattr(self.alloc, method)(argument)
        assert snapshot(self.alloc) == before

    @invariant()
    def counts_are_conserved(self):
        assert self.alloc.num_free + self.alloc.num_used == NUM_BLOCKS
        assert self.alloc.num_used == len(self.handed_out)
        assert {b for b in range(NUM_BLOCKS) if not self.alloc.is_free(b)} == self.handed_out
        assert sum(len(h) for h in self.holders) == len(self.handed_out)


AllocatorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase


def test_free_held_of_a_run_with_a_block_already_free_raises_naming_it_and_frees_nothing():
    alloc = BlockAllocator(16, 4)
    run = alloc.allocate(8 * 4)
    assert run == list(range(8))
    alloc.free([5])
    with pytest.raises(ValueError, match="block 5 is not allocated"):
        alloc.free_held(run)
    assert alloc.num_free == 9 and [alloc.is_free(b) for b in range(8)] == [False] * 5 + [True] + [False] * 2
    alloc.free_held([b for b in run if b != 5])
    assert alloc.num_free == 16
    assert alloc.allocate(16 * 4) == [0, 1, 2, 3, 4, 6, 7, 5] + list(range(8, 16))



@settings(max_examples=300, deadline=None)
@given(held=st.lists(st.integers(0, 15), unique=True),
       runs=st.lists(st.tuples(st.integers(-1, 17), st.integers(-1, 4)), max_size=6))
def test_free_runs_is_free_lists_of_the_runs(held, runs):
    """free_runs(starts, counts) leaves what free_lists of the runs' blocks leaves (the free
    stack's order included) and raises where it raises: overlapping, empty, unsorted, out
    of range and not-in-use runs alike."""
    by_runs = BlockAllocator(16, 4)
    by_runs.claim(held)
    by_lists = copy.deepcopy(by_runs)
    starts = np.array([start for start, _ in runs], dtype=np.int64)
    counts = np.array([count for _, count in runs], dtype=np.int64)
    outcomes = []
    for free in (lambda: by_runs.free_runs(starts, counts),
                 lambda: by_lists.free_lists([list(range(a, a + n)) for a, n in runs])):
        try:
            free()
            outcomes.append(None)
        except ValueError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    assert snapshot(by_runs) == snapshot(by_lists)
