"""The data-plane operations without checks: one launch (CUDA) or one torch call per field
(CPU) per batch. Callers guarantee what the public API in `embxfer.kernels` checks:
shapes, dtypes, devices, block indices in range (validated where they were allocated),
no destination row written twice, staging buffers large enough. The runtime calls these
on its hot path; everyone else should call the checked functions.

Plans (`BlockPlan`) say where pool tokens are; `plan_spans` makes one from `TokenSpan`s.

Launch path. On CUDA, `pack`, `unpack` (all segments), `pack_addressed_rows`,
`unpack_addressed_rows` and `gather_addressed` go through the device's `Launcher`
(`launcher_for`, kernels/launch.py): a route per (operation, sides, layout) keeps the
launch's shape, its bound kernel and its table's constant columns, so a message costs a
few microseconds of host time (bench/results/kernels-NOTES.md). Callers that keep the
same pool, staging buffers and layout objects (the runtime caches its layouts per counts)
get the cached routes; `Launcher(device, mode="graph")` replays CUDA graphs instead of
launching. The other operations build their launch per call (`copy_segments`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import reference
from .launch import Launcher, launcher_for, launcher_of
from .layout import StagingLayout
from .plan import BlockPlan
from .types import PoolTensors, RowTensors

__all__ = [
    "Launcher", "addressed_rows_side", "gather", "gather_addressed", "launcher_for", "pack", "pack_addressed_rows",
    "pack_rows", "row_addresses", "rows_side", "scatter", "staging_side", "unpack", "unpack_addressed_rows",
    "unpack_to_rows",
]


def pack(pool: PoolTensors, plan: BlockPlan, staging: torch.Tensor, layout: StagingLayout, *,
         triton: bool | None = None) -> None:
    """Pool tokens of each segment -> the segment's rows of `staging`."""
    if _triton(triton, staging):
        launcher_of(staging).pack(pool, plan, staging, layout)
    else:
        reference.pack_reference(pool, plan, staging, layout)


def unpack(staging: torch.Tensor, layout: StagingLayout, pool: PoolTensors, plan: BlockPlan, *,
           segments: Sequence[int] | None = None, triton: bool | None = None) -> None:
    """The segments of `staging` -> their pool rows; with `segments`, only those (by index,
    ascending; `plan` then covers only them): the others are skipped."""
    if _triton(triton, staging):
        from .triton_copy import PoolSide, copy_segments

        if segments is None:
            launcher_of(staging).unpack(staging, layout, pool, plan)
            return
        side, counts = _some_segments(staging, layout, segments)
        copy_segments(counts, side, PoolSide(pool, plan), **_widths(layout))
    else:
        reference.unpack_reference(staging, layout, pool, plan, segments)


_ADDRESS_FIELDS = ("emb_addresses", "ds_addresses", "fill_addresses", "mrope_addresses", "mrope_strides")


def _some_segments(staging: torch.Tensor, layout: StagingLayout, segments: Sequence[int]):
    """The staging side of only `segments` (by index), and their counts."""
    index = np.asarray(segments, dtype=np.int64)
    side = staging_side(staging, layout)
    side = side._replace(columns=None, **{name: getattr(side, name)[index] for name in _ADDRESS_FIELDS})
    return side, np.asarray(layout.counts, dtype=np.int64)[index]


def pack_rows(rows: Sequence[RowTensors], row_starts: Sequence[int], staging: torch.Tensor,
              layout: StagingLayout, *, triton: bool | None = None) -> None:
    """Rows `[row_starts[i], row_starts[i] + counts[i])` of `rows[i]` -> segment i of `staging`."""
    if _triton(triton, staging):
        from .triton_copy import copy_segments

        src = rows_side(rows, row_starts, layout.counts, layout.element_size)
        copy_segments(layout.counts, src, staging_side(staging, layout), **_widths(layout))
    else:
        reference.pack_rows_reference(rows, row_starts, staging, layout)


def unpack_to_rows(staging: torch.Tensor, layout: StagingLayout, outputs: Sequence[RowTensors],
                   out_starts: Sequence[int], *, segments: Sequence[int] | None = None,
                   triton: bool | None = None) -> None:
    """Segment i of `staging` -> rows `[out_starts[i], out_starts[i] + counts[i])` of `outputs[i]`;
    with `segments` (indices, ascending), only those segments, `outputs` and `out_starts`
    then listing theirs."""
    if _triton(triton, staging):
        from .triton_copy import copy_segments

        side = staging_side(staging, layout)
        counts = layout.counts
        if segments is not None:
            index = np.asarray(segments, dtype=np.int64)
            side = side._replace(columns=None, **{name: getattr(side, name)[index] for name in _ADDRESS_FIELDS})
            counts = np.asarray(counts, dtype=np.int64)[index]
        dst = rows_side(outputs, out_starts, counts, layout.element_size)
        copy_segments(counts, side, dst, **_widths(layout))
    else:
        reference.unpack_to_rows_reference(staging, layout, outputs, out_starts, segments)


def unpack_together(staging: torch.Tensor, layout: StagingLayout, whole: RowTensors) -> None:
    """Every segment of `staging`, in order, -> `whole`: the rows of one allocation per field
    that its requests' outputs are views of (`BlockPool.empty_rows_together`; CPU tensors:
    on a GPU, `unpack_to_rows` with the views' addresses is one launch already)."""
    reference.unpack_together_reference(staging, layout, whole)


def gather(pool: PoolTensors, plan: BlockPlan, counts: Sequence[int], outputs: Sequence[RowTensors],
           out_starts: Sequence[int], *, triton: bool | None = None) -> None:
    """Pool tokens of segment i -> rows `[out_starts[i], out_starts[i] + counts[i])` of `outputs[i]`."""
    if _triton(triton, pool.embeddings):
        from .triton_copy import PoolSide, copy_segments

        element = pool.embeddings.element_size()
        dst = rows_side(outputs, out_starts, counts, element)
        copy_segments(counts, PoolSide(pool, plan), dst, **_pool_widths(pool))
    else:
        reference.gather_reference(pool, plan, counts, outputs, out_starts)


def scatter(rows: Sequence[RowTensors], row_starts: Sequence[int], counts: Sequence[int], pool: PoolTensors,
            plan: BlockPlan, *, triton: bool | None = None) -> None:
    """Rows `[row_starts[i], row_starts[i] + counts[i])` of `rows[i]` -> segment i's pool rows."""
    if _triton(triton, pool.embeddings):
        from .triton_copy import PoolSide, copy_segments

        element = pool.embeddings.element_size()
        src = rows_side(rows, row_starts, counts, element)
        copy_segments(counts, src, PoolSide(pool, plan), **_pool_widths(pool))
    else:
        reference.scatter_reference(rows, row_starts, counts, pool, plan)


def _triton(flag: bool | None, tensor: torch.Tensor) -> bool:
    return tensor.is_cuda if flag is None else flag


def _ints(values: np.ndarray | Sequence[int]) -> list[int]:
    return values if type(values) is list else np.asarray(values).tolist()


def _widths(layout: StagingLayout) -> dict[str, int]:
    return {"dim": layout.dim, "deepstack_dim": layout.deepstack_dim, "element_size": layout.element_size}


def _pool_widths(pool: PoolTensors) -> dict[str, int]:
    deepstack_dim = 0 if pool.deepstack is None else pool.deepstack.shape[2]
    return {"dim": pool.embeddings.shape[2], "deepstack_dim": deepstack_dim,
            "element_size": pool.embeddings.element_size()}


def staging_side(staging: torch.Tensor, layout: StagingLayout):
    """A staging buffer as the kernel's linear side (made once per layout and buffer)."""
    return layout.per_buffer(staging, "side", lambda buffer: _make_staging_side(buffer, layout))


def _make_staging_side(staging: torch.Tensor, layout: StagingLayout):
    from .triton_copy import LinearSide

    base = staging.data_ptr()
    offsets = layout.offset_arrays
    return LinearSide(
        words_base=staging,
        ints_base=staging,
        emb_addresses=base + offsets[0],
        ds_addresses=base + offsets[1],
        fill_addresses=base + offsets[2],
        mrope_addresses=base + offsets[3],
        mrope_strides=offsets[4],
        staging=True,
        columns={},
    )


def rows_side(rows: Sequence[RowTensors], starts: Sequence[int], counts: Sequence[int], element_size: int):
    """Payload-shaped row tensors (one per segment, possibly shared) as the kernel's linear side."""
    from .triton_copy import LinearSide

    first = next((r for r, n in zip(rows, counts, strict=True) if n), rows[0])
    columns = np.zeros((5, len(rows)), dtype=np.int64)
    for i, (r, start) in enumerate(zip(rows, starts, strict=True)):
        emb = r.embeddings
        columns[0, i] = emb.data_ptr() + start * emb.shape[1] * element_size
        if r.deepstack is not None:
            columns[1, i] = r.deepstack.data_ptr() + start * r.deepstack.shape[1] * element_size
        columns[2, i] = r.fill_ids.data_ptr() + 4 * start
        columns[3, i] = r.mrope_positions.data_ptr() + 4 * start
        columns[4, i] = r.mrope_positions.stride(0)
    return LinearSide(first.embeddings, first.fill_ids, *columns)


def row_addresses(rows: RowTensors) -> tuple[int, int, int, int, int]:
    """(embeddings, deepstack or 0, fill_ids, mrope t-row) base addresses of payload-shaped
    rows and their mrope row stride: compute once per tensor set, then address any of its
    row ranges with `addressed_rows_side`."""
    return (rows.embeddings.data_ptr(), 0 if rows.deepstack is None else rows.deepstack.data_ptr(),
            rows.fill_ids.data_ptr(), rows.mrope_positions.data_ptr(), rows.mrope_positions.stride(0))


def together_addresses(whole: RowTensors, counts: Sequence[int]) -> np.ndarray:
    """int64 [S, 5]: the `row_addresses` of each view that `BlockPool.empty_rows_together`
    cuts from `whole` for `counts`, from the whole's addresses and the counts' prefix sums
    (numpy, no per-view Python): view i starts `sum(counts[:i])` rows in, its mrope
    positions a contiguous `[3, counts[i]]` block of the whole's flat buffer."""
    counts = np.asarray(counts, dtype=np.int64)
    before = np.cumsum(counts) - counts
    embeddings, deepstack, fill_ids, mrope, _ = row_addresses(whole)
    element = whole.embeddings.element_size()
    out = np.empty((len(counts), 5), dtype=np.int64)
    out[:, 0] = embeddings + before * (whole.embeddings.shape[1] * element)
    out[:, 1] = 0 if whole.deepstack is None else deepstack + before * (whole.deepstack.shape[1] * element)
    out[:, 2] = fill_ids + 4 * before
    out[:, 3] = mrope + 12 * before  # int32, three rows of counts[i] each
    out[:, 4] = counts
    return out


def addressed_rows_side(anchor: RowTensors, addresses: np.ndarray, starts: np.ndarray, dim: int,
                        deepstack_dim: int, element_size: int):
    """Like `rows_side`, from an int64 [S, 5] table of `row_addresses` and the first row of
    each segment: whole-batch numpy, no per-segment Python. `anchor` is any live row
    tensor set on the device (the kernel addresses the others relative to it)."""
    from .triton_copy import LinearSide

    return LinearSide(
        anchor.embeddings,
        anchor.fill_ids,
        addresses[:, 0] + starts * (dim * element_size),
        addresses[:, 1] + starts * (deepstack_dim * element_size),
        addresses[:, 2] + 4 * starts,
        addresses[:, 3] + 4 * starts,
        addresses[:, 4],
    )


def pack_addressed_rows(anchor: RowTensors, addresses: np.ndarray | Sequence[tuple[int, ...]],
                        starts: np.ndarray | Sequence[int], rows: Sequence[RowTensors], staging: torch.Tensor,
                        layout: StagingLayout, *, triton: bool | None = None) -> None:
    """`pack_rows` for callers that keep each payload's `row_addresses`: on CUDA the
    segments are addressed from the table (no per-segment Python); on CPU `rows` are used.
    `addresses`: an int64 [S, 5] array, or the S tuples themselves; `starts`: an int64
    array or a list (a message of one segment then builds no array at all)."""
    if _triton(triton, staging):
        launcher_of(staging).pack_addressed_rows(addresses, starts, staging, layout)
    else:
        reference.pack_rows_reference(rows, _ints(starts), staging, layout)


def unpack_addressed_rows(staging: torch.Tensor, layout: StagingLayout, anchor: RowTensors,
                          addresses: np.ndarray | Sequence[tuple[int, ...]], starts: np.ndarray | Sequence[int],
                          rows: Sequence[RowTensors], *, segments: Sequence[int] | None = None,
                          triton: bool | None = None) -> None:
    """`pack_addressed_rows` in reverse (the same forms of `addresses` and `starts`):
    segment i of `staging` -> rows `[starts[i], starts[i] + counts[i])` of the row tensors
    whose `row_addresses` are `addresses[i]` (`rows[i]` on CPU), one launch; for rounds
    whose outputs exist when their message lands, which then skip the landing blocks and
    the read-out.

    With `segments`, only those segments (by index, ascending) are copied, and
    `addresses`, `starts` and `rows` cover only them. `anchor`: any live row tensor set
    on the device (kept for the signature's symmetry with `pack_addressed_rows`: the
    launcher reaches the rows from the staging buffer's address)."""
    if _triton(triton, staging):
        if segments is None:
            launcher_of(staging).unpack_addressed_rows(staging, layout, addresses, starts)
            return
        from .triton_copy import copy_segments

        side, counts = _some_segments(staging, layout, segments)
        dst = addressed_rows_side(anchor, np.asarray(addresses, dtype=np.int64), np.asarray(starts, dtype=np.int64),
                                  layout.dim, layout.deepstack_dim, layout.element_size)
        copy_segments(counts, side, dst, **_widths(layout))
    else:
        reference.unpack_to_rows_reference(staging, layout, rows, _ints(starts), segments)


def gather_addressed(pool: PoolTensors, plan: BlockPlan, counts: Sequence[int], outputs: Sequence[RowTensors],
                     addresses: np.ndarray, out_starts: np.ndarray, *, triton: bool | None = None) -> None:
    """`gather` for callers that keep each output's `row_addresses`: on CUDA the outputs
    are addressed from the table (no per-output Python); on CPU `outputs` are used."""
    if _triton(triton, pool.embeddings):
        if sum(counts):
            launcher_of(pool.embeddings).gather_addressed(pool, plan, counts, addresses, out_starts)
    else:
        reference.gather_reference(pool, plan, counts, outputs, out_starts.tolist())
