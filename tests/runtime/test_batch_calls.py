"""A step's requests in one call: `admit_many`, `submit_many`, `take_many`, `release_many`.

Each does what the one-request call does for every id, in order (the lifecycle tables of
docs/integration.md check them cell by cell in tests/runtime/test_docs_example.py); here:
a batch is checked whole before any of it acts, so a bad entry names itself and leaves
nothing behind, and a batch moves the same bytes as the calls one by one.
"""

from __future__ import annotations

import pytest

from embxfer import Config, LocalCluster, RequestState, Topology
from embxfer.runtime.local import random_payload

DIM = 32


def make_cluster(language_tp: int = 1) -> LocalCluster:
    config = Config(block_size=16, default_alloc_tokens=64, language_pool_blocks=64, staging_bytes=1 << 14)
    return LocalCluster(Topology(1, 1, language_tp), config, dim=DIM)


def known(endpoint, request_id: int) -> bool:
    try:
        endpoint.state(request_id)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("language_tp", [1, 2])
def test_a_batch_moves_what_the_calls_one_by_one_move(language_tp: int) -> None:
    cluster = make_cluster(language_tp)
    payloads = {rid: random_payload(n, DIM, seed=rid) for rid, n in zip(range(10, 20), [1, 5, 16, 17, 64, 65, 100,
                                                                                        3, 40, 200], strict=True)}
    ids = list(payloads)
    for receiver in cluster.receivers.values():
        receiver.admit_many(ids[:5], encoder_engine=0)
        for rid in ids[5:]:
            receiver.admit(rid, encoder_engine=0)
    sender = cluster.senders[0]
    sender.submit_many([(rid, payloads[rid]) for rid in ids[::2]])
    for rid in ids[1::2]:
        sender.submit(rid, payloads[rid])
    cluster.run_until(lambda: all(r.state(rid) is RequestState.SUCCESS for r in cluster.receivers.values()
                                  for rid in ids))
    for receiver in cluster.receivers.values():
        taken = receiver.take_many(ids[3:])
        assert [receiver.take(rid).bit_equal(payloads[rid]) for rid in ids[:3]] == [True] * 3
        assert [payload.bit_equal(payloads[rid]) for rid, payload in zip(ids[3:], taken, strict=True)] == [True] * 7
    cluster.settle()
    assert cluster.blocks_in_use() == {rank: 0 for rank in cluster.blocks_in_use()}


@pytest.mark.parametrize("bad, why", [
    (-1, "request_ids[2]: request_id=-1: expected an integer in 0..2**63-1"),
    (True, "request_ids[2]: request_id=True: expected an integer in 0..2**63-1"),
    ("7", "request_ids[2]: request_id='7': expected an integer in 0..2**63-1"),
    (1, "request_ids[2]=1: repeated in the batch"),
    (99, "request_ids[2]=99: already admitted and BOOTSTRAPPING"),
])
def test_admit_many_checks_every_id_before_admitting_any(bad, why: str) -> None:
    cluster = make_cluster()
    rx = cluster.leader
    rx.admit(99)
    with pytest.raises(ValueError) as error:
        rx.admit_many([1, 2, bad, 3])
    assert str(error.value).startswith(why)
    assert [known(rx, rid) for rid in (1, 2, 3)] == [False, False, False]
    cluster.step()
    assert rx._blocks_in_use() == 4  # 99's default allocation (64 tokens, blocks of 16) alone
    rx.admit_many([1, 2, 3])  # the same ids, once they are good: admitted
    assert all(known(rx, rid) for rid in (1, 2, 3))


def test_admit_many_rejects_what_is_not_a_batch() -> None:
    rx = make_cluster().leader
    for bad in (5, "123", b"12", None):
        with pytest.raises(ValueError, match="request_ids: expected a sequence of request ids"):
            rx.admit_many(bad)
    with pytest.raises(ValueError, match="encoder_engine=3: expected 0..0"):
        rx.admit_many([1], encoder_engine=3)
    assert rx.requests == {}
    rx.admit_many([])  # an empty step: nothing to do
    assert rx.requests == {}


def test_a_peer_engine_that_is_not_in_the_fixed_layout_is_refused_on_both_sides() -> None:
    """In a fixed layout no other engine can come: an index or name outside it is a
    ValueError naming the field, and nothing is queued (a submit to language engine 7 used
    to wait in BOOTSTRAPPING for ever)."""
    cluster = make_cluster()
    rx, tx = cluster.leader, cluster.senders[0]
    payload = random_payload(4, DIM)
    for call in (lambda: tx.submit(1, payload, language_engine=7),
                 lambda: tx.submit_many([(1, payload)], language_engine=1),
                 lambda: tx.announce(1, 4, language_engine=3),
                 lambda: tx.lost_peer(language_engine=2)):
        with pytest.raises(ValueError, match=r"language_engine=\d: expected 0..0"):
            call()
    with pytest.raises(ValueError, match=r"language_engine='language3': not an engine of this layout"):
        tx.submit(1, payload, language_engine="language3")
    with pytest.raises(ValueError, match=r"encoder_engine='encoder1': not an engine of this layout"):
        rx.admit(1, encoder_engine="encoder1")
    assert tx.requests == {} and rx.requests == {} and not tx.busy
    tx.submit(1, payload, language_engine="language0")
    rx.admit(1, encoder_engine="encoder0")
    cluster.run_until(lambda: rx.state(1) is RequestState.SUCCESS)
    assert rx.take(1).bit_equal(payload)


def test_transfer_admits_and_takes_on_the_first_language_engine_of_several() -> None:
    cluster = LocalCluster(Topology(languages=2), Config(staging_bytes=1 << 16), dim=DIM)
    payloads = {rid: random_payload(8 + rid, DIM, seed=rid) for rid in range(3)}
    taken = cluster.transfer(payloads)
    assert all(copies[0].bit_equal(payloads[rid]) and len(copies) == 1 for rid, copies in taken.items())
    assert all(not e.busy for e in cluster.endpoints)


def test_a_follower_that_heard_first_takes_admit_many_as_its_engines_admission() -> None:
    cluster = make_cluster(language_tp=2)
    leader, follower = cluster.receivers.values()
    payload = random_payload(40, DIM, seed=1)
    leader.admit_many([1, 2])
    cluster.senders[0].submit_many([(1, payload), (2, payload)])
    cluster.run_until(lambda: leader.state(1) is RequestState.SUCCESS and leader.state(2) is RequestState.SUCCESS)
    follower.finished()  # the engine ignores ids it has not admitted
    follower.admit_many([2, 1])
    assert sorted(follower.finished()) == [1, 2]
    assert all(p.bit_equal(payload) for p in follower.take_many([1, 2]))
    with pytest.raises(ValueError, match=r"request_ids\[0\]=1: already taken or released"):
        follower.take_many([1])


def test_submit_many_checks_every_pair_before_queuing_any() -> None:
    cluster = make_cluster()
    tx = cluster.senders[0]
    good = random_payload(8, DIM, seed=1)
    wide = random_payload(8, DIM * 2, seed=2)
    tx.submit(50, good)
    cases = [
        ([(1, good), (2, wide)], "submits[1]: payload.embeddings: D=64, expected 32"),
        ([(1, good), (1, good)], "submits[1]=1: repeated in the batch"),
        ([(1, good), (50, good)], "submits[1]: request_id=50: already submitted and BOOTSTRAPPING"),
        ([(1, good), [2, good]], "submits[1]: expected a (request_id, embxfer.Payload) pair"),
        ([(1, good), (2, "payload")], "submits[1]: expected a (request_id, embxfer.Payload) pair"),
        ([(1, good), (-2, good)], "submits[1]: request_id=-2: expected an integer"),
    ]
    for batch, why in cases:
        with pytest.raises(ValueError) as error:
            tx.submit_many(batch)
        assert str(error.value).startswith(why), str(error.value)
        assert not known(tx, 1) and not known(tx, 2)
    with pytest.raises(ValueError, match="submits: expected a sequence of"):
        tx.submit_many(good)
    tx.submit_many([(1, good), (2, good)])
    assert tx.state(1) is tx.state(2) is RequestState.BOOTSTRAPPING


def test_take_many_takes_nothing_unless_it_can_take_everything() -> None:
    cluster = make_cluster()
    rx, tx = cluster.leader, cluster.senders[0]
    payload = random_payload(30, DIM, seed=3)
    rx.admit_many([1, 2, 3])
    tx.submit_many([(1, payload), (2, payload)])  # 3 never comes
    cluster.run_until(lambda: rx.state(1) is RequestState.SUCCESS and rx.state(2) is RequestState.SUCCESS)
    with pytest.raises(ValueError, match=r"request_ids\[2\]=3: take\(\) needs state SUCCESS, it is WAITING_FOR_INPUT"):
        rx.take_many([1, 2, 3])
    with pytest.raises(KeyError, match="request 4 is not known"):
        rx.take_many([1, 4])
    with pytest.raises(ValueError, match=r"request_ids\[1\]=1: repeated in the batch"):
        rx.take_many([1, 1])
    assert rx.state(1) is rx.state(2) is RequestState.SUCCESS  # nothing was taken
    assert all(p.bit_equal(payload) for p in rx.take_many([2, 1]))
    assert rx.output_bytes == 0


@pytest.mark.parametrize("encoder_lane", [False, True])
def test_release_many_releases_nothing_unless_it_can_release_everything(encoder_lane: bool, monkeypatch) -> None:
    """A step's finished ids in one call, on the object path and from the encoder lane
    (a batch of 8 or more enters it): an id still in flight, repeated or not an id names
    itself and nothing is released; then every finished id, SUCCESS or FAILED, is forgotten
    (its id may be submitted again), an unknown or released one is nothing to do."""
    from embxfer.runtime import sender as sender_module

    monkeypatch.setattr(sender_module, "LANE_ENABLED", encoder_lane)
    cluster = make_cluster()
    rx, tx = cluster.leader, cluster.senders[0]
    assert (tx._lane is not None) is encoder_lane
    ids = list(range(1, 11))
    payloads = {rid: random_payload(10 + rid, DIM, seed=rid) for rid in ids}
    rx.admit_many(ids[:9])  # 10 is never admitted: it stays in flight on the encoder side
    tx.submit_many(list(payloads.items()))
    tx.abort(9, "the vision model failed")
    cluster.run_until(lambda: all(tx.state(r).terminal for r in ids[:9]))
    with pytest.raises(ValueError, match=r"request_ids\[2\]: request_id=10: release\(\) needs a finished request"):
        tx.release_many([1, 2, 10])
    with pytest.raises(ValueError, match=r"request_ids\[1\]=1: repeated in the batch"):
        tx.release_many([1, 1])
    with pytest.raises(ValueError, match=r"request_ids\[0\]"):
        tx.release_many([-1])
    assert [tx.state(r) for r in ids[:9]] == [RequestState.SUCCESS] * 8 + [RequestState.FAILED]  # nothing released
    if encoder_lane:  # the eight that succeeded are still rows (the abort and the check made 9 and 10 objects)
        assert len(tx._lane.rows) == 8
    tx.release_many([*ids[:9], 12345])
    if encoder_lane:
        assert len(tx._lane.rows) == 0
    assert [tx.state(r) for r in ids[:9]] == [RequestState.SUCCESS] * 8 + [RequestState.FAILED]  # (as remembered)
    assert all(r not in tx.requests for r in ids[:9]) and tx.state(10) is RequestState.BOOTSTRAPPING
    tx.release_many(ids[:9])  # released already: nothing to do
    taken = rx.take_many(ids[:8])
    assert all(p.bit_equal(payloads[rid]) for rid, p in zip(ids[:8], taken, strict=True))
    rx.release(9)
    rx.admit_many([1])  # an id released on both sides is a new request
    tx.submit_many([(1, payloads[1])])
    cluster.run_until(lambda: rx.state(1) is RequestState.SUCCESS)
    assert rx.take(1).bit_equal(payloads[1])
