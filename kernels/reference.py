"""Plain-torch data plane: the CPU path, and the oracle the Triton kernels are tested against.

Each operation is a handful of whole-batch torch calls (one per field), whatever the
number of segments: the staging layout keeps each field of a batch in one region
(`layout.py`), and pool rows are addressed through one flat row index per batch
(`plan_rows`). On a CPU, a torch call costs microseconds of fixed overhead, so a
per-segment or per-block loop would cost more than the copy itself for small requests.

Index copies go through same-width integer views: they move bits (a NaN payload stays
that NaN), and torch's CPU index kernels on bf16/fp16 slow down by ~100x on NaN and
denormal patterns, which synthetic and real embeddings both contain. Plain same-dtype
copies (`cat`, `copy_`) move bits as they are and need no views, and so does
`_foreach_copy_` on a CPU; on CUDA it computes in float32 (torch's "opmath" for
half-precision foreach ops), which turns every 16-bit NaN into the canonical 0x7FFF, so
there its floating fields go through the integer views too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .layout import StagingLayout
from .plan import BlockPlan
from .types import PoolTensors, RowTensors, as_bits


def plan_rows(plan: BlockPlan, counts: np.ndarray, block_size: int) -> np.ndarray:
    """The flat pool row (block * block_size + row) of every token of the batch, segment
    after segment: int64 [sum(counts)]."""
    if len(counts) == 1:  # one segment (the common read-out): four operations
        position = np.arange(plan.first_rows[0], plan.first_rows[0] + int(counts[0]), dtype=np.int64)
        return plan.blocks[position // block_size] * block_size + position % block_size
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    segment = np.repeat(np.arange(counts.shape[0]), counts)
    first_token = np.cumsum(counts) - counts
    position = plan.first_rows[segment] + (np.arange(total) - first_token[segment])
    first_block = np.cumsum(plan.lengths) - plan.lengths
    blocks = plan.blocks[first_block[segment] + position // block_size]
    return blocks * block_size + position % block_size


class _PoolRows:
    """A pool's fields as flat rows (bit views): `[num_blocks * block_size, W]`, and the
    mrope positions flat, addressed by `mrope_index`. Made once per pool (`_pool_rows`)."""

    def __init__(self, pool: PoolTensors) -> None:
        blocks, block_size = pool.embeddings.shape[:2]
        self.block_size = block_size
        self.embeddings = as_bits(pool.embeddings).view(blocks * block_size, -1)
        self.fill_ids = pool.fill_ids.view(-1)
        self.deepstack = None if pool.deepstack is None else as_bits(pool.deepstack).view(blocks * block_size, -1)
        self.mrope = pool.mrope_positions.view(-1)

    def indices(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` as a tensor, and the flat mrope element of every (axis, row) as [3 * n]
        (axis-major: all t, then all h, then all w), built in numpy and moved once."""
        n = rows.shape[0]
        both = np.empty(4 * n, dtype=np.int64)
        both[:n] = rows
        base = both[n : 2 * n]
        np.floor_divide(rows, self.block_size, out=base)
        base *= 3 * self.block_size
        base += rows % self.block_size
        both[2 * n : 3 * n] = base + self.block_size
        both[3 * n :] = base + 2 * self.block_size
        both = torch.from_numpy(both).to(self.embeddings.device)
        return both[:n], both[n:]


_POOL_ROWS: dict[tuple, _PoolRows] = {}


def _pool_rows(pool: PoolTensors) -> _PoolRows:
    """The flat views of `pool`, cached (a few pools: they keep the pool alive)."""
    key = tuple((t.data_ptr(), t.shape, t.dtype) for t in pool if t is not None)
    flat = _POOL_ROWS.get(key)
    if flat is None:
        if len(_POOL_ROWS) >= 4:
            _POOL_ROWS.pop(next(iter(_POOL_ROWS)))
        flat = _POOL_ROWS[key] = _PoolRows(pool)
    return flat


def pack_reference(
    pool: PoolTensors, plan: BlockPlan, staging: torch.Tensor, layout: StagingLayout
) -> None:
    """Gather every segment's tokens, all fields, from the pool into `staging`."""
    _pool_to_rows(pool, plan, layout.counts, layout._regions(staging))


def unpack_reference(
    staging: torch.Tensor, layout: StagingLayout, pool: PoolTensors, plan: BlockPlan,
    segments: Sequence[int] | None = None,
) -> None:
    """Scatter every segment of `staging` (or only `segments`, ascending; `plan` then
    covers only them) into its pool rows."""
    regions = layout._regions(staging)
    counts = layout.counts
    if segments is not None:
        counts = [layout.counts[i] for i in segments]
        tokens = torch.cat([torch.arange(layout.token_offsets[i], layout.token_offsets[i] + layout.counts[i])
                            for i in segments]).to(staging.device)
        regions = RowTensors(as_bits(regions.embeddings)[tokens], regions.fill_ids[tokens],
                             regions.mrope_positions[:, tokens],
                             None if regions.deepstack is None else as_bits(regions.deepstack)[tokens])
    _rows_to_pool(regions, pool, plan, counts)


def gather_reference(
    pool: PoolTensors,
    plan: BlockPlan,
    counts: Sequence[int],
    outputs: Sequence[RowTensors],
    out_starts: Sequence[int],
) -> None:
    """Copy segment i's pool tokens into rows `[out_starts[i], out_starts[i] + counts[i])`
    of `outputs[i]`: the indices of the whole batch are built once, then each output
    takes one indexed read per field straight into its rows."""
    if len(outputs) == 1:
        out, start, n = outputs[0], out_starts[0], int(counts[0])
        _pool_to_rows(pool, plan, counts, _row_slice(out, start, n))
        return
    block_size = pool.embeddings.shape[1]
    rows_np = plan_rows(plan, counts, block_size)
    device = pool.embeddings.device
    rows = torch.from_numpy(rows_np).to(device)
    mrope = torch.from_numpy(_segment_mrope_index(rows_np, counts, block_size)).to(device)
    flat = _pool_rows(pool)
    first = 0
    for out, start, n in zip(outputs, out_starts, counts, strict=True):
        if n:
            index = rows[first : first + n]
            end = start + n
            whole = start == 0 and n == out.embeddings.shape[0]  # the common case: no slicing
            torch.index_select(flat.embeddings, 0, index, out=as_bits(out.embeddings if whole else out.embeddings[start:end]))
            torch.index_select(flat.fill_ids, 0, index, out=out.fill_ids if whole else out.fill_ids[start:end])
            positions = out.mrope_positions if whole else out.mrope_positions[:, start:end]
            if positions.is_contiguous():
                torch.index_select(flat.mrope, 0, mrope[3 * first : 3 * (first + n)], out=positions.view(-1))
            else:
                positions.copy_(flat.mrope[mrope[3 * first : 3 * (first + n)]].view(3, n))
            if flat.deepstack is not None:
                torch.index_select(flat.deepstack, 0, index, out=as_bits(out.deepstack)[start:end])
        first += n


def _segment_mrope_index(rows: np.ndarray, counts: Sequence[int], block_size: int) -> np.ndarray:
    """Flat pool mrope element of every (segment, axis, token), each segment's [3, n] block
    contiguous: segment s with first token f and n tokens owns [3f, 3f + 3n)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = rows.shape[0]
    segment = np.repeat(np.arange(counts.shape[0]), counts)
    first = (np.cumsum(counts) - counts)[segment]
    token = np.arange(total) - first
    base = (rows // block_size) * (3 * block_size) + rows % block_size
    out = np.empty(3 * total, dtype=np.int64)
    n = counts[segment]
    for axis in range(3):
        out[3 * first + axis * n + token] = base + axis * block_size
    return out


def scatter_reference(
    rows: Sequence[RowTensors],
    row_starts: Sequence[int],
    counts: Sequence[int],
    pool: PoolTensors,
    plan: BlockPlan,
) -> None:
    """Copy rows `[row_starts[i], row_starts[i] + counts[i])` of `rows[i]` into segment i's
    pool rows."""
    flat = _pool_rows(pool)
    index, mrope = flat.indices(plan_rows(plan, counts, pool.embeddings.shape[1]))
    total = index.shape[0]
    first = 0
    for source, start, n in zip(rows, row_starts, counts, strict=True):
        if n:
            part = mrope.view(3, total)[:, first : first + n].reshape(-1)
            _index_copy(flat, index[first : first + n], part, _row_slice(source, start, n))
        first += n


def pack_rows_reference(
    rows: Sequence[RowTensors], row_starts: Sequence[int], staging: torch.Tensor, layout: StagingLayout
) -> None:
    """Copy rows `[row_starts[i], row_starts[i] + counts[i])` of `rows[i]` into segment i of
    `staging`: one `torch.cat` per field for the whole batch."""
    regions = layout._regions(staging)
    parts = [_row_slice(r, s, n) for r, s, n in zip(rows, row_starts, layout.counts, strict=True) if n]
    if not parts:
        return
    # Same-dtype copies move bits (only the index kernels need the integer views).
    torch.cat([p.embeddings for p in parts], out=regions.embeddings)
    torch.cat([p.fill_ids for p in parts], out=regions.fill_ids)
    torch.cat([p.mrope_positions for p in parts], dim=1, out=regions.mrope_positions)
    if regions.deepstack is not None:
        torch.cat([p.deepstack for p in parts], out=regions.deepstack)


def unpack_to_rows_reference(
    staging: torch.Tensor,
    layout: StagingLayout,
    outputs: Sequence[RowTensors],
    out_starts: Sequence[int],
    segments: Sequence[int] | None = None,
) -> None:
    """Copy segment i of `staging` into rows `[out_starts[i], out_starts[i] + counts[i])` of
    `outputs[i]` (with `segments`: only those, `outputs` and `out_starts` listing theirs)."""
    regions = layout._regions(staging)
    counts = layout.counts
    # torch.split makes every segment's view in one call, and one _foreach_copy_ per field
    # copies them all (same dtype on a CPU: bits move as they are, no integer views needed;
    # on CUDA the floating fields need them, see the module docstring): per segment, only
    # the target's views are made in Python, none when it fills its target.
    chosen = range(len(counts)) if segments is None else segments
    deep = regions.deepstack is not None
    embeddings, fill_ids, mrope, deepstack, used = [], [], [], [], []
    for (e, f, m, d), start, index in zip(outputs, out_starts, chosen, strict=True):
        n = counts[index]
        if not n:
            continue
        if start or n != f.shape[0]:
            end = start + n
            e, f, m = e[start:end], f[start:end], m[:, start:end]
            d = d[start:end] if deep else None
        embeddings.append(e)
        fill_ids.append(f)
        mrope.append(m)
        if deep:
            deepstack.append(d)
        used.append(index)
    if not used:
        return
    every = len(used) == len(counts)
    fields = [(embeddings, regions.embeddings, 0), (fill_ids, regions.fill_ids, 0), (mrope, regions.mrope_positions, 1)]
    if deep:
        fields.append((deepstack, regions.deepstack, 0))
    cuda = regions.embeddings.is_cuda
    for targets, region, dim in fields:
        if cuda and region.is_floating_point():
            targets, region = [as_bits(t) for t in targets], as_bits(region)
        parts = region.split_with_sizes(counts, dim=dim)
        torch._foreach_copy_(targets, list(parts) if every else [parts[i] for i in used])


def unpack_together_reference(staging: torch.Tensor, layout: StagingLayout, whole: RowTensors) -> None:
    """Copy every segment of `staging`, in order, into `whole`: rows made by one allocation
    per field for all of them (`BlockPool.empty_rows_together`). Embeddings, fill ids and
    deepstack lie in the same order in both: one copy each. The mrope positions lie
    axis-major over all T tokens in the staging buffer and `[3, n]` per segment in `whole`:
    one gather, its index that of a single block of T rows (`_segment_mrope_index`), made
    once per staging buffer."""
    regions = layout._regions(staging)
    whole.embeddings.copy_(regions.embeddings)
    whole.fill_ids.copy_(regions.fill_ids)
    if whole.deepstack is not None:
        whole.deepstack.copy_(regions.deepstack)
    total = layout.num_tokens

    def make(buffer: torch.Tensor) -> torch.Tensor:
        index = _segment_mrope_index(np.arange(total, dtype=np.int64), layout.counts, total)
        return torch.from_numpy(index).to(buffer.device)

    index = layout.per_buffer(staging, "together_mrope", make)
    torch.index_select(regions.mrope_positions.reshape(-1), 0, index, out=whole.mrope_positions.view(-1))


# -- helpers ------------------------------------------------------------------------


def _row_slice(rows: RowTensors, start: int, count: int) -> RowTensors:
    if start == 0 and count == rows.fill_ids.shape[0]:
        return rows  # all of them (most requests fit one message): no views to make
    end = start + count
    return RowTensors(
        rows.embeddings[start:end],
        rows.fill_ids[start:end],
        rows.mrope_positions[:, start:end],
        None if rows.deepstack is None else rows.deepstack[start:end],
    )


def _copy_rows(source: RowTensors, target: RowTensors) -> None:
    as_bits(target.embeddings).copy_(as_bits(source.embeddings))
    target.fill_ids.copy_(source.fill_ids)
    target.mrope_positions.copy_(source.mrope_positions)
    if source.deepstack is not None:
        as_bits(target.deepstack).copy_(as_bits(source.deepstack))


def _pool_to_rows(pool: PoolTensors, plan: BlockPlan, counts: Sequence[int], out: RowTensors) -> None:
    """All of the batch's pool tokens into `out` (rows in batch order)."""
    rows = plan_rows(plan, counts, pool.embeddings.shape[1])
    if rows.size:
        flat = _pool_rows(pool)
        index, mrope = flat.indices(rows)
        _select(flat, index, mrope, out, _stretches(rows))


def _rows_to_pool(source: RowTensors, pool: PoolTensors, plan: BlockPlan, counts: Sequence[int]) -> None:
    rows = plan_rows(plan, counts, pool.embeddings.shape[1])
    if rows.size:
        flat = _pool_rows(pool)
        index, mrope = flat.indices(rows)
        _index_copy(flat, index, mrope, source, _stretches(rows))


MAX_STRETCHES = 16


def _stretches(rows: np.ndarray) -> list[tuple[int, int, int]] | None:
    """(first pool row, rows, first token) of each stretch of consecutive pool rows, when
    there are few of them (a slice copy is a memcpy: 2x faster than an indexed read and
    4x faster than an indexed write on large rows); None when the rows are scattered."""
    breaks = np.flatnonzero(rows[1:] != rows[:-1] + 1) + 1
    if breaks.size >= MAX_STRETCHES:
        return None
    bounds = [0, *breaks.tolist(), rows.size]
    return [(int(rows[a]), b - a, a) for a, b in zip(bounds, bounds[1:])]  # noqa: B905


def _into(tensor: torch.Tensor, source: torch.Tensor, index: torch.Tensor) -> None:
    """tensor[:] = source[index], straight into `tensor` when it is contiguous."""
    if tensor.is_contiguous():
        torch.index_select(source, 0, index, out=tensor)
    else:
        tensor.copy_(source.index_select(0, index))


def _select(flat: _PoolRows, rows: torch.Tensor, mrope: torch.Tensor, out: RowTensors,
            stretches: list[tuple[int, int, int]] | None = None) -> None:
    if stretches is None:
        _into(as_bits(out.embeddings), flat.embeddings, rows)
        _into(out.fill_ids, flat.fill_ids, rows)
        if flat.deepstack is not None:
            _into(as_bits(out.deepstack), flat.deepstack, rows)
    else:
        for first, n, token in stretches:
            as_bits(out.embeddings)[token : token + n].copy_(flat.embeddings[first : first + n])
            out.fill_ids[token : token + n].copy_(flat.fill_ids[first : first + n])
            if flat.deepstack is not None:
                as_bits(out.deepstack)[token : token + n].copy_(flat.deepstack[first : first + n])
    positions = out.mrope_positions
    if positions.is_contiguous():
        torch.index_select(flat.mrope, 0, mrope, out=positions.view(-1))
    else:
        positions.copy_(flat.mrope.index_select(0, mrope).view(positions.shape))


def _index_copy(flat: _PoolRows, rows: torch.Tensor, mrope: torch.Tensor, source: RowTensors,
                stretches: list[tuple[int, int, int]] | None = None) -> None:
    if stretches is None:
        flat.embeddings.index_copy_(0, rows, as_bits(source.embeddings))
        flat.fill_ids.index_copy_(0, rows, source.fill_ids)
        if flat.deepstack is not None:
            flat.deepstack.index_copy_(0, rows, as_bits(source.deepstack))
    else:
        for first, n, token in stretches:
            flat.embeddings[first : first + n].copy_(as_bits(source.embeddings)[token : token + n])
            flat.fill_ids[first : first + n].copy_(source.fill_ids[token : token + n])
            if flat.deepstack is not None:
                flat.deepstack[first : first + n].copy_(as_bits(source.deepstack)[token : token + n])
    flat.mrope.index_copy_(0, mrope, source.mrope_positions.reshape(-1))
