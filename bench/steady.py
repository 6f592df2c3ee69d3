"""bench/pipeline.py's batch and many_small cases rep by rep: is the steady state steady?

    python bench/rooms.py . bench/steady.py --gc setup [--reps 12] [--out steady.jsonl]

Two questions the pipeline benchmark's medians cannot answer, each left open by a GPU call
(bench/results/pipeline-NOTES.md, twentieth and twenty-second sections):

- Graph captures: does any message of the steady state still capture a CUDA graph, or do
  all captures (one-time work, Triton's warm-up of a launcher included) come in the
  first reps? Each rep
  counts `Launcher._capture` calls, the host's waits on a CUDA event (a graph's last
  replay, a table buffer's last use: `CudaDriver.event_synchronize`) and the rings
  dropped (`Launcher._drop_graphs`), with the time they took.
- The garbage collector: `--gc on` leaves it as it is; `--gc import` freezes the heap right
  after the imports; `--gc setup` collects and freezes it once each cluster is set up, as
  docs/integration.md advises an engine to do. Each rep counts the collector's passes per
  generation and the time they took (a `gc.callbacks` hook).

One JSON line per rep on stdout (and appended to `--out`): case, collector mode, objects
frozen, the host's yardstick before the case (`pipeline.host_yardstick`), rep, milliseconds, GB/s, then captures, waits, drops and the collector's passes
of generation 0, 1 and 2 (`gc0`..`gc2`), each with its milliseconds (`*_ms`). On a
machine without CUDA it runs at D = 64 with the staging scaled to hold as many tokens
(the captures are then always 0). Each mode should run in a process of its own,
alternating (`for m in on setup on setup; do ...; done`): a frozen heap stays frozen
until the run ends (a cluster frozen with it, the first case's under `setup`, is freed
then).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

from embxfer.kernels import cuda_driver, launch
from embxfer.runtime import Config
from embxfer.runtime.local import LocalCluster, random_payload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import count_calls, host_yardstick  # noqa: E402 - bench/pipeline.py, next to this file

CASES = {"batch": [random.Random(0).randint(64, 4096) for _ in range(64)], "many_small": [256] * 256}
KEYS = ("captures", "waits", "drops", "gc0", "gc1", "gc2")
calls: dict[str, int] = dict.fromkeys(KEYS, 0)  # per key: calls (collector passes)
spent: dict[str, float] = dict.fromkeys(KEYS, 0.0)  # and their seconds
_collection_started = [0.0]


def collector_hook(phase: str, info: dict) -> None:
    if phase == "start":
        _collection_started[0] = time.perf_counter()
    else:
        key = f"gc{info['generation']}"
        calls[key] += 1
        spent[key] += time.perf_counter() - _collection_started[0]


def run(case: str, reps: int, mode: str, staging_mb: int, out: Path | None) -> list[dict]:
    cuda = torch.cuda.is_available()
    device, dim = ("cuda", 3584) if cuda else ("cpu", 64)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    lengths = CASES[case]
    config = Config(default_alloc_tokens=8192, language_pool_blocks=2048,
                    staging_bytes=(staging_mb << 20) if cuda else (staging_mb << 20) * dim // 3584)
    cluster = LocalCluster(config=config, dim=dim, device=device)
    payloads = [random_payload(n, dim, seed=i, device=device) for i, n in enumerate(lengths)]
    nbytes = sum(p.nbytes for p in payloads)
    if mode == "setup":
        gc.collect()
        gc.freeze()
    rows, next_id, yardstick = [], 0, round(host_yardstick(), 1)
    for rep in range(reps):
        batch = {next_id + i: p for i, p in enumerate(payloads)}
        next_id += len(payloads)
        before = dict(calls), dict(spent)
        sync()
        started = time.perf_counter()
        taken = cluster.transfer(batch)
        sync()
        elapsed = time.perf_counter() - started
        if rep == 0 and not all(taken[rid][0].bit_equal(p) for rid, p in batch.items()):
            raise SystemExit(f"{case}: not bit-exact")
        row = {"case": case, "gc": mode, "frozen": gc.get_freeze_count(), "host_yardstick_us": yardstick,
               "rep": rep, "ms": round(1e3 * elapsed, 3), "gbps": round(nbytes / elapsed / 1e9, 2)}
        for key in KEYS:
            row[key] = calls[key] - before[0][key]
            row[key + "_ms"] = round(1e3 * (spent[key] - before[1][key]), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gc", choices=("on", "import", "setup"), default="on")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--cases", default="batch,many_small")
    parser.add_argument("--staging", type=int, default=256, help="MiB of staging at D = 3584 (scaled on a CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    if unknown := [c for c in cases if c not in CASES]:
        parser.error(f"--cases: {unknown} not in {sorted(CASES)}")
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: expected >= 1")
    restore = [count_calls(launch.Launcher, "_capture", "captures", spent, calls),
               count_calls(cuda_driver.CudaDriver, "event_synchronize", "waits", spent, calls),
               count_calls(launch.Launcher, "_drop_graphs", "drops", spent, calls)]
    gc.callbacks.append(collector_hook)
    if args.gc == "import":
        gc.freeze()
    try:
        for case in cases:
            run(case, args.reps, args.gc, args.staging, args.out)
    finally:
        gc.callbacks.remove(collector_hook)
        gc.unfreeze()
        for put_back in restore:
            put_back()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
