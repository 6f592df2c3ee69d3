"""BlockPool: bit-exact write/read round trips over odd sizes, dtypes and scattered blocks."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from embxfer import BlockPool, Payload
from embxfer.kernels import RowTensors

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ID_POISON = -0x5A5A5A5B  # random ids/positions are drawn >= 0, so never equal to this


def random_float_bits(shape, dtype, gen):
    """Uniformly random bit patterns: NaNs with payloads, infinities and -0.0 included."""
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, shape, dtype=bits, generator=gen).view(dtype)


def random_payload(n, d, dtype, k, seed, mrope_delta=None) -> Payload:
    gen = torch.Generator().manual_seed(seed)
    return Payload(
        embeddings=random_float_bits((n, d), dtype, gen),
        fill_ids=torch.randint(0, (1 << 31) - 1, (n,), dtype=torch.int32, generator=gen),
        mrope_positions=torch.randint(0, (1 << 31) - 1, (3, n), dtype=torch.int32, generator=gen),
        mrope_delta=seed * 7919 - 3 if mrope_delta is None else mrope_delta,
        deepstack=random_float_bits((n, k * d), dtype, gen) if k else None,
    )


def poison_pool(pool: BlockPool) -> None:
    for tensor in pool.tensors:
        if tensor is None:
            continue
        tensor.fill_(float("nan") if tensor.is_floating_point() else ID_POISON)


def poisoned_rows(pool: BlockPool, n: int) -> RowTensors:
    rows = pool.empty_rows(n)
    for tensor in rows:
        if tensor is not None:
            tensor.fill_(float("nan") if tensor.is_floating_point() else ID_POISON)
    return rows


def pool_bits(pool: BlockPool) -> list[torch.Tensor]:
    return [t.view(BITS[t.dtype]).clone() if t.is_floating_point() else t.clone() for t in pool.tensors if t is not None]


def assert_layout(pool: BlockPool, source: Payload, blocks: list[int], start: int, count: int) -> None:
    """Token `start + t` sits in `blocks[t // block_size]` at row `t % block_size` (kernels/types.py)."""
    t = torch.arange(count)
    block = torch.tensor(blocks, dtype=torch.long)[t // pool.block_size]
    row = t % pool.block_size
    end = start + count
    emb = pool.tensors.embeddings[block, row]
    assert torch.equal(emb.view(BITS[emb.dtype]), source.embeddings[start:end].view(BITS[emb.dtype]))
    assert torch.equal(pool.tensors.fill_ids[block, row], source.fill_ids[start:end])
    assert torch.equal(pool.tensors.mrope_positions[block, :, row].T, source.mrope_positions[:, start:end])
    if source.deepstack is not None:
        deep = pool.tensors.deepstack[block, row]
        assert torch.equal(deep.view(BITS[deep.dtype]), source.deepstack[start:end].view(BITS[deep.dtype]))


def scattered_blocks(num_needed: int, num_blocks: int, rng: random.Random, order: str) -> list[int]:
    if order == "reversed":
        return list(range(num_blocks - 1, num_blocks - 1 - num_needed, -1))
    return rng.sample(range(num_blocks), num_needed)


def assert_untouched_outside(pool: BlockPool, before: list[torch.Tensor], blocks: list[int], count: int) -> None:
    """Every pool row that is not one of the written tokens still holds its old bits."""
    written = torch.zeros(pool.num_blocks, pool.block_size, dtype=torch.bool)
    for t in range(count):
        written[blocks[t // pool.block_size], t % pool.block_size] = True
    after = pool_bits(pool)
    for old, new in zip(before, after, strict=True):
        if old.dim() == 3 and old.shape[1] == 3:  # mrope_positions [num_blocks, 3, block_size]
            mask = written[:, None, :].expand_as(old)
        elif old.dim() == 3:
            mask = written[:, :, None].expand_as(old)
        else:
            mask = written
        assert torch.equal(old[~mask], new[~mask])


# ---------------------------------------------------------------- round trips over odd sizes

BLOCK_SIZE = 16
TOKEN_COUNTS = {
    "1": 1,
    "bs-1": BLOCK_SIZE - 1,
    "bs": BLOCK_SIZE,
    "bs+1": BLOCK_SIZE + 1,
    "3bs+5": 3 * BLOCK_SIZE + 5,
}


@pytest.mark.parametrize("k", [0, 3], ids=["K0", "K3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dim", [1000, 3584, 7])
@pytest.mark.parametrize("tokens", list(TOKEN_COUNTS.values()), ids=list(TOKEN_COUNTS))
@pytest.mark.parametrize("order", ["shuffled", "reversed"])
def test_write_read_round_trip_bit_exact(tokens, dim, dtype, k, order):
    seed = zlib.crc32(repr((tokens, dim, dtype, k, order)).encode()) & 0xFFFF
    print(f"seed={seed}")
    rng = random.Random(seed)
    source = random_payload(tokens, dim, dtype, k, seed)
    pool = BlockPool(num_blocks=8, block_size=BLOCK_SIZE, dim=dim, dtype=dtype, deepstack_layers=k)
    poison_pool(pool)
    blocks = scattered_blocks(-(-tokens // BLOCK_SIZE), pool.num_blocks, rng, order)
    before = pool_bits(pool)

    pool.write(source, blocks)
    assert_untouched_outside(pool, before, blocks, tokens)
    assert_layout(pool, source, blocks, 0, tokens)

    rows = poisoned_rows(pool, tokens)
    pool.read_into(blocks, tokens, rows)
    via_rows = Payload(*rows[:3], mrope_delta=source.mrope_delta, deepstack=rows.deepstack)
    assert via_rows.mismatches(source) == []

    result = pool.read(blocks, tokens, mrope_delta=source.mrope_delta)
    assert result.mismatches(source) == []
    assert result.num_tokens == tokens and result.dim == dim and result.deepstack_layers == k
    for tensor in (result.embeddings, result.fill_ids, result.mrope_positions):
        assert tensor.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("tokens", [1, 127, 128, 129, 300])
def test_round_trip_default_block_size(tokens, dtype):
    seed = 1000 + tokens
    print(f"seed={seed}")
    source = random_payload(tokens, 1000, dtype, 1, seed)
    pool = BlockPool(num_blocks=4, block_size=128, dim=1000, dtype=dtype, deepstack_layers=1)
    poison_pool(pool)
    blocks = random.Random(seed).sample(range(4), -(-tokens // 128))
    pool.write(source, blocks)
    assert pool.read(blocks, tokens, source.mrope_delta).mismatches(source) == []


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_many_requests_share_a_pool_without_clobbering(seed):
    print(f"seed={seed}")
    rng = random.Random(seed)
    pool = BlockPool(num_blocks=24, block_size=8, dim=12, dtype=torch.bfloat16, deepstack_layers=2)
    poison_pool(pool)
    free = list(range(pool.num_blocks))
    rng.shuffle(free)
    stored = []
    for request in range(5):
        tokens = rng.randint(1, 30)
        need = -(-tokens // 8)
        blocks, free = free[:need], free[need:]
        payload = random_payload(tokens, 12, torch.bfloat16, 2, seed * 100 + request)
        pool.write(payload, blocks)
        stored.append((payload, blocks))
    for payload, blocks in stored:
        assert pool.read(blocks, payload.num_tokens, payload.mrope_delta).mismatches(payload) == []


@pytest.mark.parametrize("start, count", [(0, 5), (5, 16), (7, 9), (13, 1), (3, 18), (21, 0)])
def test_partial_write_of_a_range_starts_at_row_zero(start, count):
    seed = start * 31 + count
    print(f"seed={seed}")
    source = random_payload(21, 9, torch.float16, 1, seed)
    pool = BlockPool(num_blocks=6, block_size=8, dim=9, dtype=torch.float16, deepstack_layers=1)
    poison_pool(pool)
    blocks = [4, 1, 5][: max(1, -(-count // 8))]
    before = pool_bits(pool)
    pool.write(source, blocks, start=start, count=count)
    assert_untouched_outside(pool, before, blocks, count)
    assert_layout(pool, source, blocks, start, count)
    if count == 0:
        return
    rows = poisoned_rows(pool, count)
    pool.read_into(blocks, count, rows)
    end = start + count
    assert torch.equal(rows.embeddings.view(torch.int16), source.embeddings[start:end].view(torch.int16))
    assert torch.equal(rows.deepstack.view(torch.int16), source.deepstack[start:end].view(torch.int16))
    assert torch.equal(rows.fill_ids, source.fill_ids[start:end])
    assert torch.equal(rows.mrope_positions, source.mrope_positions[:, start:end])


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_rounds_reusing_the_same_blocks_reassemble_the_payload(seed):
    """Resume-style: the same few blocks carry round after round; the reader keeps each
    round in the output rows at its offset (SPEC R6)."""
    print(f"seed={seed}")
    block_size, blocks = 8, [3, 0]
    source = random_payload(45, 10, torch.bfloat16, 2, seed)
    pool = BlockPool(num_blocks=4, block_size=block_size, dim=10, dtype=torch.bfloat16, deepstack_layers=2)
    poison_pool(pool)
    rows = poisoned_rows(pool, source.num_tokens)
    sent = 0
    while sent < source.num_tokens:
        count = min(len(blocks) * block_size, source.num_tokens - sent)
        pool.write(source, blocks, start=sent, count=count)
        pool.read_into(blocks, count, rows, out_start=sent)
        sent += count
    result = Payload(*rows[:3], mrope_delta=source.mrope_delta, deepstack=rows.deepstack)
    assert result.mismatches(source) == []


def test_extra_blocks_beyond_the_tokens_are_not_touched():
    source = random_payload(5, 4, torch.float32, 0, 99)
    pool = BlockPool(num_blocks=4, block_size=4, dim=4, dtype=torch.float32)
    poison_pool(pool)
    before = pool_bits(pool)
    pool.write(source, [2, 0, 3])  # 5 tokens need 2 blocks; block 3 is spare
    assert_untouched_outside(pool, before, [2, 0, 3], 5)
    assert torch.isnan(pool.tensors.embeddings[3]).all()
    assert pool.read([2, 0, 3], 5, source.mrope_delta).mismatches(source) == []


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("dtype, element", [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_bytes_per_token_and_nbytes(dtype, element, k):
    pool = BlockPool(num_blocks=5, block_size=16, dim=1000, dtype=dtype, deepstack_layers=k)
    per_token = 1000 * element * (1 + k) + 4 + 3 * 4
    assert pool.bytes_per_token == per_token
    assert pool.nbytes == 5 * 16 * per_token
    actual = sum(t.numel() * t.element_size() for t in pool.tensors if t is not None)
    assert pool.nbytes == actual
    assert (pool.tensors.deepstack is None) == (k == 0)


def test_pool_tensor_layout():
    pool = BlockPool(num_blocks=3, block_size=8, dim=5, dtype=torch.float16, deepstack_layers=2)
    assert pool.tensors.embeddings.shape == (3, 8, 5)
    assert pool.tensors.deepstack.shape == (3, 8, 10)
    assert pool.tensors.fill_ids.shape == (3, 8)
    assert pool.tensors.mrope_positions.shape == (3, 3, 8)
    assert pool.device == torch.device("cpu")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"block_size": 0}, "block_size"),
        ({"dim": 0}, "dim"),
        ({"dim": 2.0}, "dim"),
        ({"deepstack_layers": -1}, "deepstack_layers"),
        ({"dtype": torch.float64}, "dtype"),
        ({"dtype": torch.int32}, "dtype"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, field):
    args = {"num_blocks": 2, "block_size": 4, "dim": 8, "dtype": torch.bfloat16, "deepstack_layers": 0, **kwargs}
    with pytest.raises(ValueError, match=f"BlockPool.{field}"):
        BlockPool(**args)


# ---------------------------------------------------------------- compatibility and range errors


def make_pool(**overrides) -> BlockPool:
    args = {"num_blocks": 4, "block_size": 4, "dim": 6, "dtype": torch.bfloat16, "deepstack_layers": 1, **overrides}
    return BlockPool(**args)


@pytest.mark.parametrize(
    "payload_args, field, words",
    [
        ({"d": 7}, "embeddings", "D=7"),
        ({"dtype": torch.float16}, "embeddings", "float16"),
        ({"k": 0}, "deepstack", "K=0"),
        ({"k": 2}, "deepstack", "K=2"),
    ],
    ids=["dim", "dtype", "no-deepstack", "more-deepstack"],
)
def test_check_compatible_names_the_field(payload_args, field, words):
    args = {"n": 3, "d": 6, "dtype": torch.bfloat16, "k": 1, "seed": 5, **payload_args}
    payload = random_payload(**args)
    pool = make_pool()
    poison_pool(pool)
    before = pool_bits(pool)
    with pytest.raises(ValueError) as info:
        pool.write(payload, [0])
    message = str(info.value)
    assert f"payload.{field}" in message and words in message, message
    assert all(torch.equal(a, b) for a, b in zip(before, pool_bits(pool), strict=True))


def test_check_compatible_device():
    payload = random_payload(3, 6, torch.bfloat16, 1, 6).to("meta")
    with pytest.raises(ValueError, match="payload.embeddings.*meta"):
        make_pool().check_compatible(payload)


def test_check_compatible_accepts_matching_payload():
    make_pool().check_compatible(random_payload(3, 6, torch.bfloat16, 1, 7))


@pytest.mark.parametrize(
    "blocks, start, count, match",
    [
        ([0, 1, 2], -1, 3, "outside"),
        ([0, 1, 2], 0, -1, "outside"),
        ([0, 1, 2], 8, 3, "outside"),  # 8 + 3 > 10 tokens
        ([0, 1, 2], 11, None, "outside"),
        ([0, 1, 2], 0, 11, "outside"),
        ([0, 1], 0, 10, "blocks"),  # 10 tokens need 3 blocks of 4
        ([0, 1, 4], 0, 10, "out of range"),  # the pool has blocks 0..3
        ([0, -1, 2], 0, 10, "out of range"),
        ([0, 1, 0], 0, 10, "more than once"),
        ([0, 1, 2], 0.0, 3, "start"),
        ([0, 1, 2], 0, 3.0, "count"),
    ],
    ids=[
        "negative-start", "negative-count", "past-end", "start-past-end", "count-past-end",
        "too-few-blocks", "block-too-big", "block-negative", "block-repeated", "float-start", "float-count",
    ],
)
def test_write_bad_range_raises_and_writes_nothing(blocks, start, count, match):
    payload = random_payload(10, 6, torch.bfloat16, 1, 8)
    pool = make_pool()
    poison_pool(pool)
    before = pool_bits(pool)
    with pytest.raises(ValueError, match=match):
        pool.write(payload, blocks, start=start, count=count)
    assert all(torch.equal(a, b) for a, b in zip(before, pool_bits(pool), strict=True))


@pytest.mark.parametrize(
    "blocks, num_tokens, match",
    [
        ([0, 4], 5, "out of range"),
        ([0], 5, "blocks"),
        ([-1], 2, "out of range"),
        ([0], -1, "num_tokens"),
        ([0], 0, "num_tokens"),
        ([0], 2.0, "num_tokens"),
    ],
)
def test_read_bad_range_raises(blocks, num_tokens, match):
    pool = make_pool()
    poison_pool(pool)
    with pytest.raises(ValueError, match=match):
        pool.read(blocks, num_tokens, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_pool_accepts_payload_on_default_cuda_device():
    pool = make_pool(device="cuda")
    payload = random_payload(3, 6, torch.bfloat16, 1, 9).to("cuda")
    pool.check_compatible(payload)
    pool.write(payload, [2])
    assert pool.read([2], 3, payload.mrope_delta).mismatches(payload) == []
