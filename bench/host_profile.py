"""Where the host time of a request goes: a sampling profile of the runtime's loop.

    py-spy record -f raw -r 500 -o /tmp/raw.txt -- python bench/host_profile.py run latency 15
    python bench/host_profile.py report /tmp/raw.txt --json bench/results/host-profile-{device}.json

`run CASE SECONDS` drives one case of bench/pipeline.py in a loop for SECONDS (on CUDA if
there is one, else on CPU): `latency` (one 1024 x 3584 request at a time) or
`many_small` (256 requests of 256 tokens, D = 3584). `report` folds py-spy's raw stacks
into the share of samples spent in (inclusive) and at (self) each function of the
request's path, so a change can be aimed at what costs, and checked against it after.
Samples of one-time work (compiling a kernel, importing a module: the first transfers of
a run) are counted apart and left out of the shares, which are the steady state's.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path


def run(case: str, seconds: float) -> None:
    import torch

    from embxfer.runtime import Config
    from embxfer.runtime.local import LocalCluster, random_payload

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    config = Config(default_alloc_tokens=8192, language_pool_blocks=2048, staging_bytes=256 << 20)
    cluster = LocalCluster(config=config, dim=3584, device=device)
    if case == "latency":
        batch = [random_payload(1024, 3584, seed=1, device=device)]
    else:
        batch = [random_payload(256, 3584, seed=i, device=device) for i in range(256)]
    next_id, done = 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        cluster.transfer({next_id + i: p for i, p in enumerate(batch)})
        next_id += len(batch)
        done += len(batch)
    print(f"{case}: {done} requests in {seconds:.0f} s on {device}", file=sys.stderr)


# Frames of work done once per run, not per request: a Triton compile (its cache key, the
# compiler's passes), module imports, and binding a kernel variant's launcher (once a variant).
ONE_TIME = ("JITFunction._do_compile", "triton_key", "<frozen importlib._bootstrap", "_CompiledKernels.bind")


def report(raw: Path, top: int) -> dict:
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = one_time = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " " + f.split(" (")[1].split(":")[0] if " (" in f else f
                  for f in stack.split(";")]
        if not any("LocalCluster.transfer" in f for f in frames):
            continue
        n = int(count)
        if any(marker in f for f in frames for marker in ONE_TIME):
            one_time += n
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        raise SystemExit(f"{raw}: no steady-state sample in LocalCluster.transfer ({one_time} of one-time work)")
    return {
        "samples": total,
        "one_time_samples": one_time,
        "inclusive": [{"function": f, "share": round(n / total, 4)} for f, n in inclusive.most_common(top)],
        "self": [{"function": f, "share": round(n / total, 4)} for f, n in own.most_common(top)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run")
    go.add_argument("case", choices=("latency", "many_small"))
    go.add_argument("seconds", type=float)
    show = commands.add_parser("report")
    show.add_argument("raw", type=Path, nargs="+")
    show.add_argument("--json", default=None)
    show.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.case, args.seconds)
        return 0
    out = {path.stem: report(path, args.top) for path in args.raw}
    for name, result in out.items():
        print(f"{name}: {result['samples']} samples in LocalCluster.transfer (and {result['one_time_samples']} of "
              "one-time work left out: compiles, imports); inclusive share:")
        for row in result["inclusive"][: args.top]:
            print(f"  {row['share'] * 100:5.1f}%  {row['function']}")
    if args.json:
        import torch

        device = torch.cuda.get_device_name().split()[-1].lower() if torch.cuda.is_available() else "cpu"
        Path(args.json.replace("{device}", device)).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
