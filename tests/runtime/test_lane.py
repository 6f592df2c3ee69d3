"""The language lane (runtime/lane.py) against the object path it stands for.

The same engine traffic runs twice on a TP-1 cluster, with the lane and without
(`receiver.LANE_ENABLED`), and everything an outsider can observe must be the same:
every record either side publishes (byte for byte, a batch record's entries in id
order), what `state`, `arrived` and `finished` (in id order) say after every step, what each API call returns or raises, the payloads
taken (bit for bit) and the counters. The programs mix what the lane holds (batches of
usual requests) with everything that takes a lane request out of it (aborts from either
side, requests that need a resume, single admissions, takes of unfinished ids, sizes
announced while they wait, a pool too small for a batch).
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embxfer import Config, LocalCluster, RequestState, Topology
from embxfer.control import records as rec
from embxfer.runtime import receiver as receiver_module
from embxfer.runtime.lane import LANE_MIN_BATCH
from embxfer.runtime.local import random_payload

DIM = 16


def _cluster(staging_bytes: int = 1 << 14, lane: bool = True) -> LocalCluster:
    """Staging of 16 KiB holds 341 tokens here: messages often end inside a request."""
    config = Config(block_size=16, default_alloc_tokens=64, language_pool_blocks=48, staging_bytes=staging_bytes,
                    request_timeout_s=3600.0)
    old = receiver_module.LANE_ENABLED
    receiver_module.LANE_ENABLED = lane
    try:
        return LocalCluster(Topology(1, 1, 1), config, dim=DIM)
    finally:
        receiver_module.LANE_ENABLED = old


def _canonical(record: rec.Record) -> bytes:
    """A record's bytes, a batch record's entries in id order: the lane lands a message's
    lane segments before its other ones, so the COMPLETEs of one step may come in another
    order (what each says is the same)."""
    if type(record) in (rec.Allocations, rec.Completions):
        entries = record.entries[np.argsort(record.entries, order=["request_id", "round"], kind="stable")]
        record = type(record).trusted(src_rank=record.src_rank, dst_rank=record.dst_rank, entries=entries)
    return rec.encode(record)


def _recording(leader, sender) -> list:
    """A log that every record either endpoint publishes goes into, as it goes."""
    log: list = []
    for endpoint, side in ((leader, "language"), (sender, "encoder")):
        publish = endpoint._publish

        def recorded(record, publish=publish, side=side):
            log.append((side, "record", _canonical(record)))
            publish(record)

        endpoint._publish = recorded
    return log


def _call(log: list, what: str, work) -> object:
    try:
        result = work()
    except (ValueError, KeyError, RuntimeError) as exc:
        log.append((what, "raised", type(exc).__name__, str(exc)))
        return None
    log.append((what, "returned", _plain(result)))
    return result


def _plain(value: object) -> object:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "bit_equal"):  # a Payload: its bytes
        return tuple(t.view(-1).view(__import__("torch").uint8).tolist() if t is not None else None
                     for t in (value.embeddings, value.fill_ids, value.mrope_positions.contiguous(), value.deepstack)) \
            + (value.mrope_delta,)
    return value


def run_program(seed: int, lane: bool) -> list:
    """A random engine program on a fresh cluster; the log of everything observable."""
    cluster = _cluster(lane=lane)
    leader, sender = cluster.leader, cluster.senders[0]
    assert (leader._lane is not None) is lane
    log = _recording(leader, sender)
    rng = random.Random(seed)
    payloads: dict[int, object] = {}
    admitted: list[int] = []
    next_id = 1
    for _ in range(40):
        action = rng.random()
        if action < 0.25:  # a batch, most of them big enough for the lane
            count = rng.choice([1, 3, LANE_MIN_BATCH, LANE_MIN_BATCH + 3, 12])
            ids = list(range(next_id, next_id + count))
            next_id += count
            _call(log, "admit_many", lambda ids=ids: leader.admit_many(ids))
            admitted.extend(ids)
            for rid in ids:  # most fit the default allocation (64 tokens), some need a resume
                payloads[rid] = random_payload(rng.choice([1, 7, 16, 40, 64, 64, 90]), DIM, seed=rid)
        elif action < 0.45 and admitted:
            chosen = sorted(rng.sample(admitted, min(len(admitted), rng.randint(1, 12))))
            chosen = [rid for rid in chosen if rid not in sender.requests]
            if rng.random() < 0.3 and chosen:  # the encoder announces sizes first
                for rid in chosen:
                    sender.announce(rid, payloads[rid].num_tokens)
            _call(log, "submit_many", lambda c=chosen: sender.submit_many([(rid, payloads[rid]) for rid in c]))
        elif action < 0.5 and admitted:
            rid = rng.choice(admitted)
            side = rng.choice([leader, sender])
            _call(log, f"abort {type(side).__name__}", lambda s=side, r=rid: s.abort(r, "a test's abort"))
        elif action < 0.55 and admitted:
            ids = rng.sample(admitted, min(len(admitted), 3))
            _call(log, "take_many early", lambda i=ids: leader.take_many(i))
        else:
            _call(log, "step", cluster.step)
        # (sorted: the ids of one message that land together may turn SUCCESS in another
        # order, the lane's segments first; when each turned is the same step)
        log.append(("finished", sorted(leader.finished()), sorted(sender.finished())))
        for rid in list(admitted):
            state = _call(log, f"state {rid}", lambda r=rid: leader.state(r))
            _call(log, f"arrived {rid}", lambda r=rid: leader.arrived(r))
            _call(log, f"error {rid}", lambda r=rid: leader.error(r))
            if state is RequestState.SUCCESS and rng.random() < 0.5:
                ready = [r for r in admitted if leader.state(r) is RequestState.SUCCESS]
                _call(log, "take_many", lambda r=ready: leader.take_many(r))
                admitted = [r for r in admitted if r not in ready]
            elif state is RequestState.FAILED:
                _call(log, "release", lambda r=rid: leader.release(r))
                admitted.remove(rid)
    for _ in range(30):
        _call(log, "step", cluster.step)
    # (which blocks are free may differ: a message's lane segments free theirs first; SPEC
    # R6 keeps block indices out of every record and answer)
    log.append(("stats", leader.stats.as_dict(), sender.stats.as_dict(), leader.output_bytes,
                leader.allocator.num_used, leader.allocator.num_free))
    return log


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_a_program_observes_the_same_with_and_without_the_lane(seed: int) -> None:
    with_lane, without = run_program(seed, True), run_program(seed, False)
    for index, (a, b) in enumerate(zip(with_lane, without, strict=False)):
        assert a == b, f"step {index}: with the lane {a!r:.300}, without {b!r:.300}"
    assert len(with_lane) == len(without)


def test_the_usual_batch_stays_in_the_lane_from_admission_to_take() -> None:
    """A batch of usual requests (each whole in one message) is never materialized: the
    lane is not a detour."""
    cluster = _cluster(staging_bytes=1 << 20)
    leader, made = cluster.leader, []
    materialize = leader._lane_materialize
    leader._lane_materialize = lambda rid: made.append(rid) or materialize(rid)
    payloads = {rid: random_payload(5 + rid % 50, DIM, seed=rid) for rid in range(100, 140)}
    for _ in range(3):
        taken = cluster.transfer(payloads)
        assert all(copies[0].bit_equal(payloads[rid]) for rid, copies in taken.items())
        payloads = {rid + 1000: p for rid, p in payloads.items()}
    assert made == [] and len(leader._lane.rows) == 0 and leader.allocator.num_used == 0


@pytest.mark.parametrize("state", ["BOOTSTRAPPING", "WAITING_FOR_INPUT", "TRANSFERRING", "SUCCESS"])
def test_a_materialized_request_is_the_one_the_object_path_holds(state: str) -> None:
    """At each state of the lane, the Request made from a row has the fields the object
    path's own Request has at the same point."""
    fields = [f for f in receiver_module.Request.__slots__ if f not in ("admitted_at", "last_progress", "outputs",
                                                                         "peer")]
    seen = {}
    for lane in (True, False):
        cluster = _cluster(lane=lane)
        leader, sender = cluster.leader, cluster.senders[0]
        ids = list(range(1, 13))
        payloads = {rid: random_payload(10 + rid, DIM, seed=rid) for rid in ids}
        leader.admit_many(ids)
        if state != "BOOTSTRAPPING":
            leader.progress()  # allocations
        if state in ("TRANSFERRING", "SUCCESS"):
            sender.submit_many(list(payloads.items()))
            if state == "TRANSFERRING":  # bound, not landed: accept without a wire
                sender.progress()
                channel = next(iter(leader.channels.values()))
                for record in leader.bus.drain():
                    leader._on_record(record)
                message = channel.pending[0]
                assert leader._accept(channel, message)
            else:
                cluster.run_until(lambda leader=leader, ids=ids: all(leader.state(r) is RequestState.SUCCESS
                                                                    for r in ids))
        request = leader.requests[5]
        assert request.state.value == state
        seen[lane] = {f: getattr(request, f) for f in fields} | {
            "peer": request.peer.incarnation, "outputs": request.outputs is not None}
    assert seen[True] == seen[False]


def _held_wire_program(lane: bool) -> list:
    """A lane message accepted (its requests TRANSFERRING, its receive posted) whose data
    has not come yet, when one of its requests is aborted by the language engine and
    another by the encoder engine: the others land, those two do not."""
    cluster = _cluster(staging_bytes=1 << 20, lane=lane)
    leader, sender, hub = cluster.leader, cluster.senders[0], cluster.p2p
    log = _recording(leader, sender)
    ids = list(range(1, 13))
    payloads = {rid: random_payload(10 + rid, DIM, seed=rid) for rid in ids}
    leader.admit_many(ids)
    sender.submit_many(list(payloads.items()))
    held, match = [], hub._match
    hub._match = held.append  # receives and sends posted, none matched
    for _ in range(3):
        cluster.step()
    log.append(("states while held", [leader.state(rid).value for rid in ids]))
    leader.abort(5, "the engine gave up")
    sender.abort(7, "the vision model failed")
    cluster.step()
    hub._match = match
    for pair in held:
        match(pair)
    cluster.settle()
    log.append(("finished", leader.finished(), sender.finished()))
    log.append(("states", [(leader.state(rid).value, leader.error(rid)) for rid in ids]))
    ok = [rid for rid in ids if leader.state(rid) is RequestState.SUCCESS]
    taken = leader.take_many(ok)
    log.append(("bit-exact", [p.bit_equal(payloads[rid]) for rid, p in zip(ok, taken, strict=True)]))
    for rid in ids:
        if rid not in ok:
            leader.release(rid)
    cluster.settle()
    log.append(("after", leader.stats.as_dict(), leader.output_bytes, leader.allocator.num_used))
    return log


def test_a_lane_message_whose_requests_fail_before_its_data_lands_lands_the_others() -> None:
    with_lane, without = _held_wire_program(True), _held_wire_program(False)
    assert with_lane == without
    seen = {entry[0]: entry[1] for entry in with_lane if len(entry) == 2}
    assert [s for s, _ in seen["states"]].count("FAILED") == 2
    assert [s for s, _ in seen["states"]].count("SUCCESS") == 10
    assert seen["bit-exact"] == [True] * 10
    assert seen["states while held"] == ["TRANSFERRING"] * 12


@pytest.mark.parametrize("lane", [True, False])
def test_lane_requests_past_their_deadline_fail_as_requests_do(lane: bool) -> None:
    """Allocated and never sent: the liveness check finds them by column and fails them
    (their blocks back), as it fails Requests; those still waiting for blocks in the
    admission queue are backpressure, not late."""
    old = receiver_module.LANE_ENABLED
    receiver_module.LANE_ENABLED = lane
    try:
        config = Config(block_size=16, default_alloc_tokens=64, language_pool_blocks=40, heartbeat_interval_s=0.01,
                        request_timeout_s=0.05)
        cluster = LocalCluster(Topology(1, 1, 1), config, dim=DIM)
    finally:
        receiver_module.LANE_ENABLED = old
    leader = cluster.leader
    ids = list(range(1, 13))  # 10 fit the pool (4 blocks each), 2 wait for blocks
    leader.admit_many(ids)
    leader.progress()
    assert [leader.state(r).value for r in ids] == ["WAITING_FOR_INPUT"] * 10 + ["BOOTSTRAPPING"] * 2
    time.sleep(0.1)
    leader.progress()
    states = [leader.state(r) for r in ids]
    assert states[:10] == [RequestState.FAILED] * 10
    assert all(leader.error(r).startswith("timeout: no progress for") for r in ids[:10])
    assert leader.allocator.num_used == 8  # the two that waited got the blocks freed
    assert states[10:] == [RequestState.WAITING_FOR_INPUT] * 2
    if lane:
        assert len(leader._lane.rows) == 2
