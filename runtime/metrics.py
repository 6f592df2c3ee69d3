"""Prometheus metrics of embxfer endpoints: `Metrics` (a custom collector) and `Metrics.serve`.

What it measures, and where each figure comes from:

- Counters and gauges the endpoints keep anyway (`Endpoint.snapshot_stats()`, the
  receiver's queues, pool and `PayloadCache`) are read **at scrape time** by the
  collector: nothing is copied, and nothing costs while nobody scrapes.
- Per-request figures that no counter keeps (admit->SUCCESS latency, resumes per
  request, failures by reason) are recorded when a request finishes:
  `Endpoint._set_state` calls `Metrics.finished(endpoint, request)` once per SUCCESS or
  FAILED. That is one dict look-up, two `bisect` calls and a handful of integer
  increments into fixed buckets, on the engine's own thread, without a lock.

Threads: the HTTP exporter calls `collect()` from its own thread while the engine loop
runs. Every value it reads is a plain int (or float) that one thread writes; under the
GIL a scrape sees each value whole, but not necessarily all of them from the same
instant (a histogram's `_sum` may be one observation ahead of its buckets). Its
`_count` is always the sum of its buckets.

Usage (one `Metrics` per process, for any number of its endpoints)::

    from embxfer.runtime.metrics import Metrics
    metrics = Metrics([endpoint])            # attaches: endpoint.metrics = metrics
    server = metrics.serve(9400)             # http://127.0.0.1:9400/metrics
    ...                                      # the engine loop, unchanged
    server.close(); metrics.detach(endpoint)

An engine that already exports Prometheus metrics registers the collector in its own
registry instead (`its_registry.register(metrics)`), or serves `metrics.exposition()`
from its own HTTP handler. `metrics.registry` is a `CollectorRegistry` of this object's
own: embxfer never registers anything in prometheus_client's global default registry.

prometheus_client is an optional dependency (`pip install embxfer[metrics]`); the
runtime never imports it, and this module only when a `Metrics` is made.

Every metric has the labels `role` (`encoder` or `language`), `engine` (the engine's name)
and `tp_rank` (the endpoint's TP rank in its engine). Figures are per rank: the TP ranks of one engine each count
the same requests (take the leader's, or `max`, per engine rather than a sum), while
tokens, bytes and messages are what each rank itself moved (an encoder TP rank that
serves no language rank moves nothing). Latency runs from the moment the request
became known on that rank (`admit` on the language leader, the leader's decision or
`admit` on a follower, `submit` on an encoder rank) to SUCCESS.

The names (each one's HELP line says what it counts; extra labels in brackets):

    counters    embxfer_requests_total, embxfer_requests_finished_total[outcome],
                embxfer_requests_failed_total[reason], embxfer_requests_cached_total,
                embxfer_tokens_total, embxfer_bytes_total, embxfer_messages_total,
                embxfer_rounds_total, embxfer_resumes_total, embxfer_discarded_segments_total,
                embxfer_records_dropped_total[kind], embxfer_security_dropped_total[kind],
                embxfer_cache_{hits,misses,evictions}_total
    gauges      embxfer_requests_in_flight, embxfer_requests_waiting_for_blocks[queue],
                embxfer_blocks_in_use, embxfer_pool_blocks, embxfer_output_bytes,
                embxfer_cache_bytes, embxfer_cache_entries, embxfer_cache_capacity_bytes
    histograms  embxfer_request_latency_seconds, embxfer_request_resumes

(pool, queue, output and cache figures exist on language ranks only).
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from embxfer.control.records import AbortReason

from .state import RequestState

if TYPE_CHECKING:
    from .endpoint import Endpoint, Request

log = logging.getLogger("embxfer.metrics")

INSTALL_HINT = "pip install 'embxfer[metrics]'"

# Seconds from admission (language side) or submission (encoder side) to SUCCESS: a
# cached hit takes well under a millisecond, a multi-GB payload through resumes seconds.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# Resume rounds of one request: 0 is the exact or default allocation that sufficed.
RESUME_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

REASONS: tuple[AbortReason, ...] = tuple(AbortReason)


def require_prometheus_client() -> Any:
    """The prometheus_client module, or an ImportError that names the extra to install."""
    try:
        import prometheus_client as client
    except ImportError as exc:
        raise ImportError(
            f"embxfer metrics need the prometheus_client package: {INSTALL_HINT}"
        ) from exc
    return client


@dataclass
class _Histogram:
    """Fixed buckets, filled by `Metrics.finished`: `counts[i]` holds the observations v
    with bounds[i-1] < v <= bounds[i], the last one those above every bound (+Inf).
    Cumulated only at scrape time."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def cumulative(self, format_bound) -> tuple[list[tuple[str, int]], float]:
        counts = list(self.counts)  # one snapshot, so _count equals the +Inf bucket
        total = self.total
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            buckets.append((format_bound(bound), running))
        return buckets, total


@dataclass
class _EndpointFigures:
    """What `finished()` records for one endpoint."""

    labels: list[str]
    latency: _Histogram
    resumes: _Histogram
    failed: dict[AbortReason | None, int] = field(default_factory=dict)


class Metrics:
    """Metrics of the endpoints attached to it, as a prometheus_client custom collector.

    `Metrics(endpoints)` attaches each (see `attach`). Raises ImportError naming the extra
    when prometheus_client is not installed.
    """

    def __init__(
        self,
        endpoints: Iterable[Endpoint] = (),
        *,
        latency_buckets_s: Sequence[float] = LATENCY_BUCKETS_S,
        resume_buckets: Sequence[float] = RESUME_BUCKETS,
    ) -> None:
        client = require_prometheus_client()
        for name, bounds in (("latency_buckets_s", latency_buckets_s), ("resume_buckets", resume_buckets)):
            if not bounds or list(bounds) != sorted(set(bounds)):
                raise ValueError(f"{name}={tuple(bounds)}: expected strictly increasing bucket bounds")
        self.latency_bounds = tuple(float(b) for b in latency_buckets_s)
        self.resume_bounds = tuple(float(b) for b in resume_buckets)
        self._figures: dict[Endpoint, _EndpointFigures] = {}
        self._attach_lock = threading.Lock()
        self.registry = client.CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        for endpoint in endpoints:
            self.attach(endpoint)

    # -- endpoints -------------------------------------------------------------------
    def attach(self, endpoint: Endpoint) -> Metrics:
        """Record `endpoint`'s finished requests and report its counters. ValueError if
        another `Metrics` is attached to it already."""
        with self._attach_lock:
            current = endpoint.metrics
            if current is self:
                return self
            if current is not None:
                raise ValueError(f"{endpoint.me.describe()}: another Metrics is attached already "
                                 "(one Metrics may serve every endpoint of a process)")
            self._figures[endpoint] = _EndpointFigures(
                labels=[endpoint.role, endpoint.engine, str(endpoint.tp_rank)],
                latency=_Histogram(self.latency_bounds),
                resumes=_Histogram(self.resume_bounds),
            )
            endpoint.metrics = self
        return self

    def detach(self, endpoint: Endpoint) -> None:
        """Stop recording and reporting `endpoint` (its series disappear from scrapes)."""
        with self._attach_lock:
            if endpoint.metrics is self:
                endpoint.metrics = None
            self._figures.pop(endpoint, None)

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._figures)

    # -- the hot path: once per finished request --------------------------------------
    def finished(self, endpoint: Endpoint, request: Request) -> None:
        """Called by the endpoint when `request` turns SUCCESS or FAILED."""
        figures = self._figures.get(endpoint)
        if figures is None:
            return
        if request.state is RequestState.SUCCESS:
            # _Histogram.observe, inlined: this runs once per request in the engine's loop.
            latency, resumes = figures.latency, figures.resumes
            elapsed = time.monotonic() - request.admitted_at
            latency.counts[bisect_left(latency.bounds, elapsed)] += 1
            latency.total += elapsed
            resumes.counts[bisect_left(resumes.bounds, request.resumes)] += 1
            resumes.total += request.resumes
        else:
            reason = request.reason
            figures.failed[reason] = figures.failed.get(reason, 0) + 1

    # -- scrape time -------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        """The prometheus_client collector protocol: every metric family, read now."""
        out = _Families()
        for endpoint, figures in list(self._figures.items()):
            own = figures.labels
            stats = endpoint.snapshot_stats()
            spoofed = getattr(endpoint.bus, "spoofed", 0)

            out.counter("embxfer_requests", "Requests started on this rank (admitted, submitted, or learned "
                        "from the TP leader).", own, stats["requests"])
            for outcome in ("succeeded", "failed"):
                out.counter("embxfer_requests_finished", "Requests that finished, by outcome.", own, stats[outcome],
                            outcome=outcome)
            failed = dict(figures.failed)
            for reason in (*REASONS, None):
                if reason is None and None not in failed:
                    continue
                out.counter("embxfer_requests_failed", "Requests that failed, by reason (the abort reason).", own,
                            failed.get(reason, 0), reason="unknown" if reason is None else reason.name.lower())
            out.counter("embxfer_requests_cached", "Requests served from the language side's payload cache "
                        "(no transfer).", own, stats["cached"])
            out.counter("embxfer_tokens", "Tokens moved: received and read (language), sent (encoder).", own,
                        stats["tokens"])
            out.counter("embxfer_bytes", "Bytes of staging messages moved through this rank's channels.", own,
                        stats["bytes"])
            out.counter("embxfer_messages", "Staging messages moved through this rank's channels.", own,
                        stats["messages"])
            out.counter("embxfer_rounds", "Transfer rounds (the first one and every resume).", own, stats["rounds"])
            out.counter("embxfer_resumes", "Resume rounds.", own, stats["resumes"])
            out.counter("embxfer_discarded_segments", "Segments of staging messages received and discarded "
                        "(their request had finished or was unknown).", own, stats["discarded_segments"])
            for kind, value in (("rejected", stats["rejected_records"] - spoofed), ("spoofed", spoofed),
                                ("late", stats["late_records"])):
                out.counter("embxfer_records_dropped", "Control records dropped: rejected (malformed, corrupt, "
                            "inconsistent), spoofed (wrong sender), late (for a finished request or an old "
                            "round).", own, value, kind=kind)
            for kind in ("forged_values", "refused_pairs", "frames_malformed", "frames_forged", "frames_replayed",
                         "connections_refused"):
                out.counter("embxfer_security_dropped", "What came from outside and was dropped: rendezvous "
                            "values failing verification, data pairs whose peer did not prove the job's secret, "
                            "link frames malformed, forged or replayed, link connections refused.", own,
                            stats[kind], kind=kind)

            out.gauge("embxfer_requests_in_flight", "Requests started and not finished.", own, stats["in_flight"])
            out.gauge("embxfer_blocks_in_use", "Blocks of this rank's pool in use.", own, stats["blocks_in_use"])
            if hasattr(endpoint, "cache"):
                _collect_receiver(out, endpoint, own)

            out.histogram("embxfer_request_latency_seconds", "Seconds from admission (language) or submission "
                          "(encoder) to SUCCESS.", own, figures.latency)
            out.histogram("embxfer_request_resumes", "Resume rounds per request that succeeded.", own,
                          figures.resumes)
        yield from out.families.values()

    def exposition(self) -> bytes:
        """The text exposition of this object's registry (for an engine's own HTTP handler)."""
        return require_prometheus_client().generate_latest(self.registry)

    # -- HTTP ---------------------------------------------------------------------------
    def serve(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve `registry` over HTTP on `addr:port` from a daemon thread (prometheus_client's
        `start_http_server`); port 0 picks a free one (`.port` tells which). Loopback by
        default: pass the node's own address for a Prometheus elsewhere."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port={port!r}: expected an integer in 0..65535")
        started = require_prometheus_client().start_http_server(port, addr=addr, registry=self.registry)
        server, thread = started if isinstance(started, tuple) else (None, None)
        if server is None and port == 0:
            log.warning("prometheus_client < 0.20 does not say which port it picked for port 0")
        return MetricsServer(server, thread, addr, port)


def _collect_receiver(out: _Families, receiver: Any, own: list[str]) -> None:
    """A Receiver's pool, queues, outputs and cache."""
    out.gauge("embxfer_pool_blocks", "Blocks of this rank's pool.", own, receiver.allocator.num_blocks)
    # list() copies a deque in one step under the GIL; iterating it live could race the engine.
    waiting = {
        "admission": sum(r.state is RequestState.BOOTSTRAPPING for r in list(receiver._admission)),
        "resume": sum(r.resume_due and not r.state.terminal for r in list(receiver._resume_waiting)),
    }
    for queue, value in waiting.items():
        out.gauge("embxfer_requests_waiting_for_blocks", "Requests the TP leader holds until pool blocks are "
                  "free: admissions (first allocation) and resumes.", own, value, queue=queue)
    out.gauge("embxfer_output_bytes", "Bytes of outputs this rank holds for requests not yet taken.", own,
              receiver.output_bytes)
    cache = receiver.cache.stats()
    for kind in ("hits", "misses", "evictions"):
        out.counter(f"embxfer_cache_{kind}", f"Payload cache {kind} (content-hash reuse).", own,
                    cache[f"cache_{kind}"])
    out.gauge("embxfer_cache_bytes", "Bytes of payloads held in the cache.", own, cache["cache_bytes"])
    out.gauge("embxfer_cache_entries", "Payloads held in the cache.", own, cache["cache_entries"])
    out.gauge("embxfer_cache_capacity_bytes", "The cache's bound in bytes (0: off).", own,
              receiver.cache.capacity_bytes)


class _Families:
    """The metric families of one scrape, each made on first use."""

    def __init__(self) -> None:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        self._makers = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                        "histogram": HistogramMetricFamily}
        self._format_bound = floatToGoString
        self.families: dict[str, Any] = {}

    def _family(self, kind: str, name: str, doc: str, extra: Iterable[str]) -> Any:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = self._makers[kind](name, doc, labels=["role", "engine", "tp_rank", *extra])
        return family

    def counter(self, name: str, doc: str, own: list[str], value: float, **extra: str) -> None:
        self._family("counter", name, doc, extra).add_metric([*own, *extra.values()], value)

    def gauge(self, name: str, doc: str, own: list[str], value: float, **extra: str) -> None:
        self._family("gauge", name, doc, extra).add_metric([*own, *extra.values()], value)

    def histogram(self, name: str, doc: str, own: list[str], histogram: _Histogram) -> None:
        buckets, total = histogram.cumulative(self._format_bound)
        self._family("histogram", name, doc, ()).add_metric(own, buckets, total)


class MetricsServer:
    """The running HTTP exporter. `close()` stops it and frees the port (prometheus_client
    >= 0.20; older versions keep serving until the process exits)."""

    def __init__(self, server: Any, thread: threading.Thread | None, addr: str, port: int) -> None:
        self._server = server
        self._thread = thread
        self._closed = False
        self.addr = addr
        self.port: int = server.server_address[1] if server is not None else port

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is None:
            log.warning("this prometheus_client cannot stop its HTTP server (needs >= 0.20); it serves "
                        "until the process exits")
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
