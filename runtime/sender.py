"""The encoder engine's endpoint: submit payloads, send rounds, follow resumes.

A round is scheduled in exactly one place, `_start_round`, which runs for the first
round (the language side's announce) and for every RESUME (SPEC R1: a resume always
leads to a send), from the payload and total saved at submit time. Rounds are
identified by number and `sent_tokens`, never by block indices (R5, R6).

The payload is not copied at submit: rounds are packed straight from the engine's
tensors into staging messages, so the engine must leave them unchanged until the
request is finished (`state(...)` is terminal). Many requests' rounds share one
message (`channels.py`).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from embxfer.control import records as rec
from embxfer.kernels import ops

from .channels import SendChannel, SendChunk
from .endpoint import Endpoint, Request, check_request_id
from .payload import Payload
from .state import RequestState
from .topology import Role

MAX_PENDING_ALLOCATIONS = 4096
# What an encoder rank reads of the records every peer publishes (the rest is stepped over).
WANTED = frozenset({rec.RecordType.RESUME, rec.RecordType.COMPLETION, rec.RecordType.ABORT})


class Sender(Endpoint):
    role = "encoder"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        topo = self.topology
        if topo.role(self.rank) is not Role.ENCODER:
            raise ValueError(f"rank {self.rank} is not an encoder rank in {topo.describe()}")
        self.engine = topo.engine_of(self.rank)
        self.leader_rank = topo.encoder_leader(self.engine)
        self.language_leader = topo.language_leader
        self.targets = topo.served_language_ranks(self.rank)
        self.dummy = not self.targets
        self.bus.wanted = WANTED
        self.channel = None
        if self.targets:
            self.channel = SendChannel(
                self.rank, self.targets, self.transport, self.spec, depth=self.config.staging_depth,
                staging_bytes=self.config.staging_bytes, max_segments=self.config.max_segments_per_message,
                publish=self._publish,
            )
            self.channels = {self.rank: self.channel}
        # Allocations, cache hits and aborts announced before the engine submitted the payload.
        self._early_allocations: OrderedDict[int, rec.Resume] = OrderedDict()
        self._early_cached: OrderedDict[int, rec.Completion] = OrderedDict()
        self._early_aborts: OrderedDict[int, str] = OrderedDict()

    # -- public API ---------------------------------------------------------------
    def submit(self, request_id: int, payload: Payload) -> None:
        """Queue `payload` for transfer. ValueError (nothing queued) on bad input; a request
        that cannot be served (a rank it needs is lost) fails at once, before any work.

        The payload is sent straight from its tensors: leave them unchanged until the
        request is finished."""
        check_request_id(request_id)
        if not isinstance(payload, Payload):
            raise ValueError(f"payload: expected an embxfer.Payload, got {type(payload).__name__}")
        existing = self.requests.get(request_id)
        if existing is not None:
            raise ValueError(f"request_id={request_id}: already submitted and {existing.state.value} "
                             "(release() it once it is finished before submitting the id again)")
        self.spec.check_payload(payload)
        if payload.num_tokens > 0xFFFFFFFF:
            raise ValueError(f"payload.embeddings: N={payload.num_tokens}, expected at most 2**32 - 1 tokens")
        self.retired.pop(request_id, None)
        request = Request(request_id, self.engine, total_tokens=payload.num_tokens, mrope_delta=payload.mrope_delta,
                          engine_admitted=True)
        self._add(request)
        lost = self.lost_peer()
        if lost is not None:
            self._fail(request, rec.AbortReason.PEER_DEAD, lost, notify=False)
            return
        aborted = self._early_aborts.pop(request_id, None)
        if aborted is not None:
            self._fail(request, rec.AbortReason.USER, aborted, notify=False)
            return
        cached = self._early_cached.pop(request_id, None)
        if cached is not None:
            self._on_completion(cached)
            return
        request.payload = payload
        if self.spec.device.type == "cuda":
            request.addresses = ops.row_addresses(payload)
        early = self._early_allocations.pop(request_id, None)
        if early is not None:
            request.pending_resume = early
            self._start_round(request)

    def announce(self, request_id: int, num_tokens: int) -> None:
        """Tell the language side now that `request_id` will have `num_tokens` tokens (as
        soon as preprocessing knows it, before the vision model runs), so its first
        allocation is exact and no resume is needed. Harmless if wrong or late."""
        check_request_id(request_id)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= 0xFFFFFFFF:
            raise ValueError(f"num_tokens={num_tokens!r}: expected an integer in 1..2**32-1")
        if self.rank == self.leader_rank:
            self._publish(rec.Announce(request_id=request_id, total_tokens=num_tokens, src_rank=self.rank,
                                       dst_rank=self.language_leader))

    def lookup(self, request_id: int) -> bool:
        """True when the language side has served `request_id` from its cache (a content
        hash it already holds): the engine can skip the vision model and `submit` nothing.
        Non-blocking; make `progress()` calls for the answer to arrive."""
        request = self.requests.get(request_id)
        if request is not None:
            return request.cached
        return request_id in self._early_cached

    def lost_peer(self) -> str | None:
        """Why this engine cannot serve any request any more (a rank it needs is lost), or
        None. Check it before producing a payload: a lost peer stops new work at once."""
        if not self.dead_peers:
            return None
        for rank in self.topology.needed_by(self.engine):
            if rank in self.dead_peers:
                return f"rank {rank} is dead: {self.dead_peers[rank]}"
        return None

    def abort(self, request_id: int, message: str = "aborted by the encoder engine") -> None:
        """Fail a request in flight, on both sides; a finished one is released. An id this
        engine never submitted: the language side is told (it fails the request if it
        admitted it), nothing else."""
        request = self.requests.get(check_request_id(request_id))
        if request is None:
            # Never submitted (the vision model failed, say): the language side may be
            # waiting for it; tell it, so the request fails there at once.
            if self.rank == self.leader_rank:
                self._publish(rec.Abort(request_id=request_id, reason=rec.AbortReason.USER,
                                        message=rec.clip_message(message), src_rank=self.rank, dst_rank=-1))
            return
        if request.state.terminal:
            self.release(request_id)
            return
        self._fail(request, rec.AbortReason.USER, message, notify=True)

    def release(self, request_id: int) -> None:
        """Forget a finished request (SUCCESS or FAILED), so its id can be submitted again.
        ValueError if it is still in flight (abort it first); an unknown or already
        released id: nothing to do."""
        request = self._finished_request(request_id)
        if request is None:
            return
        self._retire(request)

    # -- records ------------------------------------------------------------------
    def _on_record(self, record: rec.Record) -> None:
        kind = type(record)
        if kind is rec.Resume:
            if record.dst_rank == self.leader_rank and record.src_rank == self.language_leader:
                self._on_resume(record)
        elif kind is rec.Completion:
            if record.dst_rank == self.leader_rank and record.src_rank == self.language_leader:
                self._on_completion(record)
        elif kind is rec.Abort:
            if record.dst_rank in (-1, self.rank, self.leader_rank):
                self._on_abort(record)

    def _on_abort(self, record: rec.Abort) -> None:
        request = self.requests.get(record.request_id)
        if request is None and record.request_id in self.retired:
            self.stats.late_records += 1
        elif request is None:
            # The language side gave up before this engine submitted: remember it
            # (bounded), so the submit fails at once instead of sending anything.
            self._early_allocations.pop(record.request_id, None)
            _remember(self._early_aborts, record.request_id, f"aborted by rank {record.src_rank}: {record.message}")
        else:
            self._fail(request, rec.AbortReason(record.reason),
                       f"aborted by rank {record.src_rank}: {record.message}", notify=False)

    def _on_resume(self, resume: rec.Resume) -> None:
        request = self.requests.get(resume.request_id)
        if request is None:
            if resume.request_id in self.retired:
                self.stats.late_records += 1
            elif resume.round == 0:
                _remember(self._early_allocations, resume.request_id, resume)
            else:
                self.stats.rejected_records += 1
            return
        if request.state.terminal and resume.round == 0:
            # The language side admitted the id again while this engine still holds the old,
            # finished incarnation: keep the allocation for the next submit of the id.
            _remember(self._early_allocations, resume.request_id, resume)
            return
        if request.state.terminal or resume.round <= request.round:
            self.stats.late_records += 1  # a duplicate or a resume for an older round
            return
        problem = self._check_resume(request, resume)
        if problem:
            self.stats.rejected_records += 1
            self._fail(request, rec.AbortReason.INVALID, problem, notify=True)
            return
        request.pending_resume = resume
        self._start_round(request)

    def _check_resume(self, request: Request, resume: rec.Resume) -> str | None:
        if resume.round != request.round + 1:
            return f"RESUME round {resume.round}, expected round {request.round + 1}"
        if resume.sent_tokens != request.sent_tokens:
            return f"RESUME sent_tokens={resume.sent_tokens}, expected {request.sent_tokens}"
        if resume.allocated_tokens % self.config.block_size:
            return (f"RESUME allocated_tokens={resume.allocated_tokens} is not whole blocks of "
                    f"{self.config.block_size} tokens")
        return None

    def _on_completion(self, completion: rec.Completion) -> None:
        request = self.requests.get(completion.request_id)
        if request is None:
            if completion.flags & rec.COMPLETION_CACHED and completion.request_id not in self.retired:
                _remember(self._early_cached, completion.request_id, completion)  # before the submit
            else:
                self.stats.late_records += 1
            return
        if request.state.terminal:
            self.stats.late_records += 1
            return
        if completion.flags & rec.COMPLETION_CACHED:
            request.cached = True
            request.payload = request.addresses = None
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

    # -- rounds ---------------------------------------------------------------------
    def _start_round(self, request: Request) -> None:
        """Schedule the round the pending RESUME allows (SPEC R1)."""
        resume, request.pending_resume = request.pending_resume, None
        count = min(request.total_tokens - request.sent_tokens, resume.allocated_tokens)
        request.round = resume.round
        if resume.round > 0:
            request.resumes += 1
            self.stats.resumes += 1
        self._set_state(request, RequestState.TRANSFERRING)
        request.last_progress = time.monotonic()
        if self.channel is not None:
            self.channel.enqueue(SendChunk(request, resume.round, request.sent_tokens, count))
        request.sent_tokens += count
        self.stats.rounds += 1
        if not self.dummy:
            self.stats.tokens += count

    def _pump(self) -> bool:
        return self.channel.pump() if self.channel is not None else False

    # -- failure --------------------------------------------------------------------
    def _timeout_applies(self, request: Request) -> bool:
        # Waiting for the language side's admission is backpressure, not a fault (a dead
        # language side is caught by liveness).
        return request.state is RequestState.TRANSFERRING

    def _fail_cleanup(self, request: Request) -> None:
        request.payload = request.addresses = None  # its chunks not yet sent are dropped
        request.pending_resume = None

    def _on_peer_dead(self, rank: int, why: str) -> None:
        if self.channel is not None:
            self.channel.drop_peer(rank)
        if self.topology.role(rank) is Role.LANGUAGE or self.topology.engine_of(rank) == self.engine:
            for request in list(self.requests.values()):
                self._fail(request, rec.AbortReason.PEER_DEAD, why, notify=False)


def _remember(memory: OrderedDict, key: int, value: object) -> None:
    """Keep `value` under `key`, dropping the oldest entries past MAX_PENDING_ALLOCATIONS."""
    memory[key] = value
    while len(memory) > MAX_PENDING_ALLOCATIONS:
        memory.popitem(last=False)
