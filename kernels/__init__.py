"""embxfer.kernels: the data plane. Knows tensors, not requests.

    pack(pool, spans, staging, layout)                 pool blocks   -> staging buffer
    pack_rows(rows, row_starts, staging, layout)       payload rows  -> staging buffer
    unpack(staging, layout, pool, spans)               staging       -> pool blocks
    unpack_to_rows(staging, layout, outputs, starts)   staging       -> payload rows
    gather(pool, span, out, out_start)                 pool blocks   -> payload rows
    gather_many(pool, spans, outputs, out_starts)      pool blocks   -> payload rows (batch)
    scatter(rows, rows_start, pool, span)              payload rows  -> pool blocks

Each call is one kernel launch for the whole batch on the current CUDA stream (on CPU
tensors: one torch call per field), and allocates nothing on the device in steady state
(see `workspace.py`). The staging byte layout is defined in `layout.py`. Everything is
validated on the host first: a bad block index, a destination row written twice, a
staging buffer too small or a shape, dtype or device mismatch is a `ValueError` and
nothing is launched. `embxfer.kernels.ops` has the same operations without the checks,
for callers that validate where they allocate (the runtime's hot path).

`backend`: None picks Triton for CUDA tensors and the torch reference for CPU tensors;
"torch" forces the reference; "triton" forces the kernel, which on CPU tensors needs
TRITON_INTERPRET=1 set before triton is first imported (the tests do this).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import checks, ops
from .layout import StagingLayout, staging_layout, staging_nbytes, tokens_that_fit
from .plan import BlockPlan, plan_spans
from .types import PoolTensors, RowTensors, TokenSpan, as_bits

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
    fields = _checked_pool(pool)
    checks.check_layout(layout, fields, [span.count for span in spans], staging)
    plan = checks.covered_blocks(pool, spans, what="pack", written=False)
    ops.pack(pool, plan, staging, layout, triton=_use_triton(backend, fields[3]))


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
    fields = _checked_pool(pool)
    checks.check_layout(layout, fields, [span.count for span in spans], staging)
    plan = checks.covered_blocks(pool, spans, what="unpack", written=True)
    ops.unpack(staging, layout, pool, plan, triton=_use_triton(backend, fields[3]))


def pack_rows(
    rows: Sequence[RowTensors],
    row_starts: Sequence[int],
    staging: torch.Tensor,
    layout: StagingLayout,
    *,
    backend: str | None = None,
) -> None:
    """Copy rows `[row_starts[i], row_starts[i] + counts[i])` of `rows[i]` (payload-shaped
    tensors, several segments may share one) into segment i of `staging`."""
    fields = _checked_rows(rows, row_starts, layout, staging, what="pack_rows rows")
    ops.pack_rows(rows, row_starts, staging, layout, triton=_use_triton(backend, fields[3]))


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
    fields = _checked_rows(outputs, out_starts, layout, staging, what="unpack_to_rows outputs")
    checks.check_disjoint_outputs(outputs, out_starts, layout.counts, what="unpack_to_rows")
    ops.unpack_to_rows(staging, layout, outputs, out_starts, triton=_use_triton(backend, fields[3]))


def gather(
    pool: PoolTensors,
    span: TokenSpan,
    out: RowTensors,
    out_start: int = 0,
    *,
    backend: str | None = None,
) -> None:
    """Read a span of pool tokens into contiguous rows."""
    gather_many(pool, [span], [out], [out_start], backend=backend)


def gather_many(
    pool: PoolTensors,
    spans: Sequence[TokenSpan],
    outputs: Sequence[RowTensors],
    out_starts: Sequence[int],
    *,
    backend: str | None = None,
) -> None:
    """Read span i's pool tokens into rows `[out_starts[i], out_starts[i] + count)` of
    `outputs[i]`, every span in one launch (the language side's read-out of the rounds
    that completed together)."""
    fields = _checked_pool(pool)
    _check_batch(spans, outputs, out_starts, what="gather")
    counts = [span.count for span in spans]
    for i, (out, start, count) in enumerate(zip(outputs, out_starts, counts, strict=True)):
        checks.check_rows(out, *fields, what=f"gather out[{i}]" if len(spans) > 1 else "gather out")
        checks.check_row_range(out, start, count, what=f"gather out[{i}]" if len(spans) > 1 else "gather out")
    checks.check_disjoint_outputs(outputs, out_starts, counts, what="gather")
    plan = checks.covered_blocks(pool, spans, what="gather", written=False)
    ops.gather(pool, plan, counts, outputs, out_starts, triton=_use_triton(backend, fields[3]))


def scatter(
    rows: RowTensors,
    rows_start: int,
    pool: PoolTensors,
    span: TokenSpan,
    *,
    backend: str | None = None,
) -> None:
    """Write contiguous rows into a span of pool tokens."""
    fields = _checked_pool(pool)
    checks.check_rows(rows, *fields, what="scatter rows")
    checks.check_row_range(rows, rows_start, span.count, what="scatter rows")
    plan = checks.covered_blocks(pool, [span], what="scatter", written=True)
    ops.scatter([rows], [rows_start], [span.count], pool, plan, triton=_use_triton(backend, fields[3]))


def _checked_pool(pool: PoolTensors) -> tuple[int, int, torch.dtype, torch.device]:
    checks.check_pool(pool)
    return checks.pool_fields(pool)


def _check_batch(spans_or_rows: Sequence, others: Sequence, starts: Sequence[int], *, what: str) -> None:
    if not len(spans_or_rows) == len(others) == len(starts):
        raise ValueError(
            f"{what}: {len(spans_or_rows)} segments, {len(others)} row sets and {len(starts)} starts; "
            "expected one of each per segment"
        )


def _checked_rows(rows: Sequence[RowTensors], starts: Sequence[int], layout: StagingLayout,
                  staging: torch.Tensor, *, what: str) -> tuple[int, int, torch.dtype, torch.device]:
    if len(rows) != layout.num_segments or len(starts) != layout.num_segments:
        raise ValueError(
            f"{what.split()[0]}: {len(rows)} row sets and {len(starts)} starts for {layout.num_segments} segments"
        )
    fields = (layout.dim, layout.deepstack_dim, layout.dtype, staging.device)
    checks.check_layout(layout, fields, layout.counts, staging)
    for i, (r, start, count) in enumerate(zip(rows, starts, layout.counts, strict=True)):
        checks.check_rows(r, *fields, what=f"{what}[{i}]")
        checks.check_row_range(r, start, count, what=f"{what}[{i}]")
    return fields


def _use_triton(backend: str | None, device: torch.device) -> bool:
    if backend is None:
        return device.type == "cuda"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected None, 'triton' or 'torch'")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' on {device} tensors needs TRITON_INTERPRET=1")
    return backend == "triton"


__all__ = [
    "BACKENDS",
    "BlockPlan",
    "PoolTensors",
    "RowTensors",
    "StagingLayout",
    "TokenSpan",
    "as_bits",
    "gather",
    "gather_many",
    "ops",
    "pack",
    "pack_rows",
    "plan_spans",
    "scatter",
    "staging_layout",
    "staging_nbytes",
    "tokens_that_fit",
    "unpack",
    "unpack_to_rows",
]
