"""The Triton kernels (under TRITON_INTERPRET=1 without a GPU) against the torch reference.

Every case draws fresh random bits, poisons every output, and compares every byte.
The seed of each case is in its test id.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kernel_cases import (
    DTYPES,
    OPS,
    assert_bitwise_equal,
    check_op,
    odd_batch,
    random_pool,
    spans_over,
)

from embxfer import kernels
from embxfer.kernels import PoolTensors
from embxfer.kernels.triton_copy import TileConfig, set_tile_config

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the interpreter grid runs on CPU; test_kernels_gpu.py covers CUDA",
)

GPU_TILES = TileConfig()
# The interpreter pays per program, not per element: wider tiles keep the grid fast.
# The kernel's logic does not depend on the tile shape; test_gpu_tile_shapes keeps the
# shapes the GPU uses covered here too, and tests/kernels/test_kernels_gpu.py compiles them.
INTERPRETER_TILES = TileConfig(tile_words=32768, max_block_w=4096, min_programs=1)


@pytest.fixture(autouse=True)
def interpreter_tiles():
    previous = set_tile_config(INTERPRETER_TILES)
    yield
    set_tile_config(previous)


GRID = [
    (dtype, dim, layers, block_size)
    for dtype in DTYPES
    for dim, layers in ((1000, 0), (1000, 2), (3584, 0), (3584, 1))
    for block_size in (4, 16, 128)
]


def _case_id(case):
    dtype, dim, layers, block_size = case
    return f"{str(dtype).removeprefix('torch.')}-D{dim}-K{layers}-bs{block_size}"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_odd_batch_matches_reference(op, case):
    dtype, dim, layers, block_size = case
    seed = zlib.crc32(f"{op}-{_case_id(case)}".encode()) % 10_000
    counts, starts = odd_batch(block_size)
    check_op(op, counts, starts, block_size, dim, layers, dtype, seed)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_tile_shapes(op, dtype):
    set_tile_config(GPU_TILES)
    check_op(op, [1, 15, 16, 17], [15, 0, 8, 1], 16, 1000, 1, dtype, seed=11)
    check_op(op, [3, 5], [2, 1], 4, 3584, 0, dtype, seed=12)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_block_size_one_and_empty_segments(op, seed):
    check_op(op, [1, 0, 3, 2], [0, 5, 2, 1], 1, 40, 1, torch.bfloat16, seed)


@pytest.mark.parametrize("dim", [1, 3, 7, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_narrow_and_odd_rows(dim, dtype):
    """Rows whose byte length is not a multiple of 4 or 16 take the narrow-word path."""
    for op in ("pack", "unpack_to_rows", "scatter"):
        check_op(op, [5, 1, 9], [3, 0, 6], 4, dim, 2, dtype, seed=dim)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    dim=st.integers(1, 48),
    layers=st.integers(0, 2),
    block_size=st.integers(1, 9),
    segments=st.lists(
        st.tuples(st.integers(0, 20), st.integers(0, 12), st.integers(0, 12)),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_unpack_of_pack_is_identity(dtype, dim, layers, block_size, segments, seed):
    """pack from one pool, unpack into other blocks of another pool (other starts):
    every token reads back bit-exact, and unpack_to_rows gives the same rows."""
    generator = torch.Generator().manual_seed(seed)
    counts = [count for count, _, _ in segments]
    source_starts = [start for _, start, _ in segments]
    dest_starts = [start for _, _, start in segments]
    needed = sum(
        -(-(s + c) // block_size)
        for s, c in zip(source_starts + dest_starts, counts + counts, strict=True)
    )
    source = random_pool(needed + 1, block_size, dim, layers, dtype, generator)
    dest = random_pool(needed + 1, block_size, dim, layers, dtype, generator)
    source_spans = spans_over(counts, source_starts, block_size, needed + 1, generator)
    dest_spans = spans_over(counts, dest_starts, block_size, needed + 1, generator)
    layout = kernels.staging_layout(counts, dim, layers * dim, dtype)
    staging = torch.full((layout.nbytes,), 0xA5, dtype=torch.uint8)

    kernels.pack(source, source_spans, staging, layout, backend="triton")
    kernels.unpack(staging, layout, dest, dest_spans, backend="triton")
    outputs = [
        kernels.RowTensors(
            *(None if t is None else torch.empty_like(t) for t in _rows(c, dim, layers, dtype))
        )
        for c in counts
    ]
    kernels.unpack_to_rows(staging, layout, outputs, [0] * len(counts), backend="triton")
    for source_span, dest_span, out, count in zip(
        source_spans, dest_spans, outputs, counts, strict=True
    ):
        expected, round_trip = _rows(count, dim, layers, dtype), _rows(count, dim, layers, dtype)
        kernels.gather(source, source_span, expected, backend="torch")
        kernels.gather(dest, dest_span, round_trip, backend="torch")
        assert_bitwise_equal(round_trip, expected, what=f"seed={seed} round trip")
        assert_bitwise_equal(out, expected, what=f"seed={seed} unpack_to_rows")


def _rows(count, dim, layers, dtype):
    return kernels.RowTensors(
        torch.full((count, dim), float("nan"), dtype=dtype),
        torch.full((count,), -7, dtype=torch.int32),
        torch.full((3, count), -7, dtype=torch.int32),
        torch.full((count, layers * dim), float("nan"), dtype=dtype) if layers else None,
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_unpack_of_some_segments_skips_the_others(backend):
    """The runtime unpacks only the live segments of a message (a request that failed
    meanwhile is skipped): the skipped segments' pool rows stay untouched, the others are
    exact, on both paths; twice, so a staging side reused across calls stays right."""
    from embxfer.kernels import ops, plan_spans

    generator = torch.Generator().manual_seed(5)
    counts, block_size, dim = [3, 5, 7], 4, 40
    pool = random_pool(20, block_size, dim, 1, torch.bfloat16, generator)
    source = random_pool(20, block_size, dim, 1, torch.bfloat16, generator)
    spans = spans_over(counts, [0, 1, 2], block_size, 20, generator)
    layout = kernels.staging_layout(counts, dim, dim, torch.bfloat16)
    staging = torch.empty(layout.nbytes, dtype=torch.uint8)
    kernels.pack(source, spans, staging, layout, backend="torch")
    for _ in range(2):
        target = PoolTensors(*(None if t is None else t.clone() for t in pool))
        live = [0, 2]
        ops.unpack(staging, layout, target, plan_spans([spans[i] for i in live], block_size), segments=live,
                   triton=backend == "triton")
        expected_rows = [layout.views(staging, i) for i in range(3)]
        for i in live:
            out = kernels.RowTensors(torch.empty(counts[i], dim, dtype=torch.bfloat16),
                                     torch.empty(counts[i], dtype=torch.int32),
                                     torch.empty(3, counts[i], dtype=torch.int32),
                                     torch.empty(counts[i], dim, dtype=torch.bfloat16))
            kernels.gather(target, spans[i], out, backend="torch")
            assert_bitwise_equal(tuple(out), tuple(expected_rows[i]), what=f"segment {i}")
        untouched = kernels.RowTensors(torch.empty(counts[1], dim, dtype=torch.bfloat16),
                                       torch.empty(counts[1], dtype=torch.int32),
                                       torch.empty(3, counts[1], dtype=torch.int32),
                                       torch.empty(counts[1], dim, dtype=torch.bfloat16))
        before = kernels.RowTensors(*(torch.empty_like(t) for t in untouched))
        kernels.gather(target, spans[1], untouched, backend="torch")
        kernels.gather(pool, spans[1], before, backend="torch")
        assert_bitwise_equal(tuple(untouched), tuple(before), what="skipped segment")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=9), layers=st.sampled_from([0, 2]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
@example(counts=[7, 7, 7, 2, 0, 0, 3, 3], layers=2, dtype=torch.bfloat16, seed=1)  # runs of equal counts
def test_unpack_together_lands_every_segment_in_its_view_of_one_allocation(counts, layers, dtype, seed):
    """`unpack_together` (a copy per field into one allocation whose views are the
    requests' outputs) gives every request the same bits as `unpack_to_rows` into
    separate tensors; each view is contiguous, and neither touches a byte outside."""
    from kernel_cases import random_bits

    from embxfer.kernels import ops
    from embxfer.runtime.pool import BlockPool

    dim = 24
    generator = torch.Generator().manual_seed(seed)
    layout = kernels.staging_layout(counts, dim, layers * dim, dtype)
    staging = random_bits((layout.nbytes,), torch.uint8, generator, "cpu") if layout.nbytes else \
        torch.zeros(0, dtype=torch.uint8)
    expected = [_rows(c, dim, layers, dtype) for c in counts]
    ops.unpack_to_rows(staging, layout, expected, [0] * len(counts), triton=False)
    pool = BlockPool(1, 4, dim, dtype, layers, torch.device("cpu"))
    whole, views = pool.empty_rows_together(counts)
    for t in whole:
        if t is not None:
            t.view(torch.uint8).fill_(0xA5)
    ops.unpack_together(staging, layout, whole)
    for count, view, want in zip(counts, views, expected, strict=True):
        assert view.embeddings.shape == (count, dim) and view.mrope_positions.shape == (3, count)
        assert all(t.is_contiguous() for t in view if t is not None)
        assert_bitwise_equal(view, want, what=f"seed={seed} counts={counts}")


@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=9), layers=st.sampled_from([0, 2]),
       dtype=st.sampled_from(DTYPES))
@example(counts=[4, 4, 4, 1, 6, 6, 9], layers=2, dtype=torch.bfloat16)  # runs of equal counts: one view each
@example(counts=[5] * 9, layers=0, dtype=torch.float32)
def test_together_addresses_are_each_views_row_addresses(counts, layers, dtype):
    """The addressed unpack of a message whose requests share one allocation takes its
    table from the whole (`together_addresses`, numpy): it must name exactly what each
    view's own `row_addresses` would, deepstack or not."""
    from embxfer.kernels import ops
    from embxfer.runtime.pool import BlockPool

    pool = BlockPool(1, 4, 24, dtype, layers, torch.device("cpu"))
    whole, views = pool.empty_rows_together(counts)
    table = ops.together_addresses(whole, counts)
    assert table.dtype == np.int64 and table.shape == (len(counts), 5)
    assert table.tolist() == [list(ops.row_addresses(v)) for v in views]
