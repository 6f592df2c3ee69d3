"""What the Sender and the Receiver share: the progress loop, membership, liveness,
timeouts, logs.

An endpoint is one member of the job (`membership.py`): `self.rank` is its member id.
It sees the job through a `Directory`: engines by name, each name's newest incarnation,
its members by TP rank. A request is bound, when it is admitted (language side) or when
its first allocation arrives (encoder side), to one incarnation of the engine on the
other side (`Request.peer`); records about it are taken only from that incarnation's
members, and when one of them dies exactly the requests bound to it fail. Membership
changes are applied in `progress()` on the engine's thread, in this order: records first
(a peer's last records before it left are read before its absence is noticed), then
directory changes, then liveness.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from embxfer.control import records as rec
from embxfer.control.deadlines import check_seconds

from .bus import Bus
from .channels import message_tokens
from .config import Config
from .membership import (
    Change,
    Directory,
    EngineView,
    MemberInfo,
    Role,
    StaticDirectory,
    engine_name,
    state_event,
)
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
    if type(request_id) is int and 0 <= request_id <= MAX_REQUEST_ID:
        return request_id
    if isinstance(request_id, bool) or not isinstance(request_id, int) or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueError(f"request_id={request_id!r}: expected an integer in 0..2**63-1")
    return request_id


def checked_ids(request_ids: object, field: str = "request_ids") -> list[int]:
    """A batch of request ids (`admit_many`, `submit_many`, `take_many`) as a list, each an
    id, none repeated: ValueError naming the first bad one (`request_ids[i]`)."""
    if isinstance(request_ids, (str, bytes)) or not hasattr(request_ids, "__iter__"):
        raise ValueError(f"{field}: expected a sequence of request ids, got {type(request_ids).__name__}")
    ids = list(request_ids)
    seen: set[int] = set()
    for index, request_id in enumerate(ids):
        if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
            try:
                check_request_id(request_id)
            except ValueError as exc:
                raise ValueError(f"{field}[{index}]: {exc}") from None
        if request_id in seen:
            raise ValueError(f"{field}[{index}]={request_id}: repeated in the batch")
        seen.add(request_id)
    return ids


class Request:
    """Bookkeeping of one request on one rank (fields used by one side only are marked).
    A slotted class with one constructor: an engine makes one per request."""

    __slots__ = (
        "request_id", "engine", "state", "total_tokens", "mrope_delta", "sent_tokens", "round", "blocks",
        "allocated_tokens", "resumes", "error", "reason", "peer", "admitted_at", "last_progress",
        # encoder side
        "payload", "addresses", "cached",
        # language side
        "engine_admitted", "expected_tokens", "content_hash", "block_array", "round_tokens", "round_accepted",
        "round_landed", "direct", "outputs", "output_addresses", "output_bytes", "acks", "round_read", "resume_due",
        # both: what travels with the payload (items, metadata) and where the wire's rows go
        "info", "kept", "rows", "items",
        # the generation of the lane row it was made from (0: never a row; runtime/lane.py)
        "lane_gen",
    )

    def __init__(self, request_id: int, engine: str | None, *, total_tokens: int | None = None,
                 mrope_delta: int = 0, engine_admitted: bool = False, expected_tokens: int | None = None,
                 content_hash: bytes | None = None) -> None:
        now = time.monotonic()
        self.request_id = request_id
        self.engine = engine  # the other side's engine, by name (None: a follower not told yet)
        self.state = RequestState.BOOTSTRAPPING
        self.total_tokens = total_tokens
        self.mrope_delta = mrope_delta
        self.sent_tokens = 0  # encoder: tokens scheduled; language: tokens received and read
        self.round = -1  # current (language) or last sent (encoder) round number
        self.blocks: Sequence[int] = ()  # the current round's blocks (language side); () when none
        self.allocated_tokens = 0
        self.resumes = 0
        self.error: str | None = None
        self.reason: rec.AbortReason | None = None
        self.peer: EngineView | None = None  # the incarnation of `engine` this request is bound to
        self.admitted_at = self.last_progress = now
        self.payload: Payload | None = None
        self.addresses: tuple[int, ...] | None = None  # the payload's row addresses (CUDA pack)
        self.cached = False
        self.engine_admitted = engine_admitted  # this rank's engine called admit() (a follower may learn first)
        self.expected_tokens = expected_tokens
        self.content_hash = content_hash
        self.block_array: np.ndarray | None = None
        self.round_tokens = 0  # tokens of the current round: min(remaining, allocated)
        self.round_accepted = 0  # of them, announced in messages this rank accepted
        self.round_landed = 0  # of them, unpacked (into the outputs, or the landing blocks) and not read yet
        self.direct = False  # the current round lands straight in the outputs
        self.outputs = None
        self.output_addresses: tuple[int, ...] | None = None  # the outputs' row addresses (CUDA read-out)
        self.output_bytes = 0
        self.acks = 0  # leader: bit mask of the followers that read the current round
        self.round_read = False
        self.resume_due = False
        # Items and metadata (a PayloadInfo: to send, or as received); `kept`: the row
        # intervals that travel, (payload row, wire row, count), None when all do; `rows`:
        # the payload's N (the wire carries `total_tokens` of them); `items`: declared at admit.
        self.info: rec.PayloadInfo | None = None
        self.kept: list[tuple[int, int, int]] | None = None
        self.rows = total_tokens
        self.items: tuple = ()
        self.lane_gen = 0

    @property
    def failed(self) -> bool:
        return self.state is RequestState.FAILED


_STATE_OF_VALUE = {state.value: state for state in RequestState}
_LANE_STATES = tuple(RequestState)  # a lane row's state code -> its RequestState (rows.py: the same order)


class Finished(NamedTuple):
    """What a rank keeps of a request it handed back (`Endpoint.retired`, bounded): enough to
    answer `state`, `error` and `arrived` and to know a late record as late. The memory
    holds it as a plain tuple of plain values (`kept`), which the garbage collector stops
    tracking at its first pass (it does so for exact tuples only, hence no NamedTuple
    there); `_lookup` wraps one in this class when asked. A `Request` kept instead would be
    a tracked object per request living for thousands of requests, and such survivors
    are what bring Python's full collections (tens of milliseconds on the engine's
    scheduler thread) sooner."""

    value: str  # the state's value
    error: str | None
    rows: int | None  # N (rows of the payload) once known
    resumes: int

    @staticmethod
    def kept(request: Request) -> tuple:
        return (request.state._value_, request.error, request.rows, request.resumes)

    @property
    def state(self) -> RequestState:
        return _STATE_OF_VALUE[self.value]


class Endpoint:
    """Base of Sender and Receiver. Subclasses implement `_on_record`, `_pump`,
    `_on_engine_lost`, `_on_engine_usable` and `_fail_cleanup`."""

    role = "endpoint"
    my_role: Role
    # The side's lane (runtime/lane.py: its usual requests as rows), None where it has none.
    _lane = None

    def __init__(
        self,
        *,
        config: Config,
        bus: Bus,
        transport: Transport,
        dim: int,
        dtype: torch.dtype = torch.bfloat16,
        deepstack_layers: int = 0,
        device: torch.device | str = "cpu",
        directory: Directory | None = None,
        topology: Topology | None = None,
        rank: int | None = None,
    ) -> None:
        if directory is None:
            if topology is None or rank is None:
                raise ValueError("directory: expected a Directory, or a topology and a rank")
            topology.check_rank(rank)
            members = topology.members()
            directory = StaticDirectory(members[rank], members)
        self.config = config
        self.directory = directory
        self.me: MemberInfo = directory.me
        self.rank = self.me.member
        self.is_leader = self.me.tp_rank == 0  # TP rank 0 decides for its engine (asked on every path)
        self.topology = topology
        self.bus = bus
        self.transport = transport
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.spec = RowSpec(dim, deepstack_layers, dtype, device)
        message_tokens(self.spec, config.staging_bytes)  # a staging buffer holds a row: checked here, not at the first send
        self.requests: dict[int, Request] = {}
        self.retired: OrderedDict[int, tuple] = OrderedDict()  # terminal and handed back: Finished.kept
        self.stats = Stats()
        self.metrics = None  # set by embxfer.runtime.metrics when an engine asks for metrics
        self.channels: dict = {}  # peer member -> SendChannel / RecvChannel (set by subclasses)
        self.dead_peers: dict[int, str] = {}
        self.broken: str | None = None  # why this engine cannot serve any more (a TP peer is lost)
        self.draining = False
        self.in_flight = 0  # requests not finished (kept as a count: busy is asked every loop)
        # Ids finished since the last finished() call; bounded, for engines that never ask.
        self._just_finished: deque[int] = deque(maxlen=16 * FINISHED_MEMORY)
        self._next_liveness = 0.0
        self._closed = False
        self._joining: list[EngineView] = []  # incarnations not usable yet
        # Members the rendezvous says left, whose own LEFT record (behind everything else
        # they sent) has not come over the bus yet: member -> when to stop waiting for it.
        self._leaving: dict[int, float] = {}
        # What connect() made for this endpoint (transport, bus, directory), closed with it.
        self.membership = None
        self.resources: list = []
        for view in directory.incarnations.values():
            if view.state == "usable" and view.name != self.me.engine:
                self._on_engine_usable(view)
            elif view.state == "joining":
                self._joining.append(view)

    # -- public ---------------------------------------------------------------
    @property
    def engine(self) -> str:
        """This endpoint's engine, by name."""
        return self.me.engine

    @property
    def tp_rank(self) -> int:
        return self.me.tp_rank

    def engines(self, role: str | None = None) -> dict[str, str]:
        """Engines this endpoint knows, by name, with their state (joining, usable,
        draining, left, dead); `role` ("encoder" / "language") filters."""
        return {v.name: v.state for v in self.directory.current.values()
                if v.name != self.me.engine and (role is None or v.role.value == role)}

    def state(self, request_id: int) -> RequestState:
        """The request's state, without doing any work (cheap; see `progress`)."""
        lane = self._lane
        if lane is not None and lane.rows.slot_of and type(request_id) is int:
            slot = lane.rows.slot_of.get(request_id)
            if slot is not None:  # (what the engine's loop asks of every request: the row's state alone)
                return _LANE_STATES[lane.rows._columns["state"][slot]]
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
        """One non-blocking step: incoming records, membership, liveness, data movement,
        outgoing records. True if anything happened."""
        if self._closed:
            return False
        worked = False
        for record in self.bus.drain():
            self._on_record(record)
            worked = True
        changes = self.directory.poll()
        if changes:
            self._apply_changes(changes)
            worked = True
        now = time.monotonic()
        if now >= self._next_liveness:
            self._next_liveness = now + self.config.heartbeat_interval_s
            worked |= self._check_liveness(now)
        if self._joining:
            self._check_joining()
        worked |= self._pump()
        for channel in self.channels.values():
            if channel.errors:  # a transfer failed: its peer is lost (rarely: no copy otherwise)
                self._take_channel_errors()
                break
        self._emit()
        self.bus.flush()
        return worked

    def _take_channel_errors(self) -> None:
        for channel in list(self.channels.values()):
            for peer, why in channel.take_errors():
                if peer not in self.dead_peers:
                    self._peer_lost(peer, why)

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
        return {**stats.as_dict(), "rejected_records": stats.rejected_records + self.bus.rejected + self.bus.spoofed,
                **self.security_stats()}

    def security_stats(self) -> dict[str, int]:
        """What this member dropped from outside, by kind (all zero on a quiet network):
        rendezvous values that failed verification (`forged_values`), data pairs whose
        peer could not prove the secret (`refused_pairs`), and the cross-node link's
        dropped frames and refused connections."""
        store = getattr(self.directory, "store", None)
        link = getattr(self.bus, "link", None)
        frames = link.stats if link is not None else None
        return {
            "forged_values": getattr(store, "forged", 0),
            "refused_pairs": getattr(self.transport, "refused", 0),
            "frames_malformed": getattr(frames, "malformed", 0),
            "frames_forged": getattr(frames, "forged", 0),
            "frames_replayed": getattr(frames, "replayed", 0),
            "connections_refused": getattr(frames, "refused", 0),
        }

    def close(self, drain: bool = False, timeout_s: float = 60.0) -> None:
        """Leave the job and tear down what `connect()` made for this endpoint. With
        `drain`: stop taking new requests, finish those in flight (progressing until none
        is left or `timeout_s` passed), then leave; peers drop this engine without failing
        anything. Without: requests still in flight are not waited for (peers see this
        member leave and fail them). Idempotent."""
        if self._closed:
            return
        if drain:
            self.drain(timeout_s)
        self._closed = True
        self._emit()
        self._announce_state(rec.MemberState.LEFT)
        try:
            self.bus.flush()
        except Exception as exc:  # tear everything down even if one part is broken
            log.warning("member=%x: flushing the last records: %s", self.rank, exc)
        for part in self.resources:
            try:
                part.close()
            except Exception as exc:  # tear everything down even if one part is broken
                log.warning("member=%x: closing %s: %s", self.rank, type(part).__name__, exc)
        self.resources = []

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Stop taking new requests (admit/submit raise), tell peers, and progress until
        nothing is in flight or `timeout_s` passed. True when everything finished."""
        deadline = time.monotonic() + check_seconds("timeout_s", timeout_s, positive=True)
        if not self.draining:
            self.draining = True
            self._announce_state(rec.MemberState.DRAINING)
        while self._drain_pending() and time.monotonic() < deadline:
            if not self.progress():
                self.wait(0.005)
        self.bus.flush()
        left = self._drain_pending()
        if left:
            log.warning("member=%x %s: drain ended after %.1fs with %d request(s) in flight", self.rank,
                        self.me.describe(), timeout_s, self.in_flight)
        return not left

    def _drain_pending(self) -> bool:
        return self.busy

    def _announce_state(self, state: rec.MemberState) -> None:
        self._publish(rec.Member.trusted(src_rank=self.rank, state=state))
        publish = getattr(self.directory, "publish", None)
        if publish is not None:
            change = Change.DRAINING if state is rec.MemberState.DRAINING else Change.LEFT
            try:
                publish(state_event(change, self.rank), remember=change is Change.DRAINING)
            except Exception as exc:  # the rendezvous may be down; peers also have the record
                log.debug("member=%x: could not post %s at the rendezvous: %s", self.rank, change.value, exc)

    def barrier(self, timeout_s: float = 60.0) -> None:
        """Wait until every member of the engines of embxfer's one-world layout calls
        `barrier` (before `close()`, so no rank leaves while a peer still needs it).
        Liveness keeps beating meanwhile; needs an endpoint made by `connect()`.
        TimeoutError naming who is missing."""
        if self.membership is None:
            raise RuntimeError("barrier(): this endpoint was not made by embxfer.connect()")
        self.bus.flush()
        self.membership.barrier(self, check_seconds("timeout_s", timeout_s, positive=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- membership -------------------------------------------------------------
    def _apply_changes(self, changes: list) -> None:
        """Apply what the rendezvous's log said since the last call, in its order. A member
        whose DEAD or LEFT event is in the same batch (a joiner's first read holds every
        member the job ever had) is never linked: it is gone, and its end, applied below,
        is someone else's finding, not news to post or to log as this rank's error."""
        gone = {subject for change, subject, _ in changes if change is Change.DEAD or change is Change.LEFT}
        for change, subject, why in changes:
            if change is Change.JOINED:
                view = self.directory.add(subject)
                if view is None or subject.member in gone:
                    continue
                self._link(subject)
                if view not in self._joining and view.state == "joining":
                    self._joining.append(view)
            elif change is Change.DRAINING:
                self._member_state(subject, "draining")
            elif change is Change.LEFT:
                if subject != self.rank and self._reads(subject):
                    # Its records (a COMPLETE, a decision) may still be on their way: its own
                    # LEFT record comes behind them. Wait for that, or peer_timeout_s.
                    self._leaving.setdefault(subject, time.monotonic() + self.config.peer_timeout_s)
                else:
                    self._member_state(subject, "left")
            elif change is Change.DEAD and subject != self.rank and subject in self.directory.members:
                self._peer_lost(subject, why or "reported dead by a peer", reported=True)

    def _link(self, info: MemberInfo) -> None:
        """Start reading a new member's records (only members this one works with)."""
        if info.member == self.rank or not self._works_with(info):
            return
        link = getattr(self.membership, "link_member", None)
        if link is not None:
            try:
                link(info)
            except Exception as exc:  # its ring is gone already: it is dead
                self._peer_lost(info.member, f"cannot reach it: {exc}")

    def _works_with(self, info: MemberInfo) -> bool:
        return info.role != self.me.role or info.engine == self.me.engine

    def _check_joining(self) -> None:
        still = []
        for view in self._joining:
            if view.gone or view.state != "joining":
                continue
            if not view.complete or not all(self._is_linked(m) for m in view.members):
                still.append(view)
                continue
            problem = self._disagreement(view)
            if problem:
                view.state, view.why = "dead", problem
                log.error("member=%x: %s cannot work with this engine: %s", self.rank, view.describe(), problem)
                continue
            # A DRAINING that came while it joined makes it draining now: it still finishes
            # what it took, so whatever waited for its join (held allocations, a channel
            # from it) is set up as for a usable one.
            view.state = "draining" if view.drains else "usable"
            log.info("member=%x: %s is %s (incarnation %x)", self.rank, view.describe(), view.state,
                     view.incarnation)
            if view.name != self.me.engine:
                self._on_engine_usable(view)
            elif view.incarnation == self.me.incarnation:
                self._on_own_engine_usable()
        self._joining = still

    def _is_linked(self, member: int | None) -> bool:
        if member is None:
            return False
        if member == self.rank:
            return True
        info = self.directory.member(member)
        if info is None or not self._works_with(info):
            return True  # a member this one never talks to (another engine of its own role)
        linked = getattr(self.bus, "linked", None)
        return True if linked is None else linked(member)

    def _disagreement(self, view: EngineView) -> str | None:
        """Settings an engine pair must share (staging layout, row shape, block size; within
        one engine, every setting, the pool's size included: its decisions are applied by
        every TP rank)."""
        if view.role.value == self.me.role and view.name != self.me.engine:
            return None
        own = view.name == self.me.engine
        mine = dict(self.me.settings)
        others = [self.directory.member(m) for m in view.members if m is not None and m != self.rank]
        for other in others if own else others[:1]:
            for name, theirs in dict(other.settings).items():
                if name == "language_pool_blocks" and not own:
                    continue
                if name in mine and mine[name] != theirs:
                    side = f"TP rank {other.tp_rank}" if own else view.describe()
                    return (f"{name}: {side} has {theirs!r}, this rank has {mine[name]!r}; "
                            f"{'every TP rank of an engine' if own else 'both sides'} must use the same value")
        return None

    def _reads(self, member: int) -> bool:
        """True if this rank reads `member`'s records over the bus."""
        info = self.directory.member(member)
        return info is not None and self._works_with(info) and self._is_linked(member)

    def _member_state(self, member: int, state: str) -> None:
        if state == "left":
            self._leaving.pop(member, None)
        view = self.directory.mark(member, state)
        if view is None:
            if state == "left":  # another member of an engine already gone: stop reading it too
                self._forget_member(member)
            return
        log.info("member=%x: %s is %s", self.rank, view.describe(), state)
        if state == "left":
            self._forget_member(member)
            self._on_engine_lost(view, rec.AbortReason.SHUTDOWN, f"{view.describe()} left the job")

    def _forget_member(self, member: int) -> None:
        self.bus.forget(member)
        drop = getattr(self.transport, "drop", None)
        if drop is not None:
            drop(member)

    # -- shared machinery -------------------------------------------------------
    def _blocks_in_use(self) -> int:
        return 0

    def _add(self, request: Request) -> Request:
        self.requests[request.request_id] = request
        self.stats.requests += 1
        self.in_flight += 1
        return request

    def _check_open(self, verb: str) -> None:
        if self._closed:
            raise RuntimeError(f"{verb}(): this endpoint is closed")
        if self.draining:
            raise RuntimeError(f"{verb}(): {self.me.describe()} is draining and takes no new requests")

    def _finished_request(self, request_id: int) -> Request | None:
        """The request `release` acts on: None for an unknown or released id, ValueError for
        one still in flight (both sides alike)."""
        request = self.requests.get(check_request_id(request_id))
        if request is not None and not request.state.terminal:
            raise ValueError(f"request_id={request_id}: release() needs a finished request, it is "
                             f"{request.state.value} (abort() it first)")
        return request

    def _lookup(self, request_id: int) -> Request | Finished:
        lane = self._lane
        if lane is not None and lane.rows.slot_of:
            slot = lane.rows.slot_of.get(request_id)
            if slot is not None:  # read as it stands, not materialized
                return lane.finished_view(slot)
        request = self.requests.get(request_id)
        if request is None:
            kept = self.retired.get(request_id)
            if kept is not None:
                return Finished(*kept)
            raise KeyError(f"request {request_id} is not known on {self.me.describe()}")
        return request

    def _peer_name(self, role: Role, engine: str | int, field: str) -> str:
        """The name of the other side's engine `engine` (a name or an index); in a fixed
        layout it must be one of the layout's (ValueError naming `field`)."""
        name = engine_name(role, engine)
        if self.topology is not None:
            self.topology.check_peer(role, engine, field)
        return name

    def _peer_view(self, name: str) -> tuple[EngineView | None, str | None]:
        """The usable incarnation of engine `name` (None, None while it joins), or why
        requests cannot be bound to it. When the newest incarnation this member knows is
        gone, the rendezvous is asked first: the engine may have restarted a moment ago."""
        view = self.directory.engine(name)
        if view is not None and view.gone:
            sync = getattr(self.directory, "sync", None)
            if sync is not None:
                try:
                    sync()
                except Exception as exc:  # the rendezvous is down: what we know stands
                    log.debug("member=%x: could not ask the rendezvous: %s", self.rank, exc)
                self._apply_changes(self.directory.poll())
                view = self.directory.engine(name)
        if view is None or view.state == "joining":
            return None, None
        if view.gone:
            return None, view.why or f"{view.describe()} is {view.state}"
        # A draining engine still finishes what it has: the other side of a request it
        # took before draining must be able to bind to it. It refuses new ones itself.
        return view, None

    def _set_state(self, request: Request, state: RequestState, why: str = "") -> None:
        """The one place a transition happens (and is logged). A transition to a state in
        flight comes with progress its caller stamps (`last_progress`) in the same step."""
        self._set_states((request,), state, why)

    def _set_states(self, requests: Sequence[Request], state: RequestState, why: str = "") -> None:
        """`_set_state` for a step's batch of requests (one check of the log level, the
        counters moved once)."""
        debug = log.isEnabledFor(logging.DEBUG)
        changed = 0
        for request in requests:
            if request.state is state:
                continue
            if debug:
                log.debug("member=%x role=%s request=%d %s -> %s%s", self.rank, self.role, request.request_id,
                          request.state.value, state.value, f" ({why})" if why else "")
            request.state = state
            changed += 1
            if state.terminal:
                if request.engine_admitted:  # else reported when this rank's engine admits it
                    self._just_finished.append(request.request_id)
                if self.metrics is not None:
                    self.metrics.finished(self, request)
        if state.terminal and changed:
            self.in_flight -= changed
            if state is RequestState.SUCCESS:
                self.stats.succeeded += changed
            else:
                self.stats.failed += changed

    def _retire(self, request: Request) -> None:
        """Move a terminal request to the bounded memory of finished ones."""
        self._retire_all((request,))

    def _retire_all(self, requests: Sequence[Request]) -> None:
        """`_retire` of each, in order; the memory trimmed once."""
        live = self.requests
        for request in requests:
            live.pop(request.request_id, None)
        self._remember_finished(requests)

    def _remember_finished(self, requests: Sequence[Request]) -> None:
        """Put these requests, no longer live, in the bounded memory of finished ones."""
        kept = Finished.kept
        self._remember_kept([(request.request_id, kept(request)) for request in requests])

    def _remember_kept(self, pairs: Sequence[tuple[int, tuple]]) -> None:
        """The bounded memory of finished requests takes these (id, `Finished.kept`) pairs."""
        retired = self.retired
        retired.update(pairs)
        for _ in range(len(retired) - FINISHED_MEMORY):
            retired.popitem(last=False)

    def _fail(self, request: Request, reason: rec.AbortReason, message: str, *, notify: bool) -> None:
        """Turn a request FAILED (once), free what this rank may free, tell peers if asked."""
        if request.state.terminal:
            return
        message = rec.clip_message(message)  # one text: this rank's error, its log, and what peers get
        request.error = f"{reason.name.lower()}: {message}"
        request.reason = reason
        self._set_state(request, RequestState.FAILED, request.error)
        log.warning("member=%x role=%s request=%d failed: %s", self.rank, self.role, request.request_id,
                    request.error)
        if reason is rec.AbortReason.USER:
            self.stats.aborted += 1
        if notify:
            # To the engine the request is bound to (its every rank takes a record addressed
            # to its incarnation), so that other engines, which may see the id later for a
            # request of their own, never hear of it; this engine's own ranks take any abort
            # from each other (`_abort_for_me`).
            self._publish(
                rec.Abort(
                    request_id=request.request_id, reason=reason, message=message,
                    src_rank=self.rank, dst_rank=-1 if request.peer is None else request.peer.incarnation,
                )
            )
        self._fail_cleanup(request)

    def _abort_for_me(self, record: rec.Abort) -> bool:
        """An ABORT this rank acts on: one addressed to everyone, to this rank or its engine,
        or sent by a rank of its own engine (whatever engine it names)."""
        return record.dst_rank in (-1, self.rank, self.me.incarnation) \
            or record.src_rank in self.directory.my_engine.members

    def _describe_peer(self, member: int) -> str:
        """A peer as the engine knows it: its engine and TP rank (never a member id alone)."""
        return self.directory.describe_member(member)

    def _abort_text(self, record: rec.Abort) -> str:
        info = self.directory.member(record.src_rank)
        who = f"{info.role} engine '{info.engine}' TP rank {info.tp_rank}" if info else self._describe_peer(record.src_rank)
        return f"aborted by {who}: {record.message}"

    def _publish(self, record: rec.Record) -> None:
        self.bus.publish(record)

    def _check_liveness(self, now: float) -> bool:
        """Members gone or dead, members whose leave is over, requests past their timeout:
        True if any of it changed something (a record read, a peer lost, a request failed),
        so that `progress()` reports the step as work and a loop does not park on it."""
        worked = False
        dead = self.bus.dead_ranks()
        if dead:
            # A member that leaves writes its last records (its LEFT among them) before its
            # process ends, and this step may have drained its ring just before that: read
            # what it left first, so that a clean leave is never taken for a death. (Only
            # when a death is suspected: nothing is added to an idle step.)
            for record in self.bus.drain():
                self._on_record(record)
                worked = True
            dead = self.bus.dead_ranks()  # (a member that left is no longer read)
        for rank, why in dead.items():
            if rank in self._leaving:  # it left (the rendezvous says so) and is gone now
                self._member_state(rank, "left")
                worked = True
            elif rank not in self.dead_peers:
                self._peer_lost(rank, why)
                worked = True
        for member in [m for m, until in self._leaving.items() if now >= until]:
            self._member_state(member, "left")
            worked = True
        for request in self._live_requests(now):
            if request.state.terminal:
                continue
            why = self._overdue(request, now)
            if why is not None:
                self._fail(request, rec.AbortReason.TIMEOUT, why, notify=True)
                worked = True
        return worked

    def _live_requests(self, now: float) -> list[Request]:
        """The requests the liveness check looks at for their deadlines (a copy). A lane's
        rows past their deadline (`_lane_late`, by column) become Requests first; the
        others stay rows (never the whole lane on each heartbeat)."""
        lane = self._lane
        if lane is not None and lane.rows.slot_of:
            used = np.fromiter(lane.rows.slot_of.values(), dtype=np.int64, count=len(lane.rows.slot_of))
            late = used[self._lane_late(lane.rows._columns, used, now)]
            for request_id in lane.rows._columns["request_id"][late].tolist():
                self._lane_materialize(request_id)
            return list(dict.values(self.requests))
        return list(self.requests.values())

    def _lane_settled(self) -> None:
        """At the first step with an empty lane, `requests` is a plain dict again (its
        lookups cost what the object path's did)."""
        if self._lane is not None and not self._lane.rows.slot_of and type(self.requests) is not dict:
            self.requests = dict.copy(self.requests)

    def _overdue(self, request: Request, now: float) -> str | None:
        """Why a live request is past its deadline at `now` (its error then), or None: no
        progress for `request_timeout_s` in a state `_timeout_applies` to."""
        idle = now - request.last_progress
        if idle > self.config.request_timeout_s and self._timeout_applies(request):
            return (f"no progress for {idle:.1f}s in {request.state.value} "
                    f"(request_timeout_s={self.config.request_timeout_s})")
        return None

    def _timeout_applies(self, request: Request) -> bool:
        return True

    def _peer_lost(self, rank: int, why: str, *, reported: bool = False) -> None:
        """A member is dead: so is its engine incarnation. Exactly the requests bound to it
        fail (all of them if it is a TP peer of this engine). A death this rank found itself
        is posted at the rendezvous for members that join later; one it read there
        (`reported`) is not posted again, and is an error in this rank's log only when it
        touches this rank (a member it read records from, or a TP peer of its incarnation)."""
        if rank in self.dead_peers:
            return
        reason = why
        why = f"{self._describe_peer(rank)} is dead: {reason}"
        self.dead_peers[rank] = why
        view = self.directory.view_of(rank)
        touched = not reported or self._reads(rank) or (view is not None and view.incarnation == self.me.incarnation)
        log.log(logging.ERROR if touched else logging.INFO, "member=%x %s: %s", self.rank, self.me.describe(), why)
        self.directory.mark(rank, "dead", why)
        report = getattr(self.membership, "report_dead", None)
        if report is not None:
            report(rank, reason, publish=not reported)
        self._forget_member(rank)
        if view is None:
            return
        if view.name == self.me.engine and view.incarnation == self.me.incarnation:
            self.broken = why
            for request in list(self.requests.values()):
                self._fail(request, rec.AbortReason.PEER_DEAD, why, notify=self.is_leader)
            self._on_own_engine_lost(rank, why)
            return
        for member in view.members:
            if member is not None and member != rank:
                self._forget_member(member)
        self._on_engine_lost(view, rec.AbortReason.PEER_DEAD, why)

    def _bound_to(self, view: EngineView) -> list[Request]:
        return [r for r in self.requests.values() if r.peer is view]

    # -- subclass hooks ---------------------------------------------------------
    def _on_record(self, record: rec.Record) -> None:
        raise NotImplementedError

    def _pump(self) -> bool:
        raise NotImplementedError

    def _on_engine_usable(self, view: EngineView) -> None:
        return None

    def _on_own_engine_usable(self) -> None:
        return None

    def _emit(self) -> None:
        """Publish what this step batched (the Receiver's allocations, completions and
        decisions); records go out with the next flush."""
        return None

    def _on_engine_lost(self, view: EngineView, reason: rec.AbortReason, why: str) -> None:
        raise NotImplementedError

    def _on_own_engine_lost(self, rank: int, why: str) -> None:
        return None

    def _fail_cleanup(self, request: Request) -> None:
        raise NotImplementedError
