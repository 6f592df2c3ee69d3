"""Tensor bundles shared by the data-plane launchers and their torch reference.

A *pool* stores, per block, the rows of every field for `block_size` tokens:

    embeddings       [num_blocks, block_size, D]       bf16 | fp16 | fp32
    deepstack        [num_blocks, block_size, K*D]     same dtype (optional)
    fill_ids         [num_blocks, block_size]          int32
    mrope_positions  [num_blocks, 3, block_size]       int32

*Rows* are the same fields for a contiguous run of tokens, laid out as a payload:
`embeddings [N, D]`, `fill_ids [N]`, `mrope_positions [3, N]`, `deepstack [N, K*D]`.

A *span* names tokens `[start, start + count)` of a sequence whose tokens live, in
order, in `blocks` (token t sits in `blocks[t // block_size]` at row `t % block_size`).
Resume rounds start at `sent_tokens`, so `start` need not be block-aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


class PoolTensors(NamedTuple):
    embeddings: torch.Tensor
    fill_ids: torch.Tensor
    mrope_positions: torch.Tensor
    deepstack: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.embeddings.shape[0]

    @property
    def block_size(self) -> int:
        return self.embeddings.shape[1]


# Floating dtypes and the integers of the same width their bits are read as.
BITS_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, floating values viewed as integers of the same width (the same bytes):
    what compares, indexes and copies bit for bit (NaN payloads, -0.0), also through a
    torch op that would compute (index kernels, `_foreach_copy_` on CUDA)."""
    view = BITS_VIEW.get(tensor.dtype)
    return tensor if view is None else tensor.view(view)


class RowTensors(NamedTuple):
    embeddings: torch.Tensor
    fill_ids: torch.Tensor
    mrope_positions: torch.Tensor
    deepstack: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]


@dataclass(frozen=True)
class TokenSpan:
    """Tokens `[start, start + count)` of a sequence stored in `blocks`."""

    blocks: Sequence[int]
    start: int
    count: int
