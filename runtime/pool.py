"""`BlockPool`: the per-field block storage of one engine on one device."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby, repeat

import torch

from embxfer.kernels import PoolTensors, RowTensors, TokenSpan, gather, scatter

from .payload import EMBEDDING_DTYPES, Payload, RowSpec


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens; one block holds, for its tokens, the
    rows of every field (embeddings, deepstack, fill_ids, mrope positions).

    The mrope delta is per request, not per token: it travels in control records and
    is never stored in (or read from) a block (SPEC R3).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        dim: int,
        dtype: torch.dtype = torch.bfloat16,
        deepstack_layers: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value, low in (
            ("num_blocks", num_blocks, 1),
            ("block_size", block_size, 1),
            ("dim", dim, 1),
            ("deepstack_layers", deepstack_layers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BlockPool.{name}={value!r}: expected an integer >= {low}")
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"BlockPool.dtype={dtype}: expected bfloat16, float16 or float32")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dim = dim
        self.dtype = dtype
        self.deepstack_layers = deepstack_layers
        device = torch.device(device)
        shape = (num_blocks, block_size)
        self.tensors = PoolTensors(
            embeddings=torch.empty(*shape, dim, dtype=dtype, device=device),
            fill_ids=torch.empty(*shape, dtype=torch.int32, device=device),
            mrope_positions=torch.empty(num_blocks, 3, block_size, dtype=torch.int32, device=device),
            deepstack=(
                torch.empty(*shape, deepstack_layers * dim, dtype=dtype, device=device)
                if deepstack_layers
                else None
            ),
        )
        # The device the storage landed on: "cuda" resolves to "cuda:0", and a payload on
        # cuda:0 must compare equal to it in check_compatible.
        self.device = self.tensors.embeddings.device

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return element * self.dim * (1 + self.deepstack_layers) + 4 * (1 + 3)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors if t is not None)

    def check_compatible(self, payload: Payload) -> None:
        """ValueError naming the first field of `payload` that this pool cannot hold."""
        RowSpec(self.dim, self.deepstack_layers, self.dtype, self.device).check_payload(payload, owner="pool")

    def write(self, payload: Payload, blocks: Sequence[int], start: int = 0, count: int | None = None) -> None:
        """Store payload tokens `[start, start + count)` in `blocks`, from the first block's row 0."""
        self.check_compatible(payload)
        count = payload.num_tokens - start if count is None else count
        for name, value in (("start", start), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"write: {name}={value!r}: expected an integer")
        if start < 0 or count < 0 or start + count > payload.num_tokens:
            raise ValueError(
                f"write: tokens [{start}, {start + count}) outside the payload's {payload.num_tokens} tokens"
            )
        # Two stretches of tokens landing in one block would silently overwrite each other.
        used = [int(b) for b in blocks[: -(-count // self.block_size)]]
        if len(set(used)) != len(used):
            raise ValueError(f"write: block list {used} names a block more than once")
        rows = RowTensors(payload.embeddings, payload.fill_ids, payload.mrope_positions, payload.deepstack)
        scatter(rows, start, self.tensors, TokenSpan(blocks, 0, count))

    def clone_rows(self, rows: RowTensors) -> RowTensors:
        """A new copy of payload-shaped rows (on this pool's device)."""
        return RowTensors(*(None if t is None else t.clone() for t in rows))

    def empty_rows(self, num_tokens: int) -> RowTensors:
        """Uninitialised contiguous tensors for `num_tokens` tokens of this pool's shape."""
        return RowTensors(
            embeddings=torch.empty(num_tokens, self.dim, dtype=self.dtype, device=self.device),
            fill_ids=torch.empty(num_tokens, dtype=torch.int32, device=self.device),
            mrope_positions=torch.empty(3, num_tokens, dtype=torch.int32, device=self.device),
            deepstack=(
                torch.empty(num_tokens, self.deepstack_layers * self.dim, dtype=self.dtype, device=self.device)
                if self.deepstack_layers
                else None
            ),
        )

    def empty_rows_together(self, counts: Sequence[int]) -> tuple[RowTensors, list[RowTensors]]:
        """Uninitialised rows for several requests from one allocation per field: the whole
        (`empty_rows(sum(counts))`) and each request's contiguous view of it, its mrope
        positions `[3, n]` cut from the whole's, read flat. One allocation and one split
        per field, whatever the number of requests; the mrope blocks, 2-D, are one strided
        view per run of equal counts, unbound into its requests' views (a split and a
        reshape would make two tensors per request). The memory lives until every view is
        dropped."""
        counts = list(counts)
        whole = self.empty_rows(sum(counts))
        cut = whole.mrope_positions.as_strided
        at = whole.mrope_positions.storage_offset()
        mrope = []
        for n, run in groupby(counts):
            k = sum(1 for _ in run)
            if k == 1:
                mrope.append(cut((3, n), (n, 1), at))
            else:
                mrope.extend(cut((k, 3, n), (3 * n, n, 1), at).unbind(0))
            at += 3 * k * n
        deepstack = whole.deepstack.split(counts) if whole.deepstack is not None else [None] * len(counts)
        # tuple.__new__ straight from C: a NamedTuple's own __new__ is a Python function, a
        # frame per request
        views = list(map(tuple.__new__, repeat(RowTensors), zip(
            whole.embeddings.split(counts), whole.fill_ids.split(counts), mrope, deepstack, strict=True)))
        return whole, views

    def read_into(self, blocks: Sequence[int], num_tokens: int, out: RowTensors, out_start: int = 0,
                  start: int = 0) -> None:
        """Copy tokens `[start, start + num_tokens)` held in `blocks` into rows of `out` from
        `out_start`."""
        gather(self.tensors, TokenSpan(blocks, start, num_tokens), out, out_start)

    def read(self, blocks: Sequence[int], num_tokens: int, mrope_delta: int) -> Payload:
        """The first `num_tokens` tokens held in `blocks` as a contiguous `Payload`."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"read: num_tokens={num_tokens!r}: expected an integer >= 1")
        rows = self.empty_rows(num_tokens)
        self.read_into(blocks, num_tokens, rows)
        return Payload(*rows[:3], mrope_delta=mrope_delta, deepstack=rows.deepstack)
