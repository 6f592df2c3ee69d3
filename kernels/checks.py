"""Host-side validation shared by the Triton launchers and the torch reference.

Every check runs before any launch, so a bad argument is a `ValueError` that names the
field, the value and what was expected, never an out-of-bounds access on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .layout import EMBEDDING_DTYPES, StagingLayout, check_staging
from .plan import BlockPlan
from .types import PoolTensors, RowTensors, TokenSpan


def check_pool(pool: PoolTensors) -> None:
    """ValueError unless `pool` is a well-formed set of contiguous pool tensors on one device."""
    emb = pool.embeddings
    if not isinstance(emb, torch.Tensor) or emb.dim() != 3:
        raise ValueError(
            f"pool.embeddings: expected [num_blocks, block_size, D], got {_shape(emb)}"
        )
    if emb.dtype not in EMBEDDING_DTYPES:
        raise ValueError(
            f"pool.embeddings: dtype {emb.dtype}, expected bfloat16, float16 or float32"
        )
    num_blocks, block_size, _ = emb.shape
    expected = {
        "fill_ids": ((num_blocks, block_size), torch.int32),
        "mrope_positions": ((num_blocks, 3, block_size), torch.int32),
    }
    if pool.deepstack is not None:
        ds = pool.deepstack
        if ds.dim() != 3 or ds.shape[:2] != emb.shape[:2]:
            raise ValueError(
                f"pool.deepstack: shape {_shape(ds)}, expected [{num_blocks}, {block_size}, K*D]"
            )
        if ds.shape[2] % emb.shape[2]:
            raise ValueError(
                f"pool.deepstack: width {ds.shape[2]} is not a multiple of D={emb.shape[2]}"
            )
        expected["deepstack"] = (tuple(ds.shape), emb.dtype)
    _check_shapes(pool, expected, "pool")
    for name in pool._fields:
        tensor = getattr(pool, name)
        if tensor is None:
            continue
        if tensor.device != emb.device:
            raise ValueError(
                f"pool.{name}: on {tensor.device}, expected {emb.device} (pool.embeddings')"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"pool.{name}: not contiguous")


def _check_shapes(bundle: PoolTensors | RowTensors, expected: dict, what: str) -> None:
    """ValueError naming the first field whose shape or dtype is not `expected[name]`."""
    for name, (shape, dtype) in expected.items():
        tensor = getattr(bundle, name)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"{what}.{name}: shape {_shape(tensor)} dtype {tensor.dtype}, expected {list(shape)} {dtype}"
            )


def check_rows(
    rows: RowTensors,
    dim: int,
    deepstack_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    what: str,
) -> None:
    """ValueError unless `rows` hold payload-shaped fields of this D, K*D (0: none), dtype
    and device, contiguous along the token axis."""
    emb = rows.embeddings
    if (
        not isinstance(emb, torch.Tensor)
        or emb.dim() != 2
        or emb.shape[1] != dim
        or emb.dtype != dtype
    ):
        raise ValueError(
            f"{what}.embeddings: shape {_shape(emb)} dtype {getattr(emb, 'dtype', None)}, "
            f"expected [N, {dim}] {dtype}"
        )
    n = emb.shape[0]
    if (rows.deepstack is None) != (deepstack_dim == 0):
        raise ValueError(
            f"{what}.deepstack: {'missing' if rows.deepstack is None else 'given'}, expected "
            f"{'[N, ' + str(deepstack_dim) + ']' if deepstack_dim else 'None (no deepstack)'}"
        )
    expected = {"fill_ids": ((n,), torch.int32), "mrope_positions": ((3, n), torch.int32)}
    if deepstack_dim:
        expected["deepstack"] = ((n, deepstack_dim), dtype)
    _check_shapes(rows, expected, what)
    for name in rows._fields:
        tensor = getattr(rows, name)
        if tensor is None:
            continue
        if tensor.device != device:
            raise ValueError(f"{what}.{name}: on {tensor.device}, expected {device}")
        contiguous = tensor.stride(-1) == 1 if name == "mrope_positions" else tensor.is_contiguous()
        if not contiguous:
            raise ValueError(f"{what}.{name}: must be contiguous along the token axis")


def pool_fields(pool: PoolTensors) -> tuple[int, int, torch.dtype, torch.device]:
    """(D, K*D or 0, dtype, device) of a checked pool."""
    emb = pool.embeddings
    deepstack_dim = 0 if pool.deepstack is None else pool.deepstack.shape[2]
    return emb.shape[2], deepstack_dim, emb.dtype, emb.device


def check_row_range(rows: RowTensors, start: int, count: int, *, what: str) -> None:
    n = rows.embeddings.shape[0]
    if start < 0 or start + count > n:
        raise ValueError(
            f"{what}: rows [{start}, {start + count}) outside the {n} rows of {what}.embeddings"
        )


def check_layout(
    layout: StagingLayout,
    fields: tuple[int, int, torch.dtype, torch.device],
    counts: Sequence[int],
    staging: torch.Tensor,
) -> None:
    """ValueError unless `layout` describes tensors of these `fields` (D, K*D, dtype, device)
    and these segment counts, and `staging` can hold it."""
    dim, deepstack_dim, dtype, device = fields
    if (layout.dim, layout.deepstack_dim, layout.dtype) != (dim, deepstack_dim, dtype):
        raise ValueError(
            f"layout: D={layout.dim}, K*D={layout.deepstack_dim}, dtype {layout.dtype}; the tensors have "
            f"D={dim}, K*D={deepstack_dim}, dtype {dtype}"
        )
    if tuple(counts) != layout.counts:
        raise ValueError(
            f"layout: segment counts {list(layout.counts)}, but the batch has {list(counts)}"
        )
    check_staging(staging, layout)
    if staging.device != device:
        raise ValueError(f"staging: on {staging.device}, expected {device}")


def covered_blocks(
    pool: PoolTensors, spans: Sequence[TokenSpan], *, what: str, written: bool
) -> BlockPlan:
    """The blocks that hold the spans' tokens, every index checked against the pool; when
    `written`, also checks that no pool row is written twice in the batch (two spans, or
    one span naming a block twice). One numpy pass for the whole batch: this runs on
    every call of the hot path."""
    num_blocks, block_size = pool.embeddings.shape[:2]
    blocks: list[int] = []
    lengths, first_rows = [], []
    for i, span in enumerate(spans):
        start, count = span.start, span.count
        if start < 0 or count < 0:
            raise ValueError(f"{what} span {i}: start={start}, count={count}: expected both >= 0")
        end = start + count
        if end > len(span.blocks) * block_size:
            raise ValueError(
                f"{what} span {i}: tokens [{start}, {end}) need {-(-end // block_size)} blocks, "
                f"got {len(span.blocks)} blocks of {block_size}"
            )
        first = start // block_size
        last = -(-end // block_size) if count else first
        blocks.extend(span.blocks[first:last])
        lengths.append(last - first)
        first_rows.append(start - first * block_size)
    plan = BlockPlan(
        np.array(blocks, dtype=np.int64),
        np.array(lengths, dtype=np.int64),
        np.array(first_rows, dtype=np.int64),
    )
    if plan.blocks.size and (plan.blocks.min() < 0 or plan.blocks.max() >= num_blocks):
        where = int(np.argmax((plan.blocks < 0) | (plan.blocks >= num_blocks)))
        span = int(np.searchsorted(np.cumsum(plan.lengths), where, side="right"))
        raise ValueError(
            f"{what} span {span}: block index {int(plan.blocks[where])} out of range, "
            f"expected 0..{num_blocks - 1}"
        )
    if written and len(np.unique(plan.blocks)) != plan.blocks.size:
        _check_disjoint_writes(plan, spans, block_size, what)
    return plan


def _check_disjoint_writes(
    plan: BlockPlan, spans: Sequence[TokenSpan], block_size: int, what: str
) -> None:
    """Some block is named twice: ValueError if two written row ranges of it overlap."""
    owners = np.repeat(np.arange(len(spans)), plan.lengths)
    position = np.arange(plan.blocks.size) - np.repeat(
        np.cumsum(plan.lengths) - plan.lengths, plan.lengths
    )
    first_rows = plan.first_rows[owners]
    counts = np.array([span.count for span in spans], dtype=np.int64)[owners]
    lows = np.where(position == 0, first_rows, 0)
    highs = np.minimum(first_rows + counts - position * block_size, block_size)
    order = np.lexsort((lows, plan.blocks))
    block_ids, lows, highs, owners = plan.blocks[order], lows[order], highs[order], owners[order]
    clash = (block_ids[1:] == block_ids[:-1]) & (lows[1:] < highs[:-1])
    if clash.any():
        k = int(np.argmax(clash))
        raise ValueError(
            f"{what}: destination block {int(block_ids[k])} rows [{int(lows[k + 1])}, {int(highs[k])}) "
            f"written twice (spans {int(owners[k])} and {int(owners[k + 1])})"
        )


def check_disjoint_outputs(
    outputs: Sequence[RowTensors], starts: Sequence[int], counts: Sequence[int], *, what: str
) -> None:
    """ValueError if two segments would write the same bytes of output embeddings."""
    intervals = []
    for i, (rows, start, count) in enumerate(zip(outputs, starts, counts, strict=True)):
        if count:
            row_bytes = rows.embeddings.stride(0) * rows.embeddings.element_size()
            begin = rows.embeddings.data_ptr() + start * row_bytes
            intervals.append((begin, begin + count * row_bytes, i))
    intervals.sort()
    for (_, end, a), (begin, _, b) in zip(intervals, intervals[1:], strict=False):
        if begin < end:
            raise ValueError(
                f"{what}: segments {a} and {b} write overlapping rows of the same output"
            )


def _shape(tensor: object) -> str:
    return str(list(tensor.shape)) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
