"""The runtime's data path on one GPU: how close does a whole request, through the real
Sender/Receiver state machines, come to the device's copy bandwidth?

    python bench/pipeline.py --json bench/results/pipeline-{device}.json

One process, `LocalCluster` on CUDA: every step an engine pays is there (submit into the
encoder pool, pack into staging chunks, unpack into the language pool, read into the
output tensors, the control records, the round logic) except the wire: the loopback
transport moves each staging chunk with one device `copy_` where NCCL would send it.
That makes 5 passes over the payload (scatter, pack, move, unpack, read), each reading
and writing every byte; `fraction_of_ideal` compares the measured time with 5 such
passes at the copy ceiling measured in the same run. It answers "is the runtime host- or
device-bound, and at which chunk size", which the two-GPU benchmark (bench/e2e.py)
builds on; it says nothing about NCCL.

Cases (bf16, block 128), each with 32 MiB and 256 MiB staging chunks:
  one_round   16384 x 8192, full allocation
  resume      the same with an 8192-token default allocation and a pool of 64 blocks
  batch       64 requests of 64..4096 tokens (seed 0), D = 3584
  many_small  256 requests of 256 tokens, D = 3584
and, at 256 MiB:
  latency     one 1024 x 3584 request at a time, admit + submit -> take (data on the
              device), p50 and p99 over 200

Since the encoder packs straight from the payload (no encoder pool), a request makes 4
passes now (pack, move, unpack, read-out); `fraction_of_ideal` still compares with the
5 passes of the earlier design, so the numbers stay comparable across versions, and
`fraction_of_4_pass_ideal` is given too.

The host's speed: `host_yardstick_us` (start and end of the run) times one fixed piece of
plain Python (`host_yardstick`); the GPU machines' hosts differ by about 2x in such work,
so a run's figures are read against its own yardstick.

Each engine's own share (`--sides`, on by default): in this benchmark one thread runs both
engines, so a case's time is the encoder's host time plus the language engine's plus the
device's tail; in a deployment each engine runs its part on its own scheduler thread.
After a case's timed repetitions, more repetitions run with every engine-facing call of
each endpoint timed (`progress`, `admit*`, `submit*`, `take*`, `finished`, `release`,
`state`; a call made from inside another is counted once), and the case reports the
median seconds each side spent in them (`encoder_host_s`, `language_host_s`; per request
in `*_host_us_per_request`). The timed calls cost a few tenths of a microsecond each,
which is why the headline figures come from the untimed repetitions.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from embxfer.kernels import launch
from embxfer.runtime import Config, receiver, sender
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.sender import Sender
from embxfer.runtime.state import RequestState

# The lanes (runtime/lane.py) a run turns on: every cluster made after `use_lanes` has them.
LANES = {"none": (False, False), "language": (True, False), "encoder": (False, True), "both": (True, True)}


def use_lanes(name: str) -> None:
    """Turn the language and encoder lanes on or off for the clusters made from now on."""
    receiver.LANE_ENABLED, sender.LANE_ENABLED = LANES[name]


PASSES = 5


def copy_ceiling() -> float:
    """GB/s of a 1 GiB device-to-device copy, read + write bytes (median of 20)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times[3:]) / 1e9


ENGINE_CALLS = ("progress", "admit", "admit_many", "submit", "submit_many", "take", "take_many", "finished",
                "release", "release_many", "state")


def count_calls(owner: object, name: str, key: str, spent: dict, calls: dict,
                nested: list[float] | None = None) -> Callable[[], None]:
    """Replace `owner.name` by a wrapper that adds its seconds to `spent[key]` and 1 to
    `calls[key]` (dicts that hold the key, or Counters); returns what puts `owner` back as
    it was (a name `owner` only inherited is removed again). With `nested`, a list shared
    by the wrappers of one probe, a call's seconds leave out those of wrapped calls made
    inside it (each counted under its own key). For the probes of this folder
    (bench/latency_probe.py, bench/steady.py, bench/rows_probe.py)."""
    original = getattr(owner, name)
    clock = time.perf_counter

    def counted(*args, **kwargs):
        started = clock()
        if nested is not None:
            nested.append(0.0)
        try:
            return original(*args, **kwargs)
        finally:
            took = clock() - started
            if nested is not None:
                spent[key] += took - nested.pop()
                if nested:
                    nested[-1] += took
            else:
                spent[key] += took
            calls[key] += 1

    own = name in getattr(owner, "__dict__", {})
    setattr(owner, name, counted)
    return (lambda: setattr(owner, name, original)) if own else (lambda: delattr(owner, name))


def time_engine_calls(cluster: LocalCluster) -> dict[str, float]:
    """Wrap every engine-facing call of each endpoint of `cluster` (on the instance) so that
    its seconds are added to its side's total in the returned dict ("encoder", "language"):
    what each engine's scheduler thread pays. A call made while another is being timed
    (`take` inside `take_many`, say) is not timed again."""
    spent = {"encoder": 0.0, "language": 0.0}
    inside = [False]
    clock = time.perf_counter

    def timed(method, side: str):
        def call(*args, **kwargs):
            if inside[0]:
                return method(*args, **kwargs)
            inside[0] = True
            started = clock()
            try:
                return method(*args, **kwargs)
            finally:
                spent[side] += clock() - started
                inside[0] = False
        return call

    for endpoint in cluster.endpoints:
        side = "encoder" if isinstance(endpoint, Sender) else "language"
        for name in ENGINE_CALLS:
            method = getattr(endpoint, name, None)
            if method is not None:
                setattr(endpoint, name, timed(method, side))
    return spent


def _sides(spent_per_rep: list[dict[str, float]], requests: int) -> dict:
    """The median of each side's seconds over the timed repetitions, and per request."""
    out = {}
    for side in ("encoder", "language"):
        median = statistics.median(rep[side] for rep in spent_per_rep)
        out[f"{side}_host_s"] = median
        out[f"{side}_host_us_per_request"] = 1e6 * median / requests
    return out


class _Item:
    __slots__ = ("key", "value")

    def __init__(self, key: int, value: int) -> None:
        self.key, self.value = key, value


def host_yardstick(rounds: int = 25) -> float:
    """Microseconds of one fixed piece of plain Python of the runtime's kind (small objects
    made, a dict filled and read, attributes updated, calls), the best of `rounds`.

    The GPU machines' hosts differ by about 2x in such work, and one host's speed moves
    between calls (a "slow mode"); the figures of a run are read against its own
    yardstick, taken at its start and end, never against another host's figures alone."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        table: dict[int, _Item] = {}
        for key in range(2000):
            item = _Item(key, key)
            table[key] = item
            previous = table.get(key - 1)
            if previous is not None:
                previous.value += item.key
        best = min(best, time.perf_counter() - started)
    return 1e6 * best


def result_path(template: str, device_name: str) -> Path:
    """`template` with {device} as the device's short name ("NVIDIA H100 80GB HBM3" -> h100,
    "cpu" -> cpu), its folder made: where a benchmark of this folder writes its JSON."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower().replace("nvidia", "")).strip("-").split("-")[0]
    path = Path(template.replace("{device}", slug or "gpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_case(name: str, lengths: list[int], dim: int, default_alloc: int, pool_blocks: int, staging_mb: int,
             reps: int, sides: bool = True) -> dict:
    config = Config(default_alloc_tokens=default_alloc, language_pool_blocks=pool_blocks,
                    staging_bytes=staging_mb << 20)
    cluster = LocalCluster(config=config, dim=dim, device="cuda")
    payloads = [random_payload(n, dim, seed=i, device="cuda") for i, n in enumerate(lengths)]
    nbytes = sum(p.nbytes for p in payloads)
    seconds = []
    next_id = 0
    for rep in range(reps + 2):  # two warm-ups: compile, size workspaces
        batch = {next_id + i: p for i, p in enumerate(payloads)}
        next_id += len(payloads)
        torch.cuda.synchronize()
        started = time.perf_counter()
        taken = cluster.transfer(batch)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if rep == 0:
            for rid, copies in taken.items():
                if not copies[0].bit_equal(batch[rid]):
                    raise SystemExit(f"{name}: request {rid} is not bit-exact")
        if rep >= 2:
            seconds.append(elapsed)
    median = statistics.median(seconds)
    out = {"case": name, "staging_mb": staging_mb, "requests": len(lengths), "tokens": sum(lengths), "dim": dim,
           "bytes": nbytes, "median_s": median, "gbps": nbytes / median / 1e9,
           "resumes": cluster.leader.stats.resumes // (reps + 2),
           "messages_per_rep": cluster.p2p.messages // (reps + 2)}
    if sides:
        spent, per_rep = time_engine_calls(cluster), []
        for _ in range(reps):
            batch = {next_id + i: p for i, p in enumerate(payloads)}
            next_id += len(payloads)
            before = dict(spent)
            cluster.transfer(batch)
            per_rep.append({side: spent[side] - before[side] for side in spent})
        out.update(_sides(per_rep, len(lengths)))
    return out


def one_request(cluster: LocalCluster, request_id: int, payload) -> tuple[float, float, object]:
    """Admit + submit -> take of one request, the device idle at the start: (seconds until
    its data is on the device, seconds until take() returned, the payload taken). On a
    CPU cluster (bench/latency_probe.py without CUDA) there is nothing to wait for."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else _nothing
    sync()
    started = time.perf_counter()
    cluster.admit(request_id)
    cluster.submit(request_id, payload)
    leader = cluster.leader
    while leader.state(request_id) is not RequestState.SUCCESS:
        cluster.step()
    taken = leader.take(request_id)
    host = time.perf_counter() - started
    sync()
    return time.perf_counter() - started, host, taken


def _nothing() -> None:
    pass


def latency_case(tokens: int, dim: int, staging_mb: int, reps: int, sides: bool = True) -> dict:
    """One request at a time through the whole runtime: admit + submit -> take, the data on
    the device (synchronized) when the clock stops."""
    config = Config(default_alloc_tokens=8192, language_pool_blocks=256, staging_bytes=staging_mb << 20)
    cluster = LocalCluster(config=config, dim=dim, device="cuda")
    payload = random_payload(tokens, dim, seed=1, device="cuda")
    times = []
    for rep in range(reps + 20):
        elapsed, _, taken = one_request(cluster, rep, payload)
        cluster.settle()
        cluster.senders[0].release(rep)
        if rep == 0 and not taken.bit_equal(payload):
            raise SystemExit("latency: not bit-exact")
        if rep >= 20:
            times.append(elapsed)
    times.sort()
    median = statistics.median(times)
    out = {"case": "latency", "staging_mb": staging_mb, "requests": 1, "tokens": tokens, "dim": dim,
           "bytes": payload.nbytes, "median_s": median, "gbps": payload.nbytes / median / 1e9,
           "p50_us": 1e6 * median, "p99_us": 1e6 * times[min(len(times) - 1, int(0.99 * len(times)))],
           "resumes": 0, "messages_per_rep": 1}
    if sides:
        spent, per_rep = time_engine_calls(cluster), []
        for rep in range(reps + 20, 2 * reps + 20):
            before = dict(spent)
            one_request(cluster, rep, payload)
            per_rep.append({side: spent[side] - before[side] for side in spent})
            cluster.settle()
            cluster.senders[0].release(rep)
        out.update(_sides(per_rep, 1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/results/pipeline-{device}.json")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--latency-reps", type=int, default=200)
    parser.add_argument("--graph-fetch", choices=launch.GRAPH_FETCHES, default=launch.DEFAULT_GRAPH_FETCH,
                        help="how a graph's table reaches the device (embxfer.kernels.launch.Launcher)")
    parser.add_argument("--graph-max-mb", type=float, default=launch.GRAPH_MAX_BYTES / (1 << 20),
                        help="messages of at most this many MiB launch as graphs, bigger ones direct "
                             "(inf: every message)")
    parser.add_argument("--lanes", choices=sorted(LANES), default=None,
                        help="turn these lanes on (runtime/lane.py; default: as the runtime ships)")
    parser.add_argument("--no-sides", dest="sides", action="store_false",
                        help="skip the repetitions that time each engine's calls (see the module's docstring)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/pipeline.py: needs a CUDA device", file=sys.stderr)
        return 2
    if args.lanes is not None:
        use_lanes(args.lanes)
    graph_max_bytes = int(min(args.graph_max_mb * (1 << 20), 1 << 62))  # (inf: every message)
    launch.use_launcher(launch.Launcher(torch.device("cuda", torch.cuda.current_device()),
                                        graph_max_bytes=graph_max_bytes, graph_fetch=args.graph_fetch))
    launch_options = {"graph_fetch": args.graph_fetch, "graph_max_bytes": graph_max_bytes}
    device = torch.cuda.get_device_name()
    yardstick = [host_yardstick()]
    ceiling = copy_ceiling()
    batch = [random.Random(0).randint(64, 4096) for _ in range(64)]
    cases = []
    for staging_mb in (32, 256):
        cases.append(run_case("one_round", [16384], 8192, 16384, 256, staging_mb, args.reps, args.sides))
        cases.append(run_case("resume", [16384], 8192, 8192, 64, staging_mb, args.reps, args.sides))
        cases.append(run_case("batch", batch, 3584, 8192, 2048, staging_mb, args.reps, args.sides))
        cases.append(run_case("many_small", [256] * 256, 3584, 8192, 2048, staging_mb, args.reps, args.sides))
    cases.append(latency_case(1024, 3584, 256, args.latency_reps, args.sides))
    yardstick.append(host_yardstick())
    for case in cases:
        ideal = PASSES * 2 * case["bytes"] / (ceiling * 1e9)
        case["ideal_s"] = ideal
        case["fraction_of_ideal"] = ideal / case["median_s"]
        case["fraction_of_4_pass_ideal"] = 4 / PASSES * ideal / case["median_s"]
    path = result_path(args.json, device)
    out = {"benchmark": "pipeline", "device": device, "torch": torch.__version__, "ceiling_gbps": ceiling,
           "lanes": {"language": receiver.LANE_ENABLED, "encoder": sender.LANE_ENABLED},
           "passes": PASSES, "launch": launch_options, "host_yardstick_us": yardstick, "cases": cases}
    path.write_text(json.dumps(out, indent=2))
    print(f"{device}: copy ceiling {ceiling:.0f} GB/s (read + write); launch {launch_options}; host yardstick "
          f"{yardstick[0]:.0f} / {yardstick[1]:.0f} us (start / end; lower is faster)")
    for c in cases:
        sides = (f"  [host per request: encoder {c['encoder_host_us_per_request']:.1f} us, language "
                 f"{c['language_host_us_per_request']:.1f} us]" if "encoder_host_s" in c else "")
        if c["case"] == "latency":
            print(f"  latency    staging {c['staging_mb']:>3} MiB  1 x {c['tokens']} x {c['dim']}: "
                  f"p50 {c['p50_us']:.0f} us, p99 {c['p99_us']:.0f} us{sides}")
            continue
        print(f"  {c['case']:<10} staging {c['staging_mb']:>3} MiB  {c['bytes'] / 1e6:8.1f} MB  "
              f"{c['median_s'] * 1e3:8.2f} ms  {c['gbps']:7.1f} GB/s payload  "
              f"{c['fraction_of_ideal']:.2f} of {PASSES} passes at the ceiling  ({c['messages_per_rep']} chunks, "
              f"{c['resumes']} resumes){sides}")
    plot(out, path.with_suffix(".png"))
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    order = ["one_round", "resume", "batch", "many_small"]
    names = sorted({c["case"] for c in out["cases"] if c["case"] in order}, key=order.index)
    width = 0.38
    for offset, staging in ((-width / 2, 32), (width / 2, 256)):
        values = [next(c["gbps"] for c in out["cases"] if c["case"] == n and c["staging_mb"] == staging)
                  for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=f"staging {staging} MiB")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ideal = out["ceiling_gbps"] / (2 * out["passes"])
    ax.axhline(ideal, color="firebrick", linestyle="--", linewidth=1)
    ax.text(-0.45, ideal * 1.02, f"{out['passes']} passes at the copy ceiling: {ideal:.0f} GB/s", color="firebrick",
            fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("payload GB/s (median)")
    ax.set_title(f"embxfer runtime data path on one GPU (loopback wire): {out['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
