"""embxfer.kernels: the data plane. Knows tensors, not requests.

    pack(pool, spans, staging, layout)              pool blocks   -> staging buffer
    unpack(staging, layout, pool, spans)            staging       -> pool blocks
    unpack_to_rows(staging, layout, outputs, starts) staging      -> payload rows
    gather(pool, span, out, out_start)              pool blocks   -> payload rows
    scatter(rows, rows_start, pool, span)           payload rows  -> pool blocks

Each call is one kernel launch for the whole batch, on the current CUDA stream, and
allocates nothing on the device in steady state (see `workspace.py`). The staging
byte layout is defined in `layout.py`. Everything is validated on the host first: a bad
block index, a destination row written twice, a staging buffer too small or a shape,
dtype or device mismatch is a `ValueError` and nothing is launched.

`backend`: None picks Triton for CUDA tensors and the torch reference for CPU tensors;
"torch" forces the reference; "triton" forces the kernel, which on CPU tensors needs
TRITON_INTERPRET=1 set before triton is first imported (the tests do this).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from . import checks
from .layout import StagingLayout, staging_layout, staging_nbytes
from .reference import (
    gather_reference,
    pack_reference,
    scatter_reference,
    unpack_reference,
    unpack_to_rows_reference,
)
from .types import PoolTensors, RowTensors, TokenSpan

BACKENDS = ("triton", "torch")


def pack(
    pool: PoolTensors,
    spans: Sequence[TokenSpan],
    staging: torch.Tensor,
    layout: StagingLayout,
    *,
    backend: str | None = None,
) -> None:
    """Gather every field of `spans[i]`'s tokens into segment i of `staging`."""
    _between_staging_and_pool(pool, spans, staging, layout, backend, into_pool=False)


def unpack(
    staging: torch.Tensor,
    layout: StagingLayout,
    pool: PoolTensors,
    spans: Sequence[TokenSpan],
    *,
    backend: str | None = None,
) -> None:
    """Scatter segment i of `staging` into the pool rows of `spans[i]` (which may start
    mid-block); no pool row may be written twice in one batch."""
    _between_staging_and_pool(pool, spans, staging, layout, backend, into_pool=True)


def _between_staging_and_pool(
    pool: PoolTensors,
    spans: Sequence[TokenSpan],
    staging: torch.Tensor,
    layout: StagingLayout,
    backend: str | None,
    *,
    into_pool: bool,
) -> None:
    """pack (pool -> staging) and unpack (staging -> pool): the same checks and the same
    kernel, in opposite directions."""
    what = "unpack" if into_pool else "pack"
    checks.check_pool(pool)
    fields = checks.pool_fields(pool)
    checks.check_layout(layout, fields, [span.count for span in spans], staging)
    plan = checks.covered_blocks(pool, spans, what=what, written=into_pool)
    if _use_triton(backend, fields[3]):
        from .triton_copy import PoolSide, copy_segments

        pool_side, staging_side = PoolSide(pool, plan), _staging_side(staging, layout)
        src, dst = (staging_side, pool_side) if into_pool else (pool_side, staging_side)
        copy_segments(layout.counts, src, dst, **_widths(layout))
    elif into_pool:
        unpack_reference(staging, layout, pool, spans)
    else:
        pack_reference(pool, spans, staging, layout)


def unpack_to_rows(
    staging: torch.Tensor,
    layout: StagingLayout,
    outputs: Sequence[RowTensors],
    out_starts: Sequence[int],
    *,
    backend: str | None = None,
) -> None:
    """Copy segment i of `staging` into rows `[out_starts[i], out_starts[i] + counts[i])`
    of `outputs[i]` (payload-shaped tensors; several segments may share one output)."""
    if len(outputs) != layout.num_segments or len(out_starts) != layout.num_segments:
        raise ValueError(
            f"unpack_to_rows: {len(outputs)} outputs and {len(out_starts)} starts for "
            f"{layout.num_segments} segments"
        )
    device = staging.device
    fields = (layout.dim, layout.deepstack_dim, layout.dtype, device)
    checks.check_layout(layout, fields, layout.counts, staging)
    for i, (out, start, count) in enumerate(zip(outputs, out_starts, layout.counts, strict=True)):
        checks.check_rows(out, *fields, what=f"unpack_to_rows outputs[{i}]")
        checks.check_row_range(out, start, count, what=f"unpack_to_rows outputs[{i}]")
    checks.check_disjoint_outputs(outputs, out_starts, layout.counts, what="unpack_to_rows")
    if _use_triton(backend, device):
        from .triton_copy import copy_segments

        copy_segments(
            layout.counts,
            _staging_side(staging, layout),
            _rows_side(outputs, out_starts, layout.counts, layout.element_size),
            **_widths(layout),
        )
    else:
        unpack_to_rows_reference(staging, layout, outputs, out_starts)


def gather(
    pool: PoolTensors,
    span: TokenSpan,
    out: RowTensors,
    out_start: int = 0,
    *,
    backend: str | None = None,
) -> None:
    """Read a span of pool tokens into contiguous rows (the language side's final read)."""
    _between_rows_and_pool(pool, span, out, out_start, backend, into_pool=False)


def scatter(
    rows: RowTensors,
    rows_start: int,
    pool: PoolTensors,
    span: TokenSpan,
    *,
    backend: str | None = None,
) -> None:
    """Write contiguous rows into a span of pool tokens (the encoder side's submit)."""
    _between_rows_and_pool(pool, span, rows, rows_start, backend, into_pool=True)


def _between_rows_and_pool(
    pool: PoolTensors,
    span: TokenSpan,
    rows: RowTensors,
    rows_start: int,
    backend: str | None,
    *,
    into_pool: bool,
) -> None:
    """gather (pool -> rows) and scatter (rows -> pool), one span, one launch."""
    what = "scatter" if into_pool else "gather"
    label = f"{what} rows" if into_pool else f"{what} out"
    checks.check_pool(pool)
    fields = checks.pool_fields(pool)
    checks.check_rows(rows, *fields, what=label)
    checks.check_row_range(rows, rows_start, span.count, what=label)
    plan = checks.covered_blocks(pool, [span], what=what, written=into_pool)
    if _use_triton(backend, fields[3]):
        from .triton_copy import PoolSide, copy_segments

        element = pool.embeddings.element_size()
        pool_side = PoolSide(pool, plan)
        rows_side = _rows_side([rows], [rows_start], [span.count], element)
        src, dst = (rows_side, pool_side) if into_pool else (pool_side, rows_side)
        copy_segments([span.count], src, dst, dim=fields[0], deepstack_dim=fields[1], element_size=element)
    elif into_pool:
        scatter_reference(rows, rows_start, pool, span)
    else:
        gather_reference(pool, span, rows, rows_start)


def _use_triton(backend: str | None, device: torch.device) -> bool:
    if backend is None:
        return device.type == "cuda"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected None, 'triton' or 'torch'")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' on {device} tensors needs TRITON_INTERPRET=1")
    return backend == "triton"


def _widths(layout: StagingLayout) -> dict[str, int]:
    return {
        "dim": layout.dim,
        "deepstack_dim": layout.deepstack_dim,
        "element_size": layout.element_size,
    }


def _staging_side(staging: torch.Tensor, layout: StagingLayout):
    from .triton_copy import LinearSide

    used = staging[: layout.nbytes]
    base = staging.data_ptr()
    offsets = layout.offset_arrays
    return LinearSide(
        words_base=used,
        ints_base=used.view(torch.int32),
        emb_addresses=base + offsets[0],
        ds_addresses=base + offsets[1],
        fill_addresses=base + offsets[2],
        mrope_addresses=base + offsets[3],
        mrope_strides=offsets[4],
        staging=True,
    )


def _rows_side(
    outputs: Sequence[RowTensors], starts: Sequence[int], counts: Sequence[int], element_size: int
):
    from .triton_copy import LinearSide

    live = [i for i, count in enumerate(counts) if count] or [0]
    first = outputs[live[0]]
    columns = np.zeros((5, len(outputs)), dtype=np.int64)
    for i, (out, start) in enumerate(zip(outputs, starts, strict=True)):
        dim = out.embeddings.shape[1]
        columns[0, i] = out.embeddings.data_ptr() + start * dim * element_size
        if out.deepstack is not None:
            columns[1, i] = out.deepstack.data_ptr() + start * out.deepstack.shape[1] * element_size
        columns[2, i] = out.fill_ids.data_ptr() + 4 * start
        columns[3, i] = out.mrope_positions.data_ptr() + 4 * start
        columns[4, i] = out.mrope_positions.stride(0)
    return LinearSide(first.embeddings, first.fill_ids, *columns)


__all__ = [
    "BACKENDS",
    "PoolTensors",
    "RowTensors",
    "StagingLayout",
    "TokenSpan",
    "gather",
    "pack",
    "scatter",
    "staging_layout",
    "staging_nbytes",
    "unpack",
    "unpack_to_rows",
]
