"""The staging buffer's byte layout: the one place it is defined.

A staging buffer is a 1-D `torch.uint8` tensor that carries a *batch* of segments in
one message; segment `i` holds `counts[i]` tokens of one request (or one round of it).
pack / pack_rows write it, unpack / unpack_to_rows read it, and the wire carries it as
opaque bytes. With T = sum(counts) tokens in the batch, the buffer holds one region per
field, each a C-contiguous array in payload shape over all T tokens:

    offset (bytes)                    field             shape        dtype
    --------------------------------  ----------------  -----------  ----------
    0                                 embeddings        [T, D]       dtype
    deepstack_offset (if K*D > 0)     deepstack         [T, K*D]     dtype
    fill_ids_offset                   fill_ids          [T]          int32
    mrope_offset                      mrope_positions   [3, T]       int32
                                                        (row t over all T tokens,
                                                        then h, then w)

Segment i owns tokens `[token_offsets[i], token_offsets[i] + counts[i])` of every
region, in batch order. Every region starts on a multiple of `ALIGNMENT` = 128 bytes
(padding between regions is unspecified), and `nbytes` is the end of the last region
rounded up to 128. A segment's rows start at a multiple of the row length inside its
region, so they are exactly as aligned as rows of a pool or of a payload: every copy
can use 16-byte accesses whenever the row length allows. The staging tensor itself
must start on a 16-byte boundary (any torch allocation does).

Why field after field over the whole batch (rather than segment after segment): a
message of S segments is then 4 contiguous regions, so the torch path (CPU) packs it
with one `torch.cat` per field and unpacks it with one indexed copy per field, however
many requests it holds: its fixed cost per message does not grow with S. `views(i)`
still gives one segment as payload-shaped tensors (its mrope view is strided).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .types import RowTensors

ALIGNMENT = 128
EMBEDDING_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class StagingLayout:
    """Where each field of each segment lives in a staging buffer (see module docstring)."""

    counts: tuple[int, ...]
    dim: int
    deepstack_dim: int
    dtype: torch.dtype
    token_offsets: tuple[int, ...]
    num_tokens: int
    deepstack_offset: int
    fill_ids_offset: int
    mrope_offset: int
    nbytes: int

    embeddings_offset = 0

    @property
    def num_segments(self) -> int:
        return len(self.counts)

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @cached_property
    def offset_arrays(self) -> np.ndarray:
        """int64 [5, S]: per segment, the byte offsets of its embeddings, deepstack,
        fill_ids and mrope t-row in the buffer, then the element stride between the mrope
        rows (T). What the Triton launcher needs to address a staging side."""
        tokens = np.asarray(self.token_offsets, dtype=np.int64).reshape(-1)
        row = self.dim * self.element_size
        deep_row = self.deepstack_dim * self.element_size
        return np.stack([
            tokens * row,
            self.deepstack_offset + tokens * deep_row,
            self.fill_ids_offset + 4 * tokens,
            self.mrope_offset + 4 * tokens,
            np.full_like(tokens, self.num_tokens),
        ])

    def regions(self, staging: torch.Tensor) -> RowTensors:
        """The whole batch as payload-shaped tensors over all T tokens (views, no copy)."""
        check_staging(staging, self)
        return self._regions(staging)

    def _regions(self, staging: torch.Tensor) -> RowTensors:
        return self.per_buffer(staging, "regions", self._make_regions)

    def per_buffer(self, staging: torch.Tensor, what: str, make):
        """`make(staging)`, made once per (layout, buffer, `what`): staging buffers live as
        long as their channel and a message's layout repeats, so views and tables of a
        buffer are built on its first message only (a few buffers per layout are kept)."""
        key = (what, staging.data_ptr(), staging.numel(), staging.device)
        cache = self.__dict__.setdefault("_per_buffer", {})
        value = cache.get(key)
        if value is None:
            if len(cache) >= 16:
                cache.clear()
            value = cache[key] = make(staging)
        return value

    def _make_regions(self, staging: torch.Tensor) -> RowTensors:
        t, element = self.num_tokens, self.element_size
        embeddings = staging[: t * self.dim * element].view(self.dtype).view(t, self.dim)
        deepstack = None
        if self.deepstack_dim:
            end = self.deepstack_offset + t * self.deepstack_dim * element
            deepstack = staging[self.deepstack_offset : end].view(self.dtype).view(t, self.deepstack_dim)
        fill_ids = staging[self.fill_ids_offset : self.fill_ids_offset + 4 * t].view(torch.int32)
        mrope = staging[self.mrope_offset : self.mrope_offset + 12 * t].view(torch.int32).view(3, t)
        return RowTensors(embeddings, fill_ids, mrope, deepstack)

    def views(self, staging: torch.Tensor, index: int) -> RowTensors:
        """Segment `index` of `staging` as payload-shaped tensors (views, no copy)."""
        regions = self.regions(staging)
        first = self.token_offsets[index]
        end = first + self.counts[index]
        return RowTensors(
            embeddings=regions.embeddings[first:end],
            fill_ids=regions.fill_ids[first:end],
            mrope_positions=regions.mrope_positions[:, first:end],
            deepstack=None if regions.deepstack is None else regions.deepstack[first:end],
        )


def staging_layout(
    counts: Sequence[int], dim: int, deepstack_dim: int, dtype: torch.dtype
) -> StagingLayout:
    """The layout of a staging buffer for segments of `counts` tokens each.

    `dim` is D, `deepstack_dim` is K*D (0: no deepstack), `dtype` the embeddings' dtype.
    """
    counts = tuple(counts)
    for name, value, low in (("dim", dim, 1), ("deepstack_dim", deepstack_dim, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"staging_layout: {name}={value!r}, expected an integer >= {low}")
    offsets = []
    total = 0
    for i, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"staging_layout: counts[{i}]={n!r}, expected an integer >= 0")
        offsets.append(total)
        total += n
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"staging_layout: dtype={dtype}, expected bfloat16, float16 or float32")
    element = dtype.itemsize
    deepstack_offset = _align(total * dim * element)
    fill_ids_offset = _align(deepstack_offset + total * deepstack_dim * element)
    mrope_offset = _align(fill_ids_offset + 4 * total)
    return StagingLayout(
        counts=counts,
        dim=dim,
        deepstack_dim=deepstack_dim,
        dtype=dtype,
        token_offsets=tuple(offsets),
        num_tokens=total,
        deepstack_offset=deepstack_offset,
        fill_ids_offset=fill_ids_offset,
        mrope_offset=mrope_offset,
        nbytes=_align(mrope_offset + 12 * total),
    )


def staging_nbytes(num_tokens: int, dim: int, deepstack_dim: int, dtype: torch.dtype) -> int:
    """Bytes a staging buffer needs for `num_tokens` tokens in any number of segments (the
    layout depends only on the total)."""
    return staging_layout([num_tokens], dim, deepstack_dim, dtype).nbytes


def tokens_that_fit(nbytes: int, dim: int, deepstack_dim: int, dtype: torch.dtype) -> int:
    """The most tokens whose staged form fits `nbytes` bytes (0 if not even one)."""
    per_token = dtype.itemsize * (dim + deepstack_dim) + 16
    count = max(0, nbytes // per_token)
    while count and staging_nbytes(count, dim, deepstack_dim, dtype) > nbytes:
        count -= 1
    return count


def check_staging(staging: torch.Tensor, layout: StagingLayout) -> None:
    """ValueError unless `staging` is a 16-byte-aligned contiguous uint8 buffer that fits `layout`."""
    if not isinstance(staging, torch.Tensor):
        raise ValueError(f"staging: got {type(staging).__name__}, expected a torch.uint8 tensor")
    if staging.dtype != torch.uint8 or staging.dim() != 1:
        raise ValueError(
            f"staging: dtype {staging.dtype}, shape {tuple(staging.shape)}; expected a 1-D torch.uint8 tensor"
        )
    if not staging.is_contiguous():
        raise ValueError("staging: not contiguous")
    if staging.numel() < layout.nbytes:
        raise ValueError(
            f"staging: {staging.numel()} bytes, too small: the layout needs {layout.nbytes}"
        )
    if staging.data_ptr() % 16:
        raise ValueError(f"staging: data pointer {staging.data_ptr():#x} is not 16-byte aligned")
