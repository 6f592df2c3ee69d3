"""Plain-torch data plane: the CPU path and the oracle the Triton kernels are tested against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import StagingLayout
from .types import PoolTensors, RowTensors, TokenSpan

# Copies go through same-width integer views: they move bits (a NaN payload stays that
# NaN), and torch's CPU index kernels on bf16/fp16 views slow down by ~100x on NaN and
# denormal patterns, which synthetic and real embeddings both contain.
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_BITS.get(tensor.dtype, tensor.dtype))


def token_locations(
    span: TokenSpan, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, row in block) of every token of the span."""
    tokens = torch.arange(span.start, span.start + span.count, device=device)
    blocks = torch.as_tensor(list(span.blocks), dtype=torch.long, device=device)
    return blocks[tokens // block_size], tokens % block_size


def _pool_rows(pool: PoolTensors, span: TokenSpan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block, row, block * block_size + row): where each token of the span lives."""
    block, row = token_locations(span, pool.block_size, pool.embeddings.device)
    return block, row, block * pool.block_size + row


def _flat(field: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, W] as [num_blocks * block_size, W] rows, bit view."""
    return _bits(field).view(field.shape[0] * field.shape[1], -1)


def gather_reference(
    pool: PoolTensors, span: TokenSpan, out: RowTensors, out_start: int = 0
) -> None:
    """Copy the span's tokens from the pool into rows `[out_start, out_start + count)` of `out`."""
    block, row, flat = _pool_rows(pool, span)
    end = out_start + span.count
    torch.index_select(_flat(pool.embeddings), 0, flat, out=_bits(out.embeddings[out_start:end]))
    out.fill_ids[out_start:end] = pool.fill_ids.view(-1)[flat]
    out.mrope_positions[:, out_start:end] = pool.mrope_positions[block, :, row].T
    if pool.deepstack is not None:
        torch.index_select(_flat(pool.deepstack), 0, flat, out=_bits(out.deepstack[out_start:end]))


def scatter_reference(
    rows: RowTensors, rows_start: int, pool: PoolTensors, span: TokenSpan
) -> None:
    """Copy rows `[rows_start, rows_start + count)` of `rows` into the span's places in the pool."""
    block, row, flat = _pool_rows(pool, span)
    end = rows_start + span.count
    _flat(pool.embeddings).index_copy_(0, flat, _bits(rows.embeddings[rows_start:end]))
    pool.fill_ids.view(-1)[flat] = rows.fill_ids[rows_start:end]
    pool.mrope_positions[block, :, row] = rows.mrope_positions[:, rows_start:end].T
    if pool.deepstack is not None:
        _flat(pool.deepstack).index_copy_(0, flat, _bits(rows.deepstack[rows_start:end]))


def pack_reference(
    pool: PoolTensors, spans: Sequence[TokenSpan], staging: torch.Tensor, layout: StagingLayout
) -> None:
    """Gather every span's tokens, all fields, into its segment of `staging`."""
    for i, span in enumerate(spans):
        gather_reference(pool, span, layout.views(staging, i))


def unpack_reference(
    staging: torch.Tensor, layout: StagingLayout, pool: PoolTensors, spans: Sequence[TokenSpan]
) -> None:
    """Scatter segment i of `staging` into the pool rows named by `spans[i]`."""
    for i, span in enumerate(spans):
        scatter_reference(layout.views(staging, i), 0, pool, span)


def unpack_to_rows_reference(
    staging: torch.Tensor,
    layout: StagingLayout,
    outputs: Sequence[RowTensors],
    out_starts: Sequence[int],
) -> None:
    """Copy segment i of `staging` into rows `[out_starts[i], out_starts[i] + counts[i])` of `outputs[i]`."""
    for i, (out, start) in enumerate(zip(outputs, out_starts, strict=True)):
        segment = layout.views(staging, i)
        end = start + layout.counts[i]
        _bits(out.embeddings[start:end]).copy_(_bits(segment.embeddings))
        out.fill_ids[start:end] = segment.fill_ids
        out.mrope_positions[:, start:end] = segment.mrope_positions
        if segment.deepstack is not None:
            _bits(out.deepstack[start:end]).copy_(_bits(segment.deepstack))
