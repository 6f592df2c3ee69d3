"""Aborts from either side in every state, bad input at the door, and late records.

After each scenario another request must still go through bit-exact (an aborted
request never shifts the point-to-point stream under the next one) and no block may
stay in use anywhere.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from embxfer.control import records as rec
from embxfer.runtime import Config, Payload
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.state import RequestState
from embxfer.runtime.topology import Topology

DIM = 32


def cluster_for(language_tp: int = 1, pool_blocks: int = 64) -> LocalCluster:
    config = Config(block_size=128, default_alloc_tokens=1024, language_pool_blocks=pool_blocks,
                    staging_bytes=1 << 14)
    return LocalCluster(Topology(1, 1, language_tp), config, dim=DIM)


def assert_healthy_afterwards(cluster: LocalCluster, request_id: int = 999) -> None:
    payload = random_payload(2500, DIM, seed=request_id)
    copies = cluster.transfer({request_id: payload})[request_id]
    assert all(c.bit_equal(payload) for c in copies)
    cluster.settle()
    assert cluster.blocks_in_use() == {rank: 0 for rank in cluster.blocks_in_use()}, cluster.describe()


def start(cluster: LocalCluster, request_id: int, tokens: int) -> Payload:
    payload = random_payload(tokens, DIM, seed=request_id)
    cluster.admit(request_id)
    cluster.submit(request_id, payload)
    return payload


def leader_request(cluster: LocalCluster, request_id: int):
    return cluster.leader.requests[request_id]


@pytest.mark.parametrize("language_tp", [1, 2])
@pytest.mark.parametrize("side", ["language", "encoder"])
def test_abort_before_allocation(side, language_tp):
    cluster = cluster_for(language_tp, pool_blocks=8)  # one default allocation
    start(cluster, 1, 900)
    start(cluster, 2, 900)
    cluster.step()
    assert leader_request(cluster, 2).state is RequestState.BOOTSTRAPPING  # waiting for blocks
    if side == "language":
        for receiver in cluster.receivers.values():
            receiver.abort(2)
    else:
        cluster.senders[0].abort(2)
    cluster.settle()
    assert cluster.leader.poll(2) is RequestState.FAILED
    assert cluster.senders[0].poll(2) is RequestState.FAILED
    assert cluster.leader.poll(1) is RequestState.SUCCESS
    for receiver in cluster.receivers.values():
        receiver.take(1)
    assert_healthy_afterwards(cluster)


@pytest.mark.parametrize("language_tp", [1, 2])
@pytest.mark.parametrize("side", ["language", "encoder"])
def test_abort_mid_round(side, language_tp):
    cluster = cluster_for(language_tp)
    start(cluster, 1, 3000)
    channel = next(iter(cluster.leader.channels.values()))
    cluster.run_until(lambda: channel.messages >= 2)
    request = leader_request(cluster, 1)
    assert request.state is RequestState.TRANSFERRING and 0 < request.round_tokens
    cluster.senders[0].progress()  # more of the round is sent: it is on the wire when the abort comes
    if side == "language":
        cluster.leader.abort(1)
    else:
        cluster.senders[0].abort(1)
    cluster.settle()
    assert cluster.leader.poll(1) is RequestState.FAILED
    assert cluster.senders[0].poll(1) is RequestState.FAILED
    assert "user" in cluster.leader.error(1)
    assert channel.discarded > 0  # the rest of the round still moved, into nothing
    assert_healthy_afterwards(cluster)


def test_abort_between_rounds():
    cluster = cluster_for(pool_blocks=8)
    start(cluster, 1, 5000)
    sender = cluster.senders[0]
    cluster.run_until(lambda: sender.requests[1].round >= 1)
    sender.abort(1, "encoder gave up")
    cluster.settle()
    assert cluster.leader.poll(1) is RequestState.FAILED
    assert "encoder gave up" in cluster.leader.error(1)
    assert_healthy_afterwards(cluster)


def test_abort_after_success_before_take():
    cluster = cluster_for()
    start(cluster, 1, 700)
    cluster.run_until(lambda: cluster.leader.poll(1) is RequestState.SUCCESS)
    cluster.leader.abort(1)
    assert cluster.leader.stats.aborted == 1 and cluster.leader.output_bytes == 0
    with pytest.raises(ValueError, match="already taken or released"):
        cluster.leader.take(1)
    assert_healthy_afterwards(cluster)


def test_late_records_for_an_aborted_request_are_ignored_and_counted():
    cluster = cluster_for()
    start(cluster, 1, 3000)
    channel = next(iter(cluster.leader.channels.values()))
    cluster.run_until(lambda: channel.messages >= 1)
    cluster.leader.abort(1)
    cluster.settle()
    before = cluster.leader.stats.late_records
    # A stale staging message for the aborted request: its segment is skipped (late).
    sender = cluster.senders[0]
    stale = rec.Transfer(src_rank=0, dst_rank=-1, message=sender.channel.next_message, nbytes=1024 * (DIM * 2 + 16),
                         segments=(rec.Segment(1, 0, 0, 1024, 3000, 0),))
    cluster.leader._on_record(stale)
    cluster.leader._on_record(rec.Abort(request_id=1, reason=rec.AbortReason.USER, message="again",
                                        src_rank=0, dst_rank=-1))
    cluster.leader.progress()
    assert cluster.leader.stats.late_records >= before + 1


def test_submit_rejects_bad_input_and_queues_nothing():
    cluster = cluster_for()
    sender = cluster.senders[0]
    good = random_payload(10, DIM)
    cases = [
        (-1, good, "request_id"),
        (1, "not a payload", "payload"),
        (1, random_payload(10, DIM + 1), "payload.embeddings"),
        (1, random_payload(10, DIM, dtype=torch.float32), "payload.embeddings"),
        (1, random_payload(10, DIM, deepstack_layers=2), "payload.deepstack"),
    ]
    for request_id, payload, needle in cases:
        with pytest.raises(ValueError, match=needle):
            sender.submit(request_id, payload)
    assert sender.requests == {} and not any(c.queue for c in sender.channels.values())
    sender.submit(1, good)
    with pytest.raises(ValueError, match="already submitted"):
        sender.submit(1, good)


def test_admit_rejects_bad_input():
    cluster = cluster_for()
    with pytest.raises(ValueError, match="encoder_engine"):
        cluster.leader.admit(1, encoder_engine=3)
    with pytest.raises(ValueError, match="request_id"):
        cluster.leader.admit(2**63)
    cluster.leader.admit(5)
    with pytest.raises(ValueError, match="already admitted"):
        cluster.leader.admit(5)
    with pytest.raises(ValueError, match="take"):
        cluster.leader.take(5)


def test_invalid_resume_fails_the_request_not_the_endpoint():
    cluster = cluster_for()
    start(cluster, 1, 500)
    sender = cluster.senders[0]
    bogus = rec.Allocations.of(1, 0, [(1, 0, 0, 1000)])  # 1000 tokens: not whole blocks
    sender._on_record(bogus)
    assert sender.requests[1].state is RequestState.FAILED
    assert "allocated_tokens" in sender.requests[1].error
    cluster.settle()
    assert_healthy_afterwards(cluster)


def test_dead_encoder_fails_its_requests_and_frees_blocks():
    cluster = cluster_for(language_tp=2)
    start(cluster, 1, 3000)
    channel = next(iter(cluster.leader.channels.values()))
    cluster.run_until(lambda: channel.messages >= 1)
    cluster.bus_hub.dead[0] = "rank 0 stopped publishing heartbeats"
    for receiver in cluster.receivers.values():
        receiver._next_liveness = 0.0
        receiver.progress()
    for receiver in cluster.receivers.values():
        assert receiver.poll(1) is RequestState.FAILED
        assert "peer_dead" in receiver.error(1)
    for _ in range(5):
        for receiver in cluster.receivers.values():
            receiver.progress()
    assert [r.allocator.num_used for r in cluster.receivers.values()] == [0, 0]


def test_release_lets_a_failed_request_id_be_admitted_again():
    cluster = cluster_for()
    start(cluster, 1, 300)
    cluster.leader.abort(1)
    cluster.settle()
    with pytest.raises(ValueError, match="already admitted"):
        cluster.leader.admit(1)
    cluster.leader.release(1)
    cluster.senders[0].release(1)
    payload = random_payload(300, DIM, seed=11)
    copies = cluster.transfer({1: payload})[1]
    assert copies[0].bit_equal(payload)


def test_release_refuses_a_request_in_flight():
    cluster = cluster_for()
    start(cluster, 1, 300)
    with pytest.raises(ValueError, match="needs a finished request"):
        cluster.leader.release(1)
    with pytest.raises(ValueError, match="needs a finished request"):
        cluster.senders[0].release(1)


def test_abort_before_the_encoder_submits_fails_the_submit_at_once():
    cluster = cluster_for()
    cluster.admit(3)
    cluster.leader.abort(3)
    cluster.step()
    cluster.step()
    sender = cluster.senders[0]
    sender.submit(3, random_payload(400, DIM, seed=3))
    assert sender.poll(3) is RequestState.FAILED
    assert "aborted by language engine 'language0' TP rank 0" in sender.error(3)
    assert not any(c.queue or c.messages for c in sender.channels.values())
    assert_healthy_afterwards(cluster)


def test_follower_release_before_the_leaders_fail_decision_keeps_incarnations_apart():
    """A follower sees the ABORT, fails, is released and re-admits the same id before the
    leader's FAIL decision arrives: the decision frees the old blocks and leaves the new
    incarnation alone."""
    cluster = cluster_for(language_tp=2)
    start(cluster, 1, 3000)
    follower = cluster.receivers[2]
    cluster.run_until(lambda: follower.requests[1].blocks and follower.requests[1].state is RequestState.TRANSFERRING)
    held = list(follower.requests[1].blocks)
    follower._on_record(rec.Abort(request_id=1, reason=rec.AbortReason.USER, message="from the engine",
                                  src_rank=0, dst_rank=-1))
    assert follower.poll(1) is RequestState.FAILED and follower.requests[1].blocks == held
    follower.release(1)
    follower.admit(1)  # the new incarnation
    assert follower.requests[1].state is RequestState.BOOTSTRAPPING
    follower._on_record(rec.Decisions.of(1, [(1, 0, rec.DecisionAction.FAIL, 0, 3000, 0, 0, b"",
                                              np.zeros(0, dtype=np.int64))]))
    assert follower.allocator.num_used == 0
    assert follower.requests[1].state is RequestState.BOOTSTRAPPING


def test_abort_message_of_any_length_and_script_is_carried():
    cluster = cluster_for()
    start(cluster, 1, 300)
    cluster.leader.abort(1, "終" * 300)  # 3-byte characters: 200 of them exceed a record's 512 bytes
    cluster.settle()
    assert cluster.senders[0].poll(1) is RequestState.FAILED
    assert "終終終" in cluster.senders[0].error(1)


@pytest.mark.parametrize("side", ["send", "receive"])
def test_a_transport_that_refuses_to_post_fails_the_peer_not_the_rank(side):
    """gloo raises from isend/irecv at once when its connection to the peer is gone: that
    kills the channel and fails the affected requests; progress() does not raise."""
    cluster = cluster_for()
    endpoint = cluster.senders[0] if side == "send" else cluster.leader

    def refuse(tensor, peer):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234. This is typically caused by ...")

    if side == "send":
        endpoint.transport.isend = refuse
    else:
        endpoint.transport.irecv = refuse
    start(cluster, 1, 2000)
    for _ in range(20):
        cluster.step()
    assert endpoint.poll(1) is RequestState.FAILED
    assert "Connection closed by peer" in endpoint.error(1) and "typically" not in endpoint.error(1)
    assert endpoint._blocks_in_use() == 0 and all(c.idle for c in endpoint.channels.values())


def test_follower_admitting_after_the_leaders_abort_fails_at_once():
    """The leader aborts a request before the follower's engine admitted it (followers may
    lag): the follower's later admit must not wait forever for a decision."""
    cluster = cluster_for(language_tp=2, pool_blocks=8)
    start(cluster, 1, 900)  # holds the whole pool, so request 2 stays in admission
    cluster.leader.admit(2)
    cluster.step()
    cluster.leader.abort(2, "client went away")
    cluster.step()
    follower = cluster.receivers[2]
    follower.admit(2)
    assert follower.poll(2) is RequestState.FAILED
    assert "client went away" in follower.error(2)
    follower.release(2)
    cluster.leader.release(2)
    cluster.settle()
    for receiver in cluster.receivers.values():
        receiver.take(1)
    assert_healthy_afterwards(cluster)


def test_an_encoder_that_left_takes_nothing_that_has_all_its_rows_here():
    """A drained encoder leaves once the language leader confirmed its requests; a follower
    may see the LEFT (the encoder's ring) before the leader's last decision (the leader's
    ring). Its copy has arrived in full: it completes, bit-exact. A request still missing
    rows from the engine that left fails (shutdown), naming it."""
    cluster = cluster_for(language_tp=2)
    payload = random_payload(700, DIM, seed=4)
    cluster.admit(1)
    cluster.submit(1, payload)
    cluster.admit(2)  # never submitted: it waits on the encoder
    follower = cluster.receivers[2]

    def arrived() -> bool:
        r = follower.requests.get(1)
        return r is not None and r.total_tokens is not None and r.sent_tokens + r.round_landed >= r.total_tokens

    cluster.run_until(arrived)
    assert not follower.state(1).terminal  # the leader's decision has not come yet
    follower._member_state(0, "left")
    cluster.run_until(lambda: follower.state(1).terminal)
    assert follower.state(1) is RequestState.SUCCESS and follower.take(1).bit_equal(payload)
    assert follower.state(2) is RequestState.FAILED and "left the job" in follower.error(2)


def test_a_language_engine_that_left_takes_nothing_the_encoder_sent_in_full():
    """The mirror of the test above: a language follower closes once it took its copy; the
    encoder may read its LEFT before the leader's COMPLETE (the leader's own channel). A
    request delivered in full still completes on that COMPLETE; one with rows still to
    send fails (shutdown) at once; one delivered in full whose leader leaves without
    confirming it fails when the leader's LEFT is read, not a timeout later."""
    cluster = cluster_for(language_tp=2, pool_blocks=64)
    sender, follower = cluster.senders[0], cluster.receivers[2]
    start(cluster, 1, 700)
    start(cluster, 2, 5000)  # more than one default allocation: a resume round is due

    def sent_in_full() -> bool:
        r = sender.requests.get(1)
        return r is not None and r.state is RequestState.TRANSFERRING and r.sent_tokens == r.total_tokens \
            and sender.channel.delivered(r)

    cluster.run_until(sent_in_full)
    assert sender.state(2) is not RequestState.SUCCESS and sender.requests[2].sent_tokens < 5000
    sender._member_state(follower.rank, "left")
    assert sender.state(2) is RequestState.FAILED and "left the job" in sender.error(2)
    assert not sender.state(1).terminal  # waits for the leader's word
    cluster.run_until(lambda: sender.state(1).terminal)
    assert sender.state(1) is RequestState.SUCCESS, sender.error(1)

    cluster = cluster_for(language_tp=2, pool_blocks=64)
    sender, leader, follower = cluster.senders[0], cluster.leader, cluster.receivers[2]
    start(cluster, 1, 700)
    cluster.run_until(sent_in_full)
    sender._member_state(follower.rank, "left")
    sender._member_state(leader.rank, "left")  # behind its last record: nothing more comes
    assert sender._check_liveness(time.monotonic())  # (work done: a step that did it is not idle)
    assert sender.state(1) is RequestState.FAILED and "did not confirm" in sender.error(1)
    assert not sender._check_liveness(time.monotonic())  # nothing left to do


def test_a_leave_posted_at_the_rendezvous_waits_for_the_members_own_record():
    """The rendezvous may tell of a member's leave before the records it sent just before
    (a COMPLETE) are read: the leave is applied when the member's own LEFT record comes
    over the bus (behind them), or at the latest peer_timeout_s later."""
    from embxfer.runtime.membership import Change

    cluster = cluster_for(language_tp=1)
    sender, leader = cluster.senders[0], cluster.leader
    sender._apply_changes([(Change.LEFT, leader.rank, "")])
    assert leader.rank in sender._leaving and not sender.directory.engine("language0").gone
    payload = start(cluster, 1, 700)
    cluster.run_until(lambda: sender.state(1).terminal and leader.state(1).terminal)
    assert sender.state(1) is RequestState.SUCCESS and leader.take(1).bit_equal(payload)
    leader._announce_state(rec.MemberState.LEFT)  # its own record, behind the COMPLETE
    leader.bus.flush()
    cluster.run_until(lambda: leader.rank not in sender._leaving)
    assert sender.directory.engine("language0").gone

    cluster = cluster_for(language_tp=1)
    sender, leader = cluster.senders[0], cluster.leader
    sender._apply_changes([(Change.LEFT, leader.rank, "")])
    assert sender._check_liveness(time.monotonic() + sender.config.peer_timeout_s)  # its record never came
    assert leader.rank not in sender._leaving and sender.directory.engine("language0").gone


def test_a_member_whose_process_ended_after_its_leave_record_left_and_is_not_dead(monkeypatch):
    """A member that closes writes its LEFT and then its process ends. A peer whose step
    drained the bus just before the record was written finds the process gone at its
    liveness check: it reads what the member left first, and sees a leave, not a death
    (a race seen once in CI, where the encoder of tests/reliability/test_stall.py
    declared its finished language leader dead)."""
    cluster = cluster_for(language_tp=1)
    sender, leader = cluster.senders[0], cluster.leader
    payload = start(cluster, 1, 700)
    cluster.run_until(lambda: sender.state(1).terminal and leader.state(1).terminal)
    assert leader.take(1).bit_equal(payload)
    read = {leader.rank}  # ranks whose ring the sender still reads (ShmBus forgets one that left)
    monkeypatch.setattr(sender.bus, "forget", read.discard)
    monkeypatch.setattr(sender.bus, "dead_ranks", lambda: {r: f"pid {r} is gone" for r in read})
    leader.close()  # its LEFT is in the sender's inbox, unread; its process "ends"
    # The step's first read comes just before the LEFT is written (an empty read), its
    # liveness check after. The records read there are the step's work: a loop that parks
    # on an idle step must not park on this one (its timeout, tens of milliseconds).
    drain, reads = sender.bus.drain, []
    monkeypatch.setattr(sender.bus, "drain", lambda: reads.append(1) or ([] if len(reads) == 1 else drain()))
    sender._next_liveness = 0.0  # the step below checks liveness
    assert sender.progress()
    assert len(reads) == 2  # (the step's read, then the liveness check's)
    assert not sender.dead_peers, sender.dead_peers
    assert sender.directory.engine("language0").gone and not read


def _no_grace_for_unknown_requests(monkeypatch) -> None:
    """A staging message held at the head of its channel for a request this rank does not
    know stays there for good: a wait that should not happen shows as no progress."""
    from embxfer.runtime import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "UNKNOWN_REQUEST_GRACE_S", 1e9)


def test_a_follower_failed_by_the_leaders_decision_keeps_nothing_once_released(monkeypatch):
    """A FAIL decision is the leader's last word on a request: a follower that fails on it
    (not on an ABORT read before) drops the request's rows there, so that the engine's
    release forgets it at once. Before, the follower kept it aside for a decision that
    would never come, its output budget never given back."""
    _no_grace_for_unknown_requests(monkeypatch)
    cluster = cluster_for(language_tp=2)
    start(cluster, 1, 3000)
    follower = cluster.receivers[2]
    cluster.run_until(lambda: follower.requests[1].outputs is not None)
    request = follower.requests[1]
    follower._on_record(rec.Decisions.of(cluster.leader.rank, [(1, request.round, rec.DecisionAction.FAIL, 0, 3000,
                                                                0, 0, b"", np.zeros(0, dtype=np.int64))]))
    assert follower.state(1) is RequestState.FAILED and "failed by the TP leader" in follower.error(1)
    assert follower.output_bytes == 0 and follower.allocator.num_used == 0
    follower.release(1)
    assert follower._awaiting_free == {} and follower.state(1) is RequestState.FAILED
    cluster.leader.abort(1)  # (the leader of this test never decided so: it catches up)
    cluster.settle()  # the rows still on the wire are discarded as late
    assert_healthy_afterwards(cluster)


def test_rows_of_a_request_released_before_the_leaders_decision_are_discarded_as_late(monkeypatch):
    """The encoder engine aborts a request: the follower reads the ABORT before the
    leader's FAIL decision, fails and is released (it keeps the request's blocks and rows
    aside until the decision comes). Messages carrying the request's rows, sent before the
    abort, are discarded as late, before and after the decision, never held at the head of
    the channel as an unknown request's (for 5 s each: what stalled `embxfer demo
    --abort-rate` for 5-10 s in some runs)."""
    _no_grace_for_unknown_requests(monkeypatch)
    cluster = cluster_for(language_tp=2)
    start(cluster, 1, 3000)
    sender, follower = cluster.senders[0], cluster.receivers[2]
    cluster.run_until(lambda: follower.requests[1].outputs is not None)
    sender.progress()  # more of the round is on the wire
    sender.abort(1)
    sender.progress()  # its ABORT goes to every language rank
    for record in follower.bus.drain():  # the follower reads it (and the stream's records), no rows yet
        follower._on_record(record)
    assert follower.state(1) is RequestState.FAILED
    follower.release(1)
    assert 1 in follower._awaiting_free  # its blocks wait for the leader's word
    late = follower.stats.late_records
    cluster.settle()
    assert follower.stats.late_records > late  # rows that came after the release, discarded
    assert follower._awaiting_free == {} and follower.output_bytes == 0 and follower.allocator.num_used == 0
    assert follower.state(1) is RequestState.FAILED  # remembered as finished
    assert_healthy_afterwards(cluster)


def test_any_encoder_tp_rank_may_abort_an_id_its_engine_never_submitted():
    """Encoder TP 2: rank 1 alone gives up on a request the engine never submitted (its
    vision model failed): the language side is told and fails it at once (only TP rank 0's
    abort used to reach it; the request waited for request_timeout_s)."""
    cluster = LocalCluster(Topology(1, 2, 1), cluster_for().config, dim=DIM)
    cluster.admit(1)
    cluster.step()
    cluster.senders[1].abort(1, "vision model failed")
    cluster.run_until(lambda: cluster.leader.state(1).terminal)
    assert cluster.leader.state(1) is RequestState.FAILED and "vision model failed" in cluster.leader.error(1)
    cluster.leader.release(1)
    assert_healthy_afterwards(cluster)


def test_an_encoder_rank_that_submits_after_another_rank_of_its_engine_aborted_fails_at_once():
    """Encoder TP 2 (rank 1 serves no language rank): rank 0 submits and aborts for the
    engine while rank 1 still holds the request's allocation; rank 1's submit a moment later
    fails at once (it used to follow the allocation and wait for a COMPLETE that never
    came, until request_timeout_s)."""
    cluster = LocalCluster(Topology(1, 2, 1), cluster_for().config, dim=DIM)
    payload = random_payload(100, DIM, seed=1)
    cluster.admit(1)
    cluster.senders[0].submit(1, payload)
    cluster.step()
    cluster.senders[0].abort(1, "engine aborted")
    for _ in range(3):
        cluster.step()
    cluster.senders[1].submit(1, payload)
    assert cluster.senders[1].state(1) is RequestState.FAILED and "engine aborted" in cluster.senders[1].error(1)
    cluster.run_until(lambda: cluster.leader.state(1).terminal)
    for endpoint in cluster.endpoints:
        endpoint.release(1)
    assert_healthy_afterwards(cluster)


@pytest.mark.parametrize("language_first", [True, False])
def test_an_encoder_abort_of_an_id_it_never_submitted_forgets_what_it_kept_for_it(language_first):
    """The engine is done with the request: what this rank kept for its submit (the
    language side's abort heard first, or its allocation) is forgotten, and the id's next
    request, admitted again later, goes through (it failed at the submit on the stale abort,
    or was sent into the old allocation and hung)."""
    cluster = cluster_for()
    sender, leader = cluster.senders[0], cluster.leader
    if language_first:
        cluster.admit(5)
        cluster.step()
        leader.abort(5)
        for _ in range(3):  # (settle() would not step: nothing is in flight)
            cluster.step()
    else:
        leader.admit(5, expected_tokens=8)  # an exact allocation of 8 tokens, held by the encoder rank
        cluster.step()
        cluster.step()
    sender.abort(5)
    for _ in range(3):  # the engine loop goes on before the id comes again
        cluster.step()
    assert leader.state(5) is RequestState.FAILED
    leader.release(5)
    payload = random_payload(300, DIM, seed=5)
    sender.submit(5, payload)
    cluster.admit(5)
    cluster.run_until(lambda: leader.state(5).terminal and sender.state(5).terminal)
    assert leader.take(5).bit_equal(payload) and sender.state(5) is RequestState.SUCCESS
    sender.release(5)
    assert_healthy_afterwards(cluster)


def test_a_language_abort_goes_to_the_engine_its_request_is_bound_to_only():
    """Two encoder engines: the language side aborts a request admitted from encoder 0.
    Encoder 1 never hears of it, so the same id routed to encoder 1 later goes through (it
    remembered the abort and failed the submit at once); encoder 0 still fails its submit."""
    cluster = LocalCluster(Topology(2, 1, 1), cluster_for().config, dim=DIM)
    leader, first, second = cluster.leader, cluster.senders[0], cluster.senders[1]
    cluster.admit(7, engine=0)
    cluster.step()
    leader.abort(7)
    for _ in range(3):
        cluster.step()
    first.submit(7, random_payload(10, DIM, seed=1))
    assert first.state(7) is RequestState.FAILED
    first.release(7)
    leader.release(7)
    payload = random_payload(50, DIM, seed=2)
    cluster.admit(7, engine=1)
    second.submit(7, payload)
    cluster.run_until(lambda: leader.state(7).terminal and second.state(7).terminal)
    assert leader.take(7).bit_equal(payload) and second.state(7) is RequestState.SUCCESS
    second.release(7)
    cluster.settle()
    assert cluster.blocks_in_use() == {rank: 0 for rank in cluster.blocks_in_use()}


@pytest.mark.parametrize("released_first", [False, True])
@pytest.mark.parametrize("aborting", ["leader", "follower"])
def test_what_came_with_a_failed_requests_payload_is_never_handed_to_the_ids_next_request(aborting, released_first):
    """A language rank aborts request 2 while its allocation is on the way; the encoder
    submits it with metadata before it hears of the abort, so the metadata (a PAYLOAD_INFO,
    sent just before the first segment) reaches that rank after the request failed there,
    or after it was released too. The leader (language TP 1) holds every request until it
    is taken or released; a follower (TP 2) keeps an info for an id it does not hold (its
    engine may admit the id later), and the first segment that follows it, discarded there,
    takes it along. Either kept it under the id and handed it to the id's next request:
    wrong metadata, silently, and a payload not equal to what was sent."""
    cluster = cluster_for(language_tp=1 if aborting == "leader" else 2)
    receivers, sender = cluster.language_receivers(0), cluster.senders[0]
    rank = receivers[-1]  # the leader at TP 1, the follower at TP 2
    cluster.admit(2)
    cluster.step()
    rank.abort(2)
    if released_first:
        rank.release(2)
    p = random_payload(1, DIM, seed=1)
    sender.submit(2, Payload(p.embeddings, p.fill_ids, p.mrope_positions, p.mrope_delta,
                             metadata={"image_grid_thw": torch.tensor([[1, 2, 3]])}))
    cluster.run_until(lambda: sender.state(2).terminal)
    for _ in range(3):
        cluster.step()
    assert [r.state(2) for r in (*receivers, sender)] == [RequestState.FAILED] * (len(receivers) + 1)
    for endpoint in (*receivers, sender):
        endpoint.release(2)  # (a no-op on a rank that released it already)
    fresh = random_payload(1, DIM, seed=2)
    cluster.admit(2)
    sender.submit(2, fresh)
    cluster.run_until(lambda: all(r.state(2).terminal for r in (*receivers, sender)))
    for receiver in receivers:
        taken = receiver.take(2)
        assert taken.metadata == {} and taken.bit_equal(fresh), f"rank {receiver.rank}"
    sender.release(2)
    assert_healthy_afterwards(cluster)


@pytest.mark.parametrize("rank", ["leader", "follower"])
def test_an_info_of_the_id_from_another_engines_rank_never_hides_the_one_its_request_comes_with(rank):
    """Language TP 2, two encoder engines. Encoder engine 1 sends request 9 with metadata; on
    one language rank, right after its PAYLOAD_INFO, a PAYLOAD_INFO of the same id from
    encoder engine 0's rank comes in (an earlier request of the id routed to engine 0,
    aborted there, its records still on their way: the reuse of an aborted id on another
    engine). Kept under the id alone, the later one replaced the request's own: its first
    segment found an info from another rank and bound without any, and the request came
    out without its metadata. Each info now waits for its own rank's segment, and the other
    rank's goes when the request binds (the leader drops it at once: the request is bound
    from its admission): the id's next request, from engine 0 and without metadata, gets
    none."""
    cluster = LocalCluster(Topology(2, 1, 2), cluster_for().config, dim=DIM)
    receivers = cluster.language_receivers(0)
    target = receivers[0 if rank == "leader" else 1]
    other_rank = cluster.engine_senders(0)[0].rank
    sender = cluster.engine_senders(1)[0]
    read = target._on_record
    foreign = []

    def on_record(record: rec.Record) -> None:
        read(record)
        if type(record) is rec.PayloadInfo and record.request_id == 9 and not foreign:
            foreign.append(rec.PayloadInfo.trusted(**{**record.__dict__, "src_rank": other_rank}))
            read(foreign[0])

    target._on_record = on_record
    p = random_payload(20, DIM, seed=3)
    sent = Payload(p.embeddings, p.fill_ids, p.mrope_positions, p.mrope_delta,
                   metadata={"image_grid_thw": torch.tensor([[1, 2, 3]])})
    cluster.admit(9, engine=1)
    sender.submit(9, sent)
    cluster.run_until(lambda: all(r.state(9).terminal for r in (*receivers, sender)))
    assert foreign, "the other rank's info was never read"
    for receiver in receivers:
        taken = receiver.take(9)
        assert taken.bit_equal(sent) and set(taken.metadata) == {"image_grid_thw"}, f"rank {receiver.rank}"
    sender.release(9)
    plain = random_payload(30, DIM, seed=4)
    other = cluster.engine_senders(0)[0]
    cluster.admit(9, engine=0)
    other.submit(9, plain)
    cluster.run_until(lambda: all(r.state(9).terminal for r in (*receivers, other)))
    for receiver in receivers:
        taken = receiver.take(9)
        assert taken.bit_equal(plain) and taken.metadata == {}, f"rank {receiver.rank}"
    other.release(9)
    assert_healthy_afterwards(cluster)


def test_an_encoder_rank_that_submits_after_its_peer_aborted_before_any_allocation_fails_at_once():
    """Encoder TP 2, language TP 2: rank 0 submits and aborts before the language side's
    allocation comes; rank 1's submit a moment later fails at once (it waited in
    BOOTSTRAPPING for an allocation that never came)."""
    cluster = LocalCluster(Topology(1, 2, 2), cluster_for().config, dim=DIM)
    payload = random_payload(10, DIM, seed=1)
    cluster.admit(2)
    cluster.senders[0].submit(2, payload)
    cluster.senders[0].abort(2, "engine aborted")
    for _ in range(3):
        cluster.step()
    cluster.senders[1].submit(2, payload)
    assert cluster.senders[1].state(2) is RequestState.FAILED and "engine aborted" in cluster.senders[1].error(2)
    cluster.run_until(lambda: all(e.state(2).terminal for e in cluster.endpoints))
    for endpoint in cluster.endpoints:
        endpoint.release(2)
    assert_healthy_afterwards(cluster)


def test_every_encoder_rank_giving_up_on_a_never_submitted_id_keeps_nothing_of_it():
    """The engine's loop calls abort on every TP rank: no rank keeps the others' aborts of
    the id, so its next request goes through on every rank."""
    cluster = LocalCluster(Topology(1, 2, 1), cluster_for().config, dim=DIM)
    cluster.admit(4)
    cluster.step()
    for sender in cluster.senders.values():
        sender.abort(4, "vision model failed")
    for _ in range(3):
        cluster.step()
    assert cluster.leader.state(4) is RequestState.FAILED
    cluster.leader.release(4)
    assert all(not s._early_aborts for s in cluster.senders.values())
    payload = random_payload(30, DIM, seed=4)
    cluster.admit(4)
    cluster.submit(4, payload)
    cluster.run_until(lambda: all(e.state(4).terminal for e in cluster.endpoints))
    assert cluster.leader.take(4).bit_equal(payload)
    assert all(s.state(4) is RequestState.SUCCESS for s in cluster.senders.values())
    for sender in cluster.senders.values():
        sender.release(4)
    assert_healthy_afterwards(cluster)


def test_a_language_engine_that_drains_while_a_restarted_encoder_joins_it_still_gets_its_rows(monkeypatch):
    """A restarted encoder's first read of the job can hold a language engine's JOIN and
    its DRAINING together. An allocation that engine made before draining, which reaches
    the encoder while its join is still being completed, is held; the join must then end
    in "draining" (what it took still finishes) and hand the held allocation over. It went
    from joining straight to draining, the allocation stayed held and the request waited
    until the engine left (found by tests/elastic: a drain that timed out)."""
    from embxfer.runtime.membership import Change

    cluster = cluster_for(language_tp=1)
    sender, leader = cluster.senders[0], cluster.leader
    view = sender.directory.engine("language0")
    view.state = "joining"  # as this encoder sees it: joined, not linked yet
    sender._joining.append(view)
    linked = sender._is_linked
    monkeypatch.setattr(sender, "_is_linked", lambda member: False)
    payload = start(cluster, 1, 700)
    for _ in range(4):
        cluster.step()
    assert 1 in sender._early_allocations or sender.requests[1].round < 0  # held: the join is not complete
    sender._apply_changes([(Change.DRAINING, leader.rank, "")])
    monkeypatch.setattr(sender, "_is_linked", linked)
    cluster.run_until(lambda: leader.state(1) is RequestState.SUCCESS and sender.state(1).terminal)
    assert view.state == "draining" and sender.state(1) is RequestState.SUCCESS
    assert leader.take(1).bit_equal(payload)


@pytest.mark.parametrize("lost", ["leader", "follower"])
def test_a_success_not_yet_taken_when_a_tp_peer_dies_is_still_taken_whole(lost):
    """A SUCCESS is finished, not in flight: losing a TP peer of the language engine fails
    what is in flight, but a payload whose rows this rank all read stays for `take`. Before,
    the loss dropped it and left the request SUCCESS without outputs, so that a `take` in
    the very step that learned of the loss raised AttributeError (seen in the demo's
    fault test, when the language leader was killed)."""
    cluster = cluster_for(language_tp=2)
    payload = start(cluster, 1, 3000)
    cluster.run_until(lambda: all(r.poll(1) is RequestState.SUCCESS for r in cluster.receivers.values()))
    leader = cluster.leader
    follower = next(r for r in cluster.receivers.values() if r is not leader)
    dead, survivor = (leader, follower) if lost == "leader" else (follower, leader)
    start(cluster, 2, 3000)  # in flight when the peer dies
    cluster.bus_hub.dead[dead.rank] = f"rank {dead.rank} stopped publishing heartbeats"
    survivor._next_liveness = 0.0
    survivor.progress()
    assert survivor.broken is not None and dead.rank in survivor.dead_peers
    assert survivor.poll(2) is RequestState.FAILED and "peer_dead" in survivor.error(2)
    assert survivor.poll(1) is RequestState.SUCCESS
    assert survivor.take(1).bit_equal(payload)
    survivor.release(2)
    assert survivor.output_bytes == 0 and survivor.allocator.num_used == 0


def mixed_load_tp2x2(sizes: list[int]) -> tuple[LocalCluster, dict[int, Payload]]:
    """One encoder engine and one language engine of two TP ranks each, a pool of 48 blocks
    (6144 tokens), 16 KiB messages, and these requests admitted and submitted (ids 1..)."""
    config = Config(block_size=128, default_alloc_tokens=1024, language_pool_blocks=48, staging_bytes=1 << 14)
    cluster = LocalCluster(Topology(1, 2, 2), config, dim=DIM)
    return cluster, {rid: start(cluster, rid, n) for rid, n in enumerate(sizes, start=1)}


def rank_named(cluster: LocalCluster, who: str):
    """'encoder leader', 'language follower'... of a layout with one engine a side."""
    side, which = who.split()
    ranks = (cluster.senders if side == "encoder" else cluster.receivers).values()
    return next(e for e in ranks if e.is_leader == (which == "leader"))


@pytest.mark.parametrize("victim", ["encoder leader", "encoder follower", "language leader", "language follower"])
@pytest.mark.parametrize("at_step", [0, 1, 2, 3, 5, 9, 14, 20, 30, 45, 70, 110, 200])
def test_whatever_step_any_rank_dies_at_every_survivor_ends_each_request_and_holds_nothing(victim, at_step):
    """Any rank of a TP-2 x TP-2 layout dies after `at_step` steps of a mixed load (one
    round and resumes, admissions waiting for blocks; all of it SUCCESS by step 200, most
    steps finishing some). Every survivor (the dead rank's TP peer, whose engine is lost,
    and both ranks of the other engine, which lose it), as an engine's loop sees it, ends
    each request SUCCESS, taken whole, or FAILED by the loss, released; then no request,
    output byte or block is left anywhere. Before 9166743 a language rank that lost a TP
    peer dropped its SUCCESSes' payloads, and `take` raised. (A submit that no language
    engine has allocated yet is bound to none: it waits, within its deadline, for the
    engine that admits its id, a restarted one included; here the engine aborts it.)"""
    cluster, payloads = mixed_load_tp2x2([100, 3000, 700, 9000, 128, 2500, 5000, 64])
    dead = rank_named(cluster, victim)
    for _ in range(at_step):
        cluster.step()
    cluster.bus_hub.dead[dead.rank] = f"rank {dead.rank} stopped publishing heartbeats"
    survivors = [e for e in cluster.endpoints if e is not dead]
    for _ in range(3):
        for endpoint in survivors:
            endpoint._next_liveness = 0.0
            endpoint.progress()
    peer = next(e for e in survivors if e.role == dead.role)
    assert peer.broken is not None  # its engine is lost
    for endpoint in survivors:
        for rid, payload in payloads.items():
            state = endpoint.state(rid)
            if state is RequestState.BOOTSTRAPPING and endpoint in cluster.senders.values() \
                    and endpoint._lookup(rid).peer is None:
                endpoint.abort(rid)
                state = endpoint.state(rid)
                assert state is RequestState.FAILED and "user" in endpoint.error(rid)
                endpoint.release(rid)
                continue
            assert state.terminal, (endpoint.rank, rid, state)
            if state is RequestState.SUCCESS and endpoint in cluster.receivers.values():
                assert endpoint.take(rid).bit_equal(payload), (endpoint.rank, rid)
            else:
                if state is RequestState.FAILED:
                    assert "peer_dead" in endpoint.error(rid), (endpoint.rank, rid, endpoint.error(rid))
                endpoint.release(rid)
        assert endpoint.in_flight == 0 and not endpoint.requests, endpoint.rank
        assert endpoint._blocks_in_use() == 0 and getattr(endpoint, "output_bytes", 0) == 0, endpoint.rank


@pytest.mark.parametrize("aborter", ["encoder leader", "encoder follower", "language leader", "language follower"])
@pytest.mark.parametrize("at_step", [0, 1, 2, 4, 7, 11, 16, 22, 29, 35, 38])
def test_an_abort_from_any_rank_at_any_step_fails_that_request_alone(aborter, at_step):
    """One TP rank of either engine aborts a request that resumes (9000 tokens through a
    pool of 6144, done at step 39 if left alone) at each of 11 points of a mixed load: it
    ends FAILED with the abort's reason on every rank of both engines; every other
    request arrives bit-exact on both language ranks; then nothing is held anywhere and
    the next request goes through."""
    cluster, payloads = mixed_load_tp2x2([100, 3000, 700, 9000, 128, 2500])
    doomed = 4
    rank = rank_named(cluster, aborter)
    for _ in range(at_step):
        cluster.step()
    assert not rank.state(doomed).terminal
    rank.abort(doomed, "the engine gave up")
    cluster.settle()
    for endpoint in cluster.endpoints:
        assert endpoint.state(doomed) is RequestState.FAILED, (endpoint.rank, endpoint.state(doomed))
        assert "user" in endpoint.error(doomed) and "the engine gave up" in endpoint.error(doomed), \
            (endpoint.rank, endpoint.error(doomed))
        endpoint.release(doomed)
        for rid, payload in payloads.items():
            if rid != doomed:
                assert endpoint.state(rid) is RequestState.SUCCESS, (endpoint.rank, rid, endpoint.state(rid))
                if endpoint in cluster.receivers.values():
                    assert endpoint.take(rid).bit_equal(payload), (endpoint.rank, rid)
                else:
                    endpoint.release(rid)
    cluster.settle()
    for endpoint in cluster.endpoints:
        assert endpoint.in_flight == 0 and not endpoint.requests, endpoint.rank
        assert endpoint._blocks_in_use() == 0 and getattr(endpoint, "output_bytes", 0) == 0, endpoint.rank
    assert_healthy_afterwards(cluster)
