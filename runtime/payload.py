"""`Payload`: what the encoder produces for one request, validated once at the door.

Besides the fixed fields a payload may declare its multimodal **items** (`Item`: a
content hash and the rows `[start, start + count)` the item occupies; the language side
caches items and the encoder engine skips the vision model for the ones it holds, see
`cache.py`) and carry a few small named **metadata** tensors (`image_grid_thw`, video
timestamps, per-item token counts: at most `records.MAX_METADATA_ENTRIES` of them and
`Config.max_metadata_bytes` in all), delivered with the payload on every language rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from embxfer.control import records as rec
from embxfer.kernels import as_bits

EMBEDDING_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"payload.{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


class Item(NamedTuple):
    """A multimodal item of a request: its content hash (bytes or str; e.g. vLLM's
    mm_hash, a digest of the pixels and processor settings) and the rows it occupies."""

    content_hash: bytes | str
    start: int
    count: int


_METADATA_CODES = {torch.int32: 1, torch.int64: 2, torch.float32: 3, torch.float64: 4, torch.uint8: 5,
                   torch.int16: 6, torch.float16: 8}
_METADATA_TORCH = {code: dtype for dtype, code in _METADATA_CODES.items()}
_BITS_OF = {torch.bfloat16: torch.int16}


def kept_rows(skipped: list[tuple[int, int]], total: int) -> tuple[list[tuple[int, int, int]], int]:
    """The stretches of a payload's rows that travel when the items at `skipped` ((start,
    count), in row order) stay behind: ([(payload row, wire row, count)], rows on the wire).
    The sender and the receiver both derive the wire's row order from this."""
    kept, wire, row = [], 0, 0
    for start, count in skipped:
        if start > row:
            kept.append((row, wire, start - row))
            wire += start - row
        row = start + count
    if row < total:
        kept.append((row, wire, total - row))
        wire += total - row
    return kept, wire


def content_hash_bytes(value: bytes | str, what: str = "content_hash") -> bytes:
    """An engine's content hash as 1..32 bytes (longer ones, e.g. hex strings of a
    SHA-256, are hashed down with BLAKE2b)."""
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes) or not value:
        raise ValueError(f"{what}={value!r:.60}: expected non-empty bytes or str")
    if len(value) > rec.MAX_HASH_BYTES:
        import hashlib

        value = hashlib.blake2b(value, digest_size=rec.MAX_HASH_BYTES).digest()
    return value


def check_items(items: object, num_tokens: int | None, what: str = "items") -> tuple[Item, ...]:
    """Items as a tuple of `Item` (hash as bytes), ValueError naming the first bad one:
    at most MAX_ITEMS, rows inside [0, N), in order, not overlapping."""
    if items is None:
        return ()
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise ValueError(f"{what}={items!r:.60}: expected a sequence of Item(content_hash, start, count)")
    checked = []
    end = 0
    for index, item in enumerate(items):
        try:
            content_hash, start, count = item
        except (TypeError, ValueError):
            raise ValueError(f"{what}[{index}]={item!r:.60}: expected Item(content_hash, start, count)") from None
        for name, value in (("start", start), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{what}[{index}].{name}={value!r}: expected an integer")
        if start < end or count < 1 or (num_tokens is not None and start + count > num_tokens):
            limit = f"[{end}, {num_tokens})" if num_tokens is not None else f"from {end} on"
            raise ValueError(f"{what}[{index}]: rows [{start}, {start + count}), expected inside {limit}, after "
                             "the item before it")
        checked.append(Item(content_hash_bytes(content_hash, f"{what}[{index}].content_hash"), start, count))
        end = start + count
    if len(checked) > rec.MAX_ITEMS:
        raise ValueError(f"{what}: {len(checked)} items, expected at most {rec.MAX_ITEMS}")
    return tuple(checked)


def metadata_records(metadata: Mapping[str, torch.Tensor], max_bytes: int,
                     bound: str = "config.max_metadata_bytes") -> tuple[rec.Metadata, ...]:
    """The metadata as it travels (raw little-endian bytes), ValueError naming the entry
    that is not a small tensor of a supported dtype, or the total past `max_bytes`."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"payload.metadata: expected a mapping of names to tensors, got {type(metadata).__name__}")
    if len(metadata) > rec.MAX_METADATA_ENTRIES:
        raise ValueError(f"payload.metadata: {len(metadata)} entries, expected at most {rec.MAX_METADATA_ENTRIES}")
    out, total = [], 0
    for name, tensor in metadata.items():
        if not isinstance(name, str) or not 1 <= len(name) <= rec.MAX_NAME_BYTES or not name.isascii() \
                or not all(c.isalnum() or c in "_.-" for c in name):
            raise ValueError(f"payload.metadata: name {name!r}: expected 1..{rec.MAX_NAME_BYTES} characters from "
                             "[A-Za-z0-9_.-]")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"payload.metadata[{name!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() > rec.MAX_METADATA_DIMS:
            raise ValueError(f"payload.metadata[{name!r}]: {tensor.dim()} dims, expected at most "
                             f"{rec.MAX_METADATA_DIMS}")
        dtype = tensor.dtype
        code = 7 if dtype == torch.bfloat16 else _METADATA_CODES.get(dtype)
        if code is None:
            raise ValueError(f"payload.metadata[{name!r}]: dtype {_dtype_name(dtype)}, expected one of int32, int64, "
                             "int16, uint8, float16, bfloat16, float32, float64")
        host = tensor.detach().to("cpu").contiguous()
        if dtype == torch.bfloat16:
            host = host.view(torch.int16)
        data = host.numpy().astype(host.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        total += len(data)
        if total > max_bytes:
            raise ValueError(f"payload.metadata: {total} bytes or more in all, expected at most {bound}={max_bytes}")
        out.append(rec.Metadata(name, code, tuple(tensor.shape), data))
    return tuple(out)


def metadata_tensors(entries: tuple[rec.Metadata, ...]) -> dict[str, torch.Tensor]:
    """The metadata as the language side hands it out: CPU tensors, by name."""
    out = {}
    for entry in entries:
        if entry.dtype == 7:  # bfloat16 travels as its bits
            array = np.frombuffer(entry.data, dtype="<i2").copy().reshape(entry.shape)
            out[entry.name] = torch.from_numpy(array).view(torch.bfloat16)
        else:
            array = np.frombuffer(entry.data, dtype=rec.METADATA_DTYPES[entry.dtype]).copy().reshape(entry.shape)
            out[entry.name] = torch.from_numpy(array).to(_METADATA_TORCH[entry.dtype])
    return out


@dataclass(frozen=True, eq=False)
class Payload:
    """One request's tensors: `embeddings [N, D]`, `fill_ids [N]` int32,
    `mrope_positions [3, N]` int32, `mrope_delta` (int64 range) and optional
    `deepstack [N, K*D]` in the embeddings' dtype. All on one device, contiguous.
    Optional `items` (`Item`s: which rows are which multimodal item) and `metadata`
    (small named tensors, see the module docstring)."""

    embeddings: torch.Tensor
    fill_ids: torch.Tensor
    mrope_positions: torch.Tensor
    mrope_delta: int
    deepstack: torch.Tensor | None = None
    items: tuple[Item, ...] = ()
    metadata: Mapping[str, torch.Tensor] = field(default_factory=dict)

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
        object.__setattr__(self, "items", check_items(self.items, n, "payload.items"))
        if self.metadata:
            # The wire's bound here; submit checks the engine's (config.max_metadata_bytes).
            metadata_records(self.metadata, rec.MAX_METADATA_BYTES, "records.MAX_METADATA_BYTES")
        object.__setattr__(self, "metadata", dict(self.metadata))

    @classmethod
    def _trusted(cls, embeddings: torch.Tensor, fill_ids: torch.Tensor, mrope_positions: torch.Tensor,
                 mrope_delta: int, deepstack: torch.Tensor | None = None, items: tuple[Item, ...] = (),
                 metadata: dict | None = None) -> Payload:
        """A Payload of tensors embxfer made itself (validated by construction): no checks."""
        payload = object.__new__(cls)
        # Frozen: the fields go straight into the instance's dict (one call, no __setattr__).
        payload.__dict__.update(embeddings=embeddings, fill_ids=fill_ids, mrope_positions=mrope_positions,
                                mrope_delta=mrope_delta, deepstack=deepstack, items=items, metadata=metadata or {})
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
            items=self.items,
            metadata=self.metadata,
        )

    def bit_equal(self, other: Payload) -> bool:
        """True when every bit of every field agrees (NaN payloads included)."""
        return not self.mismatches(other)

    def mismatches(self, other: Payload) -> list[str]:
        """Names of the fields that differ from `other`, bit for bit; empty when equal."""
        diffs: list[str] = []
        if self.mrope_delta != other.mrope_delta:
            diffs.append("mrope_delta")
        mine, theirs = self.metadata or {}, other.metadata or {}
        if set(mine) != set(theirs) or any(
                mine[k].shape != theirs[k].shape or mine[k].dtype != theirs[k].dtype
                or not torch.equal(mine[k].cpu().view(_BITS_OF.get(mine[k].dtype, mine[k].dtype)),
                                   theirs[k].cpu().view(_BITS_OF.get(theirs[k].dtype, theirs[k].dtype)))
                for k in mine if k in theirs):
            diffs.append("metadata")
        for name in ("embeddings", "fill_ids", "mrope_positions", "deepstack"):
            a, b = getattr(self, name), getattr(other, name)
            if a is None or b is None:
                if a is not b:
                    diffs.append(name)
                continue
            if a.shape != b.shape or a.dtype != b.dtype:
                diffs.append(name)
                continue
            a, b = as_bits(a), as_bits(b)
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

    @cached_property
    def is_cuda(self) -> bool:  # asked per message on the hot path: computed once
        return self.device.type == "cuda"

    @cached_property
    def bytes_per_token(self) -> int:  # asked per request on the hot path: computed once
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
