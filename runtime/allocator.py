"""`BlockAllocator`: hands out and takes back block indices of one pool.

Freed blocks go on top of a stack and are handed out first (LIFO). That is what a
real engine's allocator tends to do, and it is the reason nothing in embxfer may use
block indices as the identity of a round (SPEC R6): the next allocation can return
exactly the indices that were just freed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


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
        # Top of the stack is the end of the list; block 0 is handed out first.
        self._free_stack: list[int] = list(range(num_blocks - 1, -1, -1))
        self._in_use = bytearray(num_blocks)

    @property
    def num_free(self) -> int:
        return len(self._free_stack)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free_stack)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for_tokens(num_tokens, self.block_size)

    def allocated_tokens(self, blocks: Sequence[int]) -> int:
        return allocated_tokens(blocks, self.block_size)

    def allocate(self, num_tokens: int) -> list[int] | None:
        """Blocks for `num_tokens` tokens, or None when not enough are free (never a partial list)."""
        self._check_tokens(num_tokens)
        count = self.blocks_for(num_tokens)
        if count > len(self._free_stack):
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
        count = min(count, len(self._free_stack))
        return self._pop(count) if count else None

    def claim(self, blocks: Iterable[int]) -> None:
        """Take exactly these blocks; ValueError if any is out of range, repeated or in use."""
        # A one-shot iterable would be used up by the check and then claim nothing.
        blocks = list(blocks)
        self._check_indices(blocks, want_in_use=False, action="claim")
        claimed = set(blocks)
        self._free_stack = [b for b in self._free_stack if b not in claimed]
        for b in blocks:
            self._in_use[b] = 1

    def free(self, blocks: Iterable[int]) -> None:
        """Give blocks back; the next allocation returns them first, in the same order."""
        blocks = list(blocks)
        self._check_indices(blocks, want_in_use=True, action="free")
        for b in reversed(blocks):
            self._in_use[b] = 0
            self._free_stack.append(b)

    def is_free(self, block: int) -> bool:
        # bytearray would accept -1 (the last block) silently.
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(f"is_free: block {block!r} out of range, expected 0..{self.num_blocks - 1}")
        return not self._in_use[block]

    def _pop(self, count: int) -> list[int]:
        taken = self._free_stack[-count:][::-1]
        del self._free_stack[-count:]
        for b in taken:
            self._in_use[b] = 1
        return taken

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
