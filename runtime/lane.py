"""The language lane: a TP-1 language leader's usual requests as rows (`runtime/rows.py`).

Off by default (`receiver.LANE_ENABLED`): on the 2-core CPU it saves about a tenth of
the language side's host time where a batch's messages hold whole requests and costs
10-40 % more where they end inside requests (bench/lane_ab.py), and its final form was not
measured on a GPU (bench/results/host-NOTES.md, pipeline-NOTES.md). The tests run both
paths.

What the lane holds. A request admitted by `Receiver.admit_many` in a batch of at least
`LANE_MIN_BATCH` ids (no size, cache key or items given; its encoder engine usable; no
abort waiting for the id; no metrics hook and no debug log on the endpoint) is a row, not
a `Request`, for as long as every step it takes is the usual one:

    BOOTSTRAPPING      queued for blocks, in arrival order with the other admissions
                       (a `LaneBatch` in `Receiver._admission`)
    WAITING_FOR_INPUT  its first allocation taken as one run of blocks and announced
                       (the ALLOCATIONS entries built from the columns)
    TRANSFERRING       its first segment is its whole payload in round 0, within its
                       allocation, from the engine it is bound to, with no PAYLOAD_INFO;
                       the outputs of a message's lane requests made together, within
                       the output budget (the message's other segments take the object
                       path: their lane requests are materialized first)
    SUCCESS            the message landed: unpacked straight into the outputs (one
                       launch), the blocks freed, the COMPLETIONS entries built from the
                       columns, the ids reported by `finished()`; `take_many` hands the
                       payloads out and the rows leave

A single request, or a step's few, costs less as objects than as numpy calls on a few
rows (bench/rows_probe.py's latency case): `LANE_MIN_BATCH` keeps those on the object path.

Materialization. Anything else that concerns a lane request turns its row into the
`Request` today's code would hold at that point (`Receiver._lane_materialize`), which
then takes today's rules: an abort from either side, a PAYLOAD_INFO, a segment or message
that is not the usual one, a request past its
deadline (found by column, `_live_requests`), a lost engine or channel, `release`,
`abort`, `take` of one id, any other lookup by id or walk over `Receiver.requests`
(`LaneRequests` materializes what it is asked for). A row materialized while in an
admission batch or a message keeps its place there: the batch admits the object, the
message lands it through the object path (`left`).

`state`, `poll`, `error`, `arrived`, `finished` and `take_many` read the lane without
materializing; so do the size announcements of an encoder (`_announced_size`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from embxfer.control.records import Segment

from .endpoint import Finished, Request
from .membership import EngineView
from .rows import STATE_NAMES, TRANSFERRING, Rows

# The fewest ids of an admit_many that enter the lane (see the docstring).
LANE_MIN_BATCH = 8
# Requests materialized while in an admission batch or an in-flight message, kept (by
# generation) until the batch or message reaches them; bounded for messages that never land.
LEFT_MEMORY = 4096

COLUMNS = {
    "state": "u1",
    "total": "i8",  # N once its first segment came, else -1
    "expected": "i8",  # an announced size, -1 if none
    "allocated": "i8",
    "block_start": "i8",  # the first of its blocks when they are one run, else -1 (block_lists)
    "blocks": "i8",
    "mrope_delta": "i8",
    "output_bytes": "i8",
    "peer": "i4",  # index into LanguageLane.views
    "gen": "i8",  # a number no other row ever had: a batch or message knows its rows by it
    "admitted_at": "f8",
    "last_progress": "f8",
}

ENCODER_COLUMNS = {
    "state": "u1",
    "total": "i8",  # N (the payload's rows: every row travels)
    "mrope_delta": "i8",
    "sent": "i8",  # tokens scheduled (Request.sent_tokens)
    "round": "i8",  # -1 until the first allocation
    "peer": "i4",  # index into EncoderLane.views, -1 until an allocation binds it
    "engine": "i4",  # index into EncoderLane.engines: the language engine named at submit (0: any)
    "gen": "i8",
    "admitted_at": "f8",
    "last_progress": "f8",
}


class LaneBatch:
    """The rows one `admit_many` added, in the admission queue: `pos` of them allocated."""

    __slots__ = ("ids", "slots", "gens", "pos")

    def __init__(self, ids: list[int], slots: np.ndarray, gens: np.ndarray) -> None:
        self.ids, self.slots, self.gens, self.pos = ids, slots, gens, 0


class _Lane:
    """What both sides' lanes keep: the rows, the peer incarnations their `peer` column
    indexes, generations, and the requests materialized while a batch, queue or message
    still names their row (`left`, by generation)."""

    def __init__(self, columns: dict[str, str], capacity: int) -> None:
        self.rows = Rows(columns, capacity)
        self.views: list[EngineView] = []  # `peer` column -> the peer incarnation
        self._view_index: dict[int, int] = {}
        self._next_gen = 1
        self.left: OrderedDict[int, Request] = OrderedDict()

    def peer_index(self, view: EngineView) -> int:
        index = self._view_index.get(view.incarnation)
        if index is None or self.views[index] is not view:
            index = self._view_index[view.incarnation] = len(self.views)
            self.views.append(view)
        return index

    def add(self, ids: list[int], **values: object) -> tuple[np.ndarray, np.ndarray]:
        gens = np.arange(self._next_gen, self._next_gen + len(ids), dtype=np.int64)
        self._next_gen += len(ids)
        slots = self.rows.add(ids, gen=gens, **values)
        self._grown()
        return slots, gens

    def _grown(self) -> None:
        """The table may have grown: so must the per-slot lists."""

    def keep_left(self, gen: int, request: Request) -> None:
        self.left[gen] = request
        while len(self.left) > LEFT_MEMORY:
            self.left.popitem(last=False)

    def finished_view(self, slot: int) -> Finished:
        """What `state`, `error` and `arrived` read of a row (as of a retired request)."""
        c = self.rows._columns
        total = int(c["total"][slot])
        # (tuple.__new__: a NamedTuple's own __new__ is a Python frame; the loop asks per request)
        return tuple.__new__(Finished, (STATE_NAMES[c["state"][slot]], None, total if total >= 0 else None, 0))


class LanguageLane(_Lane):
    def __init__(self, capacity: int = 256) -> None:
        self.outputs: list = [None] * capacity  # slot -> the request's RowTensors once made
        self.block_lists: list = [None] * capacity  # slot -> its blocks, when they are not one run
        super().__init__(COLUMNS, capacity)

    def _grown(self) -> None:
        if self.rows.capacity > len(self.outputs):
            self.outputs.extend([None] * (self.rows.capacity - len(self.outputs)))
            self.block_lists.extend([None] * (self.rows.capacity - len(self.block_lists)))

    def blocks_of(self, slot: int, start: int, count: int) -> list[int]:
        """A row's blocks as a list (taken out of `block_lists` when kept there)."""
        if start >= 0:
            return list(range(start, start + count))
        blocks, self.block_lists[slot] = self.block_lists[slot], None
        return blocks


class EncoderLane(_Lane):
    """A TP-1 encoder rank's usual requests as rows (`Sender`, see the module docstring)."""

    def __init__(self, capacity: int = 256) -> None:
        self.payloads: list = [None] * capacity  # slot -> the Payload submitted (sent from, never copied)
        self.addresses: list = [None] * capacity  # slot -> its `ops.row_addresses` (CUDA)
        self.engines: list[str | None] = [None]  # `engine` column -> the engine named at submit (0: any)
        super().__init__(ENCODER_COLUMNS, capacity)

    def _grown(self) -> None:
        if self.rows.capacity > len(self.payloads):
            self.payloads.extend([None] * (self.rows.capacity - len(self.payloads)))
            self.addresses.extend([None] * (self.rows.capacity - len(self.addresses)))

    def engine_index(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.engines:
            self.engines.append(name)
        return self.engines.index(name)


class LaneChunks:
    """Rounds of lane rows queued on a send channel, in order: what `SendChunk`s are for
    requests (their rows `[starts[i], starts[i] + counts[i])`), as columns; `pos` of them
    are taken. A row materialized meanwhile is found by its generation in the lane's
    `left` and sent as the object it became, at its place."""

    __slots__ = ("lane", "slots", "gens", "rounds", "starts", "counts", "pos")

    def __init__(self, lane: EncoderLane, slots: np.ndarray, gens: np.ndarray, rounds: np.ndarray,
                 counts: np.ndarray) -> None:
        self.lane, self.slots, self.gens, self.rounds = lane, slots, gens, rounds
        self.starts = np.zeros(len(slots), dtype=np.int64)
        self.counts = counts.astype(np.int64, copy=True)
        self.pos = 0

    def __len__(self) -> int:
        return len(self.slots) - self.pos

    def names(self, gen: int) -> bool:
        """True if a round of the row of generation `gen` is still queued here."""
        return bool((self.gens[self.pos:] == gen).any())

    def take(self, room_tokens: int, room_segments: int, segments: list, payloads: list, addresses: list,
             rows: list, gens: list) -> tuple[int, tuple | None]:
        """Take the next rounds of live rows into the message being built, as many as
        `room_tokens` and `room_segments` hold (the last one cut where the room ends): their
        segments, payloads, addresses, first payload rows and generations are appended.
        Returns (tokens taken, None), or (0, `(request, round, start, count)`) when the
        head entry's row left the lane meanwhile: the entry is consumed and the request it
        became is to be sent as an object (None in place of the tuple: nothing to send, the
        row finished or was forgotten)."""
        lane, pos = self.lane, self.pos
        end = min(len(self.slots), pos + room_segments)
        slots, entry_gens = self.slots[pos:end], self.gens[pos:end]
        c = lane.rows._columns
        live = (c["gen"][slots] == entry_gens) & (c["state"][slots] == TRANSFERRING)
        run = len(slots) if live.all() else int(np.argmin(live))
        if run == 0:
            self.pos += 1
            request = lane.left.pop(int(entry_gens[0]), None)
            if request is None:
                return 0, None
            return 0, (request, int(self.rounds[pos]), int(self.starts[pos]), int(self.counts[pos]))
        counts = self.counts[pos:pos + run]
        ends = np.cumsum(counts)
        whole = int(np.searchsorted(ends, room_tokens, side="right"))
        tokens = int(ends[whole - 1]) if whole else 0
        cut = room_tokens - tokens if whole < run else 0  # the next entry, cut where the room ends
        n = whole + (1 if cut else 0)
        at = slots[:n]
        taken = counts[:n].tolist()
        starts = self.starts[pos:pos + n].tolist()
        if cut:
            taken[-1] = cut
            self.starts[pos + whole] += cut
            self.counts[pos + whole] -= cut
        self.pos = pos + whole
        segments.extend(map(Segment._make, zip(c["request_id"][at].tolist(), self.rounds[pos:pos + n].tolist(),
                                                starts, taken, c["total"][at].tolist(),
                                                c["mrope_delta"][at].tolist(), strict=True)))
        slot_list = at.tolist()
        lane_payloads, lane_addresses = lane.payloads, lane.addresses
        payloads.extend([lane_payloads[s] for s in slot_list])
        addresses.extend([lane_addresses[s] for s in slot_list])
        rows.extend(starts)
        gens.extend(entry_gens[:n].tolist())
        return tokens + cut, None


class LaneRequests(dict):
    """`Endpoint.requests` of a rank while its lane holds requests: its `Request` objects,
    and any lane id asked for by key (`get`, `[]`) or by a walk over all (`values`, `items`,
    iteration) comes out of the lane as a `Request` first, so that no rule of the object
    path ever misses one. The receiver swaps it in when the lane takes its first rows and
    back to a plain dict at the first step the lane is empty (`Receiver._pump`)."""

    __slots__ = ("_materialize", "_slot_of")

    def __init__(self, slot_of: dict[int, int], materialize: Callable[[int], Request],
                 requests: dict[int, Request]) -> None:
        super().__init__(requests)
        self._slot_of = slot_of
        self._materialize = materialize

    def get(self, key, default=None):
        found = dict.get(self, key)
        if found is not None:
            return found
        if key in self._slot_of:
            return self._materialize(key)
        return default

    def __getitem__(self, key):
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or key in self._slot_of

    def __len__(self) -> int:
        return dict.__len__(self) + len(self._slot_of)

    def _all(self) -> None:
        for key in list(self._slot_of):
            self._materialize(key)

    def values(self):
        self._all()
        return dict.values(self)

    def items(self):
        self._all()
        return dict.items(self)

    def keys(self):
        self._all()
        return dict.keys(self)

    def __iter__(self):
        self._all()
        return dict.__iter__(self)
