"""The encoder engine's endpoint: submit payloads, send rounds, follow resumes.

A round is scheduled in exactly one place, `_start_round`, which runs for the first
round (the language side's announce) and for every RESUME (SPEC R1: a resume always
leads to a send), from the source blocks and total saved at submit time. Rounds are
identified by number and `sent_tokens`, never by block indices (R5, R6).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from embxfer.control import records as rec

from .channels import SendChannel, SendChunk, chunk_tokens_for
from .endpoint import Endpoint, Request, check_request_id
from .payload import Payload
from .state import RequestState
from .topology import Role

MAX_PENDING_ALLOCATIONS = 4096


class Sender(Endpoint):
    role = "encoder"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("pool_blocks", kwargs["config"].encoder_pool_blocks)
        super().__init__(**kwargs)
        topo = self.topology
        if topo.role(self.rank) is not Role.ENCODER:
            raise ValueError(f"rank {self.rank} is not an encoder rank in {topo.describe()}")
        self.engine = topo.engine_of(self.rank)
        self.leader_rank = topo.encoder_leader(self.engine)
        self.language_leader = topo.language_leader
        self.targets = topo.served_language_ranks(self.rank)
        self.dummy = not self.targets
        self.chunk_tokens = chunk_tokens_for(self.pool, self.config.staging_bytes)
        self.channels = {
            peer: SendChannel(peer, self.transport, self.pool, self.config.staging_depth, self.config.staging_bytes)
            for peer in self.targets
        }
        self._waiting_for_pool: deque[Request] = deque()
        # Allocations and aborts announced before the engine submitted the payload.
        self._early_allocations: dict[int, rec.Resume] = {}
        self._early_aborts: OrderedDict[int, str] = OrderedDict()
        self._deferred_frees: set[Request] = set()

    # -- public API ---------------------------------------------------------------
    def submit(self, request_id: int, payload: Payload) -> None:
        """Queue `payload` for transfer. ValueError (nothing queued) on bad input."""
        check_request_id(request_id)
        if not isinstance(payload, Payload):
            raise ValueError(f"payload: expected an embxfer.Payload, got {type(payload).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id}: already submitted and not finished")
        self.pool.check_compatible(payload)
        capacity = self.pool.num_blocks * self.pool.block_size
        if payload.num_tokens > capacity:
            raise ValueError(
                f"payload.embeddings: N={payload.num_tokens} tokens exceeds the encoder pool "
                f"({self.pool.num_blocks} blocks x {self.pool.block_size} = {capacity} tokens)"
            )
        self.finished.pop(request_id, None)
        request = Request(request_id, self.engine, total_tokens=payload.num_tokens,
                          mrope_delta=payload.mrope_delta, payload=payload)
        self.requests[request_id] = request
        self.stats.requests += 1
        dead = [r for r in (*self.topology.language_ranks, *self.topology.encoder_ranks(self.engine))
                if r in self.dead_peers]
        if dead:
            self._fail(request, rec.AbortReason.PEER_DEAD, f"rank {dead[0]} is dead: {self.dead_peers[dead[0]]}",
                       notify=False)
            return
        aborted = self._early_aborts.pop(request_id, None)
        if aborted is not None:
            self._fail(request, rec.AbortReason.USER, aborted, notify=False)
            return
        self._waiting_for_pool.append(request)
        early = self._early_allocations.pop(request_id, None)
        if early is not None:
            request.pending_resume = early
        self._fill_pool()

    def abort(self, request_id: int, message: str = "aborted by the encoder engine") -> None:
        request = self.requests.get(check_request_id(request_id))
        if request is not None:
            self._fail(request, rec.AbortReason.USER, message, notify=True)

    def release(self, request_id: int) -> None:
        """Forget a finished request (the engine has seen its final state)."""
        request = self.requests.get(request_id)
        if request is not None and request.state.terminal:
            self._retire(request)

    # -- records ------------------------------------------------------------------
    def _on_record(self, record: rec.Record) -> None:
        if isinstance(record, rec.Resume):
            if record.dst_rank == self.leader_rank and record.src_rank == self.language_leader:
                self._on_resume(record)
        elif isinstance(record, rec.Completion):
            if record.dst_rank == self.leader_rank and record.src_rank == self.language_leader:
                self._on_completion(record)
        elif isinstance(record, rec.Abort):
            if record.dst_rank in (-1, self.rank, self.leader_rank):
                request = self.requests.get(record.request_id)
                if request is None and record.request_id in self.finished:
                    self.stats.late_records += 1
                elif request is None:
                    # The language side gave up before this engine submitted: remember it
                    # (bounded), so the submit fails at once instead of holding blocks.
                    self._early_allocations.pop(record.request_id, None)
                    self._early_aborts[record.request_id] = f"aborted by rank {record.src_rank}: {record.message}"
                    while len(self._early_aborts) > MAX_PENDING_ALLOCATIONS:
                        self._early_aborts.popitem(last=False)
                else:
                    self._fail(request, rec.AbortReason(record.reason),
                               f"aborted by rank {record.src_rank}: {record.message}", notify=False)

    def _on_resume(self, resume: rec.Resume) -> None:
        request = self.requests.get(resume.request_id)
        if request is None:
            if resume.request_id in self.finished:
                self.stats.late_records += 1
            elif resume.round == 0 and len(self._early_allocations) < MAX_PENDING_ALLOCATIONS:
                self._early_allocations[resume.request_id] = resume
            else:
                self.stats.rejected_records += 1
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
        if request.blocks:
            self._start_round(request)

    def _check_resume(self, request: Request, resume: rec.Resume) -> str | None:
        if resume.round != request.round + 1:
            return f"RESUME round {resume.round}, expected round {request.round + 1}"
        if resume.sent_tokens != request.sent_tokens:
            return f"RESUME sent_tokens={resume.sent_tokens}, expected {request.sent_tokens}"
        if resume.allocated_tokens != len(resume.blocks) * self.config.block_size or not resume.blocks:
            return (f"RESUME allocated_tokens={resume.allocated_tokens} does not match "
                    f"{len(resume.blocks)} blocks x {self.config.block_size}")
        return None

    def _on_completion(self, completion: rec.Completion) -> None:
        request = self.requests.get(completion.request_id)
        if request is None or request.state.terminal:
            self.stats.late_records += 1
            return
        if completion.total_tokens != request.total_tokens or completion.sent_tokens != request.total_tokens \
                or request.sent_tokens != request.total_tokens:
            self._fail(request, rec.AbortReason.INVALID,
                       f"COMPLETION says {completion.sent_tokens}/{completion.total_tokens} tokens, "
                       f"this side sent {request.sent_tokens}/{request.total_tokens}", notify=True)
            return
        self._set_state(request, RequestState.SUCCESS)
        self._free_blocks(request)

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
        for peer, channel in self.channels.items():
            self._publish(rec.Transfer(
                request_id=request.request_id, round=resume.round, total_tokens=request.total_tokens,
                sent_tokens=request.sent_tokens, round_tokens=count, mrope_delta=request.mrope_delta,
                src_rank=self.rank, dst_rank=peer, chunk_tokens=self.chunk_tokens,
            ))
            for offset in range(0, count, self.chunk_tokens):
                chunk = SendChunk(request, request.sent_tokens + offset, min(self.chunk_tokens, count - offset))
                request.queued_chunks += 1
                channel.enqueue(chunk)
        request.sent_tokens += count
        self.stats.rounds += 1
        if not self.dummy:
            self.stats.tokens += count

    def _fill_pool(self) -> bool:
        """Write queued payloads into the pool, oldest first, while blocks are free."""
        worked = False
        while self._waiting_for_pool:
            request = self._waiting_for_pool[0]
            if request.state.terminal:
                self._waiting_for_pool.popleft()
                continue
            blocks = self.allocator.allocate(request.total_tokens)
            if blocks is None:
                break
            self._waiting_for_pool.popleft()
            self.pool.write(request.payload, blocks)
            request.blocks, request.payload = blocks, None
            request.last_progress = time.monotonic()
            if request.pending_resume is not None:
                self._start_round(request)
            worked = True
        return worked

    def _pump(self) -> bool:
        worked = self._fill_pool()
        for channel in self.channels.values():
            worked |= channel.pump()
        for request in list(self._deferred_frees):
            self._free_blocks(request)
        return worked

    def _free_blocks(self, request: Request) -> None:
        # Chunks still queued would be packed from these blocks: free once they are gone
        # (a failed request's chunks are sent unpacked, so that is quick).
        if request.queued_chunks:
            self._deferred_frees.add(request)
            return
        self._deferred_frees.discard(request)
        if request.blocks:
            self.allocator.free(request.blocks)
            request.blocks = []

    # -- failure --------------------------------------------------------------------
    def _timeout_applies(self, request: Request) -> bool:
        # Waiting for pool room here, or for admission on the language side, is
        # backpressure, not a fault (a dead language side is caught by liveness).
        return request.state is RequestState.TRANSFERRING

    def _fail_cleanup(self, request: Request) -> None:
        request.payload = None
        request.pending_resume = None
        self._free_blocks(request)

    def _on_peer_dead(self, rank: int, why: str) -> None:
        channel = self.channels.get(rank)
        if channel is not None:
            channel.dead = True
            for chunk in channel.queue:
                chunk.request.queued_chunks -= 1
            channel.queue.clear()
        if self.topology.role(rank) is Role.LANGUAGE or self.topology.engine_of(rank) == self.engine:
            for request in list(self.requests.values()):
                self._fail(request, rec.AbortReason.PEER_DEAD, why, notify=False)
