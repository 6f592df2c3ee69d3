"""The language engine's endpoint: admit, land rounds, decide resumes, hand out payloads.

Where a resume is decided: `_decide`, on the TP leader, and nowhere else. It runs when
a round is complete on every language rank, and it is edge-triggered: each completed
round is decided once, so polling any number of times cannot issue a second resume
(SPEC R5). The leader's allocator is the single source of truth for block indices; the
followers apply its DECISION records (claim, free) in ring order, so indices agree on
every rank (R4). Total length and mrope delta come from the first round's segments only
(R3).

Where the data lives (one model, `docs/integration.md` "Memory"): a request's blocks are
its allocation, the unit of flow control (the encoder side never sends more than they
hold). Its data goes straight into its output tensors whenever they exist when a round
starts to arrive: every round after the first, and the first one too when the budget has
room for N (known from the first segment, before its receive is posted). Only a first
round that finds no budget lands in the request's landing blocks of this rank's pool, and
is read out of them exactly once, when the round is complete, into the outputs (R7; one
launch for all the rounds that completed in the same step). So a payload makes three
passes (pack, wire, unpack) unless the budget is short, four then. Blocks go back to
the pool before the next round's blocks are taken, so a request larger than the whole
pool streams through it, and the allocator may hand back the very same indices (R6). The
outputs are drawn from a bounded budget (`output_budget_bytes`): a request waits for
budget holding only its landing blocks (no data of it is in flight then, so waiting can
never block the stream that would free the budget), in arrival order, and one larger
than the whole budget fails with a clear error. Requests that arrive whole in one
message (most small ones) get their outputs together: one allocation per field, each
request's tensors a contiguous view of it, and on a CPU the message lands with one copy
per field (`_take_outputs_together`).

Which encoder engine serves a request is the router's choice, named at `admit` (a name,
or an index for the layouts of one torchrun world). The request is bound to that engine's
incarnation when the leader admits it; if the engine has not joined yet, the request
waits, holding nothing, until it does (or until `request_timeout_s`). Each encoder
incarnation that serves this rank has a channel of its own (its TP rank `j % encoder_tp`
sends to this language TP rank `j`); records about a request are taken only from the
incarnation it is bound to.

A step's work is done in batches, so that it costs per record and per message more than
per request: the segments of a staging message are bound together (their first rounds
move to TRANSFERRING at once) and land with one launch; the rounds a step completes are
acknowledged or decided together (`_decide` over a list: the completions' blocks go back
in one allocator call and their COMPLETEs go out before any RESUME, so a follower always
frees what a resume may be given); a follower applies a DECISIONS record's runs of first
ADMITs and of COMPLETEs as batches (one claim, one free). Each batch keeps the per-request
order of the single-request rules it stands for, and an entry outside the usual cases
takes those rules.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np
import torch

from embxfer.control import records as rec
from embxfer.kernels import RowTensors, as_bits, ops

from . import lane as lane_module
from .allocator import BlockAllocator
from .cache import PayloadCache
from .channels import RecvChannel, RecvMessage, segment_plan, wire_to_rows
from .endpoint import (
    _LANE_STATES,
    Endpoint,
    Finished,
    Request,
    check_request_id,
    checked_ids,
    log,
)
from .lane import LANE_MIN_BATCH, LaneBatch, LaneRequests, LanguageLane
from .membership import EngineView, Role
from .payload import Item, Payload, check_items, content_hash_bytes, kept_rows, metadata_tensors
from .pool import BlockPool
from .rows import BOOTSTRAPPING as _BOOT
from .rows import SUCCESS as _SUCCESS
from .rows import TRANSFERRING as _TRANSFERRING
from .rows import WAITING_FOR_INPUT as _WAITING
from .state import RequestState

# A TRANSFER whose request this rank has never heard of waits this long at the head of
# its channel for the leader's ADMIT decision before its data is discarded.
UNKNOWN_REQUEST_GRACE_S = 5.0
# Whether a TP-1 language engine keeps its usual requests in the lane (`runtime/lane.py`),
# read when an endpoint is made. Off: it pays only where a step carries many requests per
# record and message, and on an H100 host it took nothing off many_small and added 40 %
# to the batch case's language side (lane.py's docstring). The tests run both paths.
LANE_ENABLED = False
EARLY_MEMORY = 4096
_ADMIT, _RESUME, _COMPLETE, _PIN = rec.DecisionAction.ADMIT.value, rec.DecisionAction.RESUME.value, \
    rec.DecisionAction.COMPLETE.value, rec.DecisionAction.PIN.value
# What a language rank reads of the records every peer publishes (the rest is stepped over).
_T = rec.RecordType
LEADER_WANTS = frozenset({_T.TRANSFER, _T.COMPLETIONS, _T.ABORT, _T.ANNOUNCE, _T.ANNOUNCEMENTS, _T.MEMBER,
                          _T.PAYLOAD_INFO})
FOLLOWER_WANTS = frozenset({_T.TRANSFER, _T.DECISIONS, _T.ABORT, _T.MEMBER, _T.PAYLOAD_INFO})


class Receiver(Endpoint):
    role = "language"

    def __init__(self, *, pool_blocks: int | None = None, **kwargs) -> None:
        self.sources: dict[int, _EncoderPeer] = {}  # encoder incarnation -> its serving rank's channel
        self._engine_waiting: dict[str, list[Request]] = {}  # leader: admitted before the engine joined
        # TRANSFER and PAYLOAD_INFO records from an encoder rank whose engine this rank has
        # not found usable yet (`_early_channel`), replayed in order when its channel is made.
        self._early_records: dict[int, deque[rec.Record]] = {}
        self._lane: LanguageLane | None = None
        super().__init__(**kwargs)
        if self.me.role != Role.LANGUAGE.value:
            raise ValueError(f"{self.me.describe()} is not a language rank")
        blocks = self.config.language_pool_blocks if pool_blocks is None else pool_blocks
        spec = self.spec
        self.pool = BlockPool(blocks, self.config.block_size, spec.dim, spec.dtype, spec.deepstack_layers, spec.device)
        self.allocator = BlockAllocator(blocks, self.config.block_size)
        self.cache = PayloadCache(self.config.cache_bytes)
        self.leader_rank = self.me.incarnation  # an incarnation is named by its TP rank 0's id
        self.bus.wanted = LEADER_WANTS if self.is_leader else FOLLOWER_WANTS
        self.followers: list[int] = []
        # A request's `acks` is a bit mask over the followers (bit i: followers[i] read the
        # current round): an int per request, no set, compared with `_all_acks` once full.
        self._ack_bits: dict[int, int] = {}
        self._all_acks = 0
        self._on_own_engine_usable()
        self.default_tokens = min(self.config.default_alloc_blocks, blocks) * self.config.block_size
        self.output_bytes = 0  # outputs of requests in flight and not taken
        self._admission: deque[Request] = deque()  # leader: FIFO of requests waiting for blocks
        self._resume_waiting: deque[Request] = deque()  # leader: rounds done, no free block yet
        self._landed_rounds: list[Request] = []  # rounds complete in this step, read out together
        self._budget_waiting: deque[Request] = deque()  # complete first rounds waiting for budget
        self._awaiting_free: dict[int, Request] = {}  # follower: released, blocks not yet freed
        # Aborts and size announcements that arrived before this rank's engine admitted
        # the id (a follower's engine may lag its leader; an encoder may be first).
        self._early_aborts: OrderedDict[int, str] = OrderedDict()
        self._announced: OrderedDict[int, tuple[int, int]] = OrderedDict()
        # What this step tells peers, sent as one batch record per peer and kind (`_emit`).
        self._allocations: dict[int, list[tuple]] = {}
        self._completions: dict[int, list[tuple]] = {}
        self._decisions: list[tuple] = []
        self._held: dict[int, list[tuple[int, bytes]]] = {}
        # Items kept in the cache for requests in flight (leader and followers alike, in
        # decision order), and what came with payloads before their first segment: by
        # request id, then by the encoder rank that sent it (`_bind_segment`).
        self._pinned: dict[int, list[bytes]] = {}
        self._infos: OrderedDict[int, dict[int, rec.PayloadInfo]] = OrderedDict()
        # A TP-1 engine's usual requests as rows (`runtime/lane.py`); while it holds any,
        # `requests` is a LaneRequests, which hands out any of them as a Request when asked
        # for it (a plain dict otherwise: a lookup of the object path costs what it did).
        if self.me.tp_size == 1 and LANE_ENABLED:
            self._lane = LanguageLane()

    # -- public API -----------------------------------------------------------------
    def admit(self, request_id: int, encoder_engine: str | int = 0, *, expected_tokens: int | None = None,
              content_hash: bytes | str | None = None, items: list | None = None) -> None:
        """Start receiving `request_id` from `encoder_engine` (its name, or its index in a
        one-world layout). The leader reserves the first allocation (at its next
        `progress()`, with the step's other admissions; or as soon as blocks are free and
        the engine has joined) and announces it: exactly
        `expected_tokens` (rounded up to blocks, capped by the pool) when the size is known
        by then (given here, or announced by the encoder side), else the default
        allocation. With `content_hash` (e.g. the engine's mm_hash) a payload still in
        the cache completes the request at once, without a transfer. With `items` (`Item`s:
        each multimodal item's content hash and rows), the leader looks each up in the
        cache: those it holds are kept for this request and the encoder side is told
        (`Sender.lookup_items`), so it can skip the vision model for them and send the
        other rows only. An engine that is draining, left or dead fails the request at once
        (`state()` says FAILED)."""
        check_request_id(request_id)
        self._check_open("admit")
        name = self._peer_name(Role.ENCODER, encoder_engine, "encoder_engine")
        if expected_tokens is not None and (isinstance(expected_tokens, bool) or not isinstance(expected_tokens, int)
                                            or not 1 <= expected_tokens <= 0xFFFFFFFF):
            raise ValueError(f"expected_tokens={expected_tokens!r}: expected None or an integer in 1..2**32-1")
        content_hash = _content_hash(content_hash)
        items = check_items(items, expected_tokens)
        self._check_admissible(request_id, name, "request_id")
        self._admit(request_id, name, None, expected_tokens, content_hash, items)

    def admit_many(self, request_ids: Sequence[int], encoder_engine: str | int = 0) -> None:
        """`admit` of each id, in order, from one encoder engine: what an engine's scheduler
        admits in one step, for a fraction of the host time of one call per request (the
        engine, the batch and the encoder's incarnation are checked once). Every id is
        checked before any is admitted: ValueError naming the first bad one
        (`request_ids[i]`: not an id, repeated in the batch, already admitted) and nothing
        is admitted. Requests that come with `expected_tokens`, a `content_hash` or `items`
        take `admit`."""
        self._check_open("admit_many")
        name = self._peer_name(Role.ENCODER, encoder_engine, "encoder_engine")
        ids = checked_ids(request_ids)
        for index, request_id in enumerate(ids):
            self._check_admissible(request_id, name, f"request_ids[{index}]")
        resolved = self._peer_view(name) if self.broken is None else None
        if self._lane is not None and len(ids) >= LANE_MIN_BATCH and resolved is not None \
                and resolved[0] is not None and resolved[1] is None and self.is_leader and self.metrics is None \
                and not log.isEnabledFor(logging.DEBUG) \
                and not (self._early_aborts and any(i in self._early_aborts for i in ids)):
            self._lane_admit_many(ids, resolved[0])
            return
        for request_id in ids:
            self._admit(request_id, name, resolved, None, None, ())

    def _check_admissible(self, request_id: int, name: str, field: str) -> None:
        """ValueError if `request_id` is in flight here, but for a follower's request that the
        leader's decision made before this rank's engine admitted it."""
        request = self.requests.get(request_id)
        if request is not None and (self.is_leader or request.engine_admitted or request.engine not in (None, name)):
            raise ValueError(f"{field}={request_id}: already admitted and {request.state.value} "
                             "(take() a SUCCESS, release() a FAILED one first)")

    def _admit(self, request_id: int, name: str, resolved: tuple[EngineView | None, str | None] | None,
               expected_tokens: int | None, content_hash: bytes | None, items: tuple) -> None:
        """Admit a checked id (`_check_admissible`); `resolved`: the encoder engine's
        `_peer_view`, when its caller looked it up once for many."""
        request = self.requests.get(request_id)
        if request is not None:  # a follower: the leader's decision came first
            request.engine = name
            request.engine_admitted = True
            if request.state.terminal:  # it finished before this engine knew of it
                self._just_finished.append(request_id)
            return
        if self.retired:
            self.retired.pop(request_id, None)
        request = Request(request_id, name, expected_tokens=expected_tokens, content_hash=content_hash,
                          engine_admitted=True)
        request.items = items
        self._add(request)
        if self.broken is not None:
            self._fail(request, rec.AbortReason.PEER_DEAD, self.broken, notify=False)
            return
        view, why = resolved or self._peer_view(name)
        if why is not None:
            self._fail(request, rec.AbortReason.PEER_DEAD if "dead" in why else rec.AbortReason.SHUTDOWN, why,
                       notify=False)
            return
        aborted = self._early_aborts.pop(request_id, None) if self._early_aborts else None
        if aborted is not None:
            self._fail(request, rec.AbortReason.USER, aborted, notify=False)
            return
        if not self.is_leader:
            return
        if view is None:
            self._engine_waiting.setdefault(name, []).append(request)  # the engine joins later
            return
        self._bind(request, view)

    def _bind(self, request: Request, view: EngineView) -> None:
        """Leader: bind the request to the encoder incarnation, then cache or queue it."""
        request.peer = view
        self._source(view)
        announced = self._announced.pop(request.request_id, None) if self._announced else None
        if request.expected_tokens is None and announced is not None and announced[1] in view.members:
            request.expected_tokens = announced[0]
        if request.content_hash is not None:
            if self.cache.contains(request.content_hash):
                self._complete_from_cache(request)
                return
            self.cache.misses += 1
        for item in request.items:
            if not self.cache.holds_item(item.content_hash, item.count):
                self.cache.item_misses += 1
            elif self.cache.pin(item.content_hash, request.request_id):
                self._pinned.setdefault(request.request_id, []).append(item.content_hash)
                self._decide_pin(request, item.content_hash)
                self._held.setdefault(view.leader, []).append((request.request_id, item.content_hash))
        self._admission.append(request)

    def arrived(self, request_id: int) -> tuple[int, int | None]:
        """(rows of the request in its outputs so far, its N or None while unknown): for a
        scheduler that starts on what is there, and for debugging a slow transfer. Rows of
        cached items count once its outputs exist."""
        lane = self._lane
        if lane is not None and lane.rows.slot_of and type(request_id) is int:
            slot = lane.rows.slot_of.get(request_id)
            if slot is not None and lane.rows._columns["state"][slot] == _TRANSFERRING:  # (its stretches landed)
                return int(lane.rows._columns["landed"][slot]), int(lane.rows._columns["total"][slot])
        request = self._lookup(check_request_id(request_id))
        if request.state is RequestState.SUCCESS:
            return request.rows, request.rows
        if type(request) is Finished:  # handed back: its outputs are gone
            return 0, request.rows
        if request.total_tokens is None:
            return 0, None
        if request.outputs is None:  # none made yet (a first round in landing blocks), or dropped (failed)
            return 0, request.rows
        # rounds read into the outputs, the current round's rows that landed there (until it
        # is read: `round_landed` counts only a round not read yet), the cached items' rows
        landed = request.sent_tokens + (request.round_landed if request.direct else 0)
        return landed + request.rows - request.total_tokens, request.rows

    def take(self, request_id: int) -> Payload:
        """The completed payload as contiguous tensors; the request is forgotten. The
        tensors are the engine's from now on (and no longer count against the budget)."""
        return self._hand_over(self._takeable(check_request_id(request_id), "request_id"))

    def take_many(self, request_ids: Sequence[int]) -> list[Payload]:
        """`take` of each id, in order: the payloads, as `take` returns them. Every id is
        checked before any is taken (KeyError for one never known here, ValueError naming
        the first other bad one: `request_ids[i]` not an id, repeated, not SUCCESS) and then
        nothing is taken."""
        ids = checked_ids(request_ids)
        if self._lane is not None and self._lane.rows.slot_of:
            payloads = self._lane_take(ids)
            if payloads is not None:
                return payloads
        requests = [self._takeable(request_id, f"request_ids[{index}]") for index, request_id in enumerate(ids)]
        return self._hand_over_all(requests)

    def _takeable(self, request_id: int, field: str) -> Request:
        request = self.requests.get(request_id)
        if request is None:
            if request_id in self.retired:
                raise ValueError(f"{field}={request_id}: already taken or released")
            raise KeyError(f"request {request_id} is not known on rank {self.rank} ({self.role})")
        if request.state is not RequestState.SUCCESS:
            raise ValueError(
                f"{field}={request_id}: take() needs state SUCCESS, it is {request.state.value}"
                + (f" ({request.error})" if request.error else "")
            )
        return request

    def _hand_over(self, request: Request) -> Payload:
        """The outputs of a SUCCESS as a Payload; the request is forgotten."""
        return self._hand_over_all((request,))[0]

    def _hand_over_all(self, requests: Sequence[Request]) -> list[Payload]:
        """`_hand_over` of each, in order: the budget given back and the requests retired
        (remembered, bounded, so that late records are known as late) once for all."""
        payloads, trusted, freed = [], Payload._trusted, 0
        for request in requests:
            outputs, info = request.outputs, request.info
            items = tuple(Item(i.content_hash, i.start, i.count) for i in _items_of(request)) \
                if request.items or info is not None else ()
            payloads.append(trusted(outputs.embeddings, outputs.fill_ids, outputs.mrope_positions, request.mrope_delta,
                                    outputs.deepstack, items,
                                    metadata_tensors(info.metadata) if info is not None and info.metadata else None))
            freed += request.output_bytes
            request.output_bytes = 0
            request.outputs = request.output_addresses = None
        self.output_bytes -= freed
        self._retire_all(requests)
        return payloads

    def abort(self, request_id: int, message: str = "aborted by the language engine") -> None:
        """Fail a request in flight, on both sides; a finished one is released (a SUCCESS
        not taken drops its payload and counts as aborted). Unknown ids: nothing to do."""
        request = self.requests.get(check_request_id(request_id))
        if request is None:
            return
        if request.state is RequestState.SUCCESS:
            self.stats.aborted += 1
        if request.state.terminal:
            self.release(request_id)
            return
        self._fail(request, rec.AbortReason.USER, message, notify=True)

    def release(self, request_id: int) -> None:
        """Forget a finished request (a SUCCESS not taken drops its payload; a FAILED one has
        been seen by the engine), so that its id can be admitted again. ValueError for one
        in flight (abort it first); an unknown or already released id: nothing to do."""
        request = self._finished_request(request_id)
        if request is None:
            return
        if request.state is RequestState.FAILED and not self.is_leader and self.leader_rank not in self.dead_peers \
                and (request.blocks or request.outputs is not None):
            # A follower frees only on the leader's decision, which may still be on its way;
            # keep the old incarnation apart so a re-admitted id cannot be confused with it.
            # For the engine it is released now: remembered as finished like any other, so
            # that its rows still on the wire are known as late (not held as an unknown id's).
            self.requests.pop(request_id, None)
            self._awaiting_free[request_id] = request
            self._remember_finished((request,))
            return
        self._drop_outputs(request)
        self._retire(request)

    # -- records ------------------------------------------------------------------------
    def _on_record(self, record: rec.Record) -> None:
        kind = type(record)
        if kind is rec.Transfer:
            self._on_transfer(record)
        elif kind is rec.Decisions:
            if not self.is_leader and record.src_rank == self.leader_rank:
                self._apply_decisions(record)
        elif kind is rec.Completions:
            if self.is_leader and record.dst_rank == self.rank and record.src_rank in self.followers:
                self._on_follower_acks(record)
        elif kind is rec.Abort:
            if self._abort_for_me(record):
                self._on_abort(record)
        elif kind is rec.Announce or kind is rec.Announcements:
            if self.is_leader and record.dst_rank == self.rank:
                self._on_announce(record)
        elif kind is rec.Member:
            self._member_state(record.src_rank, "draining" if record.state is rec.MemberState.DRAINING else "left")
        elif kind is rec.PayloadInfo:
            if record.dst_rank == self.me.incarnation and (record.src_rank in self.channels
                                                           or self._early_channel(record) is not None):
                # Never kept for the id's next request: one whose request failed here first,
                # or that the leader no longer holds (it admits before the encoder side
                # sends anything, and holds the request until it is taken or released; a
                # follower may hear of the data before its engine admits the id), or one
                # from a rank of another engine than the request is bound to (an earlier
                # request of the id, aborted there).
                request = self.requests.get(record.request_id)
                if request is None and self.is_leader or request is not None and (
                        request.state.terminal
                        or request.peer is not None and record.src_rank not in request.peer.members):
                    self.stats.late_records += 1
                else:
                    infos = self._infos.get(record.request_id)
                    if infos is None:
                        _remember(self._infos, record.request_id, {record.src_rank: record})
                    else:
                        infos[record.src_rank] = record

    def _on_abort(self, record: rec.Abort) -> None:
        request = self.requests.get(record.request_id)
        source = self.directory.view_of(record.src_rank)
        if source is None:
            self.stats.rejected_records += 1
            return
        text = self._abort_text(record)
        if request is None and record.request_id not in self.retired:
            _remember(self._early_aborts, record.request_id, text)
            return
        if request is None or request.state.terminal:
            self.stats.late_records += 1
            return
        if source is not self.directory.my_engine and request.peer is not None and source is not request.peer:
            self.stats.rejected_records += 1  # an encoder engine this request is not bound to
            return
        if source.role is Role.ENCODER and request.peer is None and source.name != request.engine:
            self.stats.rejected_records += 1
            return
        self._fail(request, rec.AbortReason(record.reason), text, notify=False)

    def _on_announce(self, record: rec.Announce | rec.Announcements) -> None:
        """Sizes an encoder leader announced (one from its engine, or those of submits still
        without an allocation): a request still waiting for its first allocation gets an
        exact one; one not admitted yet keeps the size (bounded) for its admission."""
        view = self.directory.view_of(record.src_rank)
        if view is None or view.role is not Role.ENCODER:
            return
        if type(record) is rec.Announce:
            self._announced_size(record.request_id, record.total_tokens, view, record.src_rank)
            return
        e = record.entries
        for request_id, total_tokens in zip(e["request_id"].tolist(), e["total_tokens"].tolist(), strict=True):
            self._announced_size(request_id, total_tokens, view, record.src_rank)

    def _announced_size(self, request_id: int, total_tokens: int, view: EngineView, src_rank: int) -> None:
        lane = self._lane
        slot = lane.rows.slot_of.get(request_id) if lane is not None and lane.rows.slot_of else None
        if slot is not None:  # (the rule below, on the row)
            c = lane.rows._columns
            if c["state"][slot] == _BOOT and c["expected"][slot] < 0 and lane.views[c["peer"][slot]].name == view.name:
                c["expected"][slot] = total_tokens
            return
        request = self.requests.get(request_id)
        if request is None:
            # Kept for the id's admission, also for an id this rank has retired: a size is a
            # hint (a wrong one costs a resume or spare blocks, never data), and the id's
            # next request may well be announced before it is admitted.
            _remember(self._announced, request_id, (total_tokens, src_rank))
            return
        if request.state is RequestState.BOOTSTRAPPING and request.expected_tokens is None \
                and request.engine == view.name:
            request.expected_tokens = total_tokens  # still waiting for blocks: allocate exactly

    def _on_transfer(self, record: rec.Transfer) -> None:
        if record.dst_rank not in (rec.BROADCAST_RANK, self.me.incarnation):
            return  # a stream to another language engine
        channel = self.channels.get(record.src_rank)
        if channel is None:
            channel = self._early_channel(record)
            if channel is None:
                return
        if channel.dead:
            return
        broken = channel.add(record)
        if broken:
            self.stats.rejected_records += 1
            self._channel_broken(channel, broken)

    def _early_channel(self, record: rec.Transfer | rec.PayloadInfo) -> RecvChannel | None:
        """The channel of an encoder rank whose engine this rank has not found usable yet,
        for a record of its stream (TRANSFER, PAYLOAD_INFO). Its sender found the two linked
        before it sent, but this rank checks joining engines only after the step's records
        (a follower, which is not the one that bound the request, can read the stream's
        first records first): check now, and hold the record (bounded) while the engine is
        still joining; `_source` replays what it held, in order."""
        view = self.directory.view_of(record.src_rank)
        if view is None or view.role is not Role.ENCODER or view.state != "joining" \
                or view.members[self.me.tp_rank % view.tp_size] != record.src_rank:
            return None  # not an engine that joins, or a rank that serves another of ours
        self._check_joining()
        channel = self.channels.get(record.src_rank)
        if channel is None and view.state == "joining":
            for member in [m for m in self._early_records if self.directory.view_of(m) is None]:
                del self._early_records[member]  # engines that never became usable
            self._early_records.setdefault(record.src_rank, deque(maxlen=EARLY_MEMORY)).append(record)
        return channel

    def _accept(self, channel: RecvChannel, message: RecvMessage) -> bool:
        """Head-of-line gate of a staging message: bind each segment to its request (or to
        nothing: discard), or wait until every request is known on this rank."""
        if self._lane is not None and self._lane.rows.slot_of:
            accepted = self._lane_accept(channel, message)
            if accepted is not None:
                return accepted
        if not self._accept_gate(message, message.record.segments):
            return False
        source = channel.source
        whole: list[Request] = []
        started: list[Request] = []
        src_rank = message.record.src_rank
        message.requests = [self._bind_segment(segment, source, src_rank, whole, started)
                            for segment in message.record.segments]
        if started:  # (one may have failed on a later segment of this message)
            self._set_states([r for r in started if not r.state.terminal], RequestState.TRANSFERRING)
        if whole:
            self._take_outputs_together(whole, message)
        return True

    def _accept_gate(self, message: RecvMessage, segments: Sequence[rec.Segment]) -> bool:
        """False while a segment's request may still become known on this rank, or its
        round's decision has not been applied here: the message waits at the head."""
        now = time.monotonic()
        for segment in segments:
            request = self.requests.get(segment.request_id)
            if request is None:
                if segment.request_id in self.retired:
                    continue
                if not message.first_seen:
                    message.first_seen = now
                if now - message.first_seen < UNKNOWN_REQUEST_GRACE_S:
                    return False  # the leader's ADMIT decision may not have reached this rank yet
                continue
            if not request.state.terminal and (segment.round > request.round
                                               or segment.round == request.round and not request.blocks):
                return False  # this rank has not applied the leader's decision for that round yet
        return True

    def _bind_segment(self, segment: rec.Segment, source: EngineView, src_rank: int, whole: list[Request],
                      started: list[Request]) -> Request | None:
        """The request `segment` belongs to, checked and bound (None: discard it). A first
        round's request learns N here and goes into `started` (its caller moves them all to
        TRANSFERRING); one whose outputs can be made with the message's others, in `whole`.

        A PAYLOAD_INFO comes just before its request's first segment, from the same rank
        (`SendChannel._send_one`), and only that segment takes it (`_take_info`): an info of
        the id from another rank (another engine's request of the id, aborted) neither
        replaces it nor is taken for it, and goes when the request binds. A first segment
        discarded here (its request released, or failed and forgotten) takes its own rank's
        info with it: kept, it would be handed to the id's next request."""
        request = self.requests.get(segment.request_id)
        if request is None:
            if segment.request_id in self.retired:
                self.stats.late_records += 1
            else:
                self.stats.rejected_records += 1
            if segment.start == 0 and self._infos:
                self._drop_info(segment.request_id, src_rank)
            return None
        if request.state.terminal or segment.round < request.round:
            self.stats.late_records += 1
            return None
        problem = self._check_segment(request, segment, source)
        if problem:
            self.stats.rejected_records += 1
            self._fail(request, rec.AbortReason.INVALID, problem, notify=True)
            return None
        if request.total_tokens is None:  # first round: the only source of N and delta (R3)
            problem = self._take_info(request, segment, src_rank)
            if problem:
                self.stats.rejected_records += 1
                self._fail(request, rec.AbortReason.INVALID, problem, notify=True)
                return None
            need = request.rows * self.spec.bytes_per_token
            if need > self.config.output_budget_bytes:
                self._fail(request, rec.AbortReason.BUDGET,
                           f"N={request.rows} tokens need {need} bytes of outputs, more than "
                           f"output_budget_bytes={self.config.output_budget_bytes}", notify=True)
                return None
            request.total_tokens = segment.total_tokens
            request.mrope_delta = segment.mrope_delta
            request.round_tokens = min(request.total_tokens - request.sent_tokens, request.allocated_tokens)
            started.append(request)
        if request.round_accepted == 0:  # the round's first segment: where will it land?
            if request.outputs is not None:
                request.direct = True
            elif segment.count == request.rows:  # all of it, in this message: outputs made together
                request.direct = False
                whole.append(request)
            else:
                request.direct = self._take_outputs(request)
        request.round_accepted += segment.count
        request.last_progress = time.monotonic()
        return request

    def _take_info(self, request: Request, segment: rec.Segment, src_rank: int) -> str | None:
        """What came with the payload (items, metadata; PayloadInfo, read just before its
        first segment, from the segment's own rank): which rows travel, and the cached items
        that fill the others."""
        # (the request is bound from now on: what other ranks sent of the id is not its)
        infos = self._infos.pop(request.request_id, None) if self._infos else None
        info = infos.get(src_rank) if infos is not None else None
        request.rows = segment.total_tokens
        if info is None:
            return None
        if info.wire_tokens != segment.total_tokens:
            return (f"the payload's info says {info.wire_tokens} of {info.total_tokens} rows travel, its first "
                    f"segment says {segment.total_tokens}")
        pinned = self._pinned.get(request.request_id, ())
        skipped = [item for item in info.items if item.skipped]
        for item in skipped:
            if item.content_hash not in pinned or not self.cache.holds_item(item.content_hash, item.count):
                return (f"the encoder side skipped item {item.content_hash.hex()[:16]} (rows {item.start}.."
                        f"{item.start + item.count}), which this rank does not hold for this request")
        request.info, request.rows = info, info.total_tokens
        request.kept = kept_rows([(i.start, i.count) for i in skipped], info.total_tokens)[0] if skipped else None
        return None

    def _drop_info(self, request_id: int, src_rank: int) -> None:
        """Forget the PAYLOAD_INFO that `src_rank` sent for `request_id`; one from another
        rank stays for that rank's first segment (another request of the id)."""
        infos = self._infos.get(request_id)
        if infos is not None and infos.pop(src_rank, None) is not None and not infos:
            del self._infos[request_id]

    def _fill_items(self, request: Request) -> None:
        """The rows of the items the encoder side skipped, from the cache, their positions
        moved to where each item sits in this request (its anchor): one copy call for all
        of them, one add for every shifted axis (scalars: no upload, no wait). Floating rows
        are copied as same-width integers (`as_bits`): on CUDA, `_foreach_copy_`'s fast path
        for a list of one half-precision dtype computes in float32 and would turn NaN
        payloads into the canonical NaN."""
        destinations, sources, axes, shifts = [], [], [], []
        for item in request.info.items:
            if item.skipped:
                cached = self.cache.item(item.content_hash)
                target = RowTensors(*(None if t is None else t[:, item.start : item.start + item.count] if i == 2
                                      else t[item.start : item.start + item.count]
                                      for i, t in enumerate(request.outputs)))
                for source, dest in zip(cached, target, strict=True):
                    if source is not None:
                        destinations.append(as_bits(dest))
                        sources.append(as_bits(source))
                for axis, shift in enumerate(item.anchor):
                    if shift:
                        axes.append(target.mrope_positions[axis])
                        shifts.append(shift)
        if destinations:
            torch._foreach_copy_(destinations, sources)
        if axes:
            torch._foreach_add_(axes, shifts)

    def _check_segment(self, request: Request, s: rec.Segment, source: EngineView) -> str | None:
        if request.peer is None:  # a follower binds on the first segment from its serving rank
            if request.engine not in (None, source.name):
                return f"TRANSFER from {source.describe()}, the request was admitted from '{request.engine}'"
            request.peer, request.engine = source, source.name
        if request.peer is not source:
            return f"TRANSFER from {source.describe()}, the request is bound to {request.peer.describe()}"
        if request.total_tokens is not None and (s.total_tokens != request.total_tokens
                                                 or s.mrope_delta != request.mrope_delta):
            return (f"TRANSFER round {s.round} says N={s.total_tokens}, delta={s.mrope_delta}; "
                    f"the first round said N={request.total_tokens}, delta={request.mrope_delta}")
        expected_start = request.sent_tokens + request.round_accepted
        if s.start != expected_start:
            return f"TRANSFER segment starts at token {s.start}, expected {expected_start}"
        round_tokens = min(s.total_tokens - request.sent_tokens, request.allocated_tokens)
        if s.start + s.count > request.sent_tokens + round_tokens:
            return (f"TRANSFER segment [{s.start}, {s.start + s.count}) overruns round {s.round} "
                    f"[{request.sent_tokens}, {request.sent_tokens + round_tokens}) = min(remaining, "
                    f"allocated {request.allocated_tokens})")
        if request.kept is not None and wire_to_rows(request.kept, s.start, s.count) is None:
            return f"TRANSFER segment [{s.start}, {s.start + s.count}) crosses a skipped item"
        return None

    def _landed(self, message: RecvMessage, staging) -> None:
        """A staging message arrived: its live segments go straight into their outputs
        (one launch), or into landing blocks (one launch) for first rounds without them."""
        laned = 0  # segments the lane landed (its positions are None in message.requests)
        if message.lane is not None:
            laned = self._lane_landed(message, staging)
            if laned < 0:
                return
        pooled, blocks, offsets, counts = [], [], [], []
        direct, outputs, starts = [], [], []
        for index, (segment, request) in enumerate(zip(message.record.segments, message.requests, strict=True)):
            if request is None or request.state.terminal:
                continue
            if request.direct:
                direct.append(index)
                outputs.append(request.outputs)
                starts.append(segment.start if request.kept is None else wire_to_rows(request.kept, segment.start,
                                                                                       segment.count))
            else:
                pooled.append(index)
                blocks.append(_block_array(request))
                offsets.append(segment.start - request.sent_tokens)
                counts.append(segment.count)
        channel = self.channels[message.record.src_rank]
        channel.discarded += len(message.requests) - len(pooled) - len(direct) - laned
        if direct:
            whole = len(direct) == len(message.requests)
            if whole and message.together is not None and not self.spec.is_cuda:
                ops.unpack_together(staging, message.layout, message.together)  # a copy per field
            elif self.spec.is_cuda:  # one launch, rows addressed from the table
                if whole and message.together is not None:
                    addresses = ops.together_addresses(message.together, [r.rows for r in message.requests])
                else:
                    addresses = [_output_addresses(message.requests[i]) for i in direct]
                ops.unpack_addressed_rows(staging, message.layout, outputs[0], addresses, starts, outputs,
                                          segments=None if whole else direct)
            else:
                ops.unpack_to_rows(staging, message.layout, outputs, starts, segments=None if whole else direct)
        if pooled:
            plan = segment_plan(blocks, offsets, counts, self.config.block_size)
            whole = len(pooled) == len(message.requests)
            ops.unpack(staging, message.layout, self.pool.tensors, plan, segments=None if whole else pooled)
        now = time.monotonic()
        done = []
        for index in (*direct, *pooled):
            request = message.requests[index]
            request.round_landed += message.record.segments[index].count
            request.last_progress = now
            if request.round_landed == request.round_tokens:
                (done if request.direct else self._landed_rounds).append(request)
        if done:
            self._rounds_read(done)

    def _take_outputs(self, request: Request) -> bool:
        """Give `request` its outputs now if the budget has room and no one waits for it."""
        need = request.rows * self.spec.bytes_per_token
        if self._budget_waiting or self.output_bytes + need > self.config.output_budget_bytes:
            return False
        request.outputs = self.pool.empty_rows(request.rows)
        request.output_bytes = need
        self.output_bytes += need
        if request.kept is not None:
            self._fill_items(request)
        return True

    def _take_outputs_together(self, requests: list[Request], message: RecvMessage) -> None:
        """Outputs for requests that arrive whole in one message: one allocation per field
        for all of them when the budget has room for all and no one waits for it, each
        request's tensors a contiguous view of it (the memory is freed once every view is
        dropped: the engine may keep at most one message's worth beyond what it holds);
        else one by one (`_take_outputs`)."""
        per_token = self.spec.bytes_per_token
        need = sum(r.rows for r in requests) * per_token
        if len(requests) == 1 or self._budget_waiting or self.output_bytes + need > self.config.output_budget_bytes:
            for request in requests:
                request.direct = self._take_outputs(request)
            return
        together, views = self.pool.empty_rows_together([r.rows for r in requests])
        for request, outputs in zip(requests, views, strict=True):
            request.outputs, request.direct = outputs, True
            request.output_bytes = request.rows * per_token
        self.output_bytes += need
        if len(requests) == len(message.requests) and all(r is q for r, q in zip(requests, message.requests, strict=True)):
            message.together = together

    def _read_out(self) -> None:
        """Read every round that landed in blocks and completed in this step out into the
        request's outputs, with one launch (R7: once per round, when it is complete). A
        first round takes its outputs from the budget first, in arrival order; one that
        does not fit waits (holding only its landing blocks) and every first round behind
        it waits too."""
        candidates = [*self._budget_waiting, *self._landed_rounds]
        self._budget_waiting, self._landed_rounds = deque(), []
        ready = []
        for request in candidates:
            if request.state.terminal:
                continue
            if request.outputs is None and not self._take_outputs(request):
                self._budget_waiting.append(request)
                continue
            ready.append(request)
        if not ready:
            return
        # A round is read in pieces that each land in one stretch of the outputs (one piece,
        # unless the encoder side skipped cached items inside it).
        pieces = [(r, offset, count, row) for r in ready for offset, count, row in _round_pieces(r)]
        counts = [count for _, _, count, _ in pieces]
        plan = segment_plan([_block_array(r) for r, _, _, _ in pieces], [offset for _, offset, _, _ in pieces], counts,
                            self.config.block_size)
        starts = np.array([row for _, _, _, row in pieces], dtype=np.int64)
        if self.spec.is_cuda:
            addresses = np.array([_output_addresses(r) for r, _, _, _ in pieces], dtype=np.int64)
        else:
            addresses = None
        ops.gather_addressed(self.pool.tensors, plan, counts, [r.outputs for r, _, _, _ in pieces], addresses, starts)
        self._rounds_read(ready)

    def _rounds_read(self, requests: list[Request]) -> None:
        """These requests' current rounds are in their outputs: acknowledge or decide."""
        if not requests:
            return
        now, tokens = time.monotonic(), 0
        acks = None if self.is_leader else self._completions.setdefault(self.leader_rank, [])
        for request in requests:
            request.sent_tokens += request.round_tokens
            request.round_landed = 0  # (now counted in sent_tokens)
            tokens += request.round_tokens
            request.round_read = True
            request.last_progress = now
            if acks is not None:
                acks.append((request.request_id, request.round, request.sent_tokens, request.total_tokens, 0))
        self.stats.rounds += len(requests)
        self.stats.tokens += tokens
        if acks is None:
            self._decide(requests)

    def _drop_outputs(self, request: Request) -> None:
        self.output_bytes -= request.output_bytes
        request.output_bytes = 0
        request.outputs = request.output_addresses = None

    # -- leader: decisions ------------------------------------------------------------------
    def _on_follower_acks(self, record: rec.Completions) -> None:
        """A follower read these requests' rounds (one COMPLETIONS record: its columns,
        no entry objects); a request whose every rank has read its round is decided."""
        bit, requests = self._ack_bits[record.src_rank], self.requests
        entries = record.entries
        acked = []
        for request_id, round_ in zip(entries["request_id"].tolist(), entries["round"].tolist(), strict=True):
            request = requests.get(request_id)
            if request is None or request.state.terminal or round_ != request.round or request.acks & bit:
                self.stats.late_records += 1  # (or a repeated acknowledgement of the round)
                continue
            request.acks |= bit
            acked.append(request)
        self._decide(acked)

    def _decide(self, requests: list[Request]) -> None:
        """Complete or resume each request whose current round every language rank has
        read. The completions are one batch, decided (and broadcast) before any resume, so
        a follower frees their blocks before a resume may be given them; a request that
        resumes frees its blocks just before it allocates the next round's (so it gets
        them back, at least: blocks that a follower still sees as held by a request whose
        next decision is not out yet are never handed to another)."""
        ready, all_acks = [], self._all_acks
        for request in requests:
            if request.round_read and request.acks == all_acks:
                request.round_read = False  # (decided once, even if listed twice)
                request.acks = 0
                ready.append(request)
        if not ready:
            return
        done, resuming = [], []
        for request in ready:
            (done if request.sent_tokens == request.total_tokens else resuming).append(request)
        if done:
            self._release_all(done)
            if self.followers:
                for request in done:
                    self._broadcast_decision(request, rec.DecisionAction.COMPLETE, request.content_hash or b"")
            self._complete(done, [r.content_hash for r in done])
            completions = self._completions
            for request in done:
                completions.setdefault(request.peer.leader, []).append(
                    (request.request_id, request.round, request.sent_tokens, request.total_tokens, 0))
        for request in resuming:
            self._release_blocks(request)
            request.resume_due = True
            if not self._try_resume(request):
                self._resume_waiting.append(request)

    def _complete(self, requests: list[Request], content_hashes: list[bytes | None]) -> None:
        """SUCCESS, for a batch; with the leader's content hash, a copy of a request's
        payload goes into the cache. Every rank does each request's cache work (its
        payload, its items, its pins) request by request in decision order, however its
        batches are cut, so that the ranks' caches stay identical."""
        caching, pinned = self.cache.capacity_bytes, self._pinned
        for request, content_hash in zip(requests, content_hashes, strict=True):
            if content_hash:
                self.cache.insert(content_hash, request.outputs, request.mrope_delta)
            if caching:
                self._cache_items(request)
            if pinned:
                self._unpin(request.request_id)
        self._set_states(requests, RequestState.SUCCESS)

    def _cache_items(self, request: Request) -> None:
        """Every item this request brought (not taken from the cache) goes into the cache,
        on every rank in decision order, from the rows this rank received."""
        if request.outputs is None or not self.cache.capacity_bytes:
            return
        out = request.outputs
        for item in _items_of(request):
            if not item.skipped:
                end = item.start + item.count
                self.cache.insert_item(item.content_hash, RowTensors(
                    out.embeddings[item.start : end], out.fill_ids[item.start : end],
                    out.mrope_positions[:, item.start : end],
                    None if out.deepstack is None else out.deepstack[item.start : end]))

    def _unpin(self, request_id: int) -> None:
        pinned = self._pinned.pop(request_id, None)
        if pinned:
            self.cache.unpin_request(request_id, pinned)

    def _try_resume(self, request: Request) -> bool:
        remaining = request.total_tokens - request.sent_tokens
        blocks = self.allocator.allocate_available(remaining, self.config.max_resume_tokens)
        if blocks is None:
            return False
        request.resume_due = False
        request.round += 1
        request.resumes += 1
        self.stats.resumes += 1
        self._assign(request, blocks)
        self._broadcast_decision(request, rec.DecisionAction.RESUME)
        self._announce(request)
        return True

    def _admit_waiting(self) -> bool:
        """Resumes first (they free what they hold and never wait behind admissions), then
        admissions in arrival order."""
        if not (self._resume_waiting or self._admission):
            return False  # (what an idle loop asks every time)
        worked = False
        while self._resume_waiting:
            request = self._resume_waiting[0]
            if request.state.terminal or not request.resume_due:
                self._resume_waiting.popleft()
                continue
            if not self._try_resume(request):
                return worked
            self._resume_waiting.popleft()
            worked = True
        admission, admitted = self._admission, []
        pool_tokens = self.allocator.num_blocks * self.config.block_size
        while admission:
            request = admission[0]
            if type(request) is LaneBatch:
                done, moved = self._lane_admissions(request, admitted, pool_tokens)
                worked |= moved
                if not done:
                    break
                admission.popleft()
                continue
            if request.state is not RequestState.BOOTSTRAPPING or request.round >= 0:
                admission.popleft()
                continue
            if not self._admit_one(request, admitted, pool_tokens):
                break
            admission.popleft()
        if admitted:
            self._set_states(admitted, RequestState.WAITING_FOR_INPUT)
        return worked or bool(admitted)

    def _admit_one(self, request: Request, admitted: list[Request], pool_tokens: int) -> bool:
        """The first allocation of a request waiting for blocks (`admitted` takes it), or
        False when the pool cannot hold it now."""
        tokens = self.default_tokens
        if request.expected_tokens is not None:
            tokens = min(request.expected_tokens, pool_tokens)
        blocks = self.allocator.allocate(tokens)
        if blocks is None:
            return False
        request.round = 0
        self._assign(request, blocks)
        admitted.append(request)
        self._broadcast_decision(request, rec.DecisionAction.ADMIT)
        self._announce(request)
        return True

    def _assign(self, request: Request, blocks: list[int], array: np.ndarray | None = None) -> None:
        request.blocks = blocks
        request.block_array = array  # made when first needed (`_block_array`): most rounds land in the outputs
        request.allocated_tokens = self.allocator.allocated_tokens(blocks)  # R2
        request.round_accepted = request.round_landed = 0
        if request.total_tokens is not None:
            request.round_tokens = min(request.total_tokens - request.sent_tokens, request.allocated_tokens)
        request.last_progress = time.monotonic()

    def _announce(self, request: Request) -> None:
        self._allocations.setdefault(request.peer.leader, []).append(
            (request.request_id, request.round, request.sent_tokens, request.allocated_tokens))

    def _broadcast_decision(self, request: Request, action: rec.DecisionAction, content_hash: bytes = b"") -> None:
        if not self.followers:
            return
        # The action as its plain int: numpy converts a column of IntEnum members four times
        # slower (Decisions.of).
        self._decisions.append((request.request_id, max(request.round, 0), action._value_, request.sent_tokens,
                                request.total_tokens or 0, request.allocated_tokens, request.mrope_delta,
                                content_hash, request.blocks))

    def _decide_pin(self, request: Request, content_hash: bytes) -> None:
        if self.followers:
            self._decisions.append((request.request_id, 0, _PIN, 0, 0, 0, 0, content_hash, ()))

    def _emit(self) -> None:
        """This step's allocations, completions and decisions, one batch record per peer and
        kind, cut to fit a frame; decisions keep the order they were made in."""
        if not (self._held or self._allocations or self._completions or self._decisions):
            return  # nothing this step (what an idle loop asks every time)
        capacity = self.bus.outbox.capacity
        for pending, kind in ((self._held, rec.HeldItems), (self._allocations, rec.Allocations),
                              (self._completions, rec.Completions)):
            if pending:
                fit = kind.entries_that_fit(capacity)
                for dst, items in pending.items():
                    if kind is not rec.HeldItems and self._lane is not None:  # the lane's entries are arrays
                        entries = _entry_array(items, kind.ENTRY)
                        for first in range(0, len(entries), fit):
                            self._publish(kind.trusted(src_rank=self.rank, dst_rank=dst,
                                                       entries=entries[first : first + fit]))
                        continue
                    for first in range(0, len(items), fit):
                        self._publish(kind.of(self.rank, dst, items[first : first + fit]))
                pending.clear()
        if self._decisions:
            items, self._decisions = self._decisions, []
            # Cut where the next decision would overflow the frame (Decisions.bytes_for: a
            # fixed part, then per entry, then at most 3 bytes per block) or name more
            # blocks than a pool holds (what one record may make a receiver claim).
            fixed = rec.Decisions.bytes_for(0, 0)
            room, per_entry = capacity - fixed, rec.Decisions.bytes_for(1, 0) - fixed
            pool = self.allocator.num_blocks
            first = used = blocks = 0
            for index, item in enumerate(items):
                count = len(item[8])
                if index > first and (used + per_entry + 3 * count > room or blocks + count > pool):
                    self._publish(rec.Decisions.of(self.rank, items[first:index]))
                    first, used, blocks = index, 0, 0
                used += per_entry + 3 * count
                blocks += count
            self._publish(rec.Decisions.of(self.rank, items[first:]))

    # -- the cache ------------------------------------------------------------------------
    def _complete_from_cache(self, request: Request) -> None:
        """Leader: the payload of `request.content_hash` is cached: complete everywhere at
        once, without a transfer (followers serve their own copy)."""
        self._broadcast_decision(request, rec.DecisionAction.CACHED, request.content_hash)
        self._completions.setdefault(request.peer.leader, []).append(
            (request.request_id, 0, 0, 0, rec.COMPLETION_CACHED))
        self._serve_cached(request, request.content_hash)

    def _serve_cached(self, request: Request, content_hash: bytes) -> None:
        """Complete `request` from the cache entry the leader named (a copy: cached tensors
        are never handed out twice as the same object)."""
        entry = self.cache.hit(content_hash)
        if entry is None:
            self._fail(request, rec.AbortReason.INTERNAL,
                       "the TP leader served this request from its cache, which this rank does not hold",
                       notify=self.is_leader)
            return
        rows, delta = entry
        request.total_tokens = request.sent_tokens = rows.embeddings.shape[0]
        request.mrope_delta = delta
        request.outputs, request.output_addresses = self.pool.clone_rows(rows), None
        request.output_bytes = request.total_tokens * self.spec.bytes_per_token
        self.output_bytes += request.output_bytes
        self.stats.cached += 1
        self._set_state(request, RequestState.SUCCESS, "served from the cache")

    # -- followers: apply the leader's decisions ---------------------------------------------
    def _apply_decisions(self, record: rec.Decisions) -> None:
        """The leader's decisions, in its order. The entries of a step's usual work, none
        naming a cache entry, are applied from the record's columns: runs of first-round
        ADMITs (of requests admitted here or not yet) and of COMPLETEs of requests in flight
        as batches (`_start_first_rounds`, `_finish_rounds`), the RESUME or ADMIT of a
        request's next round one by one (`_start_round`). Any other entry goes through
        `_apply_decision` as one `Decision` (it holds every rule: the usual kinds are its
        plain cases, not other rules)."""
        entries = record.entries
        ids, rounds = entries["request_id"].tolist(), entries["round"].tolist()
        actions, totals = entries["action"].tolist(), entries["total_tokens"].tolist()
        hashed = entries["hash_length"].tolist()
        blocks = record.block_lists()
        requests, retired, awaiting = self.requests, self.retired, self._awaiting_free
        decisions = None
        # One run at a time: first ADMITs or COMPLETEs, applied when an entry of another
        # kind comes, or another entry about a request in the run: every entry is judged on
        # what the entries before it did (a repeated one is then late, as one by one).
        run: list[tuple] = []
        run_kind, in_run = None, set()

        def flush() -> None:
            nonlocal run, run_kind, in_run
            if run:
                (self._start_first_rounds if run_kind == _ADMIT else self._finish_rounds)(run)
                run, run_kind, in_run = [], None, set()

        for index, request_id in enumerate(ids):
            action = actions[index]
            if run and (action != run_kind or request_id in in_run):
                flush()
            request = requests.get(request_id)
            if action == _ADMIT and request is None and request_id not in retired:
                request = self._adopt(request_id)
            if request is not None and not request.state.terminal and not hashed[index]:
                if action == _ADMIT and rounds[index] == 0 and request.round == -1:
                    run_kind = _ADMIT
                    in_run.add(request_id)
                    run.append((request, blocks[index]))
                    continue
                if action == _COMPLETE and request_id not in awaiting:
                    run_kind = _COMPLETE
                    in_run.add(request_id)
                    run.append((request, totals[index]))
                    continue
                if (action == _ADMIT or action == _RESUME) and rounds[index] == request.round + 1:
                    flush()  # (first ADMITs of other requests)
                    self._start_round(request, rounds[index], blocks[index], None, action == _ADMIT)
                    continue
            flush()
            if decisions is None:
                decisions = record.decisions()
            self._apply_decision(decisions[index])
        flush()

    def _apply_decision(self, d: rec.Decision) -> None:
        if d.action is rec.DecisionAction.PIN:
            # The leader keeps this cached item for the request (it comes before the
            # request's ADMIT): so does this rank, in the same order.
            if self.cache.pin(d.content_hash, d.request_id):
                self._pinned.setdefault(d.request_id, []).append(d.content_hash)
            return
        if d.action in (rec.DecisionAction.FAIL, rec.DecisionAction.COMPLETE) and d.request_id in self._awaiting_free:
            self._settle_terminal(self._awaiting_free.pop(d.request_id), d)
            return
        request = self.requests.get(d.request_id)
        if request is not None and request.state is RequestState.FAILED \
                and d.action in (rec.DecisionAction.FAIL, rec.DecisionAction.COMPLETE):
            self._settle_terminal(request, d)
            return
        if request is None and d.action in (rec.DecisionAction.ADMIT, rec.DecisionAction.CACHED) \
                and d.request_id not in self.retired:
            request = self._adopt(d.request_id)
        if request is None or request.state.terminal and d.action is not rec.DecisionAction.FAIL:
            self.stats.late_records += 1
            return
        if d.action is rec.DecisionAction.CACHED:
            self._serve_cached(request, d.content_hash)
            return
        if d.action in (rec.DecisionAction.ADMIT, rec.DecisionAction.RESUME):
            if d.round != request.round + 1:
                # A replay (round already applied) is late; a gap means a lost decision.
                if d.round <= request.round:
                    self.stats.late_records += 1
                else:
                    self.stats.rejected_records += 1
                    self._fail(request, rec.AbortReason.INTERNAL,
                               f"decision for round {d.round}, this rank is at round {request.round}", notify=True)
                return
            self._start_round(request, d.round, d.blocks.tolist(), d.blocks, d.action is rec.DecisionAction.ADMIT)
            return
        if d.action is rec.DecisionAction.COMPLETE:
            self._finish_round(request, d.total_tokens, d.content_hash)
        else:  # FAIL / FREE: the leader has freed the blocks; so does this rank
            self._release_blocks(request)
            self._fail(request, rec.AbortReason.INTERNAL, "failed by the TP leader", notify=False)
            if request.state is RequestState.FAILED:
                # This is the leader's last word on it: nothing is left to keep its rows for
                # (`_fail_cleanup`), and a release must not wait for another decision.
                self._drop_outputs(request)

    def _adopt(self, request_id: int) -> Request:
        """A request the leader admitted before this rank's engine did (admit() may come
        later). An abort seen before the decision is the leader's to act on: its FAIL follows."""
        self._early_aborts.pop(request_id, None)
        return self._add(Request(request_id, None))

    def _start_round(self, request: Request, round_: int, blocks: list[int], array: np.ndarray | None,
                     admit: bool) -> None:
        """The leader's ADMIT or RESUME of the request's next round: this rank frees the
        blocks of the round before and claims the very blocks the leader took."""
        self._release_blocks(request)
        try:
            self.allocator.claim(blocks)
        except ValueError as exc:  # the allocators disagree: never write into someone else's blocks
            self.stats.rejected_records += 1
            self._fail(request, rec.AbortReason.INTERNAL, f"cannot apply the leader's blocks: {exc}", notify=True)
            return
        request.round = round_
        self._assign(request, blocks, array)
        if admit:
            self._set_state(request, RequestState.WAITING_FOR_INPUT)
        else:
            request.resumes += 1
            self.stats.resumes += 1

    def _start_first_rounds(self, starts: list[tuple[Request, list[int]]]) -> None:
        """`_start_round` for a run of ADMITs of first rounds (requests holding no blocks):
        all their blocks claimed in one call; if that fails, one by one, so that exactly
        the request whose blocks disagree fails."""
        try:
            self.allocator.claim([b for _, blocks in starts for b in blocks])
        except ValueError:
            for request, blocks in starts:
                self._start_round(request, 0, blocks, None, True)
            return
        for request, blocks in starts:
            request.round = 0
            self._assign(request, blocks)
        self._set_states([request for request, _ in starts], RequestState.WAITING_FOR_INPUT)

    def _finish_round(self, request: Request, total_tokens: int, content_hash: bytes) -> None:
        """The leader's COMPLETE: SUCCESS if this rank read all `total_tokens` rows too."""
        self._finish_rounds([(request, total_tokens)], [content_hash])

    def _finish_rounds(self, finishes: list[tuple[Request, int]], content_hashes: list[bytes] | None = None) -> None:
        """The leader's COMPLETEs, as one batch: SUCCESS for each request whose rows this
        rank read up to the `total_tokens` the leader says; FAILED for any other."""
        requests = [request for request, _ in finishes]
        self._release_all(requests)
        hashes = content_hashes or [None] * len(requests)
        if all(request.sent_tokens == total for request, total in finishes):
            self._complete(requests, hashes)
            return
        for (request, total_tokens), content_hash in zip(finishes, hashes, strict=True):
            if request.sent_tokens != total_tokens:
                self._fail(request, rec.AbortReason.INTERNAL,
                           f"leader completed at {total_tokens} tokens, this rank read {request.sent_tokens}",
                           notify=True)
                self._drop_outputs(request)  # (the leader's COMPLETE was its last word on it)
            else:
                self._complete([request], [content_hash])

    def _settle_terminal(self, request: Request, d: rec.Decision) -> None:
        """Follower: the leader's last word on a request this rank failed on its own. A
        COMPLETE means the leader finished it (and cached it): so does this rank's cache,
        from what this rank read, so that the caches stay identical."""
        if d.action is rec.DecisionAction.COMPLETE and d.content_hash and request.outputs is not None \
                and request.sent_tokens == d.total_tokens:
            self.cache.insert(d.content_hash, request.outputs, request.mrope_delta)
        self._drop_outputs(request)
        self._release_blocks(request)

    def _release_blocks(self, request: Request) -> None:
        if request.blocks:
            self._release_all((request,))

    def _release_all(self, requests: Sequence[Request]) -> None:
        """Give back what these requests' current rounds hold, in order (one allocator call)."""
        holding = [request for request in requests if request.blocks]
        self.allocator.free_lists([request.blocks for request in holding])
        for request in holding:
            request.blocks, request.block_array, request.allocated_tokens = (), None, 0

    # -- pumping and failure ---------------------------------------------------------------
    def _pump(self) -> bool:
        self._lane_settled()
        worked = self._admit_waiting() if self.is_leader else False
        for channel in self.channels.values():
            worked |= channel.pump(lambda m, c=channel: self._accept(c, m), self._landed)
        if self._landed_rounds or self._budget_waiting:
            self._read_out()
        return worked

    def _blocks_in_use(self) -> int:
        return self.allocator.num_used

    # -- encoder engines -----------------------------------------------------------------
    def _on_own_engine_usable(self) -> None:
        own = self.directory.my_engine
        if own.complete:
            self.followers = list(own.members[1:])
            self._ack_bits = {rank: 1 << i for i, rank in enumerate(self.followers)}
            self._all_acks = (1 << len(self.followers)) - 1

    def _on_engine_usable(self, view: EngineView) -> None:
        if view.role is not Role.ENCODER:
            return
        self._source(view)
        waiting = self._engine_waiting.pop(view.name, [])
        for request in waiting:
            if not request.state.terminal:
                self._bind(request, view)

    def _source(self, view: EngineView) -> _EncoderPeer:
        """The channel from the encoder rank of `view` that serves this rank."""
        source = self.sources.get(view.incarnation)
        if source is None:
            serving = view.members[self.me.tp_rank % view.tp_size]
            channel = RecvChannel(serving, self.transport, self.spec, depth=self.config.staging_depth,
                                  staging_bytes=self.config.staging_bytes)
            channel.source = view
            self.channels[serving] = channel
            source = self.sources[view.incarnation] = _EncoderPeer(view, serving, channel)
            for record in self._early_records.pop(serving, ()):
                self._on_record(record)
        return source

    def _channel_broken(self, channel: RecvChannel, why: str) -> None:
        channel.dead = True
        for request in list(self.requests.values()):
            if request.peer is channel.source:
                self._fail(request, rec.AbortReason.INVALID, why, notify=True)

    def _timeout_applies(self, request: Request) -> bool:
        # Waiting in the admission queue for free blocks is backpressure, not a fault; but
        # an engine that never joins is.
        return request.state is not RequestState.BOOTSTRAPPING or (request.peer is None and self.is_leader)

    def _fail_cleanup(self, request: Request) -> None:
        request.resume_due = False
        if self._infos:  # what came with its payload, if its first segment never did
            self._infos.pop(request.request_id, None)
        self._unpin(request.request_id)
        leader_gone = self.leader_rank in self.dead_peers or self.broken is not None
        if self.is_leader or leader_gone:
            self._drop_outputs(request)
        # else a follower keeps what it read until the leader's decision for the request
        # arrives: the leader may have completed it already (this rank's last
        # acknowledgement crossed its own abort), and then every rank must add the same
        # payload to its cache (`_settle_terminal`).
        if self.is_leader:
            self._release_blocks(request)
            if request.round >= 0:
                self._broadcast_decision(request, rec.DecisionAction.FAIL)
        elif leader_gone:
            self._release_blocks(request)  # no decision will ever come

    def _on_engine_lost(self, view: EngineView, reason: rec.AbortReason, why: str) -> None:
        """An encoder incarnation died or left: exactly its requests fail. One that left (it
        drained: what it had in flight was complete on the language side) takes nothing
        with it that has all its rows here: a follower may learn of the leave before its
        leader's last decision for such a request, which then completes as usual."""
        left = reason is rec.AbortReason.SHUTDOWN
        for request in list(self.requests.values()):
            if request.peer is view or (request.peer is None and request.engine == view.name):
                if left and request.total_tokens is not None and not request.state.terminal \
                        and request.sent_tokens + request.round_landed >= request.total_tokens:
                    continue
                self._fail(request, reason, why, notify=self.is_leader)
        for request in self._engine_waiting.pop(view.name, []):
            if not request.state.terminal:
                self._fail(request, reason, why, notify=False)
        for member in view.members:
            self._early_records.pop(member, None)
        source = self.sources.pop(view.incarnation, None)
        if source is not None:
            source.channel.dead = True
            self.channels.pop(source.serving, None)

    def _on_own_engine_lost(self, rank: int, why: str) -> None:
        """A TP peer of this language engine is lost: nothing of this incarnation can
        complete any more; what the dead leader would have freed is freed here. A SUCCESS
        is finished, not in flight: its payload (all its rows, read by this rank) stays for
        the engine's `take`, which may be in the very step that learned of the loss."""
        for request in [*self.requests.values(), *self._awaiting_free.values()]:
            self._release_blocks(request)
            if request.state is not RequestState.SUCCESS:
                self._drop_outputs(request)
        self._awaiting_free.clear()

    # -- the lane (runtime/lane.py) ---------------------------------------------------------
    def _lane_admit_many(self, ids: list[int], view: EngineView) -> None:
        """`_admit` and `_bind` of checked ids, as rows: one batch in the admission queue."""
        lane, now = self._lane, time.monotonic()
        if self.retired:
            retired = self.retired
            for request_id in ids:
                retired.pop(request_id, None)
        expected: object = -1
        if self._announced:
            announced, members, expected = self._announced, view.members, [-1] * len(ids)
            for index, request_id in enumerate(ids):
                size = announced.pop(request_id, None)
                if size is not None and size[1] in members:
                    expected[index] = size[0]
        self._source(view)
        if type(self.requests) is dict:
            self.requests = LaneRequests(lane.rows.slot_of, self._lane_materialize, self.requests)
        slots, gens = lane.add(ids, state=_BOOT, total=-1, expected=expected, peer=lane.peer_index(view),
                               admitted_at=now, last_progress=now)
        self.stats.requests += len(ids)
        self.in_flight += len(ids)
        self._admission.append(LaneBatch(ids, slots, gens))

    def _lane_admissions(self, batch: LaneBatch, admitted: list[Request], pool_tokens: int) -> tuple[bool, bool]:
        """First allocations for a lane batch, in its order, while the pool holds them: (the
        batch is done, any request of it was admitted). A row materialized meanwhile is
        admitted here as the object it became, if it still waits."""
        columns, moved = self._lane.rows._columns, False
        while batch.pos < len(batch.ids):
            slots, gens = batch.slots[batch.pos:], batch.gens[batch.pos:]
            alive = (columns["gen"][slots] == gens) & (columns["state"][slots] == _BOOT)
            run = len(slots) if alive.all() else int(np.argmin(alive))
            if run:
                fitted = self._lane_allocate(slots[:run], pool_tokens)
                batch.pos += fitted
                moved |= fitted > 0
                if fitted < run:
                    return False, moved
                continue
            request = self._lane.left.pop(int(gens[0]), None)
            if request is not None and request.state is RequestState.BOOTSTRAPPING and request.round < 0:
                if not self._admit_one(request, admitted, pool_tokens):
                    self._lane.keep_left(int(gens[0]), request)
                    return False, moved
            batch.pos += 1
        return True, moved

    def _lane_allocate(self, slots: np.ndarray, pool_tokens: int) -> int:
        """The first allocations of these rows (all waiting), in order, as many as the pool
        holds now, announced to the encoder engine as columns; how many were allocated. A
        row's blocks are kept as a run (its first block and count) when they are one, else
        as their list (`LanguageLane.block_lists`)."""
        columns, block_size = self._lane.rows._columns, self.config.block_size
        expected = columns["expected"][slots]
        tokens = np.where(expected >= 0, np.minimum(expected, pool_tokens), self.default_tokens)
        blocks = -(-tokens // block_size)
        ends = np.cumsum(blocks)
        fitted = int(np.searchsorted(ends, self.allocator.num_free, side="right"))
        if not fitted:
            return 0
        slots, blocks, ends = slots[:fitted], blocks[:fitted], ends[:fitted]
        taken = np.asarray(self.allocator.take(int(ends[-1])), dtype=np.int64)
        starts = taken[ends - blocks]
        # a row's blocks are a run when each of its blocks is the one before it plus one
        steps = np.concatenate(([0], np.cumsum(np.diff(taken) != 1)))
        runs = steps[ends - 1] == steps[ends - blocks]
        now = time.monotonic()
        columns["block_start"][slots] = np.where(runs, starts, -1)
        columns["blocks"][slots] = blocks
        columns["allocated"][slots] = blocks * block_size
        columns["state"][slots] = _WAITING
        columns["last_progress"][slots] = now
        if not runs.all():
            lists = self._lane.block_lists
            for index in np.flatnonzero(~runs).tolist():
                lists[int(slots[index])] = taken[ends[index] - blocks[index]:ends[index]].tolist()
        entries = np.zeros(fitted, rec.Allocations.ENTRY)
        entries["request_id"] = columns["request_id"][slots]
        entries["allocated_tokens"] = columns["allocated"][slots]
        leader = self._lane.views[int(columns["peer"][slots[0]])].leader
        self._allocations.setdefault(leader, []).append(entries)
        return fitted

    def _lane_accept(self, channel: RecvChannel, message: RecvMessage) -> bool | None:
        """`_accept` of a message with segments of lane requests. Those that are the next
        stretch of their request's usual first (and only) round are bound by column, the
        outputs of the requests they start made together; a lane request with any other
        segment is materialized first, and the message's other segments take the object
        path's gate and binding. True when accepted, False to wait (nothing bound), None
        when no segment stays in the lane (the object path takes the whole message)."""
        lane = self._lane
        slot_of, segments = lane.rows.slot_of, message.record.segments
        slots = [slot_of.get(s.request_id, -1) for s in segments]
        columns = lane.rows._columns
        source = channel.source
        peer = lane._view_index.get(source.incarnation, -1) if source is not None else -1
        if peer < 0 or lane.views[peer] is not source or self.metrics is not None or self._budget_waiting:
            self._lane_let_go(segments)
            return None
        infos = self._infos
        usual = [slot >= 0 and s.round == 0 and not (infos and s.request_id in infos)
                 for slot, s in zip(slots, segments, strict=True)]
        at = np.array([slot for slot, ok in zip(slots, usual, strict=True) if ok], dtype=np.int64)
        if len(at):
            # (request_id, round, start, count, total_tokens, mrope_delta) per segment
            seg = np.array([s for s, ok in zip(segments, usual, strict=True) if ok], dtype=np.int64)
            starts, counts, totals = seg[:, 2], seg[:, 3], seg[:, 4]
            state = columns["state"][at]
            # a first segment: its payload fits the first allocation (one round); a later one:
            # where the last one this rank accepted ended, saying what the first said
            fine = (columns["peer"][at] == peer) & (starts + counts <= totals) & np.where(
                state == _WAITING, (starts == 0) & (columns["allocated"][at] >= totals),
                (state == _TRANSFERRING) & (starts == columns["accepted"][at]) & (totals == columns["total"][at])
                & (seg[:, 5] == columns["mrope_delta"][at]))
            if len(set(at.tolist())) != len(at):
                fine[:] = False
            if not fine.all():
                index = iter(fine.tolist())
                usual = [ok and next(index) for ok in usual]
                at, seg = at[fine], seg[fine]  # (the usual segments' slots and fields, in order)
        positions = [i for i, ok in enumerate(usual) if ok]
        if len(positions) < lane_module.LANE_MIN_SEGMENTS:
            positions = []  # a few: numpy's fixed cost per message is more than the rows save
        if positions:
            new = columns["state"][at] == _WAITING
            per_token = self.spec.bytes_per_token
            need = int(seg[new, 4].sum()) * per_token
            if self.output_bytes + need > self.config.output_budget_bytes:
                positions = []
        if not positions:
            self._lane_let_go(segments)
            return None
        mixed = len(positions) < len(segments)
        if mixed:
            others = [s for i, s in enumerate(segments) if not usual[i]]
            self._lane_let_go(others)
            if not self._accept_gate(message, others):
                return False
        starts, counts, totals = seg[:, 2], seg[:, 3], seg[:, 4]
        columns["accepted"][at] += counts
        columns["last_progress"][at] = time.monotonic()
        together = None
        if new.any():  # first segments: N and delta from them (R3), their outputs made together
            first, first_totals = at[new], seg[new, 4]
            columns["total"][first] = first_totals
            columns["mrope_delta"][first] = seg[new, 5]
            columns["state"][first] = _TRANSFERRING
            columns["output_bytes"][first] = first_totals * per_token
            together, views = self.pool.empty_rows_together(first_totals.tolist())
            outputs = lane.outputs
            for slot, view in zip(first.tolist(), views, strict=True):
                outputs[slot] = view
            if self.spec.is_cuda:  # (where a later message's stretch of the request lands)
                lane.set_output_addresses(first.tolist(), ops.together_addresses(together, first_totals.tolist()))
            self.output_bytes += need
        whole = bool(new.all() and (counts == totals).all())  # each is all of a new request
        message.lane = (at, columns["gen"][at].copy(), counts.tolist(), positions if mixed else None,
                        together if whole else None, None if whole else starts.tolist())
        if not mixed:
            if whole:
                message.together = together
            return True
        lane_at = set(positions)
        whole: list[Request] = []
        started: list[Request] = []
        src_rank = message.record.src_rank
        message.requests = [None if i in lane_at else self._bind_segment(s, source, src_rank, whole, started)
                            for i, s in enumerate(segments)]
        if started:
            self._set_states([r for r in started if not r.state.terminal], RequestState.TRANSFERRING)
        if whole:
            self._take_outputs_together(whole, message)
        return True

    def _lane_let_go(self, segments: Sequence[rec.Segment]) -> None:
        """Materialize the lane requests a message names (it takes the object path)."""
        slot_of = self._lane.rows.slot_of
        for segment in segments:
            if segment.request_id in slot_of:
                self._lane_materialize(segment.request_id)

    def _lane_landed(self, message: RecvMessage, staging) -> int:
        """`_landed` of a message's lane segments: unpacked into their outputs with one
        launch, every request read and complete (its blocks freed, its COMPLETE queued,
        SUCCESS), by column. -1 when the message was all lane (done); else how many
        segments the lane landed, the object path landing the others (their positions
        in `message.requests`). When a request of the lane's segments left the lane
        meanwhile, they are all turned into the object path's form first (0)."""
        lane = self._lane
        at, gens, counts, positions, together, starts = message.lane
        message.lane = None
        columns = lane.rows._columns
        if positions is None:
            message.requests = [None] * len(counts)
        if not (columns["gen"][at] == gens).all() or self.metrics is not None:
            alive = (columns["gen"][at] == gens).tolist()
            ids = columns["request_id"][at].tolist()
            for index, rid, ok, gen in zip(positions or range(len(counts)), ids, alive, gens.tolist(), strict=True):
                # (a row that left the lane may have stretches in several messages: `get`)
                message.requests[index] = self._lane_materialize(rid) if ok else lane.left.get(int(gen))
            return 0
        slot_list = at.tolist()
        outputs = [lane.outputs[slot] for slot in slot_list]
        if together is not None:  # each segment all of a request whose outputs this message made
            zeros = np.zeros(len(counts), dtype=np.int64)
            if self.spec.is_cuda:
                ops.unpack_addressed_rows(staging, message.layout, outputs[0], ops.together_addresses(together, counts),
                                          zeros, outputs, segments=positions)
            elif positions is None:
                ops.unpack_together(staging, message.layout, together)
            else:
                ops.unpack_to_rows(staging, message.layout, outputs, zeros, segments=positions)
        elif self.spec.is_cuda:  # stretches of requests, at their rows
            addresses = np.array([lane.output_addresses[slot] for slot in slot_list], dtype=np.int64)
            ops.unpack_addressed_rows(staging, message.layout, outputs[0], addresses,
                                      np.asarray(starts, dtype=np.int64), outputs, segments=positions)
        else:
            ops.unpack_to_rows(staging, message.layout, outputs, starts, segments=positions)
        landed = columns["landed"][at] + counts
        columns["landed"][at] = landed
        now = time.monotonic()
        columns["last_progress"][at] = now
        complete = landed == columns["total"][at]
        if not complete.all():  # the rest of those comes in later messages
            at = at[complete]
            if not len(at):
                return -1 if positions is None else len(slot_list)
        starts = columns["block_start"][at]
        if (starts >= 0).all():
            self.allocator.free_runs(starts, columns["blocks"][at])
        else:
            self.allocator.free_lists([lane.blocks_of(slot, start, count) for slot, start, count
                                       in zip(at.tolist(), starts.tolist(), columns["blocks"][at].tolist(), strict=True)])
        columns["block_start"][at] = -1
        columns["blocks"][at] = 0
        columns["allocated"][at] = 0
        columns["state"][at] = _SUCCESS
        ids, totals = columns["request_id"][at].tolist(), columns["total"][at]
        done = len(ids)
        self.stats.rounds += done
        self.stats.tokens += int(totals.sum())
        self.stats.succeeded += done
        self.in_flight -= done
        self._just_finished.extend(ids)
        entries = np.zeros(done, rec.Completions.ENTRY)
        entries["request_id"] = ids
        entries["sent_tokens"] = entries["total_tokens"] = totals
        leader = lane.views[int(columns["peer"][at[0]])].leader
        self._completions.setdefault(leader, []).append(entries)
        return -1 if positions is None else len(slot_list)

    def _lane_take(self, ids: list[int]) -> list[Payload] | None:
        """`take_many` of checked ids some of which are lane requests, all SUCCESS: those
        by column, the others through the object path's checks and hand-over, the payloads
        in the ids' order. None when no id is in the lane or one of them is not SUCCESS
        (the object path, which materializes what it looks up, takes the batch or names
        what is wrong). Every id is checked before any is taken."""
        lane = self._lane
        get = lane.rows.slot_of.get
        slots = [get(request_id, -1) for request_id in ids]
        positions = [k for k, slot in enumerate(slots) if slot >= 0]
        if not positions:
            return None
        columns = lane.rows._columns
        at = np.array([slots[k] for k in positions], dtype=np.int64)
        if not (columns["state"][at] == _SUCCESS).all():
            return None
        objects = [self._takeable(ids[k], f"request_ids[{k}]") for k, slot in enumerate(slots) if slot < 0]
        deltas, totals = columns["mrope_delta"][at].tolist(), columns["total"][at].tolist()
        self.output_bytes -= int(columns["output_bytes"][at].sum())
        outputs, trusted, taken = lane.outputs, Payload._trusted, []
        for slot, delta in zip(at.tolist(), deltas, strict=True):
            rows = outputs[slot]
            outputs[slot] = None
            taken.append(trusted(rows[0], rows[1], rows[2], delta, rows[3]))
        value = RequestState.SUCCESS._value_
        self._remember_kept([(ids[k], (value, None, total, 0)) for k, total in zip(positions, totals, strict=True)])
        columns["gen"][at] = 0
        lane.rows.remove(at)
        if not objects:
            return taken
        handed = iter(self._hand_over_all(objects))
        laned = iter(taken)
        return [next(laned) if slot >= 0 else next(handed) for slot in slots]

    def _lane_materialize(self, request_id: int) -> Request:
        """The lane request `request_id` as the Request the object path would hold at this
        point of its life; it leaves the lane (its place in an admission batch or a message
        is kept: `LanguageLane.left`)."""
        lane = self._lane
        slot = lane.rows.slot_of[request_id]
        c = lane.rows._columns
        state, view = int(c["state"][slot]), lane.views[int(c["peer"][slot])]
        expected = int(c["expected"][slot])
        request = Request(request_id, view.name, expected_tokens=expected if expected >= 0 else None,
                          engine_admitted=True)
        request.peer = view
        request.admitted_at, request.last_progress = float(c["admitted_at"][slot]), float(c["last_progress"][slot])
        if state >= _WAITING:
            request.round = 0
        if state in (_WAITING, _TRANSFERRING):
            count = int(c["blocks"][slot])
            request.blocks = lane.blocks_of(slot, int(c["block_start"][slot]), count)
            request.allocated_tokens = count * self.config.block_size
        if state >= _TRANSFERRING:
            total = int(c["total"][slot])
            request.total_tokens = request.rows = request.round_tokens = total
            request.round_accepted = int(c["accepted"][slot])
            if state == _TRANSFERRING:
                request.round_landed = int(c["landed"][slot])
            request.mrope_delta = int(c["mrope_delta"][slot])
            request.outputs, request.direct = lane.outputs[slot], True
            request.output_bytes = int(c["output_bytes"][slot])
        if state == _SUCCESS:
            request.sent_tokens = request.total_tokens
        request.state = _LANE_STATES[state]
        lane.outputs[slot] = None
        gen = int(c["gen"][slot])
        c["gen"][slot] = 0  # (no batch or message takes the slot for this row any more)
        lane.rows.remove_id(request_id)
        dict.__setitem__(self.requests, request_id, request)
        if state in (_BOOT, _TRANSFERRING):  # in an admission batch or a message in flight
            lane.keep_left(gen, request)
        return request

    def _lane_late(self, c: dict, used: np.ndarray, now: float) -> np.ndarray:
        """Which of the lane's rows `used` are past `_overdue`'s deadline: allocated or
        transferring with no progress for request_timeout_s (waiting for blocks is not late)."""
        state = c["state"][used]
        return ((state == _WAITING) | (state == _TRANSFERRING)) \
            & (now - c["last_progress"][used] > self.config.request_timeout_s)


def _entry_array(items: list, dtype: np.dtype) -> np.ndarray:
    """A batch record's entries from a step's queue: tuples (the object path's), and
    structured arrays (the lane's), in the order they were queued."""
    pieces, run = [], []
    for item in items:
        if type(item) is tuple:
            run.append(item)
        else:
            if run:
                pieces.append(np.array(run, dtype=dtype))
                run = []
            pieces.append(item)
    if not pieces:
        return np.array(run, dtype=dtype)
    if run:
        pieces.append(np.array(run, dtype=dtype))
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _output_addresses(request: Request) -> tuple[int, ...]:
    """The request's outputs' `row_addresses` (CUDA: what the addressed unpack and read-out
    launches take), made on first use: a message whose requests share one allocation is
    addressed from it instead (`ops.together_addresses`), so they never need their own."""
    if request.output_addresses is None:
        request.output_addresses = ops.row_addresses(request.outputs)
    return request.output_addresses


def _block_array(request: Request) -> np.ndarray:
    """The request's blocks as int64 (for a read-out plan or a decision record), made once."""
    array = request.block_array
    if array is None:
        array = request.block_array = np.asarray(request.blocks, dtype=np.int64)
    return array


def _round_pieces(request: Request) -> list[tuple[int, int, int]]:
    """(offset in the round, tokens, output row) of each stretch of the current round that
    lands in one stretch of the outputs."""
    first, count = request.sent_tokens, request.round_tokens
    if request.kept is None:
        return [(0, count, first)]
    pieces = []
    for row, wire, length in request.kept:
        lo, hi = max(first, wire), min(first + count, wire + length)
        if lo < hi:
            pieces.append((lo - first, hi - lo, row + lo - wire))
    return pieces


class _EncoderPeer:
    __slots__ = ("view", "serving", "channel")

    def __init__(self, view: EngineView, serving: int, channel: RecvChannel) -> None:
        self.view = view
        self.serving = serving
        self.channel = channel


def _items_of(request: Request) -> list:
    """The request's items: as the encoder side described them (PayloadInfo, which says
    which it skipped), else as this engine named them at `admit` (none skipped; only those
    inside the payload's rows)."""
    info = request.info
    if info is not None and info.items:
        return list(info.items)
    return [rec.PayloadItem(i.content_hash, i.start, i.count) for i in request.items
            if i.start + i.count <= request.rows]


def _content_hash(value: bytes | str | None) -> bytes | None:
    """An engine's content hash for `admit` (None: no reuse); see `content_hash_bytes`."""
    return None if value is None else content_hash_bytes(value)


def _remember(memory: OrderedDict, key: int, value: object) -> None:
    memory[key] = value
    while len(memory) > EARLY_MEMORY:
        memory.popitem(last=False)
