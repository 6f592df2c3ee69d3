"""The encoder engine's endpoint: submit payloads, send rounds, follow resumes.

A round is scheduled in exactly one place, `_schedule_round`, which runs for the first
round (the language side's allocation) and for every RESUME (SPEC R1: a resume always
leads to a send), from the payload and total saved at submit time: one by one through
`_start_round`, or for the usual entries of an ALLOCATIONS record as a batch whose
states move together (the same for the COMPLETEs of a COMPLETIONS record). Rounds are
identified by number and `sent_tokens`, never by block indices (R5, R6).

Which language engine a request goes to is the router's choice: `submit` may name it,
else the request goes to whichever language engine's leader sends its first allocation.
Either way it is then bound to that engine's incarnation: records about it from anyone
else are dropped and counted, and it fails (exactly it and the others bound there) when a
member of that incarnation dies. Request ids must be unique among the requests in flight
on this engine (a router's ids are).

The payload is not copied at submit: rounds are packed straight from the engine's
tensors into staging messages, so the engine must leave them unchanged until the
request is finished (`state(...)` is terminal). Many requests' rounds share one
message (`channels.py`); each language engine incarnation has a channel of its own,
which fans out to the language ranks this encoder rank serves.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from embxfer.control import records as rec
from embxfer.kernels import ops

from .channels import SendChannel, SendChunk
from .endpoint import _LANE_STATES, Endpoint, Finished, Request, check_request_id, checked_ids, log
from .lane import LANE_MIN_BATCH, EncoderLane, LaneBatch, LaneChunks, LaneRequests
from .membership import EngineView, Role
from .payload import Payload, kept_rows, metadata_records
from .rows import BOOTSTRAPPING as _BOOT
from .rows import SUCCESS as _SUCCESS
from .rows import TRANSFERRING as _TRANSFERRING
from .state import RequestState

MAX_PENDING_ALLOCATIONS = 4096
# The encoder lane (runtime/lane.py) on a TP-1 encoder rank; off by default: on an H100
# host it took 0.4-1.0 us of the encoder's 10 us a request, and it costs more than the
# objects where records and messages carry a few requests (lane.py's docstring).
LANE_ENABLED = False
# Records of at most this many entries are checked against the lane row by row (numpy's
# fixed cost per call is more than a few rows' checks in Python).
SCALAR_ENTRIES = 32
# What an encoder rank reads of the records every peer publishes (the rest is stepped over).
WANTED = frozenset({rec.RecordType.ALLOCATIONS, rec.RecordType.COMPLETIONS, rec.RecordType.ABORT,
                    rec.RecordType.MEMBER, rec.RecordType.HELD})


class Sender(Endpoint):
    role = "encoder"

    def __init__(self, **kwargs) -> None:
        self.peers: dict[int, _LanguagePeer] = {}  # language incarnation -> what this rank keeps of it
        # Requests sent in full to an engine that left, waiting for its leader's COMPLETE:
        # request id -> (request, until, why it would fail).
        self._after_leave: dict[int, tuple[Request, float, str]] = {}
        super().__init__(**kwargs)
        if self.me.role != Role.ENCODER.value:
            raise ValueError(f"{self.me.describe()} is not an encoder rank")
        self.bus.wanted = WANTED
        # Allocations, cache hits and aborts announced before the engine submitted the payload.
        # An id's allocation comes with the RESUMEs that followed it (`_hold`): an encoder rank
        # that serves no language rank follows the rounds without sending, so its engine may
        # submit after rounds another rank served, even after their COMPLETE.
        self._early_allocations: OrderedDict[int, list[rec.Allocation]] = OrderedDict()
        self._early_resumes = 0  # RESUMEs held in _early_allocations, all ids together
        self._early_completions: OrderedDict[int, rec.Completion] = OrderedDict()
        self._early_cached: OrderedDict[int, rec.Completion] = OrderedDict()
        # Ids this rank gave up on without submitting them (its engine's abort on every
        # rank): the same abort from another rank of the engine is not kept for them.
        self._gave_up: OrderedDict[int, bool] = OrderedDict()
        self._early_aborts: OrderedDict[int, str] = OrderedDict()
        # Items the language side holds, by request (HeldItems records): what lookup_items says.
        self._held: OrderedDict[int, tuple[int, set[bytes]]] = OrderedDict()
        # Submits still without their first allocation: those of the last step are checked
        # at this step (`_announce_unallocated`), those of this step at the next.
        self._unallocated_due: list[Request] = []
        self._unallocated_new: list[Request] = []
        self._announcements: dict[int, list[tuple[int, int]]] = {}  # this step's, by language leader
        if self.me.tp_size == 1 and LANE_ENABLED:
            self._lane = EncoderLane()

    @property
    def dummy(self) -> bool:
        """True when this rank serves no language rank of any engine it knows."""
        return all(peer.channel is None for peer in self.peers.values()) if self.peers else False

    @property
    def channel(self) -> SendChannel | None:
        """The channel of the only language engine (single-pair layouts and tests)."""
        channels = [p.channel for p in self.peers.values() if p.channel is not None]
        return channels[0] if len(channels) == 1 else None

    # -- public API ---------------------------------------------------------------
    def submit(self, request_id: int, payload: Payload, language_engine: str | int | None = None) -> None:
        """Queue `payload` for transfer to `language_engine` (a name or index; None: the
        language engine that allocates it). ValueError (nothing queued) on bad input; a
        request that cannot be served (the named engine is gone, a rank it needs is lost)
        fails at once, before any work.

        The payload is sent straight from its tensors: leave them unchanged until the
        request is finished. If the language side's allocation has not come by the next
        step, its size is announced (`_announce_unallocated`)."""
        check_request_id(request_id)
        self._check_open("submit")
        if not isinstance(payload, Payload):
            raise ValueError(f"payload: expected an embxfer.Payload, got {type(payload).__name__}")
        target = None if language_engine is None else self._peer_name(Role.LANGUAGE, language_engine, "language_engine")
        metadata = self._check_submit(request_id, payload, "request_id")
        self._submit(request_id, payload, metadata, target, None)

    def submit_many(self, submits: Sequence[tuple[int, Payload]], language_engine: str | int | None = None) -> None:
        """`submit` of each `(request_id, payload)`, in order, to one language engine (None:
        whoever allocates each): what an engine submits in one step, for less host time
        than one call per request (the engine and the batch are checked once). Every pair
        is checked before any is queued: ValueError naming the first bad one (`submits[i]`:
        not a pair, its id bad, repeated or in flight, its payload wrong for this endpoint)
        and nothing is queued."""
        self._check_open("submit_many")
        if isinstance(submits, (str, bytes)) or not hasattr(submits, "__iter__"):
            raise ValueError(f"submits: expected a sequence of (request_id, payload) pairs, got {type(submits).__name__}")
        pairs = list(submits)
        for index, pair in enumerate(pairs):
            if type(pair) is not tuple or len(pair) != 2 or not isinstance(pair[1], Payload):
                raise ValueError(f"submits[{index}]: expected a (request_id, embxfer.Payload) pair")
        checked_ids([request_id for request_id, _ in pairs], "submits")
        target = None if language_engine is None else self._peer_name(Role.LANGUAGE, language_engine, "language_engine")
        metadata = []
        for index, (request_id, payload) in enumerate(pairs):
            try:
                metadata.append(self._check_submit(request_id, payload, "request_id"))
            except ValueError as exc:
                raise ValueError(f"submits[{index}]: {exc}") from None
        resolved = self._peer_view(target) if target is not None and self.broken is None else None
        if self._lane is not None and len(pairs) >= LANE_MIN_BATCH and self._lane_takes(pairs, metadata, target,
                                                                                         resolved):
            self._lane_submit_many(pairs, target)
            return
        for (request_id, payload), info in zip(pairs, metadata, strict=True):
            self._submit(request_id, payload, info, target, resolved)

    def _check_submit(self, request_id: int, payload: Payload, field: str) -> tuple:
        """ValueError if `request_id` is in flight or `payload` does not fit this endpoint;
        else the payload's metadata, as it travels."""
        existing = self.requests.get(request_id)
        if existing is not None:
            raise ValueError(f"{field}={request_id}: already submitted and {existing.state.value} "
                             "(release() it once it is finished before submitting the id again)")
        self.spec.check_payload(payload)
        if payload.num_tokens > 0xFFFFFFFF:
            raise ValueError(f"payload.embeddings: N={payload.num_tokens}, expected at most 2**32 - 1 tokens")
        return payload_metadata(payload, self.config.max_metadata_bytes)

    def _submit(self, request_id: int, payload: Payload, metadata: tuple, target: str | None,
                resolved: tuple[EngineView | None, str | None] | None) -> None:
        """Queue a checked submit (`_check_submit`); `resolved`: the target engine's
        `_peer_view`, when its caller looked it up once for many."""
        if self.retired:
            self.retired.pop(request_id, None)
        if self._gave_up:  # a new request with the id
            self._gave_up.pop(request_id, None)
        request = Request(request_id, target, total_tokens=payload.num_tokens, mrope_delta=payload.mrope_delta,
                          engine_admitted=True)
        if payload.items or metadata:
            self._describe(request, payload, metadata)
        self._add(request)
        # What came before this submit: taken now, so that a request failing below leaves
        # nothing behind; applied at the end, in round order.
        held = self._take_held(request_id) if self._early_allocations else []
        completion = self._early_completions.pop(request_id, None) if self._early_completions else None
        if self.broken is not None:
            self._fail(request, rec.AbortReason.PEER_DEAD, self.broken, notify=False)
            return
        if target is not None:
            view, why = resolved or self._peer_view(target)
            if why is not None:
                self._fail(request, rec.AbortReason.PEER_DEAD if "dead" in why else rec.AbortReason.SHUTDOWN, why,
                           notify=False)
                return
        aborted = self._early_aborts.pop(request_id, None) if self._early_aborts else None
        if aborted is not None:
            self._fail(request, rec.AbortReason.USER, aborted, notify=False)
            return
        cached = self._early_cached.pop(request_id, None) if self._early_cached else None
        if cached is not None:
            self._on_completion(cached)
            return
        request.payload = payload
        if self.spec.is_cuda:
            request.addresses = ops.row_addresses(payload)
        self._replay(held, completion)
        if request.round < 0 and self.is_leader:
            self._unallocated_new.append(request)

    def announce(self, request_id: int, num_tokens: int, language_engine: str | int | None = None) -> None:
        """Tell the language side now that `request_id` will have `num_tokens` tokens (as
        soon as preprocessing knows it, before the vision model runs), so its first
        allocation is exact and no resume is needed. Harmless if wrong or late: records
        between two members arrive in the order they were published, so an announce
        published before the language side's admission is seen by its leader before it
        allocates (it then allocates exactly), one published after changes nothing.
        `language_engine` may be omitted when only one is known."""
        check_request_id(request_id)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= 0xFFFFFFFF:
            raise ValueError(f"num_tokens={num_tokens!r}: expected an integer in 1..2**32-1")
        view = self._language_target(language_engine, "announce")
        if self.is_leader and view is not None:
            self._publish(rec.Announce(request_id=request_id, total_tokens=num_tokens, src_rank=self.rank,
                                       dst_rank=view.leader))

    def _announce_unallocated(self) -> None:
        """Announce the size (the rows that travel) of each request submitted before the
        previous step whose first allocation has still not come, all of them in one
        ANNOUNCEMENTS record per language leader (`_emit`). Its admission waits on the
        language side (for blocks, or for the router), where the announcement makes the
        allocation exact: the request holds the blocks it needs, not the default, and needs
        no resume round. One step late on purpose: an allocation that was on its way at the
        submit has arrived by then, and nothing is sent. Only the leader announces (the
        language leader allocates with it). A request bound to no language engine yet is
        announced only when a single one is in the job."""
        due, self._unallocated_due, self._unallocated_new = self._unallocated_due, self._unallocated_new, []
        only = False  # the single usable language engine, looked up once (False: not yet)
        for request in due:
            if type(request) is LaneBatch:
                only = self._lane_announce(request, only)
                continue
            if request.round >= 0 or request.state.terminal or not request.total_tokens \
                    or self.requests.get(request.request_id) is not request:
                continue
            only = self._announce(request.engine, [(request.request_id, request.total_tokens)], only)

    def _announce(self, engine: str | None, sizes: Iterable[tuple[int, int]],
                  only: EngineView | None | bool) -> EngineView | None | bool:
        """Queue the (request_id, total_tokens) `sizes` of requests bound to `engine` (None:
        any) for the engine they go to, if one is known; returns `only`: the single usable
        language engine, looked up once a step (False: not yet)."""
        if engine is not None:
            view = self._peer_view(engine)[0]
        else:
            if only is False:
                usable = [v for v in self.directory.engines(Role.LANGUAGE) if v.state == "usable"]
                only = usable[0] if len(usable) == 1 else None
            view = only
        if view is not None:
            announced = self._announcements.setdefault(view.leader, [])
            before = len(announced)
            announced.extend(sizes)
            self.stats.announced += len(announced) - before
        return only

    def _emit(self) -> None:
        if self._announcements:
            fit = rec.Announcements.entries_that_fit(self.bus.outbox.capacity)
            for dst, items in self._announcements.items():
                for first in range(0, len(items), fit):
                    self._publish(rec.Announcements.of(self.rank, dst, items[first : first + fit]))
            self._announcements.clear()

    def _language_target(self, language_engine: str | int | None, verb: str) -> EngineView | None:
        if language_engine is not None:
            view, _ = self._peer_view(self._peer_name(Role.LANGUAGE, language_engine, "language_engine"))
            return view
        usable = [v for v in self.directory.engines(Role.LANGUAGE) if v.state == "usable"]
        if len(usable) > 1:
            raise ValueError(f"{verb}(language_engine=None): {len(usable)} language engines are in the job "
                             f"({', '.join(sorted(v.name for v in usable))}); name one")
        return usable[0] if usable else None

    def lookup_items(self, request_id: int) -> set[bytes]:
        """The content hashes of `request_id`'s items that the language side holds (it told
        this engine when it admitted the request): the engine may skip the vision model
        for them, and `submit` then sends only the other rows (the skipped items' rows of
        the payload are not read: leave them uninitialised). Non-blocking; make
        `progress()` calls for the answer to arrive. Hashes as `content_hash_bytes` makes
        them (str hashes encoded, long ones hashed down)."""
        held = self._held.get(check_request_id(request_id))
        return set(held[1]) if held is not None else set()

    def _describe(self, request: Request, payload: Payload, metadata: tuple) -> None:
        """What travels with `payload` besides its rows, and which of its rows travel: every
        row but those of the items the language side holds. A PayloadInfo goes out only when
        there is something the language side cannot know (skipped items, metadata): an item
        that misses costs no record."""
        held = self._held.pop(request.request_id, (None, set()))
        skipped = [item for item in payload.items if item.content_hash in held[1]]
        if not skipped and not metadata:
            return  # every row travels: the language side's own admission names the items
        anchors = {}
        if skipped:  # each skipped item's first position column: views, one gather, one read (no upload)
            positions = payload.mrope_positions
            columns = torch.stack([positions[:, item.start] for item in skipped]).tolist()
            anchors = dict(zip((item.start for item in skipped), columns, strict=True))
        items = [rec.PayloadItem(item.content_hash, item.start, item.count, item.start in anchors,
                                 tuple(anchors.get(item.start, (0, 0, 0)))) for item in payload.items]
        request.info = rec.PayloadInfo.trusted(src_rank=self.rank, dst_rank=-1, request_id=request.request_id,
                                               total_tokens=payload.num_tokens, items=tuple(items),
                                               metadata=metadata)
        if skipped:
            request.kept, request.total_tokens = kept_rows([(i.start, i.count) for i in skipped], payload.num_tokens)
            held_engine = held[0]
            if request.engine is None and held_engine is not None:
                request.engine = held_engine  # the engine that said it holds them serves it

    def lookup(self, request_id: int) -> bool:
        """True when the language side has served `request_id` from its cache (a content
        hash it already holds): the engine can skip the vision model and `submit` nothing.
        Non-blocking; make `progress()` calls for the answer to arrive."""
        if self._lane is not None and request_id in self._lane.rows.slot_of:
            return False  # (a lane request is never served from the cache: no lookup materializes it)
        request = self.requests.get(request_id)
        if request is not None:
            return request.cached
        return request_id in self._early_cached

    def lost_peer(self, language_engine: str | int | None = None) -> str | None:
        """Why this engine cannot serve (a TP peer of its own is lost), or, with
        `language_engine`, why requests to that engine cannot be served; None if they can.
        Check it before producing a payload: a lost peer stops new work at once."""
        if self.broken is not None:
            return self.broken
        if language_engine is None:
            return None
        return self._peer_view(self._peer_name(Role.LANGUAGE, language_engine, "language_engine"))[1]

    def abort(self, request_id: int, message: str = "aborted by the encoder engine") -> None:
        """Fail a request in flight, on both sides; a finished one is released. An id this
        rank never submitted: the language side is told (it fails the request if it
        admitted it; any TP rank may tell it for the engine), and this rank forgets what it
        kept for the id's submit (an allocation, an abort heard first): the engine is done
        with that request, a later submit of the id is another one."""
        request = self.requests.get(check_request_id(request_id))
        if request is None:
            # Never submitted (the vision model failed, say): the language side may be
            # waiting for it; tell it, so the request fails there at once. To the engine
            # whose allocation this rank holds, if any (else every language engine).
            held = self._early_allocations.get(request_id)
            self._publish(rec.Abort(request_id=request_id, reason=rec.AbortReason.USER,
                                    message=rec.clip_message(message), src_rank=self.rank,
                                    dst_rank=held[0].src_rank if held else -1))
            self._drop_held(request_id)
            self._early_aborts.pop(request_id, None)
            self._early_cached.pop(request_id, None)
            _remember(self._gave_up, request_id, True)
            return
        if request.state.terminal:
            self.release(request_id)
            return
        self._fail(request, rec.AbortReason.USER, message, notify=True)

    def release(self, request_id: int) -> None:
        """Forget a finished request (SUCCESS or FAILED), so its id can be submitted again.
        ValueError if it is still in flight (abort it first); an unknown or already
        released id: nothing to do."""
        lane = self._lane
        if lane is not None and lane.rows.slot_of and type(request_id) is int:
            slot = lane.rows.slot_of.get(request_id)
            if slot is not None and lane.rows._columns["state"][slot] == _SUCCESS:
                self._lane_release(request_id, slot)
                return
        request = self._finished_request(request_id)
        if request is None:
            return
        self._retire(request)

    def release_many(self, request_ids: Sequence[int]) -> None:
        """`release` of each id, in order: what an engine releases of a step's `finished()`
        in one call. Every id is checked before any is released (ValueError naming the
        first bad one, `request_ids[i]`: not an id, repeated, still in flight) and then
        nothing is released."""
        self._check_open("release_many")
        ids = checked_ids(request_ids)
        lane = self._lane
        slot_of = lane.rows.slot_of if lane is not None else {}
        state = lane.rows._columns["state"] if slot_of else None
        done: list[tuple[int, Request | int]] = []  # (id, its Request or its lane slot)
        for index, request_id in enumerate(ids):
            slot = slot_of.get(request_id) if slot_of else None
            if slot is not None and state[slot] == _SUCCESS:
                done.append((request_id, slot))
                continue
            try:
                request = self._finished_request(request_id)
            except ValueError as exc:
                raise ValueError(f"request_ids[{index}]: {exc}") from None
            if request is not None:
                done.append((request_id, request))
        if not done:
            return
        kept, live, slots, pairs = Finished.kept, self.requests, [], []
        for request_id, found in done:
            if type(found) is int:
                slots.append(found)
                pairs.append((request_id, lane.kept(found)))
            else:
                dict.pop(live, request_id, None)
                pairs.append((request_id, kept(found)))
        if slots:
            at = np.array(slots, dtype=np.int64)
            lane.rows._columns["gen"][at] = 0
            lane.rows.remove(at)
        self._remember_kept(pairs)

    # -- records ------------------------------------------------------------------
    def _on_record(self, record: rec.Record) -> None:
        kind = type(record)
        if kind is rec.Allocations or kind is rec.Completions:
            if record.dst_rank == self.me.incarnation:
                view = self.directory.view_of(record.src_rank)
                if view is None or view.leader != record.src_rank or view.role is not Role.LANGUAGE:
                    self.stats.rejected_records += 1  # not a language leader of this job
                elif view.gone and not (kind is rec.Completions and self._after_leave):
                    # An incarnation that left or died: nothing it says is acted on (a stale
                    # round-0 allocation must never be kept for a later submit of the id),
                    # but the COMPLETE of a request sent in full before it left.
                    self.stats.late_records += 1
                elif view.gone:
                    for item in record.items():
                        if item.request_id in self._after_leave:
                            self._on_completion(item, view)
                            self._after_leave.pop(item.request_id, None)
                        else:
                            self.stats.late_records += 1
                elif kind is rec.Allocations:
                    self._on_allocations(record, view)
                else:
                    self._on_completions(record, view)
        elif kind is rec.Abort:
            if self._abort_for_me(record):
                self._on_abort(record)
        elif kind is rec.Member:
            self._member_state(record.src_rank, "draining" if record.state is rec.MemberState.DRAINING else "left")
        elif kind is rec.HeldItems:
            if record.dst_rank == self.me.incarnation:
                view = self.directory.view_of(record.src_rank)
                if view is not None and view.leader == record.src_rank and view.role is Role.LANGUAGE:
                    for held in record.items():
                        entry = self._held.setdefault(held.request_id, (view.name, set()))
                        entry[1].add(held.content_hash)
                    while len(self._held) > MAX_PENDING_ALLOCATIONS:
                        self._held.popitem(last=False)

    def _on_abort(self, record: rec.Abort) -> None:
        request = self.requests.get(record.request_id)
        source = self.directory.view_of(record.src_rank)
        if request is None and record.request_id in self.retired:
            self.stats.late_records += 1
        elif request is None:
            # The language side gave up before this rank submitted, or another rank of this
            # engine did: remember it (bounded), so the submit fails at once instead of
            # sending anything; but not the abort of an id this rank gave up on itself
            # (the engine's loop calls abort on every rank).
            if source is not None and (source.role is Role.LANGUAGE or (source is self.directory.my_engine
                                                                         and record.request_id not in self._gave_up)):
                self._drop_held(record.request_id)
                _remember(self._early_aborts, record.request_id, self._abort_text(record))
        elif source is None or (source is not request.peer and source is not self.directory.my_engine
                                and not (request.peer is None and source.role is Role.LANGUAGE)):
            self.stats.rejected_records += 1  # from an engine this request has nothing to do with
        else:
            self._fail(request, rec.AbortReason(record.reason), self._abort_text(record), notify=False)

    def _on_allocations(self, record: rec.Allocations, view: EngineView) -> None:
        """An ALLOCATIONS record from the leader of `view`, in its order. An entry of a
        step's usual work (the next round of a request in flight here, bound to `view` or
        its first allocation, consistent with what this rank sent) is applied from the
        record's columns; any other through `_on_resume`, which holds every rule (the fast
        entries are its plain cases, not other rules)."""
        e = record.entries
        ids, rounds = e["request_id"].tolist(), e["round"].tolist()
        sent, allocated = e["sent_tokens"].tolist(), e["allocated_tokens"].tolist()
        requests, block_size, name = self.requests, self.config.block_size, view.name
        usable = view.state in ("usable", "draining")
        laned = self._lane_first_allocations(e, view, usable) if self._lane is not None else None
        run = -1  # the first of the lane entries since the last object entry
        entries = None
        started: list[Request] = []  # scheduled; their state moves at once, before any other entry's rules
        for index, request_id in enumerate(ids):
            if laned is not None:
                if laned[index] >= 0:
                    if run < 0:
                        run = index
                    continue
                if run >= 0:
                    self._lane_schedule(laned[run:index], e["allocated_tokens"][run:index], view)
                    run = -1
            request = requests.get(request_id)
            if request is not None and not request.state.terminal and rounds[index] == request.round + 1 \
                    and sent[index] == request.sent_tokens and not allocated[index] % block_size:
                if request.peer is view:
                    self._schedule_round(request, rounds[index], allocated[index])
                    started.append(request)
                    continue
                if request.peer is None and rounds[index] == 0 and usable and request.engine in (None, name):
                    request.peer, request.engine = view, name
                    self._peer(view)
                    self._schedule_round(request, 0, allocated[index])
                    started.append(request)
                    continue
            if started:
                self._set_states(started, RequestState.TRANSFERRING)
                started = []
            if entries is None:
                entries = record.items()
            self._on_resume(entries[index], view)
        if run >= 0:
            self._lane_schedule(laned[run:], e["allocated_tokens"][run:], view)
        if started:
            self._set_states(started, RequestState.TRANSFERRING)

    def _on_completions(self, record: rec.Completions, view: EngineView) -> None:
        """A COMPLETIONS record from the leader of `view`: the COMPLETE of a request in
        flight here, bound to `view`, that this rank sent in full, from the record's
        columns; any other entry through `_on_completion` (every rule)."""
        e = record.entries
        ids, sent = e["request_id"].tolist(), e["sent_tokens"].tolist()
        totals, flags = e["total_tokens"].tolist(), e["flags"].tolist()
        requests, held = self.requests, self._early_allocations
        laned = self._lane_completes(e, view) if self._lane is not None else None
        run = -1  # the first of the lane entries since the last object entry
        entries = None
        done: list[Request] = []
        for index, request_id in enumerate(ids):
            if laned is not None:
                if laned[index] >= 0:
                    if done:  # (the ids turn SUCCESS in the record's order)
                        self._set_states(done, RequestState.SUCCESS)
                        done = []
                    if run < 0:
                        run = index
                    continue
                if run >= 0:
                    self._lane_complete(laned[run:index])
                    run = -1
            request = requests.get(request_id)
            if request is not None and request.peer is view and not flags[index] and not request.state.terminal \
                    and totals[index] == sent[index] == request.total_tokens == request.sent_tokens \
                    and request_id not in held and request.payload is not None:
                request.payload = request.addresses = None  # also marks it done for a repeated entry
                done.append(request)
                continue
            if done:  # the entries before this one first, in order
                self._set_states(done, RequestState.SUCCESS)
                done = []
            if entries is None:
                entries = record.items()
            self._on_completion(entries[index], view)
        if run >= 0:
            self._lane_complete(laned[run:])
        if done:
            self._set_states(done, RequestState.SUCCESS)

    def _on_resume(self, resume: rec.Allocation, view: EngineView | None = None) -> None:
        if view is None:
            view = self.directory.view_of(resume.src_rank)
            if view is None or view.gone:
                self.stats.late_records += 1
                return
        request = self.requests.get(resume.request_id)
        if request is None:
            if resume.request_id in self.retired and resume.round != 0:
                self.stats.late_records += 1  # a round of the incarnation this engine released
            else:
                # Not submitted yet; or released, and this is the allocation of the id admitted
                # again (records between two members come in order: the old one's COMPLETE
                # came before it), which the engine's next submit of the id uses.
                self._hold(resume)
            return
        if request.state.terminal and (resume.round == 0 or resume.request_id in self._early_allocations):
            # The language side admitted the id again while this engine still holds the old,
            # finished incarnation: keep the allocation (and the rounds after it) for the
            # next submit of the id.
            self._hold(resume)
            return
        if request.peer is None:
            if resume.round != 0 and resume.request_id in self._early_allocations:
                self._hold(resume)  # behind its allocation, still waiting for the join to apply
                return
            if resume.round != 0 or (request.engine is not None and request.engine != view.name):
                self.stats.rejected_records += 1
                self._fail(request, rec.AbortReason.INVALID,
                           f"allocation from {view.describe()}, the request was submitted for language engine "
                           f"'{request.engine}'", notify=False)
                return
            if view.state not in ("usable", "draining"):
                self._hold(resume)  # its join is not applied yet
                return
            request.peer = view
            request.engine = view.name
            self._peer(view)
        elif request.peer is not view:
            self.stats.rejected_records += 1  # another engine speaking of an id bound elsewhere
            return
        if request.state.terminal or resume.round <= request.round:
            self.stats.late_records += 1  # a duplicate or a resume for an older round
            return
        problem = self._check_resume(request, resume)
        if problem:
            self.stats.rejected_records += 1
            self._fail(request, rec.AbortReason.INVALID, problem, notify=True)
            return
        self._start_round(request, resume.round, resume.allocated_tokens)

    def _hold(self, resume: rec.Allocation) -> None:
        """Keep an allocation for an id whose rounds this rank cannot apply yet (not
        submitted, or its language engine's join not applied), with the RESUMEs that follow
        it, in round order; applied in that order once it can (submit, the join). A new
        allocation (round 0) replaces what the id held (the language side admitted it
        again). Bounded: MAX_PENDING_ALLOCATIONS ids (the oldest dropped) and as many held
        RESUMEs in all; one past that, out of order, or without its allocation is refused
        and counted, and the request then fails at its next RESUME, naming the round."""
        held = self._early_allocations
        if resume.round == 0:
            self._drop_held(resume.request_id)
            held[resume.request_id] = [resume]
            while len(held) > MAX_PENDING_ALLOCATIONS:
                self._drop_held(next(iter(held)))
            return
        rounds = held.get(resume.request_id)
        if rounds is None or rounds[-1].round != resume.round - 1 or self._early_resumes >= MAX_PENDING_ALLOCATIONS:
            self.stats.rejected_records += 1
            return
        rounds.append(resume)
        self._early_resumes += 1

    def _replay(self, rounds: list[rec.Allocation], completion: rec.Completion | None,
                view: EngineView | None = None) -> None:
        """Apply what was held for a request, now that it can be: its rounds in order, then
        the COMPLETE behind them."""
        for resume in rounds:
            self._on_resume(resume, view)
        if completion is not None:
            self._on_completion(completion, view)

    def _drop_held(self, request_id: int) -> None:
        """Forget what this rank holds for the id: its rounds and a COMPLETE behind them."""
        self._take_held(request_id)
        self._early_completions.pop(request_id, None)

    def _take_held(self, request_id: int) -> list[rec.Allocation]:
        """What `_hold` kept for the id (forgotten here), in round order; [] if nothing."""
        rounds = self._early_allocations.pop(request_id, None)
        if rounds is None:
            return []
        self._early_resumes -= len(rounds) - 1
        return rounds

    def _check_resume(self, request: Request, resume: rec.Allocation) -> str | None:
        if resume.round != request.round + 1:
            return f"RESUME round {resume.round}, expected round {request.round + 1}"
        if resume.sent_tokens != request.sent_tokens:
            return f"RESUME sent_tokens={resume.sent_tokens}, expected {request.sent_tokens}"
        if resume.allocated_tokens % self.config.block_size:
            return (f"RESUME allocated_tokens={resume.allocated_tokens} is not whole blocks of "
                    f"{self.config.block_size} tokens")
        return None

    def _on_completion(self, completion: rec.Completion, view: EngineView | None = None) -> None:
        request = self.requests.get(completion.request_id)
        if request is None:
            if completion.flags & rec.COMPLETION_CACHED and completion.request_id not in self.retired:
                _remember(self._early_cached, completion.request_id, completion)  # before the submit
            elif completion.request_id in self._early_allocations:  # rounds this rank follows late
                _remember(self._early_completions, completion.request_id, completion)
            else:
                self.stats.late_records += 1
            return
        if completion.request_id in self._early_allocations:
            # Its rounds are held (a join to apply, or a new incarnation of a finished id
            # not submitted again yet): so is its COMPLETE, which comes after them.
            _remember(self._early_completions, completion.request_id, completion)
            return
        if request.state.terminal:
            self.stats.late_records += 1
            return
        if view is not None and request.peer is not None and request.peer is not view:
            self.stats.rejected_records += 1
            return
        if completion.flags & rec.COMPLETION_CACHED:
            request.cached = True
            request.payload = request.addresses = None
            self.stats.cached += 1
            self._set_state(request, RequestState.SUCCESS, "served from the language side's cache")
            return
        if completion.total_tokens != request.total_tokens or completion.sent_tokens != request.total_tokens \
                or request.sent_tokens != request.total_tokens:
            self._fail(request, rec.AbortReason.INVALID,
                       f"COMPLETION says {completion.sent_tokens}/{completion.total_tokens} tokens, "
                       f"this side sent {request.sent_tokens}/{request.total_tokens}", notify=True)
            return
        request.payload = request.addresses = None
        self._set_state(request, RequestState.SUCCESS)

    # -- peers -------------------------------------------------------------------------
    def _on_engine_usable(self, view: EngineView) -> None:
        """Allocations that came from this incarnation before its join was applied."""
        if view.role is not Role.LANGUAGE or not hasattr(self, "_early_allocations"):
            return
        members = set(view.members)
        for rid in [rid for rid, r in self._early_allocations.items() if r[0].src_rank in members]:
            if rid in self.requests:
                self._replay(self._take_held(rid), self._early_completions.pop(rid, None), view)

    def _peer(self, view: EngineView) -> _LanguagePeer:
        """What this rank keeps of a language incarnation: the channel to the language
        ranks it serves (None for a dummy rank), made on first use."""
        peer = self.peers.get(view.incarnation)
        if peer is None:
            mine, size = self.me.tp_rank, self.me.tp_size
            targets = [m for tp, m in enumerate(view.members) if tp % size == mine]
            channel = None
            if targets:
                channel = SendChannel(
                    self.rank, targets, self.transport, self.spec, depth=self.config.staging_depth,
                    staging_bytes=self.config.staging_bytes, max_segments=self.config.max_segments_per_message,
                    publish=self._publish, destination=view.incarnation,
                )
                self.channels[view.incarnation] = channel
            peer = self.peers[view.incarnation] = _LanguagePeer(view, channel)
        return peer

    # -- rounds ---------------------------------------------------------------------
    def _start_round(self, request: Request, round_: int, allocated_tokens: int) -> None:
        """Schedule the round an allocation or RESUME allows (SPEC R1)."""
        self._schedule_round(request, round_, allocated_tokens)
        self._set_state(request, RequestState.TRANSFERRING)

    def _schedule_round(self, request: Request, round_: int, allocated_tokens: int) -> None:
        """`_start_round` but for the state (a batch of starts moves theirs at once)."""
        count = min(request.total_tokens - request.sent_tokens, allocated_tokens)
        request.round = round_
        if round_ > 0:
            request.resumes += 1
            self.stats.resumes += 1
        request.last_progress = time.monotonic()
        channel = self.peers[request.peer.incarnation].channel
        if channel is not None:
            channel.enqueue(SendChunk(request, round_, request.sent_tokens, count))
            self.stats.tokens += count
        request.sent_tokens += count
        self.stats.rounds += 1

    def _pump(self) -> bool:
        self._lane_settled()
        worked = False
        if self._unallocated_due or self._unallocated_new:
            self._announce_unallocated()
        for peer in self.peers.values():
            if peer.channel is not None:
                worked |= peer.channel.pump()
        return worked

    # -- failure --------------------------------------------------------------------
    def _overdue(self, request: Request, now: float) -> str | None:
        """A request in flight (TRANSFERRING, the only other live state here) is bound by
        `request_timeout_s`. Waiting for the language side's admission is backpressure, not
        a lack of progress (a dead language side is caught by liveness), with a deadline of
        its own: a request submitted here that no language engine allocated for within
        `admission_timeout_s` (never admitted, routed to an engine that never joined,
        queued for blocks all that time) is past its deadline: the payload is not held for
        ever. Its abort reaches the language side, which fails the id if it has it, or
        remembers it for an admit still to come."""
        if request.state is RequestState.BOOTSTRAPPING:
            waited, limit = now - request.admitted_at, self.config.admission_timeout_s
            if waited > limit:
                return (f"no allocation from the language side for {waited:.1f}s after the submit "
                        f"(admission_timeout_s={limit})")
            return None
        return super()._overdue(request, now)

    def _fail_cleanup(self, request: Request) -> None:
        request.payload = request.addresses = None  # its chunks not yet sent are dropped

    def _on_engine_lost(self, view: EngineView, reason: rec.AbortReason, why: str) -> None:
        """A language incarnation died or left: exactly its requests fail. One that left (a
        graceful close) takes nothing with it that reached it in full (none of its rows
        queued or in a message still being sent): the news of the leave (a follower's
        LEFT, the rendezvous) may come before the leader's COMPLETE, which travels on the
        leader's own channel. Such a request waits for it until the leader's own LEFT is
        read (behind all it sent) or peer_timeout_s passed."""
        left = reason is rec.AbortReason.SHUTDOWN
        until = time.monotonic() + self.config.peer_timeout_s
        peer = self.peers.pop(view.incarnation, None)
        for request in list(self.requests.values()):
            if request.peer is view or (request.peer is None and request.engine == view.name):
                if left and request.peer is view and request.state is RequestState.TRANSFERRING \
                        and request.sent_tokens == request.total_tokens \
                        and (peer is None or peer.channel is None or peer.channel.delivered(request)):
                    self._after_leave[request.request_id] = (request, until, why)
                    continue
                self._fail(request, reason, why, notify=False)
        if peer is not None and peer.channel is not None:
            for member in list(peer.channel.peers):
                peer.channel.drop_peer(member)
            self.channels.pop(view.incarnation, None)

    def _check_liveness(self, now: float) -> bool:
        worked = super()._check_liveness(now)
        if self._after_leave:
            gone = self.directory.gone_members
            for rid, (request, until, why) in list(self._after_leave.items()):
                if request.state.terminal or self.requests.get(rid) is not request:
                    del self._after_leave[rid]
                elif now >= until or request.peer.leader in gone:
                    del self._after_leave[rid]
                    self._fail(request, rec.AbortReason.SHUTDOWN, f"{why}; its leader did not confirm the "
                               "transfer before leaving", notify=False)
                    worked = True
        return worked

    def _on_own_engine_lost(self, rank: int, why: str) -> None:
        for peer in self.peers.values():
            if peer.channel is not None:
                peer.channel.queue.clear()

    # -- the lane (runtime/lane.py) ---------------------------------------------------------
    def _lane_takes(self, pairs: list[tuple[int, Payload]], metadata: list[tuple], target: str | None,
                    resolved: tuple[EngineView | None, str | None] | None) -> bool:
        """Whether a checked `submit_many` batch enters the lane: nothing but rows travels
        (no items, no metadata), nothing came for its ids before the submit, the named
        engine (if any) is not gone, and nothing watches each request (metrics, debug log)."""
        if self.broken is not None or self.metrics is not None or not self.is_leader \
                or (target is not None and (resolved is None or resolved[1] is not None)) \
                or log.isEnabledFor(logging.DEBUG) or any(metadata) or any(p.items for _, p in pairs):
            return False
        early = [m for m in (self._early_allocations, self._early_completions, self._early_aborts, self._early_cached)
                 if m]
        return not early or not any(request_id in m for request_id, _ in pairs for m in early)

    def _lane_submit_many(self, pairs: list[tuple[int, Payload]], target: str | None) -> None:
        """`_submit` of a checked batch, as rows: one marker in the queue of submits whose
        allocation is awaited (`_announce_unallocated`)."""
        lane, now = self._lane, time.monotonic()
        ids = [request_id for request_id, _ in pairs]
        for memory in (self.retired, self._gave_up):
            if memory:
                for request_id in ids:
                    memory.pop(request_id, None)
        if type(self.requests) is dict:
            self.requests = LaneRequests(lane.rows.slot_of, self._lane_materialize, self.requests)
        payloads = [payload for _, payload in pairs]
        slots, gens = lane.add(ids, state=_BOOT, total=[p.num_tokens for p in payloads],
                               mrope_delta=[p.mrope_delta for p in payloads], round=-1, peer=-1,
                               engine=lane.engine_index(target), admitted_at=now, last_progress=now)
        slot_list = slots.tolist()
        for slot, payload in zip(slot_list, payloads, strict=True):
            lane.payloads[slot] = payload
        if self.spec.is_cuda:
            for slot, payload in zip(slot_list, payloads, strict=True):
                lane.addresses[slot] = ops.row_addresses(payload)
        self.stats.requests += len(ids)
        self.in_flight += len(ids)
        self._unallocated_new.append(LaneBatch(ids, slots, gens))

    def _lane_announce(self, batch: LaneBatch, only: EngineView | None | bool) -> EngineView | None | bool:
        """`_announce_unallocated` of a lane batch, in its order: the rows still waiting for
        their first allocation by column; a row materialized meanwhile as the object it became."""
        lane = self._lane
        c = lane.rows._columns
        alive = c["gen"][batch.slots] == batch.gens
        if alive.all():
            waiting = batch.slots[c["state"][batch.slots] == _BOOT]
            for engine in np.unique(c["engine"][waiting]).tolist():
                at = waiting[c["engine"][waiting] == engine]
                only = self._announce(lane.engines[engine],
                                      zip(c["request_id"][at].tolist(), c["total"][at].tolist(), strict=True), only)
            return only
        for slot, gen, live in zip(batch.slots.tolist(), batch.gens.tolist(), alive.tolist(), strict=True):
            if live:
                if c["state"][slot] != _BOOT:
                    continue
                request_id, total, engine = int(c["request_id"][slot]), int(c["total"][slot]), lane.engines[c["engine"][slot]]
            else:
                request = lane.left.pop(gen, None)
                if request is None or request.round >= 0 or request.state.terminal \
                        or self.requests.get(request.request_id) is not request:
                    continue
                request_id, total, engine = request.request_id, request.total_tokens, request.engine
            only = self._announce(engine, [(request_id, total)], only)
        return only

    def _lane_first_allocations(self, entries: np.ndarray, view: EngineView, usable: bool) -> list[int] | None:
        """Per entry of an ALLOCATIONS record, the lane slot it is the usual first
        allocation of (what `_on_allocations` applies to a request by `_schedule_round`),
        else -1; None when no entry is (the record then takes the object path alone). A
        lane row named by any other entry is materialized by its lookup there."""
        lane = self._lane
        if not lane.rows.slot_of or not usable or self.metrics is not None or log.isEnabledFor(logging.DEBUG):
            return None
        get = lane.rows.slot_of.get
        found = [get(request_id, -1) for request_id in entries["request_id"].tolist()]
        if max(found) < 0:
            return None
        named = [slot for slot in found if slot >= 0]
        if len(set(named)) != len(named):
            return None  # an id named twice: the object path's order of rules decides
        c, block_size = lane.rows._columns, self.config.block_size
        engine = lane.engines.index(view.name) if view.name in lane.engines else -1
        if len(found) <= SCALAR_ENTRIES:  # a few: row by row (numpy's fixed cost per call is more)
            rounds, sent = entries["round"].tolist(), entries["sent_tokens"].tolist()
            allocated = entries["allocated_tokens"].tolist()
            state, engines = c["state"], c["engine"]
            return [slot if slot >= 0 and state[slot] == _BOOT and not rounds[i] and not sent[i]
                    and not allocated[i] % block_size and engines[slot] in (0, engine) else -1
                    for i, slot in enumerate(found)]
        slots = np.array(found, dtype=np.int64)
        at = np.where(slots >= 0, slots, 0)
        usual = (slots >= 0) & (c["state"][at] == _BOOT) & (entries["round"] == 0) & (entries["sent_tokens"] == 0) \
            & (entries["allocated_tokens"] % block_size == 0) & ((c["engine"][at] == 0) | (c["engine"][at] == engine))
        return np.where(usual, slots, -1).tolist()

    def _lane_schedule(self, slots: list[int], allocated: np.ndarray, view: EngineView) -> None:
        """`_schedule_round` of the first rounds of lane rows bound to `view` now, as columns:
        their rounds queued on its channel in order, each row TRANSFERRING."""
        lane = self._lane
        c = lane.rows._columns
        peer, engine, now = lane.peer_index(view), lane.engine_index(view.name), time.monotonic()
        if len(slots) <= SCALAR_ENTRIES:
            total, gen = c["total"], c["gen"]
            counts = [min(int(total[slot]), tokens) for slot, tokens in zip(slots, allocated.tolist(), strict=True)]
            gens = [int(gen[slot]) for slot in slots]
            for name, values in (("round", 0), ("peer", peer), ("engine", engine), ("last_progress", now),
                                 ("state", _TRANSFERRING)):
                column = c[name]
                for slot in slots:
                    column[slot] = values
            column = c["sent"]
            for slot, count in zip(slots, counts, strict=True):
                column[slot] = count
        else:
            at = np.asarray(slots, dtype=np.int64)
            counted = np.minimum(c["total"][at], allocated)
            c["round"][at] = 0
            c["sent"][at] = counted
            c["peer"][at] = peer
            c["engine"][at] = engine
            c["last_progress"][at] = now
            c["state"][at] = _TRANSFERRING
            counts, gens = counted.tolist(), c["gen"][at].tolist()
        channel = self._peer(view).channel
        if channel is not None:
            channel.enqueue(LaneChunks(lane, slots, gens, counts))
            self.stats.tokens += sum(counts)
        self.stats.rounds += len(slots)

    def _lane_completes(self, entries: np.ndarray, view: EngineView) -> list[int] | None:
        """Per entry of a COMPLETIONS record, the lane slot it is the usual COMPLETE of (a
        row bound to `view` and sent in full, as `_on_completions` applies by column), else
        -1; None when no entry is."""
        lane = self._lane
        if not lane.rows.slot_of or self.metrics is not None or log.isEnabledFor(logging.DEBUG):
            return None
        get = lane.rows.slot_of.get
        ids = entries["request_id"].tolist()
        found = [get(request_id, -1) for request_id in ids]
        if max(found) < 0:
            return None
        peer = lane._view_index.get(view.incarnation, -1)
        named = [slot for slot in found if slot >= 0]
        if peer < 0 or lane.views[peer] is not view or len(set(named)) != len(named):
            return None
        c = lane.rows._columns
        if len(ids) <= SCALAR_ENTRIES:  # a few: numpy's fixed cost per call is more than the rows' checks
            held = self._early_allocations
            flags, totals, sent = entries["flags"].tolist(), entries["total_tokens"].tolist(), \
                entries["sent_tokens"].tolist()
            return [slot if slot >= 0 and c["peer"][slot] == peer and c["state"][slot] == _TRANSFERRING
                    and not flags[i] and totals[i] == sent[i] == c["total"][slot] == c["sent"][slot]
                    and not (held and ids[i] in held) else -1 for i, slot in enumerate(found)]
        slots = np.array(found, dtype=np.int64)
        named = slots >= 0
        at = np.where(named, slots, 0)
        total = c["total"][at]
        usual = named & (c["peer"][at] == peer) & (c["state"][at] == _TRANSFERRING) & (entries["flags"] == 0) \
            & (entries["total_tokens"] == total) & (entries["sent_tokens"] == total) & (c["sent"][at] == total)
        if self._early_allocations:
            usual &= np.array([request_id not in self._early_allocations
                               for request_id in entries["request_id"].tolist()], dtype=bool)
        return np.where(usual, slots, -1).tolist()

    def _lane_complete(self, slots: list[int]) -> None:
        """Lane rows the language side completed: SUCCESS, their payloads let go."""
        lane = self._lane
        c = lane.rows._columns
        payloads, addresses = lane.payloads, lane.addresses
        for slot in slots:
            payloads[slot] = addresses[slot] = None
        if len(slots) <= SCALAR_ENTRIES:
            state, ids = c["state"], c["request_id"]
            for slot in slots:
                state[slot] = _SUCCESS
            self._just_finished.extend([int(ids[slot]) for slot in slots])
        else:
            at = np.asarray(slots, dtype=np.int64)
            c["state"][at] = _SUCCESS
            self._just_finished.extend(c["request_id"][at].tolist())
        self.in_flight -= len(slots)
        self.stats.succeeded += len(slots)

    def _lane_release(self, request_id: int, slot: int) -> None:
        """`release` of a lane row that succeeded: into the memory of finished requests."""
        lane = self._lane
        self._remember_kept([(request_id, lane.kept(slot))])
        lane.rows._columns["gen"][slot] = 0
        lane.rows.remove_id(request_id)

    def _lane_materialize(self, request_id: int) -> Request:
        """The lane request `request_id` as the Request the object path would hold at this
        point of its life; it leaves the lane (a batch marker or queued round that names
        its row finds it by generation: `EncoderLane.left`)."""
        lane = self._lane
        slot = lane.rows.slot_of[request_id]
        c = lane.rows._columns
        state = int(c["state"][slot])
        request = Request(request_id, lane.engines[int(c["engine"][slot])], total_tokens=int(c["total"][slot]),
                          mrope_delta=int(c["mrope_delta"][slot]), engine_admitted=True)
        peer = int(c["peer"][slot])
        if peer >= 0:
            request.peer = lane.views[peer]
        request.round, request.sent_tokens = int(c["round"][slot]), int(c["sent"][slot])
        request.admitted_at, request.last_progress = float(c["admitted_at"][slot]), float(c["last_progress"][slot])
        request.state = _LANE_STATES[state]
        if state != _SUCCESS:
            request.payload, request.addresses = lane.payloads[slot], lane.addresses[slot]
        lane.payloads[slot] = lane.addresses[slot] = None
        gen = request.lane_gen = int(c["gen"][slot])
        c["gen"][slot] = 0  # (no marker or queued round takes the slot for this row any more)
        lane.rows.remove_id(request_id)
        dict.__setitem__(self.requests, request_id, request)
        if state != _SUCCESS:
            lane.keep_left(gen, request)
        return request

    def _lane_late(self, c: dict, used: np.ndarray, now: float) -> np.ndarray:
        """Which of the lane's rows `used` are past `_overdue`'s deadlines: waiting for their
        first allocation past admission_timeout_s, or transferring with no progress for
        request_timeout_s."""
        state = c["state"][used]
        return ((state == _BOOT) & (now - c["admitted_at"][used] > self.config.admission_timeout_s)) \
            | ((state == _TRANSFERRING) & (now - c["last_progress"][used] > self.config.request_timeout_s))


class _LanguagePeer:
    __slots__ = ("view", "channel")

    def __init__(self, view: EngineView, channel: SendChannel | None) -> None:
        self.view = view
        self.channel = channel


def payload_metadata(payload: Payload, max_bytes: int) -> tuple:
    """The payload's metadata as it travels, checked against this engine's bound."""
    return metadata_records(payload.metadata, max_bytes) if payload.metadata else ()


def _remember(memory: OrderedDict, key: int, value: object) -> None:
    """Keep `value` under `key`, dropping the oldest entries past MAX_PENDING_ALLOCATIONS."""
    memory[key] = value
    while len(memory) > MAX_PENDING_ALLOCATIONS:
        memory.popitem(last=False)
