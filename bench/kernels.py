"""Kernel benchmark (issue 3): Triton pack/unpack against the device copy ceiling and two
plain-torch baselines, measured in the same run.

    python bench/kernels.py --json bench/results/kernels-{device}.json [--sweep] [--launch] [--paths]
                            [--before DIR]

`--launch` compares the host cost of one message launch on the runtime's path for each
alternative of the launch path (`kernels/launch.py`; the code before it, loaded from
`--before DIR`, a copy of an older `kernels/` folder); `--paths` times cases a and d with
the table's upload on the kernel's stream, on a stream of its own, read by the kernel in
host memory, and not uploaded at all (the kernel alone), against a same-size `copy_`;
`--sweep` times tile shapes on those cases.

Cases (bf16, block 128, blocks shuffled over a pool twice the payload's size):
  a. one request 16384 x 8192, fill_ids + mrope
  b. 64 requests, lengths drawn from 64..4096 (seed 0), D = 3584
  c. one small request 1000 x 4096
  d. deepstack: 8192 x 4096, K = 3

Bytes are counted honestly: every payload byte (embeddings, deepstack, fill_ids, mrope)
once read and once written; the block table and padding are not counted. The ceiling
is a 1 GiB device-to-device `copy_`, counted the same way (read + write).

Times: `median_us` is the median device time of one call (events around it, the L2
cache flushed before each call so case c's 8 MB is not served from L2, and a sleep
kernel ahead so that the host's launch overhead does not show as device time);
`host_us` is the host time to issue one call; `wall_us` the host wall clock per call
over back-to-back calls, device and host overlapped. `speedup_vs_torch` and
`speedup_vs_loop` compare device times measured the same way for all three (the
conservative ratio: it hides the baselines' host overhead too); `wall_speedup_vs_*`
compare back-to-back wall clock per call, host overhead included on every side.

Baselines, per call, including their index construction:
  torch: the best plain-torch composition: one device index per call (built on the host,
         one copy), then per segment one `index_select(..., out=staging view)` per field
         (pack) or `index_copy_` per field (unpack);
  loop:  the upstream way: per block a slice per field, `torch.cat` per segment and field,
         then a copy into the staging buffer (pack); a slice-copy per block and field (unpack).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import triton

from embxfer import kernels
from embxfer.kernels import PoolTensors, RowTensors, TokenSpan, ops, plan_spans, staging_layout
from embxfer.kernels.triton_copy import TileConfig, set_tile_config

BLOCK = 128
DEVICE = "cuda"
DTYPE = torch.bfloat16
CASES = {
    "a": {"dim": 8192, "layers": 0, "counts": [16384]},
    "b": {"dim": 3584, "layers": 0, "counts": None},  # 64 lengths from 64..4096, seed 0
    "c": {"dim": 4096, "layers": 0, "counts": [1000]},
    "d": {"dim": 4096, "layers": 3, "counts": [8192]},
}
# Tile shapes for --sweep (cases a and d; the H100's sweep of issue 3 and the H200's of
# issue 11 are in bench/results/kernels-NOTES.md).
SWEEP = [
    TileConfig(tile_words=w, max_block_w=b, num_warps=n)
    for w, b, n in ((1024, 256, 2), (2048, 256, 2), (2048, 512, 4), (4096, 256, 2), (4096, 512, 2), (4096, 512, 4),
                    (4096, 1024, 4), (8192, 512, 4), (8192, 1024, 4), (8192, 2048, 8), (16384, 1024, 8),
                    (16384, 2048, 8))
]
# Launch-path messages: case b's 64 requests, and one request of the latency case.
LAUNCH_CASES = {"b": CASES["b"], "one": {"dim": 3584, "layers": 0, "counts": [1024]}}
ALL = 1 << 62  # host_table_max_bytes: every message reads its table in host memory
LAUNCH_MODES = {
    "direct": {"mode": "direct", "side_upload": False, "host_table_max_bytes": 0},
    "direct, side upload": {"mode": "direct", "side_upload": True, "host_table_max_bytes": 0},
    "direct, host table": {"mode": "direct", "side_upload": True, "host_table_max_bytes": ALL},
    "graph": {"mode": "graph", "side_upload": False, "host_table_max_bytes": 0},
    "graph, side upload": {"mode": "graph", "side_upload": True, "host_table_max_bytes": 0},
    "graph, host table": {"mode": "graph", "side_upload": True, "host_table_max_bytes": ALL},
}
DIRECT = LAUNCH_MODES["direct"]


def device_slug(name: str) -> str:
    match = re.search(r"\b([a-z]\d{2,3}[a-z]?)\b", name.lower())
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def case_counts(case: str, spec: dict | None = None) -> list[int]:
    counts = (spec or CASES[case])["counts"]
    if counts is None:
        counts = np.random.default_rng(0).integers(64, 4097, size=64).tolist()
    return counts


class Case:
    """A source pool with the case's requests on shuffled blocks, a destination pool of
    the same shape, staging buffers and the host-side indices the torch baseline uses."""

    def __init__(self, name: str, spec: dict | None = None) -> None:
        spec = spec or CASES[name]
        self.name = name
        self.dim, self.layers = spec["dim"], spec["layers"]
        self.counts = case_counts(name, spec)
        needed = [-(-c // BLOCK) for c in self.counts]
        num_blocks = 2 * sum(needed)
        generator = torch.Generator(device=DEVICE).manual_seed(1)
        self.source = self._pool(num_blocks, generator)
        self.dest = self._pool(num_blocks, generator)
        rng = np.random.default_rng(2)
        order, dest_order = rng.permutation(num_blocks), rng.permutation(num_blocks)
        self.spans, self.dest_spans, used = [], [], 0
        for count, n in zip(self.counts, needed, strict=True):
            self.spans.append(TokenSpan(order[used : used + n].tolist(), 0, count))
            self.dest_spans.append(TokenSpan(dest_order[used : used + n].tolist(), 0, count))
            used += n
        self.layout = staging_layout(self.counts, self.dim, self.layers * self.dim, DTYPE)
        self.staging = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=DEVICE)
        self.views = [self.layout.views(self.staging, i) for i in range(len(self.counts))]
        self.regions = self.layout.regions(self.staging)
        self.plan = plan_spans(self.spans, BLOCK)
        self.dest_plan = plan_spans(self.dest_spans, BLOCK)
        self.payload_bytes = sum(self.counts) * (2 * self.dim * (1 + self.layers) + 16)

    def _pool(self, num_blocks: int, generator: torch.Generator) -> PoolTensors:
        def bits(shape, dtype):
            """Random bit patterns (never zeros: they would hide unwritten rows)."""
            integer = torch.int32 if dtype == torch.int32 else torch.int16
            info = torch.iinfo(integer)
            values = torch.randint(
                info.min, info.max, shape, generator=generator, device=DEVICE, dtype=integer
            )
            return values.view(dtype)

        return PoolTensors(
            bits((num_blocks, BLOCK, self.dim), DTYPE),
            bits((num_blocks, BLOCK), torch.int32),
            bits((num_blocks, 3, BLOCK), torch.int32),
            bits((num_blocks, BLOCK, self.layers * self.dim), DTYPE) if self.layers else None,
        )

    # --- Triton -------------------------------------------------------------------
    def triton_pack(self) -> None:
        kernels.pack(self.source, self.spans, self.staging, self.layout)

    def triton_unpack(self) -> None:
        kernels.unpack(self.staging, self.layout, self.dest, self.dest_spans)

    # --- the runtime's path: plans made once, no checks (embxfer.kernels.ops) ----------
    def runtime_pack(self) -> None:
        ops.pack(self.source, self.plan, self.staging, self.layout)

    def runtime_unpack(self) -> None:
        ops.unpack(self.staging, self.layout, self.dest, self.dest_plan)

    # --- baseline (1): one index per call, one index_select / index_copy_ per field ------
    def _indices(self, spans: list[TokenSpan]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat pool row of every token, and flat mrope index [3, T] (row t of every token,
        then h, then w: the staging region's order)."""
        rows = []
        for span in spans:
            positions = np.arange(span.start, span.start + span.count)
            blocks = np.asarray(span.blocks, dtype=np.int64)[positions // BLOCK]
            rows.append(blocks * BLOCK + positions % BLOCK)
        rows = np.concatenate(rows)
        mrope = ((rows // BLOCK) * 3 * BLOCK + rows % BLOCK)[None, :] + (np.arange(3) * BLOCK)[:, None]
        flat = torch.from_numpy(np.concatenate([rows, mrope.reshape(-1)])).to(DEVICE)
        return flat[: rows.size], flat[rows.size :]

    def _torch_fields(self, pool: PoolTensors):
        flat = [
            pool.embeddings.view(-1, self.dim),
            pool.fill_ids.view(-1),
            pool.mrope_positions.view(-1),
            None if pool.deepstack is None else pool.deepstack.view(-1, self.layers * self.dim),
        ]
        return flat

    def torch_pack(self) -> None:
        rows, mrope = self._indices(self.spans)
        emb, fill, mrope_pool, ds = self._torch_fields(self.source)
        regions = self.regions
        torch.index_select(emb, 0, rows, out=regions.embeddings)
        torch.index_select(fill, 0, rows, out=regions.fill_ids)
        torch.index_select(mrope_pool, 0, mrope, out=regions.mrope_positions.view(-1))
        if ds is not None:
            torch.index_select(ds, 0, rows, out=regions.deepstack)

    def torch_unpack(self) -> None:
        rows, mrope = self._indices(self.dest_spans)
        emb, fill, mrope_pool, ds = self._torch_fields(self.dest)
        regions = self.regions
        emb.index_copy_(0, rows, regions.embeddings)
        fill.index_copy_(0, rows, regions.fill_ids)
        mrope_pool.index_copy_(0, mrope, regions.mrope_positions.reshape(-1))
        if ds is not None:
            ds.index_copy_(0, rows, regions.deepstack)

    # --- baseline (2): the per-block Python loop + torch.cat ----------------------------
    @staticmethod
    def _pieces(span: TokenSpan):
        position, end = span.start, span.start + span.count
        while position < end:
            block, row = span.blocks[position // BLOCK], position % BLOCK
            take = min(BLOCK - row, end - position)
            yield block, row, take
            position += take

    def loop_pack(self) -> None:
        pool = self.source
        for view, span in zip(self.views, self.spans, strict=True):
            pieces = list(self._pieces(span))
            view.embeddings.copy_(torch.cat([pool.embeddings[b, r : r + n] for b, r, n in pieces]))
            view.fill_ids.copy_(torch.cat([pool.fill_ids[b, r : r + n] for b, r, n in pieces]))
            view.mrope_positions.copy_(
                torch.cat([pool.mrope_positions[b, :, r : r + n] for b, r, n in pieces], dim=1)
            )
            if pool.deepstack is not None:
                view.deepstack.copy_(
                    torch.cat([pool.deepstack[b, r : r + n] for b, r, n in pieces])
                )

    def loop_unpack(self) -> None:
        pool = self.dest
        for view, span in zip(self.views, self.dest_spans, strict=True):
            a = 0
            for b, r, n in self._pieces(span):
                pool.embeddings[b, r : r + n].copy_(view.embeddings[a : a + n])
                pool.fill_ids[b, r : r + n].copy_(view.fill_ids[a : a + n])
                pool.mrope_positions[b, :, r : r + n].copy_(view.mrope_positions[:, a : a + n])
                if pool.deepstack is not None:
                    pool.deepstack[b, r : r + n].copy_(view.deepstack[a : a + n])
                a += n


_FLUSH: torch.Tensor | None = None
_SLEEP_CYCLES_PER_US: float | None = None


def _calibrate_sleep() -> float:
    """GPU clock cycles per microsecond of `torch.cuda._sleep`."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    torch.cuda.synchronize()
    return 2_000_000 / (1000 * start.elapsed_time(end))


def host_time(fn, calls: int = 20) -> float:
    """Median host time to issue one call with the device idle, in microseconds."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e6 * float(np.median(times))


def issue_time(fn, windows: int = 40, calls: int = 4) -> float:
    """Median host microseconds to issue one call while the device is busy: a sleep kernel
    is queued ahead of each window of `calls` back-to-back calls, so that no call waits for
    the device and none starts right after a long synchronize (on the GPU machine's VM,
    host code right after a wait of a few hundred microseconds ran up to 2x slower);
    the median over the windows of the mean per call."""
    global _SLEEP_CYCLES_PER_US
    if _SLEEP_CYCLES_PER_US is None:
        _SLEEP_CYCLES_PER_US = _calibrate_sleep()
    fn()
    cycles = int(_SLEEP_CYCLES_PER_US * 3000)
    times = []
    for _ in range(windows):
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    torch.cuda.synchronize()
    return 1e6 * float(np.median(times))


def measure(fn, reps: int = 50) -> float:
    """Median device time of one call, in microseconds: from an event just before the
    call's first kernel to one just after its last, L2 flushed before each call. A
    sleep kernel queued ahead of the start event holds the device while the host issues
    the call, so the host's launch overhead (reported apart, as host_us / wall_us) is not
    mistaken for device time."""
    global _FLUSH, _SLEEP_CYCLES_PER_US
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
        _SLEEP_CYCLES_PER_US = _calibrate_sleep()
    fn()
    host_us = host_time(fn, calls=3)
    cycles = int(_SLEEP_CYCLES_PER_US * (2 * host_us + 100))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        _FLUSH.zero_()
        torch.cuda._sleep(cycles)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(1000 * start.elapsed_time(end))
    return float(np.median(times))


def wall_clock(fn, calls: int = 10) -> float:
    """Host wall clock per call over back-to-back calls (device and host overlapped)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def copy_ceiling() -> float:
    """GB/s of a 1 GiB device-to-device copy, read + write bytes."""
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src)) / 1e6
    return 2 * nbytes / seconds / 1e9


def check(case: Case) -> None:
    """Kernel and baselines must agree bit-exact before anything is timed."""
    case.staging.zero_()  # padding between fields is written by nobody
    case.triton_pack()
    expected = case.staging.clone()
    for baseline in (case.torch_pack, case.loop_pack):
        case.staging.zero_()
        baseline()
        if not torch.equal(case.staging, expected):
            raise SystemExit(f"case {case.name}: {baseline.__name__} disagrees with the kernel")
    results = []
    for unpack in (case.triton_unpack, case.torch_unpack, case.loop_unpack):
        for tensor in case.dest:
            if tensor is not None:
                tensor.view(torch.uint8).fill_(0xA5)
        unpack()
        results.append([t.clone() for t in case.dest if t is not None])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                raise SystemExit(f"case {case.name}: unpack baselines disagree with the kernel")


def run_cases(names: list[str], ceiling: float) -> list[dict]:
    rows = []
    for name in names:
        case = Case(name)
        check(case)
        for op in ("pack", "unpack"):
            kernel, torch_fn, loop_fn = (
                getattr(case, f"{kind}_{op}") for kind in ("triton", "torch", "loop")
            )
            kernel_us = measure(kernel)
            torch_us = measure(torch_fn)
            loop_us = measure(loop_fn, reps=7)
            nbytes = 2 * case.payload_bytes
            gbps = nbytes / kernel_us / 1e3
            wall = {
                kind: wall_clock(fn, calls=5 if kind == "loop" else 10)
                for kind, fn in (("triton", kernel), ("torch", torch_fn), ("loop", loop_fn))
            }
            rows.append(
                {
                    "case": name,
                    "op": op,
                    "tokens": sum(case.counts),
                    "segments": len(case.counts),
                    "dim": case.dim,
                    "deepstack_layers": case.layers,
                    "bytes": nbytes,
                    "median_us": round(kernel_us, 2),
                    "gbps": round(gbps, 1),
                    "fraction_of_ceiling": round(gbps / ceiling, 3),
                    "speedup_vs_torch": round(torch_us / kernel_us, 2),
                    "speedup_vs_loop": round(loop_us / kernel_us, 2),
                    "torch_us": round(torch_us, 2),
                    "loop_us": round(loop_us, 2),
                    "host_us": round(host_time(kernel), 2),
                    "host_runtime_us": round(host_time(getattr(case, f"runtime_{op}")), 2),
                    "wall_us": round(wall["triton"], 2),
                    "torch_wall_us": round(wall["torch"], 2),
                    "loop_wall_us": round(wall["loop"], 2),
                    "wall_speedup_vs_torch": round(wall["torch"] / wall["triton"], 2),
                    "wall_speedup_vs_loop": round(wall["loop"] / wall["triton"], 2),
                }
            )
            row = rows[-1]
            print(
                f"{name} {op:6s} {nbytes / 2**20:9.1f} MiB {kernel_us:9.1f} us {gbps:7.0f} GB/s "
                f"{row['fraction_of_ceiling']:5.2f} x torch {row['speedup_vs_torch']:6.2f} "
                f"x loop {row['speedup_vs_loop']:7.2f} | host {row['host_us']:.0f} us (runtime path {row['host_runtime_us']:.0f}) wall {row['wall_us']:.0f} us "
                f"wall x torch {row['wall_speedup_vs_torch']:.2f} x loop {row['wall_speedup_vs_loop']:.2f}",
                flush=True,
            )
        del case
        torch.cuda.empty_cache()
    return rows


def load_before(path: str):
    """An older copy of `kernels/` imported as the package `before_kernels` (it uses only
    relative imports), to time the code before a change in the same run."""
    import importlib.util

    folder = Path(path).resolve()
    spec = importlib.util.spec_from_file_location("before_kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["before_kernels"] = module
    spec.loader.exec_module(module)
    return module


def _route_of(launcher, operation: str):
    """The launcher's route for `operation` and its variant (callers use a launcher made
    for one case: a route of a case freed since would name freed memory)."""
    route = next(r for key, r in launcher._routes.items() if key[0] == operation)
    return route, route.variant


def _last_buffer(launcher):
    """The table buffer of the launcher's last direct launch (its table is still on the device)."""
    from embxfer.kernels.workspace import NUM_SLOTS

    return launcher._slots._buffers[(launcher._slots._next - 1) % NUM_SLOTS]


def _rows_of(counts: list[int], dim: int, fill: bool) -> list[RowTensors]:
    """One payload-shaped row tensor set per segment (random bits, or poison)."""
    rows = []
    for count in counts:
        tensors = (torch.empty(count, dim, dtype=DTYPE, device=DEVICE), torch.empty(count, dtype=torch.int32, device=DEVICE),
                   torch.empty(3, count, dtype=torch.int32, device=DEVICE))
        for tensor in tensors:
            if fill:
                tensor.view(torch.uint8).random_()
            else:
                tensor.view(torch.uint8).fill_(0xA5)
        rows.append(RowTensors(*tensors))
    return rows


def _same(a, b) -> bool:
    a, b = (a,) if isinstance(a, torch.Tensor) else a, (b,) if isinstance(b, torch.Tensor) else b
    return all(x is None and y is None or torch.equal(x.view(torch.uint8), y.view(torch.uint8))
               for x, y in zip(a, b, strict=True))


def _check_exact(fn, written, expected, what: str) -> None:
    """Run `fn` once over poisoned outputs; SystemExit unless it wrote `expected` bit for bit."""
    for tensor in written:
        tensor.view(torch.uint8).fill_(0xA5)
    fn()
    torch.cuda.synchronize()
    if not _same(written, expected):
        raise SystemExit(f"{what} is not bit-exact")


def launch_costs(before) -> dict:
    """Host microseconds per message launch on the runtime's path, for every alternative
    of the launch path, measured the same way (`issue_time`): the code before (`before`),
    the launcher's modes, the ops
    functions (the default launcher). Each alternative's output is checked bit-exact
    against the ops function's first. Then the floors: each piece of a launch alone."""
    from embxfer.kernels.cuda_driver import driver
    from embxfer.kernels.launch import Launcher

    launchers = {mode: Launcher(DEVICE, **options) for mode, options in LAUNCH_MODES.items()}
    rows = []
    for name, spec in LAUNCH_CASES.items():
        rows += _launch_case(Case(name, spec), launchers, before)
        torch.cuda.empty_cache()
    after = {mode: {"mode_after": L.mode, "graphs": len(L._graphs), "routes": len(L._routes)}
             for mode, L in launchers.items()}
    return {"method": "issue_time: windows of 4 back-to-back calls behind a 3 ms sleep kernel, median of 40 "
                      "windows of the mean per call",
            "messages": rows, "launchers": after, "floors": _launch_floors(driver())}


def _launch_case(case: Case, launchers: dict, before) -> list[dict]:
    old_layout = staging_layout(case.counts, case.dim, 0, DTYPE)  # its own caches
    sources, outputs = _rows_of(case.counts, case.dim, True), _rows_of(case.counts, case.dim, False)
    source_addresses = np.array([ops.row_addresses(r) for r in sources], dtype=np.int64)
    output_addresses = np.array([ops.row_addresses(r) for r in outputs], dtype=np.int64)
    zeros = np.zeros(len(case.counts), dtype=np.int64)
    counts = list(case.counts)
    written_outputs = tuple(t for r in outputs for t in r if t is not None)
    # operation: (through a launcher, the code before, the ops function, what it writes)
    operations = {
        "pack": (lambda L: L.pack(case.source, case.plan, case.staging, case.layout),
                 lambda: before.ops.pack(case.source, case.plan, case.staging, old_layout),
                 lambda: ops.pack(case.source, case.plan, case.staging, case.layout), (case.staging,)),
        "unpack": (lambda L: L.unpack(case.staging, case.layout, case.dest, case.dest_plan),
                   lambda: before.ops.unpack(case.staging, old_layout, case.dest, case.dest_plan),
                   lambda: ops.unpack(case.staging, case.layout, case.dest, case.dest_plan),
                   tuple(t for t in case.dest if t is not None)),
        "pack_addressed_rows": (
            lambda L: L.pack_addressed_rows(source_addresses, zeros, case.staging, case.layout),
            lambda: before.ops.pack_addressed_rows(sources[0], source_addresses, zeros, sources, case.staging,
                                                   old_layout),
            lambda: ops.pack_addressed_rows(sources[0], source_addresses, zeros, sources, case.staging, case.layout),
            (case.staging,)),
        "unpack_addressed_rows": (
            lambda L: L.unpack_addressed_rows(case.staging, case.layout, output_addresses, zeros),
            lambda: before.ops.unpack_to_rows(case.staging, old_layout, outputs, zeros.tolist()),
            lambda: ops.unpack_addressed_rows(case.staging, case.layout, outputs[0], output_addresses, zeros, outputs),
            written_outputs),
        "gather_addressed": (
            lambda L: L.gather_addressed(case.source, case.plan, counts, output_addresses, zeros),
            lambda: before.ops.gather_addressed(case.source, case.plan, counts, outputs, output_addresses, zeros),
            lambda: ops.gather_addressed(case.source, case.plan, counts, outputs, output_addresses, zeros),
            written_outputs),
    }
    rows = []
    message = f"{case.name}: {len(case.counts)} segment(s), {sum(case.counts)} tokens, D {case.dim}"
    for operation, (new, old, through_ops, written) in operations.items():
        for tensor in written:  # padding is written by nobody: poison it for every alternative
            tensor.view(torch.uint8).fill_(0xA5)
        through_ops()
        torch.cuda.synchronize()
        expected = tuple(t.clone() for t in written)
        alternatives = {}
        if before is not None:
            alternatives["before (unpack_to_rows)" if operation == "unpack_addressed_rows" else "before"] = old
        alternatives |= {mode: functools.partial(new, L) for mode, L in launchers.items()}
        alternatives["ops (default launcher)"] = through_ops
        row = {"message": message, "operation": operation}
        for label, fn in alternatives.items():
            _check_exact(fn, written, expected, f"launch costs: {label} {operation} on {case.name}")
            row[label] = round(issue_time(fn), 2)
        rows.append(row)
        print("launch " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if case.name == "b":
        rows.append(_fresh_layouts(case, launchers))
    return rows


def _fresh_layouts(case: Case, launchers: dict) -> dict:
    """Case b's pack where every message has a layout (and plan) never seen before: the
    route and its template are made per message."""
    rng = np.random.default_rng(3)
    messages = []
    for _ in range(2 * 256 + 16):
        order = rng.permutation(len(case.counts))
        spans = [case.spans[i] for i in order]
        messages.append((staging_layout([s.count for s in spans], case.dim, 0, DTYPE), plan_spans(spans, BLOCK)))
    row = {"message": "b: 64 segments, a new layout every message", "operation": "pack"}
    for mode, launcher in launchers.items():
        items = iter(messages)

        def fn(launcher=launcher, items=items):
            layout, plan = next(items)
            launcher.pack(case.source, plan, case.staging, layout)

        row[mode] = round(issue_time(fn), 2)
    print("launch " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return row


def _launch_floors(drv) -> dict:
    """Each piece of a launch alone, and the same pieces through torch and Triton's dispatcher."""
    from embxfer.kernels.launch import Launcher
    from embxfer.kernels.triton_copy import launch_jit

    case = Case("one", LAUNCH_CASES["one"])
    # fresh launchers: one route each, for this case's tensors only
    direct = Launcher(DEVICE, **DIRECT)
    direct.pack(case.source, case.plan, case.staging, case.layout)
    route, variant = _route_of(direct, "pack")
    buffer = _last_buffer(direct)
    objects = (case.source, case.staging)
    launch = variant.direct(direct, buffer, objects)
    stream = torch.cuda.current_stream().cuda_stream
    pinned = torch.empty(4096, dtype=torch.int64, pin_memory=True)
    device = torch.empty(4096, dtype=torch.int64, device=DEVICE)
    floors = {
        "torch copy_ of a pinned 32 KB table": lambda: device.copy_(pinned, non_blocking=True),
        "driver upload of a 32 KB table": lambda: drv.memcpy_to_device(device.data_ptr(), pinned.data_ptr(),
                                                                       32768, stream),
        "driver event record": lambda: drv.event_record(buffer.event, stream),
        "launch through Triton's dispatcher (typed tensor arguments)": lambda: launch_jit(variant.programs, buffer.device, variant.scalars,
                                                                 variant.tensors(objects), variant.constants, False,
                                                                 variant.num_warps),
        "direct launch (bound arguments)": lambda: launch(variant.programs, stream, buffer.device_pointer),
        "table columns of one message (fill_pool_columns)": lambda: _fill_only(route, variant, case.plan, buffer),
    }
    graph_launcher = Launcher(DEVICE, **LAUNCH_MODES["graph"])
    graph_launcher.pack(case.source, case.plan, case.staging, case.layout)
    graphs = [g for ring in graph_launcher._graphs.values() for g in ring.graphs]
    if graphs:
        floors["graph replay (driver)"] = lambda: drv.graph_launch(graphs[0].executable, stream)
    result = {}
    for label, fn in floors.items():
        result[label] = round(issue_time(fn), 2)
    print("launch floors: " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)
    return result


def _fill_only(route, variant, plan, buffer) -> None:
    from embxfer.kernels.triton_copy import fill_pool_columns

    fill_pool_columns(buffer.host, route.pool_base, variant.head, plan)


def host_breakdown(name: str = "b") -> dict[str, float]:
    """Median host microseconds of each step of one pack of case `name` (64 segments for
    case b) through the runtime's path (a launcher route, direct mode): the message's own
    table columns, the upload, the launch, the event; then the whole call through the
    runtime's path and the public API, and the public API's checks and plan."""
    from embxfer.kernels import checks
    from embxfer.kernels.cuda_driver import driver
    from embxfer.kernels.launch import Launcher
    from embxfer.kernels.triton_copy import fill_pool_columns

    case = Case(name)
    launcher = Launcher(DEVICE, **DIRECT)
    launcher.pack(case.source, case.plan, case.staging, case.layout)
    route, variant = _route_of(launcher, "pack")
    objects = (case.source, case.staging)
    size = variant.head + case.plan.blocks.size + 1
    table, buffer = launcher._begin(variant, size, objects)
    fill_pool_columns(table, route.pool_base, variant.head, case.plan)
    stream = torch.cuda.current_stream().cuda_stream
    drv = driver()
    drv.memcpy_to_device(buffer.device_pointer, buffer.host_pointer, 8 * size, stream)
    torch.cuda.synchronize()
    launch = variant.direct(launcher, buffer, objects)

    def checks_and_plan():
        checks.check_pool(case.source)
        checks.check_layout(case.layout, checks.pool_fields(case.source), case.counts, case.staging)
        checks.covered_blocks(case.source, case.spans, what="pack", written=False)

    steps = {
        "checks_and_plan_us": checks_and_plan,
        "table_us": lambda: fill_pool_columns(table, route.pool_base, variant.head, case.plan),
        "upload_us": lambda: drv.memcpy_to_device(buffer.device_pointer, buffer.host_pointer, 8 * size, stream),
        "launch_us": lambda: launch(variant.programs, stream, buffer.device_pointer),
        "event_us": lambda: drv.event_record(buffer.event, stream),
        "public_call_us": case.triton_pack,
        "runtime_call_us": lambda: launcher.pack(case.source, case.plan, case.staging, case.layout),
    }
    result = {"case": name, "segments": len(case.counts), "path": "Launcher, direct mode"}
    for label, fn in steps.items():
        result[label] = round(issue_time(fn), 2)
    print("host breakdown (pack, case " + name + "): " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)
    return result


def kernel_paths(names: list[str], ceiling: float, before) -> list[dict]:
    """Device time of cases `names` (a, d) per path, as fractions of the ceiling: the code
    before (upload + kernel on one stream), the launcher with the upload on the kernel's
    stream, with the upload on a stream of its own, the kernel alone (its table already on
    the device), and a `copy_` of the same bytes."""
    rows = []
    for name in names:
        case = Case(name)
        rows += [_paths_of(case, op, ceiling, before) for op in ("pack", "unpack")]
        del case
        torch.cuda.empty_cache()
    return rows


def _paths_of(case: Case, op: str, ceiling: float, before) -> dict:
    from embxfer.kernels.launch import Launcher

    old_layout = staging_layout(case.counts, case.dim, case.layers * case.dim, DTYPE)
    direct, side = Launcher(DEVICE, **DIRECT), Launcher(DEVICE, **LAUNCH_MODES["direct, side upload"])
    host = Launcher(DEVICE, **LAUNCH_MODES["direct, host table"])
    call, written, pool, expected = launcher_op(case, op)

    def old():
        if op == "pack":
            before.ops.pack(case.source, case.plan, case.staging, old_layout)
        else:
            before.ops.unpack(case.staging, old_layout, case.dest, case.dest_plan)

    alone = _kernel_alone(direct, op, functools.partial(call, direct), (pool, case.staging))
    paths = {"before": old} if before is not None else {}
    paths |= {"upload on the kernel's stream": functools.partial(call, direct),
              "upload on its own stream": functools.partial(call, side),
              "table read in host memory": functools.partial(call, host), "kernel alone": alone}
    row = {"case": case.name, "op": op, "bytes": 2 * case.payload_bytes}
    for label, fn in paths.items():
        _check_exact(fn, written, expected, f"kernel paths: {label} {op} on {case.name}")
        row[label] = _timed(fn, 2 * case.payload_bytes, ceiling, reps=30)
    src = torch.empty(case.payload_bytes, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    row["copy_ of the same bytes"] = _timed(functools.partial(dst.copy_, src), 2 * case.payload_bytes, ceiling, reps=30)
    print(f"paths {case.name} {op}: " + ", ".join(f"{k} {v['us']} us {v['fraction_of_ceiling']}"
                                                  for k, v in row.items() if isinstance(v, dict)), flush=True)
    return row


def launcher_op(case: Case, op: str) -> tuple:
    """Case a or d's `op` ("pack" or "unpack") through a launcher: (call(launcher), the
    tensors it writes, the pool it reads or writes, what the public call wrote into them
    over poisoned bytes: the bits every path must match)."""
    if op == "pack":
        def call(launcher):
            launcher.pack(case.source, case.plan, case.staging, case.layout)

        public, written, pool = case.triton_pack, (case.staging,), case.source
    else:
        def call(launcher):
            launcher.unpack(case.staging, case.layout, case.dest, case.dest_plan)

        public, written, pool = case.triton_unpack, tuple(t for t in case.dest if t is not None), case.dest
    for tensor in written:
        tensor.view(torch.uint8).fill_(0xA5)
    public()
    torch.cuda.synchronize()
    return call, written, pool, tuple(t.clone() for t in written)


def _timed(fn, nbytes: int, ceiling: float, reps: int) -> dict:
    us = measure(fn, reps=reps)
    return {"us": round(us, 2), "fraction_of_ceiling": round(nbytes / us / 1e3 / ceiling, 3)}


def _kernel_alone(launcher, op: str, call, objects: tuple):
    """After one `call` through `launcher`: a function that launches the same kernel again
    on the table that call uploaded (no table written, no upload)."""
    call()
    torch.cuda.synchronize()
    route, variant = _route_of(launcher, op)
    buffer = _last_buffer(launcher)
    launch = variant.direct(launcher, buffer, objects)

    def alone():
        launch(variant.programs, torch.cuda.current_stream().cuda_stream, buffer.device_pointer)

    return alone


def sweep(names: list[str], ceiling: float) -> list[dict]:
    """Tile shapes on cases `names`: device time of the kernel alone and of the launch with
    its upload on the kernel's stream."""
    results = []
    for name in names:
        case = Case(name)
        for config in SWEEP:
            previous = set_tile_config(config)
            try:
                for op in ("pack", "unpack"):
                    results.append(_sweep_one(case, op, config, ceiling))
            finally:
                set_tile_config(previous)
        del case
        torch.cuda.empty_cache()
    return results


def _sweep_one(case: Case, op: str, config: TileConfig, ceiling: float) -> dict:
    from embxfer.kernels.launch import Launcher

    launcher = Launcher(DEVICE, **DIRECT)
    if op == "pack":
        def call():
            launcher.pack(case.source, case.plan, case.staging, case.layout)
        pool = case.source
    else:
        def call():
            launcher.unpack(case.staging, case.layout, case.dest, case.dest_plan)
        pool = case.dest
    nbytes = 2 * case.payload_bytes
    alone = _timed(_kernel_alone(launcher, op, call, (pool, case.staging)), nbytes, ceiling, reps=15)
    with_upload = _timed(call, nbytes, ceiling, reps=15)
    result = {"case": case.name, "op": op, **asdict(config), "kernel_us": alone["us"],
              "kernel_fraction": alone["fraction_of_ceiling"], "with_upload_us": with_upload["us"],
              "with_upload_fraction": with_upload["fraction_of_ceiling"]}
    print(f"sweep {case.name} {op:6s} {config.tile_words:5d} {config.max_block_w:4d} {config.num_warps} "
          f"kernel {alone['fraction_of_ceiling']:.3f} with upload {with_upload['fraction_of_ceiling']:.3f}",
          flush=True)
    return result


def profile_host() -> None:
    import cProfile
    import pstats

    case = Case("c")
    for op in ("triton_pack", "triton_unpack"):
        fn = getattr(case, op)
        fn()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            fn()
        profile.disable()
        torch.cuda.synchronize()
        print(f"host profile of 200 x {op}:")
        pstats.Stats(profile).sort_stats("tottime").print_stats(14)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["cases"]
    labels = [f"{r['case']} {r['op']}" for r in rows]
    x = np.arange(len(rows))
    width = 0.27
    figure, axes = plt.subplots(figsize=(10, 5))
    for shift, key, label in (
        (-width, "gbps", "Triton (one launch)"),
        (0, "torch_us", "torch index_select"),
        (width, "loop_us", "per-block loop + cat"),
    ):
        values = [r["gbps"] if key == "gbps" else r["bytes"] / r[key] / 1e3 for r in rows]
        axes.bar(x + shift, values, width, label=label)
    axes.axhline(
        result["ceiling_gbps"],
        color="black",
        linestyle="--",
        label=f"D2D copy ceiling {result['ceiling_gbps']:.0f} GB/s",
    )
    axes.axhline(0.9 * result["ceiling_gbps"], color="gray", linestyle=":", label="90% of ceiling")
    axes.set_xticks(x, labels)
    axes.set_ylabel("GB/s (payload read + write)")
    axes.set_title(f"embxfer pack/unpack, bf16, block 128, on {result['device']}")
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    axes.text(
        0.0,
        -0.3,
        "a: 16384 x 8192   b: 64 requests of 64..4096, D 3584   c: 1000 x 4096   d: 8192 x 4096, K = 3",
        transform=axes.transAxes,
        fontsize=8,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--json",
        default="bench/results/kernels-{device}.json",
        help="output path; {device} is replaced by the GPU's slug",
    )
    parser.add_argument("--cases", default="abcd", help="cases of the main table ('' for none)")
    parser.add_argument("--sweep", action="store_true", help="time the kernel over a grid of tile configs")
    parser.add_argument("--sweep-cases", default="ad")
    parser.add_argument("--launch", action="store_true", help="compare the launch path's alternatives")
    parser.add_argument("--paths", action="store_true", help="time cases a and d per upload path")
    parser.add_argument("--before", default=None, help="a copy of an older kernels/ folder to compare with")
    parser.add_argument(
        "--profile-host",
        action="store_true",
        help="print a host-side profile of pack and unpack (case c)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    from embxfer.kernels.launch import launcher_for
    from embxfer.kernels.triton_copy import tile_config

    name = torch.cuda.get_device_name()
    path = Path(args.json.format(device=device_slug(name)))
    path.parent.mkdir(parents=True, exist_ok=True)
    before = load_before(args.before) if args.before else None
    ceiling = copy_ceiling()
    print(
        f"{name}: torch {torch.__version__}, triton {triton.__version__}, copy ceiling {ceiling:.0f} GB/s",
        flush=True,
    )
    device = torch.device(DEVICE, torch.cuda.current_device())
    default = launcher_for(device)
    result = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ceiling_gbps": round(ceiling, 1),
        "config": {
            "dtype": "bfloat16",
            "block_size": BLOCK,
            "tile": asdict(tile_config(device)),
            "launch_default": {"mode": default.mode, "side_upload": default.side_upload},
            "cases": {k: CASES[k] | {"counts": case_counts(k)} for k in args.cases},
        },
        "errors": [],
    }
    sections = []
    if args.launch:
        sections += [("launch", lambda: launch_costs(before)), ("host_breakdown", lambda: host_breakdown("b"))]
    if args.paths:
        sections.append(("kernel_paths", lambda: kernel_paths(["a", "d"], ceiling, before)))
    if args.sweep:
        sections.append(("sweep", lambda: sweep(list(args.sweep_cases), ceiling)))
    if args.cases:
        sections.append(("cases", lambda: run_cases(list(args.cases), ceiling)))
    for key, run in sections:
        try:
            result[key] = run()
        except (Exception, SystemExit) as error:  # noqa: BLE001 - keep the other sections' results
            import traceback

            traceback.print_exc()
            result["errors"].append(f"{key}: {error!r}")
        path.write_text(json.dumps(result, indent=1) + "\n")
    if args.profile_host:
        profile_host()
    if "cases" in result:
        plot(result, path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {path.with_suffix('.png')}" if "cases" in result else ""))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
