"""embxfer.kernels: the data plane. Knows tensors, not requests.

CUDA tensors go to Triton kernels; CPU tensors take the plain-torch reference.
"""

from __future__ import annotations

from .reference import gather_reference, scatter_reference
from .types import PoolTensors, RowTensors, TokenSpan, check_span


def gather(pool: PoolTensors, span: TokenSpan, out: RowTensors, out_start: int = 0) -> None:
    """Read a span of pool tokens into contiguous rows (the language side's final read)."""
    check_span(span, pool.num_blocks, pool.block_size, what="gather")
    gather_reference(pool, span, out, out_start)


def scatter(rows: RowTensors, rows_start: int, pool: PoolTensors, span: TokenSpan) -> None:
    """Write contiguous rows into a span of pool tokens (the encoder side's submit)."""
    check_span(span, pool.num_blocks, pool.block_size, what="scatter")
    scatter_reference(rows, rows_start, pool, span)


__all__ = ["PoolTensors", "RowTensors", "TokenSpan", "check_span", "gather", "scatter"]
