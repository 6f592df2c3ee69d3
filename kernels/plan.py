"""`BlockPlan`: where a batch of token spans lives in a pool, as whole-batch arrays.

Both data-plane paths address pool rows through a plan: the Triton launcher uploads it
as the block table, the torch path turns it into one flat row index per batch
(`reference.plan_rows`). `plan_spans` builds one without checks, for callers that
validated the block indices where they were allocated (the runtime);
`checks.covered_blocks` builds one with every check, for the public API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .types import TokenSpan


class BlockPlan(NamedTuple):
    """The block indices holding each span's tokens, all spans concatenated (`blocks`), how
    many of them belong to each span (`lengths`), and each span's first token relative to
    its first block (`first_rows`). All int64."""

    blocks: np.ndarray
    lengths: np.ndarray
    first_rows: np.ndarray


def plan_spans(spans: Sequence[TokenSpan], block_size: int) -> BlockPlan:
    """The plan of `spans`, trusting every index and bound (no checks)."""
    pieces, lengths, first_rows = [], [], []
    for span in spans:
        first = span.start // block_size
        last = -(-(span.start + span.count) // block_size) if span.count else first
        pieces.append(np.asarray(span.blocks[first:last], dtype=np.int64))
        lengths.append(last - first)
        first_rows.append(span.start - first * block_size)
    blocks = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return BlockPlan(blocks, np.array(lengths, dtype=np.int64), np.array(first_rows, dtype=np.int64))
