"""embxfer.runtime.metrics: what an operator scrapes reflects what happened; the exporter
serves and closes; the runtime needs no prometheus_client; `embxfer demo --metrics-port`."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from embxfer.runtime.config import Config
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.topology import Topology
from tests.procs import shm_entries, start_demo, unique_prefix

pytestmark = pytest.mark.timeout(120)
needs_client = pytest.mark.skipif(importlib.util.find_spec("prometheus_client") is None,
                                  reason="needs prometheus_client (pip install embxfer[metrics])")
DIM = 32


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, through prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, rank: int, **labels: str) -> float:
    """The sample of rank `rank` of the one-encoder, language-TP-2 layout."""
    role, engine, tp_rank = ("encoder", "encoder0", 0) if rank == 0 else ("language", "language0", rank - 1)
    return samples[(name, frozenset({"role": role, "engine": engine, "tp_rank": str(tp_rank), **labels}.items()))]


def make_cluster(**config) -> LocalCluster:
    return LocalCluster(Topology(1, 1, 2), Config(default_alloc_tokens=1024, **config), dim=DIM)


def finish(cluster: LocalCluster, rid: int) -> None:
    cluster.run_until(lambda: all(s.terminal for s in cluster.states(rid)) and cluster.senders[0].state(rid).terminal)


@needs_client
def test_counters_and_histograms_follow_what_happened():
    from embxfer.runtime.metrics import Metrics

    cluster = make_cluster()
    metrics = Metrics(cluster.endpoints)
    # Into 1024-token first allocations: 3000 and 1025 tokens take one resume each (the
    # remainder fits the pool), 100 none.
    lengths = {1: 3000, 2: 100, 3: 1025}
    cluster.transfer({rid: random_payload(n, DIM, seed=rid) for rid, n in lengths.items()})
    # A failure: the language engine aborts a request before the encoder has its payload.
    cluster.admit(9)
    cluster.leader.abort(9)
    for _ in range(3):  # the abort reaches the encoder, which will fail the submit at once
        cluster.step()
    cluster.submit(9, random_payload(700, DIM, seed=9))
    finish(cluster, 9)
    for endpoint in cluster.endpoints:
        endpoint.release(9)
    cluster.settle()

    samples = parse(metrics.exposition().decode())
    for rank in (0, 1, 2):
        assert value(samples, "embxfer_requests_total", rank) == 4
        assert value(samples, "embxfer_requests_finished_total", rank, outcome="succeeded") == 3
        assert value(samples, "embxfer_requests_finished_total", rank, outcome="failed") == 1
        assert value(samples, "embxfer_requests_failed_total", rank, reason="user") == 1
        for reason in ("timeout", "peer_dead", "invalid", "budget", "shutdown", "internal"):
            assert value(samples, "embxfer_requests_failed_total", rank, reason=reason) == 0
        assert value(samples, "embxfer_tokens_total", rank) == sum(lengths.values())
        assert value(samples, "embxfer_resumes_total", rank) == 2
        assert value(samples, "embxfer_rounds_total", rank) == 5
        assert value(samples, "embxfer_messages_total", rank) > 0
        assert value(samples, "embxfer_bytes_total", rank) > 0
        assert value(samples, "embxfer_requests_in_flight", rank) == 0
        assert value(samples, "embxfer_blocks_in_use", rank) == 0
        # resumes per successful request: 0, 1, 1 (the aborted one is not observed)
        resumes = {le: value(samples, "embxfer_request_resumes_bucket", rank, le=le)
                   for le in ("0.0", "1.0", "2.0", "+Inf")}
        assert resumes == {"0.0": 1, "1.0": 3, "2.0": 3, "+Inf": 3}
        assert value(samples, "embxfer_request_resumes_count", rank) == 3
        assert value(samples, "embxfer_request_resumes_sum", rank) == 2
        assert value(samples, "embxfer_request_latency_seconds_count", rank) == 3
        assert value(samples, "embxfer_request_latency_seconds_bucket", rank, le="+Inf") == 3
        assert 0 < value(samples, "embxfer_request_latency_seconds_sum", rank) < 60
        for kind in ("rejected", "spoofed"):
            assert value(samples, "embxfer_records_dropped_total", rank, kind=kind) == 0
    for rank in (1, 2):
        assert value(samples, "embxfer_pool_blocks", rank) == cluster.config.language_pool_blocks
        assert value(samples, "embxfer_output_bytes", rank) == 0
        for queue in ("admission", "resume"):
            assert value(samples, "embxfer_requests_waiting_for_blocks", rank, queue=queue) == 0
    cluster.close()


@needs_client
def test_gauges_show_a_request_waiting_for_blocks():
    from embxfer.runtime.metrics import Metrics

    cluster = make_cluster(language_pool_blocks=8)  # exactly one default allocation
    metrics = Metrics(cluster.endpoints)
    for rid in (1, 2):
        cluster.admit(rid)
    cluster.step()
    samples = parse(metrics.exposition().decode())
    assert value(samples, "embxfer_requests_waiting_for_blocks", 1, queue="admission") == 1
    assert value(samples, "embxfer_blocks_in_use", 1) == 8
    assert value(samples, "embxfer_requests_in_flight", 1) == 2
    # Through a pool of one allocation, 3000 tokens take two resumes (1024 + 1024 + 952).
    cluster.submit(1, random_payload(3000, DIM, seed=1))
    cluster.submit(2, random_payload(100, DIM, seed=2))
    for rid in (1, 2):
        finish(cluster, rid)
    samples = parse(metrics.exposition().decode())
    assert value(samples, "embxfer_request_resumes_bucket", 1, le="1.0") == 1
    assert value(samples, "embxfer_request_resumes_bucket", 1, le="2.0") == 2
    assert value(samples, "embxfer_requests_waiting_for_blocks", 1, queue="admission") == 0
    cluster.close()


@needs_client
def test_cache_hits_misses_and_cached_requests():
    from embxfer.runtime.metrics import Metrics

    cluster = make_cluster(cache_bytes=1 << 20)
    metrics = Metrics(cluster.endpoints)
    payload = random_payload(500, DIM, seed=5)
    for rid in (1, 2):  # the same content twice: a miss, then a hit without a transfer
        for receiver in cluster.receivers.values():
            receiver.admit(rid, 0, content_hash=b"image-5")
        cluster.submit(rid, payload)
        finish(cluster, rid)
        for receiver in cluster.receivers.values():
            receiver.take(rid)
        cluster.senders[0].release(rid)
    cluster.settle()
    samples = parse(metrics.exposition().decode())
    for rank in (0, 1, 2):
        assert value(samples, "embxfer_requests_cached_total", rank) == 1
        assert value(samples, "embxfer_messages_total", rank) == 1
    for rank in (1, 2):
        assert value(samples, "embxfer_cache_hits_total", rank) == 1
        assert value(samples, "embxfer_cache_entries", rank) == 1
        assert value(samples, "embxfer_cache_bytes", rank) > 0
        assert value(samples, "embxfer_cache_capacity_bytes", rank) == 1 << 20
    assert value(samples, "embxfer_cache_misses_total", 1) == 1  # the leader decides
    cluster.close()


@needs_client
def test_every_counter_equals_snapshot_stats_on_both_sides():
    """Served from the cache, aborted, resumed, completed: on every rank of both sides, each
    counter the metrics show is the snapshot_stats() key it comes from."""
    from embxfer.runtime.metrics import Metrics

    cluster = make_cluster(cache_bytes=1 << 20)
    metrics = Metrics(cluster.endpoints)
    payload = random_payload(2500, DIM, seed=9)
    for rid in (1, 2):  # a miss, then a hit
        for receiver in cluster.receivers.values():
            receiver.admit(rid, 0, content_hash=b"same")
        cluster.submit(rid, payload)
        finish(cluster, rid)
    for receiver in cluster.receivers.values():
        receiver.admit(3, 0)
    cluster.leader.abort(3)
    cluster.settle()
    samples = parse(metrics.exposition().decode())
    pairs = {"embxfer_requests_total": "requests", "embxfer_requests_cached_total": "cached",
             "embxfer_tokens_total": "tokens", "embxfer_bytes_total": "bytes", "embxfer_messages_total": "messages",
             "embxfer_rounds_total": "rounds", "embxfer_resumes_total": "resumes",
             "embxfer_discarded_segments_total": "discarded_segments"}
    for rank, endpoint in enumerate([cluster.senders[0], *cluster.receivers.values()]):
        stats = endpoint.snapshot_stats()
        for metric, key in pairs.items():
            assert value(samples, metric, rank) == stats[key], (rank, metric)
        for outcome in ("succeeded", "failed"):
            assert value(samples, "embxfer_requests_finished_total", rank, outcome=outcome) == stats[outcome]
        for kind in ("forged_values", "refused_pairs", "frames_malformed", "frames_forged", "frames_replayed",
                     "connections_refused"):
            assert value(samples, "embxfer_security_dropped_total", rank, kind=kind) == stats[kind] == 0
        assert value(samples, "embxfer_requests_cached_total", rank) == 1  # the hit, encoder side too


@needs_client
def test_http_exporter_answers_on_a_free_port_and_closes():
    from embxfer.runtime.metrics import Metrics

    cluster = make_cluster()
    metrics = Metrics(cluster.endpoints)
    cluster.transfer({1: random_payload(2000, DIM, seed=1)})
    with metrics.serve(0) as server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as response:
            assert response.status == 200
            samples = parse(response.read().decode())
        assert value(samples, "embxfer_requests_finished_total", 1, outcome="succeeded") == 1
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)
    server.close()  # idempotent
    cluster.close()


@needs_client
def test_attach_once_detach_and_bucket_validation():
    from embxfer.runtime.metrics import Metrics

    cluster = make_cluster()
    metrics = Metrics(cluster.endpoints)
    assert all(e.metrics is metrics for e in cluster.endpoints)
    assert metrics.attach(cluster.leader) is metrics  # again: nothing changes
    with pytest.raises(ValueError, match="another Metrics"):
        Metrics([cluster.leader])
    metrics.detach(cluster.senders[0])
    assert cluster.senders[0].metrics is None
    cluster.transfer({1: random_payload(100, DIM, seed=1)})
    samples = parse(metrics.exposition().decode())
    assert value(samples, "embxfer_request_latency_seconds_count", 1) == 1
    assert not any(dict(labels).get("role") == "encoder" for _, labels in samples)
    for bad in ([], [1.0, 0.5], [1.0, 1.0]):
        with pytest.raises(ValueError, match="latency_buckets_s"):
            Metrics(latency_buckets_s=bad)
    with pytest.raises(ValueError, match="port"):
        metrics.serve(70000)
    cluster.close()


WITHOUT_CLIENT = """
import sys
sys.modules["prometheus_client"] = None  # any import of it now raises ImportError
import embxfer
from embxfer.runtime import api, cli, demo, metrics, receiver, sender  # noqa: F401
from embxfer.runtime.config import Config
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.topology import Topology

cluster = LocalCluster(Topology(1, 1, 2), Config(default_alloc_tokens=1024), dim=32)
taken = cluster.transfer({1: random_payload(2000, 32, seed=1)})
assert len(taken[1]) == 2
try:
    metrics.Metrics(cluster.endpoints)
except ImportError as exc:
    print("ImportError:", exc)
else:
    raise SystemExit("Metrics() worked without prometheus_client")
"""


def test_runtime_works_without_prometheus_client():
    result = subprocess.run([sys.executable, "-c", WITHOUT_CLIENT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'embxfer[metrics]'" in result.stdout


def test_demo_rejects_a_bad_metrics_port_in_one_line():
    result = subprocess.run([sys.executable, "-m", "embxfer", "demo", "--metrics-port", "0"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--metrics-port" in lines[0], result.stderr


def consecutive_free_ports(count: int) -> int:
    """A port P such that P .. P+count-1 are free now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            if base + count > 65535:
                continue
            others = [socket.socket() for _ in range(count - 1)]
            try:
                for offset, sock in enumerate(others, start=1):
                    sock.bind(("127.0.0.1", base + offset))
                return base
            except OSError:
                continue
            finally:
                for sock in others:
                    sock.close()
    raise RuntimeError("no run of free ports")


def scrape(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return parse(response.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


@needs_client
@pytest.mark.timeout(90)
def test_demo_serves_metrics_while_it_runs(tmp_path):
    """Layout 1/1/2: the encoder is rank 0 (PORT), the language leader rank 1 (PORT+1). A
    pool of 16 blocks (2048 tokens) makes the 3000-token requests resume, also when the
    encoder side has announced their size (an allocation is capped by the pool)."""
    port = consecutive_free_ports(3)
    prefix = unique_prefix()
    path = tmp_path / "demo.json"
    run = start_demo("--requests", "4", "--lengths", "3000,100", "--dim", "64", "--default-alloc-tokens", "1024",
                     "--language-pool-blocks", "16", "--timeout", "60", "--json", str(path), "--metrics-port",
                     str(port), "--metrics-linger", "3", prefix=prefix)
    leader_url, encoder_url = f"http://127.0.0.1:{port + 1}/metrics", f"http://127.0.0.1:{port}/metrics"
    final = encoder = None
    deadline = time.monotonic() + 75
    while run.process.poll() is None and time.monotonic() < deadline:
        samples = scrape(leader_url)
        if samples and value(samples, "embxfer_requests_finished_total", 1, outcome="succeeded") == 4:
            final = samples
            encoder = scrape(encoder_url)
            break
        time.sleep(0.1)
    code, out, err = run.finish(timeout=60)
    assert code == 0, err[-3000:]
    assert "4/4 requests verified" in out
    assert final is not None, "the language leader's metrics never showed 4 requests succeeded"
    totals = json.loads(path.read_text())["totals"]
    assert totals["resumes"] > 0 and value(final, "embxfer_resumes_total", 1) == totals["resumes"]
    assert value(final, "embxfer_tokens_total", 1) == totals["tokens"]
    assert value(final, "embxfer_request_latency_seconds_count", 1) == 4
    assert value(final, "embxfer_blocks_in_use", 1) == 0
    assert encoder is not None and value(encoder, "embxfer_requests_finished_total", 0, outcome="succeeded") == 4
    assert scrape(leader_url) is None  # closed with the demo
    assert not shm_entries(prefix)
