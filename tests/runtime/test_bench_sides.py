"""bench/pipeline.py's per-engine host time (`time_engine_calls`), on the CPU."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from embxfer.runtime import Config
from embxfer.runtime.endpoint import Endpoint
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.pool import BlockPool
from embxfer.runtime.topology import Topology

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import pipeline  # noqa: E402 - bench/pipeline.py
import views  # noqa: E402 - bench/views.py


def test_each_engines_timed_calls_fit_in_the_wall_time_and_change_nothing():
    """Both sides are charged, what they are charged fits in the wall time of the run (a
    call timed twice, or a side charged for the other's work, would overflow it on a run
    that is all engine calls), and the payloads still arrive bit for bit."""
    cluster = LocalCluster(Topology(1, 1, 2), Config(block_size=16, default_alloc_tokens=32,
                                                     language_pool_blocks=64), dim=16)
    spent = pipeline.time_engine_calls(cluster)
    payloads = {rid: random_payload(8 + 5 * rid, 16, seed=rid) for rid in range(6)}
    started = time.perf_counter()
    taken = cluster.transfer(payloads)
    wall = time.perf_counter() - started
    assert all(copy.bit_equal(payloads[rid]) for rid, copies in taken.items() for copy in copies)
    assert len(taken) == 6 and all(len(copies) == 2 for copies in taken.values())
    assert spent["encoder"] > 0 and spent["language"] > 0
    assert spent["encoder"] + spent["language"] <= wall
    # wrapped on the instance only: the class's method is the endpoint's own
    assert "progress" in vars(cluster.leader) and type(cluster.leader).progress is Endpoint.progress


def test_a_call_made_inside_a_timed_call_is_not_timed_again():
    class Engine:  # a language-side stand-in whose progress() calls its own state()
        def progress(self) -> bool:
            self.state(0)
            time.sleep(0.02)
            return True

        def state(self, request_id: int) -> str:
            time.sleep(0.02)
            return "SUCCESS"

    class Cluster:
        endpoints = [Engine()]

    cluster = Cluster()
    spent = pipeline.time_engine_calls(cluster)
    started = time.perf_counter()
    cluster.endpoints[0].progress()
    wall = time.perf_counter() - started
    assert 0.04 <= spent["language"] <= wall and spent["encoder"] == 0.0
    cluster.endpoints[0].state(0)  # on its own, it is timed
    assert spent["language"] >= 0.06


def test_the_host_yardstick_is_a_best_of_several_and_finite():
    import math

    one, best = pipeline.host_yardstick(rounds=1), pipeline.host_yardstick(rounds=9)
    assert math.isfinite(one) and math.isfinite(best) and 0 < best
    # the best of nine rounds of the same work is not slower than one round by much
    # (a round is about 0.3 ms on the 2-core VM; a stall can only make rounds slower)
    assert best <= 3 * one


def test_the_view_benchmark_cuts_the_same_views_every_way(tmp_path):
    """bench/views.py: each way makes one view per request of the shape and at the place the
    runtime's outputs have (`BlockPool.empty_rows_together`), and its JSON holds a cost per way."""
    made = {name: cut() for name, cut in views.ways("cpu").items()}
    k, n = views.REQUESTS, views.TOKENS
    for name, cut in made.items():
        assert len(cut) == k, name
        if "mrope" in name:
            assert all(v.shape == (3, n) and v.is_contiguous() for v in cut), name
            base = cut[0].data_ptr()
            assert [v.data_ptr() - base for v in cut] == [i * 3 * n * 4 for i in range(k)], name
        else:
            assert all(v.shape[0] == n for v in cut), name
    assert views.main(["--device", "cpu", "--number", "2", "--json", str(tmp_path / "views-{device}.json")]) == 0
    result = json.loads((tmp_path / "views-cpu.json").read_text())
    assert set(result["us_per_view"]) == set(made) and all(v > 0 for v in result["us_per_view"].values())
    assert set(result["us_per_allocation"]) == set(views.allocations("cpu"))
    assert all(v > 0 for v in result["us_per_allocation"].values())


def test_the_one_buffer_outputs_are_the_shipped_outputs_shapes_apart_in_one_allocation():
    """bench/views.py's single-buffer way: each field has the shape, dtype and contiguity of
    `BlockPool.empty_rows`' own, and the three lie apart inside one buffer (writing one
    changes nothing of another)."""
    pool = BlockPool(2, 16, 64, torch.bfloat16)
    for n in (1, 7, 1024):
        shipped = pool.empty_rows(n)
        made = views.one_buffer(n, 64, "cpu")
        for mine, theirs in zip(made, shipped[:3], strict=True):
            assert (mine.shape, mine.dtype, mine.is_contiguous()) == (theirs.shape, theirs.dtype, True)
        assert len({t.untyped_storage().data_ptr() for t in made}) == 1
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in made)
        assert all(end <= start for (_, end), (start, _) in zip(spans[:-1], spans[1:], strict=True))
        assert spans[-1][1] - spans[0][0] <= made[0].untyped_storage().nbytes()
        made[1].fill_(-1)
        made[2].fill_(-2)
        made[0].view(torch.int16).fill_(7)
        assert (made[1] == -1).all() and (made[2] == -2).all()
