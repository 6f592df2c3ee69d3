"""The lanes (runtime/lane.py) against the object path they stand for.

The same engine traffic runs on a TP-1 cluster with each side's lane on or off
(`receiver.LANE_ENABLED`, `sender.LANE_ENABLED`), and everything an outsider can observe
must be what it is with both off:
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
from embxfer.runtime import lane as lane_module
from embxfer.runtime import receiver as receiver_module
from embxfer.runtime import sender as sender_module
from embxfer.runtime.lane import LANE_MIN_BATCH
from embxfer.runtime.local import random_payload

DIM = 16


def _cluster(staging_bytes: int = 1 << 14, lane: bool = True, encoder_lane: bool = False, **config) -> LocalCluster:
    """Staging of 16 KiB holds 341 tokens here: messages often end inside a request."""
    config = Config(**{"block_size": 16, "default_alloc_tokens": 64, "language_pool_blocks": 48,
                       "staging_bytes": staging_bytes, "request_timeout_s": 3600.0, **config})
    old = receiver_module.LANE_ENABLED, sender_module.LANE_ENABLED
    receiver_module.LANE_ENABLED, sender_module.LANE_ENABLED = lane, encoder_lane
    try:
        return LocalCluster(Topology(1, 1, 1), config, dim=DIM)
    finally:
        receiver_module.LANE_ENABLED, sender_module.LANE_ENABLED = old


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


def run_program(seed: int, lane: bool, encoder_lane: bool = False, sort_finished: bool = True) -> list:
    """A random engine program on a fresh cluster; the log of everything observable (the
    ids of `finished()` sorted on the language side, and on the encoder side with
    `sort_finished`: the language lane lands a message's lane segments first, so the
    COMPLETEs of one step may come in another order)."""
    cluster = _cluster(lane=lane, encoder_lane=encoder_lane)
    leader, sender = cluster.leader, cluster.senders[0]
    assert (leader._lane is not None) is lane and (sender._lane is not None) is encoder_lane
    log = _recording(leader, sender)
    rng = random.Random(seed)
    payloads: dict[int, object] = {}
    admitted: list[int] = []
    submitted: list[int] = []
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
            chosen = sorted(rng.sample(admitted, min(len(admitted), rng.randint(1, 16))))
            chosen = [rid for rid in chosen if rid not in submitted]
            if rng.random() < 0.3 and chosen:  # the encoder announces sizes first
                for rid in chosen:
                    sender.announce(rid, payloads[rid].num_tokens)
            engine = rng.choice([None, None, 0])
            if rng.random() < 0.1 and chosen:  # the vision model failed: the engine aborts before submitting
                dropped = chosen.pop()
                _call(log, "abort unsubmitted", lambda r=dropped: sender.abort(r, "no payload"))
            _call(log, "submit_many", lambda c=chosen, e=engine: sender.submit_many([(rid, payloads[rid]) for rid in c],
                                                                                  language_engine=e))
            submitted.extend(rid for rid in chosen if rid in sender.requests)
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
        encoder_finished = sender.finished()
        log.append(("finished", sorted(leader.finished()), sorted(encoder_finished) if sort_finished
                    else encoder_finished))
        for rid in list(submitted):
            state = _call(log, f"encoder state {rid}", lambda r=rid: sender.state(r))
            _call(log, f"encoder error {rid}", lambda r=rid: sender.error(r))
            _call(log, f"encoder lookup {rid}", lambda r=rid: sender.lookup(r))
            if state is not None and state.terminal and rng.random() < 0.5:
                _call(log, "encoder release", lambda r=rid: sender.release(r))
                submitted.remove(rid)
            elif state is not None and not state.terminal and rng.random() < 0.02:
                _call(log, "encoder release early", lambda r=rid: sender.release(r))
        if submitted and rng.random() < 0.3:  # a step's finished in one call (some may still be in flight)
            some = rng.sample(submitted, rng.randint(1, len(submitted)))
            if _call(log, "encoder release_many", lambda s=some: sender.release_many(s)) is None and \
                    log[-1][1] == "returned":
                submitted = [rid for rid in submitted if rid not in some]
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
                leader.allocator.num_used, leader.allocator.num_free, sender.in_flight, sender.busy))
    return log


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(True, False), (False, True), (True, True)]), st.booleans())
def test_a_program_observes_the_same_with_and_without_the_lanes(seed: int, lanes: tuple[bool, bool],
                                                               by_column: bool) -> None:
    """`by_column`: the lanes take every record and message by column (the encoder
    lane's thresholds for taking a few row by row at 1, and a message of any number of
    lane segments taken by the language lane), else as they ship (this program's records
    and messages are mostly small enough to be taken row by row or let go)."""
    old = sender_module.SCALAR_ENTRIES, lane_module.SCALAR_ROUNDS, lane_module.LANE_MIN_SEGMENTS
    if by_column:
        sender_module.SCALAR_ENTRIES, lane_module.SCALAR_ROUNDS, lane_module.LANE_MIN_SEGMENTS = 1, 1, 1
    try:
        with_lane = run_program(seed, *lanes, lanes[0])
    finally:
        sender_module.SCALAR_ENTRIES, lane_module.SCALAR_ROUNDS, lane_module.LANE_MIN_SEGMENTS = old
    without = run_program(seed, False, False, lanes[0])
    for index, (a, b) in enumerate(zip(with_lane, without, strict=False)):
        assert a == b, f"step {index}: with the lanes {lanes} {a!r:.300}, without {b!r:.300}"
    assert len(with_lane) == len(without)


@pytest.mark.parametrize("staging_bytes", [1 << 20, 1 << 13])
def test_the_usual_batch_stays_in_the_lane_from_admission_to_take(staging_bytes: int, monkeypatch) -> None:
    """A batch of usual requests (each whole in one message, or, with 8 KiB of staging,
    messages that end inside requests, each message taken by column however few lane
    segments it holds) is never materialized: the lane is not a detour."""
    monkeypatch.setattr(lane_module, "LANE_MIN_SEGMENTS", 1)
    cluster = _cluster(staging_bytes=staging_bytes)
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


def test_the_usual_batch_stays_in_the_encoder_lane_from_submit_to_release(monkeypatch) -> None:
    """Both lanes, batches whose messages end inside requests and whose requests wait for
    blocks (their sizes announced): no row of either side is ever materialized (the
    language lane taking every message by column)."""
    monkeypatch.setattr(lane_module, "LANE_MIN_SEGMENTS", 1)
    cluster = _cluster(staging_bytes=1 << 13, lane=True, encoder_lane=True)
    leader, sender, made = cluster.leader, cluster.senders[0], []
    for endpoint in (leader, sender):
        materialize = endpoint._lane_materialize
        endpoint._lane_materialize = lambda rid, m=materialize: made.append(rid) or m(rid)
    payloads = {rid: random_payload(5 + rid % 60, DIM, seed=rid) for rid in range(100, 140)}
    for _ in range(3):
        taken = cluster.transfer(payloads)
        assert all(copies[0].bit_equal(payloads[rid]) for rid, copies in taken.items())
        payloads = {rid + 1000: p for rid, p in payloads.items()}
    assert made == [] and sender.stats.announced > 0
    sender.progress()  # (the first step with an empty lane makes `requests` a plain dict again)
    assert len(sender._lane.rows) == 0 and sender.in_flight == 0 and type(sender.requests) is dict


def _lost_engine_program(encoder_lane: bool, dead: int) -> list:
    """Rows queued, in a message on the wire and waiting for their allocation when the
    language engine (`dead` = 1) or the encoder's own rank (0) is found dead."""
    cluster = _cluster(staging_bytes=1 << 12, lane=False, encoder_lane=encoder_lane)
    leader, sender, hub = cluster.leader, cluster.senders[0], cluster.p2p
    log = _recording(leader, sender)
    ids = list(range(1, 21))
    payloads = {rid: random_payload(10 + 3 * rid, DIM, seed=rid) for rid in ids}
    leader.admit_many(ids[:16])
    sender.submit_many(list(payloads.items()))
    held, match = [], hub._match
    hub._match = held.append
    for _ in range(3):
        cluster.step()
    log.append(("before", [sender.state(r).value for r in ids], sender.in_flight))
    cluster.bus_hub.dead[dead] = "stopped publishing heartbeats"
    for endpoint in cluster.endpoints:
        endpoint._next_liveness = 0.0
    cluster.step()
    hub._match = match
    for _ in range(5):
        cluster.step()
    log.append(("after", [(sender.state(r).value, sender.error(r)) for r in ids], sender.finished(),
                sender.in_flight, sender.busy, sender.stats.as_dict()))
    for rid in ids:
        _call(log, "release", lambda r=rid: sender.release(r))
    log.append(("released", [sender.state(r).value for r in ids], len(sender.requests)))
    return log


@pytest.mark.parametrize("dead", [0, 1])
def test_a_lost_engine_fails_encoder_lane_rows_as_it_fails_requests(dead: int) -> None:
    with_lane, without = _lost_engine_program(True, dead), _lost_engine_program(False, dead)
    assert with_lane == without
    after = next(entry for entry in with_lane if entry[0] == "after")
    # Those bound to the language engine fail (the twelve it allocated for; with the encoder
    # dead, its aborts reach all sixteen it admitted); those bound to none wait for one.
    failed = 16 if dead == 0 else 12
    assert [state for state, _ in after[1]] == ["FAILED"] * failed + ["BOOTSTRAPPING"] * (20 - failed)
    assert after[3] == 20 - failed


@pytest.mark.parametrize("encoder_lane", [True, False])
def test_encoder_lane_rows_past_their_deadlines_fail_as_requests_do(encoder_lane: bool) -> None:
    """Submitted and never allocated (admission_timeout_s), and allocated with their data
    held on the wire (request_timeout_s): the liveness check finds both by column."""
    cluster = _cluster(staging_bytes=1 << 20, lane=False, encoder_lane=encoder_lane, heartbeat_interval_s=0.01,
                       request_timeout_s=0.05, admission_timeout_s=0.05)
    leader, sender, hub = cluster.leader, cluster.senders[0], cluster.p2p
    ids = list(range(1, 21))
    payloads = {rid: random_payload(8, DIM, seed=rid) for rid in ids}
    leader.admit_many(ids[:10])  # the other ten are never admitted
    sender.submit_many(list(payloads.items()))
    hub._match = lambda pair: None  # nothing ever arrives
    for _ in range(3):
        cluster.step()
    assert [sender.state(r) for r in ids] == [RequestState.TRANSFERRING] * 10 + [RequestState.BOOTSTRAPPING] * 10
    time.sleep(0.1)
    sender.progress()
    assert [sender.state(r) for r in ids] == [RequestState.FAILED] * 20
    assert all(sender.error(r).startswith("timeout: no progress for") for r in ids[:10])
    assert all("no allocation from the language side" in sender.error(r) for r in ids[10:])
    assert sender.in_flight == 0
    if encoder_lane:
        assert len(sender._lane.rows) == 0


@pytest.mark.parametrize("dead", ["encoder", "language"])
@pytest.mark.parametrize("at_step", [0, 1, 2, 3, 4, 5, 6, 7, 9, 12])
def test_whatever_step_a_peer_dies_at_the_survivors_lane_rows_end_takeable_or_releasable(dead, at_step):
    """Both lanes on, a batch in them (whole payloads and messages that end inside one), and
    the other side's rank dies after `at_step` steps: on the survivor each request, row or
    object, ends SUCCESS (taken whole, bit-exact) or FAILED by the loss (released), or
    waits unbound for a language engine (a submit never allocated: aborted here); then
    nothing is held, no row, request, block or output byte."""
    cluster = _cluster(lane=True, encoder_lane=True)
    leader, sender = cluster.leader, cluster.senders[0]
    ids = list(range(1, 25))
    payloads = {rid: random_payload(8 + 37 * (rid % 7), DIM, seed=rid) for rid in ids}
    leader.admit_many(ids)
    sender.submit_many(list(payloads.items()))
    for _ in range(at_step):
        cluster.step()
    victim, survivor = (sender, leader) if dead == "encoder" else (leader, sender)
    cluster.bus_hub.dead[victim.rank] = f"rank {victim.rank} stopped publishing heartbeats"
    survivor._next_liveness = 0.0
    survivor.progress()
    for rid, payload in payloads.items():
        state = survivor.state(rid)
        if state is RequestState.BOOTSTRAPPING and survivor is sender and sender._lookup(rid).peer is None:
            sender.abort(rid)
            state = sender.state(rid)
        assert state.terminal, (rid, state)
        if state is RequestState.SUCCESS and survivor is leader:
            assert leader.take(rid).bit_equal(payload), rid
        else:
            if state is RequestState.FAILED:
                assert "peer_dead" in survivor.error(rid) or "user" in survivor.error(rid), survivor.error(rid)
            survivor.release(rid)
    assert survivor.in_flight == 0 and not survivor.requests and not survivor._lane.rows.slot_of
    assert survivor._blocks_in_use() == 0 and getattr(survivor, "output_bytes", 0) == 0
