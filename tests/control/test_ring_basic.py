"""The ring within one process: layout checks, backpressure errors, corruption, hygiene."""

from __future__ import annotations

import mmap
import os
import random
import re
import stat
import struct
import threading
import time

import numpy as np
import posix_ipc
import pytest
from ringworkers import TEST_PREFIX

from embxfer.control import records as rec
from embxfer.control.ring import (
    HEADER_BYTES,
    READER_ENTRY_BYTES,
    SLOT_HEADER_BYTES,
    Doorbell,
    IncompatibleRingError,
    PeerDeadError,
    RingCorruptError,
    RingError,
    RingFullError,
    RingReader,
    RingWriter,
    slot_bytes_for,
    wait_any,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ring():
    with RingWriter.create(4, 128, 2, prefix=TEST_PREFIX) as writer:
        yield writer


def _raw(name: str) -> tuple[posix_ipc.SharedMemory, mmap.mmap]:
    shm = posix_ipc.SharedMemory("/" + name)
    return shm, mmap.mmap(shm.fd, shm.size)


def test_records_arrive_in_order_with_sequences(ring):
    with RingReader.attach(ring.name) as reader:
        assert reader.poll() is None
        sequences = [ring.publish(b"r%d" % i, timeout=1) for i in range(3)]
        assert sequences == [1, 2, 3]
        assert ring.publish(b"", timeout=1) == 4  # empty records are records too
        assert [reader.poll() for _ in range(5)] == [b"r0", b"r1", b"r2", b"", None]
        assert reader.stats.delivered == 4 and reader.pending == 0


def test_a_reader_sees_only_records_published_after_it_attached(ring):
    ring.publish(b"before", timeout=1)
    with RingReader.attach(ring.name) as reader:
        ring.publish(b"after", timeout=1)
        assert reader.read(timeout=1) == b"after"
        assert reader.poll() is None


def test_a_reader_entry_counts_as_attached_only_once_every_later_record_is_its(ring, monkeypatch):
    """Between claiming its entry and storing its cursor an attaching reader is in
    `readers()`, but a record published then may not be its (a writer that took the entry
    for a linked reader lost such records on a young ring). `attached` tells the two apart."""
    seen = {}
    claim = RingReader._claim_entry

    def claim_then_look(*args):
        index = claim(*args)
        (info,) = ring.readers()
        seen["during"] = info
        ring.publish(b"in the window", timeout=1)  # at or below the head the reader reads next
        return index

    monkeypatch.setattr(RingReader, "_claim_entry", staticmethod(claim_then_look))
    with RingReader.attach(ring.name) as reader:
        during = seen["during"]
        assert (during.attached, during.cursor, during.heartbeat_age_s, during.pid) == (False, 0, 0.0, os.getpid())
        (after,) = ring.readers()
        assert after.attached and after.cursor == 1 and after.heartbeat_age_s >= 0
        ring.publish(b"once attached", timeout=1)
        assert reader.read(timeout=1) == b"once attached"
        assert reader.poll() is None


def test_oversized_record_is_refused_with_the_slot_size(ring):
    ring.publish(bytes(ring.capacity), timeout=1)
    with pytest.raises(ValueError, match="slot_bytes=128 holds at most 112"):
        ring.publish(bytes(ring.capacity + 1), timeout=1)


def test_the_documented_worst_case_record_fits_a_slot_sized_for_it(prefix):
    """The largest record of the default 1024-block pool (one allocation of every block, no
    two consecutive, the longest hash) fills a slot sized from `max_record_bytes`, which is
    at most 4096 bytes, and arrives whole."""
    limits = rec.Limits.for_pool(1024, 64)
    slot_bytes = slot_bytes_for(rec.max_record_bytes(limits))
    assert slot_bytes <= 4096
    blocks = np.array([*range(1023, 0, -2), *range(0, 1024, 2)], dtype=np.int64)
    decision = rec.Decisions.of(0, [(1, 2, rec.DecisionAction.RESUME, 10, 20, 1024 * 128, 0, b"h" * 32, blocks)])
    data = rec.encode(decision)
    assert len(data) == rec.max_record_bytes(limits)
    with RingWriter.create(2, slot_bytes, 1, prefix=prefix) as writer, RingReader.attach(writer.name) as reader:
        writer.publish(data, timeout=1)
        received = rec.decode(reader.poll(), limits)
        assert received == decision and received.decisions()[0].blocks.tolist() == blocks.tolist()


def test_full_ring_names_the_slowest_reader_and_its_lag(ring):
    fast = RingReader.attach(ring.name)
    slow = RingReader.attach(ring.name)
    try:
        for i in range(4):
            ring.publish(b"%d" % i, timeout=1)
        while fast.poll() is not None:
            pass
        slow.poll()
        ring.publish(b"4", timeout=1)  # slot of record 1 is free now
        start = time.monotonic()
        with pytest.raises(RingFullError) as caught:
            ring.publish(b"5", timeout=0.3)
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 1.0
        peer = caught.value.slowest
        assert (peer.index, peer.pid, peer.lag, peer.alive) == (slow.index, os.getpid(), 4, True)
        assert f"reader #{slow.index} (pid {os.getpid()}, alive, cursor 1, lag 4" in str(caught.value)
        assert slow.poll() == b"1"  # never overwritten
        assert ring.publish(b"5", timeout=1) == 6
    finally:
        fast.close()
        slow.close()


def test_reader_close_releases_its_entry_and_unblocks_the_writer(prefix):
    with RingWriter.create(2, 64, 1, prefix=prefix) as writer:
        reader = RingReader.attach(writer.name)
        with pytest.raises(RingError, match="all 1 reader entries are taken"):
            RingReader.attach(writer.name)
        writer.publish(b"a", timeout=1)
        writer.publish(b"b", timeout=1)
        reader.close()
        reader.close()  # idempotent
        assert writer.publish(b"c", timeout=0.1) == 3  # nobody left to wait for
        with RingReader.attach(writer.name) as again:
            assert again.index == 0


def test_closed_ring_drains_then_reports_the_writer(prefix):
    writer = RingWriter.create(4, 64, 1, prefix=prefix)
    reader = RingReader.attach(writer.name)
    try:
        writer.publish(b"last words", timeout=1)
        writer.close()
        writer.close()  # idempotent
        assert reader.read(timeout=1) == b"last words"
        with pytest.raises(PeerDeadError, match="closed the ring") as caught:
            reader.read(timeout=0.2)
        assert caught.value.peer.role == "writer" and not reader.writer_alive()
    finally:
        reader.close()
    with pytest.raises(RingError, match="no ring segment"):
        RingReader.attach(writer.name)


def test_corrupt_slots_are_rejected_counted_and_never_delivered(ring):
    rng = random.Random(1234)
    shm, raw = _raw(ring.name)
    reader = RingReader.attach(ring.name)
    slots_start = HEADER_BYTES + READER_ENTRY_BYTES * 2
    delivered = corrupted = 0
    try:
        for _ in range(1500):
            batch = []
            for _ in range(rng.randint(1, 4)):
                data = rng.randbytes(rng.randint(0, ring.capacity))
                sequence = ring.publish(data, timeout=1)
                slot = slots_start + (sequence - 1) % 4 * 128
                damaged = rng.random() < 0.5
                if damaged:
                    for _ in range(rng.randint(1, 3)):
                        position = slot + rng.randrange(SLOT_HEADER_BYTES + len(data))
                        raw[position] ^= rng.randint(1, 255)
                batch.append((data, damaged))
            for data, damaged in batch:
                if damaged:
                    with pytest.raises(RingCorruptError, match="rejected"):
                        reader.poll()
                    corrupted += 1
                else:
                    assert reader.poll() == data
                    delivered += 1
        assert reader.poll() is None
        assert reader.stats.rejected == corrupted > 500
        assert reader.stats.delivered == delivered > 500
    finally:
        reader.close()
        raw.close()
        shm.close_fd()


def test_poll_many_delivers_what_poll_would_in_batches(ring):
    with RingReader.attach(ring.name) as reader:
        assert reader.poll_many(8) == []
        for index in range(3):
            ring.publish(b"r%d" % index, timeout=1)
        assert reader.poll_many(2) == [b"r0", b"r1"]
        assert reader.pending == 1 and reader.next_sequence == 3
        ring.publish(b"r3", timeout=1)
        assert reader.poll_many(8) == [b"r2", b"r3"]  # a batch stops at the head
        assert reader.poll_many(1) == [] and reader.poll() is None
        ring.publish(b"", timeout=1)
        assert reader.poll_many(1) == [b""]
        assert reader.stats.delivered == 5
        for bad in (0, -1, True, 2.0, None):
            with pytest.raises(ValueError, match=re.escape(f"max_records={bad!r}")):
                reader.poll_many(bad)


def test_poll_many_ends_a_batch_before_a_corrupt_slot_which_is_then_rejected(ring):
    rng = random.Random(4321)
    shm, raw = _raw(ring.name)
    reader = RingReader.attach(ring.name)
    slots_start = HEADER_BYTES + READER_ENTRY_BYTES * 2
    expected, corrupted = [], 0
    try:
        for _ in range(500):
            for _ in range(rng.randint(1, 4)):
                data = rng.randbytes(rng.randint(0, ring.capacity))
                sequence = ring.publish(data, timeout=1)
                if rng.random() < 0.3:
                    position = slots_start + (sequence - 1) % 4 * 128 + rng.randrange(SLOT_HEADER_BYTES + len(data))
                    raw[position] ^= rng.randint(1, 255)
                    corrupted += 1
                else:
                    expected.append(data)
            got = []
            while reader.pending:
                try:
                    got += reader.poll_many(rng.randint(1, 5))
                except RingCorruptError:
                    continue
            assert got == expected
            expected.clear()
        assert reader.stats.rejected == corrupted > 100
    finally:
        reader.close()
        raw.close()
        shm.close_fd()


def test_poll_many_wakes_a_writer_parked_on_a_full_ring(prefix, monkeypatch):
    """The batch stores the cursor once, then fences and looks for a parked writer: a
    writer blocked on the full ring gets its slot at once (its own re-check pushed out
    to 30 s)."""
    import embxfer.control.ring as ring_module

    monkeypatch.setattr(ring_module, "PARK_SLICE_S", 30.0)
    with RingWriter.create(4, 64, 1, prefix=prefix) as writer, RingReader.attach(writer.name) as reader:
        for index in range(4):
            writer.publish(b"%d" % index, timeout=1)
        finished: list[float] = []
        blocked = threading.Thread(
            target=lambda: (writer.publish(b"blocked", timeout=10), finished.append(time.monotonic())),
            daemon=True,
        )
        blocked.start()
        while not writer._words[ring_module._WRITER_PARKED_WORD]:
            time.sleep(0.001)
        freed = time.monotonic()
        assert reader.poll_many(2) == [b"0", b"1"]
        blocked.join(10)
        assert finished and finished[0] - freed < 2.0
        assert reader.poll_many(8) == [b"2", b"3", b"blocked"]


def test_random_garbage_over_whole_slots_never_crashes_or_leaks(ring):
    rng = random.Random(99)
    shm, raw = _raw(ring.name)
    reader = RingReader.attach(ring.name)
    slots_start = HEADER_BYTES + READER_ENTRY_BYTES * 2
    try:
        published = {}
        for _ in range(300):
            data = rng.randbytes(rng.randint(0, ring.capacity))
            published[ring.publish(data, timeout=1)] = data
            slot = rng.randrange(4)
            if rng.random() < 0.5:
                raw[slots_start + slot * 128 : slots_start + (slot + 1) * 128] = rng.randbytes(128)
            try:
                got = reader.poll()
            except RingCorruptError as exc:
                assert exc.sequence in published
                continue
            assert got == published[reader.next_sequence - 1]
        assert reader.stats.delivered + reader.stats.rejected == 300
    finally:
        reader.close()
        raw.close()
        shm.close_fd()


def test_attaching_to_an_incompatible_segment_fails_clearly(ring, prefix):
    shm, raw = _raw(ring.name)
    try:
        original = raw[:64]
        raw[8:12] = struct.pack("I", 99)
        with pytest.raises(IncompatibleRingError, match="layout version 99"):
            RingReader.attach(ring.name)
        raw[:64] = original
        raw[24:28] = struct.pack("I", 64)  # a different slot size than the segment holds
        with pytest.raises(IncompatibleRingError, match="inconsistent shape"):
            RingReader.attach(ring.name)
        raw[:64] = original
    finally:
        raw.close()
        shm.close_fd()
    foreign = posix_ipc.SharedMemory(f"/{prefix}-{os.getpid()}-foreign", posix_ipc.O_CREX, mode=0o600, size=4096)
    try:
        with pytest.raises(IncompatibleRingError, match="not an embxfer ring"):
            RingReader.attach(foreign.name)
        tiny = posix_ipc.SharedMemory(f"/{prefix}-{os.getpid()}-tiny", posix_ipc.O_CREX, mode=0o600, size=16)
        try:
            with pytest.raises(IncompatibleRingError, match="too small"):
                RingReader.attach(tiny.name)
        finally:
            tiny.unlink()
            tiny.close_fd()
    finally:
        foreign.unlink()
        foreign.close_fd()
    with RingReader.attach(ring.name) as reader:  # the untouched ring still works
        ring.publish(b"ok", timeout=1)
        assert reader.poll() == b"ok"


def test_segments_and_doorbells_are_private(ring):
    with RingReader.attach(ring.name) as reader:
        for path in (f"/dev/shm/{ring.name}", "/dev/shm/sem." + reader.doorbell.name.lstrip("/")):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        assert reader.doorbell.name.lstrip("/").startswith(f"{TEST_PREFIX}-db-{os.getpid()}-")
    assert ring.name.startswith(f"{TEST_PREFIX}-{os.getpid()}-")


def test_create_validates_its_arguments(prefix):
    for kwargs, message in [
        ({"slots": 1}, "slots=1"),
        ({"slot_bytes": 100}, "multiple of 64"),
        ({"slot_bytes": 32}, "slot_bytes=32"),
        ({"max_readers": 0}, "max_readers=0"),
        ({"prefix": "bad/prefix"}, "prefix"),
    ]:
        arguments = {"slots": 4, "slot_bytes": 128, "max_readers": 1, "prefix": prefix, **kwargs}
        with pytest.raises(ValueError, match=message):
            RingWriter.create(**arguments)


def test_wait_any_parks_on_one_doorbell_for_several_rings(prefix):
    with Doorbell.create(prefix) as doorbell, RingWriter.create(4, 64, 2, prefix=prefix) as first, RingWriter.create(
        4, 64, 1, prefix=prefix
    ) as second:
        readers = [RingReader.attach(first.name, doorbell), RingReader.attach(second.name, doorbell)]
        try:
            assert wait_any(readers, doorbell, timeout=0.05) is None
            second.publish(b"two", timeout=1)
            reader, data = wait_any(readers, doorbell, timeout=1)
            assert (reader, data) == (readers[1], b"two")
            with RingReader.attach(first.name) as other:
                with pytest.raises(ValueError, match="another doorbell"):
                    wait_any([other], doorbell, timeout=0)
        finally:
            for reader in readers:
                reader.close()


def test_a_parked_reader_in_any_entry_is_woken_by_every_publish(prefix, monkeypatch):
    """After each publish the writer reads all parked words in one look: a reader parked
    in the last entry, behind two attached readers that never park, is woken at once
    (its own periodic re-check is pushed out to 30 s, so a missed post would stall)."""
    import embxfer.control.ring as ring_module

    monkeypatch.setattr(ring_module, "PARK_SLICE_S", 30.0)
    with RingWriter.create(4, 64, 3, prefix=prefix) as writer:
        idle = [RingReader.attach(writer.name), RingReader.attach(writer.name)]
        parked = RingReader.attach(writer.name, spin_s=0.0)
        got: list[tuple[bytes | None, float]] = []

        def read_parked() -> None:
            for _ in range(3):
                data = parked.read(timeout=10.0)
                got.append((data, time.monotonic()))

        try:
            assert parked.index == 2
            thread = threading.Thread(target=read_parked, daemon=True)
            thread.start()
            for index in range(3):
                while not any(peer.parked for peer in writer.readers()):
                    time.sleep(0.001)
                published = time.monotonic()
                writer.publish(b"wake %d" % index, timeout=1)
                while len(got) <= index and time.monotonic() - published < 5:
                    time.sleep(0.001)
                assert got[index][0] == b"wake %d" % index
                assert got[index][1] - published < 2.0
                for reader in idle:
                    assert reader.poll() == b"wake %d" % index  # keep the ring from filling
            thread.join(10)
        finally:
            for reader in (*idle, parked):
                reader.close()


def test_doorbell_counts_posts_made_before_the_wait(prefix):
    with Doorbell.create(prefix) as doorbell:
        assert doorbell.wait(0) is False
        doorbell.ring()
        doorbell.ring()
        assert doorbell.wait(1) is True
        assert doorbell.drain() == 1
        start = time.monotonic()
        assert doorbell.wait(0.05) is False
        assert time.monotonic() - start >= 0.04


def test_liveness_reports_and_stale_heartbeats(ring):
    with RingReader.attach(ring.name) as reader:
        assert reader.writer_alive() and reader.dead_peers() == []
        assert ring.dead_peers() == []
        info = ring.readers()
        assert [(p.index, p.pid, p.alive) for p in info] == [(reader.index, os.getpid(), True)]
        time.sleep(0.05)
        assert [p.role for p in ring.dead_peers(stale_after=0.01)] == ["reader"]
        reader.heartbeat()
        assert ring.dead_peers(stale_after=1.0) == []
        time.sleep(0.05)
        assert {p.role for p in reader.dead_peers(stale_after=0.01)} == {"writer", "reader"}
        ring.heartbeat()
        reader.heartbeat()
        assert reader.dead_peers(stale_after=0.04) == []


def test_evict_refuses_a_live_reader(ring):
    with RingReader.attach(ring.name) as reader:
        with pytest.raises(RingError, match="is alive"):
            ring.evict(reader.index)
