"""What the Sender and the Receiver share: the progress loop, liveness, timeouts, logs."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from embxfer.control import records as rec
from embxfer.control.deadlines import check_seconds

from .bus import Bus
from .config import Config
from .payload import Payload, RowSpec
from .state import RequestState, Stats
from .topology import Topology
from .transport import Transport

log = logging.getLogger("embxfer")

MAX_REQUEST_ID = (1 << 63) - 1
# Finished requests are remembered (bounded) so that state queries stay answerable and
# late records for them are recognised as late rather than as unknown.
FINISHED_MEMORY = 4096


def check_request_id(request_id: int) -> int:
    if isinstance(request_id, bool) or not isinstance(request_id, int) or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request_id={request_id!r}: expected an integer in 0..2**63-1")
    return request_id


@dataclass(eq=False)
class Request:
    """Bookkeeping of one request on one rank (fields used by one side only are marked)."""

    request_id: int
    engine: int
    state: RequestState = RequestState.BOOTSTRAPPING
    total_tokens: int | None = None
    mrope_delta: int = 0
    sent_tokens: int = 0  # encoder: tokens scheduled; language: tokens received and read
    round: int = -1  # current (language) or last sent (encoder) round number
    blocks: list[int] = field(default_factory=list)
    allocated_tokens: int = 0
    resumes: int = 0
    error: str | None = None
    reason: rec.AbortReason | None = None
    admitted_at: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    # encoder side
    payload: Payload | None = None
    addresses: tuple[int, ...] | None = None  # the payload's row addresses (CUDA pack)
    pending_resume: rec.Resume | None = None
    cached: bool = False
    # language side
    engine_admitted: bool = False  # this rank's engine called admit() (a follower may learn first)
    expected_tokens: int | None = None
    content_hash: bytes | None = None
    block_array: np.ndarray | None = None
    round_tokens: int = 0  # tokens of the current round: min(remaining, allocated)
    round_accepted: int = 0  # of them, announced in messages this rank accepted
    round_landed: int = 0  # of them, unpacked into the landing blocks
    outputs: object | None = None
    output_addresses: tuple[int, ...] | None = None  # the outputs' row addresses (CUDA read-out)
    output_bytes: int = 0
    acks: set[int] = field(default_factory=set)
    round_read: bool = False
    resume_due: bool = False

    @property
    def failed(self) -> bool:
        return self.state is RequestState.FAILED


class Endpoint:
    """Base of Sender and Receiver. Subclasses implement `_on_record`, `_pump`,
    `_on_peer_dead` and `_fail_cleanup`."""

    role = "endpoint"

    def __init__(
        self,
        *,
        config: Config,
        topology: Topology,
        rank: int,
        bus: Bus,
        transport: Transport,
        dim: int,
        dtype: torch.dtype = torch.bfloat16,
        deepstack_layers: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        topology.check_rank(rank)
        self.config = config
        self.topology = topology
        self.rank = rank
        self.bus = bus
        self.transport = transport
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.spec = RowSpec(dim, deepstack_layers, dtype, device)
        self.requests: dict[int, Request] = {}
        self.retired: OrderedDict[int, Request] = OrderedDict()  # terminal and handed back
        self.stats = Stats()
        self.metrics = None  # set by embxfer.runtime.metrics when an engine asks for metrics
        self.channels: dict = {}  # peer rank -> SendChannel / RecvChannel (set by subclasses)
        self.dead_peers: dict[int, str] = {}
        self.in_flight = 0  # requests not finished (kept as a count: busy is asked every loop)
        # Ids finished since the last finished() call; bounded, for engines that never ask.
        self._just_finished: deque[int] = deque(maxlen=16 * FINISHED_MEMORY)
        self._next_liveness = 0.0
        self._closed = False
        # What connect() made for this endpoint (transport, bus, groups), closed with it.
        self.membership = None
        self.resources: list = []

    # -- public ---------------------------------------------------------------
    def state(self, request_id: int) -> RequestState:
        """The request's state, without doing any work (cheap; see `progress`)."""
        return self._lookup(check_request_id(request_id)).state

    def poll(self, request_id: int) -> RequestState:
        """Make progress, then return the request's state. Idempotent: prefer one
        `progress()` per loop iteration and `finished()`."""
        self.progress()
        return self.state(request_id)

    def error(self, request_id: int) -> str | None:
        return self._lookup(request_id).error

    def finished(self) -> list[int]:
        """Ids that turned SUCCESS or FAILED since the last call, in the order they did."""
        done = list(self._just_finished)
        self._just_finished.clear()
        return done

    def progress(self) -> bool:
        """One non-blocking step: liveness, incoming records, data movement, outgoing
        records. True if anything happened."""
        if self._closed:
            return False
        now = time.monotonic()
        if now >= self._next_liveness:
            self._next_liveness = now + self.config.heartbeat_interval_s
            self._check_liveness(now)
        worked = False
        for record in self.bus.drain():
            self._on_record(record)
            worked = True
        worked |= self._pump()
        for channel in list(self.channels.values()):
            for peer, why in channel.take_errors():
                if peer not in self.dead_peers:
                    self._peer_lost(peer, why)
        self.bus.flush()
        return worked

    def wait(self, timeout: float) -> None:
        """Park until a record may have arrived or `timeout` passed (idle loops)."""
        check_seconds("timeout", timeout)
        self.bus.wait(timeout)

    @property
    def busy(self) -> bool:
        """Anything in flight: a request not finished, or a transfer not retired."""
        return self.in_flight > 0 or any(not c.idle for c in self.channels.values())

    def snapshot_stats(self) -> dict[str, int]:
        """Counters for an engine's metrics; data-plane figures come from the channels,
        records the bus dropped (malformed, forged) count as rejected."""
        stats = self.stats
        stats.blocks_in_use = self._blocks_in_use()
        stats.messages = sum(c.messages for c in self.channels.values())
        stats.bytes = sum(c.bytes for c in self.channels.values())
        stats.discarded_segments = sum(c.discarded for c in self.channels.values())
        stats.in_flight = self.in_flight
        return {**stats.as_dict(), "rejected_records": stats.rejected_records + self.bus.rejected + self.bus.spoofed}

    def close(self) -> None:
        """Stop, then tear down what `connect()` made for this endpoint (transport, control
        bus, embxfer's groups). Idempotent. Requests still in flight are not waited for:
        peers see this rank leave and fail them."""
        if self._closed:
            return
        self._closed = True
        for part in self.resources:
            try:
                if part is self.membership:
                    part.close(gone=self.dead_peers)  # the dead will never say they left
                else:
                    part.close()
            except Exception as exc:  # tear everything down even if one part is broken
                log.warning("rank=%d: closing %s: %s", self.rank, type(part).__name__, exc)
        self.resources = []

    def barrier(self, timeout_s: float = 60.0) -> None:
        """Wait until every rank of embxfer's world calls `barrier` (before `close()`, so no
        rank leaves while a peer still needs it). Liveness keeps beating meanwhile; needs an
        endpoint made by `connect()`. TimeoutError naming who is missing."""
        if self.membership is None:
            raise RuntimeError("barrier(): this endpoint was not made by embxfer.connect()")
        self.bus.flush()
        self.membership.groups.barrier(check_seconds("timeout_s", timeout_s, positive=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- shared machinery -------------------------------------------------------
    def _blocks_in_use(self) -> int:
        return 0

    def _add(self, request: Request) -> Request:
        self.requests[request.request_id] = request
        self.stats.requests += 1
        self.in_flight += 1
        return request

    def _finished_request(self, request_id: int) -> Request | None:
        """The request `release` acts on: None for an unknown or released id, ValueError for
        one still in flight (both sides alike)."""
        request = self.requests.get(check_request_id(request_id))
        if request is not None and not request.state.terminal:
            raise ValueError(f"request_id={request_id}: release() needs a finished request, it is "
                             f"{request.state.value} (abort() it first)")
        return request

    def _lookup(self, request_id: int) -> Request:
        request = self.requests.get(request_id) or self.retired.get(request_id)
        if request is None:
            raise KeyError(f"request {request_id} is not known on rank {self.rank} ({self.role})")
        return request

    def _set_state(self, request: Request, state: RequestState, why: str = "") -> None:
        """The one place a transition happens (and is logged)."""
        if request.state is state:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rank=%d role=%s request=%d %s -> %s%s", self.rank, self.role, request.request_id,
                      request.state.value, state.value, f" ({why})" if why else "")
        request.state = state
        request.last_progress = time.monotonic()
        if state.terminal:
            self.in_flight -= 1
            if request.engine_admitted:  # else reported when this rank's engine admits it
                self._just_finished.append(request.request_id)
            if state is RequestState.SUCCESS:
                self.stats.succeeded += 1
            else:
                self.stats.failed += 1
            if self.metrics is not None:
                self.metrics.finished(self, request)

    def _retire(self, request: Request) -> None:
        """Move a terminal request to the bounded memory of finished ones."""
        self.requests.pop(request.request_id, None)
        self.retired[request.request_id] = request
        while len(self.retired) > FINISHED_MEMORY:
            self.retired.popitem(last=False)

    def _fail(self, request: Request, reason: rec.AbortReason, message: str, *, notify: bool) -> None:
        """Turn a request FAILED (once), free what this rank may free, tell peers if asked."""
        if request.state.terminal:
            return
        message = rec.clip_message(message)  # one text: this rank's error, its log, and what peers get
        request.error = f"{reason.name.lower()}: {message}"
        request.reason = reason
        self._set_state(request, RequestState.FAILED, request.error)
        log.warning("rank=%d role=%s request=%d failed: %s", self.rank, self.role, request.request_id,
                    request.error)
        if reason is rec.AbortReason.USER:
            self.stats.aborted += 1
        if notify:
            self._publish(
                rec.Abort(
                    request_id=request.request_id, reason=reason, message=message,
                    src_rank=self.rank, dst_rank=-1,
                )
            )
        self._fail_cleanup(request)

    def _publish(self, record: rec.Record) -> None:
        self.bus.publish(record)

    def _check_liveness(self, now: float) -> None:
        for rank, why in self.bus.dead_ranks().items():
            if rank not in self.dead_peers:
                self._peer_lost(rank, why)
        timeout = self.config.request_timeout_s
        for request in list(self.requests.values()):
            if request.state.terminal or not self._timeout_applies(request):
                continue
            if now - request.last_progress > timeout:
                self._fail(
                    request, rec.AbortReason.TIMEOUT,
                    f"no progress for {now - request.last_progress:.1f}s in {request.state.value} "
                    f"(request_timeout_s={timeout})",
                    notify=True,
                )

    def _timeout_applies(self, request: Request) -> bool:
        return True

    def _peer_lost(self, rank: int, why: str) -> None:
        self.dead_peers[rank] = why
        log.error("rank=%d role=%s peer rank %d is dead: %s", self.rank, self.role, rank, why)
        self.bus.forget(rank)
        self._on_peer_dead(rank, why)

    # -- subclass hooks ---------------------------------------------------------
    def _on_record(self, record: rec.Record) -> None:
        raise NotImplementedError

    def _pump(self) -> bool:
        raise NotImplementedError

    def _on_peer_dead(self, rank: int, why: str) -> None:
        raise NotImplementedError

    def _fail_cleanup(self, request: Request) -> None:
        raise NotImplementedError
