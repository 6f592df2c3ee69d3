"""Worker processes and helpers of the ring tests.

The workers run in 'spawn' children. They import embxfer.control without running
embxfer/__init__.py (which pulls in torch for the runtime, ~1 s per child on the
2-core CI machine); control/ itself needs only the standard library, numpy and
posix_ipc.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import random
import signal
import struct
import sys
import threading
import time
import types

# One prefix per test session (children inherit it through the environment), so two
# sessions running at once on one machine never mistake each other's segments for leaks.
BASE_PREFIX = "embxfertest"
TEST_PREFIX = os.environ.setdefault("EMBXFER_TEST_RING_PREFIX", f"{BASE_PREFIX}{os.getpid()}")

if multiprocessing.parent_process() is not None and "embxfer" not in sys.modules:
    _spec = importlib.util.find_spec("embxfer")
    _package = types.ModuleType("embxfer")
    _package.__path__ = list(_spec.submodule_search_locations)
    sys.modules["embxfer"] = _package

from embxfer.control import ring  # noqa: E402
from embxfer.control.ring import PeerDeadError, RingReader, RingWriter  # noqa: E402

_INDEX = struct.Struct("<Q")


def leftovers(prefix: str = TEST_PREFIX) -> list[str]:
    return sorted(
        entry
        for entry in os.listdir("/dev/shm")
        if entry.startswith(prefix + "-") or entry.startswith(f"sem.{prefix}-")
    )


def payload(rng: random.Random, index: int, capacity: int) -> bytes:
    """Record `index` of a seeded stream: its index, then random bytes of random length."""
    size = rng.randrange(_INDEX.size, capacity + 1)
    return _INDEX.pack(index) + rng.randbytes(size - _INDEX.size)


def wait_for_readers(writer: RingWriter, count: int, timeout: float = 30.0) -> None:
    """Until `count` readers are attached (`PeerInfo.attached`): every record published
    after that is theirs, from the first on a fresh ring."""
    deadline = time.monotonic() + timeout
    while sum(info.attached for info in writer.readers()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(writer.readers())} of {count} readers attached")
        time.sleep(0.001)


def stress_writer(conn, seed: int, records: int, slots: int, slot_bytes: int, readers: int) -> None:
    writer = RingWriter.create(slots, slot_bytes, max_readers=readers + 1, prefix=TEST_PREFIX)
    try:
        conn.send(writer.name)
        wait_for_readers(writer, readers)
        if not conn.poll(30.0) or conn.recv() != "go":
            raise TimeoutError("no go from the test within 30 s")
        content = random.Random(seed)
        pauses = random.Random(seed + 1)
        for index in range(records):
            writer.publish(payload(content, index, writer.capacity), timeout=30.0)
            if pauses.random() < 0.0005:
                time.sleep(pauses.uniform(0, 0.002))
        conn.send(("done", writer.head))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise
    finally:
        writer.close()


def stress_reader(conn, name: str, seed: int, reader_seed: int, records: int) -> None:
    reader = RingReader.attach(name)
    try:
        conn.send("attached")
        content = random.Random(seed)
        pauses = random.Random(reader_seed)
        for index in range(records):
            data = reader.read(timeout=30.0)
            if data is None:
                raise TimeoutError(f"record {index} did not arrive within 30 s")
            expected = payload(content, index, reader._capacity)
            if data != expected:
                got = _INDEX.unpack_from(data)[0] if len(data) >= 8 else None
                raise AssertionError(f"record {index}: got {len(data)} bytes with index {got}")
            if pauses.random() < 0.001:
                time.sleep(pauses.uniform(0, 0.002))
        conn.send(("ok", records, reader.stats.rejected))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise
    finally:
        reader.close()


def idle_reader(conn, name: str) -> None:
    """Attach, then wait for `conn` to say stop; nothing is read (the writer's lag grows)."""
    reader = RingReader.attach(name)
    try:
        conn.send(("attached", reader.index))
        conn.recv()
    finally:
        reader.close()


def parked_reader(conn, name: str, seconds: float) -> None:
    """Park on an empty ring for `seconds` (for the idle-CPU measurement)."""
    reader = RingReader.attach(name, spin_s=0.0)
    try:
        conn.send("parking")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            reader.read(timeout=deadline - time.monotonic())
        conn.send("done")
    finally:
        reader.close()


def echo(conn, name_in: str, park_slice: float) -> None:
    """Read ring `name_in` with no spinning (always parks) and echo every record into a
    ring of its own until a record b"stop"."""
    ring.PARK_SLICE_S = park_slice  # so a lost wake-up shows up as a stall, not a 50 ms hiccup
    reader = RingReader.attach(name_in, spin_s=0.0)
    writer = RingWriter.create(4, 128, 1, prefix=TEST_PREFIX)
    try:
        conn.send(writer.name)
        conn.recv()  # the parent has attached
        while True:
            data = reader.read(timeout=60.0)
            if data is None or data == b"stop":
                break
            writer.publish(data, timeout=10.0)
    finally:
        reader.close()
        writer.close()


class StopBeforeSequenceStore:
    """Stands in for the writer's view of the segment as 8-byte words (what
    `ring._words` returns) in a writer process: just before the sequence number
    `sequence` is stored into its slot, the process stops itself (SIGSTOP), leaving that
    slot with the new payload and the old sequence, as a writer killed mid-publish would.
    Every other use passes through.

    This relies on how `publish` is written (payload, length and checksum first, then
    the slot's sequence through that view); if that changes, the test that uses it
    fails with "writer never reached the pause point" rather than passing."""

    def __init__(self, words: memoryview, sequence: int, slot_base: int) -> None:
        self._words = words
        self._sequence = sequence
        self._first_slot_word = slot_base // 8

    def __setitem__(self, index: int, value: int) -> None:
        if value == self._sequence and isinstance(index, int) and index >= self._first_slot_word:
            os.kill(os.getpid(), signal.SIGSTOP)
        self._words[index] = value

    def __getitem__(self, index: int | slice):
        return self._words[index]

    def __getattr__(self, name: str):
        return getattr(self._words, name)


def publishing_writer(conn, readers: int, slots: int, stop_before_sequence: int = 0) -> None:
    """Publish numbered records as fast as the readers allow, until killed. With
    `stop_before_sequence`, the writer stops itself mid-publish of that record."""
    if stop_before_sequence:
        slot_base = ring.HEADER_BYTES + ring.READER_ENTRY_BYTES * readers
        words = ring._words
        ring._words = lambda mm: StopBeforeSequenceStore(words(mm), stop_before_sequence, slot_base)
    writer = RingWriter.create(slots, 128, readers, prefix=TEST_PREFIX)
    try:
        conn.send(writer.name)
        wait_for_readers(writer, readers)
        conn.send("go")
        index = 0
        content = random.Random(7)
        while True:
            writer.publish(payload(content, index, writer.capacity), timeout=60.0)
            index += 1
    finally:
        writer.close()


def read_until_writer_dead(reader: RingReader, timeout: float) -> list[bytes]:
    """Every record the reader gets until the writer is reported dead."""
    received = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = reader.read(timeout=deadline - time.monotonic())
        except PeerDeadError:
            return received
        if data is not None:
            received.append(data)
    raise TimeoutError("the writer's death was not reported")


def blocked_writer(conn, beat_every: float) -> None:
    """Create a ring, then block the owning thread in `conn.recv()` (a long engine step)
    while, when `beat_every` > 0, a helper thread heartbeats every `beat_every` seconds."""
    writer = RingWriter.create(4, 64, 1, prefix=TEST_PREFIX)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(beat_every):
            writer.heartbeat()

    helper = threading.Thread(target=beat, daemon=True)
    try:
        if beat_every > 0:
            helper.start()
        conn.send(writer.name)
        conn.recv()
    finally:
        stop.set()
        if helper.is_alive():
            helper.join(5)
        writer.close()
