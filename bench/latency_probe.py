"""Where the host time of bench/pipeline.py's latency case goes, per function.

    python bench/latency_probe.py timed     per-function timers (each wrapper adds ~0.5 us)
    python bench/latency_probe.py plain     the loop's p50 alone, no timers
    python bench/latency_probe.py spy S     the loop for S seconds (to run under py-spy)
    python bench/latency_probe.py bench     bench/pipeline.py's latency case, twice

One 1024 x 3584 request at a time (64 x 64 without CUDA), admit + submit -> take, as in
the pipeline benchmark's latency case. `timed` wraps every endpoint's progress, admit,
submit, take and release and the functions of the launch path, and prints microseconds
and calls per request (nested timers overlap: a caller's figure includes its callees');
with $OUT set it also writes lat-probe.json there.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

import torch

from embxfer.kernels import cuda_driver, launch, ops
from embxfer.runtime import Config, bus, channels, pool, receiver, sender, transport
from embxfer.runtime.local import LocalCluster, random_payload

sys.path.insert(0, str(Path(__file__).parent))
import pipeline  # noqa: E402 - bench/pipeline.py, next to this file

CUDA = torch.cuda.is_available()
TOKENS, DIM = (1024, 3584) if CUDA else (64, 64)
spent: collections.Counter = collections.Counter()
calls: collections.Counter = collections.Counter()


def timer(owner: object, name: str, key: str) -> None:
    """Replace `owner.name` by a wrapper that adds its wall time to `spent[key]`."""
    pipeline.count_calls(owner, name, key, spent, calls)


def add_timers(cluster: LocalCluster) -> None:
    for index, endpoint in enumerate(cluster.endpoints):
        label = f"{type(endpoint).__name__}{index}"
        for name in ("progress", "admit", "submit", "take", "release"):
            if hasattr(endpoint, name):
                timer(endpoint, name, f"{label}.{name}")
    for name in ("pack_addressed_rows", "unpack_addressed_rows", "pack_rows", "unpack_to_rows", "row_addresses"):
        timer(ops, name, f"ops.{name}")
    for name in ("_route", "_issue", "_begin", "_end", "_graph"):
        timer(launch.Launcher, name, f"Launcher.{name}")
    timer(launch._Route, "row_offsets", "Launcher.row_offsets")
    for name in ("graph_launch", "event_done"):
        timer(cuda_driver.CudaDriver, name, f"driver.{name}")
    timer(transport.LoopbackHub, "_match", "loopback wire")
    timer(pool.BlockPool, "empty_rows", "outputs (empty_rows)")
    timer(channels.SendChannel, "_send_one", "SendChannel._send_one")
    timer(channels.RecvChannel, "pump", "RecvChannel.pump")
    for name in ("_accept", "_landed", "_emit", "_admit_waiting", "_rounds_read", "_take_outputs"):
        timer(receiver.Receiver, name, f"Receiver.{name}")
    for name in ("_on_record", "_emit", "_pump"):
        timer(sender.Sender, name, f"Sender.{name}")
    for name in ("drain", "flush"):
        timer(bus.LocalBus, name, f"bus.{name}")


def run(cluster: LocalCluster, payload, first_id: int, reps: int) -> list[tuple[float, float]]:
    """(admit -> data on the device, admit -> take returned) per request, in seconds."""
    times = []
    for request_id in range(first_id, first_id + reps):
        times.append(pipeline.one_request(cluster, request_id, payload)[:2])
        cluster.settle()
        cluster.senders[0].release(request_id)
    return times


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "timed"
    if mode == "bench":
        for _ in range(2):
            case = pipeline.latency_case(1024, 3584, 256, 200)
            print(f"bench latency p50 {case['p50_us']:.1f} us p99 {case['p99_us']:.1f} us")
        return 0
    config = Config(default_alloc_tokens=8192, language_pool_blocks=256, staging_bytes=256 << 20)
    cluster = LocalCluster(config=config, dim=DIM, device="cuda" if CUDA else "cpu")
    payload = random_payload(TOKENS, DIM, seed=1, device="cuda" if CUDA else "cpu")
    if mode == "timed":
        add_timers(cluster)
    run(cluster, payload, 0, 300 if mode == "spy" else 50)
    spent.clear()
    calls.clear()
    if mode == "spy":
        end, next_id = time.monotonic() + float(argv[1]), 300
        while time.monotonic() < end:
            run(cluster, payload, next_id, 50)
            next_id += 50
        return 0
    times = run(cluster, payload, 50, 400)
    n = len(times)
    total, host = sorted(t for t, _ in times), sorted(h for _, h in times)
    print(f"p50 {1e6 * total[n // 2]:.1f} us (host until take returned {1e6 * host[n // 2]:.1f} us)")
    for key, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"{1e6 * seconds / n:8.2f} us  {calls[key] / n:5.2f} calls  {key}")
    if os.environ.get("OUT"):
        result = {"p50_total_us": 1e6 * total[n // 2], "p50_host_us": 1e6 * host[n // 2],
                  "per_rep_us": {k: 1e6 * v / n for k, v in spent.items()},
                  "calls_per_rep": {k: c / n for k, c in calls.items()}}
        (Path(os.environ["OUT"]) / "lat-probe.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
