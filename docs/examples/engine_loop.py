"""The event loops of an encoder engine and a language engine around embxfer, in one process.

`LocalCluster` builds the endpoints that `embxfer.connect()` gives real engines (real
`Sender` and `Receiver`, pools, allocators, staging channels, encoded records); only the
control bus and the point-to-point transport are in-process stand-ins. Every call made on
`tx` and `rx` below is a call an engine makes; docs/integration.md explains them, and
docs/examples/two_engines.py runs the same loops in separately launched processes.

Layout: one encoder engine (TP 1) feeding a language engine of TP 2.

    python docs/examples/engine_loop.py
"""

from __future__ import annotations

import sys
from collections import deque

import torch

import embxfer
from embxfer.runtime.local import random_payload

DIM = 256
FAILED, SUCCESS = embxfer.RequestState.FAILED, embxfer.RequestState.SUCCESS


def encoder_step(tx: embxfer.Sender, incoming: deque[int], vision_model, in_flight: dict) -> bool:
    """One iteration of the encoder engine's loop. Returns True if anything happened."""
    worked = tx.progress()
    for request_id in tx.finished():
        if tx.state(request_id) is FAILED:
            print(f"request {request_id}: encoder side FAILED ({tx.error(request_id)})")
        tx.release(request_id)  # forget it: the id may be submitted again
        in_flight.pop(request_id, None)
    while incoming:
        request_id = incoming.popleft()
        worked = True
        if tx.lookup(request_id):  # the language side had this image cached: skip the vision model
            continue
        payload = vision_model(request_id)
        try:
            tx.submit(request_id, payload)
        except ValueError as exc:  # bad input names the field; nothing was queued
            print(f"request {request_id}: rejected by submit: {exc}")
            continue
        in_flight[request_id] = payload  # embxfer sends straight from it: keep it unchanged until finished
    return worked


def language_step(rx: embxfer.Receiver, admissions: list[tuple[int, str | None]], taken: dict) -> bool:
    """One iteration of one language TP rank's loop. Every TP rank admits the same requests
    (the engine's scheduler already agrees across TP) and takes its own full copy."""
    worked = bool(admissions)
    for request_id, image_hash in admissions:
        rx.admit(request_id, encoder_engine=0, content_hash=image_hash)
    admissions.clear()
    worked |= rx.progress()
    for request_id in rx.finished():
        if rx.state(request_id) is SUCCESS:
            taken[request_id] = rx.take(request_id)  # contiguous tensors, ready for prefill
        else:
            if rx.is_leader:
                print(f"request {request_id}: FAILED ({rx.error(request_id)})")
            rx.release(request_id)  # forget it: the id may be admitted again
    return worked


def main() -> int:
    # Defaults, then EMBXFER_* environment variables, then these explicit values.
    config = embxfer.Config.from_env(default_alloc_tokens=1024, language_pool_blocks=24, staging_bytes=1 << 20,
                                     cache_bytes=64 << 20)
    cluster = embxfer.LocalCluster(embxfer.Topology(encoders=1, encoder_tp=1, language_tp=2), config, dim=DIM)
    tx = cluster.senders[0]
    receivers = list(cluster.receivers.values())
    leader = cluster.leader

    payloads = {
        1: random_payload(700, DIM, seed=1),  # fits the default allocation: one round
        2: random_payload(5000, DIM, seed=2),  # larger than the default allocation: resume rounds
        3: random_payload(4000, DIM, seed=3),  # the client goes away mid-transfer: aborted
        4: random_payload(64, DIM // 2, seed=4),  # D does not match the endpoint: submit says so
    }
    payloads[5] = payloads[1]  # request 5 shows the image of request 1 again
    images = {1: "image-A", 5: "image-A"}  # the engine's content hash of each request's images

    def vision_model(request_id: int) -> embxfer.Payload:
        return payloads[request_id]

    incoming = deque([1, 2, 3, 4])  # what the encoder engine is asked to encode
    encoder_in_flight: dict[int, embxfer.Payload] = {}
    admissions = {r.rank: [(rid, images.get(rid)) for rid in (1, 2, 3)] for r in receivers}
    taken = {r.rank: {} for r in receivers}
    messages_before_5 = None
    forwarded: set[int] = set()

    for iteration in range(10_000):
        worked = encoder_step(tx, incoming, vision_model, encoder_in_flight)
        for rx in receivers:
            worked |= language_step(rx, admissions[rx.rank], taken[rx.rank])
        if iteration == 3:
            leader.abort(3, "client disconnected")  # any rank may abort; the leader tells everyone
        if messages_before_5 is None and all(1 in taken[r.rank] and 2 in taken[r.rank] for r in receivers):
            messages_before_5 = tx.snapshot_stats()["messages"]
            for rx in receivers:
                admissions[rx.rank].append((5, images[5]))
        elif messages_before_5 is not None and 5 not in forwarded:
            forwarded.add(5)
            incoming.append(5)  # the language engine has admitted it: now the encoder engine hears of it
        if 5 in forwarded and not incoming and not encoder_in_flight and all(5 in taken[r.rank] for r in receivers):
            break
        if not worked:
            tx.wait(0.001)  # an idle engine parks instead of spinning
    else:
        print("not finished after 10000 iterations", file=sys.stderr)
        return 1

    ok = True
    for request_id in (1, 2):
        copies = [taken[r.rank].get(request_id) for r in receivers]
        exact = all(copy is not None and copy.bit_equal(payloads[request_id]) for copy in copies)
        ok &= exact
        print(f"request {request_id}: SUCCESS, embeddings {tuple(copies[0].embeddings.shape)} "
              f"{payloads[request_id].dtype}, bit-exact on {len(receivers)} language ranks: {exact}")
    ok &= leader.state(3) is FAILED
    from_cache = tx.lookup(5) and tx.snapshot_stats()["messages"] == messages_before_5
    exact = all(taken[r.rank][5].bit_equal(payloads[5]) for r in receivers)
    ok &= from_cache and exact
    print(f"request 5: SUCCESS from the cache, no transfer: {from_cache}, bit-exact on {len(receivers)} "
          f"language ranks: {exact}")

    stats = leader.snapshot_stats()
    print(f"language leader: {stats['succeeded']} succeeded ({stats['cached']} from the cache), "
          f"{stats['failed']} failed, {stats['resumes']} resumes, {stats['tokens']} tokens")
    cluster.settle()
    in_use = cluster.blocks_in_use()
    print(f"blocks in use: {in_use}")
    ok &= not any(in_use.values())
    cluster.close()
    print("engine loop example: ok" if ok else "engine loop example: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
