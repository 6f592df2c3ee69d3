"""What requests as rows would cost per request: both sides' usual steps on `Rows`.

    python bench/rows_probe.py --json bench/results/rows-probe-{device}.json

Issue 18's first item replaces each side's `Request` objects by rows of columns
(`runtime/rows.py`, whose docstring holds the design). Before the endpoints move onto
it, this probe measures what its steps cost, against the runtime as it is in the same
process, for two of bench/pipeline.py's cases at 256 MiB staging (`SHAPES`):

  many_small  256 requests of 256 tokens in 5 messages of at most 52, every allocation
              exact (two blocks of 128 tokens: what the encoder's announcements make of
              every wave after the first)
  latency     one request of 1024 tokens, blind (the default allocation, 8192 tokens)

Each round measures the probe, the runtime with the language lane ("lane":
`receiver.LANE_ENABLED` on) and without it ("objects", the default), in that order.

D = 3584 in bf16 on CUDA; on a CPU D = 64 by default (the runtime copies with torch
there, inside progress(), and at D = 3584 the copies would be most of its time).

Each side does every step of the usual case by column, with the checks an outsider's
record gets today and the API's objects at the edge, end to end and bit-exact (asserted
on the first batch):

  language  admit_many (ids checked, rows added); the admissions (blocks taken as runs,
            the ALLOCATIONS record built from the columns and encoded); each TRANSFER
            read as arrays (the wire's bounds, the ids looked up once, the usual case
            checked as one mask), the message's outputs made together, the unpack (one
            launch from the outputs' addresses on CUDA); the rounds read and decided
            (masks), blocks freed, the COMPLETIONS record built and encoded, the finished
            ids; take_many (the `Payload`s, the rows removed)
  encoder   submit_many (ids and payloads checked, row addresses read, rows added); the
            ALLOCATIONS decoded and applied by column (the send queue as arrays); each
            message's TRANSFER from the columns and its pack (one launch from the address
            column); the COMPLETIONS decoded and applied; release of each id

`wire` is the loopback copy between two staging buffers, `device` the wait for the
device after each message (the probe does not overlap messages: an upper bound). Not in
it: progress()'s own per-step overhead and the bus (a ring slot per record), which
today's figures (`LocalCluster` under bench/pipeline.py's timers, `*_host_us_per_request`)
include.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from embxfer.control import records as rec
from embxfer.kernels import ops, staging_layout
from embxfer.runtime import Config, receiver
from embxfer.runtime import rows as R
from embxfer.runtime.channels import SendChannel
from embxfer.runtime.endpoint import checked_ids
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.payload import Payload, RowSpec
from embxfer.runtime.pool import BlockPool
from embxfer.runtime.sender import Sender
from embxfer.runtime.transport import LoopbackHub

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import count_calls, one_request, result_path, time_engine_calls  # noqa: E402 - bench/pipeline.py, next to this file

BLOCK = 128
DIM = 3584  # main() sets it: 3584 on CUDA, 64 on a CPU unless --dim


class Shape(NamedTuple):
    """A case of bench/pipeline.py as the probe runs it."""

    requests: int
    tokens: int
    alloc_tokens: int  # the first allocation: exact (announced) or the default (blind)
    pool_blocks: int
    per_message: int  # segments per staging message


SHAPES = {
    # 256 x 256 tokens; 5 messages at 256 MiB staging; exact allocations, what the encoder's
    # announcements make of every wave but the first
    "many_small": Shape(256, 256, 256, 2048, 52),
    # one 1024-token request at a time, blind: the default allocation of 8192 tokens
    "latency": Shape(1, 1024, 8192, 256, 1),
}

# A TRANSFER's segment as the wire lays it out (records._SEGMENT, "<qIIIIq").
SEGMENT = np.dtype([("request_id", "<i8"), ("round", "<u4"), ("start", "<u4"), ("count", "<u4"),
                    ("total_tokens", "<u4"), ("mrope_delta", "<i8")])
assert SEGMENT.itemsize == struct.calcsize("<qIIIIq")
TRANSFER_FIXED = struct.Struct("<qqqqH")
HEADER = struct.Struct("<2sBBI")


def transfer_bytes(src: int, dst: int, message: int, nbytes: int, segments: np.ndarray) -> bytes:
    """A TRANSFER record's wire bytes from its segments' columns (records.Transfer's encoding)."""
    body = TRANSFER_FIXED.pack(src, dst, message, nbytes, len(segments)) + segments.tobytes()
    return HEADER.pack(rec.MAGIC, rec.VERSION, rec.RecordType.TRANSFER, len(body)) + body


def transfer_columns(frame: bytes, max_segments: int) -> tuple[int, np.ndarray]:
    """(message, segments) of a one-record TRANSFER frame, read as arrays, with
    Transfer._parse's bounds; RecordError as it would."""
    magic, version, kind, length = HEADER.unpack_from(frame)
    if magic != rec.MAGIC or version != rec.VERSION or kind != rec.RecordType.TRANSFER \
            or length != len(frame) - HEADER.size:
        raise rec.RecordError("not a TRANSFER frame")
    src, dst, message, nbytes, count = TRANSFER_FIXED.unpack_from(frame, HEADER.size)
    if not 1 <= count <= max_segments or length != TRANSFER_FIXED.size + count * SEGMENT.itemsize:
        raise rec.RecordError(f"Transfer: {count} segments")
    seg = np.frombuffer(frame, SEGMENT, count, HEADER.size + TRANSFER_FIXED.size)
    if (seg["request_id"] < 0).any() or (seg["count"] < 1).any() or (seg["total_tokens"] < 1).any() \
            or ((seg["start"] + seg["count"].astype(np.int64)) > seg["total_tokens"]).any():
        raise rec.RecordError("Transfer: a segment out of bounds")
    if src < 0 or message < 0 or nbytes < 1:
        raise rec.RecordError("Transfer: bad header")
    return message, seg


class Language:
    """A TP-1 language leader's usual steps on rows."""

    def __init__(self, device: torch.device, shape: Shape) -> None:
        self.rows = R.Rows(capacity=shape.requests)
        self.pool = BlockPool(1, 16, DIM, torch.bfloat16, 0, device)
        self.free_blocks = np.arange(shape.pool_blocks - 1, -1, -1, dtype=np.int64)  # a stack: top at the end
        self.top = shape.pool_blocks
        self.admission: list[np.ndarray] = []
        self.outputs: list = [None] * shape.requests
        self.finished: list[int] = []
        self.cuda = device.type == "cuda"

    def admit_many(self, ids: list[int]) -> None:
        ids = checked_ids(ids)
        self.admission.append(self.rows.add(ids, state=R.BOOTSTRAPPING, total=-1, round=-1,
                                            last_progress=time.monotonic()))

    def admit_waiting(self, expected_tokens: int) -> bytes:
        slots = np.concatenate(self.admission)
        self.admission.clear()
        per = -(-expected_tokens // BLOCK)
        count = len(slots) * per
        taken = self.free_blocks[self.top - count:self.top][::-1].reshape(len(slots), per)
        self.top -= count
        runs = (np.diff(taken, axis=1) == 1).all(axis=1) if per > 1 else np.ones(len(slots), bool)
        assert runs.all(), "a block list that is not a run would take the object path"
        c = self.rows._columns
        c["block_start"][slots] = taken[:, 0]
        c["blocks"][slots] = per
        c["allocated"][slots] = per * BLOCK
        c["round"][slots] = 0
        c["state"][slots] = R.WAITING_FOR_INPUT
        c["last_progress"][slots] = time.monotonic()
        entries = np.zeros(len(slots), rec.Allocations.ENTRY)
        entries["request_id"] = c["request_id"][slots]
        entries["allocated_tokens"] = per * BLOCK
        return rec.Allocations.trusted(src_rank=1, dst_rank=0, entries=entries).to_bytes()

    def on_transfer(self, frame: bytes) -> tuple[np.ndarray, object, list, np.ndarray]:
        """The message's slots, outputs (the whole and the views) and counts."""
        _, seg = transfer_columns(frame, rec.MAX_SEGMENTS)
        slots = self.rows.slots(seg["request_id"].tolist())
        c = self.rows._columns
        counts = seg["count"].astype(np.int64)
        usual = (slots >= 0) & (seg["round"] == 0) & (seg["start"] == 0) & (counts == seg["total_tokens"])
        usual &= (c["state"][slots] == R.WAITING_FOR_INPUT) & (counts <= c["allocated"][slots])
        assert usual.all(), "another segment would take the object path"
        c["total"][slots] = counts
        c["mrope_delta"][slots] = seg["mrope_delta"]
        c["state"][slots] = R.TRANSFERRING
        whole, views = self.pool.empty_rows_together(counts.tolist())
        outputs = self.outputs
        for slot, view in zip(slots.tolist(), views, strict=True):
            outputs[slot] = view
        return slots, whole, views, counts

    def unpack(self, staging: torch.Tensor, layout, whole, views: list, counts: np.ndarray) -> None:
        """The message into its requests' outputs: one launch addressed from the whole's
        addresses (CUDA), a copy per field (CPU)."""
        if self.cuda:
            ops.unpack_addressed_rows(staging, layout, whole, ops.together_addresses(whole, counts),
                                      np.zeros(len(counts), np.int64), views)
        else:
            ops.unpack_together(staging, layout, whole)

    def landed(self, slots: np.ndarray) -> bytes:
        """The message's rows are in the outputs: read, decide, complete."""
        c = self.rows._columns
        c["landed"][slots] = c["total"][slots]
        done = slots[c["landed"][slots] + c["sent"][slots] == c["total"][slots]]
        c["sent"][done] = c["total"][done]
        c["landed"][done] = 0
        c["state"][done] = R.SUCCESS
        runs = c["blocks"][done].astype(np.int64)
        freed = np.repeat(c["block_start"][done] - (np.cumsum(runs) - runs), runs) + np.arange(int(runs.sum()))
        self.free_blocks[self.top:self.top + len(freed)] = freed[::-1]
        self.top += len(freed)
        c["block_start"][done] = -1
        ids = c["request_id"][done]
        self.finished.extend(ids.tolist())
        entries = np.zeros(len(done), rec.Completions.ENTRY)
        entries["request_id"] = ids
        entries["sent_tokens"] = entries["total_tokens"] = c["total"][done]
        return rec.Completions.trusted(src_rank=1, dst_rank=0, entries=entries).to_bytes()

    def take_many(self, ids: list[int]) -> list[Payload]:
        ids = checked_ids(ids)
        slots = self.rows.slots(ids)
        if (slots < 0).any() or (self.rows._columns["state"][slots] != R.SUCCESS).any():
            raise ValueError("take_many: an id not SUCCESS")
        deltas = self.rows._columns["mrope_delta"][slots].tolist()
        outputs, trusted, taken = self.outputs, Payload._trusted, []
        for slot, delta in zip(slots.tolist(), deltas, strict=True):
            rows = outputs[slot]
            outputs[slot] = None
            taken.append(trusted(rows[0], rows[1], rows[2], delta, rows[3]))
        self.rows.remove(slots)
        return taken


class Encoder:
    """A TP-1 encoder rank's usual steps on rows."""

    def __init__(self, device: torch.device, shape: Shape) -> None:
        self.rows = R.Rows(capacity=shape.requests)
        self.limits = rec.Limits.for_pool(shape.pool_blocks)
        self.spec = RowSpec(DIM, 0, torch.bfloat16, device)
        self.payloads = np.empty(shape.requests, dtype=object)
        self.addresses = np.zeros((shape.requests, 5), dtype=np.int64)
        self.queue: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (slots, starts, counts)
        self.cuda = device.type == "cuda"
        self.next_message = 0
        self.finished: list[int] = []

    def submit_many(self, pairs: list[tuple[int, Payload]]) -> None:
        ids = checked_ids([request_id for request_id, _ in pairs], "submits")
        spec, cuda = self.spec, self.cuda
        totals, addresses = [], []
        for _, payload in pairs:
            spec.check_payload(payload, "encoder")
            totals.append(payload.num_tokens)
            if cuda:
                addresses.append(ops.row_addresses(payload))
        slots = self.rows.add(ids, state=R.BOOTSTRAPPING, total=totals, round=-1,
                              mrope_delta=[p.mrope_delta for _, p in pairs], last_progress=time.monotonic())
        self.payloads[slots] = [p for _, p in pairs]
        if cuda:
            self.addresses[slots] = addresses

    def on_allocations(self, frame: bytes) -> None:
        records, why = rec.decode_frame(frame, self.limits)
        assert why is None
        e = records[0].entries
        slots = self.rows.slots(e["request_id"].tolist())
        c = self.rows._columns
        usual = (slots >= 0) & (e["round"] == 0) & (e["sent_tokens"] == 0) & (e["allocated_tokens"] % BLOCK == 0)
        usual &= (c["state"][slots] == R.BOOTSTRAPPING) & (c["round"][slots] == -1)
        counts = np.minimum(c["total"][slots], e["allocated_tokens"].astype(np.int64))
        usual &= counts == c["total"][slots]  # one round; a resume would take the object path
        assert usual.all()
        c["round"][slots] = 0
        c["sent"][slots] = counts
        c["state"][slots] = R.TRANSFERRING
        c["last_progress"][slots] = time.monotonic()
        self.queue.append((slots, np.zeros(len(slots), np.int64), counts))

    def send_one(self, limit: int) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
        """The next message (at most `limit` segments): its TRANSFER record, slots, row
        starts and counts."""
        slots, starts, counts = self.queue[0]
        if len(slots) > limit:
            self.queue[0] = (slots[limit:], starts[limit:], counts[limit:])
            slots, starts, counts = slots[:limit], starts[:limit], counts[:limit]
        else:
            self.queue.pop(0)
        c = self.rows._columns
        segments = np.zeros(len(slots), SEGMENT)
        segments["request_id"] = c["request_id"][slots]
        segments["start"] = starts
        segments["count"] = counts
        segments["total_tokens"] = c["total"][slots]
        segments["mrope_delta"] = c["mrope_delta"][slots]
        frame = transfer_bytes(0, 1, self.next_message, int(counts.sum()) * (DIM * 2 + 16), segments)
        self.next_message += 1
        return frame, slots, starts, counts

    def pack(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray, staging: torch.Tensor,
             layout) -> None:
        """The message's rows into `staging`: one launch from the address column (CUDA)."""
        payloads = self.payloads[slots].tolist()
        ops.pack_addressed_rows(payloads[0], self.addresses[slots] if self.cuda else None, starts, payloads,
                                staging, layout)

    def on_completions(self, frame: bytes) -> None:
        records, why = rec.decode_frame(frame, self.limits)
        assert why is None
        e = records[0].entries
        slots = self.rows.slots(e["request_id"].tolist())
        c = self.rows._columns
        usual = (slots >= 0) & (e["flags"] == 0) & (c["state"][slots] == R.TRANSFERRING)
        usual &= (e["total_tokens"] == e["sent_tokens"]) & (e["total_tokens"] == c["total"][slots])
        usual &= c["sent"][slots] == c["total"][slots]
        assert usual.all()
        c["state"][slots] = R.SUCCESS
        self.payloads[slots] = None
        self.finished.extend(e["request_id"].tolist())

    def release(self, request_id: int) -> None:
        slot = self.rows.slot_of.get(request_id)
        if slot is not None and self.state[slot] == R.SUCCESS:
            self.rows.remove_id(request_id)


class Wire:
    """What moves a message between the two sides here: a staging buffer each and a copy
    (bench/pipeline.py's loopback does the same), the layouts cached per counts."""

    def __init__(self, device: torch.device) -> None:
        self.send = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        self.recv = torch.empty_like(self.send)
        self.layouts: dict[tuple[int, ...], object] = {}
        self.cuda = device.type == "cuda"

    def layout(self, counts: np.ndarray):
        key = tuple(counts.tolist())
        layout = self.layouts.get(key)
        if layout is None:
            layout = self.layouts[key] = staging_layout(key, DIM, 0, torch.bfloat16)
        return layout

    def move(self, layout) -> None:
        self.recv[:layout.nbytes].copy_(self.send[:layout.nbytes])

    def wait(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def one_batch(shape: Shape, encoder: Encoder, language: Language, wire: Wire, payloads: list[Payload],
              first_id: int, spent: dict[str, float]) -> list[Payload]:
    """Both sides' steps for one batch, in the order a loop runs them, each step's time
    added to `spent` (the device's, waited for after each message, under "device")."""
    clock = time.perf_counter

    def timed(key: str, work, *args):
        started = clock()
        result = work(*args)
        spent[key] += clock() - started
        return result

    ids = list(range(first_id, first_id + len(payloads)))
    timed("language.admit_many", language.admit_many, ids)
    timed("encoder.submit_many", encoder.submit_many, list(zip(ids, payloads, strict=True)))
    allocations = timed("language.admissions", language.admit_waiting, shape.alloc_tokens)
    timed("encoder.allocations", encoder.on_allocations, allocations)
    while encoder.queue:
        frame, sent, starts, counts = timed("encoder.message", encoder.send_one, shape.per_message)
        layout = timed("encoder.pack", wire.layout, counts)
        timed("encoder.pack", encoder.pack, sent, starts, counts, wire.send, layout)
        timed("wire", wire.move, layout)
        slots, whole, views, counts = timed("language.message", language.on_transfer, frame)
        layout = timed("language.unpack", wire.layout, counts)
        timed("language.unpack", language.unpack, wire.recv, layout, whole, views, counts)
        timed("device", wire.wait)
        completions = timed("language.landed", language.landed, slots)
        timed("encoder.completions", encoder.on_completions, completions)
    done = timed("language.finished", lambda: (language.finished.copy(), language.finished.clear())[0])
    taken = timed("language.take_many", language.take_many, done)
    released = timed("encoder.finished", lambda: (encoder.finished.copy(), encoder.finished.clear())[0])
    encoder.state = encoder.rows.column("state")  # (held within one step only: a column may grow)
    timed("encoder.release", lambda: [encoder.release(rid) for rid in released])
    return taken


def today(device: torch.device, shape: Shape, reps: int, lane: bool) -> dict:
    """Each side's host time per request through the runtime (LocalCluster with
    bench/pipeline.py's configuration of the case at 256 MiB staging; the latency case one
    request at a time, admit + submit -> take, as pipeline.one_request runs it): with the
    language lane (`receiver.LANE_ENABLED`, off by default) or without it (every request
    a Request object on both sides)."""
    config = Config(default_alloc_tokens=8192, language_pool_blocks=shape.pool_blocks, staging_bytes=256 << 20)
    enabled, receiver.LANE_ENABLED = receiver.LANE_ENABLED, lane
    try:
        cluster = LocalCluster(config=config, dim=DIM, device=device)
    finally:
        receiver.LANE_ENABLED = enabled
    payloads = [random_payload(shape.tokens, DIM, seed=i, device=device) for i in range(shape.requests)]
    next_id = 0

    def batch() -> None:
        nonlocal next_id
        if shape.requests == 1:
            one_request(cluster, next_id, payloads[0])
            cluster.settle()
            cluster.senders[0].release(next_id)
        else:
            cluster.transfer({next_id + i: p for i, p in enumerate(payloads)})
        next_id += shape.requests

    for _ in range(3 if shape.requests > 1 else 20):
        batch()
    spent, per_rep, walls = time_engine_calls(cluster), [], []
    phases = RuntimePhases(cluster)
    for _ in range(reps):
        before = dict(spent)
        started = time.perf_counter()
        batch()
        walls.append(time.perf_counter() - started)
        per_rep.append({side: spent[side] - before[side] for side in spent})
    phases.restore()
    cluster.close()
    out = {f"{side}_us": 1e6 * statistics.median(rep[side] for rep in per_rep) / shape.requests
           for side in ("encoder", "language")}
    out["wall_us"] = 1e6 * statistics.median(walls) / shape.requests
    out["phases"] = {key: 1e6 * seconds / reps / shape.requests for key, seconds in sorted(phases.spent.items())}
    return out


class RuntimePhases:
    """The runtime's host time by phase, named as this probe's steps where they match
    (`language.message`, `encoder.pack`...), so that the gap between the rows design and the
    runtime reads step by step. Each phase is a set of the runtime's functions, wrapped
    while `today` times its batches (on the endpoint or bus instance, keyed by side, or on
    the class or the ops module); the time of a wrapped call nested in another
    (`ops.unpack_together` inside `Receiver._landed`) counts to its own phase only.
    `language.records` and `encoder.records` are the records' handling and building,
    `*.bus` their framing, encoding and decoding (which the probe pays inside its
    steps); what a side's total holds beyond its phases is `progress()`'s own work and,
    on whichever side posts it, the loopback wire's copy (`wire`). The
    single calls (`admit`, `submit`, `take`, `release`: the latency case) count to their
    batch call's phase."""

    ENDPOINT = {"language": {"admit_many": "admit_many", "admit": "admit_many", "_admit_waiting": "admissions",
                             "_accept": "message", "_landed": "landed", "take_many": "take_many",
                             "take": "take_many", "_on_record": "records", "_emit": "records"},
                "encoder": {"submit_many": "submit_many", "submit": "submit_many", "_on_record": "records",
                            "release_many": "release", "release": "release"}}
    BUS = ("drain", "flush", "publish")
    OPS = {"pack_rows": "encoder.pack", "pack_addressed_rows": "encoder.pack", "unpack_together": "language.unpack",
           "unpack_addressed_rows": "language.unpack", "unpack_to_rows": "language.unpack",
           "gather_addressed": "language.unpack"}

    def __init__(self, cluster: LocalCluster) -> None:
        self.spent: dict[str, float] = {}
        self._calls: collections.Counter = collections.Counter()
        self._nested: list[float] = []  # shared by the wrappers: nested calls counted once
        self._undo: list[Callable[[], None]] = []
        for endpoint in cluster.endpoints:
            side = "encoder" if isinstance(endpoint, Sender) else "language"
            for name, phase in self.ENDPOINT[side].items():
                self._wrap(endpoint, name, f"{side}.{phase}")
            for name in self.BUS:
                self._wrap(endpoint.bus, name, f"{side}.bus")
        self._wrap(SendChannel, "_send_one", "encoder.message")
        self._wrap(LoopbackHub, "_match", "wire")
        for name, key in self.OPS.items():
            self._wrap(ops, name, key)

    def _wrap(self, owner: object, name: str, key: str) -> None:
        self.spent.setdefault(key, 0.0)
        self._undo.append(count_calls(owner, name, key, self.spent, self._calls, nested=self._nested))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()


def measure(device: torch.device, shape: Shape, reps: int) -> dict:
    """The lanes' steps per request (median over `reps` batches after 3 warm-ups)."""
    payloads = [random_payload(shape.tokens, DIM, seed=i, device=device) for i in range(shape.requests)]
    encoder, language, wire = Encoder(device, shape), Language(device, shape), Wire(device)
    keys = ("language.admit_many", "language.admissions", "language.message", "language.unpack", "language.landed",
            "language.finished", "language.take_many", "encoder.submit_many", "encoder.allocations",
            "encoder.message", "encoder.pack", "encoder.completions", "encoder.finished", "encoder.release",
            "wire", "device")
    per_rep = []
    next_id = 1 << 40
    for rep in range(reps + 3):
        spent = dict.fromkeys(keys, 0.0)
        taken = one_batch(shape, encoder, language, wire, payloads, next_id, spent)
        next_id += shape.requests
        if rep == 0:  # every request came out bit-exact, in order; nothing left behind
            assert len(taken) == shape.requests and all(t.bit_equal(p) for t, p in zip(taken, payloads, strict=True))
            assert len(encoder.rows) == len(language.rows) == 0 and language.top == shape.pool_blocks
        if rep >= 3:
            per_rep.append(spent)
    out = {key: 1e6 * statistics.median(rep[key] for rep in per_rep) / shape.requests for key in keys}
    for side in ("language", "encoder"):
        out[f"{side}_us"] = sum(v for k, v in out.items() if k.startswith(side + "."))
    out["wall_us"] = out["language_us"] + out["encoder_us"] + out["wire"] + out["device"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/results/rows-probe-{device}.json")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="times the whole measurement is repeated")
    parser.add_argument("--dim", type=int, default=None, help="D (default: 3584 on CUDA, 64 on a CPU)")
    args = parser.parse_args(argv)
    global DIM
    cuda = torch.cuda.is_available()
    DIM = args.dim or (3584 if cuda else 64)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    torch.set_num_threads(1)
    cases = {}
    for case, shape in SHAPES.items():
        reps = args.reps if shape.requests > 1 else 10 * args.reps
        rounds = []
        for _ in range(args.rounds):  # the three, alternating, each after a full collection
            gc.collect()
            rows = measure(device, shape, reps)
            gc.collect()
            now = today(device, shape, max(5, reps // 5), lane=True)
            gc.collect()
            rounds.append({"rows": rows, "lane": now, "objects": today(device, shape, max(5, reps // 5), lane=False)})
        cases[case] = {**shape._asdict(), "rounds": rounds}
    result = {"benchmark": "rows_probe", "device": name, "torch": torch.__version__, "dim": DIM, "cases": cases}
    path = result_path(args.json, name)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}, D = {DIM}: host time per request (us), rows (this probe) / lane (the runtime with the language "
          "lane) / objects (the runtime without it, its default)")
    for case, found in cases.items():
        print(f"  {case}: {found['requests']} x {found['tokens']} tokens")
        for r in found["rounds"]:
            rows, now, old = r["rows"], r["lane"], r["objects"]
            print(f"    encoder {rows['encoder_us']:.2f} / {now['encoder_us']:.2f} / {old['encoder_us']:.2f}   language "
                  f"{rows['language_us']:.2f} / {now['language_us']:.2f} / {old['language_us']:.2f}   wall "
                  f"{rows['wall_us']:.2f} / {now['wall_us']:.2f} / {old['wall_us']:.2f}")
            print("      rows    " + "  ".join(f"{k} {v:.2f}" for k, v in rows.items()
                                            if "." in k or k in ("wire", "device")))
            print("      lane    " + "  ".join(f"{k} {v:.2f}" for k, v in now["phases"].items()))
            print("      objects " + "  ".join(f"{k} {v:.2f}" for k, v in old["phases"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
