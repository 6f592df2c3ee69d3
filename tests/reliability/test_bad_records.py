"""Records that are corrupt, truncated, replayed, out of order, forged or carry bad block
indices: rejected (and counted) before anything uses them; the endpoint keeps serving.

Runs the whole protocol in one process (LocalCluster) and injects records where a peer's
would arrive: as bytes into the rank's inbox (what a ring would deliver after its own
checksum check), or as decoded records into the endpoint.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from embxfer.control import records as rec
from embxfer.runtime import Config
from embxfer.runtime import sender as sender_module
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.state import RequestState
from embxfer.runtime.topology import Topology

DIM = 16


@pytest.fixture
def cluster() -> LocalCluster:
    config = Config(default_alloc_tokens=1024, language_pool_blocks=16, staging_bytes=1 << 14)
    return LocalCluster(Topology(1, 1, 2), config, dim=DIM)


def healthy(cluster: LocalCluster, request_id: int = 500) -> None:
    payload = random_payload(3000, DIM, seed=request_id)
    for copy in cluster.transfer({request_id: payload})[request_id]:
        assert copy.bit_equal(payload)
    cluster.settle()
    assert set(cluster.blocks_in_use().values()) == {0}, cluster.describe()


def resume(**overrides) -> rec.Allocations:
    """An ALLOCATIONS record of one entry, from the language leader (rank 1) to the
    encoder leader (rank 0) unless overridden."""
    fields = dict(request_id=1, round=0, sent_tokens=0, allocated_tokens=1024, src_rank=1, dst_rank=0)
    fields.update(overrides)
    return rec.Allocations.of(fields["src_rank"], fields["dst_rank"], [
        (fields["request_id"], fields["round"], fields["sent_tokens"], fields["allocated_tokens"])])


def test_corrupt_and_truncated_bytes_are_dropped_and_counted(cluster):
    follower = cluster.receivers[2]
    good = rec.encode(resume())
    rng = random.Random(7)
    garbage = [good[: len(good) // 2], b"", b"\x00" * 64, bytes(rng.randrange(256) for _ in range(300)),
               good + b"trailing"]
    for _ in range(200):
        flipped = bytearray(good)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        garbage.append(bytes(flipped))
    inbox = cluster.bus_hub.inboxes[2]
    for data in garbage:
        inbox.append((1, data))
    before = follower.bus.rejected
    follower.progress()
    assert follower.bus.rejected - before >= 5  # the structurally broken ones at least
    healthy(cluster)


def test_forged_source_is_dropped(cluster):
    """A record claiming another rank as its source never reaches the endpoint."""
    cluster.bus_hub.inboxes[0].append((2, rec.encode(resume())))  # rank 2 pretends to be the leader
    cluster.senders[0].progress()
    assert cluster.senders[0].bus.spoofed == 1
    assert cluster.senders[0]._early_allocations == {}
    healthy(cluster)


def test_replayed_resume_sends_each_round_once(cluster):
    payload = random_payload(5000, DIM, seed=3)
    cluster.admit(1)
    cluster.submit(1, payload)
    sender = cluster.senders[0]
    cluster.run_until(lambda: sender.requests[1].round >= 1)
    late_before = sender.stats.late_records
    rounds_before = sender.stats.rounds
    sender._on_record(resume(round=0))  # replay of the first round's announce
    sender._on_record(resume(round=1, sent_tokens=1024))  # replay of the resume just applied
    assert sender.stats.late_records == late_before + 2
    assert sender.stats.rounds == rounds_before
    cluster.run_until(lambda: all(s.terminal for s in cluster.states(1)))
    for receiver in cluster.receivers.values():
        assert receiver.take(1).bit_equal(payload)
    healthy(cluster)


def test_out_of_order_resume_fails_only_that_request(cluster):
    cluster.admit(1)
    cluster.submit(1, random_payload(5000, DIM, seed=4))
    sender = cluster.senders[0]
    cluster.run_until(lambda: sender.requests[1].round >= 0 and sender.requests[1].state is RequestState.TRANSFERRING)
    sender._on_record(resume(round=5, sent_tokens=1024))
    assert sender.requests[1].state is RequestState.FAILED
    assert "round 5" in sender.requests[1].error
    cluster.settle()
    assert all(s is RequestState.FAILED for s in cluster.states(1))
    healthy(cluster)


def admit_decision(blocks: tuple[int, ...]) -> rec.Decisions:
    return rec.Decisions(src_rank=1, dst_rank=-1, **{
        name: getattr(rec.Decisions.of(1, [(9, 0, rec.DecisionAction.ADMIT, 0, 0, 128 * len(blocks), 0, b"",
                                             np.array(blocks, dtype=np.int64))]), name)
        for name in ("entries", "items")})


def test_duplicated_block_indices_cannot_be_encoded():
    with pytest.raises(ValueError, match="block"):
        admit_decision((3, 3))


@pytest.mark.parametrize("blocks", [(16, 17), (0, 99999)])
def test_out_of_range_blocks_never_reach_a_kernel(cluster, blocks):
    """Indices outside this rank's pool: the allocator refuses them before any kernel runs;
    the request fails, the follower keeps serving."""
    follower = cluster.receivers[2]
    follower.admit(9)
    unchecked = rec.Decisions.of(1, [(9, 0, rec.DecisionAction.ADMIT, 0, 0, 128 * len(blocks), 0, b"",
                                      np.array(blocks, dtype=np.int64))])
    follower._on_record(rec.decode(rec.encode(unchecked), rec.UNBOUNDED))  # past the wire check
    assert follower.requests[9].state is RequestState.FAILED
    assert "blocks" in follower.requests[9].error or "block" in follower.requests[9].error
    assert follower.allocator.num_used == 0
    cluster.leader.abort(9)
    cluster.settle()
    healthy(cluster)


def test_one_decisions_record_mixing_usual_and_odd_entries_applies_each_in_order(cluster):
    """A follower applies a step's usual entries from the record's columns and any other
    entry one by one, in the leader's order: here a next-round ADMIT (applied), the same
    ADMIT again (late), then a COMPLETE at more rows than this rank read (the request
    fails, its blocks are freed)."""
    follower = cluster.receivers[2]
    follower.admit(9)
    admit = (9, 0, rec.DecisionAction.ADMIT, 0, 0, 128, 0, b"", [4])
    record = rec.Decisions.of(1, [admit, admit, (9, 0, rec.DecisionAction.COMPLETE, 64, 64, 0, 0, b"", ())])
    late = follower.stats.late_records
    follower._on_record(rec.decode(rec.encode(record), rec.UNBOUNDED))
    request = follower.requests[9]
    assert follower.stats.late_records == late + 1
    assert request.state is RequestState.FAILED and request.round == 0
    assert request.error.endswith("leader completed at 64 tokens, this rank read 0")
    assert follower.allocator.num_used == 0
    cluster.leader.abort(9)
    cluster.settle()
    healthy(cluster)


def test_a_complete_repeated_in_one_decisions_record_completes_once(cluster):
    """A follower applies a record's COMPLETEs as one batch; the same COMPLETE twice in it
    completes the request once and the repeat is late (as one by one)."""
    follower = cluster.receivers[2]
    follower.admit(9)
    admit = (9, 0, rec.DecisionAction.ADMIT, 0, 0, 128, 0, b"", [4])
    complete = (9, 0, rec.DecisionAction.COMPLETE, 0, 0, 0, 0, b"", ())
    follower._on_record(rec.decode(rec.encode(rec.Decisions.of(1, [admit])), rec.UNBOUNDED))
    late, succeeded = follower.stats.late_records, follower.stats.succeeded
    follower.finished()
    follower._on_record(rec.decode(rec.encode(rec.Decisions.of(1, [complete, complete])), rec.UNBOUNDED))
    assert follower.requests[9].state is RequestState.SUCCESS
    assert follower.stats.succeeded == succeeded + 1 and follower.stats.late_records == late + 1
    assert follower.finished() == [9]
    assert follower.allocator.num_used == 0
    cluster.leader.abort(9)
    cluster.settle()
    healthy(cluster)


def test_a_repeated_acknowledgement_decides_the_round_once(cluster):
    """The leader decides a step's acknowledged rounds as one batch; a follower's
    acknowledgement listed twice in one record is late, and the round is decided (and
    its COMPLETE broadcast) once."""
    leader, follower = cluster.leader, cluster.receivers[2]
    payload = random_payload(100, DIM, seed=9)
    cluster.admit(9)
    cluster.submit(9, payload)
    acks = []
    follower_publish = follower.bus.publish

    def hold_acks(record):  # the follower's acknowledgements are held back, then sent twice over
        (acks if isinstance(record, rec.Completions) else []).append(record)
        if not isinstance(record, rec.Completions):
            follower_publish(record)

    follower.bus.publish = hold_acks
    cluster.run_until(lambda: acks and leader.requests[9].round_read)
    follower.bus.publish = follower_publish
    entry = rec.decode(rec.encode(acks[0]), rec.UNBOUNDED).items()[0]
    assert entry.request_id == 9
    twice = rec.Completions.of(follower.rank, leader.rank, [tuple(entry)[:5]] * 2)
    decisions = []
    leader_publish = leader.bus.publish
    leader.bus.publish = lambda r: (decisions.append(r), leader_publish(r))
    late = leader.stats.late_records
    leader._on_record(rec.decode(rec.encode(twice), rec.UNBOUNDED))
    leader.progress()
    completes = [d for r in decisions if isinstance(r, rec.Decisions) for d in r.decisions()
                 if d.request_id == 9 and d.action is rec.DecisionAction.COMPLETE]
    assert len(completes) == 1 and leader.stats.late_records == late + 1
    cluster.settle()
    assert all(copy.bit_equal(payload) for copy in (r.take(9) for r in cluster.receivers.values()))
    healthy(cluster)


def test_replayed_decision_is_late_not_applied_twice(cluster):
    spy = []
    leader_publish = cluster.leader.bus.publish

    def keep(record):
        spy.append(record)
        leader_publish(record)

    cluster.leader.bus.publish = keep
    payload = random_payload(2500, DIM, seed=5)
    cluster.admit(1)
    cluster.submit(1, payload)
    follower = cluster.receivers[2]
    cluster.run_until(lambda: any(isinstance(r, rec.Decisions) and any(
        d.action is rec.DecisionAction.RESUME for d in r.decisions()) for r in spy))
    cluster.step()
    late = follower.stats.late_records
    for record in [r for r in spy if isinstance(r, rec.Decisions)]:
        follower._on_record(record)  # every decision so far, again
    assert follower.stats.late_records >= late + 2
    cluster.run_until(lambda: all(s.terminal for s in cluster.states(1)))
    assert follower.take(1).bit_equal(payload)
    cluster.leader.take(1)
    healthy(cluster)


def test_resumes_held_before_a_submit_are_bounded_in_order_and_counted(cluster, monkeypatch):
    """RESUMEs for an id the encoder has not submitted yet are held behind its allocation
    (a rank that serves no language rank may submit late): only the next round is kept;
    one without its allocation, a gap, a repeat or one past the bound is refused and
    counted, and nothing grows beyond the bound (MAX_PENDING_ALLOCATIONS in all)."""
    monkeypatch.setattr(sender_module, "MAX_PENDING_ALLOCATIONS", 3)
    sender = cluster.senders[0]
    rejected = sender.stats.rejected_records
    sender._on_record(resume(request_id=9, round=1, sent_tokens=1024))  # no allocation before it
    sender._on_record(resume(request_id=7))
    sender._on_record(resume(request_id=7, round=2, sent_tokens=2048))  # a gap
    for round_ in (1, 1, 2, 3, 4):  # a repeat, then one past the bound of 3 held RESUMEs
        sender._on_record(resume(request_id=7, round=round_, sent_tokens=1024 * round_))
    assert [a.round for a in sender._early_allocations[7]] == [0, 1, 2, 3]
    assert 9 not in sender._early_allocations and sender._early_resumes == 3
    assert sender.stats.rejected_records == rejected + 4
    for request_id in (20, 21, 22):  # three more ids: the oldest (7) and its RESUMEs go
        sender._on_record(resume(request_id=request_id))
    assert list(sender._early_allocations) == [20, 21, 22] and sender._early_resumes == 0


def test_allocations_from_an_unknown_or_departed_incarnation_are_never_kept(cluster):
    """A round-0 allocation for an id the encoder has not submitted yet is kept for the
    submit, but only from a live language leader of the job: one from a member id nobody
    knows (a forger, an incarnation long forgotten) is rejected, one from an incarnation
    that died is late; neither is used by the later submit of that id."""
    sender = cluster.senders[0]
    rejected, late = sender.stats.rejected_records, sender.stats.late_records
    sender._on_record(resume(request_id=7, src_rank=0x77_0000_0001))
    assert sender.stats.rejected_records == rejected + 1 and 7 not in sender._early_allocations
    sender.directory.view_of(1).state = "dead"  # the language engine's incarnation died
    sender._on_record(resume(request_id=8))
    assert sender.stats.late_records == late + 1 and 8 not in sender._early_allocations


def test_announcements_are_bounded_and_taken_only_from_an_encoder_leader(cluster, monkeypatch):
    """An ANNOUNCEMENTS record costs the language leader at most its bounded memory of sizes
    for ids not admitted yet (the oldest dropped); one from a rank that is not an encoder
    (here the language follower) changes nothing; the sizes kept make the admissions exact."""
    from embxfer.runtime import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "EARLY_MEMORY", 8)
    leader = cluster.leader
    leader._on_record(rec.Announcements.of(2, 1, [(rid, 100) for rid in range(100, 150)]))  # from the follower
    assert not leader._announced
    leader._on_record(rec.Announcements.of(0, 1, [(rid, 1400 + rid) for rid in range(100, 150)]))
    assert list(leader._announced) == list(range(142, 150))  # the newest 8
    assert all(leader._announced[rid][0] == 1400 + rid for rid in leader._announced)
    payload = random_payload(1549, DIM, seed=149)
    taken = cluster.transfer({149: payload})[149]  # admitted after its announcement: exact, no resume
    assert all(copy.bit_equal(payload) for copy in taken) and leader._lookup(149).resumes == 0
    healthy(cluster)
