"""Staging channels: the encoder rank's stream of staging messages to the language ranks it
serves, and each language rank's end of it.

A **message** is one staging buffer sent with one P2P send per peer. It carries as many
*segments* as fit (up to `staging_bytes` of staged tokens and
`max_segments_per_message` segments): a segment is a stretch of one round of one
request, so one message may hold the rounds of many requests, and a round larger than
one buffer spans several messages. The encoder rank packs a message with one launch
(from the payloads the engine submitted) and publishes a TRANSFER record that lists its
segments; each language rank learns the composition from that record *before* it posts
the matching receive, and unpacks the whole message into its landing blocks with one
launch. A channel owns `depth` staging buffers, allocated once, so staging memory is
bounded and nothing is allocated in steady state; with depth 2 the pack of message k+1
and the unpack of message k-1 overlap the move of message k.

Point-to-point messages between two ranks are matched in the order they were posted,
so both ends walk messages in exactly the same order: the sender numbers them, the
receiver takes TRANSFER records strictly in that order (head-of-line) and treats a gap
as a broken stream. A request that fails is simply not packed any more: chunks not yet
in a message are dropped before the record is written, and a segment already announced
is still moved and skipped at unpack, so one failed request never shifts the stream
under the others.

The encoder rank's channel fans out: every language rank it serves gets the same
messages (one pack, one send per peer); a peer that is lost is dropped from the fan-out
and the others go on.

Data pairs are made when first used (`pairs.py`): the encoder rank asks for its pairs
when the channel is made and publishes TRANSFER records at once; a message's send to a
peer is posted as soon as that pair is ready (in message order), and the language rank
asks for its side of the pair when the first TRANSFER arrives and posts receives once it
is ready. A pair that fails takes the peer out of the stream, with the pair's error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from embxfer.control import records as rec
from embxfer.kernels import StagingLayout, ops, staging_layout, tokens_that_fit
from embxfer.kernels.plan import BlockPlan

from .transport import Handle, Transport

PREFIXES_PER_SLOT = 16  # message sizes whose staging views a slot keeps (`_Staging.prefix`)


def finished(handle: Handle) -> tuple[bool, str | None]:
    """(done, error): a transfer that failed (peer gone, communicator aborted) is done,
    with the reason; the stream it belongs to is then unusable."""
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


class _Layouts:
    """Staging layouts by segment counts (a message's shape repeats: cache a few)."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self._cache: dict[tuple[int, ...], StagingLayout] = {}

    def __call__(self, counts: tuple[int, ...]) -> StagingLayout:
        layout = self._cache.get(counts)
        if layout is None:
            if len(self._cache) > 256:
                self._cache.clear()
            layout = self._cache[counts] = staging_layout(counts, self.spec.dim, self.spec.deepstack_dim,
                                                          self.spec.dtype)
        return layout


def message_tokens(spec, staging_bytes: int) -> int:
    """The most tokens one staging message holds."""
    tokens = tokens_that_fit(staging_bytes, spec.dim, spec.deepstack_dim, spec.dtype)
    if tokens < 1:
        raise ValueError(
            f"config.staging_bytes={staging_bytes}: too small for one token of D={spec.dim}, "
            f"K={spec.deepstack_layers}, {spec.dtype}"
        )
    return tokens


class _Staging:
    """What both ends share: `depth` staging buffers allocated once, messages counted."""

    def __init__(self, spec, depth: int, staging_bytes: int) -> None:
        self.spec = spec
        self.staging_bytes = staging_bytes
        self.layout = _Layouts(spec)
        self.staging = [torch.empty(staging_bytes, dtype=torch.uint8, device=spec.device) for _ in range(depth)]
        self._prefixes: list[dict[int, torch.Tensor]] = [{} for _ in range(depth)]
        self.free_slots: deque[int] = deque(range(depth))
        self.messages = 0
        self.bytes = 0
        self.discarded = 0
        self.errors: list[tuple[int, str]] = []  # (peer, why) of failed transfers, until taken

    def prefix(self, slot: int, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of staging buffer `slot`, the view kept per size (a message's
        size repeats when its shape does; on the GPU machine's CPU a slice of a CUDA tensor
        costs a few microseconds, one lookup a tenth of one). At most `PREFIXES_PER_SLOT`
        sizes a slot, then they are made again."""
        views = self._prefixes[slot]
        view = views.get(nbytes)
        if view is None:
            if len(views) >= PREFIXES_PER_SLOT:
                views.clear()
            view = views[nbytes] = self.staging[slot][:nbytes]
        return view

    def take_errors(self) -> list[tuple[int, str]]:
        """(peer, why) of every peer whose transfer failed since the last call."""
        errors, self.errors = self.errors, []
        return errors


# -- the encoder rank's end ----------------------------------------------------------


@dataclass(eq=False)
class SendChunk:
    """Tokens `[start, start + count)` of round `round` of `request`, not yet in a message."""

    request: object  # an endpoint Request with .payload, .addresses, .state
    round: int
    start: int
    count: int


@dataclass(eq=False)
class _Sent:
    slot: int
    buffer: torch.Tensor
    posts: dict[int, Handle | None]  # peer -> its send, None until the pair is ready
    nbytes: int
    requests: list  # the requests it carries rows of
    gens: list  # the generations of the lane rows it carries rows of (runtime/lane.py)


class SendChannel(_Staging):
    def __init__(self, rank: int, peers: list[int], transport: Transport, spec, *, depth: int, staging_bytes: int,
                 max_segments: int, publish: Callable[[rec.Record], None],
                 destination: int = rec.BROADCAST_RANK) -> None:
        super().__init__(spec, depth, staging_bytes)
        self.rank = rank
        # TRANSFER records name the language incarnation they are for (its leader's id): an
        # encoder rank runs one stream per language engine, each numbered from 0.
        self.destination = destination
        self.peers = list(peers)
        self.transport = transport
        self.max_segments = max_segments
        self.capacity = message_tokens(spec, staging_bytes)
        self.publish = publish
        self.queue: deque[SendChunk] = deque()
        self.inflight: deque[_Sent] = deque()
        self.next_message = 0
        ensure = getattr(transport, "ensure", None)
        if ensure is not None:
            for peer in self.peers:
                ensure(peer)

    @property
    def dead(self) -> bool:
        return not self.peers

    @property
    def idle(self) -> bool:
        return self.dead or (not self.queue and not self.inflight)

    def enqueue(self, chunk) -> None:
        """Queue a `SendChunk`, or a lane's `LaneChunks` (rounds of rows, in order)."""
        if not self.dead:
            self.queue.append(chunk)

    def delivered(self, request) -> bool:
        """True once every row of `request` this channel was given has reached every peer
        (none queued, none in a message whose sends have not finished), also those it was
        given while it was a lane row (`request.lane_gen`)."""
        self._retire()
        gen = request.lane_gen
        for chunk in self.queue:
            if type(chunk) is SendChunk:
                if chunk.request is request:
                    return False
            elif gen and chunk.names(gen):  # a lane's rounds, naming the row it was
                return False
        return not any(request in sent.requests or (gen and gen in sent.gens) for sent in self.inflight)

    def drop_peer(self, peer: int) -> None:
        """Stop sending to `peer` (lost); with no peer left, drop everything queued."""
        if peer in self.peers:
            self.peers.remove(peer)
        for sent in self.inflight:
            sent.posts.pop(peer, None)
        if self.dead:
            self.queue.clear()

    def pump(self) -> bool:
        """Post sends whose pairs became ready, retire finished ones, then build, pack and
        send messages while buffers are free."""
        worked = self._retire()
        while self.queue and self.free_slots and not self.dead:
            worked |= self._send_one()
        return worked

    def _post(self, sent: _Sent) -> bool:
        """Post the sends of `sent` whose pairs are ready; False while some wait."""
        waiting = False
        for peer, handle in list(sent.posts.items()):
            if handle is not None:
                continue
            state, why = _pair_state(self.transport, peer)
            if state == "pending":
                waiting = True
                continue
            if state == "failed":
                self.errors.append((peer, f"data pair with {peer:x} failed: {why}"))
                self.drop_peer(peer)
                continue
            try:
                sent.posts[peer] = self.transport.isend(sent.buffer, peer)
            except Exception as exc:  # the transport's connection to the peer is gone
                self.errors.append((peer, f"send to {peer:x} failed: {_one_line(exc)}"))
                self.drop_peer(peer)
        return not waiting

    def _retire(self) -> bool:
        worked = False
        for sent in self.inflight:
            if not self._post(sent):
                break  # later messages to that peer must wait for this one
        while self.inflight:
            sent = self.inflight[0]
            pending = False
            for peer, handle in list(sent.posts.items()):
                if handle is None:
                    pending = True
                    continue
                done, error = finished(handle)
                if error:
                    self.errors.append((peer, f"send to {peer:x} failed: {error}"))
                    self.drop_peer(peer)
                elif not done:
                    pending = True
            if pending:
                return worked
            self.inflight.popleft()
            self.free_slots.append(sent.slot)
            self.messages += 1
            self.bytes += sent.nbytes
            worked = True
        return worked

    def _send_one(self) -> bool:
        segments, requests, rows, payloads, addresses, gens = [], [], [], [], [], []
        tokens = 0
        while self.queue and len(segments) < self.max_segments and tokens < self.capacity:
            chunk = self.queue[0]
            if type(chunk) is not SendChunk:  # a lane's rounds, taken by column
                took, became = chunk.take(self.capacity - tokens, self.max_segments - len(segments), segments,
                                          payloads, addresses, rows, gens)
                tokens += took
                if not len(chunk):
                    self.queue.popleft()
                if became is not None:  # a row that left the lane: the object it became, at its place
                    self.queue.appendleft(SendChunk(*became))
                continue
            request = chunk.request
            if request.state.terminal:  # failed meanwhile: none of it is announced
                self.queue.popleft()
                continue
            take = min(chunk.count, self.capacity - tokens)
            row = chunk.start
            if request.kept is not None:  # skipped items: a segment never crosses a gap
                row, take = _payload_rows(request.kept, chunk.start, take)
            if chunk.start == 0 and request.info is not None:
                # What travels with the payload goes just before its first segment: on this
                # ring, every rank this channel serves reads it first.
                self.publish(request.info.__class__.trusted(**{**request.info.__dict__, "src_rank": self.rank,
                                                               "dst_rank": self.destination}))
            segments.append(rec.Segment(request.request_id, chunk.round, chunk.start, take,
                                        request.total_tokens, request.mrope_delta))
            requests.append(request)
            payloads.append(request.payload)
            addresses.append(request.addresses)
            rows.append(row)
            tokens += take
            if take == chunk.count:
                self.queue.popleft()
            else:
                chunk.start += take
                chunk.count -= take
        if not segments:
            return False
        layout = self.layout(tuple(s.count for s in segments))
        slot = self.free_slots.popleft()
        staging = self.staging[slot]
        if self.spec.is_cuda:
            ops.pack_addressed_rows(payloads[0], addresses, rows, payloads, staging, layout)
        else:
            ops.pack_rows(payloads, rows, staging, layout)
        self.publish(rec.Transfer.trusted(src_rank=self.rank, dst_rank=self.destination, message=self.next_message,
                                  nbytes=layout.nbytes, segments=tuple(segments)))
        self.next_message += 1
        sent = _Sent(slot, self.prefix(slot, layout.nbytes), dict.fromkeys(self.peers), layout.nbytes, requests, gens)
        self.inflight.append(sent)
        if len(self.inflight) == 1 or all(h is not None for h in self.inflight[-2].posts.values()):
            self._post(sent)
        return True


def _kept_interval(kept: list[tuple[int, int, int]], wire: int) -> tuple[int, int, int] | None:
    """The kept interval (payload row, wire row, count) that holds wire row `wire`."""
    for interval in kept:
        if interval[1] <= wire < interval[1] + interval[2]:
            return interval
    return None


def _payload_rows(kept: list[tuple[int, int, int]], wire: int, count: int) -> tuple[int, int]:
    """(payload row, tokens) of the stretch of wire rows from `wire` (at most `count`) that
    stays inside one kept interval."""
    interval = _kept_interval(kept, wire)
    if interval is None:
        raise ValueError(f"wire row {wire} is in no kept interval {kept}")
    row, first, length = interval
    return row + wire - first, min(count, first + length - wire)


def wire_to_rows(kept: list[tuple[int, int, int]] | None, wire: int, count: int) -> int | None:
    """The payload row of wire row `wire` when `[wire, wire + count)` lies inside one kept
    interval; None if it does not (the sender never crosses a gap)."""
    if kept is None:
        return wire
    interval = _kept_interval(kept, wire)
    if interval is None or wire + count > interval[1] + interval[2]:
        return None
    return interval[0] + wire - interval[1]


def _pair_state(transport: Transport, peer: int) -> tuple[str, str]:
    state = getattr(transport, "state", None)
    if state is None:
        return "ready", ""
    found, why = state(peer)
    if found == "absent":
        transport.ensure(peer)
        return "pending", ""
    return ("ready" if found == "ready" else "failed" if found in ("failed", "dropped") else "pending"), why


# -- a language rank's end -------------------------------------------------------------


@dataclass(eq=False)
class RecvMessage:
    """One TRANSFER record: what the next staging message from the peer holds. `requests[i]`
    is segment i's request once the message was accepted (None: not unpacked)."""

    record: rec.Transfer
    layout: StagingLayout
    requests: list = field(default_factory=list)
    first_seen: float = 0.0
    # The one allocation per field whose views are the outputs of every segment's request,
    # in order (each request arriving whole in this message), else None.
    together: object = None
    # The segments of language-lane requests (`runtime/lane.py`): (slots, their generations,
    # counts, their positions or None for every segment, their outputs' allocation); those
    # positions of `requests` stay None (all of them when every segment is the lane's).
    lane: object = None


@dataclass(eq=False)
class _Posted:
    slot: int
    handle: Handle
    message: RecvMessage


class RecvChannel(_Staging):
    def __init__(self, peer: int, transport: Transport, spec, *, depth: int, staging_bytes: int) -> None:
        super().__init__(spec, depth, staging_bytes)
        self.peer = peer
        self.transport = transport
        self.pending: deque[RecvMessage] = deque()
        self.posted: deque[_Posted] = deque()
        self.next_message = 0
        self.dead = False
        self.source = None  # the encoder incarnation (EngineView) this channel is from

    @property
    def idle(self) -> bool:
        return self.dead or (not self.pending and not self.posted)

    def add(self, record: rec.Transfer) -> str | None:
        """Queue a TRANSFER record; why the stream is broken, if it is (a gap in the
        message numbers, or a message this rank cannot hold or lay out)."""
        if record.message != self.next_message:
            return (f"{self.peer:x} announced staging message {record.message}, expected "
                    f"{self.next_message}: a TRANSFER record was lost")
        self.next_message += 1
        if record.message == 0 and hasattr(self.transport, "ensure"):
            self.transport.ensure(self.peer)  # first use: make this side of the data pair
        layout = self.layout(tuple(s.count for s in record.segments))
        if layout.nbytes != record.nbytes or layout.nbytes > self.staging_bytes:
            return (f"{self.peer:x} sends a message of {record.nbytes} bytes; its segments make "
                    f"{layout.nbytes} bytes here, and this rank's staging buffer holds {self.staging_bytes}")
        self.pending.append(RecvMessage(record, layout))
        return None

    def pump(self, accept: Callable[[RecvMessage], bool], landed: Callable[[RecvMessage, torch.Tensor], None]) -> bool:
        """Unpack what arrived, then post receives in stream order, then unpack what arrived
        meanwhile (a receive whose send was posted first often completes at once: the
        loopback always, a small NCCL message often), so it lands in this step, not the next.

        `accept(m)` is asked when `m` is at the head of the line with a buffer free; it
        returns False to wait (a request's blocks are not known on this rank yet) and
        fills `m.requests` when it accepts. `landed(m, staging)` runs once per message
        after it arrived, to unpack it."""
        if self.dead:
            return False
        worked = False
        if self.posted:
            worked = self._land_arrived(landed)
            if self.dead:
                return True
        if self.pending and not self.posted:
            state, why = _pair_state(self.transport, self.peer)
            if state == "failed":
                self.dead = True
                self.errors.append((self.peer, f"data pair with {self.peer:x} failed: {why}"))
                return True
            if state == "pending":
                return worked
        posted = False
        while self.pending and self.free_slots:
            message = self.pending[0]
            if not accept(message):
                break
            self.pending.popleft()
            slot = self.free_slots.popleft()
            try:
                handle = self.transport.irecv(self.prefix(slot, message.layout.nbytes), self.peer)
            except Exception as exc:  # the transport's connection to the peer is gone
                self.dead = True
                self.errors.append((self.peer, f"receive from {self.peer:x} failed: {_one_line(exc)}"))
                return True
            self.posted.append(_Posted(slot, handle, message))
            posted = True
        if posted:
            self._land_arrived(landed)
        return worked or posted

    def _land_arrived(self, landed: Callable[[RecvMessage, torch.Tensor], None]) -> bool:
        """Unpack the posted receives that completed, in order; True if any did (or failed:
        the channel is then dead, with the reason in `errors`)."""
        worked = False
        while self.posted:
            posted = self.posted[0]
            done, error = finished(posted.handle)
            if error:
                self.dead = True
                self.errors.append((self.peer, f"receive from {self.peer:x} failed: {error}"))
                return True
            if not done:
                break
            self.posted.popleft()
            self.messages += 1
            self.bytes += posted.message.layout.nbytes
            landed(posted.message, self.staging[posted.slot])
            self.free_slots.append(posted.slot)
            worked = True
        return worked


def segment_plan(blocks: list[np.ndarray], offsets: list[int], counts: list[int], block_size: int) -> BlockPlan:
    """The plan of segments that start `offsets[i]` tokens into the token sequence held by
    `blocks[i]` (one request round's landing blocks each)."""
    pieces, lengths, first_rows = [], [], []
    for array, offset, count in zip(blocks, offsets, counts, strict=True):
        first = offset // block_size
        last = -(-(offset + count) // block_size)
        pieces.append(array[first:last])
        lengths.append(last - first)
        first_rows.append(offset - first * block_size)
    return BlockPlan(np.concatenate(pieces), np.array(lengths, dtype=np.int64),
                     np.array(first_rows, dtype=np.int64))
