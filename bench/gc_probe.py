"""What Python's garbage collector costs bench/host.py's batch case, per generation.

    python bench/gc_probe.py --tp 2 [--batches 30] [--drop]

Runs batches of 256 64-token requests through one `LocalCluster` (as bench/host.py does)
with a `gc.callbacks` hook timing every collection, then the same with the collector off.
Prints, per generation, collections per batch and microseconds per request, and the
median time per request with the collector on and off. `--drop`: the loop drops each
batch's payloads at once (an engine that hands them on), instead of holding them until
the next batch as bench/host.py does; full collections then come only from what the
runtime and the loop keep.
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402 - bench/host.py, next to this file

from embxfer.runtime.local import random_payload  # noqa: E402


def run(tp: int, batches: int, drop: bool, collector: bool) -> tuple[list[float], dict]:
    cluster = host.cluster_for(tp)
    payloads = [random_payload(host.TOKENS, host.DIM, seed=i) for i in range(256)]
    spent: dict[int, list] = collections.defaultdict(lambda: [0, 0.0])
    started = [0.0]

    def hook(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[info["generation"]][0] += 1
            spent[info["generation"]][1] += time.perf_counter() - started[0]

    per_request, next_id, kept = [], 0, None
    (gc.enable if collector else gc.disable)()
    try:
        for batch_index in range(batches + 2):  # two warm-ups
            if batch_index == 2 and collector:
                gc.callbacks.append(hook)
            batch = {next_id + i: p for i, p in enumerate(payloads)}
            next_id += len(batch)
            clock = time.perf_counter()
            taken = cluster.transfer(batch)
            elapsed = time.perf_counter() - clock
            kept = None if drop else taken
            del taken
            if batch_index >= 2:
                per_request.append(1e6 * elapsed / len(batch))
    finally:
        if hook in gc.callbacks:
            gc.callbacks.remove(hook)
        gc.enable()
    del kept
    return per_request, dict(spent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--drop", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    on, spent = run(args.tp, args.batches, args.drop, collector=True)
    off, _ = run(args.tp, args.batches, args.drop, collector=False)
    requests = 256 * args.batches
    print(f"TP {args.tp}, {args.batches} batches of 256{' (payloads dropped at once)' if args.drop else ''}: "
          f"median {statistics.median(on):.2f} us a request with the collector, {statistics.median(off):.2f} without; "
          f"mean {statistics.fmean(on):.2f} / {statistics.fmean(off):.2f}")
    for generation, (count, seconds) in sorted(spent.items()):
        print(f"  generation {generation}: {count / args.batches:.2f} a batch, {1e3 * seconds / count:.2f} ms each, "
              f"{1e6 * seconds / requests:.2f} us a request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
