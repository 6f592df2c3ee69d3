"""What the Sender and the Receiver share: the progress loop, liveness, timeouts, logs."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from embxfer.control import records as rec

from .allocator import BlockAllocator
from .bus import Bus
from .config import Config
from .payload import Payload
from .pool import BlockPool
from .state import RequestState, Stats
from .topology import Topology
from .transport import Transport

log = logging.getLogger("embxfer")

MAX_REQUEST_ID = (1 << 63) - 1
# Finished requests are remembered (bounded) so that poll() stays answerable and late
# records for them are recognised as late rather than as unknown.
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
    last_progress: float = field(default_factory=time.monotonic)
    # encoder side
    payload: Payload | None = None
    pending_resume: rec.Resume | None = None
    queued_chunks: int = 0
    # language side
    round_tokens: int = 0
    outputs: object | None = None
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
        pool_blocks: int,
    ) -> None:
        topology.check_rank(rank)
        self.config = config
        self.topology = topology
        self.rank = rank
        self.bus = bus
        self.transport = transport
        self.pool = BlockPool(pool_blocks, config.block_size, dim, dtype, deepstack_layers, device)
        self.allocator = BlockAllocator(pool_blocks, config.block_size)
        self.requests: dict[int, Request] = {}
        self.finished: OrderedDict[int, Request] = OrderedDict()
        self.stats = Stats()
        self.channels: dict = {}  # peer rank -> SendChannel / RecvChannel (set by subclasses)
        self.dead_peers: dict[int, str] = {}
        self._next_heartbeat = 0.0
        self._closed = False

    # -- public ---------------------------------------------------------------
    def poll(self, request_id: int) -> RequestState:
        """Make progress, then return the request's state. Cheap and idempotent."""
        self.progress()
        return self._lookup(request_id).state

    def error(self, request_id: int) -> str | None:
        return self._lookup(request_id).error

    def progress(self) -> bool:
        """One non-blocking step: liveness, incoming records, data movement. True if
        anything happened."""
        if self._closed:
            return False
        now = time.monotonic()
        worked = False
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            self.bus.heartbeat()
            self._check_liveness(now)
        for record in self.bus.drain():
            self._on_record(record)
            worked = True
        worked |= self._pump()
        for channel in self.channels.values():
            if channel.error and channel.peer not in self.dead_peers:
                self._peer_lost(channel.peer, channel.error)
        return worked

    def wait(self, timeout: float) -> None:
        """Park until a record may have arrived or `timeout` passed (idle loops)."""
        self.bus.wait(timeout)

    @property
    def busy(self) -> bool:
        """Anything in flight: a request not finished, or a transfer not retired."""
        return any(not r.state.terminal for r in self.requests.values()) or any(
            not c.idle for c in self.channels.values()
        )

    def snapshot_stats(self) -> dict[str, int]:
        """Counters for an engine's metrics; data-plane figures come from the channels,
        records the bus dropped (malformed, forged) count as rejected."""
        stats = self.stats
        stats.blocks_in_use = self.allocator.num_used
        stats.messages = sum(c.messages for c in self.channels.values())
        stats.bytes = sum(c.bytes for c in self.channels.values())
        stats.discarded_chunks = sum(getattr(c, "discarded", 0) + getattr(c, "unpacked_sends", 0)
                                     for c in self.channels.values())
        return {**stats.as_dict(), "rejected_records": stats.rejected_records + self.bus.rejected + self.bus.spoofed}

    def close(self) -> None:
        self._closed = True

    # -- shared machinery -------------------------------------------------------
    def _lookup(self, request_id: int) -> Request:
        request = self.requests.get(request_id) or self.finished.get(request_id)
        if request is None:
            raise KeyError(f"request {request_id} is not known on rank {self.rank} ({self.role})")
        return request

    def _set_state(self, request: Request, state: RequestState, why: str = "") -> None:
        """The one place a transition happens (and is logged)."""
        if request.state is state:
            return
        log.debug(
            "rank=%d role=%s request=%d %s -> %s%s",
            self.rank, self.role, request.request_id, request.state.value, state.value, f" ({why})" if why else "",
        )
        request.state = state
        request.last_progress = time.monotonic()
        if state.terminal:
            if state is RequestState.SUCCESS:
                self.stats.succeeded += 1
            else:
                self.stats.failed += 1

    def _retire(self, request: Request) -> None:
        """Move a terminal request to the bounded memory of finished ones."""
        self.requests.pop(request.request_id, None)
        self.finished[request.request_id] = request
        while len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)

    def _fail(self, request: Request, reason: rec.AbortReason, message: str, *, notify: bool) -> None:
        """Turn a request FAILED (once), free what this rank may free, tell peers if asked."""
        if request.state.terminal:
            return
        request.error = f"{reason.name.lower()}: {message}"
        self._set_state(request, RequestState.FAILED, request.error)
        log.warning("rank=%d role=%s request=%d failed: %s", self.rank, self.role, request.request_id, request.error)
        if reason is rec.AbortReason.USER:
            self.stats.aborted += 1
        if notify:
            self._publish(
                rec.Abort(
                    request_id=request.request_id, reason=reason, message=rec.clip_message(message),
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
