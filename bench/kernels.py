"""Kernel benchmark (issue 3): Triton pack/unpack against the device copy ceiling and two
plain-torch baselines, measured in the same run.

    python bench/kernels.py --json bench/results/kernels-{device}.json [--sweep]

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
from embxfer.kernels import PoolTensors, TokenSpan, ops, plan_spans, staging_layout
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
SWEEP = [
    TileConfig(tile_words=w, max_block_w=b, num_warps=n, streaming_stores=stream)
    for w in (1024, 2048, 4096, 8192)
    for b in (256, 512, 1024)
    for n in (2, 4)
    for stream in (False, True)
    if b <= w
]


def device_slug(name: str) -> str:
    match = re.search(r"\b([a-z]\d{2,3}[a-z]?)\b", name.lower())
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def case_counts(case: str) -> list[int]:
    counts = CASES[case]["counts"]
    if counts is None:
        counts = np.random.default_rng(0).integers(64, 4097, size=64).tolist()
    return counts


class Case:
    """A source pool with the case's requests on shuffled blocks, a destination pool of
    the same shape, staging buffers and the host-side indices the torch baseline uses."""

    def __init__(self, name: str) -> None:
        spec = CASES[name]
        self.name = name
        self.dim, self.layers = spec["dim"], spec["layers"]
        self.counts = case_counts(name)
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


def host_breakdown(name: str = "b") -> dict[str, float]:
    """Median host microseconds of each step of one pack call of case `name` (64 segments
    for case b): the public API's checks and plan, building the launch table, uploading
    it, and the launch itself; then the whole call through each path."""
    from embxfer.kernels import checks
    from embxfer.kernels.ops import staging_side
    from embxfer.kernels.triton_copy import (
        _LAUNCHER,
        SEGMENT_COLUMNS,
        PoolSide,
        _addresses,
        _fill_metadata,
        pick_tile,
        pick_word,
        tile_config,
    )
    from embxfer.kernels.workspace import workspace_for

    case = Case(name)
    case.triton_pack()
    device = torch.device(DEVICE, torch.cuda.current_device())
    src, dst = PoolSide(case.source, case.plan), staging_side(case.staging, case.layout)
    counts = np.asarray(case.layout.counts, dtype=np.int64)
    word, word_bytes, vec = pick_word(16)
    emb_words = case.dim * 2 // word_bytes
    tokens, block_w, items = pick_tile(emb_words, 0, counts, tile_config(device))
    size = SEGMENT_COLUMNS.value * len(counts) + case.plan.blocks.size + 1
    table = np.empty(size, dtype=np.int64)
    workspace = workspace_for(device)

    def checks_and_plan():
        checks.check_pool(case.source)
        checks.check_layout(case.layout, checks.pool_fields(case.source), case.counts, case.staging)
        checks.covered_blocks(case.source, case.spans, what="pack", written=False)

    def upload():
        host, slot = workspace.acquire(size)
        host[:] = table
        workspace.upload(slot, size)
        workspace.release(slot)

    host, slot = workspace.acquire(size)
    _fill_metadata(host, counts, tokens, src, dst, word_bytes, 0)
    metadata = workspace.upload(slot, size)
    workspace.release(slot)
    emb_tiles = -(-emb_words // block_w)
    scalars = (len(counts), SEGMENT_COLUMNS.value * len(counts), *_addresses(src, word_bytes),
               *_addresses(dst, word_bytes), BLOCK, emb_words, 0, emb_tiles, emb_tiles)
    constants = (True, False, False, tokens, block_w, vec, tile_config(device).streaming_stores)

    def launch():
        _LAUNCHER.launch(metadata, scalars, constants, items * emb_tiles, src, dst, word,
                         tile_config(device).num_warps, device)

    steps = {
        "checks_and_plan_us": checks_and_plan,
        "table_us": lambda: _fill_metadata(table, counts, tokens, src, dst, word_bytes, 0),
        "upload_us": upload,
        "launch_us": launch,
        "public_call_us": case.triton_pack,
        "runtime_call_us": case.runtime_pack,
    }
    result = {"case": name, "segments": len(case.counts)}
    for label, fn in steps.items():
        fn()
        result[label] = round(host_time(fn, calls=50), 2)
    print("host breakdown (pack, case " + name + "): " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)
    return result


def sweep(names: list[str], ceiling: float) -> list[dict]:
    results = []
    for name in names:
        case = Case(name)
        for config in SWEEP:
            previous = set_tile_config(config)
            try:
                for op in ("pack", "unpack"):
                    us = measure(getattr(case, f"triton_{op}"), reps=15)
                    gbps = 2 * case.payload_bytes / us / 1e3
                    results.append(
                        {
                            "case": name,
                            "op": op,
                            **asdict(config),
                            "median_us": round(us, 2),
                            "gbps": round(gbps, 1),
                        }
                    )
                    print(
                        f"sweep {name} {op:6s} {config} {gbps:7.0f} GB/s {gbps / ceiling:5.2f}",
                        flush=True,
                    )
            finally:
                set_tile_config(previous)
        del case
        torch.cuda.empty_cache()
    return results


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
    parser.add_argument("--cases", default="abcd")
    parser.add_argument(
        "--sweep", action="store_true", help="also time the kernel over a grid of tile configs"
    )
    parser.add_argument(
        "--profile-host",
        action="store_true",
        help="print a host-side profile of pack and unpack (case c)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    path = Path(args.json.format(device=device_slug(name)))
    path.parent.mkdir(parents=True, exist_ok=True)
    ceiling = copy_ceiling()
    print(
        f"{name}: torch {torch.__version__}, triton {triton.__version__}, copy ceiling {ceiling:.0f} GB/s",
        flush=True,
    )
    result = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ceiling_gbps": round(ceiling, 1),
        "config": {
            "dtype": "bfloat16",
            "block_size": BLOCK,
            "tile": asdict(TileConfig()),
            "cases": {k: CASES[k] | {"counts": case_counts(k)} for k in args.cases},
        },
        "cases": run_cases(list(args.cases), ceiling),
        "host_breakdown": host_breakdown("b") if "b" in args.cases else None,
    }
    if args.profile_host:
        profile_host()
    if args.sweep:
        result["sweep"] = sweep([c for c in args.cases if c != "c"], ceiling)
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
