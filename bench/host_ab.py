"""Paired before/after runs of bench/host.py's batch cases, two code roots alternating.

    python bench/host_ab.py OLD_ROOT NEW_ROOT --tp 2 --pairs 6 [--blind]

OLD_ROOT and NEW_ROOT are checkouts (e.g. `git archive C | tar -x -C DIR` for an older
commit, `.` for this one), each mapped onto the embxfer package by `bench/rooms.py`; this
file's `bench/host.py` is the harness for both. Each pair runs one process per root, in
alternating order (old first in even pairs), each process timing `--batches` batches of
256 64-token requests after one warm-up. On a VM whose speed drifts by tens of per cent
over minutes, the median of the pairs' new/old ratios is the figure to trust; the two
codes' medians and minima are printed next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def one_run(root: str, tp: int, batches: int, blind: bool) -> float:
    """One process on `root`'s code: this file again (`--one`) through `bench/rooms.py`."""
    command = [sys.executable, str(BENCH / "rooms.py"), root, str(Path(__file__).resolve()), "--one", "--tp", str(tp),
               "--batches", str(batches), *(["--blind"] if blind else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"{root}: exit {result.returncode}: {result.stderr[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["us_per_request"]


def time_batches(tp: int, batches: int, blind: bool) -> None:
    """(--one) bench/host.py's batch case on the code this process was started on."""
    import host  # bench/host.py, next to this file (rooms.py puts this folder first on the path)
    import torch

    torch.set_num_threads(1)
    print(json.dumps(host.batch_case(tp, 256, batches, blind=blind)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", nargs="?")
    parser.add_argument("new", nargs="?")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--blind", action="store_true")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.batches < 1:
        raise SystemExit(f"--pairs={args.pairs}, --batches={args.batches}: expected integers >= 1")
    if args.one:
        time_batches(args.tp, args.batches, args.blind)
        return 0
    if args.old is None or args.new is None:
        parser.error("expected OLD_ROOT and NEW_ROOT")
    times: dict[str, list[float]] = {args.old: [], args.new: []}
    for pair in range(args.pairs):
        for root in (args.old, args.new) if pair % 2 == 0 else (args.new, args.old):
            times[root].append(one_run(root, args.tp, args.batches, args.blind))
    old, new = times[args.old], times[args.new]
    ratios = [n / o for o, n in zip(old, new, strict=True)]
    name = f"{'blind' if args.blind else 'batch'} TP {args.tp}"
    print(f"{name}: old {args.old} median {statistics.median(old):.2f} us (min {min(old):.2f}); "
          f"new {args.new} median {statistics.median(new):.2f} us (min {min(new):.2f}); "
          f"new/old median of pairs {statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
