"""The runtime's usual path leaves no reference cycles: what a transfer allocates is freed
by reference counting as soon as the engine drops it, never by a collector pass. Python's
collector then only walks the objects in flight (docs/integration.md), and an output
tensor's memory goes back to its allocator when the engine drops it, not a full
collection later."""

from __future__ import annotations

import gc
from contextlib import contextmanager

import pytest

from embxfer.runtime import Config, receiver, sender
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.topology import Topology


@contextmanager
def collector_off():
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def cyclic_garbage() -> list[str]:
    """The types of what a full pass finds unreachable now (and frees)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("lanes", [False, True], ids=["objects", "lanes"])
@pytest.mark.parametrize("topology", [Topology(), Topology(1, 1, 2), Topology(2, 1, 1)], ids=str)
def test_transfers_leave_nothing_for_the_collector(topology, lanes, device, monkeypatch):
    monkeypatch.setattr(receiver, "LANE_ENABLED", lanes)
    monkeypatch.setattr(sender, "LANE_ENABLED", lanes)
    cluster = LocalCluster(topology, Config(block_size=16, default_alloc_tokens=64, language_pool_blocks=64,
                                            staging_bytes=16 * 1024), dim=16, device=device)
    # sizes below, at and above the default allocation (resume rounds), 12 at a time so
    # that a batch enters the lanes (each batch to one encoder engine, in turn); messages
    # end inside requests at this staging
    payloads = [random_payload(n, 16, seed=n, device=device)
                for n in (5, 64, 150, 33, 64, 200, 7, 90, 16, 17, 120, 1)]
    next_id = 0

    def one_batch() -> None:
        nonlocal next_id
        batch = {next_id + i: p for i, p in enumerate(payloads)}
        next_id += len(batch)
        engines, size = topology.encoders, len(payloads)
        taken = cluster.transfer(batch, engine_of=lambda rid: rid // size % engines)
        assert all(c.bit_equal(batch[rid]) for rid, copies in taken.items() for c in copies)

    one_batch()  # warm-up: what start-up allocates once is not the steady state's
    with collector_off():
        for _ in range(3):
            one_batch()
        assert cyclic_garbage() == []
    if lanes and topology.language_tp == 1:  # (lanes are for TP-1 ranks) rows went through them
        for endpoint in (cluster.leader, *cluster.senders.values()):
            assert endpoint._lane._next_gen > 1, endpoint
    cluster.close()
