"""Deadlines of requests: `request_timeout_s` (no progress in flight) and
`admission_timeout_s` (an encoder request no language engine allocates for)."""

from __future__ import annotations

import time

import pytest

from embxfer.runtime import Config
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.state import RequestState
from embxfer.runtime.topology import Topology
from tests.runtime.test_aborts import DIM, assert_healthy_afterwards


def cluster_for(language_tp: int = 1, pool_blocks: int = 64, **config) -> LocalCluster:
    config = Config(block_size=128, default_alloc_tokens=1024, language_pool_blocks=pool_blocks,
                    staging_bytes=1 << 14, heartbeat_interval_s=0.01, **config)
    return LocalCluster(Topology(1, 1, language_tp), config, dim=DIM)


def step_for(cluster: LocalCluster, seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        cluster.step()
        time.sleep(0.002)


@pytest.mark.parametrize("language_tp", [1, 2])
def test_a_submit_nobody_admits_fails_after_admission_timeout_and_its_late_admit_fails_at_once(language_tp):
    # request_timeout_s far below the admission deadline: waiting for admission is
    # backpressure, which only admission_timeout_s bounds
    cluster = cluster_for(language_tp, request_timeout_s=0.02, admission_timeout_s=0.5)
    sender = cluster.senders[0]
    sender.submit(5, random_payload(700, DIM, seed=5))
    step_for(cluster, 0.1)
    assert sender.poll(5) is RequestState.BOOTSTRAPPING
    step_for(cluster, 0.5)
    assert sender.poll(5) is RequestState.FAILED
    assert sender.error(5).startswith("timeout: no allocation from the language side for ")
    assert "(admission_timeout_s=0.5)" in sender.error(5)
    assert sender.requests[5].payload is None  # the payload is no longer held
    assert 5 in sender.finished()
    cluster.admit(5)  # the router's late admission: every language rank knows it failed
    for receiver in cluster.receivers.values():
        assert receiver.poll(5) is RequestState.FAILED
        assert "admission_timeout_s=0.5" in receiver.error(5)
    for endpoint in cluster.endpoints:
        endpoint.release(5)
    assert_healthy_afterwards(cluster)


@pytest.mark.parametrize("language_tp", [1, 2])
def test_a_request_queued_for_blocks_past_the_admission_deadline_fails_on_both_sides(language_tp):
    cluster = cluster_for(language_tp, pool_blocks=8, admission_timeout_s=0.5)  # one default allocation
    sender = cluster.senders[0]
    cluster.admit(1)  # holds the pool; its encoder never submits
    cluster.admit(2)
    sender.submit(2, random_payload(700, DIM, seed=2))
    step_for(cluster, 0.05)
    assert cluster.leader.poll(1) is RequestState.WAITING_FOR_INPUT
    assert cluster.leader.poll(2) is RequestState.BOOTSTRAPPING  # waiting for blocks
    step_for(cluster, 0.5)
    assert sender.poll(2) is RequestState.FAILED and "admission_timeout_s=0.5" in sender.error(2)
    for receiver in cluster.receivers.values():
        assert receiver.poll(2) is RequestState.FAILED and "admission_timeout_s=0.5" in receiver.error(2)
        assert receiver.poll(1) is RequestState.WAITING_FOR_INPUT  # not the encoder's to end
    cluster.leader.abort(1)
    cluster.settle()
    for endpoint in cluster.endpoints:
        endpoint.release(2)
        if endpoint in cluster.receivers.values():
            endpoint.release(1)
    assert_healthy_afterwards(cluster)


def test_an_allocated_request_is_not_bound_by_the_admission_deadline():
    cluster = cluster_for(admission_timeout_s=0.3)
    payload = random_payload(3000, DIM, seed=7)  # three rounds of 1024 tokens
    cluster.admit(7)
    cluster.submit(7, payload)
    cluster.step()
    step_for(cluster, 0.4)  # past the admission deadline, in flight or done
    assert cluster.senders[0].poll(7) is not RequestState.FAILED
    cluster.settle()
    assert cluster.leader.take(7).bit_equal(payload)


@pytest.mark.parametrize("language_tp", [1, 2])
def test_a_request_whose_data_never_comes_fails_after_request_timeout_on_both_sides(language_tp):
    cluster = cluster_for(language_tp, request_timeout_s=0.3)
    cluster.admit(4)
    step_for(cluster, 0.05)
    assert cluster.leader.poll(4) is RequestState.WAITING_FOR_INPUT  # blocks held, no data
    step_for(cluster, 0.4)
    for receiver in cluster.receivers.values():
        assert receiver.poll(4) is RequestState.FAILED
    assert cluster.leader.error(4).startswith("timeout: no progress for ")
    assert "in WAITING_FOR_INPUT (request_timeout_s=0.3)" in cluster.leader.error(4)
    sender = cluster.senders[0]
    sender.submit(4, random_payload(300, DIM, seed=4))  # the encoder's late submit fails at once
    assert sender.poll(4) is RequestState.FAILED and "request_timeout_s=0.3" in sender.error(4)
    for endpoint in cluster.endpoints:
        endpoint.release(4)
    assert_healthy_afterwards(cluster)
