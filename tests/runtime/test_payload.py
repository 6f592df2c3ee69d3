"""Payload: the validation matrix (every field, every rule) and bit-exact comparison."""

from __future__ import annotations

import pytest
import torch

from embxfer import Payload

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def random_float_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Uniformly random bit patterns: NaNs, infinities and -0.0 included."""
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, shape, dtype=bits, generator=gen).view(dtype)


def fields(n: int = 5, d: int = 8, dtype: torch.dtype = torch.bfloat16, k: int = 0, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embeddings": random_float_bits((n, d), dtype, gen),
        "fill_ids": torch.randint(0, (1 << 31) - 1, (n,), dtype=torch.int32, generator=gen),
        "mrope_positions": torch.randint(0, 1 << 20, (3, n), dtype=torch.int32, generator=gen),
        "mrope_delta": -12345,
        "deepstack": random_float_bits((n, k * d), dtype, gen) if k else None,
    }


def expect_error(field: str, **changes) -> str:
    kwargs = fields(k=2)
    kwargs.update(changes)
    with pytest.raises(ValueError) as info:
        Payload(**kwargs)
    message = str(info.value)
    assert f"payload.{field}" in message, message
    return message


# ---------------------------------------------------------------- valid payloads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 7])
def test_valid_payload_keeps_values_and_reports_shape(dtype, k, n):
    kw = fields(n=n, d=6, dtype=dtype, k=k, seed=n * 10 + k)
    p = Payload(**kw)
    assert p.num_tokens == n
    assert p.dim == 6
    assert p.deepstack_layers == k
    assert p.dtype == dtype
    assert p.device == torch.device("cpu")
    assert p.mrope_delta == -12345
    assert torch.equal(p.embeddings.view(BITS[dtype]), kw["embeddings"].view(BITS[dtype]))
    assert torch.equal(p.fill_ids, kw["fill_ids"])
    assert torch.equal(p.mrope_positions, kw["mrope_positions"])
    if k:
        assert torch.equal(p.deepstack.view(BITS[dtype]), kw["deepstack"].view(BITS[dtype]))
    else:
        assert p.deepstack is None
    element = torch.empty((), dtype=dtype).element_size()
    assert p.nbytes == n * 6 * element * (1 + k) + n * 4 + 3 * n * 4 + 8


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize("field", ["embeddings", "fill_ids", "mrope_positions", "deepstack"])
@pytest.mark.parametrize("value", [[1, 2, 3], 3, "tensor"])
def test_non_tensor_field_rejected(field, value):
    message = expect_error(field, **{field: value})
    assert "torch.Tensor" in message


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize(
    "shape", [(5,), (5, 8, 1), (1, 5, 8), ()], ids=["rank1", "rank3", "rank3-lead", "scalar"]
)
def test_embeddings_wrong_rank(shape):
    expect_error("embeddings", embeddings=torch.ones(shape, dtype=torch.bfloat16))


def test_zero_tokens_rejected():
    message = expect_error(
        "embeddings",
        embeddings=torch.ones(0, 8, dtype=torch.bfloat16),
        fill_ids=torch.ones(0, dtype=torch.int32),
        mrope_positions=torch.ones(3, 0, dtype=torch.int32),
        deepstack=None,
    )
    assert "N=0" in message


def test_zero_dim_rejected():
    expect_error("embeddings", embeddings=torch.ones(5, 0, dtype=torch.bfloat16), deepstack=None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.bool, torch.uint8])
def test_embeddings_wrong_dtype(dtype):
    emb = torch.ones(5, 8, dtype=dtype)
    message = expect_error("embeddings", embeddings=emb, deepstack=None)
    assert str(dtype).removeprefix("torch.") in message


# ---------------------------------------------------------------- fill_ids


@pytest.mark.parametrize("shape", [(4,), (6,), (5, 1), (1, 5), ()])
def test_fill_ids_wrong_shape(shape):
    message = expect_error("fill_ids", fill_ids=torch.ones(shape, dtype=torch.int32))
    assert "[5]" in message


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8, torch.float32, torch.bool])
def test_fill_ids_wrong_dtype(dtype):
    message = expect_error("fill_ids", fill_ids=torch.ones(5, dtype=dtype))
    assert "int32" in message


# ---------------------------------------------------------------- mrope_positions


@pytest.mark.parametrize("shape", [(5, 3), (3, 4), (3, 6), (2, 5), (4, 5), (15,), (3, 5, 1), (1, 3, 5)])
def test_mrope_positions_wrong_shape(shape):
    message = expect_error("mrope_positions", mrope_positions=torch.ones(shape, dtype=torch.int32))
    assert "[3, 5]" in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.int16])
def test_mrope_positions_wrong_dtype(dtype):
    message = expect_error("mrope_positions", mrope_positions=torch.ones(3, 5, dtype=dtype))
    assert "int32" in message


# ---------------------------------------------------------------- deepstack


@pytest.mark.parametrize(
    "shape",
    [(5, 7), (5, 12), (5, 4), (5, 0), (4, 16), (6, 16), (5,), (5, 2, 8)],
    ids=["not-multiple", "1.5D", "half-D", "K0", "N-short", "N-long", "rank1", "rank3"],
)
def test_deepstack_wrong_shape(shape):
    message = expect_error("deepstack", deepstack=torch.ones(shape, dtype=torch.bfloat16))
    assert "K*8" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int32])
def test_deepstack_dtype_must_match_embeddings(dtype):
    message = expect_error("deepstack", deepstack=torch.ones(5, 16, dtype=dtype))
    assert "bfloat16" in message


def test_deepstack_none_is_allowed():
    p = Payload(**fields(k=0))
    assert p.deepstack is None and p.deepstack_layers == 0


# ---------------------------------------------------------------- mrope_delta


@pytest.mark.parametrize(
    "value",
    [True, False, 1.0, 2.5, float("nan"), "3", None, [1]],
    ids=["True", "False", "float-int", "float", "nan", "str", "None", "list"],
)
def test_mrope_delta_non_int_rejected(value):
    expect_error("mrope_delta", mrope_delta=value)


@pytest.mark.parametrize("value", [1 << 63, -(1 << 63) - 1, 1 << 100])
def test_mrope_delta_out_of_int64_range(value):
    message = expect_error("mrope_delta", mrope_delta=value)
    assert "int64" in message


@pytest.mark.parametrize("value", [(1 << 63) - 1, -(1 << 63), 0, -1, 7])
def test_mrope_delta_int64_limits_accepted(value):
    p = Payload(**{**fields(), "mrope_delta": value})
    assert p.mrope_delta == value and type(p.mrope_delta) is int


@pytest.mark.parametrize(
    "tensor, expected",
    [
        (torch.tensor(-42), -42),
        (torch.tensor([17], dtype=torch.int32), 17),
        (torch.tensor([[5]], dtype=torch.int16), 5),
        (torch.tensor((1 << 63) - 1, dtype=torch.int64), (1 << 63) - 1),
    ],
    ids=["0d-int64", "1d-int32", "2d-int16", "int64-max"],
)
def test_mrope_delta_integer_tensor_becomes_int(tensor, expected):
    p = Payload(**{**fields(), "mrope_delta": tensor})
    assert type(p.mrope_delta) is int and p.mrope_delta == expected


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(True),
        torch.tensor(1.0),
        torch.tensor(3, dtype=torch.bfloat16),
        torch.tensor(1 + 0j),
        torch.tensor([1, 2]),
        torch.tensor([], dtype=torch.int64),
        torch.tensor(1, device="meta"),
    ],
    ids=["bool", "float", "bf16", "complex", "two-elements", "empty", "meta"],
)
def test_mrope_delta_bad_tensor_rejected(tensor):
    expect_error("mrope_delta", mrope_delta=tensor)


def test_mrope_delta_uint64_above_int64_rejected():
    if not hasattr(torch, "uint64"):
        pytest.skip("torch without uint64")
    expect_error("mrope_delta", mrope_delta=torch.tensor(1 << 63, dtype=torch.uint64))


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("field", ["fill_ids", "mrope_positions", "deepstack"])
def test_field_on_other_device_than_embeddings(field):
    kw = fields(k=2)
    message = expect_error(field, **{field: kw[field].to("meta")})
    assert "meta" in message and "cpu" in message


@pytest.mark.parametrize("field", ["fill_ids", "mrope_positions", "deepstack"])
def test_embeddings_on_other_device_than_the_rest(field):
    kw = fields(k=2)
    # Everything on meta except one field: that field is the one named.
    moved = {name: (t.to("meta") if isinstance(t, torch.Tensor) and name != field else t) for name, t in kw.items()}
    with pytest.raises(ValueError, match=f"payload.{field}"):
        Payload(**moved)


def test_all_on_meta_is_one_device():
    kw = fields(k=1)
    p = Payload(**{name: (t.to("meta") if isinstance(t, torch.Tensor) else t) for name, t in kw.items()})
    assert p.device == torch.device("meta")


# ---------------------------------------------------------------- contiguity


def test_non_contiguous_inputs_become_contiguous_with_same_values():
    gen = torch.Generator().manual_seed(11)
    n, d, k = 6, 5, 2
    emb_t = random_float_bits((d, n), torch.float16, gen)  # [D, N] transposed below
    ids_wide = torch.randint(0, 1000, (2 * n,), dtype=torch.int32, generator=gen)
    pos_t = torch.randint(0, 1000, (n, 3), dtype=torch.int32, generator=gen)
    deep_t = random_float_bits((k * d, n), torch.float16, gen)
    inputs = {
        "embeddings": emb_t.T,
        "fill_ids": ids_wide[::2],
        "mrope_positions": pos_t.T,
        "deepstack": deep_t.T,
    }
    for tensor in inputs.values():
        assert not tensor.is_contiguous()
    p = Payload(**inputs, mrope_delta=3)
    for name, tensor in inputs.items():
        stored = getattr(p, name)
        assert stored.is_contiguous(), name
        assert stored.shape == tensor.shape, name
        bits = BITS.get(tensor.dtype)
        a = stored.view(bits) if bits else stored
        b = tensor.view(bits) if bits else tensor
        assert torch.equal(a, b), name


def test_contiguous_inputs_are_not_copied():
    kw = fields(k=1)
    p = Payload(**kw)
    for name in ("embeddings", "fill_ids", "mrope_positions", "deepstack"):
        assert getattr(p, name).data_ptr() == kw[name].data_ptr(), name


# ---------------------------------------------------------------- bit_equal / mismatches


def clone_fields(p: Payload) -> dict:
    return {
        "embeddings": p.embeddings.clone(),
        "fill_ids": p.fill_ids.clone(),
        "mrope_positions": p.mrope_positions.clone(),
        "mrope_delta": p.mrope_delta,
        "deepstack": None if p.deepstack is None else p.deepstack.clone(),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nan_payload_equals_itself_and_its_copy(dtype):
    kw = fields(n=4, d=3, dtype=dtype, k=1, seed=5)
    kw["embeddings"][0, 0] = float("nan")
    kw["deepstack"][1, 2] = float("nan")
    p = Payload(**kw)
    assert p.bit_equal(p)
    assert p.bit_equal(Payload(**clone_fields(p)))
    assert p.mismatches(Payload(**clone_fields(p))) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nan_payloads_with_different_bits_differ(dtype):
    kw = fields(n=4, d=3, dtype=dtype, seed=6)
    p = Payload(**kw)
    other = clone_fields(p)
    bits = other["embeddings"].view(BITS[dtype])
    bits[2, 1] = bits.new_tensor(0x7FC0 if dtype != torch.float32 else 0x7FC00000)
    p_nan = Payload(**{**clone_fields(p), "embeddings": bits.clone().view(dtype)})
    bits[2, 1] = bits.new_tensor(0x7FC1 if dtype != torch.float32 else 0x7FC00001)
    other_nan = Payload(**{**clone_fields(p), "embeddings": bits.view(dtype)})
    assert p_nan.embeddings[2, 1].isnan() and other_nan.embeddings[2, 1].isnan()
    assert p_nan.mismatches(other_nan) == ["embeddings"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_negative_zero_differs_from_positive_zero(dtype):
    kw = fields(n=3, d=2, dtype=dtype, seed=7)
    kw["embeddings"][1, 1] = 0.0
    p = Payload(**kw)
    other = clone_fields(p)
    other["embeddings"][1, 1] = -0.0
    q = Payload(**other)
    assert torch.equal(p.embeddings.float(), q.embeddings.float())  # numerically equal...
    assert not p.bit_equal(q)  # ...but not bit-equal
    assert p.mismatches(q) == ["embeddings"]


@pytest.mark.parametrize("field", ["embeddings", "fill_ids", "mrope_positions", "deepstack"])
def test_each_tensor_field_difference_detected(field):
    p = Payload(**fields(n=4, d=3, k=2, seed=8))
    other = clone_fields(p)
    tensor = other[field]
    flat = tensor.view(-1)
    if tensor.is_floating_point():
        bits = flat.view(BITS[tensor.dtype])
        bits[-1] ^= 1  # one bit of the last element
    else:
        flat[-1] += 1
    q = Payload(**other)
    assert p.mismatches(q) == [field]
    assert q.mismatches(p) == [field]
    assert not p.bit_equal(q)


def test_mrope_delta_difference_detected():
    p = Payload(**fields(seed=9))
    q = Payload(**{**clone_fields(p), "mrope_delta": p.mrope_delta + 1})
    assert p.mismatches(q) == ["mrope_delta"]


def test_deepstack_present_vs_absent_detected():
    kw = fields(n=4, d=3, k=1, seed=10)
    with_deep = Payload(**kw)
    without = Payload(**{**clone_fields(with_deep), "deepstack": None})
    assert with_deep.mismatches(without) == ["deepstack"]
    assert without.mismatches(with_deep) == ["deepstack"]


def test_dtype_difference_detected_even_with_same_values():
    kw = fields(n=2, d=2, dtype=torch.float32, seed=12)
    kw["embeddings"] = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    p = Payload(**kw)
    q = Payload(**{**clone_fields(p), "embeddings": p.embeddings.to(torch.float16)})
    assert p.mismatches(q) == ["embeddings"]


def test_different_lengths_differ_everywhere():
    p = Payload(**fields(n=4, d=3, k=1, seed=13))
    q = Payload(**fields(n=5, d=3, k=1, seed=13))
    assert p.mismatches(q) == ["embeddings", "fill_ids", "mrope_positions", "deepstack"]


# ---------------------------------------------------------------- to()


def test_to_same_device_is_bit_equal_copy_of_values():
    p = Payload(**fields(n=3, d=4, k=2, seed=14))
    q = p.to("cpu")
    assert q.bit_equal(p)
    assert q.mrope_delta == p.mrope_delta


def test_to_meta_moves_every_field():
    p = Payload(**fields(n=3, d=4, k=2, seed=15))
    q = p.to("meta")
    assert q.device == torch.device("meta")
    for name in ("embeddings", "fill_ids", "mrope_positions", "deepstack"):
        assert getattr(q, name).device == torch.device("meta"), name
        assert getattr(q, name).shape == getattr(p, name).shape, name
    assert q.mrope_delta == p.mrope_delta
    assert q.nbytes == p.nbytes
