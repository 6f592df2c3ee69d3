"""The compiled Triton kernels on a CUDA device: the interpreter's grid, large cases,
offsets past 2**31 words, and no device allocation in steady state."""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_cases import (
    DTYPES,
    OPS,
    assert_bitwise_equal,
    assert_steady_state_allocates_nothing,
    check_op,
    odd_batch,
    poison,
)

from embxfer import kernels
from embxfer.kernels import PoolTensors, TokenSpan, staging_layout
from embxfer.kernels.triton_copy import TileConfig, set_tile_config

pytestmark = pytest.mark.gpu

GRID = [
    (dtype, dim, layers, block_size)
    for dtype in DTYPES
    for dim, layers in ((1000, 0), (1000, 2), (3584, 0), (3584, 1))
    for block_size in (1, 4, 16, 128, 1024)
]


def _case_id(case):
    dtype, dim, layers, block_size = case
    return f"{str(dtype).removeprefix('torch.')}-D{dim}-K{layers}-bs{block_size}"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_odd_batch_matches_reference_gpu(op, case):
    dtype, dim, layers, block_size = case
    seed = zlib.crc32(f"{op}-{_case_id(case)}".encode()) % 10_000
    counts, starts = odd_batch(block_size) if block_size > 1 else ([1, 2, 3], [0, 1, 2])
    check_op(op, counts, starts, block_size, dim, layers, dtype, seed, device="cuda")


@pytest.mark.parametrize("dim", [1, 3, 7, 33, 8192])
def test_narrow_and_wide_rows_gpu(dim):
    for op in OPS:
        check_op(
            op, [5, 1, 9, 300], [3, 0, 6, 17], 16, dim, 2, torch.bfloat16, seed=dim, device="cuda"
        )


@pytest.mark.parametrize("tile_words", [2048, 16384])
@pytest.mark.parametrize("num_warps", [4, 8])
def test_other_tile_configs_gpu(tile_words, num_warps):
    config = TileConfig(tile_words=tile_words, max_block_w=2048, num_warps=num_warps)
    previous = set_tile_config(config)
    try:
        for op in OPS:
            check_op(
                op,
                [1, 127, 128, 129],
                [127, 0, 64, 1],
                128,
                3584,
                3,
                torch.bfloat16,
                seed=tile_words,
                device="cuda",
            )
    finally:
        set_tile_config(previous)


def _random_pool_cuda(num_blocks, block_size, dim, layers, dtype, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def bits(shape, dtype):
        integer = {
            torch.bfloat16: torch.int16,
            torch.float16: torch.int16,
            torch.float32: torch.int32,
        }.get(dtype, dtype)
        info = torch.iinfo(integer)
        return torch.randint(
            info.min, info.max, shape, generator=generator, device="cuda", dtype=integer
        ).view(dtype)

    shape = (num_blocks, block_size)
    return PoolTensors(
        bits((*shape, dim), dtype),
        bits(shape, torch.int32),
        bits((num_blocks, 3, block_size), torch.int32),
        bits((*shape, layers * dim), dtype) if layers else None,
    )


def _round_trip(pool, spans, dest_spans):
    """pack with the kernel and the reference, compare staging; unpack both into poisoned
    copies of the pool, compare every byte of the pools."""
    dim = pool.embeddings.shape[2]
    deepstack_dim = 0 if pool.deepstack is None else pool.deepstack.shape[2]
    layout = staging_layout([s.count for s in spans], dim, deepstack_dim, pool.embeddings.dtype)
    staging = [
        poison(torch.empty(layout.nbytes, dtype=torch.uint8, device="cuda")) for _ in range(2)
    ]
    kernels.pack(pool, spans, staging[0], layout, backend="triton")
    kernels.pack(pool, spans, staging[1], layout, backend="torch")
    assert_bitwise_equal(staging[0], staging[1], what="pack")
    del staging[1]
    for backend in ("triton", "torch"):
        target = PoolTensors(*(None if t is None else poison(torch.empty_like(t)) for t in pool))
        kernels.unpack(staging[0], layout, target, dest_spans, backend=backend)
        if backend == "triton":
            result = target
        else:
            assert_bitwise_equal(tuple(result), tuple(target), what="unpack")
        del target


def test_case_a_sized_round_trip():
    """16384 x 8192 bf16 from shuffled blocks, resumed mid-block on both sides."""
    pool = _random_pool_cuda(160, 128, 8192, 0, torch.bfloat16, seed=3)
    order = torch.randperm(160, generator=torch.Generator().manual_seed(3)).tolist()
    _round_trip(pool, [TokenSpan(order[:130], 77, 16384)], [TokenSpan(order[20:150], 5, 16384)])


def test_batch_of_many_requests_round_trip():
    generator = torch.Generator().manual_seed(4)
    counts = torch.randint(64, 4097, (64,), generator=generator).tolist()
    blocks_each = [-(-(c + 100) // 128) for c in counts]
    pool = _random_pool_cuda(sum(blocks_each) + 8, 128, 3584, 1, torch.bfloat16, seed=4)
    order = torch.randperm(sum(blocks_each) + 8, generator=generator).tolist()
    spans, dest, used = [], [], 0
    for count, n in zip(counts, blocks_each, strict=True):
        spans.append(TokenSpan(order[used : used + n], 100, count))
        dest.append(TokenSpan(order[used : used + n][::-1], 0, count))
        used += n
    _round_trip(pool, spans, dest)


def test_offsets_beyond_int32():
    """A pool of more than 2**31 words: the last blocks are reached through int64 offsets."""
    num_blocks, block_size, dim = 4200, 128, 8192  # 4200 * 128 * 8192 * 2 B = 8.8 GB
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a 24 GiB device")
    pool = _random_pool_cuda(num_blocks, block_size, dim, 0, torch.bfloat16, seed=5)
    spans = [TokenSpan([num_blocks - 1, 7, num_blocks - 3], 50, 300)]
    layout = staging_layout([300], dim, 0, torch.bfloat16)
    staging = [
        poison(torch.empty(layout.nbytes, dtype=torch.uint8, device="cuda")) for _ in range(2)
    ]
    kernels.pack(pool, spans, staging[0], layout, backend="triton")
    kernels.pack(pool, spans, staging[1], layout, backend="torch")
    assert_bitwise_equal(staging[0], staging[1], what="pack beyond int32")
    before = pool.embeddings[num_blocks - 2].clone()
    kernels.unpack(
        staging[1],
        layout,
        pool,
        [TokenSpan([num_blocks - 1, num_blocks - 3, 9], 0, 300)],
        backend="triton",
    )
    expected = layout.views(staging[1], 0).embeddings
    assert_bitwise_equal(
        pool.embeddings[num_blocks - 1], expected[:128], what="unpack beyond int32"
    )
    assert_bitwise_equal(
        pool.embeddings[num_blocks - 3], expected[128:256], what="unpack beyond int32"
    )
    assert_bitwise_equal(pool.embeddings[num_blocks - 2], before, what="neighbour block untouched")


def test_steady_state_allocates_nothing():
    """After warm-up (compilation, workspace growth), repeated calls of every op make no
    device allocation at all."""
    pool = _random_pool_cuda(64, 16, 1000, 1, torch.bfloat16, seed=6)
    spans = [
        TokenSpan(list(range(0, 20)), 3, 300),
        TokenSpan(list(range(20, 40)), 0, 17),
        TokenSpan([40, 41], 15, 2),
    ]
    layout = staging_layout([s.count for s in spans], 1000, 1000, torch.bfloat16)
    staging = torch.empty(layout.nbytes, dtype=torch.uint8, device="cuda")
    rows = [
        kernels.RowTensors(
            torch.empty(c, 1000, dtype=torch.bfloat16, device="cuda"),
            torch.empty(c, dtype=torch.int32, device="cuda"),
            torch.empty(3, c, dtype=torch.int32, device="cuda"),
            torch.empty(c, 1000, dtype=torch.bfloat16, device="cuda"),
        )
        for c in layout.counts
    ]
    dest = [
        TokenSpan(list(range(63, 43, -1)), 0, 300),
        TokenSpan(list(range(0, 20)), 0, 17),
        TokenSpan([41, 40], 15, 2),
    ]

    def step():
        kernels.pack(pool, spans, staging, layout)
        kernels.unpack(staging, layout, pool, dest)
        kernels.unpack_to_rows(staging, layout, rows, [0, 0, 0])
        kernels.gather(pool, spans[0], rows[0])
        kernels.scatter(rows[1], 0, pool, dest[1])

    assert_steady_state_allocates_nothing(step, 3)


def test_other_stream_and_growing_batches():
    """Calls on a side stream, and batches growing past the workspace's size, stay exact."""
    pool = _random_pool_cuda(600, 16, 256, 0, torch.float16, seed=7)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for segments in (1, 8, 64, 300):
            spans = [TokenSpan([2 * i, 2 * i + 1], i % 16, 17) for i in range(segments)]
            layout = staging_layout([17] * segments, 256, 0, torch.float16)
            got, want = (
                poison(torch.empty(layout.nbytes, dtype=torch.uint8, device="cuda"))
                for _ in range(2)
            )
            kernels.pack(pool, spans, got, layout)
            kernels.pack(pool, spans, want, layout, backend="torch")
            assert_bitwise_equal(got, want, what=f"{segments} segments on a side stream")
    stream.synchronize()
