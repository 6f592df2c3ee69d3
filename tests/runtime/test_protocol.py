"""The transfer protocol end to end, in one process (LocalCluster), step by step.

One test per required behaviour of SPEC section 4 (R1-R7) with its worked numbers,
TP layouts, backpressure and aborts. Every test ends by checking that no block is in
use on any rank (no leak).
"""

from __future__ import annotations

import pytest
import torch

from embxfer.control import records as rec
from embxfer.runtime import Config
from embxfer.runtime import receiver as receiver_module
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.state import RequestState
from embxfer.runtime.topology import Topology

DIM = 32


def make_cluster(topology: Topology | None = None, *, language_pool_blocks: int = 256, default_alloc_tokens: int = 8192,
                 block_size: int = 128, dim: int = DIM, staging_bytes: int = 1 << 16,
                 output_budget_bytes: int = Config().output_budget_bytes, **kwargs) -> LocalCluster:
    config = Config(block_size=block_size, default_alloc_tokens=default_alloc_tokens,
                    language_pool_blocks=language_pool_blocks, staging_bytes=staging_bytes,
                    output_budget_bytes=output_budget_bytes)
    return LocalCluster(topology or Topology(), config, dim=dim, **kwargs)


BATCHES = {rec.Allocation: rec.Allocations, rec.Completion: rec.Completions, rec.Decision: rec.Decisions}


class RecordSpy:
    """Keeps every record a rank publishes (decoded again, as a peer would see it)."""

    def __init__(self, endpoint) -> None:
        self.records: list[rec.Record] = []
        publish = endpoint.bus.publish

        def spy(record):
            self.records.append(rec.decode(rec.encode(record), rec.UNBOUNDED))
            publish(record)

        endpoint.bus.publish = spy

    def of(self, kind, request_id=None):
        """Records of `kind`; for an entry kind (rec.Allocation, rec.Completion,
        rec.Decision), the entries of every batch record of that kind, in order."""
        batch = BATCHES.get(kind)
        found = [e for r in self.records if isinstance(r, batch) for e in r.items()] if batch else \
            [r for r in self.records if isinstance(r, kind)]
        return [r for r in found if request_id is None or r.request_id == request_id]

    def segments(self, request_id=None):
        """Every segment of every TRANSFER (staging message) published, in order."""
        return [s for t in self.of(rec.Transfer) for s in t.segments
                if request_id is None or s.request_id == request_id]


def assert_no_leaks(cluster: LocalCluster) -> None:
    assert cluster.blocks_in_use() == {rank: 0 for rank in cluster.blocks_in_use()}, cluster.describe()


def transfer_one(cluster: LocalCluster, num_tokens: int, seed: int = 0, request_id: int = 7):
    payload = random_payload(num_tokens, cluster.leader.pool.dim, seed=seed,
                             dtype=cluster.leader.pool.dtype, deepstack_layers=cluster.leader.pool.deepstack_layers)
    copies = cluster.transfer({request_id: payload})[request_id]
    for copy in copies:
        assert copy.mismatches(payload) == []
    return payload, copies


def round_sizes(spy: RecordSpy, request_id: int = 7) -> list[int]:
    """Tokens sent per round (a round may span several staging messages)."""
    sizes: dict[int, int] = {}
    for segment in spy.segments(request_id):
        sizes[segment.round] = sizes.get(segment.round, 0) + segment.count
    return [sizes[r] for r in sorted(sizes)]


class AllocationSpy:
    """Keeps the block list of every allocation the leader makes (round by round)."""

    def __init__(self, receiver) -> None:
        self.blocks: list[list[int]] = []
        assign = receiver._assign

        def spy(request, blocks):
            self.blocks.append(list(blocks))
            assign(request, blocks)

        receiver._assign = spy


@pytest.mark.parametrize("num_tokens, default, expected_rounds", [
    (12000, 8192, [8192, 3808]),
    (9168, 8192, [8192, 976]),
    (2000, 1024, [1024, 976]),
    (8192, 8192, [8192]),
    (1, 8192, [1]),
])
def test_worked_numbers(num_tokens, default, expected_rounds):
    cluster = make_cluster(default_alloc_tokens=default)
    encoder = RecordSpy(cluster.senders[0])
    transfer_one(cluster, num_tokens)
    assert round_sizes(encoder) == expected_rounds
    assert_no_leaks(cluster)


def test_r1_resume_triggers_send():
    """2000 tokens into a 1024-token default allocation complete: the resume is sent."""
    cluster = make_cluster(default_alloc_tokens=1024)
    leader, encoder = RecordSpy(cluster.leader), RecordSpy(cluster.senders[0])
    transfer_one(cluster, 2000)
    resumes = leader.of(rec.Allocation)
    assert [(r.round, r.sent_tokens, r.allocated_tokens) for r in resumes] == [(0, 0, 1024), (1, 1024, 1024)]
    first_segments = {}
    for segment in encoder.segments():
        first_segments.setdefault(segment.round, segment.start)
    assert first_segments == {0: 0, 1: 1024}
    assert cluster.senders[0].stats.resumes == 1
    assert_no_leaks(cluster)


def test_r2_allocation_is_whole_blocks():
    """A default of 1000 tokens with block 128 allocates 8 blocks = 1024 tokens, and that is
    the number on the wire."""
    cluster = make_cluster(default_alloc_tokens=1000)
    leader, encoder = RecordSpy(cluster.leader), RecordSpy(cluster.senders[0])
    allocations = AllocationSpy(cluster.leader)
    transfer_one(cluster, 2500)
    for resume, blocks in zip(leader.of(rec.Allocation), allocations.blocks, strict=True):
        assert resume.allocated_tokens == len(blocks) * 128
    assert [r.allocated_tokens for r in leader.of(rec.Allocation)] == [1024, 1536]
    assert round_sizes(encoder) == [1024, 1476]
    assert_no_leaks(cluster)


def test_r3_metadata_from_first_round_only():
    """9168 tokens with 8192 default: mrope positions (3, 9168) equal to the source; the
    resumed round's 976 tokens land in 8 blocks and carry no metadata of their own."""
    cluster = make_cluster(default_alloc_tokens=8192)
    leader = RecordSpy(cluster.leader)
    payload, copies = transfer_one(cluster, 9168)
    assert copies[0].mrope_positions.shape == (3, 9168)
    assert torch.equal(copies[0].mrope_positions, payload.mrope_positions)
    assert copies[0].mrope_delta == payload.mrope_delta
    assert [r.allocated_tokens for r in leader.of(rec.Allocation)] == [8192, 1024]  # 64 blocks, then 8
    assert_no_leaks(cluster)


def test_r3_resume_round_with_different_metadata_is_rejected():
    """A resumed TRANSFER that disagrees with the first round's N or delta fails the request."""
    cluster = make_cluster(default_alloc_tokens=1024)
    payload = random_payload(2000, DIM, seed=3)
    cluster.admit(1)
    cluster.submit(1, payload)
    sender = cluster.senders[0]
    original = sender.bus.publish

    def tamper(record):
        if isinstance(record, rec.Transfer):
            segments = tuple(s._replace(mrope_delta=s.mrope_delta + 1) if s.round == 1 else s
                             for s in record.segments)
            record = rec.Transfer(**{**record.__dict__, "segments": segments})
        original(record)

    sender.bus.publish = tamper
    cluster.run_until(lambda: cluster.leader.poll(1).terminal)
    assert cluster.leader.poll(1) is RequestState.FAILED
    assert "delta" in cluster.leader.error(1)
    cluster.run_until(lambda: not sender.busy and sender.poll(1).terminal)
    assert_no_leaks(cluster)


def test_r5_poll_is_idempotent_one_resume_per_round():
    cluster = make_cluster(default_alloc_tokens=1024, language_pool_blocks=8)
    leader = RecordSpy(cluster.leader)
    payload = random_payload(5000, DIM, seed=5)
    cluster.admit(3)
    cluster.submit(3, payload)

    def poll_a_lot():
        for receiver in cluster.receivers.values():
            for _ in range(25):
                receiver.poll(3)

    cluster.run_until(lambda: cluster.leader.poll(3).terminal, each_step=poll_a_lot)
    resumes = leader.of(rec.Allocation, 3)
    assert [r.round for r in resumes] == [0, 1, 2, 3, 4]
    assert [r.sent_tokens for r in resumes] == [0, 1024, 2048, 3072, 4096]
    assert cluster.leader.take(3).bit_equal(payload)
    cluster.settle()
    assert_no_leaks(cluster)


def test_r6_block_reuse_through_a_pool_of_one_default_allocation():
    """50000 tokens with 8192 default through a pool of exactly 64 blocks: every round
    reuses the same blocks, and the payload arrives bit-exact."""
    cluster = make_cluster(default_alloc_tokens=8192, language_pool_blocks=64, staging_bytes=1 << 18)
    leader = RecordSpy(cluster.leader)
    allocations = AllocationSpy(cluster.leader)
    transfer_one(cluster, 50000)
    resumes = leader.of(rec.Allocation)
    assert len(resumes) == 7  # 8192 x 6 + 848
    assert all(set(blocks) <= set(allocations.blocks[0]) for blocks in allocations.blocks)
    assert allocations.blocks[1] == allocations.blocks[0]  # the allocator handed back the same indices
    assert_no_leaks(cluster)


def test_r7_each_round_read_once(monkeypatch):
    """A round that lands in blocks (a first round that found no output budget) is read out
    of them exactly once, when it is complete and the budget has room; polling in between
    reads nothing. Rounds whose outputs exist land straight in them: no read-out at all."""
    row = DIM * 2 + 16
    cluster = make_cluster(default_alloc_tokens=1024, language_pool_blocks=16, staging_bytes=1 << 14,
                           output_budget_bytes=3000 * row)
    reads = []
    gather = receiver_module.ops.gather_addressed

    def counting(pool, plan, counts, outputs, addresses, out_starts, **kwargs):
        reads.extend(zip(counts, out_starts.tolist(), strict=True))
        gather(pool, plan, counts, outputs, addresses, out_starts, **kwargs)

    monkeypatch.setattr(receiver_module.ops, "gather_addressed", counting)
    first, second = random_payload(3000, DIM, seed=1), random_payload(2500, DIM, seed=2)
    cluster.admit(7)
    cluster.submit(7, first)
    cluster.run_until(lambda: cluster.leader.poll(7).terminal)
    assert reads == []  # every round of 7 went straight into its outputs

    def poll_a_lot():
        for _ in range(20):
            cluster.leader.poll(8)

    cluster.admit(8)
    cluster.submit(8, second)  # its first round finds the budget held by 7's payload
    cluster.run_until(lambda: cluster.leader.requests[8].round_landed == 1024, each_step=poll_a_lot)
    for _ in range(5):
        cluster.step()
        poll_a_lot()
    assert reads == []
    assert cluster.leader.take(7).bit_equal(first)  # frees the budget
    cluster.run_until(lambda: cluster.leader.poll(8).terminal, each_step=poll_a_lot)
    assert reads == [(1024, 0)]  # read once; the later rounds went straight into the outputs
    assert cluster.leader.take(8).bit_equal(second)
    cluster.settle()
    assert_no_leaks(cluster)


@pytest.mark.parametrize("encoder_tp, language_tp", [(1, 2), (2, 1), (2, 2), (1, 3), (3, 2)])
def test_tp_layouts(encoder_tp, language_tp):
    cluster = make_cluster(Topology(1, encoder_tp, language_tp), default_alloc_tokens=1024)
    payload, copies = transfer_one(cluster, 3333)
    assert len(copies) == language_tp
    dummies = [s for s in cluster.senders.values() if s.dummy]
    assert len(dummies) == max(0, encoder_tp - language_tp)
    for dummy in dummies:
        assert dummy.stats.rounds == 2 and dummy.channels == {}
    assert_no_leaks(cluster)


def test_tp_ranks_agree_on_blocks():
    """Every language rank holds the same block indices as the leader at every step (R4)."""
    cluster = make_cluster(Topology(1, 1, 3), default_alloc_tokens=512, language_pool_blocks=12)
    payloads = {rid: random_payload(300 + 700 * rid, DIM, seed=rid) for rid in range(6)}

    def agree():
        # A follower may lag behind the leader, but it never holds a block that the leader
        # has already given to a different request.
        owner = {b: rid for rid, r in cluster.leader.requests.items() for b in r.blocks}
        for follower in list(cluster.receivers.values())[1:]:
            for rid, request in follower.requests.items():
                for block in request.blocks:
                    assert owner.get(block, rid) == rid, (block, rid, owner.get(block))

    for rid, payload in payloads.items():
        cluster.admit(rid)
        cluster.submit(rid, payload)
    cluster.run_until(lambda: all(s.terminal for rid in payloads for s in cluster.states(rid)), each_step=agree)
    for rid, payload in payloads.items():
        for receiver in cluster.receivers.values():
            assert receiver.take(rid).bit_equal(payload)
    cluster.settle()
    assert_no_leaks(cluster)


def test_two_encoder_engines_feed_one_language_engine():
    cluster = make_cluster(Topology(2, 1, 2), default_alloc_tokens=1024)
    payloads = {rid: random_payload(500 + 611 * rid, DIM, seed=rid) for rid in range(8)}
    taken = cluster.transfer(payloads, engine_of=lambda rid: rid % 2)
    for rid, copies in taken.items():
        assert all(c.bit_equal(payloads[rid]) for c in copies)
    assert cluster.senders[0].stats.requests == 4 and cluster.senders[1].stats.requests == 4
    assert_no_leaks(cluster)


@pytest.mark.parametrize("dtype, dim, deepstack", [(torch.float32, 1000, 0), (torch.float16, 40, 3),
                                                  (torch.bfloat16, 24, 3)])
def test_dtypes_and_deepstack(dtype, dim, deepstack):
    cluster = make_cluster(default_alloc_tokens=256, dim=dim, dtype=dtype, deepstack_layers=deepstack,
                           staging_bytes=1 << 20)
    payload, copies = transfer_one(cluster, 700)
    assert copies[0].dtype == dtype and copies[0].deepstack_layers == deepstack
    assert_no_leaks(cluster)


def test_backpressure_64_requests_through_one_default_allocation():
    cluster = make_cluster(Topology(1, 1, 2), default_alloc_tokens=1024, language_pool_blocks=8)
    payloads = {rid: random_payload(1 + (rid * 397) % 3000, DIM, seed=rid) for rid in range(64)}
    taken = cluster.transfer(payloads)
    assert all(all(c.bit_equal(payloads[rid]) for c in copies) for rid, copies in taken.items())
    assert_no_leaks(cluster)


def test_request_larger_than_the_language_pool():
    cluster = make_cluster(default_alloc_tokens=1024, language_pool_blocks=3, staging_bytes=1 << 14)
    transfer_one(cluster, 5000)  # pool holds 384 tokens
    assert_no_leaks(cluster)


def test_resume_cap_limits_each_round():
    config = Config(block_size=16, default_alloc_tokens=64, language_pool_blocks=64, max_resume_tokens=48,
                    staging_bytes=1 << 16)
    cluster = LocalCluster(Topology(), config, dim=DIM)
    encoder = RecordSpy(cluster.senders[0])
    transfer_one(cluster, 200)
    assert round_sizes(encoder) == [64, 48, 48, 40]
    assert_no_leaks(cluster)


def test_statistics_count_what_happened():
    cluster = make_cluster(default_alloc_tokens=1024, staging_bytes=1 << 14)
    transfer_one(cluster, 2000)
    encoder, leader = cluster.senders[0].snapshot_stats(), cluster.leader.snapshot_stats()
    for stats in (encoder, leader):
        assert stats["requests"] == 1 and stats["succeeded"] == 1 and stats["failed"] == 0
        assert stats["rounds"] == 2 and stats["resumes"] == 1 and stats["tokens"] == 2000
        assert stats["blocks_in_use"] == 0 and stats["discarded_segments"] == 0
    assert encoder["messages"] == leader["messages"] == cluster.p2p.messages > 2
    assert encoder["bytes"] == leader["bytes"] == cluster.p2p.bytes > 2000 * DIM * 2


def test_follower_that_never_called_admit_still_receives():
    """A follower may learn of a request from the leader's decision before (or without) its
    engine calling admit(); the data is still received and verified."""
    cluster = make_cluster(Topology(2, 1, 2), default_alloc_tokens=1024)
    payload = random_payload(1500, DIM, seed=9)
    cluster.leader.admit(4, encoder_engine=1)
    cluster.submit(4, payload, engine=1)
    follower = cluster.receivers[cluster.topology.language_ranks[1]]
    cluster.run_until(lambda: 4 in follower.requests and follower.requests[4].state.terminal)
    assert follower.take(4).bit_equal(payload)
    assert cluster.leader.take(4).bit_equal(payload)
    cluster.settle()
    assert_no_leaks(cluster)


@pytest.mark.parametrize("encoder_tp", [1, 2])
def test_a_follower_that_reads_a_transfer_before_it_finds_the_encoder_usable_keeps_it(encoder_tp):
    """An encoder sends once it finds the language engine linked, but a language follower
    finds a joining encoder usable only after the step's records: the first TRANSFER can
    come first. It is kept (and replayed once the channel exists), never dropped: the
    request completes on the follower, bit-exact (it used to wait there until its timeout;
    seen in the elastic scenario on a busy machine)."""
    cluster = make_cluster(Topology(1, encoder_tp, 2), default_alloc_tokens=1024)
    follower = cluster.receivers[cluster.topology.language_ranks[1]]
    view = follower.directory.view_of(cluster.topology.encoder_ranks(0)[0])
    source = follower.sources.pop(view.incarnation)
    if encoder_tp == 2:  # the other encoder rank's JOIN not seen yet either: held until it is
        missing, view.members[0] = view.members[0], None
    follower.channels.pop(source.serving)
    view.state = "joining"
    follower._joining.append(view)
    payload = random_payload(900, DIM, seed=3)
    cluster.admit(7)
    cluster.submit(7, payload)
    others = [e for e in cluster.endpoints if e is not follower]
    for _ in range(5):  # the encoder side sends before the follower takes a step
        for endpoint in others:
            endpoint.progress()
    assert any(not c.idle for s in cluster.senders.values() for c in s.channels.values())  # sent
    follower.progress()
    if encoder_tp == 2:
        assert source.serving in follower._early_records  # held, not dropped
        view.members[0] = missing
    cluster.run_until(lambda: follower.requests[7].state.terminal and cluster.leader.requests[7].state.terminal)
    assert follower.take(7).bit_equal(payload)
    assert cluster.leader.take(7).bit_equal(payload)
    assert not follower._early_records
    cluster.settle()
    assert_no_leaks(cluster)


def both_succeeded_and_nothing_is_held(cluster: LocalCluster, first, late, payload) -> None:
    """Request 3 ended SUCCESS on both encoder ranks, the language side got `payload`
    bit-exact, and once released nothing is held early or left in use anywhere."""
    assert [s.state(3) for s in (first, late)] == [RequestState.SUCCESS] * 2, late.error(3)
    assert cluster.leader.take(3).bit_equal(payload)
    for sender in (first, late):
        sender.release(3)
    cluster.settle()
    assert not late._early_allocations and not late._early_completions and late._early_resumes == 0
    assert_no_leaks(cluster)


@pytest.mark.parametrize("late_until", ["round 1", "complete"])
def test_an_encoder_rank_that_serves_no_language_rank_may_submit_after_several_rounds(late_until):
    """Encoder TP 2 feeding language TP 1: encoder rank 1 serves no language rank, it only
    follows the rounds. Its engine may submit late, after the language side has resumed
    the request on rank 0's data more than once: the allocation and every RESUME that came
    before the submit are kept in order and applied at submit, so both encoder ranks end
    SUCCESS (rank 1 used to drop a RESUME for an id it did not know yet and fail the
    request at the next one: "RESUME round 2, expected round 1"; seen in the demo's
    two-encoder layout on a busy machine). Also when it submits after the COMPLETE: the
    COMPLETE is kept behind the rounds (it used to be dropped as late, leaving rank 1's
    request in flight for good)."""
    cluster = make_cluster(Topology(1, 2, 1), default_alloc_tokens=256, language_pool_blocks=2)  # 4 rounds
    first, late = (cluster.senders[r] for r in cluster.topology.encoder_ranks(0))
    payload = random_payload(1000, DIM, seed=5)
    cluster.admit(3)
    first.submit(3, payload)
    if late_until == "round 1":
        cluster.run_until(lambda: cluster.leader.requests[3].round >= 1)
        cluster.step()  # the RESUME of round 1 reaches both encoder ranks
        assert not cluster.leader.requests[3].state.terminal
    else:
        cluster.run_until(lambda: first.requests[3].state.terminal)
        assert len(late._early_allocations[3]) == 4 and 3 in late._early_completions  # 4 rounds and the COMPLETE
    assert 3 not in late.requests
    late.submit(3, payload)
    cluster.run_until(lambda: all(s.requests[3].state.terminal for s in (first, late))
                      and cluster.leader.requests[3].state.terminal)
    assert late.state(3) is RequestState.SUCCESS, late.error(3)
    assert late.requests[3].round == first.requests[3].round == cluster.leader.requests[3].round
    both_succeeded_and_nothing_is_held(cluster, first, late, payload)


def test_an_encoder_rank_that_still_holds_a_finished_id_keeps_the_rounds_of_its_next_incarnation():
    """The same id again: encoder rank 1 (serving no language rank) has not released the
    finished first incarnation when the second runs through all its rounds on rank 0's
    data; the second's allocation, RESUMEs and COMPLETE are held for rank 1's next submit
    of the id, and every rank ends SUCCESS with the second payload."""
    cluster = make_cluster(Topology(1, 2, 1), default_alloc_tokens=256, language_pool_blocks=2)
    first, late = (cluster.senders[r] for r in cluster.topology.encoder_ranks(0))
    one, two = random_payload(600, DIM, seed=6), random_payload(1000, DIM, seed=7)
    cluster.admit(3)
    cluster.submit(3, one)
    cluster.run_until(lambda: all(s.state(3) is RequestState.SUCCESS for s in (first, late)))
    assert cluster.leader.take(3).bit_equal(one)
    first.release(3)  # rank 1 keeps the finished incarnation a while longer
    cluster.admit(3)
    first.submit(3, two)
    cluster.run_until(lambda: first.state(3).terminal)
    assert late.state(3) is RequestState.SUCCESS and len(late._early_allocations[3]) == 4  # 4 rounds held
    late.release(3)
    late.submit(3, two)
    cluster.run_until(lambda: late.state(3).terminal and cluster.leader.state(3).terminal)
    both_succeeded_and_nothing_is_held(cluster, first, late, two)


def test_an_id_admitted_again_after_the_encoder_released_it_gets_its_allocation_at_the_next_submit():
    """The language side admits an id again after the encoder engine released it (the id
    is remembered as finished there) and before the engine submits it again: the new
    allocation is kept for that submit, not dropped as a late record of the old request
    (it used to be, and the request waited for its timeout)."""
    cluster = make_cluster(default_alloc_tokens=256, language_pool_blocks=8)
    payload = random_payload(300, DIM, seed=8)
    assert cluster.transfer({3: payload})[3][0].bit_equal(payload)
    sender = cluster.senders[0]
    assert 3 in sender.retired
    cluster.admit(3)
    for _ in range(3):
        cluster.step()  # the allocation reaches the encoder before its engine submits again
    assert [a.round for a in sender._early_allocations[3]] == [0]
    cluster.submit(3, payload)
    cluster.run_until(lambda: cluster.leader.state(3).terminal and sender.state(3).terminal)
    assert sender.state(3) is RequestState.SUCCESS and cluster.leader.take(3).bit_equal(payload)
    sender.release(3)
    cluster.settle()
    assert not sender._early_allocations
    assert_no_leaks(cluster)



def test_a_first_round_that_fails_on_a_later_segment_of_its_message_stays_failed():
    """A request's first segment in a message moves it towards TRANSFERRING (all of the
    message's at once, after every segment is bound); a later segment of the same
    message that breaks the rules fails it, and it stays FAILED."""
    cluster = make_cluster()
    leader = cluster.leader
    cluster.admit(7)
    cluster.step()
    assert leader.poll(7) is RequestState.WAITING_FOR_INPUT
    channel = leader._source(leader.requests[7].peer).channel
    good = rec.Segment(7, 0, 0, 100, 300, 0)
    bad = rec.Segment(7, 0, 100, 100, 300, 5)  # says another mrope delta than the first segment
    record = rec.Transfer(src_rank=0, dst_rank=-1, message=0, nbytes=channel.layout((100, 100)).nbytes,
                          segments=(good, bad))
    assert channel.add(record) is None
    leader.progress()  # binds the message's segments (its data never comes)
    assert leader.poll(7) is RequestState.FAILED
    assert "delta" in leader.error(7)


def test_a_message_already_sent_lands_in_the_pump_that_posts_its_receive():
    """A receive whose send was posted first completes as it is posted (here the loopback
    always does): the message lands in that same step, not the next one."""
    cluster = make_cluster()
    leader, sender = cluster.leader, cluster.senders[0]
    payload = random_payload(100, DIM, seed=1)
    cluster.admit(1)
    cluster.submit(1, payload)
    leader.progress()  # the allocation goes out
    sender.progress()  # packed and sent (nobody receives yet); its TRANSFER goes out
    assert leader.state(1) is RequestState.WAITING_FOR_INPUT
    leader.progress()  # the TRANSFER: receive posted, completed at once, unpacked
    assert leader.state(1) is RequestState.SUCCESS
    assert leader.take(1).bit_equal(payload)
    cluster.settle()
    assert_no_leaks(cluster)


def test_handed_back_requests_answer_from_plain_tuples_the_collector_stops_tracking():
    """After take() and release(), state(), error() and arrived() still answer (from the
    bounded memory of finished requests), and what that memory holds is no longer walked
    by Python's garbage collector: a Request kept there per request would be."""
    import gc

    cluster = make_cluster(default_alloc_tokens=256, language_pool_blocks=8)
    payload = random_payload(300, DIM, seed=9)
    assert cluster.transfer({5: payload})[5][0].bit_equal(payload)
    leader, sender = cluster.leader, cluster.senders[0]
    cluster.admit(6)
    leader.abort(6, "not wanted")
    cluster.run_until(lambda: leader.state(6).terminal)
    leader.release(6)
    gc.collect()
    for endpoint, request_id in ((leader, 5), (sender, 5), (leader, 6)):
        kept = endpoint.retired[request_id]
        assert type(kept) is tuple and not gc.is_tracked(kept), (endpoint.role, request_id)
    assert leader.state(5) is RequestState.SUCCESS and sender.state(5) is RequestState.SUCCESS
    assert leader.arrived(5) == (300, 300) and leader.error(5) is None
    assert leader.state(6) is RequestState.FAILED and "not wanted" in leader.error(6)
    assert leader.arrived(6) == (0, None)
    with pytest.raises(ValueError, match="already taken or released"):
        leader.take(5)


@pytest.mark.parametrize("language_tp", [1, 2])
def test_arrived_counts_each_row_once_and_never_goes_back(language_tp):
    """arrived() on every language rank, step by step, through rounds of 8 of a 20-token
    request: the rows in the outputs never exceed N and never go back while it is in
    flight (a round read was counted twice until the next round started), and a failed
    rank whose outputs are gone says 0."""
    cluster = make_cluster(Topology(1, 1, language_tp), block_size=8, default_alloc_tokens=8, language_pool_blocks=8)
    cluster.admit(1)
    cluster.step()  # the default allocation goes out before the encoder side knows N: rounds of 8
    cluster.submit(1, random_payload(20, DIM, seed=3))
    seen = {r.rank: [] for r in cluster.receivers.values()}
    while cluster.leader.state(1) is not RequestState.SUCCESS:
        cluster.step()
        for receiver in cluster.receivers.values():
            seen[receiver.rank].append(receiver.arrived(1)[0])
    for rank, rows in seen.items():
        assert all(0 <= n <= 20 for n in rows) and rows == sorted(rows), (rank, rows)
        assert any(0 < n < 20 for n in rows), (rank, rows)  # a round's rows showed before the last
    for receiver in cluster.receivers.values():
        cluster.run_until(lambda r=receiver: r.state(1) is RequestState.SUCCESS)
        assert receiver.arrived(1) == (20, 20)
        receiver.take(1)
    cluster.settle()
    cluster.admit(2)
    cluster.submit(2, random_payload(20, DIM, seed=4))
    cluster.run_until(lambda: cluster.leader.arrived(2)[0] > 0)
    cluster.leader.abort(2, "not wanted")
    assert cluster.leader.state(2) is RequestState.FAILED and cluster.leader.arrived(2) == (0, 20)
    cluster.run_until(lambda: all(r.state(2).terminal for r in cluster.receivers.values()))
    for receiver in cluster.receivers.values():
        receiver.release(2)
    cluster.settle()
    assert_no_leaks(cluster)
