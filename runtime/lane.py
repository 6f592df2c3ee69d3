"""The lanes: a TP-1 rank's usual requests as rows (`runtime/rows.py`), one per side.

Both are off by default (`receiver.LANE_ENABLED`, `sender.LANE_ENABLED`). On the 2-core
CPU (bench/lane_ab.py, bench/results/host-NOTES.md) a lane saves host time only where one
record or message carries many requests: numpy's fixed cost per call (1-3 us) is paid
back from about 30 requests a call, and below that a numpy scalar read or write (about
0.1 us) costs more than an attribute of a `Request`. Where many_small's messages hold 52
requests each, the encoder lane takes 12 % off the encoder's bookkeeping and both lanes
14 % off the wall; where the batch case's records and messages carry a few requests, the
encoder lane adds 13-23 % and both lanes 27-43 %. On an H100 host (c9e85fc,
bench/results/pipeline-NOTES.md) the encoder lane took 0.4-1.0 of the encoder's 10 us a
request, the language lane nothing of many_small's 17 us, and it added 40 % to the batch
case's. The tests run every path against the object path.

**The language lane.** A request admitted by `Receiver.admit_many` in a batch of at least
`LANE_MIN_BATCH` ids (no size, cache key or items given; its encoder engine usable; no
abort waiting for the id; no metrics hook and no debug log on the endpoint) is a row, not
a `Request`, for as long as every step it takes is the usual one:

    BOOTSTRAPPING      queued for blocks, in arrival order with the other admissions
                       (a `LaneBatch` in `Receiver._admission`)
    WAITING_FOR_INPUT  its first allocation taken as one run of blocks and announced
                       (the ALLOCATIONS entries built from the columns)
    TRANSFERRING       its payload fits its first allocation (one round) and its
                       segments come in order from the engine it is bound to, with no
                       PAYLOAD_INFO; a message may hold a whole payload or a stretch of
                       one (a message that ends inside a request: the rest comes in the
                       next ones, still by column); the outputs of a message's new lane
                       requests made together at their first segment, within the output
                       budget (the message's other segments take the object path: their
                       lane requests are materialized first); each landed stretch is
                       unpacked straight into the outputs (one launch a message)
    SUCCESS            its last stretch landed: the blocks freed, the COMPLETIONS entries
                       built from the columns, the ids reported by `finished()`;
                       `take_many` hands the payloads out and the rows leave

A single request, or a step's few, costs less as objects than as numpy calls on a few
rows (bench/rows_probe.py's latency case): `LANE_MIN_BATCH` keeps those on the object path.

**The encoder lane** (`EncoderLane`, `Sender._lane_*`). A request submitted by
`Sender.submit_many` in a batch of at least `LANE_MIN_BATCH` pairs (on a TP-1 leader; no
items or metadata; nothing heard for its id before the submit: no allocation, COMPLETE,
abort or cache hit; the named engine not gone; no metrics hook, no debug log) is a row:

    BOOTSTRAPPING      waiting for its first allocation; the batch is one marker in the
                       queue of submits to announce (`_lane_announce`: the sizes of the
                       rows still waiting a step later, by column)
    TRANSFERRING       its first allocation applied by column (bound to the language
                       engine, `sent` = min(N, allocated)); its round queued on the
                       engine's channel as part of a `LaneChunks` (the rounds of one
                       ALLOCATIONS run), which `SendChannel._send_one` takes into
                       messages with the object path's chunks, in queue order
    SUCCESS            the COMPLETE of a row sent in full, by column; `release` and
                       `release_many` put it in the memory of finished requests

A record or message of at most `SCALAR_ENTRIES` / `SCALAR_ROUNDS` entries is worked row
by row over the columns (no array call), a bigger one by column. A resume, an abort, a
lost engine, a deadline, a duplicate entry or any other record about a row materializes it
(`Sender._lane_materialize`); a queued round or announcement marker that names its row
finds the object by generation (`left`) and handles it at its place, as the object path
would have; `SendChannel.delivered` knows a materialized request's rounds by its
`lane_gen`.

**Materialization** (both lanes). Anything else that concerns a lane request turns its
row into the `Request` today's code would hold at that point, which then takes today's
rules: an abort from either side, a PAYLOAD_INFO, a segment or message that is not the
usual one, a request past its deadline (found by column, `_live_requests`), a lost engine
or channel, `release` of an unfinished id, `abort`, `take` of one id, any other lookup by
id or walk over `requests` (`LaneRequests` materializes what it is asked for). A row
materialized while in an admission batch, a queue or a message keeps its place there
(`left`, by generation).

`state`, `poll`, `error`, `arrived`, `finished` and `take_many` read the lane without
materializing (`Endpoint.state`, `Endpoint._lookup`); so do the size announcements of an
encoder (`_announced_size`) and the encoder's `lookup` (a lane row is never a cache hit).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from embxfer.control.records import Segment

from .endpoint import Finished, Request
from .membership import EngineView
from .rows import STATE_NAMES, SUCCESS, TRANSFERRING, Rows

# The fewest ids of an admit_many that enter the lane (see the docstring).
LANE_MIN_BATCH = 8
# The fewest usual lane segments a message must hold to be taken by column; a message
# with fewer lets its lane requests go to the object path.
LANE_MIN_SEGMENTS = 8
# The first rounds of a message that `LaneChunks.take` takes one by one before it takes the
# rest by column (a message of a few segments then pays no numpy call).
SCALAR_ROUNDS = 32
# Requests materialized while in an admission batch or an in-flight message, kept (by
# generation) until the batch or message reaches them; bounded for messages that never land.
LEFT_MEMORY = 4096

COLUMNS = {
    "state": "u1",
    "total": "i8",  # N once its first segment came, else -1
    "accepted": "i8",  # tokens of its segments in messages this rank accepted
    "landed": "i8",  # of them, unpacked into its outputs
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
        """The table may have grown: so must the per-slot lists (`_per_slot`)."""
        for per_slot in self._per_slot():
            if self.rows.capacity > len(per_slot):
                per_slot.extend([None] * (self.rows.capacity - len(per_slot)))

    def _per_slot(self) -> tuple[list, ...]:
        return ()

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
        self.output_addresses: list = [None] * capacity  # slot -> their `ops.row_addresses` (CUDA)
        self.block_lists: list = [None] * capacity  # slot -> its blocks, when they are not one run
        super().__init__(COLUMNS, capacity)

    def _per_slot(self) -> tuple[list, ...]:
        return self.outputs, self.output_addresses, self.block_lists

    def set_output_addresses(self, slots: list[int], addresses: np.ndarray) -> None:
        """The `row_addresses` of these rows' outputs (`ops.together_addresses`' rows)."""
        for slot, row in zip(slots, addresses.tolist(), strict=True):
            self.output_addresses[slot] = tuple(row)

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

    def _per_slot(self) -> tuple[list, ...]:
        return self.payloads, self.addresses

    def kept(self, slot: int) -> tuple:
        """What the memory of finished requests keeps of a row that succeeded
        (`Finished.kept`'s form: a lane row has no error and no resume)."""
        return (STATE_NAMES[SUCCESS], None, int(self.rows._columns["total"][slot]), 0)

    def engine_index(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.engines:
            self.engines.append(name)
        return self.engines.index(name)


class LaneChunks:
    """First rounds of lane rows queued on a send channel, in order: what `SendChunk`s are
    for requests (row i's tokens `[starts[i], starts[i] + counts[i])`), kept as lists
    (taken one by one: a numpy scalar costs more than a list item) and, once a message
    takes many at a time, as arrays too (taken by column); `pos` of them are taken. What a
    row's segments say besides (its id, N, mrope delta) is read once, when it is queued. A
    row materialized meanwhile is found by its generation in the lane's `left` and sent as
    the object it became, at its place."""

    __slots__ = ("lane", "pos", "slot_list", "gen_list", "start_list", "count_list", "ids", "totals", "deltas",
                 "arrays")

    def __init__(self, lane: EncoderLane, slots: list[int], gens: list[int], counts: list[int]) -> None:
        c = lane.rows._columns
        self.lane, self.pos = lane, 0
        self.slot_list, self.gen_list, self.count_list = slots, gens, counts
        self.start_list = [0] * len(slots)
        if len(slots) <= SCALAR_ROUNDS:
            ids, totals, deltas = c["request_id"], c["total"], c["mrope_delta"]
            self.ids = [int(ids[slot]) for slot in slots]
            self.totals = [int(totals[slot]) for slot in slots]
            self.deltas = [int(deltas[slot]) for slot in slots]
        else:
            at = np.asarray(slots, dtype=np.int64)
            self.ids, self.totals = c["request_id"][at].tolist(), c["total"][at].tolist()
            self.deltas = c["mrope_delta"][at].tolist()
        self.arrays: tuple[np.ndarray, ...] | None = None  # (slots, gens, starts, counts), made on first use

    def __len__(self) -> int:
        return len(self.slot_list) - self.pos

    def names(self, gen: int) -> bool:
        """True if a round of the row of generation `gen` is still queued here."""
        return gen in self.gen_list[self.pos:]

    def take(self, room_tokens: int, room_segments: int, segments: list, payloads: list, addresses: list,
             rows: list, gens: list) -> tuple[int, tuple | None]:
        """Take the next rounds of live rows into the message being built, as many as
        `room_tokens` and `room_segments` hold (the last one cut where the room ends): their
        segments, payloads, addresses, first payload rows and generations are appended.
        Returns (tokens taken, `became`): `became` is None, or, when the next entry's row
        left the lane meanwhile, `(request, round, start, count)` for the request it became,
        to be sent as an object next (the entry is consumed; a row that finished or was
        forgotten is skipped). The first SCALAR_ROUNDS entries are taken one by one (a
        message of a few segments pays no numpy call), the rest by column."""
        lane = self.lane
        row_gen, row_state = lane.rows._columns["gen"], lane.rows._columns["state"]
        tokens = taken = 0
        end = len(self.slot_list)
        while self.pos < end and taken < SCALAR_ROUNDS and taken < room_segments and tokens < room_tokens:
            pos = self.pos
            slot, gen = self.slot_list[pos], self.gen_list[pos]
            if row_gen[slot] != gen or row_state[slot] != TRANSFERRING:
                if taken:
                    return tokens, None
                return 0, self._left_at(pos)
            count, start = self.count_list[pos], self.start_list[pos]
            take = min(count, room_tokens - tokens)
            segments.append(Segment(self.ids[pos], 0, start, take, self.totals[pos], self.deltas[pos]))
            payloads.append(lane.payloads[slot])
            addresses.append(lane.addresses[slot])
            rows.append(start)
            gens.append(gen)
            tokens += take
            taken += 1
            if take < count:  # the room is full: the rest of this round goes in the next message
                self._cut(pos, take)
                return tokens, None
            self.pos += 1
        if taken < room_segments and tokens < room_tokens and self.pos < end:
            more, became = self._take_columns(room_tokens - tokens, room_segments - taken, segments, payloads,
                                              addresses, rows, gens, first=not taken)
            return tokens + more, became
        return tokens, None

    def _cut(self, pos: int, take: int) -> None:
        """Entry `pos` sent its first `take` tokens: the rest stays queued."""
        self.start_list[pos] += take
        self.count_list[pos] -= take
        if self.arrays is not None:
            self.arrays[2][pos] += take
            self.arrays[3][pos] -= take

    def _left_at(self, pos: int) -> tuple | None:
        """Consume entry `pos`, whose row left the lane: the request it became, if any."""
        self.pos = pos + 1
        request = self.lane.left.pop(self.gen_list[pos], None)
        if request is None:
            return None
        return request, 0, self.start_list[pos], self.count_list[pos]

    def _take_columns(self, room_tokens: int, room_segments: int, segments: list, payloads: list, addresses: list,
                      rows: list, gens: list, first: bool) -> tuple[int, tuple | None]:
        """`take` by column from `pos`; `first`: nothing was taken before in this message
        (a head entry whose row left the lane is then consumed, else left for the next)."""
        lane, pos = self.lane, self.pos
        if self.arrays is None:
            self.arrays = (np.array(self.slot_list, dtype=np.int64), np.array(self.gen_list, dtype=np.int64),
                           np.array(self.start_list, dtype=np.int64), np.array(self.count_list, dtype=np.int64))
        all_slots, all_gens, _, all_counts = self.arrays
        end = min(len(self.slot_list), pos + room_segments)
        slots, entry_gens = all_slots[pos:end], all_gens[pos:end]
        c = lane.rows._columns
        live = (c["gen"][slots] == entry_gens) & (c["state"][slots] == TRANSFERRING)
        run = len(slots) if live.all() else int(np.argmin(live))
        if run == 0:
            return 0, (self._left_at(pos) if first else None)
        ends = np.cumsum(all_counts[pos:pos + run])
        whole = int(np.searchsorted(ends, room_tokens, side="right"))
        tokens = int(ends[whole - 1]) if whole else 0
        cut = room_tokens - tokens if whole < run else 0  # the next entry, cut where the room ends
        n = whole + (1 if cut else 0)
        taken = self.count_list[pos:pos + n]
        starts = self.start_list[pos:pos + n]
        if cut:
            taken[-1] = cut
            self._cut(pos + whole, cut)
        self.pos = pos + whole
        segments.extend(map(Segment._make, zip(self.ids[pos:pos + n], [0] * n, starts, taken,
                                                self.totals[pos:pos + n], self.deltas[pos:pos + n], strict=True)))
        slot_list = self.slot_list[pos:pos + n]
        lane_payloads, lane_addresses = lane.payloads, lane.addresses
        payloads.extend([lane_payloads[s] for s in slot_list])
        addresses.extend([lane_addresses[s] for s in slot_list])
        rows.extend(starts)
        gens.extend(self.gen_list[pos:pos + n])
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
