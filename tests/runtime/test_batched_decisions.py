"""A follower applies a DECISIONS record's runs in batches (`Receiver._apply_decisions`);
each entry one by one (`Receiver._apply_decision`, which holds every rule) must give the
same result. Random streams of decisions, sensible and not (repeats, gaps, blocks another
request holds, completions at rows never read), go to two identical followers, one of
them batch by batch, the other entry by entry; after every record the two agree on every
request's state, round and blocks, on the allocator and on the counters.
"""

from __future__ import annotations

import random

import pytest

from embxfer.control import records as rec
from embxfer.runtime import Config
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.topology import Topology

POOL_BLOCKS = 16
BLOCK = 128
A = rec.DecisionAction


def follower() -> object:
    config = Config(block_size=BLOCK, default_alloc_tokens=4 * BLOCK, language_pool_blocks=POOL_BLOCKS,
                    staging_bytes=1 << 14)
    return LocalCluster(Topology(1, 1, 2), config, dim=16).receivers[2]


def snapshot(receiver) -> dict:
    requests = {rid: (r.state, r.round, tuple(r.blocks), r.resumes, r.error)
                for rid, r in sorted(receiver.requests.items())}
    stats = receiver.stats
    return {"requests": requests, "retired": sorted(receiver.retired),
            "in_use": bytes(receiver.allocator._in_use), "free": receiver.allocator.num_free,
            "counters": (stats.late_records, stats.rejected_records, stats.succeeded, stats.failed, stats.resumes,
                         receiver.in_flight)}


def random_entry(rng: random.Random, rounds: dict[int, int], previous: list[tuple]) -> tuple:
    if previous and rng.random() < 0.15:
        return rng.choice(previous)  # a repeated entry
    request_id = rng.randrange(1, 9)
    round_ = rounds.get(request_id, -1)
    kind = rng.random()
    blocks = rng.sample(range(POOL_BLOCKS), rng.randint(1, 3))
    if kind < 0.4:
        entry = (request_id, 0, A.ADMIT, 0, 0, BLOCK * len(blocks), 0, b"", blocks)
        rounds.setdefault(request_id, 0)
    elif kind < 0.55:
        next_round = max(round_, 0) + rng.choice((0, 1, 1, 2))
        entry = (request_id, next_round, A.RESUME, 0, 0, BLOCK * len(blocks), 0, b"", blocks)
        rounds[request_id] = max(round_, next_round)
    elif kind < 0.9:
        total = 0 if rng.random() < 0.8 else rng.randint(1, 500)  # nothing is read here: 0 completes
        entry = (request_id, max(round_, 0), A.COMPLETE, total, total, 0, 0, b"", [])
    else:
        entry = (request_id, max(round_, 0), A.FAIL, 0, 0, 0, 0, b"", [])
    previous.append(entry)
    return entry


@pytest.mark.parametrize("seed", range(40))
def test_batched_decisions_do_what_one_by_one_does(seed: int) -> None:
    rng = random.Random(seed)
    batched, single = follower(), follower()
    rounds: dict[int, int] = {}
    previous: list[tuple] = []
    for _ in range(60):
        if rng.random() < 0.3:  # this rank's engine admits an id (before or after its decision)
            request_id = rng.randrange(1, 9)
            for receiver in (batched, single):
                try:
                    receiver.admit(request_id)
                except ValueError:
                    pass  # already admitted here: the same on both
        items = [random_entry(rng, rounds, previous) for _ in range(rng.randint(1, 6))]
        try:
            record = rec.decode(rec.encode(rec.Decisions.of(1, items)), rec.UNBOUNDED)
        except (ValueError, rec.RecordError):
            continue  # a record that cannot be encoded reaches no one
        batched._on_record(record)
        for decision in record.decisions():
            single._apply_decision(decision)
        assert snapshot(batched) == snapshot(single)
        assert batched.finished() == single.finished()


def encoder() -> tuple[LocalCluster, object]:
    config = Config(block_size=BLOCK, default_alloc_tokens=4 * BLOCK, language_pool_blocks=POOL_BLOCKS,
                    staging_bytes=1 << 14)
    cluster = LocalCluster(Topology(1, 1, 1), config, dim=16)
    return cluster, cluster.senders[0]


def encoder_snapshot(sender) -> dict:
    requests = {rid: (r.state, r.round, r.sent_tokens, r.resumes, r.error, r.payload is None)
                for rid, r in sorted(sender.requests.items())}
    queued = [(c.request.request_id, c.round, c.start, c.count) for p in sender.peers.values() if p.channel
              for c in p.channel.queue]
    stats = sender.stats
    return {"requests": requests, "queued": queued, "in_flight": sender.in_flight,
            "counters": (stats.late_records, stats.rejected_records, stats.succeeded, stats.failed, stats.rounds,
                         stats.resumes, stats.tokens)}


@pytest.mark.parametrize("seed", range(40))
def test_batched_allocations_and_completions_do_what_one_by_one_does(seed: int) -> None:
    """The encoder side's batched ALLOCATIONS and COMPLETIONS (`Sender._on_allocations`,
    `_on_completions`) against their per-entry rules (`_on_resume`, `_on_completion`), on
    random streams built from the requests' state (right, off by one, repeated)."""
    rng = random.Random(seed)
    (cluster_a, batched), (cluster_b, single) = encoder(), encoder()
    leader = cluster_a.leader.rank
    assert leader == cluster_b.leader.rank
    for request_id in range(1, 9):
        payload = random_payload(rng.randint(50, 1200), 16, seed=request_id)
        batched.submit(request_id, payload)
        single.submit(request_id, payload)
    previous: list[tuple] = []
    for _ in range(60):
        allocations = rng.random() < 0.6
        rows = []
        for _ in range(rng.randint(1, 6)):
            if previous and rng.random() < 0.15:
                rows.append(rng.choice(previous))
                continue
            request = single.requests.get(rng.randrange(1, 9))
            if request is None:
                continue
            if allocations:
                round_ = max(0, request.round + rng.choice((1, 1, 1, 0, 2)))
                sent = request.sent_tokens if rng.random() < 0.85 else request.sent_tokens + 1
                allocated = BLOCK * rng.randint(1, 4) + (0 if rng.random() < 0.9 else 1)
                row = (request.request_id, round_, sent, allocated)
            else:
                total = request.total_tokens if rng.random() < 0.8 else request.total_tokens + 1
                sent = request.sent_tokens if rng.random() < 0.8 else total
                row = (request.request_id, max(request.round, 0), sent, total, 0)
            rows.append(row)
            previous.append(row)
        rows = [r for r in rows if len(r) == (4 if allocations else 5)]
        if not rows:
            continue
        kind = rec.Allocations if allocations else rec.Completions
        record = rec.decode(rec.encode(kind.of(leader, batched.rank, rows)), rec.UNBOUNDED)
        batched._on_record(record)
        view = single.directory.view_of(record.src_rank)
        for item in record.items():
            (single._on_resume if allocations else single._on_completion)(item, view)
        assert encoder_snapshot(batched) == encoder_snapshot(single)
        assert batched.finished() == single.finished()
