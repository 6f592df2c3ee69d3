"""Staging messages that carry many requests, and the memory a language rank holds.

A message mixes requests and rounds; a request that fails meanwhile has only its own
segment skipped (or is never announced at all), and the stream stays aligned for every
other request. One pack launch and one unpack launch per message, one read-out launch
per step, whatever the message holds. Outputs come from a bounded budget.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from embxfer.control import records as rec
from embxfer.runtime import Config
from embxfer.runtime import channels as channels_module
from embxfer.runtime import receiver as receiver_module
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.sender import Sender
from embxfer.runtime.state import RequestState
from embxfer.runtime.topology import Topology
from tests.runtime.test_protocol import RecordSpy

DIM = 16


def cluster_for(topology: Topology | None = None, **config) -> LocalCluster:
    values = dict(block_size=16, default_alloc_tokens=64, language_pool_blocks=256, staging_bytes=1 << 20)
    return LocalCluster(topology or Topology(), Config(**{**values, **config}), dim=DIM)


class LaunchCounter:
    """Counts the data-plane calls the runtime makes (each is one launch on a GPU)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = {"pack_rows": 0, "unpack": 0, "unpack_to_rows": 0, "unpack_together": 0, "gather_addressed": 0}
        for module, name in ((channels_module.ops, "pack_rows"), (receiver_module.ops, "unpack"),
                             (receiver_module.ops, "unpack_to_rows"), (receiver_module.ops, "unpack_together"),
                             (receiver_module.ops, "gather_addressed")):
            original = getattr(module, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)


def assert_no_leaks(cluster: LocalCluster) -> None:
    assert set(cluster.blocks_in_use().values()) == {0}, cluster.describe()
    assert all(r.output_bytes == 0 for r in cluster.receivers.values())


def test_many_requests_travel_in_one_message_with_one_launch_each_way(monkeypatch):
    cluster = cluster_for(Topology(1, 1, 2))
    encoder = RecordSpy(cluster.senders[0])
    launches = LaunchCounter(monkeypatch)
    payloads = {rid: random_payload(1 + rid, DIM, seed=rid) for rid in range(40)}  # all fit the first round
    for rid in payloads:
        cluster.admit(rid)
    for rid, payload in payloads.items():
        cluster.submit(rid, payload)
    cluster.run_until(lambda: all(s.terminal for rid in payloads for s in cluster.states(rid)))
    for receiver in cluster.receivers.values():
        for rid, payload in payloads.items():
            assert receiver.take(rid).bit_equal(payload)
    # 40 requests, at most 64 segments a message: one message (one pack), fanned out to both
    # language ranks (one send each), and on each rank one unpack straight into the outputs
    # (the budget has room for all of them; each request arrives whole, so their outputs
    # are views of one allocation per field and the unpack is a copy per field): three
    # passes, no read-out.
    assert len(encoder.of(rec.Transfer)) == 1 and len(encoder.of(rec.Transfer)[0].segments) == 40
    assert cluster.p2p.messages == 2
    assert launches.calls == {"pack_rows": 1, "unpack": 0, "unpack_to_rows": 0, "unpack_together": 2,
                              "gather_addressed": 0}
    cluster.settle()
    assert_no_leaks(cluster)


def test_segments_per_message_are_capped():
    cluster = cluster_for(max_segments_per_message=8)
    encoder = RecordSpy(cluster.senders[0])
    payloads = {rid: random_payload(10, DIM, seed=rid) for rid in range(20)}
    taken = cluster.transfer(payloads)
    assert all(copies[0].bit_equal(payloads[rid]) for rid, copies in taken.items())
    assert [len(t.segments) for t in encoder.of(rec.Transfer)] == [8, 8, 4]
    assert [t.message for t in encoder.of(rec.Transfer)] == [0, 1, 2]
    assert_no_leaks(cluster)


def test_a_message_mixes_rounds_of_different_requests(monkeypatch):
    """Two admissions at a time (4 blocks of 16, default 32 tokens): a resume of one request
    and the first round of the next are decided in the same step and share a message. (The
    encoder leader's announcements of waiting submits are off here: they would make every
    waiting admission exact, and no request would need a resume.)"""
    monkeypatch.setattr(Sender, "_announce_unallocated", lambda self: None)
    cluster = cluster_for(Topology(1, 1, 2), language_pool_blocks=4, default_alloc_tokens=32)
    encoder = RecordSpy(cluster.senders[0])
    payloads = {rid: random_payload(45 + rid, DIM, seed=rid) for rid in range(12)}
    taken = cluster.transfer(payloads)
    assert all(c.bit_equal(payloads[rid]) for rid, copies in taken.items() for c in copies)
    mixed = [t for t in encoder.of(rec.Transfer) if len({s.round for s in t.segments}) > 1]
    assert mixed, [[(s.request_id, s.round) for s in t.segments] for t in encoder.of(rec.Transfer)]
    cluster.settle()
    assert_no_leaks(cluster)


def test_a_segment_of_a_request_that_failed_after_its_message_was_announced_is_skipped():
    cluster = cluster_for(Topology(1, 1, 2))
    encoder = RecordSpy(cluster.senders[0])
    a, b = random_payload(40, DIM, seed=1), random_payload(50, DIM, seed=2)
    cluster.admit(1)
    cluster.admit(2)
    cluster.submit(1, a)
    cluster.submit(2, b)
    cluster.leader.progress()  # publishes the two allocations
    cluster.senders[0].progress()  # one message with both, announced and sent
    assert [[s.request_id for s in t.segments] for t in encoder.of(rec.Transfer)] == [[1, 2]]
    for receiver in cluster.receivers.values():
        receiver.abort(1, "gone before it landed")
    cluster.run_until(lambda: all(s.terminal for rid in (1, 2) for s in cluster.states(rid)))
    for receiver in cluster.receivers.values():
        assert receiver.state(1) is RequestState.FAILED
        assert receiver.take(2).bit_equal(b)
        assert receiver.snapshot_stats()["discarded_segments"] == 1
    # the stream stayed aligned: the next message is read correctly
    later = random_payload(77, DIM, seed=3)
    assert all(c.bit_equal(later) for c in cluster.transfer({3: later})[3])
    cluster.settle()
    assert_no_leaks(cluster)


def test_a_request_that_fails_before_its_message_is_built_is_never_announced():
    """With the only staging buffer busy, a request waits in the sender's queue; aborted
    there, no TRANSFER ever names it and nothing of it moves."""
    cluster = cluster_for(staging_depth=1, staging_bytes=1 << 11)  # about 40 tokens a message
    encoder = RecordSpy(cluster.senders[0])
    big, victim, after = (random_payload(n, DIM, seed=n) for n in (400, 30, 60))
    for rid, payload in ((1, big), (2, victim)):
        cluster.admit(rid)
        cluster.submit(rid, payload)
    cluster.leader.progress()
    sender = cluster.senders[0]
    sender.progress()
    sender.progress()  # the one buffer is in flight: request 2 is still queued
    assert any(chunk.request.request_id == 2 for chunk in sender.channel.queue)
    sender.abort(2, "encoder gave up")
    cluster.run_until(lambda: all(s.terminal for rid in (1, 2) for s in cluster.states(rid)))
    assert cluster.leader.take(1).bit_equal(big)
    assert cluster.leader.state(2) is RequestState.FAILED
    assert 2 not in {s.request_id for t in encoder.of(rec.Transfer) for s in t.segments}
    assert cluster.transfer({3: after})[3][0].bit_equal(after)
    cluster.settle()
    assert_no_leaks(cluster)


def test_messages_mixing_requests_rounds_failures_and_aborts_under_load():
    """Many requests of mixed sizes (several resumes through a small pool), a third of
    them aborted at various moments from either side, on a TP 2 language engine fed by an
    encoder of TP 2: every request that was not aborted arrives bit-exact on every rank."""
    cluster = cluster_for(Topology(1, 2, 2), language_pool_blocks=12, default_alloc_tokens=64,
                          staging_bytes=1 << 13, max_segments_per_message=6)
    spies = [RecordSpy(s) for s in cluster.senders.values()]
    payloads = {rid: random_payload(1 + (rid * 53) % 300, DIM, seed=rid) for rid in range(60)}
    victims = {rid: ("language" if rid % 2 else "encoder", rid % 7) for rid in range(0, 60, 3)}
    for rid, payload in payloads.items():
        cluster.admit(rid)
        cluster.submit(rid, payload)
    steps = {"n": 0}

    def abort_some():
        steps["n"] += 1
        for rid, (side, when) in list(victims.items()):
            if steps["n"] >= when:
                if side == "language":
                    cluster.receivers[cluster.topology.language_leader].abort(rid, "test")
                else:
                    cluster.senders[0].abort(rid, "test")
                del victims[rid]

    cluster.run_until(lambda: all(s.terminal for rid in payloads for s in cluster.states(rid)), each_step=abort_some)
    aborted = set(range(0, 60, 3))
    for receiver in cluster.receivers.values():
        for rid, payload in payloads.items():
            if rid in aborted:
                assert receiver.state(rid) is RequestState.FAILED
            else:
                assert receiver.take(rid).bit_equal(payload), rid
    assert any(len({s.request_id for s in t.segments}) > 1 for spy in spies for t in spy.of(rec.Transfer))
    cluster.settle()
    assert_no_leaks(cluster)


def test_outputs_are_bounded_by_the_budget_and_admission_waits():
    """Each payload needs 40% of the budget: the third one's first round waits (holding only
    its landing blocks) until the engine takes one; the budget is never exceeded."""
    per_token = DIM * 2 + 16
    cluster = cluster_for(output_budget_bytes=250 * per_token)
    payloads = {rid: random_payload(100, DIM, seed=rid) for rid in range(3)}
    for rid, payload in payloads.items():
        cluster.admit(rid)
        cluster.submit(rid, payload)
    leader = cluster.leader
    peak = {"bytes": 0}

    def watch():
        peak["bytes"] = max(peak["bytes"], leader.output_bytes)

    cluster.run_until(lambda: sum(leader.state(r) is RequestState.SUCCESS for r in payloads) == 2, each_step=watch)
    for _ in range(20):
        cluster.step()
    waiting = [r for r in payloads if leader.state(r) is not RequestState.SUCCESS]
    assert len(waiting) == 1 and leader.output_bytes == 200 * per_token
    first_done = next(r for r in payloads if r not in waiting)
    assert leader.take(first_done).bit_equal(payloads[first_done])
    cluster.run_until(lambda: leader.state(waiting[0]).terminal, each_step=watch)
    for rid in payloads:
        if rid != first_done:
            assert leader.take(rid).bit_equal(payloads[rid])
    assert peak["bytes"] <= 250 * per_token
    cluster.settle()
    assert_no_leaks(cluster)


def test_a_request_larger_than_the_budget_fails_clearly_and_the_others_go_on():
    per_token = DIM * 2 + 16
    cluster = cluster_for(Topology(1, 1, 2), output_budget_bytes=100 * per_token)
    cluster.admit(1)
    cluster.submit(1, random_payload(101, DIM, seed=1))
    cluster.run_until(lambda: all(s.terminal for s in cluster.states(1)))
    for receiver in cluster.receivers.values():
        assert receiver.state(1) is RequestState.FAILED
        assert "output_budget_bytes" in receiver.error(1) and receiver.error(1).startswith("budget")
    cluster.settle()
    assert cluster.senders[0].state(1) is RequestState.FAILED
    ok = random_payload(100, DIM, seed=2)
    assert all(c.bit_equal(ok) for c in cluster.transfer({2: ok})[2])
    cluster.settle()
    assert_no_leaks(cluster)


def test_a_request_larger_than_the_pool_streams_through_it_within_the_budget():
    cluster = cluster_for(language_pool_blocks=2, output_budget_bytes=1000 * (DIM * 2 + 16))
    payload = random_payload(1000, DIM, seed=4)
    assert cluster.transfer({1: payload})[1][0].bit_equal(payload)
    assert cluster.leader.stats.resumes == 31  # 1000 tokens through 32-token rounds
    assert_no_leaks(cluster)


@pytest.mark.parametrize("language_tp", [1, 2])
def test_finished_reports_each_request_once(language_tp):
    cluster = cluster_for(Topology(1, 1, language_tp))
    payloads = {rid: random_payload(20 + rid, DIM, seed=rid) for rid in range(10)}
    for rid, payload in payloads.items():
        cluster.admit(rid)
        cluster.submit(rid, payload)
    seen: dict[int, list[int]] = {r.rank: [] for r in cluster.receivers.values()}
    for _ in range(50):
        cluster.step()
        for receiver in cluster.receivers.values():
            seen[receiver.rank] += receiver.finished()
    assert all(sorted(ids) == list(payloads) for ids in seen.values())
    assert sorted(cluster.senders[0].finished()) == list(payloads)


def test_requests_that_arrive_whole_share_one_allocation_and_fall_back_one_by_one(monkeypatch):
    """The outputs of requests that arrive whole in one message are views of one
    allocation per field: each contiguous, each the engine's alone (a sibling written or
    dropped changes nothing). With budget for only some of them they are made one by one
    (the others land in their blocks and wait), bit-exact; a request that fails between
    its message's acceptance and its landing is skipped, the others still exact."""
    cluster = cluster_for(Topology(1, 1, 2))
    payloads = {rid: random_payload(3 + rid, DIM, seed=rid) for rid in range(12)}
    copies = cluster.transfer(payloads)
    first = [copies[rid][0] for rid in payloads]
    base = first[0].embeddings.untyped_storage().data_ptr()
    assert all(p.embeddings.untyped_storage().data_ptr() == base for p in first)  # one allocation
    assert all(t.is_contiguous() for p in first for t in (p.embeddings, p.fill_ids, p.mrope_positions))
    first[0].embeddings.fill_(0)
    del first[1]
    assert all(first[i].bit_equal(payloads[i + (i > 0)]) for i in range(1, len(first)))
    assert_no_leaks(cluster)

    per_token = cluster.leader.spec.bytes_per_token
    cluster = cluster_for(Topology(1, 1, 2), output_budget_bytes=5 * 10 * per_token)
    payloads = {rid: random_payload(10, DIM, seed=100 + rid) for rid in range(9)}
    for rid in payloads:
        cluster.admit(rid)
    for rid, payload in payloads.items():
        cluster.submit(rid, payload)
    for batch in (range(5), range(5, 9)):  # the budget holds five: the rest wait for the takes
        cluster.run_until(lambda b=batch: all(s is RequestState.SUCCESS for rid in b for s in cluster.states(rid)))
        for receiver in cluster.receivers.values():
            assert all(receiver.take(rid).bit_equal(payloads[rid]) for rid in batch)
    cluster.settle()
    assert_no_leaks(cluster)

    cluster = cluster_for()
    launches = LaunchCounter(monkeypatch)
    payloads = {rid: random_payload(5 + rid, DIM, seed=200 + rid) for rid in range(6)}
    for rid in payloads:
        cluster.admit(rid)
    for rid, payload in payloads.items():
        cluster.submit(rid, payload)
    leader = cluster.leader
    original = leader._take_outputs_together

    def fail_one_after(requests, message):
        original(requests, message)
        leader.abort(3, "the engine gave up")

    leader._take_outputs_together = fail_one_after
    cluster.run_until(lambda: all(leader.state(rid).terminal for rid in payloads))
    assert leader.state(3) is RequestState.FAILED
    for rid, payload in payloads.items():
        if rid != 3:
            assert leader.take(rid).bit_equal(payload)
    assert launches.calls["unpack_together"] == 0 and launches.calls["unpack_to_rows"] == 1
    leader.release(3)
    cluster.settle()
    assert_no_leaks(cluster)


def test_a_staging_view_is_made_once_per_message_size_and_slot_and_bounded():
    """`_Staging.prefix`: the first n bytes of a slot's staging buffer, the same view for the
    same size (a CUDA slice costs microseconds of host time), a view of that buffer's
    memory, and at most PREFIXES_PER_SLOT sizes kept per slot."""
    staging = channels_module._Staging(SimpleNamespace(device=torch.device("cpu")), depth=2, staging_bytes=4096)
    first = staging.prefix(1, 100)
    assert staging.prefix(1, 100) is first
    assert first.numel() == 100 and first.data_ptr() == staging.staging[1].data_ptr()
    assert staging.prefix(0, 100) is not first and staging.prefix(0, 100).data_ptr() == staging.staging[0].data_ptr()
    for size in range(1, 3 * channels_module.PREFIXES_PER_SLOT):
        assert staging.prefix(1, size).numel() == size
        assert len(staging._prefixes[1]) <= channels_module.PREFIXES_PER_SLOT
