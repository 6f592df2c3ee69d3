"""Host-side validation: every bad argument is a ValueError before anything is launched,
and the buffers it would have written stay untouched."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import POISON_BYTE, empty_rows, poison, random_pool

from embxfer import kernels
from embxfer.kernels import TokenSpan, staging_layout

BACKENDS = ["triton", "torch"]
BLOCK = 4
DIM = 8


@pytest.fixture
def pool():
    return random_pool(6, BLOCK, DIM, 1, torch.bfloat16, torch.Generator().manual_seed(5))


def _staging(layout, extra=0):
    return poison(torch.empty(layout.nbytes + extra, dtype=torch.uint8))


def _untouched(tensor):
    return bool((tensor.view(torch.uint8) == POISON_BYTE).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [6, -1, 100])
def test_pack_block_out_of_range(pool, backend, block):
    spans = [TokenSpan([0, block], 2, 5)]
    layout = staging_layout([5], DIM, DIM, torch.bfloat16)
    staging = _staging(layout)
    with pytest.raises(ValueError, match=f"block index {block} out of range"):
        kernels.pack(pool, spans, staging, layout, backend=backend)
    assert _untouched(staging)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_block_out_of_range_leaves_pool_untouched(pool, backend):
    layout = staging_layout([3], DIM, DIM, torch.bfloat16)
    target = random_pool(6, BLOCK, DIM, 1, torch.bfloat16, torch.Generator().manual_seed(1))
    before = target.embeddings.clone()
    with pytest.raises(ValueError, match="out of range"):
        kernels.unpack(_staging(layout), layout, target, [TokenSpan([7], 0, 3)], backend=backend)
    assert torch.equal(before.view(torch.int16), target.embeddings.view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_span_needs_more_blocks_than_given(pool, backend):
    layout = staging_layout([9], DIM, DIM, torch.bfloat16)
    with pytest.raises(ValueError, match="need 3 blocks, got 2"):
        kernels.pack(pool, [TokenSpan([0, 1], 0, 9)], _staging(layout), layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_duplicate_block_in_one_span(pool, backend):
    layout = staging_layout([8], DIM, DIM, torch.bfloat16)
    with pytest.raises(ValueError, match="destination block 2 rows .* written twice"):
        kernels.unpack(_staging(layout), layout, pool, [TokenSpan([2, 2], 0, 8)], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_two_spans_overlapping_rows(pool, backend):
    layout = staging_layout([3, 2], DIM, DIM, torch.bfloat16)
    spans = [TokenSpan([1], 0, 3), TokenSpan([1], 2, 2)]
    with pytest.raises(
        ValueError, match=r"destination block 1 rows \[2, 3\) written twice \(spans 0 and 1\)"
    ):
        kernels.unpack(_staging(layout), layout, pool, spans, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_same_block_disjoint_rows_is_allowed(pool, backend):
    layout = staging_layout([2, 2], DIM, DIM, torch.bfloat16)
    spans = [TokenSpan([1], 0, 2), TokenSpan([1], 2, 2)]
    kernels.unpack(_staging(layout), layout, pool, spans, backend=backend)
    assert bool((pool.embeddings[1].view(torch.uint8) == POISON_BYTE).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_may_read_a_block_twice(pool, backend):
    layout = staging_layout([3, 3], DIM, DIM, torch.bfloat16)
    kernels.pack(
        pool,
        [TokenSpan([1], 0, 3), TokenSpan([1], 1, 3)],
        _staging(layout),
        layout,
        backend=backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_staging_too_small(pool, backend):
    layout = staging_layout([5], DIM, DIM, torch.bfloat16)
    staging = poison(torch.empty(layout.nbytes - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too small"):
        kernels.pack(pool, [TokenSpan([0, 1], 0, 5)], staging, layout, backend=backend)
    assert _untouched(staging)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda n: torch.empty(n // 4, dtype=torch.int32), "1-D torch.uint8"),
        (lambda n: torch.empty(n + 16, dtype=torch.uint8)[1:], "not 16-byte aligned"),
        (lambda n: torch.empty(2, n, dtype=torch.uint8)[:, 0], "1-D torch.uint8|not contiguous"),
    ],
)
def test_staging_wrong_kind(pool, backend, make, message):
    layout = staging_layout([5], DIM, DIM, torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        kernels.pack(pool, [TokenSpan([0, 1], 0, 5)], make(layout.nbytes), layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mismatches(pool, backend):
    spans = [TokenSpan([0, 1], 0, 5)]
    for layout, message in (
        (staging_layout([4], DIM, DIM, torch.bfloat16), "segment counts"),
        (staging_layout([5, 1], DIM, DIM, torch.bfloat16), "segment counts"),
        (staging_layout([5], DIM + 1, DIM, torch.bfloat16), "D=9"),
        (staging_layout([5], DIM, 0, torch.bfloat16), "K\\*D=0"),
        (staging_layout([5], DIM, DIM, torch.float16), "dtype"),
    ):
        with pytest.raises(ValueError, match=message):
            kernels.pack(pool, spans, _staging(layout, 4096), layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_mismatches(pool, backend):
    span = TokenSpan([0, 1], 0, 5)
    good = empty_rows(5, DIM, 1, torch.bfloat16)
    cases = [
        (good._replace(embeddings=good.embeddings.float()), "gather out.embeddings"),
        (good._replace(deepstack=None), "gather out.deepstack: missing"),
        (good._replace(fill_ids=good.fill_ids.long()), "gather out.fill_ids"),
        (good._replace(mrope_positions=good.mrope_positions[:2]), "gather out.mrope_positions"),
        (good._replace(embeddings=torch.empty(DIM, 5, dtype=torch.bfloat16).T), "contiguous"),
    ]
    for rows, message in cases:
        with pytest.raises(ValueError, match=message):
            kernels.gather(pool, span, rows, backend=backend)
    with pytest.raises(ValueError, match=r"rows \[1, 6\) outside the 5 rows"):
        kernels.gather(pool, span, good, 1, backend=backend)
    with pytest.raises(ValueError, match=r"rows \[3, 8\) outside"):
        kernels.scatter(good, 3, pool, span, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_to_rows_mismatches(backend):
    layout = staging_layout([3, 2], DIM, 0, torch.float32)
    staging = _staging(layout)
    out = empty_rows(6, DIM, 0, torch.float32)
    with pytest.raises(ValueError, match="1 row sets and 2 starts for 2 segments"):
        kernels.unpack_to_rows(staging, layout, [out], [0, 3], backend=backend)
    with pytest.raises(ValueError, match="segments 0 and 1 write overlapping rows"):
        kernels.unpack_to_rows(staging, layout, [out, out], [0, 2], backend=backend)
    with pytest.raises(ValueError, match=r"outputs\[1\]: rows \[5, 7\) outside"):
        kernels.unpack_to_rows(staging, layout, [out, out], [0, 5], backend=backend)
    with pytest.raises(ValueError, match=r"outputs\[0\].embeddings"):
        kernels.unpack_to_rows(
            staging, layout, [empty_rows(6, DIM, 0, torch.bfloat16), out], [0, 3], backend=backend
        )
    assert _untouched(out.embeddings)


def test_pool_mismatches(pool):
    layout = staging_layout([1], DIM, DIM, torch.bfloat16)
    staging = _staging(layout)
    bad_pools = [
        (pool._replace(fill_ids=pool.fill_ids[:, :2]), "pool.fill_ids"),
        (
            pool._replace(mrope_positions=pool.mrope_positions.transpose(1, 2)),
            "pool.mrope_positions",
        ),
        (pool._replace(deepstack=pool.deepstack[:, :, :3]), "pool.deepstack"),
        (pool._replace(embeddings=pool.embeddings.int()), "pool.embeddings: dtype"),
        (
            pool._replace(embeddings=pool.embeddings.transpose(0, 1).contiguous().transpose(0, 1)),
            "not contiguous",
        ),
    ]
    for bad, message in bad_pools:
        with pytest.raises(ValueError, match=message):
            kernels.pack(bad, [TokenSpan([0], 0, 1)], staging, layout)


def test_layout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="counts\\[1\\]=-1"):
        staging_layout([1, -1], DIM, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="dim=0"):
        staging_layout([1], 0, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        staging_layout([1], DIM, 0, torch.int32)


def test_unknown_backend(pool):
    layout = staging_layout([1], DIM, DIM, torch.bfloat16)
    with pytest.raises(ValueError, match="backend='cuda'"):
        kernels.pack(pool, [TokenSpan([0], 0, 1)], _staging(layout), layout, backend="cuda")


def test_layout_is_aligned_and_views_round_trip():
    """Field after field over the whole batch: every region 128-byte aligned, a segment's
    rows at whole rows inside each region, an empty segment takes no bytes."""
    layout = staging_layout([3, 0, 5], 1000, 2000, torch.bfloat16)
    regions = (0, layout.deepstack_offset, layout.fill_ids_offset, layout.mrope_offset)
    assert all(offset % 128 == 0 for offset in regions)
    assert layout.nbytes % 128 == 0
    assert layout.token_offsets == (0, 3, 3) and layout.num_tokens == 8
    assert layout.deepstack_offset >= 8 * 1000 * 2
    assert layout.fill_ids_offset >= layout.deepstack_offset + 8 * 2000 * 2
    assert layout.mrope_offset >= layout.fill_ids_offset + 8 * 4
    assert layout.nbytes >= layout.mrope_offset + 12 * 8
    assert layout.nbytes == kernels.staging_nbytes(8, 1000, 2000, torch.bfloat16)
    staging = _staging(layout)
    view = layout.views(staging, 2)
    assert view.embeddings.shape == (5, 1000) and view.deepstack.shape == (5, 2000)
    assert view.mrope_positions.shape == (3, 5) and view.mrope_positions.stride() == (8, 1)
    assert view.embeddings.data_ptr() - staging.data_ptr() == 3 * 1000 * 2
    assert view.deepstack.data_ptr() - staging.data_ptr() == layout.deepstack_offset + 3 * 2000 * 2
    assert view.fill_ids.data_ptr() - staging.data_ptr() == layout.fill_ids_offset + 3 * 4
    assert view.mrope_positions.data_ptr() - staging.data_ptr() == layout.mrope_offset + 3 * 4
    assert kernels.tokens_that_fit(layout.nbytes, 1000, 2000, torch.bfloat16) == 8
    assert kernels.tokens_that_fit(layout.nbytes - 1, 1000, 2000, torch.bfloat16) == 7
