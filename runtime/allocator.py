"""`BlockAllocator`: hands out and takes back block indices of one pool.

Freed blocks go on top of a stack and are handed out first (LIFO). That is what a
real engine's allocator tends to do, and it is the reason nothing in embxfer may use
block indices as the identity of a round (SPEC R6): the next allocation can return
exactly the indices that were just freed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Whole blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def allocated_tokens(blocks: Sequence[int], block_size: int) -> int:
    """Capacity of a block list in tokens; the only number that crosses the wire (SPEC R2)."""
    return len(blocks) * block_size


class BlockAllocator:
    """Free-list allocator over `num_blocks` blocks of `block_size` tokens.

    `allocate` is all-or-nothing; `allocate_available` takes what is free now (used by
    resume rounds, SPEC section 3); `claim` takes named blocks (TP followers applying
    the leader's decision). Every error leaves the allocator unchanged.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockAllocator.{name}={value!r}: expected a positive integer")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Top of the stack is the end of the list; block 0 is handed out first. `claim` does
        # not search the stack: it marks the blocks in use and leaves their entries behind,
        # which `_pop` skips and `_compact` drops (a follower claims on every decision).
        self._free_stack: list[int] = list(range(num_blocks - 1, -1, -1))
        self._in_use = bytearray(num_blocks)
        self._in_use_array = np.frombuffer(self._in_use, dtype=np.uint8)  # the same bytes, for numpy
        self._ids = list(range(num_blocks))  # a run is recognised by comparing with a slice of it
        self._free = num_blocks

    @property
    def num_free(self) -> int:
        return self._free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._free

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for_tokens(num_tokens, self.block_size)

    def allocated_tokens(self, blocks: Sequence[int]) -> int:
        return allocated_tokens(blocks, self.block_size)

    def allocate(self, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` tokens, or None when not enough are free (never a partial list)."""
        self._check_tokens(num_tokens)
        count = self.blocks_for(num_tokens)
        if count > self._free:
            return None
        return self._pop(count)

    def allocate_available(self, num_tokens: int, max_tokens: int = 0) -> list[int] | None:
        """Up to enough blocks for `num_tokens` (capped at `max_tokens` if > 0) from what is
        free now; None when no block is free."""
        self._check_tokens(num_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens!r}: expected an integer >= 0 (0 = no cap)")
        count = self.blocks_for(num_tokens)
        if max_tokens > 0:
            count = min(count, max(1, max_tokens // self.block_size))
        count = min(count, self._free)
        return self._pop(count) if count else None

    def take(self, count: int) -> list[int] | None:
        """`count` blocks (all or nothing: None when fewer are free), in the order `count`
        one-block `allocate`s would hand them out; for a caller that cuts one list into
        several requests' (the language lane's admissions)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count={count!r}: expected a positive integer")
        return self._pop(count) if count <= self._free else None

    def free_runs(self, starts: np.ndarray, counts: np.ndarray) -> None:
        """`free_lists` of the runs `[starts[i], starts[i] + counts[i])`, in order, without a
        list per run: the same stack afterwards and the same checks (a run out of range, or
        a block not in use or named twice: ValueError, through `free_lists`, for the first
        bad run, the runs before it freed)."""
        starts = np.asarray(starts, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        ends = starts + counts
        in_use = self._in_use_array
        if (counts < 0).any() or (starts < 0).any() or (ends > self.num_blocks).any() or _overlap(starts, ends):
            seq = None
        else:
            total = int(counts.sum())
            if not total:
                return
            # each run's blocks in reverse, the runs in order: what `_push` stacks for each list
            seq = np.repeat(ends - 1, counts) - (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
        if seq is None or not in_use[seq].all():
            self.free_lists([list(range(a, b)) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)])
            return
        in_use[seq] = 0
        self._free_stack.extend(seq.tolist())
        self._free += total
        if len(self._free_stack) > 2 * self.num_blocks:
            self._compact()

    def claim(self, blocks: Iterable[int]) -> None:
        """Take exactly these blocks; ValueError if any is out of range, repeated or in use."""
        # A one-shot iterable would be used up by the check and then claim nothing.
        blocks = list(blocks)
        self._mark(blocks, 1, "claim")
        self._free -= len(blocks)

    def free(self, blocks: Iterable[int]) -> None:
        """Give blocks back; the next allocation returns them first, in the same order.
        ValueError (nothing freed) for an index out of range, repeated, or not in use."""
        blocks = list(blocks)
        self._mark(blocks, 0, "free")
        self._push(blocks)

    def free_held(self, blocks: list[int]) -> None:
        """`free` for a list this allocator handed out or claimed (every element an int it
        checked then): a run of consecutive indices, what a request's blocks usually are,
        is checked and marked with two slice operations instead of a loop per block (a
        default allocation is 64 blocks); anything else, or a block not in use (a double
        free), goes through `free`, which names it."""
        first = _run_start(blocks, self._ids)
        end = first + len(blocks)
        if first < 0 or end > self.num_blocks or self._in_use.find(0, first, end) >= 0:
            self.free(blocks)
            return
        self._in_use[first:end] = bytes(len(blocks))
        self._push(blocks)

    def free_lists(self, lists: list[list[int]]) -> None:
        """`free_held` for several block lists at once, in order (the stack ends as if each
        list were freed in turn): what a step's completions give back. A list of one
        block, what a small request holds, is checked and marked inline; any other goes
        through `free_held`. ValueError as `free` says for the first bad list (the lists
        before it stay freed)."""
        in_use, stack, count = self._in_use, self._free_stack, self.num_blocks
        for blocks in lists:
            if len(blocks) == 1:
                b = blocks[0]
                if type(b) is int and 0 <= b < count and in_use[b]:
                    in_use[b] = 0
                    stack.append(b)
                    self._free += 1
                    continue
            self.free_held(blocks)
        if len(stack) > 2 * count:
            self._compact()

    def _push(self, blocks: list[int]) -> None:
        """Freed blocks onto the stack (the next allocation hands them back first, in order)."""
        self._free_stack.extend(reversed(blocks))
        self._free += len(blocks)
        if len(self._free_stack) > 2 * self.num_blocks:
            self._compact()

    def _mark(self, blocks: list[int], value: int, action: str) -> None:
        """Set every block's in-use flag to `value` (1: claim, 0: free), in one pass that
        checks as it goes (every request frees its blocks, a TP follower also claims them:
        keep it cheap); a bad index undoes what this call marked, then raises ValueError
        naming it. An index is bad when out of range, repeated, or already at `value`."""
        in_use = self._in_use
        marked = 0
        try:
            for b in blocks:
                if type(b) is not int or in_use[b] == value or b < 0:
                    raise IndexError
                in_use[b] = value
                marked += 1
        except (IndexError, TypeError):
            for b in blocks[:marked]:
                in_use[b] = 1 - value
            self._check_indices(blocks, want_in_use=not value, action=action)  # names what is wrong
            raise

    def is_free(self, block: int) -> bool:
        # bytearray would accept -1 (the last block) silently.
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(f"is_free: block {block!r} out of range, expected 0..{self.num_blocks - 1}")
        return not self._in_use[block]

    def _pop(self, count: int) -> list[int]:
        stack, in_use = self._free_stack, self._in_use
        if len(stack) == self._free:  # no entry a claim left behind: the top `count` are free
            taken = stack[-count:]
            taken.reverse()
            del stack[-count:]
            first = _run_start(taken, self._ids)
            if first >= 0:  # a run: one slice
                in_use[first:first + count] = b"\x01" * count
            else:
                for b in taken:
                    in_use[b] = 1
            self._free -= count
            return taken
        taken = []
        while len(taken) < count:
            b = stack.pop()
            if not in_use[b]:  # else: an entry a claim left behind
                in_use[b] = 1
                taken.append(b)
        self._free -= count
        return taken

    def _compact(self) -> None:
        """Drop the entries of claimed blocks and duplicates, keeping the stack order (the
        top entry of a block is the one that counts)."""
        seen = bytearray(self.num_blocks)
        kept = []
        for b in reversed(self._free_stack):
            if not self._in_use[b] and not seen[b]:
                seen[b] = 1
                kept.append(b)
        kept.reverse()
        self._free_stack = kept

    def _check_tokens(self, num_tokens: int) -> None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens!r}: expected a positive integer")

    def _check_indices(self, blocks: Sequence[int], *, want_in_use: bool, action: str) -> None:
        seen: set[int] = set()
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, int):
                raise ValueError(f"{action}: block {b!r} is not an integer index")
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"{action}: block {b} out of range, expected 0..{self.num_blocks - 1}")
            if b in seen:
                raise ValueError(f"{action}: block {b} appears twice in one call")
            seen.add(b)
            if want_in_use and not self._in_use[b]:
                raise ValueError(f"{action}: block {b} is not allocated (double free or foreign index)")
            if not want_in_use and self._in_use[b]:
                raise ValueError(f"{action}: block {b} is already in use")


def _run_start(blocks: list[int], ids: list[int]) -> int:
    """The first index of `blocks` when they are a run of more than two consecutive
    indices (ints, ascending: what a fresh allocation usually is), else -1. `ids` is
    `list(range(num_blocks))`: a slice of it is the run to compare with (one copy in C,
    no list built from a range)."""
    count = len(blocks)
    if count <= 2:
        return -1
    first = blocks[0]
    return first if type(first) is int and blocks == ids[first:first + count] else -1


def _overlap(starts: np.ndarray, ends: np.ndarray) -> bool:
    """True if two of the runs `[starts[i], ends[i])` may share a block: runs in order of
    their starts (the usual case, checked first without a sort) overlap if and only if a run
    starts before the one before it ends. A run of no blocks inside another counts as an
    overlap: the caller's slow path then sorts that out (a false alarm costs time, never a
    wrong free). An argsort of the runs costs a fraction of a `np.unique` of their blocks."""
    if len(starts) < 2:
        return False
    if (starts[1:] >= ends[:-1]).all():
        return False
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    return bool((starts[1:] < ends[:-1]).any())
