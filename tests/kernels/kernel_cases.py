"""Builders shared by the kernel tests: random pools, spans, poisoned outputs, bitwise checks."""

from __future__ import annotations

import numpy as np
import torch

from embxfer.kernels import PoolTensors, RowTensors, TokenSpan, plan_spans, reference
from embxfer.kernels.ops import row_addresses

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SAME_SIZE_INT = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
}
POISON_BYTE = 0xA5


def random_bits(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator, device: str
) -> torch.Tensor:
    """Random bit patterns (NaNs, infinities and subnormals included): a copy that is
    not bit-exact cannot hide behind float equality. Drawn on `device`, seeded from
    `generator`."""
    integer = SAME_SIZE_INT.get(dtype, dtype)
    info = torch.iinfo(integer)
    if torch.device(device).type != "cpu":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        generator = torch.Generator(device=device).manual_seed(seed)
    bits = torch.randint(
        info.min, info.max, shape, generator=generator, dtype=integer, device=device
    )
    return bits.view(dtype)


def random_pool(
    num_blocks: int,
    block_size: int,
    dim: int,
    layers: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: str = "cpu",
) -> PoolTensors:
    shape = (num_blocks, block_size)
    return PoolTensors(
        embeddings=random_bits((*shape, dim), dtype, generator, device),
        fill_ids=random_bits(shape, torch.int32, generator, device),
        mrope_positions=random_bits((num_blocks, 3, block_size), torch.int32, generator, device),
        deepstack=random_bits((*shape, layers * dim), dtype, generator, device) if layers else None,
    )


def poisoned_like(tensors: PoolTensors | RowTensors):
    """A copy of every field filled with the poison byte."""
    return type(tensors)(*(None if t is None else poison(torch.empty_like(t)) for t in tensors))


def poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.numel():
        tensor.view(torch.uint8).fill_(POISON_BYTE)
    return tensor


def empty_rows(
    num_tokens: int, dim: int, layers: int, dtype: torch.dtype, device: str = "cpu"
) -> RowTensors:
    return RowTensors(
        embeddings=poison(torch.empty(num_tokens, dim, dtype=dtype, device=device)),
        fill_ids=poison(torch.empty(num_tokens, dtype=torch.int32, device=device)),
        mrope_positions=poison(torch.empty(3, num_tokens, dtype=torch.int32, device=device)),
        deepstack=poison(torch.empty(num_tokens, layers * dim, dtype=dtype, device=device))
        if layers
        else None,
    )


def spans_over(
    counts: list[int],
    starts: list[int],
    block_size: int,
    num_blocks: int,
    generator: torch.Generator,
) -> list[TokenSpan]:
    """Spans with the given counts and starts over distinct, shuffled blocks (no block
    appears twice in the batch, so the spans are valid unpack destinations too)."""
    needed = [
        -(-(start + count) // block_size) for start, count in zip(starts, counts, strict=True)
    ]
    if sum(needed) > num_blocks:
        raise ValueError(f"{sum(needed)} blocks needed, pool has {num_blocks}")
    order = torch.randperm(num_blocks, generator=generator).tolist()
    spans, used = [], 0
    for start, count, n in zip(starts, counts, needed, strict=True):
        spans.append(TokenSpan(order[used : used + n], start, count))
        used += n
    return spans


def blocks_needed(counts: list[int], starts: list[int], block_size: int) -> int:
    return sum(
        -(-(start + count) // block_size) for start, count in zip(starts, counts, strict=True)
    )


def assert_bitwise_equal(actual, expected, what: str = "") -> None:
    """Every element of every field equal as bits (tensors, or bundles of them)."""
    if isinstance(actual, torch.Tensor):
        actual, expected = (actual,), (expected,)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert (a is None) == (e is None), f"{what} field {index}: one side is None"
        if a is None:
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, (
            f"{what} field {index}: {a.shape} vs {e.shape}"
        )
        integer = SAME_SIZE_INT.get(a.dtype, a.dtype)
        a_bits, e_bits = a.view(integer).cpu(), e.view(integer).cpu()
        if not torch.equal(a_bits, e_bits):
            wrong = (a_bits != e_bits).nonzero()
            raise AssertionError(
                f"{what} field {index}: {wrong.shape[0]} of {a.numel()} elements differ, first at "
                f"{wrong[0].tolist()}: {a_bits[tuple(wrong[0])]} vs {e_bits[tuple(wrong[0])]}"
            )


OPS = ("pack", "pack_rows", "unpack", "unpack_to_rows", "gather", "gather_many", "scatter")


def assert_steady_state_allocates_nothing(step, warmups: int, steps: int = 50) -> None:
    """After `warmups` calls of `step` (compiled, buffers sized, graphs captured), `steps`
    more allocate no device memory at all (CUDA's allocator statistics unchanged)."""
    for _ in range(warmups):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    for key in ("allocation.all.allocated", "segment.all.allocated", "requested_bytes.all.allocated"):
        assert after[key] == before[key], f"{key}: {before[key]} -> {after[key]}"


def odd_batch(block_size: int) -> tuple[list[int], list[int]]:
    """(counts, starts): 1 token, block_size - 1, block_size, block_size + 1 tokens, starting
    at the last row of a block, at a block boundary, mid-block and one row in."""
    counts = [1, block_size - 1, block_size, block_size + 1]
    starts = [block_size - 1, 0, block_size // 2, 1]
    return counts, starts


def check_op(
    op: str,
    counts: list[int],
    starts: list[int],
    block_size: int,
    dim: int,
    layers: int,
    dtype: torch.dtype,
    seed: int,
    device: str = "cpu",
) -> None:
    """Run `op` through the Triton kernel and the torch reference on the same random inputs
    and poisoned outputs; every byte of every output must agree."""
    from embxfer import kernels

    generator = torch.Generator().manual_seed(seed)
    num_blocks = blocks_needed(counts, starts, block_size) + 3
    pool = random_pool(num_blocks, block_size, dim, layers, dtype, generator, device)
    spans = spans_over(counts, starts, block_size, num_blocks, generator)
    layout = kernels.staging_layout(counts, dim, layers * dim, dtype)
    what = f"{op} seed={seed} D={dim} K={layers} {dtype} block={block_size} counts={counts} starts={starts}"

    def both(run):
        results = []
        for backend in ("triton", "torch"):
            results.append(run(backend))
        assert_bitwise_equal(*results, what=what)

    if op == "pack":

        def run(backend):
            staging = poison(torch.empty(layout.nbytes + 256, dtype=torch.uint8, device=device))
            kernels.pack(pool, spans, staging, layout, backend=backend)
            return staging

    elif op in ("unpack", "unpack_to_rows"):
        staging = random_bits((layout.nbytes,), torch.uint8, generator, device)
        if op == "unpack":

            def run(backend):
                target = poisoned_like(pool)
                kernels.unpack(staging, layout, target, spans, backend=backend)
                return tuple(target)

        else:
            # Segment 0 gets its own output; the others share one, with a gap of 3 rows.
            shared_starts = [3 + sum(counts[1:i]) + 3 * i for i in range(1, len(counts))]

            def run(backend):
                own = empty_rows(counts[0] + 2, dim, layers, dtype, device)
                shared = empty_rows(
                    shared_starts[-1] + counts[-1] + 1 if len(counts) > 1 else 0,
                    dim,
                    layers,
                    dtype,
                    device,
                )
                outputs = [own] + [shared] * (len(counts) - 1)
                kernels.unpack_to_rows(
                    staging, layout, outputs, [2, *shared_starts], backend=backend
                )
                return tuple(own) + tuple(shared)

    elif op == "gather":

        def run(backend):
            results = []
            for span in spans:
                out = empty_rows(span.count + 3, dim, layers, dtype, device)
                kernels.gather(pool, span, out, 2, backend=backend)
                results.extend(out)
            return tuple(results)

    elif op == "gather_many":
        # Segment 0 gets its own output; the others share one, with a gap of 3 rows.
        shared_starts = [3 + sum(counts[1:i]) + 3 * i for i in range(1, len(counts))]

        def run(backend):
            own = empty_rows(counts[0] + 2, dim, layers, dtype, device)
            shared = empty_rows(shared_starts[-1] + counts[-1] + 1 if len(counts) > 1 else 0,
                                dim, layers, dtype, device)
            outputs = [own] + [shared] * (len(counts) - 1)
            kernels.gather_many(pool, spans, outputs, [2, *shared_starts], backend=backend)
            return tuple(own) + tuple(shared)

    elif op == "pack_rows":
        # Every segment reads its own payload-shaped source, from an offset row.
        sources = [
            RowTensors(*(None if t is None else random_bits(tuple(t.shape), t.dtype, generator, device)
                         for t in empty_rows(count + 5, dim, layers, dtype, device)))
            for count in counts
        ]

        def run(backend):
            staging = poison(torch.empty(layout.nbytes + 256, dtype=torch.uint8, device=device))
            kernels.pack_rows(sources, [3] * len(counts), staging, layout, backend=backend)
            for i, (source, count) in enumerate(zip(sources, counts, strict=True)):
                segment = layout.views(staging, i)
                expected = RowTensors(source.embeddings[3 : 3 + count], source.fill_ids[3 : 3 + count],
                                      source.mrope_positions[:, 3 : 3 + count],
                                      None if source.deepstack is None else source.deepstack[3 : 3 + count])
                assert_bitwise_equal(tuple(segment), tuple(expected), what=f"{what} pack_rows segment {i}")
            return staging

    elif op == "scatter":
        rows = empty_rows(max(counts) + 1, dim, layers, dtype, device)
        rows = RowTensors(
            *(
                None if t is None else random_bits(tuple(t.shape), t.dtype, generator, device)
                for t in rows
            )
        )

        def run(backend):
            target = poisoned_like(pool)
            for span in spans:
                kernels.scatter(rows, 1, target, span, backend=backend)
            return tuple(target)

    else:
        raise ValueError(op)
    both(run)


def random_rows(count, dim, layers, dtype, generator, device="cpu"):
    return RowTensors(*(None if t is None else random_bits(tuple(t.shape), t.dtype, generator, device)
                        for t in empty_rows(count, dim, layers, dtype, device)))


class Message:
    """One message's inputs for every operation: a pool and spans over it, a staging
    buffer of random bits, and row tensors (segment 0 its own, the others sharing one
    with gaps of 3 rows) with their addresses."""

    def __init__(self, layout, block_size, starts, generator, device="cpu"):
        counts = list(layout.counts)
        dim, layers, dtype = layout.dim, layout.deepstack_dim // layout.dim, layout.dtype
        num_blocks = blocks_needed(counts, starts, block_size) + 3
        self.device = device
        self.pool = random_pool(num_blocks, block_size, dim, layers, dtype, generator, device)
        self.spans = spans_over(counts, starts, block_size, num_blocks, generator)
        self.plan = plan_spans(self.spans, block_size)
        self.staging = random_bits((layout.nbytes,), torch.uint8, generator, device)
        shared_starts = [3 + sum(counts[1:i]) + 3 * i for i in range(1, len(counts))]
        self.row_starts = np.array([2, *shared_starts], dtype=np.int64)[: len(counts)]
        shared_rows = shared_starts[-1] + counts[-1] + 1 if len(counts) > 1 else 0
        self.sources = [random_rows(counts[0] + 2, dim, layers, dtype, generator, device)]
        self.sources += [random_rows(shared_rows, dim, layers, dtype, generator, device)] * (len(counts) - 1)
        self.layout = layout

    def outputs(self):
        layout = self.layout
        layers = layout.deepstack_dim // layout.dim
        own = empty_rows(self.sources[0].num_tokens, layout.dim, layers, layout.dtype, self.device)
        shared = empty_rows(self.sources[-1].num_tokens, layout.dim, layers, layout.dtype, self.device)
        return [own] + [shared] * (len(self.sources) - 1)

    def run(self, operation, launcher, backend, as_lists=False):
        """The operation through `launcher` (backend "triton") or the reference; returns
        every tensor it wrote (poisoned beforehand). `as_lists`: the addressed operations
        get their row addresses as tuples and their starts as a list, as the runtime
        passes them, instead of arrays."""
        layout, triton = self.layout, backend == "triton"
        forms = (lambda a: [tuple(r) for r in a.tolist()], lambda s: s.tolist()) if as_lists else \
            (lambda a: a, lambda s: s)
        if operation in ("pack", "pack_addressed_rows"):
            staging = poison(torch.empty(layout.nbytes + 256, dtype=torch.uint8, device=self.device))
            if operation == "pack":
                if triton:
                    launcher.pack(self.pool, self.plan, staging, layout)
                else:
                    reference.pack_reference(self.pool, self.plan, staging, layout)
            elif triton:
                addresses = np.array([row_addresses(r) for r in self.sources], dtype=np.int64)
                launcher.pack_addressed_rows(forms[0](addresses), forms[1](self.row_starts), staging, layout)
            else:
                reference.pack_rows_reference(self.sources, self.row_starts.tolist(), staging, layout)
            return (staging,)
        if operation == "unpack":
            target = poisoned_like(self.pool)
            if triton:
                launcher.unpack(self.staging, layout, target, self.plan)
            else:
                reference.unpack_reference(self.staging, layout, target, self.plan)
            return tuple(target)
        outputs = self.outputs()
        addresses = np.array([row_addresses(r) for r in outputs], dtype=np.int64)
        if operation == "unpack_addressed_rows":
            if triton:
                launcher.unpack_addressed_rows(self.staging, layout, forms[0](addresses), forms[1](self.row_starts))
            else:
                reference.unpack_to_rows_reference(self.staging, layout, outputs, self.row_starts.tolist())
        elif triton:
            launcher.gather_addressed(self.pool, self.plan, layout.counts, addresses, self.row_starts)
        else:
            reference.gather_reference(self.pool, self.plan, layout.counts, outputs, self.row_starts.tolist())
        return tuple(outputs[0]) + tuple(outputs[-1])
