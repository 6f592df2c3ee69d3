"""One short run of bench/pipeline.py's many_small, batch and latency cases: one JSON line.

    python bench/rooms.py ROOT bench/pipeline_short.py TAG [--out runs.jsonl]

For before/after comparisons on one GPU machine in one call: run it for each code root in
turn (an export of an older commit mapped by `bench/rooms.py`, then this checkout, then
the older one again...), as many rounds as the call allows; GPU machines' host speed
drifts, so only neighbouring runs compare. 256 MiB staging (`--staging`); many_small 7 and
batch 5 timed repetitions, latency 200; `--lanes` turns lanes on (bench/pipeline.py's
`use_lanes`; an older code root without lanes takes none). Prints the line and appends it
to `--out` when given, with the host's yardstick at the start and end
(`pipeline.host_yardstick`: lower is a faster host).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline  # noqa: E402 - bench/pipeline.py, next to this file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tag")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--staging", type=int, default=256, help="MiB of staging (bench/pipeline.py: 32, 256)")
    parser.add_argument("--lanes", default=None, help="none, language, encoder or both (default: as shipped)")
    args = parser.parse_args(argv)
    if args.lanes is not None:
        pipeline.use_lanes(args.lanes)
    yardstick = [pipeline.host_yardstick()]
    many = pipeline.run_case("many_small", [256] * 256, 3584, 8192, 2048, args.staging, 7)
    batch = pipeline.run_case("batch", [random.Random(0).randint(64, 4096) for _ in range(64)], 3584, 8192, 2048,
                              args.staging, 5)
    latency = pipeline.latency_case(1024, 3584, args.staging, 200)
    yardstick.append(pipeline.host_yardstick())
    row = {"tag": args.tag, "lanes": args.lanes, "host_yardstick_us": yardstick, "staging_mb": args.staging,
           "many_small_gbps": many["gbps"], "batch_gbps": batch["gbps"], "latency_p50_us": latency["p50_us"],
           "latency_p99_us": latency["p99_us"],
           **{f"{case}_{side}_us": c[f"{side}_host_us_per_request"] for case, c in (("many_small", many),
                                                                                 ("batch", batch))
              for side in ("encoder", "language")}}
    print(json.dumps(row))
    if args.out is not None:
        with args.out.open("a") as out:
            out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
