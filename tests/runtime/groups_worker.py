"""One process of an engine, for tests/runtime/test_groups.py.

    engine   an engine's TP rank: its own default group (optional), then embxfer's groups
             by rendezvous, a tensor each way with every rank of the other role
    torchrun a rank of one torchrun world (or of a world started by hand with
             MASTER_ADDR/MASTER_PORT): embxfer's groups from a layout, the same exchange
    sigint   joins, leaves P2P in flight and idles like an engine loop until Ctrl-C

Prints one `RESULT {json}` line on success, or `ERROR <type>: <message>` and exits 3
(ValueError), 4 (TimeoutError) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from embxfer.runtime.groups import Membership, rendezvous

ELEMENTS = 1000


def pattern(source: int, destination: int, device: torch.device) -> torch.Tensor:
    return torch.arange(ELEMENTS, dtype=torch.float32, device=device) + 1000.0 * source + destination


def exchange(membership: Membership) -> int:
    """Send a tensor to, and receive one from, every rank of the other role."""
    others = [r for r, m in enumerate(membership.members) if m.role != membership.role]
    device = membership.groups.device
    inboxes = {peer: torch.full((ELEMENTS,), float("nan"), device=device) for peer in others}
    works = []
    for peer in others:
        receive = (membership.groups.irecv, inboxes[peer])
        send = (membership.groups.isend, pattern(membership.rank, peer, device))
        # NCCL runs a pair's operations in order on one stream: the lower rank sends first.
        for post, tensor in (send, receive) if membership.rank < peer else (receive, send):
            works.append(post(tensor, peer))
    for work in works:
        work.wait()
    for peer, inbox in inboxes.items():
        if not torch.equal(inbox, pattern(peer, membership.rank, device)):
            raise AssertionError(f"rank {membership.rank}: wrong data from rank {peer}: {inbox[:4].tolist()}")
    return len(others)


def own_all_reduce(expected_world: int) -> None:
    value = torch.ones(1)
    dist.all_reduce(value)
    if value.item() != expected_world:
        raise AssertionError(f"engine all_reduce gave {value.item()}, expected {expected_world}")


def report(membership: Membership, exchanged: int, **extra: object) -> None:
    gathered = membership.groups.all_gather_bytes(membership.members[membership.rank].node_id.encode())
    membership.groups.barrier()
    print("RESULT " + json.dumps({
        "rank": membership.rank, "world_size": membership.world_size,
        "layout": [membership.topology.encoders, membership.topology.encoder_tp, membership.topology.language_tp],
        "role": membership.role, "engine": membership.engine, "tp_rank": membership.tp_rank,
        "job_id": membership.job_id, "exchanged": exchanged, "nodes": [n.decode() for n in gathered],
        "pids": [m.pid for m in membership.members], **extra,
    }), flush=True)


def engine_main(args: argparse.Namespace) -> None:
    if args.engine_port:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.engine_port}",
                                rank=args.tp_rank, world_size=args.tp_size, timeout=timedelta(seconds=60))
        own_all_reduce(args.tp_size)
    time.sleep(args.delay)
    with rendezvous(args.rendezvous, args.role, args.engine, args.tp_rank, args.tp_size,
                    encoders=args.encoders, timeout_s=args.timeout, device=args.device,
                    op_timeout_s=60.0) as membership:
        exchanged = exchange(membership)
        default = None
        if args.engine_port:
            # The engine's own world is still its own: same size, same rank, still usable.
            default = [dist.get_world_size(), dist.get_rank()]
            own_all_reduce(args.tp_size)
        report(membership, exchanged, default=default)
    if args.engine_port:
        dist.destroy_process_group()


def torchrun_main(args: argparse.Namespace) -> None:
    layout = tuple(int(x) for x in args.layout.split(","))
    world_size = int(os.environ["WORLD_SIZE"])
    if args.default_group == "before":
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    with rendezvous(layout=layout, timeout_s=args.timeout, device=args.device, op_timeout_s=60.0) as membership:
        if args.default_group == "after":
            dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        exchanged = exchange(membership)
        if dist.is_initialized():
            own_all_reduce(world_size)
        report(membership, exchanged, torchrun_rank=int(os.environ["RANK"]),
               default_group=dist.is_initialized(),
               agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE"))
    if dist.is_initialized():
        dist.destroy_process_group()


def sigint_main(args: argparse.Namespace) -> None:
    with rendezvous(args.rendezvous, args.role, 0, 0, 1, timeout_s=args.timeout, device=args.device,
                    op_timeout_s=60.0) as membership:
        peer = 1 - membership.rank
        device = membership.groups.device
        # Nobody sends: both receives stay in flight until Ctrl-C. (A send would meet the
        # peer's receive, and on gloo a size mismatch there aborts the process.)
        works = [membership.groups.irecv(torch.empty(ELEMENTS, device=device), peer)]

        def wait_all() -> None:  # what transport.TorchP2P's waiter threads do on gloo
            for work in works:
                try:
                    work.wait()
                except Exception:
                    pass

        threading.Thread(target=wait_all, daemon=True).start()
        print("READY", flush=True)
        try:
            while True:  # an engine loop
                time.sleep(0.01)
        finally:
            print("CLOSING", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["engine", "torchrun", "sigint"])
    parser.add_argument("--rendezvous")
    parser.add_argument("--role")
    parser.add_argument("--engine", type=int, default=0)
    parser.add_argument("--tp-rank", type=int, default=0)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--encoders", type=int)
    parser.add_argument("--engine-port", type=int)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layout", default="1,1,2")
    parser.add_argument("--default-group", choices=["none", "before", "after"], default="none")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        {"engine": engine_main, "torchrun": torchrun_main, "sigint": sigint_main}[args.mode](args)
    except Exception as exc:
        print(f"ELAPSED {time.monotonic() - started:.3f}", flush=True)
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3 if isinstance(exc, ValueError) else 4 if isinstance(exc, TimeoutError) else 1)


if __name__ == "__main__":
    main()
