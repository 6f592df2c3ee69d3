"""End-to-end transfer benchmark (issue 5): Sender -> Receiver through the public API,
against a plain torch.distributed send of the same bytes, measured in the same run.

    python bench/e2e.py --json bench/results/e2e-cpu.json [--device auto|cpu|cuda]

Two ranks: rank 0 is an encoder engine (Sender), rank 1 the language engine (Receiver).
Without torchrun the script starts both itself (it re-runs this file with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set); `torchrun --nproc-per-node 2 bench/e2e.py`
works too. CPU tensors move over gloo, CUDA tensors over NCCL (one GPU per rank).

Cases, each with its own Sender/Receiver pair on the same bus and process group:
  one_round  one request of --tokens (32768) tokens into a full default allocation
  resume_3   the same request, default allocation 8192 and a language pool of exactly
             64 blocks: 8192 tokens per round, so 4 rounds (3 resumes)
  exact_size the same request with the 8192 default, a pool that holds it, and its size
             given at admission (`expected_tokens`): one exact round, no resume
  mix        --mix-requests (32) requests, lengths drawn from --mix-min..--mix-max
             (seeded); the language engine keeps --window (8) admitted at a time
  raw_send   one dist.send/recv of a single contiguous tensor of the one_round payload's
             bytes on the same process group: the limit the others are held against

Timing: a barrier (which keeps serving heartbeats), then the clock runs on the language
rank from the first admit to the last take() returning (CUDA synchronised). Every case
runs --warmup repetitions, then --reps timed ones; `seconds` is their median. The warm-up
repetitions verify every payload bit-exact. Bytes are payload bytes: embeddings,
fill_ids, mrope positions, deepstack and 8 for the mrope delta. Mix latencies are
admit -> take per request, pooled over the timed repetitions.

Device allocations (CUDA only): `allocation.all.allocated` of the caching allocator on
both ranks, counted across each timed repetition, minus the output tensors that take()
hands to the engine (3 per request, 4 with deepstack); the worst repetition is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
CASES = ("one_round", "resume_3", "exact_size", "mix", "raw_send")
ENCODER, LANGUAGE = 0, 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/e2e.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench/results/e2e-{device}.json", metavar="PATH",
                   help="results JSON ({device} is replaced); the PNG goes next to it")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tokens", type=int, default=32768, help="tokens of the one_round/resume_3 request")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--deepstack", type=int, default=0, metavar="K")
    p.add_argument("--resume-alloc-tokens", type=int, default=8192,
                   help="default allocation (and language pool) of resume_3")
    p.add_argument("--mix-requests", type=int, default=32)
    p.add_argument("--mix-min", type=int, default=64)
    p.add_argument("--mix-max", type=int, default=8192)
    p.add_argument("--window", type=int, default=8, help="mix: requests admitted at a time")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--mix-reps", type=int, default=3)
    p.add_argument("--data", choices=("normal", "bits"), default="normal",
                   help="embedding values: normal(0,1), or uniform random bit patterns (NaN/Inf/denormals)")
    p.add_argument("--idle-wait-us", type=float, default=200.0,
                   help="how long an idle event loop parks between progress calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="write cProfile stats of each rank to DIR/e2e-rank<r>.prof")
    args = p.parse_args(argv)
    for name in ("tokens", "dim", "resume_alloc_tokens", "mix_requests", "mix_min", "mix_max", "window",
                 "reps", "mix_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    if args.warmup < 0 or args.deepstack < 0:
        p.error("--warmup and --deepstack: expected >= 0")
    if args.mix_min > args.mix_max:
        p.error(f"--mix-min={args.mix_min} > --mix-max={args.mix_max}")
    return args


# -- data -----------------------------------------------------------------------------------
@dataclass
class Source:
    """Rows every payload is cut from (the same bits on both ranks, from the seed)."""

    embeddings: torch.Tensor
    fill_ids: torch.Tensor
    positions: torch.Tensor
    deepstack: torch.Tensor | None


def make_source(args: argparse.Namespace, rows: int, device: torch.device) -> Source:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)

    def floats(cols: int) -> torch.Tensor:
        if args.data == "normal":
            return torch.randn(rows, cols, generator=gen).to(dtype)
        info = torch.iinfo(_BITS[dtype])
        return torch.randint(info.min, info.max, (rows, cols), generator=gen, dtype=_BITS[dtype]).view(dtype)

    return Source(
        embeddings=floats(args.dim).to(device),
        fill_ids=torch.randint(0, 152_000, (rows,), generator=gen, dtype=torch.int32).to(device),
        positions=torch.randint(0, 1 << 20, (3, rows), generator=gen, dtype=torch.int32).to(device),
        deepstack=floats(args.deepstack * args.dim).to(device) if args.deepstack else None,
    )


def payload_of(source: Source, request_id: int, tokens: int):
    """Request `request_id`'s payload: views of `tokens` source rows (the positions, [3, N],
    are copied to be contiguous; that happens before the clock starts)."""
    from embxfer.runtime import Payload

    first = (request_id * 977) % (source.embeddings.shape[0] - tokens + 1)
    rows = slice(first, first + tokens)
    return Payload(
        embeddings=source.embeddings[rows], fill_ids=source.fill_ids[rows],
        mrope_positions=source.positions[:, rows].contiguous(), mrope_delta=request_id * 7 - 1000,
        deepstack=None if source.deepstack is None else source.deepstack[rows],
    )


def mix_lengths(args: argparse.Namespace) -> list[int]:
    rng = random.Random(args.seed)
    return [rng.randint(args.mix_min, args.mix_max) for _ in range(args.mix_requests)]


# -- the world ------------------------------------------------------------------------------
@dataclass
class Rank:
    args: argparse.Namespace
    world: object
    bus: object
    transport: object
    source: Source
    deadline: float
    next_id: int = 0

    @property
    def role(self) -> int:
        return self.world.rank

    def sync(self) -> None:
        if self.world.device.type == "cuda":
            torch.cuda.synchronize(self.world.device)

    def allocations(self) -> int:
        if self.world.device.type != "cuda":
            return 0
        return torch.cuda.memory_stats(self.world.device).get("allocation.all.allocated", 0)

    def check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"{what}: past --timeout={self.args.timeout:.0f}s")

    def barrier(self, endpoint=None) -> None:
        """All ranks meet; meanwhile the control plane keeps being served (heartbeats), so a
        rank that arrives early is never taken for dead."""
        work = dist.all_reduce(torch.zeros(1), group=self.world.meta_group, async_op=True)
        while not work.is_completed():
            self.check_deadline("barrier")
            if endpoint is not None:
                endpoint.progress()
            time.sleep(0.0005)
        work.wait()

    def exchange(self, numbers: list[float]) -> list[list[float]]:
        mine = torch.tensor(numbers, dtype=torch.float64)
        out = [torch.zeros_like(mine) for _ in range(self.world.world_size)]
        dist.all_gather(out, mine, group=self.world.meta_group)
        return [t.tolist() for t in out]

    def new_ids(self, count: int) -> list[int]:
        first, self.next_id = self.next_id, self.next_id + count
        return list(range(first, first + count))


def endpoint_for(rank: Rank, config):
    from embxfer.runtime.receiver import Receiver
    from embxfer.runtime.sender import Sender
    from embxfer.runtime.topology import Topology

    args = rank.args
    common = dict(config=config, topology=Topology(1, 1, 1), rank=rank.role, bus=rank.bus,
                  transport=rank.transport, dim=args.dim, dtype=DTYPES[args.dtype],
                  deepstack_layers=args.deepstack, device=rank.world.device)
    return Sender(**common) if rank.role == ENCODER else Receiver(**common)


# -- the two event loops, as an engine would write them ------------------------------------------
def encoder_loop(rank: Rank, sender, payloads: dict, window: int) -> None:
    """Submit up to `window` unfinished requests at a time (an encoder engine produces
    payloads as it goes, it does not dump them all at once), poll, release."""
    from embxfer.runtime.state import RequestState

    idle = rank.args.idle_wait_us * 1e-6
    todo = list(payloads)
    active: set[int] = set()
    while todo or active:
        rank.check_deadline("encoder loop")
        while todo and len(active) < window:
            request_id = todo.pop(0)
            sender.submit(request_id, payloads[request_id])
            active.add(request_id)
        worked = sender.progress()
        for request_id in list(active):
            state = sender.state(request_id)
            if state is RequestState.FAILED:
                raise RuntimeError(f"request {request_id} failed on the encoder: {sender.error(request_id)}")
            if state is RequestState.SUCCESS:
                sender.release(request_id)
                active.discard(request_id)
                worked = True
        if not worked:
            sender.wait(idle)


def language_loop(rank: Rank, receiver, payloads: dict, window: int, verify: bool,
                  exact: bool = False) -> dict[int, float]:
    """Admit up to `window` requests at a time (with `exact`, telling the size: the first
    allocation is exact), poll, take. Returns admit -> take seconds."""
    from embxfer.runtime.state import RequestState

    idle = rank.args.idle_wait_us * 1e-6
    todo = list(payloads)
    admitted: dict[int, float] = {}
    latencies: dict[int, float] = {}
    while todo or admitted:
        rank.check_deadline("language loop")
        while todo and len(admitted) < window:
            request_id = todo.pop(0)
            receiver.admit(request_id, encoder_engine=0,
                           expected_tokens=payloads[request_id].num_tokens if exact else None)
            admitted[request_id] = time.monotonic()
        worked = receiver.progress()
        for request_id in list(admitted):
            state = receiver.state(request_id)
            if state is RequestState.FAILED:
                raise RuntimeError(f"request {request_id} failed on the language side: "
                                   f"{receiver.error(request_id)}")
            if state is not RequestState.SUCCESS:
                continue
            received = receiver.take(request_id)
            rank.sync()
            latencies[request_id] = time.monotonic() - admitted.pop(request_id)
            if verify:
                diffs = payloads[request_id].mismatches(received)
                if diffs:
                    raise RuntimeError(f"request {request_id}: fields differ: {', '.join(diffs)}")
            worked = True
        if not worked:
            receiver.wait(idle)
    return latencies


# -- cases ------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    name: str
    requests: int
    tokens: int
    bytes: int
    seconds: float
    gbps: float
    seconds_all: list[float]
    resumes: int | None = None
    p50_s: float | None = None
    p99_s: float | None = None
    config: dict = field(default_factory=dict)
    net_device_allocations: list[int] | None = None


def transfer_case(rank: Rank, name: str, config, lengths: list[int], window: int, reps: int,
                  exact: bool = False) -> CaseResult:
    """Warm-up (verified) and timed repetitions of moving `lengths` through one endpoint pair."""
    endpoint = endpoint_for(rank, config)
    seconds: list[float] = []
    latencies: list[float] = []
    net_allocations: list[int] = []
    resumes: list[int] = []
    output_tensors = 3 + (1 if rank.args.deepstack else 0)
    payload_bytes = 0
    try:
        for rep in range(rank.args.warmup + reps):
            ids = rank.new_ids(len(lengths))
            payloads = {rid: payload_of(rank.source, rid, n) for rid, n in zip(ids, lengths, strict=True)}
            payload_bytes = sum(p.nbytes for p in payloads.values())
            timed = rep >= rank.args.warmup
            rank.barrier(endpoint)
            resumes_before = endpoint.stats.resumes
            allocations_before = rank.allocations()
            started = time.monotonic()
            if rank.role == ENCODER:
                encoder_loop(rank, endpoint, payloads, window)
                took = {}
            else:
                took = language_loop(rank, endpoint, payloads, window, verify=not timed, exact=exact)
            elapsed = time.monotonic() - started
            allocations = rank.allocations() - allocations_before
            if rank.role == LANGUAGE and rank.world.device.type == "cuda":
                allocations -= output_tensors * len(lengths)
            if timed:
                seconds.append(elapsed)
                latencies.extend(took.values())
                net_allocations.append(allocations)
                resumes.append(endpoint.stats.resumes - resumes_before)
        rank.barrier(endpoint)
        leaked = endpoint._blocks_in_use()
        if leaked:
            raise RuntimeError(f"{name}: {leaked} blocks still in use on rank {rank.role} after the case")
    finally:
        endpoint.close()
    if rank.role == ENCODER:
        return CaseResult(name, len(lengths), sum(lengths), payload_bytes, 0.0, 0.0, seconds,
                          net_device_allocations=net_allocations)
    median = statistics.median(seconds)
    ordered = sorted(latencies)
    return CaseResult(
        name=name, requests=len(lengths), tokens=sum(lengths), bytes=payload_bytes, seconds=median,
        gbps=payload_bytes / median / 1e9, seconds_all=seconds, resumes=max(resumes),
        p50_s=quantile(ordered, 0.50) if len(lengths) > 1 else None,
        p99_s=quantile(ordered, 0.99) if len(lengths) > 1 else None,
        config={"default_alloc_tokens": config.default_alloc_tokens,
                "language_pool_blocks": config.language_pool_blocks,
                "window": window},
        net_device_allocations=net_allocations,
    )


def raw_send_case(rank: Rank, nbytes: int, reps: int) -> CaseResult:
    """One contiguous tensor of `nbytes`, dist.send -> dist.recv on the data group."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=rank.world.device)
    if rank.role == ENCODER:
        buffer.random_(0, 256)
    seconds = []
    for rep in range(rank.args.warmup + reps):
        rank.barrier()
        rank.sync()
        started = time.monotonic()
        if rank.role == ENCODER:
            dist.send(buffer, dst=LANGUAGE, group=rank.world.data_group)
        else:
            dist.recv(buffer, src=ENCODER, group=rank.world.data_group)
        rank.sync()
        if rep >= rank.args.warmup:
            seconds.append(time.monotonic() - started)
    median = statistics.median(seconds)
    return CaseResult("raw_send", 1, 0, nbytes, median, nbytes / median / 1e9, seconds)


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- one rank ---------------------------------------------------------------------------------
def run_rank(args: argparse.Namespace) -> int:
    from embxfer.runtime.bus import ShmBus
    from embxfer.runtime.config import Config
    from embxfer.runtime.launch import group_exchange, init_world, pick_device
    from embxfer.runtime.transport import TorchP2P

    run_started = time.monotonic()
    deadline = run_started + args.timeout
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != 2:
        raise ValueError(f"WORLD_SIZE={world_size}: this benchmark runs on exactly 2 ranks")
    device_kind = pick_device(args.device, world_size)
    if device_kind == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"--device cuda: {torch.cuda.device_count()} GPU(s) visible, expected one per rank (2)")
    world = init_world(device_kind, args.timeout)
    rows = max(args.tokens, args.mix_max)
    source = make_source(args, rows, world.device)
    # On GPUs every staging chunk costs a few fixed kernel launches (bench/results/
    # pipeline-NOTES.md): use 256 MiB chunks there unless EMBXFER_STAGING_BYTES says otherwise.
    gpu_staging = ({"staging_bytes": 256 << 20}
                   if world.device.type == "cuda" and "EMBXFER_STAGING_BYTES" not in os.environ else {})
    base = Config.from_env(request_timeout_s=args.timeout, **gpu_staging)
    bus = ShmBus.create(world.rank, [1 - world.rank], group_exchange(world.meta_group, world_size),
                        slots=base.ring_slots, slot_bytes=base.slot_bytes, peer_timeout=base.peer_timeout_s,
                        heartbeat_interval=base.heartbeat_interval_s, limits=base.limits, prefix=base.shm_prefix)
    transport = TorchP2P(world.data_group, world.backend)
    rank = Rank(args, world, bus, transport, source, deadline)
    try:
        block = base.block_size
        whole = -(-args.tokens // block)
        resume_blocks = -(-args.resume_alloc_tokens // block)
        lengths = mix_lengths(args)
        mix_blocks = args.window * base.default_alloc_blocks
        results = [
            transfer_case(rank, "one_round", base.replace(
                default_alloc_tokens=whole * block, language_pool_blocks=whole,
            ), [args.tokens], 1, args.reps),
            transfer_case(rank, "resume_3", base.replace(
                default_alloc_tokens=args.resume_alloc_tokens, language_pool_blocks=resume_blocks,
            ), [args.tokens], 1, args.reps),
            transfer_case(rank, "exact_size", base.replace(
                default_alloc_tokens=args.resume_alloc_tokens, language_pool_blocks=whole,
            ), [args.tokens], 1, args.reps, exact=True),
            transfer_case(rank, "mix", base.replace(
                language_pool_blocks=max(mix_blocks, base.default_alloc_blocks),
            ), lengths, args.window, args.mix_reps),
        ]
        one_round_bytes = results[0].bytes
        results.append(raw_send_case(rank, one_round_bytes, args.reps))
        encoder_allocations = [n for r in results[:4] for n in r.net_device_allocations]
        gathered = rank.exchange([float(n) for n in encoder_allocations])
        if rank.role == LANGUAGE:
            write_results(args, world, base, results, gathered[ENCODER], time.monotonic() - run_started)
        rank.barrier()
        return 0
    finally:
        transport.close()
        bus.close()
        world.close()


def write_results(args, world, config, results: list[CaseResult], encoder_allocations: list[float],
                  wall_s: float) -> None:
    by_name = {r.name: r for r in results}
    resume_ratio = by_name["resume_3"].seconds / by_name["one_round"].seconds
    exact_ratio = by_name["exact_size"].seconds / by_name["one_round"].seconds
    raw_ratio = by_name["one_round"].gbps / by_name["raw_send"].gbps
    cuda = world.device.type == "cuda"
    if cuda:
        language_allocations = [n for r in results[:4] for n in r.net_device_allocations]
        per_rep = [int(a) + int(b) for a, b in zip(encoder_allocations, language_allocations, strict=True)]
        allocations = max(per_rep)
        allocation_note = ("caching-allocator allocations across one timed repetition, both ranks, minus "
                           "the output tensors take() returns; worst repetition of one_round, resume_3, exact_size, mix")
        device = torch.cuda.get_device_name(world.device)
    else:
        allocations = None
        allocation_note = ("CPU run: torch exposes no allocation counter for CPU tensors, so steady-state "
                           "device allocations are not counted here; run with --device cuda to count them")
        device = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    cases = []
    for r in results:
        row = {"name": r.name, "seconds": r.seconds, "gbps": r.gbps, "bytes": r.bytes,
               "requests": r.requests, "tokens": r.tokens, "seconds_all": r.seconds_all}
        if r.name != "raw_send":
            row["resumes"] = r.resumes
            row["config"] = r.config
        if r.name == "mix":
            row["p50_s"], row["p99_s"] = r.p50_s, r.p99_s
            row["lengths"] = mix_lengths(args)
        if cuda and r.net_device_allocations is not None:
            row["net_device_allocations_language"] = r.net_device_allocations
        cases.append(row)
    out = {
        "benchmark": "e2e",
        "device": device,
        "device_kind": world.device.type,
        "backend": world.backend,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "config": asdict(config),
        "cases": cases,
        "resume_overhead_ratio": resume_ratio,
        "exact_size_ratio": exact_ratio,
        "vs_raw_send_ratio": raw_ratio,
        "device_allocations_steady_state": allocations,
        "device_allocations_note": allocation_note,
        "targets": {
            "resume_overhead_ratio": {"target": "<= 1.25", "met": resume_ratio <= 1.25},
            "vs_raw_send_ratio": {"target": ">= 0.5", "met": raw_ratio >= 0.5},
            "device_allocations_steady_state": {"target": "== 0",
                                                "met": None if allocations is None else allocations == 0},
        },
        "wall_s": wall_s,
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    path = Path(args.json.replace("{device}", world.device.type))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, path.with_suffix(".png"))
    print_summary(out, path)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in out["cases"] if c["name"] != "raw_send"]
    raw = next(c for c in out["cases"] if c["name"] == "raw_send")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar([c["name"] for c in cases], [c["gbps"] for c in cases],
                  color=["#4878a8", "#e49444", "#8c6bb1", "#6a9f58"][: len(cases)])
    for bar, c in zip(bars, cases, strict=True):
        label = f"{c['gbps']:.2f} GB/s\n{c['seconds'] * 1e3:.0f} ms"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.axhline(raw["gbps"], color="#b03030", linestyle="--", linewidth=1.2)
    ax.annotate(f"raw send of one tensor: {raw['gbps']:.2f} GB/s", (0.01, raw["gbps"]),
                xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="#b03030")
    ax.set_ylim(0, max(raw["gbps"], *(c["gbps"] for c in cases)) * 1.25)
    ax.set_ylabel("payload GB/s (median)")
    s = out["settings"]
    ax.set_title(f"embxfer e2e, {out['backend']} on {out['device_kind']}: N={s['tokens']}, D={s['dim']} {s['dtype']}\n"
                 f"resume_3 / one_round = {out['resume_overhead_ratio']:.2f}x, "
                 f"exact_size / one_round = {out['exact_size_ratio']:.2f}x, "
                 f"one_round / raw_send = {out['vs_raw_send_ratio']:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(out: dict, path: Path) -> None:
    print(f"embxfer e2e on {out['device']} ({out['backend']}, torch {out['torch']})")
    for c in out["cases"]:
        extra = f", resumes {c['resumes']}" if c.get("resumes") is not None else ""
        if c["name"] == "mix":
            extra += f", latency p50 {c['p50_s'] * 1e3:.1f} ms p99 {c['p99_s'] * 1e3:.1f} ms"
        print(f"  {c['name']:<10} {c['bytes'] / 1e6:9.1f} MB  {c['seconds'] * 1e3:8.1f} ms  "
              f"{c['gbps']:6.2f} GB/s{extra}")
    print(f"  resume overhead {out['resume_overhead_ratio']:.2f}x (target <= 1.25), "
          f"exact size {out['exact_size_ratio']:.2f}x of one_round, "
          f"vs raw send {out['vs_raw_send_ratio']:.2f} (target >= 0.5), "
          f"steady-state device allocations {out['device_allocations_steady_state']}")
    print(f"  wrote {path} and {path.with_suffix('.png')} ({out['wall_s']:.1f}s)")


# -- launching ----------------------------------------------------------------------------------
def spawn(argv: list[str], timeout: float) -> int:
    """Run this file as ranks 0 and 1 of a local world; no child outlives the deadline."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    base.setdefault("OMP_NUM_THREADS", "1")
    children = []
    try:
        for rank in range(2):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            children.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], env=env))
        end = time.monotonic() + timeout
        while any(c.poll() is None for c in children):
            if any(c.poll() not in (None, 0) for c in children) or time.monotonic() > end:
                grace = time.monotonic() + 10.0
                while time.monotonic() < grace and any(c.poll() is None for c in children):
                    time.sleep(0.05)
                break
            time.sleep(0.05)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    codes = [c.returncode for c in children]
    return max(code if code >= 0 else 128 - code for code in codes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if "RANK" not in os.environ:
        return spawn(argv, args.timeout + 30)
    # SIGTERM from the launcher unwinds through `finally`, so the rings are unlinked.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.profile:
            import cProfile

            Path(args.profile).mkdir(parents=True, exist_ok=True)
            profiler = cProfile.Profile()
            try:
                return profiler.runcall(run_rank, args)
            finally:
                profiler.dump_stats(f"{args.profile}/e2e-rank{os.environ['RANK']}.prof")
        return run_rank(args)
    except Exception as exc:
        print(f"bench/e2e.py: rank {os.environ.get('RANK')}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
