"""The language engine's endpoint: admit, land rounds, decide resumes, hand out payloads.

Where a resume is decided: `_decide`, on the TP leader, and nowhere else. It runs when
a round is complete on every language rank, and it is edge-triggered: each completed
round is decided once, so polling any number of times cannot issue a second resume
(SPEC R5). The leader's allocator is the single source of truth for block indices; the
followers apply its DECISION records (claim, free) in ring order, so indices agree on
every rank (R4). A round's data is read from its landing blocks into the request's
output tensors exactly once, when the round is complete (R7: never on a poll, never
twice), and the blocks go back to the pool before the next round's blocks are taken,
so a request larger than the whole pool still completes and the allocator may hand
back the very same indices (R6).
Total length and mrope delta come from the first round's TRANSFER record only (R3).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from embxfer.control import records as rec

from .channels import RecvChannel, RecvRound
from .endpoint import Endpoint, Request, check_request_id
from .payload import Payload
from .state import RequestState
from .topology import Role

# A TRANSFER whose request this rank has never heard of waits this long at the head of
# its channel for the leader's ADMIT decision before its data is discarded.
UNKNOWN_REQUEST_GRACE_S = 5.0
EARLY_ABORT_MEMORY = 4096


class Receiver(Endpoint):
    role = "language"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("pool_blocks", kwargs["config"].language_pool_blocks)
        super().__init__(**kwargs)
        topo = self.topology
        if topo.role(self.rank) is not Role.LANGUAGE:
            raise ValueError(f"rank {self.rank} is not a language rank in {topo.describe()}")
        self.leader_rank = topo.language_leader
        self.is_leader = self.rank == self.leader_rank
        self.followers = [r for r in topo.language_ranks if r != self.leader_rank]
        self.default_tokens = min(self.config.default_alloc_blocks, self.pool.num_blocks) * self.pool.block_size
        self.channels = {
            topo.serving_encoder_rank(self.rank, engine): RecvChannel(
                topo.serving_encoder_rank(self.rank, engine), self.transport, self.pool,
                self.config.staging_depth, self.config.staging_bytes,
            )
            for engine in range(topo.encoders)
        }
        self._admission: deque[Request] = deque()  # leader: FIFO of requests waiting for blocks
        self._resume_waiting: deque[Request] = deque()  # leader: rounds done, no free block yet
        self._unknown_since: dict[int, float] = {}
        self._awaiting_free: dict[int, Request] = {}  # follower: released, blocks not yet freed
        # Aborts that arrived before this rank's engine admitted the id (a follower's engine
        # may lag its leader; an encoder may give up first): the later admit fails at once.
        self._early_aborts: OrderedDict[int, str] = OrderedDict()

    # -- public API -----------------------------------------------------------------
    def admit(self, request_id: int, encoder_engine: int = 0) -> None:
        """Start receiving `request_id` from `encoder_engine`: the leader reserves the default
        allocation (now, or as soon as blocks are free) and announces it."""
        check_request_id(request_id)
        self.topology.check_engine(encoder_engine)
        request = self.requests.get(request_id)
        if request is not None:
            if not self.is_leader and request.engine in (-1, encoder_engine):
                request.engine = encoder_engine  # the leader's decision came first
                return
            raise ValueError(f"request_id={request_id}: already admitted and not taken (release() it first)")
        self.finished.pop(request_id, None)
        request = Request(request_id, encoder_engine)
        self.requests[request_id] = request
        self.stats.requests += 1
        gone = self._lost_peer_of(encoder_engine)
        if gone is not None:
            self._fail(request, rec.AbortReason.PEER_DEAD, gone, notify=False)
            return
        aborted = self._early_aborts.pop(request_id, None)
        if aborted is not None:
            self._fail(request, rec.AbortReason.USER, aborted, notify=False)
            return
        if self.is_leader:
            self._admission.append(request)
            self._admit_waiting()

    def take(self, request_id: int) -> Payload:
        """The completed payload as contiguous tensors; the request is forgotten."""
        request = self._lookup(check_request_id(request_id))
        if request.state is RequestState.SUCCESS and request.outputs is None:
            raise ValueError(f"request_id={request_id}: already taken")
        if request.state is not RequestState.SUCCESS:
            raise ValueError(
                f"request_id={request_id}: take() needs state SUCCESS, it is {request.state.value}"
                + (f" ({request.error})" if request.error else "")
            )
        outputs, request.outputs = request.outputs, None
        self._retire(request)  # remembered (bounded) so that late records are known as late
        return Payload(outputs.embeddings, outputs.fill_ids, outputs.mrope_positions,
                       mrope_delta=request.mrope_delta, deepstack=outputs.deepstack)

    def abort(self, request_id: int, message: str = "aborted by the language engine") -> None:
        request = self.requests.get(check_request_id(request_id))
        if request is None:
            return
        if request.state is RequestState.SUCCESS:
            # Blocks are already free; dropping the payload is all that is left to do.
            del self.requests[request_id]
            return
        self._fail(request, rec.AbortReason.USER, message, notify=True)

    def release(self, request_id: int) -> None:
        """Forget a FAILED request (the engine has seen its state and error), so that its id
        can be admitted again. A request in flight must be aborted first."""
        request = self._lookup(check_request_id(request_id))
        if request.state is not RequestState.FAILED:
            raise ValueError(f"request_id={request_id}: release() needs state FAILED, it is {request.state.value} "
                             "(take() a SUCCESS, abort() one in flight)")
        if request.blocks:
            # A follower frees only on the leader's FAIL decision, which may still be on its
            # way; keep the old incarnation apart so a re-admitted id cannot be confused with it.
            self.requests.pop(request_id, None)
            self._awaiting_free[request_id] = request
        else:
            self._retire(request)

    # -- records ------------------------------------------------------------------------
    def _on_record(self, record: rec.Record) -> None:
        if isinstance(record, rec.Transfer):
            if record.dst_rank == self.rank:
                self._on_transfer(record)
        elif isinstance(record, rec.Decision):
            if not self.is_leader and record.src_rank == self.leader_rank:
                self._apply_decision(record)
        elif isinstance(record, rec.Completion):
            if self.is_leader and record.dst_rank == self.rank and record.src_rank in self.followers:
                self._on_follower_ack(record)
        elif isinstance(record, rec.Abort):
            if record.dst_rank in (-1, self.rank, self.leader_rank):
                request = self.requests.get(record.request_id)
                if request is None and record.request_id not in self.finished:
                    self._early_aborts[record.request_id] = f"aborted by rank {record.src_rank}: {record.message}"
                    while len(self._early_aborts) > EARLY_ABORT_MEMORY:
                        self._early_aborts.popitem(last=False)
                    return
                if request is None or request.state.terminal:
                    self.stats.late_records += 1
                    return
                self._fail(request, rec.AbortReason(record.reason),
                           f"aborted by rank {record.src_rank}: {record.message}", notify=False)

    def _on_transfer(self, transfer: rec.Transfer) -> None:
        channel = self.channels.get(transfer.src_rank)
        if channel is None:
            self.stats.rejected_records += 1  # not a rank that serves this one
            return
        channel.add_round(RecvRound(transfer.request_id, transfer.round, transfer.round_tokens,
                                    transfer.chunk_tokens, transfer))

    def _start_round(self, channel: RecvChannel, r: RecvRound) -> bool:
        """Head-of-line gate for a TRANSFER: bind it to its request or decide to discard."""
        transfer: rec.Transfer = r.record
        if channel.layout(min(r.chunk_tokens, r.round_tokens)).nbytes > channel.staging_bytes:
            # The stream from this peer cannot be followed any more: nothing after it can be trusted.
            self._channel_broken(channel, f"rank {channel.peer} sends chunks of {r.chunk_tokens} tokens, "
                                          f"larger than this rank's staging buffer ({channel.staging_bytes} bytes)")
            return False
        request = self.requests.get(r.request_id)
        if request is None:
            if r.request_id in self.finished:
                r.discard = True
                self.stats.late_records += 1
                return True
            first_seen = self._unknown_since.setdefault(r.request_id, time.monotonic())
            if time.monotonic() - first_seen < UNKNOWN_REQUEST_GRACE_S:
                return False
            self._unknown_since.pop(r.request_id, None)
            r.discard = True
            self.stats.rejected_records += 1
            return True
        self._unknown_since.pop(r.request_id, None)
        if request.state.terminal:
            r.discard = True
            self.stats.late_records += 1
            return True
        if request.round != transfer.round or not request.blocks:
            if transfer.round < request.round:
                r.discard = True
                self.stats.late_records += 1
                return True
            return False  # this rank has not applied the leader's decision for that round yet
        problem = self._check_transfer(request, transfer)
        if problem:
            r.discard = True
            self.stats.rejected_records += 1
            self._fail(request, rec.AbortReason.INVALID, problem, notify=True)
            return True
        if request.total_tokens is None:  # first round: the only source of N and delta (R3)
            request.total_tokens = transfer.total_tokens
            request.mrope_delta = transfer.mrope_delta
            request.outputs = self.pool.empty_rows(transfer.total_tokens)
        request.round_tokens = transfer.round_tokens
        request.round_read = False
        self._set_state(request, RequestState.TRANSFERRING)
        request.last_progress = time.monotonic()
        r.request = request
        return True

    def _check_transfer(self, request: Request, t: rec.Transfer) -> str | None:
        if request.engine == -1:  # a follower that learnt of the request from the leader only
            request.engine = self.topology.engine_of(t.src_rank)
        if request.engine != self.topology.engine_of(t.src_rank):
            return f"TRANSFER from rank {t.src_rank}, which is not in encoder engine {request.engine}"
        if request.total_tokens is not None and (
            t.total_tokens != request.total_tokens or t.mrope_delta != request.mrope_delta
        ):
            return (f"TRANSFER round {t.round} says N={t.total_tokens}, delta={t.mrope_delta}; "
                    f"the first round said N={request.total_tokens}, delta={request.mrope_delta}")
        if t.total_tokens < 1:
            return f"TRANSFER total_tokens={t.total_tokens}: expected >= 1"
        if t.sent_tokens != request.sent_tokens:
            return f"TRANSFER sent_tokens={t.sent_tokens}, this rank has {request.sent_tokens}"
        expected = min(t.total_tokens - request.sent_tokens, request.allocated_tokens)
        if t.round_tokens != expected or t.chunk_tokens < 1:
            return (f"TRANSFER round_tokens={t.round_tokens} (chunk {t.chunk_tokens}), expected "
                    f"{expected} = min(remaining {t.total_tokens - request.sent_tokens}, "
                    f"allocated {request.allocated_tokens})")
        return None

    def _round_received(self, r: RecvRound) -> None:
        """All chunks of a round have landed (or were discarded)."""
        request = r.request
        if r.discard or request is None or request.state.terminal:
            return
        # R7: read the round once, now that it is complete, into the output tensors (one
        # launch per round on a GPU); then the blocks may go back to the pool.
        self.pool.read_into(request.blocks, request.round_tokens, request.outputs, request.sent_tokens)
        request.sent_tokens += request.round_tokens
        request.round_read = True
        request.last_progress = time.monotonic()
        self.stats.rounds += 1
        self.stats.tokens += request.round_tokens
        if self.is_leader:
            self._decide(request)
        else:
            self._publish(rec.Completion(
                request_id=request.request_id, round=request.round, sent_tokens=request.sent_tokens,
                total_tokens=request.total_tokens, src_rank=self.rank, dst_rank=self.leader_rank,
            ))

    # -- leader: decisions ------------------------------------------------------------------
    def _on_follower_ack(self, ack: rec.Completion) -> None:
        request = self.requests.get(ack.request_id)
        if request is None or request.state.terminal or ack.round != request.round:
            self.stats.late_records += 1
            return
        request.acks.add(ack.src_rank)
        self._decide(request)

    def _decide(self, request: Request) -> None:
        """Complete or resume, once every language rank has read the current round."""
        if not request.round_read or not request.acks.issuperset(self.followers):
            return
        request.round_read = False
        request.acks.clear()
        self.allocator.free(request.blocks)
        request.blocks, request.allocated_tokens = [], 0
        if request.sent_tokens == request.total_tokens:
            self._broadcast_decision(request, rec.DecisionAction.COMPLETE)
            self._set_state(request, RequestState.SUCCESS)
            self._publish(rec.Completion(
                request_id=request.request_id, round=request.round, sent_tokens=request.sent_tokens,
                total_tokens=request.total_tokens, src_rank=self.rank,
                dst_rank=self.topology.encoder_leader(request.engine),
            ))
            return
        request.resume_due = True
        if not self._try_resume(request):
            self._resume_waiting.append(request)

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
        while self._admission:
            request = self._admission[0]
            if request.state is not RequestState.BOOTSTRAPPING:
                self._admission.popleft()
                continue
            blocks = self.allocator.allocate(self.default_tokens)
            if blocks is None:
                break
            self._admission.popleft()
            request.round = 0
            self._assign(request, blocks)
            self._set_state(request, RequestState.WAITING_FOR_INPUT)
            self._broadcast_decision(request, rec.DecisionAction.ADMIT)
            self._announce(request)
            worked = True
        return worked

    def _assign(self, request: Request, blocks: list[int]) -> None:
        request.blocks = blocks
        request.allocated_tokens = self.allocator.allocated_tokens(blocks)  # R2
        request.last_progress = time.monotonic()

    def _announce(self, request: Request) -> None:
        self._publish(rec.Resume(
            request_id=request.request_id, round=request.round, sent_tokens=request.sent_tokens,
            allocated_tokens=request.allocated_tokens, blocks=tuple(request.blocks),
            src_rank=self.rank, dst_rank=self.topology.encoder_leader(request.engine),
        ))

    def _broadcast_decision(self, request: Request, action: rec.DecisionAction) -> None:
        if not self.followers:
            return
        self._publish(rec.Decision(
            request_id=request.request_id, round=request.round, action=action,
            sent_tokens=request.sent_tokens, total_tokens=request.total_tokens or 0,
            allocated_tokens=request.allocated_tokens, blocks=tuple(request.blocks),
            src_rank=self.rank, mrope_delta=request.mrope_delta,
        ))

    # -- followers: apply the leader's decisions ---------------------------------------------
    def _apply_decision(self, d: rec.Decision) -> None:
        if d.action is rec.DecisionAction.FAIL and d.request_id in self._awaiting_free:
            self._release_blocks(self._awaiting_free.pop(d.request_id))
            return
        request = self.requests.get(d.request_id)
        if request is None and d.action is rec.DecisionAction.FAIL:
            request = self.finished.get(d.request_id)
        if request is None and d.action is rec.DecisionAction.ADMIT and d.request_id not in self.finished:
            request = self.requests[d.request_id] = Request(d.request_id, -1)  # admit() may come later
            self.stats.requests += 1
            # An abort seen before this decision is the leader's to act on: its FAIL follows.
            self._early_aborts.pop(d.request_id, None)
        if request is None or request.state.terminal and d.action is not rec.DecisionAction.FAIL:
            self.stats.late_records += 1
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
            self._release_blocks(request)
            try:
                self.allocator.claim(list(d.blocks))
            except ValueError as exc:  # the allocators disagree: never write into someone else's blocks
                self.stats.rejected_records += 1
                self._fail(request, rec.AbortReason.INTERNAL, f"cannot apply the leader's blocks: {exc}", notify=True)
                return
            request.round = d.round
            self._assign(request, list(d.blocks))
            if d.action is rec.DecisionAction.ADMIT:
                self._set_state(request, RequestState.WAITING_FOR_INPUT)
            else:
                request.resumes += 1
                self.stats.resumes += 1
            return
        self._release_blocks(request)
        if d.action is rec.DecisionAction.COMPLETE:
            if request.sent_tokens != d.total_tokens:
                self._fail(request, rec.AbortReason.INTERNAL,
                           f"leader completed at {d.total_tokens} tokens, this rank read {request.sent_tokens}",
                           notify=True)
            else:
                self._set_state(request, RequestState.SUCCESS)
        else:  # FAIL / FREE: the leader has freed the blocks; so does this rank
            self._fail(request, rec.AbortReason.INTERNAL, "failed by the TP leader", notify=False)

    def _release_blocks(self, request: Request) -> None:
        if request.blocks:
            self.allocator.free(request.blocks)
            request.blocks, request.allocated_tokens = [], 0

    # -- pumping and failure ---------------------------------------------------------------
    def _pump(self) -> bool:
        worked = self._admit_waiting() if self.is_leader else False
        for channel in self.channels.values():
            worked |= channel.pump(lambda r, c=channel: self._start_round(c, r), self._round_received)
        return worked

    def _channel_broken(self, channel: RecvChannel, why: str) -> None:
        channel.dead = True
        engine = self.topology.engine_of(channel.peer)
        for request in list(self.requests.values()):
            if request.engine == engine:
                self._fail(request, rec.AbortReason.INVALID, why, notify=True)

    def _timeout_applies(self, request: Request) -> bool:
        # Waiting in the admission queue for free blocks is backpressure, not a fault.
        return request.state is not RequestState.BOOTSTRAPPING

    def _fail_cleanup(self, request: Request) -> None:
        request.outputs = None
        request.resume_due = False
        if self.is_leader:
            self._release_blocks(request)
            if request.round >= 0:
                self._broadcast_decision(request, rec.DecisionAction.FAIL)
        elif self.leader_rank in self.dead_peers:
            self._release_blocks(request)  # no decision will ever come
        # otherwise the follower frees when the leader's FAIL decision arrives

    def _lost_peer_of(self, engine: int) -> str | None:
        """Why requests from `engine` cannot be served (a rank it needs is dead), or None."""
        needed = [*self.topology.encoder_ranks(engine), *self.topology.language_ranks]
        for rank in needed:
            if rank in self.dead_peers:
                return f"rank {rank} is dead: {self.dead_peers[rank]}"
        return None

    def _on_peer_dead(self, rank: int, why: str) -> None:
        if rank in self.channels:
            self.channels[rank].dead = True
        if self.topology.role(rank) is Role.LANGUAGE:
            doomed = list(self.requests.values())
        else:
            engine = self.topology.engine_of(rank)
            doomed = [r for r in self.requests.values() if r.engine == engine]
        for request in doomed:
            self._fail(request, rec.AbortReason.PEER_DEAD, why, notify=self.is_leader)
        if rank == self.leader_rank:
            for request in [*self.requests.values(), *self._awaiting_free.values()]:
                self._release_blocks(request)
            self._awaiting_free.clear()
