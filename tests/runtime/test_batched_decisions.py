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
from embxfer.runtime.local import LocalCluster
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
