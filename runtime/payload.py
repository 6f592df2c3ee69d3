"""`Payload`: what the encoder produces for one request, validated once at the door."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMBEDDING_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# Bit-exact comparison reinterprets floats as integers of the same width, so NaN
# payloads compare equal to themselves and -0.0 differs from +0.0.
_BITS_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"payload.{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


@dataclass(frozen=True, eq=False)
class Payload:
    """One request's tensors: `embeddings [N, D]`, `fill_ids [N]` int32,
    `mrope_positions [3, N]` int32, `mrope_delta` (int64 range) and optional
    `deepstack [N, K*D]` in the embeddings' dtype. All on one device, contiguous."""

    embeddings: torch.Tensor
    fill_ids: torch.Tensor
    mrope_positions: torch.Tensor
    mrope_delta: int
    deepstack: torch.Tensor | None = None

    def __post_init__(self) -> None:
        emb = _check_tensor("embeddings", self.embeddings)
        if emb.dim() != 2:
            raise ValueError(f"payload.embeddings: expected shape [N, D], got {list(emb.shape)}")
        n, d = emb.shape
        if n < 1:
            raise ValueError(f"payload.embeddings: expected N >= 1 tokens, got N={n}")
        if d < 1:
            raise ValueError(f"payload.embeddings: expected D >= 1, got D={d}")
        if emb.dtype not in EMBEDDING_DTYPES:
            raise ValueError(
                f"payload.embeddings: dtype {_dtype_name(emb.dtype)} not supported, "
                "expected bfloat16, float16 or float32"
            )
        device = emb.device

        ids = _check_tensor("fill_ids", self.fill_ids)
        if ids.dim() != 1 or ids.shape[0] != n:
            raise ValueError(f"payload.fill_ids: expected shape [{n}], got {list(ids.shape)}")
        if ids.dtype != torch.int32:
            raise ValueError(f"payload.fill_ids: expected dtype int32, got {_dtype_name(ids.dtype)}")

        pos = _check_tensor("mrope_positions", self.mrope_positions)
        if pos.dim() != 2 or tuple(pos.shape) != (3, n):
            raise ValueError(f"payload.mrope_positions: expected shape [3, {n}], got {list(pos.shape)}")
        if pos.dtype != torch.int32:
            raise ValueError(
                f"payload.mrope_positions: expected dtype int32, got {_dtype_name(pos.dtype)}"
            )

        delta = self.mrope_delta
        if isinstance(delta, torch.Tensor):
            if (
                delta.numel() != 1
                or delta.dtype.is_floating_point
                or delta.dtype.is_complex
                or delta.dtype == torch.bool
            ):
                raise ValueError(
                    f"payload.mrope_delta: expected an integer scalar, got tensor {list(delta.shape)} "
                    f"{_dtype_name(delta.dtype)}"
                )
            if delta.is_meta:
                raise ValueError("payload.mrope_delta: a meta tensor holds no value, expected an int")
            delta = int(delta.item())
        elif isinstance(delta, bool) or not hasattr(delta, "__index__"):
            raise ValueError(f"payload.mrope_delta: expected an int, got {type(delta).__name__}")
        delta = int(delta)
        if not INT64_MIN <= delta <= INT64_MAX:
            raise ValueError(f"payload.mrope_delta={delta}: expected a value in the int64 range")
        object.__setattr__(self, "mrope_delta", delta)

        tensors = {"fill_ids": ids, "mrope_positions": pos}
        if self.deepstack is not None:
            deep = _check_tensor("deepstack", self.deepstack)
            if deep.dim() != 2 or deep.shape[0] != n or deep.shape[1] < d or deep.shape[1] % d:
                raise ValueError(
                    f"payload.deepstack: expected shape [{n}, K*{d}] with K >= 1, got {list(deep.shape)}"
                )
            if deep.dtype != emb.dtype:
                raise ValueError(
                    f"payload.deepstack: expected dtype {_dtype_name(emb.dtype)} (same as embeddings), "
                    f"got {_dtype_name(deep.dtype)}"
                )
            tensors["deepstack"] = deep
        for name, tensor in tensors.items():
            if tensor.device != device:
                raise ValueError(
                    f"payload.{name}: on {tensor.device}, expected {device} (same device as embeddings)"
                )
        for name in ("embeddings", *tensors):
            tensor = getattr(self, name)
            if not tensor.is_contiguous():
                object.__setattr__(self, name, tensor.contiguous())

    @classmethod
    def _trusted(cls, embeddings: torch.Tensor, fill_ids: torch.Tensor, mrope_positions: torch.Tensor,
                 mrope_delta: int, deepstack: torch.Tensor | None = None) -> Payload:
        """A Payload of tensors embxfer made itself (validated by construction): no checks."""
        payload = object.__new__(cls)
        for name, value in (("embeddings", embeddings), ("fill_ids", fill_ids),
                            ("mrope_positions", mrope_positions), ("mrope_delta", mrope_delta),
                            ("deepstack", deepstack)):
            object.__setattr__(payload, name, value)
        return payload

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def deepstack_layers(self) -> int:
        """K: how many extra hidden states each token carries (0 without deepstack)."""
        return 0 if self.deepstack is None else self.deepstack.shape[1] // self.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    @property
    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.embeddings, self.fill_ids, self.mrope_positions))
        if self.deepstack is not None:
            total += self.deepstack.numel() * self.deepstack.element_size()
        return total + 8  # mrope_delta

    def to(self, device: torch.device | str) -> Payload:
        return Payload(
            embeddings=self.embeddings.to(device),
            fill_ids=self.fill_ids.to(device),
            mrope_positions=self.mrope_positions.to(device),
            mrope_delta=self.mrope_delta,
            deepstack=None if self.deepstack is None else self.deepstack.to(device),
        )

    def bit_equal(self, other: Payload) -> bool:
        """True when every bit of every field agrees (NaN payloads included)."""
        return not self.mismatches(other)

    def mismatches(self, other: Payload) -> list[str]:
        """Names of the fields that differ from `other`, bit for bit; empty when equal."""
        diffs: list[str] = []
        if self.mrope_delta != other.mrope_delta:
            diffs.append("mrope_delta")
        for name in ("embeddings", "fill_ids", "mrope_positions", "deepstack"):
            a, b = getattr(self, name), getattr(other, name)
            if a is None or b is None:
                if a is not b:
                    diffs.append(name)
                continue
            if a.shape != b.shape or a.dtype != b.dtype:
                diffs.append(name)
                continue
            view = _BITS_VIEW.get(a.dtype)
            if view is not None:
                a, b = a.view(view), b.view(view)
            if not torch.equal(a, b.to(a.device)):
                diffs.append(name)
        return diffs


@dataclass(frozen=True)
class RowSpec:
    """The shape of one token's rows: what both sides must agree on."""

    dim: int
    deepstack_layers: int
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self) -> None:
        for name, value, low in (("dim", self.dim, 1), ("deepstack_layers", self.deepstack_layers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
        if self.dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"dtype={self.dtype}: expected torch.bfloat16, torch.float16 or torch.float32")

    @property
    def deepstack_dim(self) -> int:
        return self.dim * self.deepstack_layers

    @property
    def bytes_per_token(self) -> int:
        return self.dtype.itemsize * (self.dim + self.deepstack_dim) + 4 * (1 + 3)

    def check_payload(self, payload: Payload, owner: str = "endpoint") -> None:
        """ValueError naming the first field of `payload` this `owner` cannot carry."""
        if payload.dim != self.dim:
            raise ValueError(f"payload.embeddings: D={payload.dim}, expected {self.dim} (the {owner}'s dim)")
        if payload.dtype != self.dtype:
            raise ValueError(f"payload.embeddings: dtype {payload.dtype}, expected {self.dtype} (the {owner}'s dtype)")
        if payload.deepstack_layers != self.deepstack_layers:
            raise ValueError(
                f"payload.deepstack: K={payload.deepstack_layers}, expected {self.deepstack_layers} "
                f"(the {owner}'s deepstack layers)"
            )
        if payload.device != self.device:
            raise ValueError(f"payload.embeddings: on {payload.device}, expected {self.device} (the {owner}'s device)")
