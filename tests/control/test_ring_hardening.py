"""Bad input and misuse of the ring, within one process: every deadline is checked, a
closed handle says so, malformed names and buffers are refused with the documented error
types, a ring /dev/shm cannot hold is never created, and heartbeats may come from a
helper thread."""

from __future__ import annotations

import array
import errno
import os
import re
import statistics
import threading
import time

import pytest
from ringworkers import TEST_PREFIX, leftovers

import embxfer.control.ring as ring_module
from embxfer.control.ring import (
    MAX_SEGMENT_BYTES,
    MAX_SLOT_BYTES,
    MAX_SLOTS,
    Doorbell,
    RingClosedError,
    RingError,
    RingFullError,
    RingReader,
    RingWriter,
    wait_any,
)

pytestmark = pytest.mark.timeout(30)

BAD_SECONDS = [float("nan"), float("inf"), float("-inf"), -1, -1e-9, 10**400, True, False, "1", None, 1j]


@pytest.fixture
def ring():
    with RingWriter.create(4, 128, 2, prefix=TEST_PREFIX) as writer:
        yield writer


@pytest.fixture
def full_ring(ring):
    """A full ring whose one reader (this live process) has read nothing."""
    with RingReader.attach(ring.name) as reader:
        for index in range(ring.slots):
            ring.publish(b"%d" % index, timeout=1)
        yield ring, reader


def _message(argument: str, value: object) -> str:
    return re.escape(f"{argument}={value!r}: expected a finite number of seconds >= 0")


# --- 1. every timeout is a finite number of seconds >= 0 -------------------------------


@pytest.mark.parametrize("value", BAD_SECONDS, ids=lambda value: repr(value)[:12])
def test_publish_refuses_a_bad_timeout_even_on_a_full_ring(full_ring, value):
    writer, reader = full_ring
    start = time.monotonic()
    with pytest.raises(ValueError, match=_message("timeout", value)):
        writer.publish(b"x", timeout=value)
    assert time.monotonic() - start < 0.5  # no spinning, no parking
    assert writer.head == writer.slots and reader.poll() == b"0"  # nothing was published
    writer.publish(b"x", timeout=1)  # the ring still works


@pytest.mark.parametrize("value", BAD_SECONDS, ids=lambda value: repr(value)[:12])
def test_every_wait_refuses_a_bad_deadline(ring, value):
    with Doorbell.create(TEST_PREFIX) as doorbell, RingReader.attach(ring.name, doorbell) as reader:
        calls = [
            ("timeout", lambda: ring.publish(b"x", timeout=value)),
            ("timeout", lambda: reader.read(value)),
            ("timeout", lambda: wait_any([reader], doorbell, value)),
            ("spin_s", lambda: wait_any([reader], doorbell, 0.01, spin_s=value)),
            ("timeout", lambda: doorbell.wait(value)),
            ("spin_s", lambda: RingReader.attach(ring.name, spin_s=value)),
        ]
        if value is not None:  # None means "the reader's spin" and "no staleness threshold"
            calls += [
                ("spin_s", lambda: reader.read(0.01, spin_s=value)),
                ("stale_after", lambda: ring.dead_peers(stale_after=value)),
                ("stale_after", lambda: reader.dead_peers(stale_after=value)),
            ]
        for argument, call in calls:
            with pytest.raises(ValueError, match=_message(argument, value)):
                call()
        assert len(ring.readers()) == 1  # the refused attach took no entry


def test_a_reader_spin_set_to_nan_is_refused_at_read(ring):
    with RingReader.attach(ring.name) as reader:
        reader.spin_s = float("nan")
        with pytest.raises(ValueError, match=_message("spin_s", float("nan"))):
            reader.read(0.01)


def test_valid_deadlines_of_every_numeric_kind_are_taken(ring):
    with RingReader.attach(ring.name, spin_s=0) as reader:
        assert reader.read(0) is None
        assert reader.read(0.0, spin_s=0) is None
        ring.publish(b"int timeout", timeout=1)
        assert reader.read(1) == b"int timeout"
        assert [peer.index for peer in ring.dead_peers(stale_after=0)] == [reader.index]
        assert reader.dead_peers(stale_after=60) == []


def test_a_very_long_doorbell_wait_still_sleeps_and_wakes(prefix):
    """posix_ipc turns a wait of 1e300 s into an immediate BusyError (False, as if nobody
    rang); the doorbell must sleep until it is rung."""
    with Doorbell.create(prefix) as doorbell:
        ringer = threading.Timer(0.1, doorbell.ring)
        ringer.start()
        start = time.monotonic()
        try:
            assert doorbell.wait(1e300) is True
        finally:
            ringer.cancel()
        assert 0.05 < time.monotonic() - start < 5


# --- 2. publish(timeout=0) never waits -------------------------------------------------


def test_publish_with_timeout_0_raises_at_once_naming_the_slowest_reader(full_ring, monkeypatch):
    writer, reader = full_ring

    def no_parking(seconds: float) -> bool:
        raise AssertionError(f"publish(timeout=0) parked for {seconds}s")

    monkeypatch.setattr(writer._doorbell, "_sleep", no_parking)
    # Even a spin phase configured to last seconds is skipped: timeout=0 means no wait.
    monkeypatch.setattr(ring_module, "DEFAULT_SPIN_S", 5.0)
    durations = []
    for _ in range(200):
        start = time.perf_counter()
        with pytest.raises(RingFullError) as caught:
            writer.publish(b"does not fit", timeout=0)
        durations.append(time.perf_counter() - start)
    assert caught.value.slowest.index == reader.index and caught.value.slowest.alive
    assert f"reader #{reader.index} (pid {os.getpid()}, alive, cursor 0, lag {writer.slots}" in str(caught.value)
    assert "publish timeout 0" in str(caught.value)
    median = statistics.median(durations)
    assert median < 1e-3, f"publish(timeout=0) on a full ring took {median * 1e6:.0f} us (median)"
    assert writer.head == writer.slots
    assert reader.poll() == b"0"  # one slot free again: timeout=0 now publishes
    assert writer.publish(b"fits", timeout=0) == writer.slots + 1


# --- 3. errors of the documented type -------------------------------------------------


def test_a_closed_writer_raises_ring_closed_naming_the_ring(prefix):
    writer = RingWriter.create(4, 128, 1, prefix=prefix)
    name = writer.name
    writer.close()
    for call in (
        lambda: writer.publish(b"x", timeout=0),
        lambda: writer.publish(b"x"),
        writer.readers,
        writer.dead_peers,
        lambda: writer.dead_peers(stale_after=1),
        lambda: writer.evict(0),
    ):
        with pytest.raises(RingClosedError, match=re.escape(f"ring {name}: the writer was closed")):
            call()
    writer.heartbeat()  # documented no-op after close
    writer.close()  # idempotent
    assert issubclass(RingClosedError, RingError)


def test_a_closed_reader_raises_ring_closed_naming_the_ring(ring):
    doorbell = Doorbell.create(TEST_PREFIX)
    try:
        reader = RingReader.attach(ring.name, doorbell)
        index = reader.index
        reader.close()
        for call in (
            reader.poll,
            lambda: reader.poll_many(4),
            lambda: reader.read(0),
            lambda: reader.read(1.0),
            lambda: reader.pending,
            reader.writer,
            reader.writer_alive,
            reader.readers,
            reader.dead_peers,
            lambda: wait_any([reader], doorbell, 0.01),
        ):
            with pytest.raises(RingClosedError, match=re.escape(f"ring {ring.name}: reader #{index} was closed")):
                call()
        reader.heartbeat()  # documented no-op after close
        reader.close()  # idempotent
    finally:
        doorbell.close()
    assert ring.readers() == []


def test_a_closed_doorbell_says_so(prefix):
    doorbell = Doorbell.create(prefix)
    name = doorbell.name
    doorbell.close()
    for call in (lambda: doorbell.wait(0), doorbell.ring, doorbell.drain):
        with pytest.raises(RingClosedError, match=re.escape(f"doorbell {name} is closed")):
            call()
    doorbell.close()
    with RingWriter.create(4, 64, 1, prefix=prefix) as writer:
        with pytest.raises(RingClosedError):
            RingReader.attach(writer.name, doorbell)


@pytest.mark.parametrize(
    "name", ["", "/", "//x", "a/b", "x\0y", "..", ".", "x" * 251, "bad name", "ünïcode", 7, None, b"bytes"], ids=repr
)
def test_malformed_names_are_refused_naming_them(name):
    pattern = re.escape(f"name={name!r}")
    with pytest.raises(ValueError, match=pattern):
        RingReader.attach(name)
    with pytest.raises(ValueError, match=pattern):
        Doorbell.open(name)


def test_a_missing_ring_or_doorbell_is_a_ring_error_naming_it(prefix):
    missing = f"{prefix}-1-0123456789abcdef"
    with pytest.raises(RingError, match=re.escape(f"no ring segment named {missing!r}")):
        RingReader.attach(missing)
    with pytest.raises(RingError, match=re.escape(f"no doorbell named {'/' + missing!r}")):
        Doorbell.open("/" + missing)


def test_publish_takes_byte_buffers_and_refuses_other_buffers_clearly(ring):
    with RingReader.attach(ring.name) as reader:
        good = [
            bytearray(b"bytearray"),
            memoryview(b"a memoryview"),
            memoryview(b"--sliced--")[2:8],
            array.array("B", b"array of B"),
            memoryview(array.array("i", [1, 2, 3])).cast("B"),
        ]
        for data in good:
            ring.publish(data, timeout=1)
            assert reader.poll() == bytes(data)
        released = memoryview(b"released")
        released.release()
        two_dimensional = memoryview(bytearray(8)).cast("B", (2, 4))
        bad = [
            (memoryview(array.array("i", [1, 2, 3])), ValueError, "format 'i' with itemsize 4"),
            (array.array("d", [1.0]), ValueError, "format 'd'"),
            (memoryview(b"abcdef")[::2], ValueError, "not contiguous"),
            (released, ValueError, "released"),
            (two_dimensional, ValueError, "ndim 2"),
            ("text", TypeError, "got str"),
            (12, TypeError, "got int"),
        ]
        head = ring.head
        for data, error, message in bad:
            with pytest.raises(error, match=re.escape(f"ring {ring.name}: publish")) as caught:
                ring.publish(data, timeout=1)
            assert message in str(caught.value)
        assert ring.head == head and reader.poll() is None


# --- 4. size against the filesystem ---------------------------------------------------


def _refused(error: type[Exception], match: str, *args: object, prefix: str) -> None:
    """RingWriter.create(*args) must raise; a ring it makes anyway is closed (not leaked)."""
    with pytest.raises(error, match=match):
        RingWriter.create(*args, prefix=prefix).close()


class _FakeStatvfs:
    def __init__(self, free_bytes: int) -> None:
        self.f_frsize = 4096
        self.f_bavail = free_bytes // 4096


def test_a_ring_larger_than_dev_shm_is_refused_before_anything_is_created(prefix):
    before = leftovers()
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    assert MAX_SLOTS * MAX_SLOT_BYTES > free  # 16 TiB
    message = r"a ring of 16 TiB \(1048576 slots of 16 MiB\) does not fit /dev/shm: .* free"
    _refused(RingError, message, MAX_SLOTS, MAX_SLOT_BYTES, 1, prefix=prefix)
    assert leftovers() == before


def test_dev_shm_free_space_decides(prefix, monkeypatch):
    before = leftovers()
    monkeypatch.setattr(ring_module.os, "statvfs", lambda path: _FakeStatvfs(1 << 20))
    message = r"a ring of 2 MiB \(32 slots of 64 KiB\) does not fit /dev/shm: 1 MiB free"
    _refused(RingError, message, 32, 64 << 10, 1, prefix=prefix)
    assert leftovers() == before
    with RingWriter.create(4, 64 << 10, 1, prefix=prefix) as writer:  # 256 KiB fits
        assert writer.slots == 4


def test_absurd_rings_are_capped_even_where_dev_shm_is_huge(prefix, monkeypatch):
    before = leftovers()
    monkeypatch.setattr(ring_module.os, "statvfs", lambda path: _FakeStatvfs(1 << 50))
    _refused(ValueError, r"a ring of 8 GiB .* larger than MAX_SEGMENT_BYTES \(4 GiB\)", 1 << 20, 8192, 1, prefix=prefix)
    assert MAX_SEGMENT_BYTES == 1 << 32
    assert leftovers() == before


def test_a_reservation_that_fails_leaves_nothing_behind(prefix, monkeypatch):
    """/dev/shm filling up between the check and the creation: the pages cannot be
    reserved, the segment is unlinked and the error says why."""
    before = leftovers()

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ring_module.os, "posix_fallocate", no_space)
    _refused(RingError, "does not fit /dev/shm: No space left on device", 4, 128, 1, prefix=prefix)
    assert leftovers() == before


# --- 6. heartbeats from another thread --------------------------------------------------


def test_a_helper_thread_keeps_a_busy_reader_alive(ring):
    with RingReader.attach(ring.name) as reader:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(0.02):
                reader.heartbeat()

        helper = threading.Thread(target=beat, daemon=True)
        helper.start()
        try:
            time.sleep(0.5)  # the owning thread is busy elsewhere
            assert ring.dead_peers(stale_after=0.2) == []
        finally:
            stop.set()
            helper.join(5)
        time.sleep(0.3)
        assert [peer.index for peer in ring.dead_peers(stale_after=0.2)] == [reader.index]


def _heartbeat_until(done: threading.Event, writer: RingWriter, reader: RingReader, errors: list) -> None:
    try:
        deadline = time.monotonic() + 10
        while not done.is_set() and time.monotonic() < deadline:
            writer.heartbeat()
            reader.heartbeat()
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def test_heartbeats_racing_with_close_are_safe(prefix):
    """A helper thread heartbeats while the owner closes, and goes on after: no exception
    in either thread; heartbeats after close do nothing (they used to hit the unmapped
    segment with a bare ValueError)."""
    for _ in range(10):
        writer = RingWriter.create(4, 64, 1, prefix=prefix)
        reader = RingReader.attach(writer.name)
        errors: list[BaseException] = []
        done = threading.Event()
        helper = threading.Thread(target=_heartbeat_until, args=(done, writer, reader, errors), daemon=True)
        helper.start()
        try:
            time.sleep(0.002)
            reader.close()
            writer.close()
            time.sleep(0.01)  # the helper beats on, after close
        finally:
            done.set()
            helper.join(10)
            reader.close()
            writer.close()
        assert not helper.is_alive()
        assert errors == []
