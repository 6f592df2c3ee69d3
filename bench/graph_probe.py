"""Can big messages take a CUDA graph (one driver call of host time) without paying the
graph's table upload on the device? The question behind issue 18's launch targets (host
per launch <= 15 us for cases a and d, their kernels >= 0.90 of the copy ceiling).

    python bench/graph_probe.py --json bench/results/graph-probe-{device}.json

Until the seventeenth session a message of more than 32 MiB launched directly: the
table went up on a stream of its own and an event ordered the kernel after it (five
driver calls, 18-20 us of host time on an H100), because a graph's copy node sits on the
kernel's critical path (about 9.5 us of device time on an H100, a and d 0.90 of the
ceiling). A small kernel that fetches the table from its pinned host array costs the
kernel less (`Launcher(graph_fetch="kernel")`, now the default for every size; its runs
on an H100: `graph-probe-h100-run1.json`, `graph-probe-h100-session17.json`,
kernels-NOTES.md). This probe times cases a and d of bench/kernels.py, pack and unpack,
through five launchers:

  direct, side upload        the direct launch, its upload on its own stream
  graph, copy node           graph_fetch="copy": copy node, fixed-grid kernel, event
  graph, fetch kernel        the default graph: a one-program kernel copies the table
                             from its pinned host array (mapped into the device's address
                             space) into the device buffer, then the copy kernel, the event
  graph, host table          the copy kernel reads its table in the pinned host array
  kernel alone               the copy kernel on a table already on the device (the floor)

For each: the device time of one call (L2 flushed, median of 30) as a fraction of the
copy ceiling measured in this run, and the host time to issue one call behind a busy
device (bench/kernels.py `issue_time`, median of 40 windows). Every path is checked
bit-exact against the public call before it is timed; a launcher that fell back to a
direct launch (a failed capture) is an error, not a figure.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import torch
import triton

from embxfer.kernels.launch import Launcher

_spec = importlib.util.spec_from_file_location("_bench_kernels", Path(__file__).with_name("kernels.py"))
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)

EVERY_SIZE = kb.ALL  # as a size limit: every message


def launchers() -> dict[str, Launcher]:
    return {
        "direct, side upload": Launcher(kb.DEVICE, mode="direct", side_upload=True),
        "graph, copy node": Launcher(kb.DEVICE, mode="graph", graph_max_bytes=EVERY_SIZE, graph_fetch="copy"),
        "graph, fetch kernel": Launcher(kb.DEVICE, mode="graph", graph_max_bytes=EVERY_SIZE, graph_fetch="kernel"),
        "graph, host table": Launcher(kb.DEVICE, mode="graph", graph_max_bytes=EVERY_SIZE,
                                      host_table_max_bytes=EVERY_SIZE),
    }


def probe(name: str, op: str, ceiling: float) -> dict:
    case = kb.Case(name)
    call, written, pool, expected = kb.launcher_op(case, op)
    nbytes = 2 * case.payload_bytes
    row = {"case": name, "op": op, "bytes": nbytes}
    made = launchers()
    paths = {label: functools.partial(call, launcher) for label, launcher in made.items()}
    paths["kernel alone"] = kb._kernel_alone(made["direct, side upload"], op,
                                             paths["direct, side upload"], (pool, case.staging))
    for label, fn in paths.items():
        kb._check_exact(fn, written, expected, f"graph probe: {label} {op} on {name}")
        launcher = made.get(label)
        if launcher is not None and label.startswith("graph") and (launcher.mode != "graph" or not launcher._graphs):
            raise SystemExit(f"graph probe: {label} did not launch through a graph")
        us = kb.measure(fn, reps=30)
        row[label] = {"device_us": round(us, 2), "fraction_of_ceiling": round(nbytes / us / 1e3 / ceiling, 3),
                      "host_us": round(kb.issue_time(fn), 2) if label != "kernel alone" else None}
    print(f"{name} {op}: " + "; ".join(
        f"{label} {v['fraction_of_ceiling']} of the ceiling, host {v['host_us']} us"
        for label, v in row.items() if isinstance(v, dict)), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/results/graph-probe-{device}.json")
    parser.add_argument("--cases", default="ad")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/graph_probe.py: needs a CUDA device", file=sys.stderr)
        return 2
    warnings.simplefilter("error")  # a capture that fails must not fall back to a direct launch unseen
    device = torch.cuda.get_device_name()
    ceiling = kb.copy_ceiling()
    print(f"{device}: copy ceiling {ceiling:.0f} GB/s", flush=True)
    rows = []
    for name in args.cases:
        for op in ("pack", "unpack"):
            rows.append(probe(name, op, ceiling))
            torch.cuda.empty_cache()  # (the case's pools went with probe's frame)
    path = Path(args.json.replace("{device}", kb.device_slug(device)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "graph_probe", "device": device, "torch": torch.__version__,
                                "triton": triton.__version__, "ceiling_gbps": ceiling, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
