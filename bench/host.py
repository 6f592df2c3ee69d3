"""Host time per request through the runtime, on any machine (CPU tensors, no GPU needed).

    python bench/host.py --json bench/results/host-{device}.json

What an engine pays on its CPU for each request, whatever the wire: every endpoint of a
layout runs in this one process (`LocalCluster`: the real Sender/Receiver state machines,
records encoded and decoded, staging messages packed and unpacked with the torch data
path; only the two transports are in-process), one torch thread. Cases (D = 64, bf16,
64-token requests, all fitting the default allocation):

  batch_tp1 / batch_tp2    256 requests admitted and submitted together, language TP 1 / 2
  blind_tp1                the same 256 with an 8192-token default allocation and a pool of
                           2048 blocks (32 default allocations): admissions wait for blocks,
                           the shape of the GPU benchmark's many_small
  single_tp1 / single_tp2  one request at a time (admit + submit -> take), TP 1 / 2
  demo                     `embxfer demo` on CPU (three processes, gloo, shm rings): 1000
                           requests of 64..512 tokens, D = 1024; requests per second

Each in-process figure is the median over repetitions of wall time / requests; the
process CPU time is reported next to it (the two differ when the machine is busy).
  idle_1000                `progress()` of the language leader with nothing due: with no
                           request, and with 1000 admitted requests whose data never comes

Targets (issue 18): batch <= 30 us at TP 1 and <= 45 us at TP 2; idle progress about 1 us
(as before), also with 1000 requests waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from embxfer.runtime import Config
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.topology import Topology

DIM = 64
TOKENS = 64


def cluster_for(language_tp: int, default_alloc_tokens: int = 128, pool_blocks: int = 4096) -> LocalCluster:
    config = Config(block_size=128, default_alloc_tokens=default_alloc_tokens, language_pool_blocks=pool_blocks,
                    staging_bytes=8 << 20)
    return LocalCluster(Topology(1, 1, language_tp), config, dim=DIM)


def batch_case(language_tp: int, requests: int, reps: int, blind: bool = False) -> dict:
    cluster = cluster_for(language_tp, 8192, 2048) if blind else cluster_for(language_tp)
    steps, step = [0], cluster.step

    def counted() -> bool:
        steps[0] += 1
        return step()

    cluster.step = counted
    payloads = [random_payload(TOKENS, DIM, seed=i) for i in range(requests)]
    walls, cpus = [], []
    next_id = 0
    for rep in range(reps + 1):
        batch = {next_id + i: p for i, p in enumerate(payloads)}
        next_id += requests
        wall, cpu = time.perf_counter(), time.process_time()
        taken = cluster.transfer(batch)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if rep == 0:
            assert all(c.bit_equal(batch[rid]) for rid, copies in taken.items() for c in copies)
            continue
        walls.append(wall / requests)
        cpus.append(cpu / requests)
    return {"case": f"{'blind' if blind else 'batch'}_tp{language_tp}", "requests": requests, "tokens": TOKENS,
            "dim": DIM, "steps_per_batch": steps[0] // (reps + 1),
            "us_per_request": 1e6 * statistics.median(walls), "cpu_us_per_request": 1e6 * statistics.median(cpus),
            "messages_per_batch": cluster.leader.snapshot_stats()["messages"] // (reps + 1)}


def single_case(language_tp: int, requests: int) -> dict:
    cluster = cluster_for(language_tp)
    payload = random_payload(TOKENS, DIM, seed=1)
    for rid in range(20):
        cluster.transfer({rid: payload})
    walls, cpus = [], []
    for rid in range(20, 20 + requests):
        wall, cpu = time.perf_counter(), time.process_time()
        cluster.transfer({rid: payload})
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    walls.sort()
    return {"case": f"single_tp{language_tp}", "requests": requests, "tokens": TOKENS, "dim": DIM,
            "us_per_request": 1e6 * statistics.median(walls), "p99_us": 1e6 * walls[int(0.99 * len(walls))],
            "cpu_us_per_request": 1e6 * statistics.median(cpus)}


def idle_case(waiting: int, calls: int = 20000) -> dict:
    """`progress()` of the language leader with nothing due: no request, then `waiting`
    requests admitted (their allocations sent) whose encoder never submits."""
    cluster = cluster_for(1)
    leader = cluster.leader
    out = {"case": f"idle_{waiting}", "waiting": waiting}
    for label in ("empty", "waiting"):
        if label == "waiting":
            for rid in range(waiting):
                cluster.admit(rid)
            for _ in range(5):
                cluster.step()
            assert leader.in_flight == waiting
        for _ in range(1000):
            leader.progress()
        started = time.perf_counter()
        for _ in range(calls):
            leader.progress()
        out[f"{label}_us"] = 1e6 * (time.perf_counter() - started) / calls
    out["us_per_request"] = out["waiting_us"]
    return out


def demo_case(requests: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "demo.json"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "embxfer", "demo", "--quiet", "--device", "cpu", "--requests", str(requests),
             "--min-tokens", "64", "--max-tokens", "512", "--json", str(path)],
            capture_output=True, text=True, timeout=900)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"demo failed ({result.returncode}): {result.stderr[-500:]}")
        totals = json.loads(path.read_text())["totals"]
    return {"case": "demo", "requests": requests, "tokens": "64..512", "dim": 1024,
            "seconds": totals["seconds"], "requests_per_s": totals["verified"] / totals["seconds"],
            "us_per_request": 1e6 * totals["seconds"] / totals["verified"], "process_wall_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/results/host-{device}.json")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [batch_case(1, 256, args.reps), batch_case(2, 256, args.reps), batch_case(1, 256, args.reps, blind=True),
             single_case(1, 300), single_case(2, 300), idle_case(1000)]
    if not args.skip_demo:
        cases.append(demo_case(1000))
    targets = {"batch_tp1": 30.0, "batch_tp2": 45.0}
    for case in cases:
        if case["case"] in targets:
            case["target_us"] = targets[case["case"]]
            case["met"] = case["us_per_request"] <= targets[case["case"]]
    out = {"benchmark": "host", "device": "cpu", "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "torch": torch.__version__, "cases": cases}
    path = Path(args.json.replace("{device}", "cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    for c in cases:
        if c["case"].startswith("idle"):
            print(f"  {c['case']:<11} progress() with nothing due: {c['empty_us']:.2f} us, "
                  f"with {c['waiting']} waiting {c['waiting_us']:.2f} us")
            continue
        extra = f"  ({c['requests_per_s']:.0f} requests/s)" if "requests_per_s" in c else \
            f"  (cpu {c['cpu_us_per_request']:.0f} us)"
        target = f"  target <= {c['target_us']:.0f}: {'met' if c['met'] else 'MISSED'}" if "target_us" in c else ""
        print(f"  {c['case']:<11} {c['us_per_request']:8.1f} us per request{extra}{target}")
    plot(out, path.with_suffix(".png"))
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in out["cases"] if c["case"] != "demo" and not c["case"].startswith("idle")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = ax.bar([c["case"] for c in cases], [c["us_per_request"] for c in cases], color="steelblue")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    for i, c in enumerate(cases):
        if "target_us" in c:
            ax.plot([i - 0.4, i + 0.4], [c["target_us"]] * 2, color="firebrick", linestyle="--")
    ax.set_ylabel("host us per request (median)")
    ax.set_title(f"embxfer host time per 64-token request, {out['cores']}-core CPU (LocalCluster)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
