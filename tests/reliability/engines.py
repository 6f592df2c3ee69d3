"""A minimal encoder engine and language engine on `embxfer.connect()`, for tests that
must act inside an engine's loop: a long engine step (no call into embxfer for many
seconds), hostile frames sent from inside a real cross-node job.

    python -m tests.reliability.engines --result PATH [--nodes 2] [--stall RANK:AFTER:SECONDS] [--tamper]

runs a local world (1 encoder engine, language TP 2) through `spawn_local_world`, as
`embxfer demo` does; each rank writes its outcome as JSON to PATH.<rank>. Faults are
injected here, by the test's own engine, never by a hook in embxfer.

--stall R:A:S   rank R, once A requests have finished on it, sleeps S seconds between two
                engine-loop iterations (a long prefill, a compile).
--tamper        (with --nodes 2: encoder on node 0, language ranks on node 1) once 5
                requests have finished, the encoder attacks the language leader's
                cross-node link: its own recorded frames from a socket without the
                job's CURVE keys (refused), the same frames again and one readdressed to
                another member from a socket with the keys (replays, a forgery), and an
                ABORT over its own link that claims to come from rank 2 (a peer speaking
                for another). None of it may have an effect; the language ranks report
                the counters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from embxfer.runtime.launch import CHILD_ENV, spawn_local_world
from embxfer.runtime.local import random_payload

LAYOUT = (1, 1, 2)
DIM = 64
LENGTHS = [700, 3000, 64, 5000, 1]


def lengths(count: int) -> list[int]:
    return [LENGTHS[i % len(LENGTHS)] for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", required=True)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--stall", default=None)
    parser.add_argument("--tamper", action="store_true")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if os.environ.get(CHILD_ENV):
        return run_rank(args)
    node_of = [0, 1, 1] if args.nodes == 2 else None
    return spawn_local_world("tests.reliability.engines", sys.argv[1:], 3, deadline_s=args.timeout + 30,
                             node_of=node_of, failure_grace_s=10.0)


def run_rank(args: argparse.Namespace) -> int:
    import embxfer
    from embxfer.runtime.sender import Sender

    endpoint = embxfer.connect(layout=LAYOUT, dim=DIM, dtype=torch.bfloat16, timeout_s=60)
    world_rank = int(os.environ["RANK"])  # this process's place in the layout (its member id is random)
    stall = None
    if args.stall:
        rank, after, seconds = args.stall.split(":")
        if int(rank) == world_rank:
            stall = (int(after), float(seconds))
    try:
        if isinstance(endpoint, Sender):
            result = encoder_loop(args, endpoint, stall)
        else:
            result = language_loop(args, endpoint, stall)
    finally:
        result_path = f"{args.result}.{world_rank}"
        endpoint.close()
    result["dead_peers"] = {str(rank): why for rank, why in endpoint.dead_peers.items()}
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0 if not endpoint.dead_peers and result["ok"] else 1


def encoder_loop(args, sender, stall) -> dict:
    todo = list(range(args.requests))
    active: set[int] = set()
    succeeded = 0
    recorder = Recorder(sender) if args.tamper else None
    deadline = time.monotonic() + args.timeout
    while (todo or active) and time.monotonic() < deadline and not sender.dead_peers:
        while todo and len(active) < 4:
            rid = todo.pop(0)
            sender.submit(rid, random_payload(lengths(args.requests)[rid], DIM, seed=rid))
            active.add(rid)
        worked = sender.progress()
        for rid in list(active):
            if sender.state(rid).terminal:
                succeeded += sender.state(rid).name == "SUCCESS"
                sender.release(rid)
                active.discard(rid)
        if stall is not None and succeeded >= stall[0]:
            time.sleep(stall[1])
            stall = None
        if recorder is not None and succeeded >= 5:
            language = sender.directory.engine("language0")
            recorder.attack(victim=language.leader, spoofed_source=language.members[1],
                            request_id=min(active | set(todo)))
            recorder = None
        if not worked:
            sender.wait(0.01)
    return {"ok": succeeded == args.requests, "succeeded": succeeded}


def language_loop(args, receiver, stall) -> dict:
    todo = list(range(args.requests))
    active: set[int] = set()
    verified = 0
    deadline = time.monotonic() + args.timeout
    while (todo or active) and time.monotonic() < deadline and not receiver.dead_peers:
        while todo and len(active) < 4:
            rid = todo.pop(0)
            receiver.admit(rid)
            active.add(rid)
        worked = receiver.progress()
        for rid in list(active):
            state = receiver.state(rid)
            if state.name == "SUCCESS":
                expected = random_payload(lengths(args.requests)[rid], DIM, seed=rid)
                verified += receiver.take(rid).bit_equal(expected)
                active.discard(rid)
            elif state.terminal:
                print(f"request {rid} failed on {receiver.me.describe()}: {receiver.error(rid)}", file=sys.stderr)
                receiver.release(rid)
                active.discard(rid)
        if stall is not None and verified >= stall[0]:
            time.sleep(stall[1])
            stall = None
        if not worked:
            receiver.wait(0.01)
    result = {"ok": verified == args.requests, "verified": verified, "spoofed": receiver.bus.spoofed}
    link = getattr(receiver.bus, "link", None)
    if link is not None:
        if args.tamper and receiver.is_leader:
            # The attack may still be on its way: wait for it (bounded) while serving.
            until = time.monotonic() + 10.0
            while time.monotonic() < until and not (link.stats.forged >= 1 and link.stats.replayed >= 1
                                                    and link.stats.refused >= 1 and receiver.bus.spoofed >= 1):
                receiver.progress()
                receiver.wait(0.01)
            result["spoofed"] = receiver.bus.spoofed
        stats = link.stats
        result["link"] = {"received": stats.received, "forged": stats.forged, "replayed": stats.replayed,
                          "malformed": stats.malformed, "refused": stats.refused}
    return result


class Recorder:
    """Records the wire messages the encoder's link sends to each remote peer (a wrapper
    around the peer's zmq socket), then replays and tampers with them from a socket of
    its own, the way an attacker on the network could if it got past the link's CURVE
    admission (the socket holds the job's keys: a member gone wrong)."""

    def __init__(self, sender) -> None:
        self.link = sender.bus.link
        self.sender = sender
        self.wire: list[bytes] = []
        for peer in self.link._peers.values():
            peer.socket = _RecordingSocket(peer.socket, self.wire)

    def attack(self, victim: int, spoofed_source: int, request_id: int) -> None:
        import zmq

        from embxfer.control import records as rec
        from embxfer.control.remote import HEADER

        data = [m for m in self.wire if m[5] == 1 and HEADER.unpack_from(m)[5] == victim]
        assert data, "nothing recorded towards the victim"
        context = zmq.Context()
        # An outsider without the job's keys: its handshake fails, nothing gets through.
        outsider = context.socket(zmq.PUSH)
        outsider.setsockopt(zmq.LINGER, 0)
        outsider.connect(self.link.peers[victim])
        for message in data:
            outsider.send(message)
        # A member gone wrong (the job's keys): the recorded frames again, and one of them
        # readdressed to another member.
        intruder = context.socket(zmq.PUSH)
        intruder.setsockopt(zmq.LINGER, 1000)
        public, secret_key = self.link._curve_keys
        intruder.setsockopt(zmq.CURVE_SERVERKEY, public)
        intruder.setsockopt(zmq.CURVE_PUBLICKEY, public)
        intruder.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
        intruder.connect(self.link.peers[victim])
        misrouted = bytearray(data[0])
        misrouted[16:24] = (victim + 1000).to_bytes(8, "little")  # the destination member id
        for message in [*data, bytes(misrouted)]:
            intruder.send(message)
        time.sleep(0.5)  # the outsider tries (and is refused at its first handshake command)
        outsider.close()
        intruder.close()
        context.term()
        # Sent by this rank, claiming another: the bus drops it, nothing is aborted.
        forged = rec.Abort(request_id=request_id, reason=rec.AbortReason.USER, message="forged",
                           src_rank=spoofed_source, dst_rank=-1)
        while not self.link.send(victim, rec.encode(forged)):
            time.sleep(0.01)
        print(f"attack: {len(data)} frames from an outsider, {len(data) + 1} from a member gone wrong and a "
              f"forged ABORT for request {request_id} sent to member {victim:x}", file=sys.stderr)


class _RecordingSocket:
    def __init__(self, socket, wire: list[bytes]) -> None:
        self._socket = socket
        self._wire = wire

    def send(self, data: bytes, *args, **kwargs):
        result = self._socket.send(data, *args, **kwargs)
        self._wire.append(bytes(data))
        return result

    def __getattr__(self, name: str):
        return getattr(self._socket, name)


if __name__ == "__main__":
    raise SystemExit(main())
