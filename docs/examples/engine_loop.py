"""The event loops of an encoder engine and a language engine around embxfer, in one process.

`LocalCluster` builds the endpoints a torchrun world would have (real `Sender` and
`Receiver`, pools, allocators, staging channels, encoded records); only the control bus
and the point-to-point transport are in-process stand-ins. Every call made on `sender`
and `receiver` below is a call an engine makes; docs/integration.md explains them.

Layout: one encoder engine (TP 1) feeding a language engine of TP 2.

    python docs/examples/engine_loop.py
"""

from __future__ import annotations

import sys

import torch

from embxfer.runtime import Config, Payload
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.receiver import Receiver
from embxfer.runtime.sender import Sender
from embxfer.runtime.state import RequestState
from embxfer.runtime.topology import Topology

DIM = 256
ENCODER_ENGINE = 0


def encoder_step(sender: Sender, produced: dict[int, Payload], in_flight: set[int]) -> bool:
    """One iteration of the encoder engine's loop: hand over new payloads, make progress,
    forget finished requests. Returns True if anything happened."""
    worked = False
    for request_id in list(produced):
        try:
            sender.submit(request_id, produced.pop(request_id))
            in_flight.add(request_id)
        except ValueError as exc:  # bad input names the field; nothing was queued
            print(f"request {request_id}: rejected by submit: {exc}")
        worked = True
    worked |= sender.progress()
    for request_id in list(in_flight):
        state = sender.poll(request_id)
        if state.terminal:
            if state is RequestState.FAILED:
                print(f"request {request_id}: encoder side FAILED ({sender.error(request_id)})")
            sender.release(request_id)
            in_flight.discard(request_id)
    return worked


def language_step(receiver: Receiver, scheduled: list[int], in_flight: set[int],
                  taken: dict[int, Payload]) -> bool:
    """One iteration of one language TP rank's loop. Every TP rank admits the same requests
    (the engine's scheduler already agrees across TP) and takes its own full copy."""
    worked = False
    for request_id in scheduled:
        receiver.admit(request_id, encoder_engine=ENCODER_ENGINE)
        in_flight.add(request_id)
        worked = True
    scheduled.clear()
    worked |= receiver.progress()
    for request_id in list(in_flight):
        state = receiver.poll(request_id)  # cheap and idempotent: call it every iteration
        if state is RequestState.SUCCESS:
            taken[request_id] = receiver.take(request_id)  # contiguous tensors, ready for prefill
            in_flight.discard(request_id)
        elif state is RequestState.FAILED:
            if receiver.is_leader:
                print(f"request {request_id}: FAILED ({receiver.error(request_id)})")
            receiver.release(request_id)  # forget it: the id may be admitted again
            in_flight.discard(request_id)
    return worked


def main() -> int:
    # Defaults, then EMBXFER_* environment variables, then these explicit values.
    config = Config.from_env(default_alloc_tokens=1024, language_pool_blocks=24,
                             staging_bytes=1 << 20)
    cluster = LocalCluster(Topology(encoders=1, encoder_tp=1, language_tp=2), config, dim=DIM)
    sender = cluster.senders[0]
    receivers = list(cluster.receivers.values())
    leader = cluster.leader

    payloads = {
        1: random_payload(700, DIM, seed=1),  # fits the default allocation: one round
        2: random_payload(5000, DIM, seed=2),  # larger than the default allocation: resume rounds
        3: random_payload(4000, DIM, seed=3),  # the client goes away mid-transfer: aborted
    }
    wrong_dim = random_payload(64, DIM // 2, seed=4)  # D does not match the pools: submit says so

    produced = {**payloads, 4: wrong_dim}
    encoder_in_flight: set[int] = set()
    schedules = {r.rank: [1, 2, 3] for r in receivers}
    language_in_flight = {r.rank: set() for r in receivers}
    taken = {r.rank: {} for r in receivers}

    for iteration in range(10_000):
        worked = encoder_step(sender, produced, encoder_in_flight)
        for receiver in receivers:
            worked |= language_step(receiver, schedules[receiver.rank], language_in_flight[receiver.rank],
                                    taken[receiver.rank])
        if iteration == 3:
            leader.abort(3, "client disconnected")  # any rank may abort; the leader tells everyone
        if not (encoder_in_flight or any(language_in_flight.values())):
            break
        if not worked:
            sender.wait(0.001)  # an idle engine parks instead of spinning
    else:
        print("not finished after 10000 iterations", file=sys.stderr)
        return 1

    ok = True
    for request_id in (1, 2):
        copies = [taken[r.rank].get(request_id) for r in receivers]
        exact = all(copy is not None and copy.bit_equal(payloads[request_id]) for copy in copies)
        ok &= exact
        shape = tuple(copies[0].embeddings.shape) if copies[0] is not None else None
        print(f"request {request_id}: SUCCESS, embeddings {shape} {payloads[request_id].dtype}, "
              f"bit-exact on {len(receivers)} language ranks: {exact}")
    ok &= leader.poll(3) is RequestState.FAILED

    stats = leader.snapshot_stats()
    print(f"language leader: {stats['succeeded']} succeeded, {stats['failed']} failed, "
          f"{stats['resumes']} resumes, {stats['tokens']} tokens")
    in_use = cluster.blocks_in_use()
    print(f"blocks in use: {in_use}")
    ok &= not any(in_use.values())
    cluster.close()
    print("engine loop example: ok" if ok else "engine loop example: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
