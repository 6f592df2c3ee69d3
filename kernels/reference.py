"""Plain-torch data plane: the CPU path and the oracle the Triton kernels are tested against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import StagingLayout
from .types import PoolTensors, RowTensors, TokenSpan

# Copies go through same-width integer views: they move bits (a NaN payload stays that
# NaN), and torch's CPU index kernels on bf16/fp16 views slow down by ~100x on NaN and
# denormal patterns, which synthetic and real embeddings both contain. Rows that are
# contiguous in the pool are moved as slices (memcpy), not through index kernels.
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


def _runs(span: TokenSpan, block_size: int) -> list[tuple[int, int, int]]:
    """(first pool row, rows, offset in the span) of each stretch of the span that is
    contiguous in the pool viewed as `[num_blocks * block_size]` rows. Consecutive block
    indices merge into one stretch, so an unfragmented span is a single memcpy."""
    runs: list[tuple[int, int, int]] = []
    token, end = span.start, span.start + span.count
    while token < end:
        row = token % block_size
        count = min(block_size - row, end - token)
        first = int(span.blocks[token // block_size]) * block_size + row
        if runs and runs[-1][0] + runs[-1][1] == first:
            runs[-1] = (runs[-1][0], runs[-1][1] + count, runs[-1][2])
        else:
            runs.append((first, count, token - span.start))
        token += count
    return runs


def _flat(field: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, ...] as [num_blocks * block_size, W] rows, bit view."""
    return _bits(field).view(field.shape[0] * field.shape[1], -1)


def gather_reference(
    pool: PoolTensors, span: TokenSpan, out: RowTensors, out_start: int = 0
) -> None:
    """Copy the span's tokens from the pool into rows `[out_start, out_start + count)` of `out`."""
    fields = [(_flat(pool.embeddings), _bits(out.embeddings)), (_flat(pool.fill_ids), out.fill_ids.view(-1, 1))]
    if pool.deepstack is not None:
        fields.append((_flat(pool.deepstack), _bits(out.deepstack)))
    for first, count, offset in _runs(span, pool.block_size):
        for pool_rows, out_rows in fields:
            out_rows[out_start + offset : out_start + offset + count].copy_(pool_rows[first : first + count])
    block, row = token_locations(span, pool.block_size, pool.embeddings.device)
    out.mrope_positions[:, out_start : out_start + span.count] = pool.mrope_positions[block, :, row].T


def scatter_reference(
    rows: RowTensors, rows_start: int, pool: PoolTensors, span: TokenSpan
) -> None:
    """Copy rows `[rows_start, rows_start + count)` of `rows` into the span's places in the pool."""
    fields = [(_flat(pool.embeddings), _bits(rows.embeddings)), (_flat(pool.fill_ids), rows.fill_ids.view(-1, 1))]
    if pool.deepstack is not None:
        fields.append((_flat(pool.deepstack), _bits(rows.deepstack)))
    for first, count, offset in _runs(span, pool.block_size):
        for pool_rows, source_rows in fields:
            pool_rows[first : first + count].copy_(source_rows[rows_start + offset : rows_start + offset + count])
    block, row = token_locations(span, pool.block_size, pool.embeddings.device)
    pool.mrope_positions[block, :, row] = rows.mrope_positions[:, rows_start : rows_start + span.count].T


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
