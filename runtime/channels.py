"""Pipelined staging channels: one per (this rank, peer) pair and direction.

A round of a request is cut into chunks of at most `chunk_tokens` tokens; each chunk
is one P2P message of one staging buffer. A channel owns `depth` staging buffers,
allocated once, so staging memory is bounded and nothing is allocated in steady
state. With depth 2 the pack of chunk k+1 (sender) and the unpack of chunk k-1
(receiver) overlap the move of chunk k.

Point-to-point messages between two ranks are matched in the order they were posted,
so both sides must walk chunks in exactly the same order. The receiver therefore
takes rounds strictly in the order their TRANSFER records arrived from that peer
(head-of-line), and a chunk of a request that failed meanwhile is still moved — the
sender sends the staging buffer without packing it, the receiver receives it and
does not unpack it — so one failed request never shifts the stream under the next.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from embxfer.kernels import TokenSpan, pack, staging_layout, unpack

from .pool import BlockPool
from .transport import Handle, Transport


def finished(handle: Handle) -> tuple[bool, str | None]:
    """(done, error): a transfer that failed (peer gone, communicator aborted) is done,
    with the reason; the channel it belongs to is then unusable."""
    try:
        done = handle.is_completed()
    except Exception as exc:  # NCCL reports an aborted communicator here
        return True, _one_line(exc)
    error = getattr(handle, "error", None)
    return done, (_one_line(error) if error is not None else None)


def _one_line(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0]
    text = text.split(" This is typically caused")[0]  # gloo's advice, not the error
    return f"{type(exc).__name__}: {text[-200:]}"


def make_layout_cache(pool: BlockPool) -> Callable[[int], object]:
    deepstack_dim = pool.deepstack_layers * pool.dim

    @lru_cache(maxsize=64)
    def layout(count: int) -> object:
        return staging_layout([count], pool.dim, deepstack_dim, pool.dtype)

    return layout


def chunk_tokens_for(pool: BlockPool, staging_bytes: int) -> int:
    """The most tokens whose staged form fits one staging buffer."""
    layout = make_layout_cache(pool)
    count = max(1, staging_bytes // pool.bytes_per_token)
    while count > 1 and layout(count).nbytes > staging_bytes:
        count -= max(1, count // 64)
    if layout(count).nbytes > staging_bytes:
        raise ValueError(
            f"config.staging_bytes={staging_bytes}: too small for one token "
            f"({layout(1).nbytes} bytes staged)"
        )
    return count


class _StagingChannel:
    """What both directions share: `depth` staging buffers allocated once, the transfers in
    flight (completing in post order), and the channel's health."""

    def __init__(self, peer: int, transport: Transport, pool: BlockPool, depth: int, staging_bytes: int) -> None:
        self.peer = peer
        self.transport = transport
        self.pool = pool
        self.staging_bytes = staging_bytes
        self.layout = make_layout_cache(pool)
        self.staging = [torch.empty(staging_bytes, dtype=torch.uint8, device=pool.device) for _ in range(depth)]
        self.free_slots: deque[int] = deque(range(depth))
        self.dead = False
        self.error: str | None = None
        self.messages = 0
        self.bytes = 0

    def _post(self, post: Callable[[torch.Tensor, int], Handle], buffer: torch.Tensor, what: str) -> Handle | None:
        """Post one transfer; a transport that refuses (its connection to the peer is gone)
        kills the channel instead of the caller."""
        try:
            return post(buffer, self.peer)
        except Exception as exc:
            self.dead, self.error = True, f"{what} rank {self.peer} failed: {_one_line(exc)}"
            return None

    def _retire(self, inflight: deque, what: str):
        """The oldest transfer of `inflight` if it has finished (its buffer is free again),
        else None. A failed transfer kills the channel: nothing after it can be trusted."""
        if not inflight:
            return None
        complete, error = finished(inflight[0].handle)
        if error:
            self.dead, self.error = True, f"{what} rank {self.peer} failed: {error}"
            return None
        if not complete:
            return None
        done = inflight.popleft()
        self.free_slots.append(done.slot)
        self.messages += 1
        self.bytes += done.nbytes
        return done


@dataclass(eq=False)
class SendChunk:
    request: object  # has .blocks and .failed
    start: int  # first token of the chunk in the request's sequence
    count: int


@dataclass(eq=False)
class _InFlight:
    slot: int
    handle: Handle
    nbytes: int
    chunk: SendChunk


class SendChannel(_StagingChannel):
    def __init__(self, peer: int, transport: Transport, pool: BlockPool, depth: int, staging_bytes: int) -> None:
        super().__init__(peer, transport, pool, depth, staging_bytes)
        self.inflight: deque[_InFlight] = deque()
        self.queue: deque[SendChunk] = deque()
        self.unpacked_sends = 0

    @property
    def idle(self) -> bool:
        return self.dead or (not self.queue and not self.inflight)

    def enqueue(self, chunk: SendChunk) -> None:
        self.queue.append(chunk)

    def pump(self) -> bool:
        """Retire finished sends, then pack and send queued chunks while buffers are free."""
        if self.dead:
            return False
        worked = False
        while self._retire(self.inflight, "send to") is not None:
            worked = True
        if self.dead:
            return True
        while self.queue and self.free_slots:
            chunk = self.queue.popleft()
            slot = self.free_slots.popleft()
            layout = self.layout(chunk.count)
            buffer = self.staging[slot][: layout.nbytes]
            if chunk.request.failed:
                self.unpacked_sends += 1
            else:
                span = TokenSpan(chunk.request.blocks, chunk.start, chunk.count)
                pack(self.pool.tensors, [span], self.staging[slot], layout)
            chunk.request.queued_chunks -= 1
            handle = self._post(self.transport.isend, buffer, "send to")
            if handle is None:
                return True
            self.inflight.append(_InFlight(slot, handle, layout.nbytes, chunk))
            worked = True
        return worked


@dataclass(eq=False)
class RecvRound:
    """One TRANSFER record: `round_tokens` tokens in chunks of `chunk_tokens`."""

    request_id: int
    round: int
    round_tokens: int
    chunk_tokens: int
    record: object
    request: object | None = None  # bound when the round starts (head of line and ready)
    discard: bool = False
    posted_tokens: int = 0
    received_tokens: int = 0
    started: bool = False


@dataclass(eq=False)
class _Posted:
    slot: int
    handle: Handle
    round: RecvRound
    offset: int
    count: int
    nbytes: int


class RecvChannel(_StagingChannel):
    def __init__(self, peer: int, transport: Transport, pool: BlockPool, depth: int, staging_bytes: int) -> None:
        super().__init__(peer, transport, pool, depth, staging_bytes)
        self.rounds: deque[RecvRound] = deque()
        self.posted: deque[_Posted] = deque()
        self.discarded = 0

    @property
    def idle(self) -> bool:
        return self.dead or (not self.rounds and not self.posted)

    def add_round(self, recv_round: RecvRound) -> None:
        self.rounds.append(recv_round)

    def pump(
        self,
        start_round: Callable[[RecvRound], bool],
        round_received: Callable[[RecvRound], None],
    ) -> bool:
        """Post receives in stream order and unpack what arrived.

        `start_round(r)` is asked once per round when it reaches the head of the line;
        it returns False to wait (the request's blocks are not known yet), and sets
        `r.request` / `r.discard` when it accepts. `round_received(r)` runs once per
        round after its last chunk was unpacked (or discarded).
        """
        if self.dead:
            return False
        worked = False
        while (done := self._retire(self.posted, "receive from")) is not None:
            r = done.round
            if r.discard or r.request.failed:
                self.discarded += 1
            else:
                span = TokenSpan(r.request.blocks, done.offset, done.count)
                unpack(self.staging[done.slot], self.layout(done.count), self.pool.tensors, [span])
            r.received_tokens += done.count
            if r.received_tokens == r.round_tokens:
                self.rounds.remove(r)
                round_received(r)
            worked = True
        if self.dead:
            return True
        for r in list(self.rounds):
            if not self.free_slots:
                break
            if r.posted_tokens == r.round_tokens:
                continue
            if not r.started:
                if not start_round(r):
                    break  # head of line: later rounds must wait for this one
                r.started = True
            while self.free_slots and r.posted_tokens < r.round_tokens:
                count = min(r.chunk_tokens, r.round_tokens - r.posted_tokens)
                slot = self.free_slots.popleft()
                nbytes = self.layout(count).nbytes
                handle = self._post(self.transport.irecv, self.staging[slot][:nbytes], "receive from")
                if handle is None:
                    return True
                self.posted.append(_Posted(slot, handle, r, r.posted_tokens, count, nbytes))
                r.posted_tokens += count
                worked = True
            if r.posted_tokens < r.round_tokens:
                break
        return worked
