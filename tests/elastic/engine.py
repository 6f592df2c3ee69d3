"""One rank of an engine in an elastic job, driven by a router that lives in the test.

    python -m tests.elastic.engine ROLE NAME TP_RANK TP_SIZE [--node NODE] [--dim D]

The router (the harness, `harness.Router`) writes each request's route at the
rendezvous, under the job's app namespace: `route/count`, and `route/<n>` =
"rid encoder language tokens". Every engine rank reads the routes as they come and acts
on those that name its engine: an encoder rank submits the payload (made from (seed,
rid), the same on every rank) for the named language engine; a language rank admits it
from the named encoder engine, and verifies what arrives bit-exact against the same
payload. A rank takes the routes written after it connected: a restarted engine does not
take its earlier incarnation's again. `drain/<name>` asks the engine to
`close(drain=True)` and exit (`Job.start` clears it for the next start of that name).

Every outcome is one JSON line on stdout: {"event": "done", "rid", "status", "error",
"at"} (status "verified", "mismatch", "failed", "sent"), plus {"event": "up", "at"} once
connected and {"event": "left"} after a drain.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

import torch


def payload_of(rid: int, tokens: int, dim: int):
    from embxfer.runtime.local import random_payload

    return random_payload(tokens, dim, seed=rid)


def emit(**fields) -> None:
    print(json.dumps({**fields, "at": time.time()}), flush=True)


def report(endpoint, args, payloads: dict[int, int], active: set[int]) -> None:
    """One 'done' line per request that finished since the last call."""
    for rid in endpoint.finished():
        state = endpoint.state(rid)
        active.discard(rid)
        if args.role == "language":
            if state.value == "SUCCESS":
                got = endpoint.take(rid)
                diffs = payload_of(rid, payloads[rid], args.dim).mismatches(got)
                emit(event="done", rid=rid, status="mismatch" if diffs else "verified", error=",".join(diffs))
            else:
                emit(event="done", rid=rid, status="failed", error=endpoint.error(rid))
                endpoint.release(rid)
        else:
            emit(event="done", rid=rid, status="sent" if state.value == "SUCCESS" else "failed",
                 error=endpoint.error(rid))
            endpoint.release(rid)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("name")
    parser.add_argument("tp_rank", type=int)
    parser.add_argument("tp_size", type=int)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--idle", action="store_true",
                        help="join, then only keep the endpoint's loop going as an idle engine would "
                             "(progress, then wait(0.5)): what membership costs at rest")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import embxfer
    from embxfer.runtime.config import Config

    config = Config.from_env(language_pool_blocks=64, default_alloc_tokens=512, staging_bytes=1 << 20,
                             peer_timeout_s=float(os.environ.get("ELASTIC_PEER_TIMEOUT_S", "3")),
                             heartbeat_interval_s=float(os.environ.get("ELASTIC_HEARTBEAT_S", "0.2")),
                             request_timeout_s=30.0)
    endpoint = embxfer.connect(args.role, engine=args.name, tp_rank=args.tp_rank, tp_size=args.tp_size,
                               dim=args.dim, dtype=torch.bfloat16, config=config, timeout_s=args.timeout)
    store = endpoint.membership.app_store
    router = os.environ.get("ELASTIC_ROUTER")  # host:port of a router store of its own
    if router:
        from datetime import timedelta

        host, port = router.rsplit(":", 1)
        store = torch.distributed.PrefixStore("app/", torch.distributed.TCPStore(
            host, int(port), None, False, timedelta(seconds=30), wait_for_workers=False))
    # Routes written before this start were for an earlier incarnation of the engine (the
    # router routes to engines that are up): a restarted engine does not take them again.
    seen = int(store.add("route/count", 0))
    emit(event="up", member=endpoint.rank, fds=len(os.listdir("/proc/self/fd")))
    if args.idle:
        try:
            while True:
                endpoint.progress()
                endpoint.wait(0.5)
        finally:
            endpoint.close()
    payloads: dict[int, tuple[int, int]] = {}  # rid -> tokens, encoder
    active: set[int] = set()
    next_look = 0.0
    try:
        while True:
            now = time.monotonic()
            if now >= next_look:
                next_look = now + 0.01
                # The drain key is looked at before the routes: a route written before it
                # is then always admitted before the drain starts.
                drain = store.check([f"drain/{args.name}"])
                count = int(store.add("route/count", 0))
                while seen < count:
                    seen += 1
                    if not store.check([f"route/{seen}"]):
                        seen -= 1
                        break
                    rid, encoder, language, tokens = store.get(f"route/{seen}").decode().split()
                    rid, tokens = int(rid), int(tokens)
                    if args.role == "encoder" and encoder == args.name:
                        endpoint.submit(rid, payload_of(rid, tokens, args.dim), language_engine=language)
                        active.add(rid)
                    elif args.role == "language" and language == args.name:
                        endpoint.admit(rid, encoder_engine=encoder)
                        payloads[rid] = tokens
                        active.add(rid)
                if drain:
                    # drain() finishes what is in flight; the payloads are taken before close().
                    endpoint.drain(timeout_s=30.0)
                    report(endpoint, args, payloads, active)
                    blocks = endpoint._blocks_in_use()
                    endpoint.close()
                    emit(event="left", blocks=blocks, fds=len(os.listdir("/proc/self/fd")))
                    return 0
            worked = endpoint.progress()
            report(endpoint, args, payloads, active)
            if not worked:
                endpoint.wait(0.005)
    finally:
        blocks = endpoint._blocks_in_use()
        endpoint.close()
        emit(event="closed", blocks=blocks, fds=len(os.listdir("/proc/self/fd")))


if __name__ == "__main__":
    raise SystemExit(main())
