"""Plain-torch data plane: the CPU path and the oracle the Triton kernels are tested against."""

from __future__ import annotations

import torch

from .types import PoolTensors, RowTensors, TokenSpan


def token_locations(span: TokenSpan, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, row in block) of every token of the span."""
    tokens = torch.arange(span.start, span.start + span.count, device=device)
    blocks = torch.as_tensor(list(span.blocks), dtype=torch.long, device=device)
    return blocks[tokens // block_size], tokens % block_size


def gather_reference(pool: PoolTensors, span: TokenSpan, out: RowTensors, out_start: int = 0) -> None:
    """Copy the span's tokens from the pool into rows `[out_start, out_start + count)` of `out`."""
    block, row = token_locations(span, pool.block_size, pool.embeddings.device)
    end = out_start + span.count
    out.embeddings[out_start:end] = pool.embeddings[block, row]
    out.fill_ids[out_start:end] = pool.fill_ids[block, row]
    out.mrope_positions[:, out_start:end] = pool.mrope_positions[block, :, row].T
    if pool.deepstack is not None:
        out.deepstack[out_start:end] = pool.deepstack[block, row]


def scatter_reference(rows: RowTensors, rows_start: int, pool: PoolTensors, span: TokenSpan) -> None:
    """Copy rows `[rows_start, rows_start + count)` of `rows` into the span's places in the pool."""
    block, row = token_locations(span, pool.block_size, pool.embeddings.device)
    end = rows_start + span.count
    pool.embeddings[block, row] = rows.embeddings[rows_start:end]
    pool.fill_ids[block, row] = rows.fill_ids[rows_start:end]
    pool.mrope_positions[block, :, row] = rows.mrope_positions[:, rows_start:end].T
    if pool.deepstack is not None:
        pool.deepstack[block, row] = rows.deepstack[rows_start:end]
