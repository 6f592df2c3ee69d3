"""`Rows`: one side's requests as rows of preallocated columns (issue 18, item 1).

Where this stands: a TP-1 language leader and a TP-1 encoder rank can keep their usual
requests here (the lanes, `runtime/lane.py`, built and tested against the object path,
off by default: its docstring says why); TP followers keep a `Request` object per
request. `bench/rows_probe.py` drives both sides' usual steps on the table through
many_small's batches (bit-exact, the real records, payload checks, outputs and launches),
against the runtime in the same process: what the design costs per request where it is
complete. It also times the runtime phase by phase under the probe's step names
(`RuntimePhases`): on the CPU every phase of the lanes costs 1.4-8x the probe's
(bench/results/pipeline-NOTES.md, twenty-third section), so what is left is each step's
fixed work (the block allocator's Python stack, a TRANSFER's segments as tuples, the
records' framing), not one hot spot.

The design the endpoints are to follow (one lane per side, the same rules on both):

* **Rows.** A side keeps the requests of its *lane* in columns indexed by slot
  (`COLUMNS`), one `id -> slot` dict and a stack of free slots. A step's work on many
  requests is a few numpy operations over the slots it concerns, not a Python call per
  request. Slots are reused (LIFO, like the block allocator): the id is a request's
  identity, its slot only where it lives now.
* **The usual case only.** A request enters the lane at a batch call (`admit_many`,
  `submit_many`) when nothing unusual is pending for its id (no early abort, cache key,
  items or metadata; the peer engine known and usable) and stays while every step it
  takes is the usual one: one round, its segments in order and within what was
  allocated, outputs within the budget. The moment anything else concerns it (an
  abort from either side, a resume, a record that fails the usual checks, its engine
  lost, a deadline passed, a follower rank), the side *materializes* it: a `Request` with
  exactly the row's state, which from then on takes today's code, the reference for every
  rule. The lane has no rules of its own for the rare cases, and a differential test
  (the same traffic through both paths gives the same records and the same answers)
  holds the two together.
* **Lookups.** `self.requests` keeps only materialized requests. What the engine's loop
  asks every step (`state`, `poll`, `finished`, `arrived`, `take_many`, `release`,
  `release_many`) reads the lane without materializing; every other path that looks an
  id up (records from outside, `abort`, liveness, a lost engine) materializes first, so
  no rule ever sees a half-kept request. A message's usual lane segments are bound by
  column and its other segments through the object path (their lane requests
  materialized first); a record's usual entries likewise, in the record's order.
* **Deadlines.** The liveness check compares `last_progress` by column and materializes
  only the rows past their deadline (never the whole lane on each heartbeat).
* **Records by column.** A step's allocations, completions and decisions are built from
  the columns straight into the batch records' structured arrays (`control/records.py`),
  queued in creation order with the object path's entries; a TRANSFER's segments are
  read as arrays, checked with today's bounds, and looked up as slots once.
* **Objects at the edge.** The API keeps its objects: `Payload`s in and out and their
  tensors (bench/floor.py measures what those cost on their own).
* **Where it pays** (measured, twentieth session: bench/results/host-NOTES.md,
  pipeline-NOTES.md). A numpy call costs 1-3 us whatever its size and a numpy scalar
  read or write about 0.1 us, against 0.02-0.04 us for an attribute: columns pay from
  about 30 requests a call (many_small's records of 256 and messages of 52), and cost
  more than objects below (the batch case's records of a few). Calls of a few entries
  are worked row by row (`sender.SCALAR_ENTRIES`, `lane.SCALAR_ROUNDS`), messages of few
  lane segments let them go (`lane.LANE_MIN_SEGMENTS`). On an H100 host the Python
  bookkeeping the lanes save is a smaller share than on the CPU. (The output views that
  led that host's profile were mostly the garbage collector's passes charged to the
  allocations that set them off: 1.3 us a request for the views themselves on the CPU,
  twenty-first session.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# Row states, in RequestState's order (the code of a member is its index there).
BOOTSTRAPPING, WAITING_FOR_INPUT, TRANSFERRING, SUCCESS, FAILED = range(5)
STATE_NAMES = ("BOOTSTRAPPING", "WAITING_FOR_INPUT", "TRANSFERRING", "SUCCESS", "FAILED")

# The columns every side keeps (a side may add its own): name -> dtype.
COLUMNS: dict[str, str] = {
    "state": "u1",
    "round": "i4",
    "sent": "i8",  # encoder: tokens scheduled; language: tokens received and read
    "total": "i8",  # N on the wire (-1 while unknown)
    "allocated": "i8",  # tokens the current round's blocks hold (SPEC R2)
    "landed": "i8",  # language: the current round's tokens unpacked and not read yet
    "peer": "i4",  # index of the peer incarnation the request is bound to (-1: none yet)
    "block_start": "i8",  # language: first block of the current round's run (-1: none)
    "blocks": "i4",  # language: blocks in that run
    "mrope_delta": "i8",
    "last_progress": "f8",
}


class Rows:
    """Requests of one side as rows: `column(name)[slot]`, `slot_of[request_id]`.

    `add` and `remove` take and give back slots for many requests at once; a column's
    array may be replaced when the table grows, so hold a column only within one step.
    Nothing here checks a request's rules: the side's steps do, over the slots they
    concern."""

    def __init__(self, columns: dict[str, str] | None = None, capacity: int = 256) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r}: expected a positive integer")
        self._dtypes = dict(COLUMNS if columns is None else columns)
        self._dtypes.setdefault("request_id", "i8")
        self._columns = {name: np.zeros(capacity, dtype) for name, dtype in self._dtypes.items()}
        self.capacity = capacity
        self.slot_of: dict[int, int] = {}
        self._free = list(range(capacity - 1, -1, -1))  # top of the stack: the end

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.slot_of

    def column(self, name: str) -> np.ndarray:
        try:
            return self._columns[name]
        except KeyError:
            raise KeyError(f"Rows: no column {name!r} (columns: {sorted(self._columns)})") from None

    def add(self, request_ids: Sequence[int], **values: object) -> np.ndarray:
        """Slots for new requests (ids not in the table, none repeated: ValueError naming
        the first that is, and nothing added), their columns set to 0 but those given in
        `values` (a scalar or one value per id) and `request_id`."""
        ids = list(request_ids)
        slot_of = self.slot_of
        if len(set(ids)) != len(ids) or any(i in slot_of for i in ids):
            seen: set[int] = set()
            for index, request_id in enumerate(ids):
                if request_id in slot_of or request_id in seen:
                    raise ValueError(f"request_ids[{index}]={request_id}: already in the table")
                seen.add(request_id)
        unknown = set(values) - set(self._columns)
        if unknown:
            raise KeyError(f"Rows.add: no column {sorted(unknown)[0]!r}")
        count = len(ids)
        while count > len(self._free):
            self._grow()
        free = self._free
        taken = free[len(free) - count:]
        del free[len(free) - count:]
        taken.reverse()
        slots = np.array(taken, dtype=np.int64)
        slot_of.update(zip(ids, taken, strict=True))
        for array in self._columns.values():
            array[slots] = 0
        self._columns["request_id"][slots] = ids
        for name, value in values.items():
            self._columns[name][slots] = value
        return slots

    def slots(self, request_ids: Iterable[int]) -> np.ndarray:
        """The slot of each id, -1 for an id not in the table."""
        get = self.slot_of.get
        return np.array([get(i, -1) for i in request_ids], dtype=np.int64)

    def remove(self, slots: np.ndarray) -> None:
        """Give slots back (their ids leave the table). ValueError, nothing removed, for a
        slot not in use or named twice."""
        slots = np.asarray(slots, dtype=np.int64)
        ids = self._columns["request_id"][slots].tolist() if len(slots) else []
        slot_of = self.slot_of
        if len(set(ids)) != len(ids) or any(slot_of.get(i) != s for i, s in zip(ids, slots.tolist(), strict=True)):
            raise ValueError(f"Rows.remove: slots {slots.tolist()[:8]} are not distinct slots in use")
        for request_id in ids:
            del slot_of[request_id]
        self._free.extend(reversed(slots.tolist()))

    def remove_id(self, request_id: int) -> int:
        """`remove` of one id, without numpy (what a per-id API call such as `release`
        pays): its slot, or -1 if the id is not in the table."""
        slot = self.slot_of.pop(request_id, -1)
        if slot >= 0:
            self._free.append(slot)
        return slot

    def state_names(self, slots: np.ndarray) -> list[str]:
        return [STATE_NAMES[code] for code in self._columns["state"][slots].tolist()]

    def _grow(self) -> None:
        old = self.capacity
        self.capacity *= 2
        for name, array in self._columns.items():
            grown = np.zeros(self.capacity, array.dtype)
            grown[:old] = array
            self._columns[name] = grown
        self._free[:0] = range(self.capacity - 1, old - 1, -1)  # below the stack: used last
