"""Two separately launched engines joined by embxfer: an encoder engine and a language engine.

Each engine is its own program with its own `torch.distributed` world (its TP group), as
SGLang's and vLLM's encoder and language servers are. embxfer joins them afterwards at the
job's rendezvous (`embxfer rendezvous`, a process of its own that no engine hosts), with
data pairs of its own: the engine's default group is never touched, and this script runs
an all_reduce on it before, during (every loop iteration: the TP ranks step together) and
after the transfers.

Payloads are made from (seed, request id) alone, so the language side can check every one
bit for bit without being sent the original. Exit status 0 when every request arrived
bit-exact (language) or finished (encoder), 1 otherwise, 2 on bad arguments.

The rendezvous first, then separate `python` processes, one per TP rank (language TP 2,
encoder TP 1, on CPU); every process of the job has the same EMBXFER_SECRET:

    export EMBXFER_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')
    embxfer rendezvous --port 29600 &
    python docs/examples/two_engines.py language --rendezvous tcp://127.0.0.1:29600 \\
        --tp-rank 0 --tp-size 2 --engine-address tcp://127.0.0.1:29501 &
    python docs/examples/two_engines.py language --rendezvous tcp://127.0.0.1:29600 \\
        --tp-rank 1 --tp-size 2 --engine-address tcp://127.0.0.1:29501 &
    python docs/examples/two_engines.py encoder --rendezvous tcp://127.0.0.1:29600 \\
        --tp-rank 0 --tp-size 1 --engine-address tcp://127.0.0.1:29502

or one `torchrun` per engine (the TP rank and size come from torchrun):

    torchrun --nproc-per-node 2 --master-port 29501 docs/examples/two_engines.py language \\
        --rendezvous tcp://127.0.0.1:29600 &
    torchrun --nproc-per-node 1 --master-port 29502 docs/examples/two_engines.py encoder \\
        --rendezvous tcp://127.0.0.1:29600

`--rendezvous` may be left out when EMBXFER_RENDEZVOUS is set. Settings come from
`EMBXFER_*` (both engines must agree on block size and staging size; embxfer checks);
the defaults below make the language pool small so that long requests resume.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

import embxfer
from embxfer.runtime.local import random_payload

# Small pools and staging chunks so that a CPU run shows resumes; EMBXFER_* variables win.
EXAMPLE_SETTINGS = {"default_alloc_tokens": 1024, "language_pool_blocks": 64, "staging_bytes": 1 << 20}
DTYPE = torch.bfloat16


def request_tokens(seed: int, request_id: int) -> int:
    """N of a request: 1..3000 tokens, so some need resume rounds after a 1024-token allocation."""
    return 1 + (request_id * 7919 + seed * 104_729) % 3000


def make_payload(seed: int, request_id: int, dim: int, device: torch.device) -> embxfer.Payload:
    """What the vision model would produce for `request_id`: the same on every process."""
    return random_payload(request_tokens(seed, request_id), dim, dtype=DTYPE, seed=seed * 1_000_003 + request_id,
                          device=device)


class EngineGroup:
    """The engine's own world (its TP group), as the engine made it before embxfer existed."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:  # torchrun made the world
            dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
        else:
            dist.init_process_group(backend, init_method=args.engine_address, rank=args.tp_rank,
                                    world_size=args.tp_size, timeout=timedelta(seconds=args.timeout))
        self.device = device
        self.collectives = 0
        self.check("before the transfers")

    def check(self, when: str) -> None:
        """A collective on the engine's world, as a model's TP all_reduce would be."""
        ones = torch.ones(1, device=self.device)
        dist.all_reduce(ones)
        self.collectives += 1
        if int(ones.item()) != dist.get_world_size():
            raise RuntimeError(f"the engine's all_reduce {when} gave {ones.item()}, expected {dist.get_world_size()}")

    def step(self, room: int, done: bool) -> tuple[int, bool]:
        """One scheduler step of the TP group: every rank admits as many requests as the
        fullest rank has room for, and the engine stops once every rank is done."""
        agreed = torch.tensor([room, int(done)], device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        self.collectives += 1
        return int(agreed[0]), bool(agreed[1])

    def close(self) -> None:
        self.check("after the transfers")
        dist.destroy_process_group()


def run_encoder(tx: embxfer.Sender, engine: EngineGroup, args: argparse.Namespace) -> int:
    # Request rid is encoder engine (rid % engines)'s; the language side said how many there are.
    todo = deque(rid for rid in range(args.requests) if rid % args.encoders == args.engine)
    in_flight: dict[int, embxfer.Payload] = {}  # kept unchanged until finished: embxfer packs from it
    failed = 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        room, done = engine.step(args.inflight - len(in_flight), not todo and not in_flight)
        if done:
            break
        for _ in range(min(room, len(todo))):
            rid = todo.popleft()
            if rid % 2:
                # Preprocessing knows N before the vision model runs. If the language side
                # has not allocated for rid yet, its first allocation is exact (no resume);
                # if it has, the announcement is ignored.
                tx.announce(rid, request_tokens(args.seed, rid))
            in_flight[rid] = make_payload(args.seed, rid, args.dim, engine.device)
            tx.submit(rid, in_flight[rid])
        worked = tx.progress()
        for rid in tx.finished():
            if tx.state(rid) is embxfer.RequestState.FAILED:
                failed += 1
                print(f"encoder: request {rid} FAILED: {tx.error(rid)}", file=sys.stderr)
            tx.release(rid)
            in_flight.pop(rid, None)
        if not worked:
            tx.wait(0.001 if tx.busy else 0.01)
    else:
        print(f"encoder: not done within --timeout={args.timeout:g}s", file=sys.stderr)
        return 1
    stats = tx.snapshot_stats()
    print(f"encoder engine {args.engine} TP rank {args.tp_rank}: {stats['succeeded']} requests sent, "
          f"{stats['failed']} failed, {stats['rounds']} rounds, {stats['messages']} staging messages", flush=True)
    return 1 if failed else 0


def run_language(rx: embxfer.Receiver, engine: EngineGroup, args: argparse.Namespace) -> int:
    todo = deque(range(args.requests))
    in_flight: set[int] = set()
    verified, bad = 0, []
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        room, done = engine.step(args.inflight - len(in_flight), not todo and not in_flight)
        if done:
            break
        for _ in range(min(room, len(todo))):
            rid = todo.popleft()
            # Where the engine's processor has expanded the image placeholders already, N is
            # known at admission (here: every third id): the first allocation is exact.
            expected = request_tokens(args.seed, rid) if rid % 3 == 0 else None
            rx.admit(rid, encoder_engine=rid % args.encoders, expected_tokens=expected)
            in_flight.add(rid)
        worked = rx.progress()
        for rid in rx.finished():
            in_flight.discard(rid)
            if rx.state(rid) is embxfer.RequestState.SUCCESS:
                payload = rx.take(rid)  # contiguous tensors, the engine's from now on
                wrong = make_payload(args.seed, rid, args.dim, payload.device).mismatches(payload)
                if wrong:
                    bad.append(f"request {rid}: {', '.join(wrong)} differ")
                else:
                    verified += 1
            else:
                bad.append(f"request {rid}: {rx.error(rid)}")
                rx.release(rid)
        if not worked:
            rx.wait(0.001 if rx.busy else 0.01)
    else:
        bad.append(f"not done within --timeout={args.timeout:g}s ({len(in_flight) + len(todo)} requests left)")
    stats = rx.snapshot_stats()
    print(f"language TP rank {args.tp_rank}: {verified}/{args.requests} requests bit-exact, "
          f"{stats['resumes']} resumes, {stats['tokens']} tokens, blocks in use {stats['blocks_in_use']}", flush=True)
    for line in bad[:10]:
        print(f"language TP rank {args.tp_rank}: {line}", file=sys.stderr)
    return 0 if verified == args.requests and not bad else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["encoder", "language"])
    parser.add_argument("--rendezvous", default=os.environ.get("EMBXFER_RENDEZVOUS"),
                        help="tcp://host:port of `embxfer rendezvous` (default: EMBXFER_RENDEZVOUS)")
    parser.add_argument("--engine", type=int, default=0, help="encoder engine index (encoder side)")
    parser.add_argument("--encoders", type=int, default=1, help="encoder engines of the job (the router "
                                                               "sends request rid to engine rid %% encoders)")
    parser.add_argument("--tp-rank", type=int, help="this process's TP rank (default: torchrun's RANK)")
    parser.add_argument("--tp-size", type=int, help="the engine's TP size (default: torchrun's WORLD_SIZE)")
    parser.add_argument("--engine-address", help="init_method of the engine's own world, tcp://host:port "
                                                 "(not needed under torchrun)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=8, help="requests in flight per engine")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda (torchrun's LOCAL_RANK) or cuda:N")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for joining, and for the transfers")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        args.tp_rank = int(os.environ["RANK"]) if args.tp_rank is None else args.tp_rank
        args.tp_size = int(os.environ["WORLD_SIZE"]) if args.tp_size is None else args.tp_size
    elif args.tp_rank is None or args.tp_size is None or not args.engine_address:
        parser.error("--tp-rank, --tp-size and --engine-address are needed outside torchrun")
    if not args.rendezvous:
        parser.error("--rendezvous tcp://host:port (or EMBXFER_RENDEZVOUS) is needed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # the engine picks its GPU; embxfer uses the current one
    who = f"encoder engine {args.engine} TP rank {args.tp_rank}" if args.role == "encoder" else \
        f"language TP rank {args.tp_rank}"
    engine = EngineGroup(args, device)
    config = embxfer.Config.from_env(**{k: v for k, v in EXAMPLE_SETTINGS.items()
                                        if k not in embxfer.Config.env_values()})
    try:
        endpoint = embxfer.connect(args.role, engine=args.engine, tp_rank=args.tp_rank, tp_size=args.tp_size,
                                   dim=args.dim, dtype=DTYPE, device=device, rendezvous_address=args.rendezvous,
                                   wait_for=(["language0"] if args.role == "encoder" else
                                             [f"encoder{e}" for e in range(args.encoders)]),
                                   config=config, timeout_s=args.timeout)
    except (TimeoutError, ValueError, ConnectionError, RuntimeError) as exc:
        print(f"two_engines: {who}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    with endpoint:
        run = run_encoder if args.role == "encoder" else run_language
        status = run(endpoint, engine, args)
        # Leave together: a rank that closes while a peer still finishes a request (a TP
        # follower applying the leader's last decision) would fail that request there.
        if status == 0:
            endpoint.barrier(timeout_s=args.timeout)
    engine.close()
    print(f"{who}: closed; the engine's own group ran {engine.collectives} collectives", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
