"""The staging buffer's byte layout: the one place it is defined.

A staging buffer is a 1-D `torch.uint8` tensor that carries a *batch* of segments in
one message; segment `i` holds `counts[i]` tokens of one request. pack writes it,
unpack / unpack_to_rows read it, and the wire carries it as opaque bytes.

Segments follow each other in batch order. Inside a segment the fields follow each
other in this order, each one a C-contiguous array in payload shape:

    offset (bytes)                              field             shape       dtype
    ------------------------------------------  ----------------  ----------  ----------
    segment_offsets[i]      = embeddings_offsets[i]   embeddings  [n, D]      dtype
    deepstack_offsets[i]    (only if deepstack_dim)   deepstack   [n, K*D]    dtype
    fill_ids_offsets[i]                               fill_ids    [n]         int32
    mrope_offsets[i]                                  mrope       [3, n]      int32
                                                      (row t, then h, then w)

Every field starts on a multiple of `ALIGNMENT` = 128 bytes (padding bytes between
them are unspecified), so every section can be read with full-width 16-byte vector
accesses and a 128-byte line never holds two fields. A segment of 0 tokens takes no
bytes. `nbytes` is the end of the last field rounded up to 128 bytes. The staging
tensor itself must start on a 16-byte boundary (any torch allocation does).

Field-after-field inside a segment (rather than all embeddings of all segments first)
keeps one request's data in one range of bytes, so a segment can be viewed, checked or
forwarded without touching the others.
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
    segment_offsets: tuple[int, ...]
    embeddings_offsets: tuple[int, ...]
    deepstack_offsets: tuple[int, ...]
    fill_ids_offsets: tuple[int, ...]
    mrope_offsets: tuple[int, ...]
    nbytes: int

    @property
    def num_segments(self) -> int:
        return len(self.counts)

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @cached_property
    def offset_arrays(self) -> np.ndarray:
        """int64 [5, S]: embeddings, deepstack, fill_ids and mrope byte offsets, then the
        stride between mrope rows (the count), per segment (for the launchers)."""
        return np.array(
            [
                self.embeddings_offsets,
                self.deepstack_offsets,
                self.fill_ids_offsets,
                self.mrope_offsets,
                self.counts,
            ],
            dtype=np.int64,
        ).reshape(5, len(self.counts))

    def views(self, staging: torch.Tensor, index: int) -> RowTensors:
        """Segment `index` of `staging` as payload-shaped tensors (views, no copy)."""
        check_staging(staging, self)
        n = self.counts[index]
        element = self.element_size

        def field(offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
            return staging[offset : offset + nbytes].view(dtype)

        embeddings = field(self.embeddings_offsets[index], n * self.dim * element, self.dtype)
        deepstack = None
        if self.deepstack_dim:
            deepstack = field(
                self.deepstack_offsets[index], n * self.deepstack_dim * element, self.dtype
            )
            deepstack = deepstack.view(n, self.deepstack_dim)
        return RowTensors(
            embeddings=embeddings.view(n, self.dim),
            fill_ids=field(self.fill_ids_offsets[index], 4 * n, torch.int32),
            mrope_positions=field(self.mrope_offsets[index], 12 * n, torch.int32).view(3, n),
            deepstack=deepstack,
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
    for i, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"staging_layout: counts[{i}]={n!r}, expected an integer >= 0")
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"staging_layout: dtype={dtype}, expected bfloat16, float16 or float32")
    element = dtype.itemsize
    segments, embeddings, deepstack, fill_ids, mrope = [], [], [], [], []
    offset = 0
    for n in counts:
        segments.append(offset)
        embeddings.append(offset)
        offset = _align(offset + n * dim * element)
        deepstack.append(offset)
        offset = _align(offset + n * deepstack_dim * element)
        fill_ids.append(offset)
        offset = _align(offset + 4 * n)
        mrope.append(offset)
        offset = _align(offset + 12 * n)
    return StagingLayout(
        counts=counts,
        dim=dim,
        deepstack_dim=deepstack_dim,
        dtype=dtype,
        segment_offsets=tuple(segments),
        embeddings_offsets=tuple(embeddings),
        deepstack_offsets=tuple(deepstack),
        fill_ids_offsets=tuple(fill_ids),
        mrope_offsets=tuple(mrope),
        nbytes=offset,
    )


def staging_nbytes(counts: Sequence[int], dim: int, deepstack_dim: int, dtype: torch.dtype) -> int:
    """Bytes a staging buffer needs for segments of `counts` tokens (see `staging_layout`)."""
    return staging_layout(counts, dim, deepstack_dim, dtype).nbytes


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
