"""The control bus of one process: records out to every peer, records in from every peer.

`ShmBus` is the node-local fast path: this process writes its own ring (single
writer), and reads the ring of every peer on its node with one reader cursor each; all
those readers share one doorbell, so an idle process parks on a single semaphore. Peers
on other nodes are reached through a `RemoteLink` (`embxfer.control.remote`: zmq over
TCP, every frame signed with the job's secret): the same frames go to the ring and to
each remote peer, frames from remote peers are decoded like ring slots, and the link
rings the same doorbell when something arrives, so the endpoint above sees one bus.
`LocalBusHub` gives endpoints living in one process the same interface (tests,
examples).

What every bus does the same way:

- `publish` only queues: the records an endpoint publishes during one `progress()`
  step leave together at its end (`flush`), packed into as few frames (ring slots) as
  fit, so a step that admits 64 requests costs a few slot writes, not 64.
- `flush` never waits: a full ring keeps the rest queued for the next step. If a reader
  has blocked the ring for longer than `peer_timeout` it is reported by `dead_ranks`
  (a reader that does not read is as lost as a dead one; its requests fail, the others
  go on).
- Records always travel encoded (`embxfer.control.records`), also in-process, so the
  wire format is exercised everywhere; frames are decoded against the receiver's
  `Limits` (its pool), and a record whose `src_rank` disagrees with the ring it came
  from is dropped and counted: a peer can only speak for itself.
- Liveness does not ride on the engine's loop: `ShmBus` beats (the ring's heartbeat
  words) from a thread of its own every `heartbeat_interval`, so a long engine step
  never makes a live process look dead, while a stopped or killed one goes stale.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Protocol

from embxfer.control import records as rec

log = logging.getLogger("embxfer.bus")

NAME_BYTES = 128
_PARK_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Bus(Protocol):
    rank: int
    spoofed: int  # records dropped: their src_rank was not the ring's owner
    rejected: int  # records dropped: malformed or corrupt

    def publish(self, record: rec.Record) -> None: ...

    def flush(self) -> None: ...

    def drain(self) -> list[rec.Record]: ...

    def wait(self, timeout: float) -> None: ...

    def dead_ranks(self) -> dict[int, str]: ...

    def forget(self, rank: int) -> None: ...

    def close(self) -> None: ...


class _Outbox:
    """Encoded records waiting for the end of the step, cut into frames of at most
    `capacity` bytes (one record never exceeds it: slots are sized from the limits)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: deque[bytes] = deque()

    def add(self, record: rec.Record) -> None:
        data = rec.encode(record)
        if len(data) > self.capacity:
            raise ValueError(f"{type(record).__name__} of {len(data)} bytes exceeds the {self.capacity}-byte frame")
        self.records.append(data)

    def next_frame(self) -> tuple[bytes, int]:
        """The next frame and how many records it holds (not yet removed)."""
        size = count = 0
        for data in self.records:
            if size + len(data) > self.capacity:
                break
            size += len(data)
            count += 1
        return b"".join(self.records[i] for i in range(count)), count

    def consumed(self, count: int) -> None:
        for _ in range(count):
            self.records.popleft()


class _Decoder:
    """Frames in, records out, with the counters every bus keeps."""

    rank: int
    limits: rec.Limits
    spoofed: int
    rejected: int
    wanted: frozenset[int] | None = None  # record types this rank's endpoint uses (None: all)

    def _decode(self, source: int, data: bytes | memoryview, out: list[rec.Record]) -> None:
        records, error = rec.decode_frame(data, self.limits, self.wanted)
        if error is not None:
            self.rejected += 1
            log.warning("rank %d: dropped a malformed record from rank %d: %s", self.rank, source, error)
        for record in records:
            if record.src_rank != source:
                self.spoofed += 1
                log.warning("rank %d: dropped a record from rank %d claiming src_rank=%d",
                            self.rank, source, record.src_rank)
            else:
                out.append(record)


class LocalBusHub:
    """In-process bus: every flushed frame is appended to every other rank's inbox."""

    def __init__(self, limits: rec.Limits = rec.NO_LIMITS, frame_bytes: int = 4080) -> None:
        self.inboxes: dict[int, deque[tuple[int, bytes]]] = defaultdict(deque)
        self.dead: dict[int, str] = {}
        self.limits = limits
        self.frame_bytes = max(frame_bytes, rec.max_record_bytes(limits))

    def bus(self, rank: int) -> LocalBus:
        self.inboxes[rank]  # register so earlier publishers reach it
        return LocalBus(self, rank)


class LocalBus(_Decoder):
    def __init__(self, hub: LocalBusHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.limits = hub.limits
        self.spoofed = 0
        self.rejected = 0
        self.outbox = _Outbox(hub.frame_bytes)

    def publish(self, record: rec.Record) -> None:
        self.outbox.add(record)

    def flush(self) -> None:
        while self.outbox.records:
            frame, count = self.outbox.next_frame()
            for rank, inbox in self.hub.inboxes.items():
                if rank != self.rank:
                    inbox.append((self.rank, frame))
            self.outbox.consumed(count)

    def drain(self) -> list[rec.Record]:
        inbox = self.hub.inboxes[self.rank]
        out: list[rec.Record] = []
        while inbox:
            source, data = inbox.popleft()
            self._decode(source, data, out)
        return out

    def wait(self, timeout: float) -> None:
        self.flush()

    def dead_ranks(self) -> dict[int, str]:
        return {r: why for r, why in self.hub.dead.items() if r != self.rank}

    def forget(self, rank: int) -> None:
        return None

    def close(self) -> None:
        self.flush()


class Heartbeat:
    """A daemon thread that calls `beat()` every `interval` seconds until stopped: the
    process's liveness, independent of how long the engine's own loop steps take."""

    def __init__(self, beat: Callable[[], None], interval: float, name: str) -> None:
        self._beat = beat
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception as exc:  # a closed ring: the owner is shutting down
                log.debug("heartbeat stopped: %s", exc)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self._interval + 1.0)


class ShmBus(_Decoder):
    """Rings in POSIX shared memory between the processes of one node."""

    def __init__(self, rank: int, writer: object, readers: dict[int, object], doorbell: object, *,
                 peer_timeout: float, heartbeat_interval: float, limits: rec.Limits) -> None:
        self.rank = rank
        self.writer = writer
        self.readers = readers
        self.doorbell = doorbell
        self.peer_timeout = peer_timeout
        self.limits = limits
        self.spoofed = 0
        self.rejected = 0
        self.outbox = _Outbox(writer.capacity)
        self._blocked_since: float | None = None
        self.link = None  # a RemoteLink to the peers on other nodes (attach_link)
        self.remote_peers: list[int] = []
        self._remote_pending: dict[int, deque[bytes]] = {}
        self._remote_blocked_since: dict[int, float] = {}
        self._stash: list[tuple[int, bytes]] = []
        self._source_of = {id(reader): rank for rank, reader in readers.items()}
        self._closed = False
        self._lock = threading.Lock()  # the heartbeat thread against close()
        self._heartbeat = Heartbeat(self._beat, heartbeat_interval, f"embxfer-heartbeat-{rank}")

    @classmethod
    def create(cls, rank: int, peers: list[int], exchange: Callable[[bytes], dict[int, bytes]], *,
               slots: int, slot_bytes: int, peer_timeout: float, heartbeat_interval: float,
               limits: rec.Limits, prefix: str = "embxfer") -> ShmBus:
        """Create this rank's ring, learn each peer's ring name through `exchange` (a
        collective over this node's ranks: it takes this rank's bytes and returns every
        participant's, by rank), attach to the peers' rings, then exchange once more as a
        barrier, so no record is published before every reader is in place."""
        from embxfer.control.ring import Doorbell, RingReader, RingWriter

        writer = RingWriter.create(slots=slots, slot_bytes=slot_bytes, max_readers=max(1, len(peers)),
                                   prefix=prefix)
        doorbell = None
        readers: dict[int, object] = {}
        try:
            doorbell = Doorbell.create(prefix)
            encoded = writer.name.encode()
            if len(encoded) > NAME_BYTES:
                raise ValueError(f"ring name {writer.name!r} longer than {NAME_BYTES} bytes")
            names = exchange(encoded)
            for peer in peers:
                readers[peer] = RingReader.attach(names[peer].decode(), doorbell=doorbell)
            exchange(b"attached")
        except BaseException:
            for reader in readers.values():
                reader.close()
            if doorbell is not None:
                doorbell.close()
            writer.close()
            raise
        return cls(rank, writer, readers, doorbell, peer_timeout=peer_timeout,
                   heartbeat_interval=heartbeat_interval, limits=limits)

    def attach_link(self, link: object, remote_peers: list[int]) -> None:
        """Reach `remote_peers` (ranks on other nodes) through `link`; its arrivals ring
        this bus's doorbell."""
        self.link = link
        self.remote_peers = list(remote_peers)
        self._remote_pending = {peer: deque() for peer in remote_peers}

    # -- out -----------------------------------------------------------------------
    def publish(self, record: rec.Record) -> None:
        self.outbox.add(record)

    def flush(self) -> None:
        """Write queued records, frame by frame, without waiting: what does not fit a full
        ring (or a remote peer's full send queue) stays queued for the next step."""
        from embxfer.control.ring import PeerDeadError, RingFullError

        while self.outbox.records:
            frame, count = self.outbox.next_frame()
            try:
                self.writer.publish(frame, timeout=0.0)
            except (RingFullError, PeerDeadError):
                if not self._evict_dead_readers():
                    if self._blocked_since is None:
                        self._blocked_since = time.monotonic()
                    break
                continue
            self.outbox.consumed(count)
            self._blocked_since = None
            for pending in self._remote_pending.values():
                pending.append(frame)
        now = time.monotonic()
        for peer, pending in self._remote_pending.items():
            while pending and self.link.send(peer, pending[0]):
                pending.popleft()
            if pending:
                self._remote_blocked_since.setdefault(peer, now)
            else:
                self._remote_blocked_since.pop(peer, None)

    def _evict_dead_readers(self) -> bool:
        from embxfer.control.ring import RingError

        evicted = False
        for info in self.writer.dead_peers():
            if info.role == "reader":
                try:
                    self.writer.evict(info.index)
                    evicted = True
                except RingError:
                    pass
        return evicted

    def forget(self, rank: int) -> None:
        """Stop reading a dead peer's ring and stop waiting for it on ours (a remote peer:
        stop queueing frames for it)."""
        self._remote_pending.pop(rank, None)
        self._remote_blocked_since.pop(rank, None)
        reader = self.readers.pop(rank, None)
        if reader is not None:
            reader.close()
        self._evict_dead_readers()

    # -- in ------------------------------------------------------------------------
    def drain(self) -> list[rec.Record]:
        from embxfer.control.ring import RingCorruptError

        out: list[rec.Record] = []
        stash, self._stash = self._stash, []
        for source, data in stash:
            self._decode(source, data, out)
        for source, reader in self.readers.items():
            while True:
                try:
                    data = reader.poll()
                except RingCorruptError as exc:  # counted and skipped by the ring; go on
                    self.rejected += 1
                    log.warning("rank %d: skipped a corrupt slot in rank %d's ring: %s", self.rank, source, exc)
                    continue
                if data is None:
                    break
                self._decode(source, data, out)
        if self.link is not None:
            for source, frame in self.link.receive():
                self._decode(source, frame, out)
        return out

    def wait(self, timeout: float) -> None:
        """Flush, then park on the doorbell (after a short spin) until a peer publishes or
        `timeout` passes; a record that woke us is kept for the next `drain`."""
        from embxfer.control.ring import PeerDeadError, wait_any

        self.flush()
        if self.link is not None and self.link.pending:
            return
        if not self.readers:
            if self.link is not None:
                self.link.wait(timeout)
            else:
                time.sleep(timeout)
            return
        import posix_ipc

        # posix_ipc runs Python signal handlers inside its semaphore wait and replaces
        # their exception (KeyboardInterrupt, a SIGTERM handler's SystemExit) with
        # SignalError: the engine would never see its Ctrl-C. So the main thread parks
        # with SIGINT and SIGTERM blocked; a signal that comes meanwhile stays pending and
        # its handler runs, raising as usual, when the park (a few ms) ends.
        masked = threading.current_thread() is threading.main_thread()
        if masked:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _PARK_SIGNALS)
        try:
            found = wait_any(list(self.readers.values()), self.doorbell, timeout, spin_s=min(timeout, 50e-6))
        except PeerDeadError:
            return  # liveness is checked (and reported) by the endpoint
        except posix_ipc.SignalError:
            return  # another signal cut the sleep short; its Python handler has run
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if found is not None:
            reader, data = found
            self._stash.append((self._source_of[id(reader)], data))

    # -- liveness --------------------------------------------------------------------
    def _beat(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.writer.heartbeat()
            for reader in list(self.readers.values()):
                reader.heartbeat()

    def dead_ranks(self) -> dict[int, str]:
        dead = {}
        for rank, reader in self.readers.items():
            writer = reader.writer()
            if not writer.alive:
                dead[rank] = f"rank {rank} (pid {writer.pid}) is gone"
            elif writer.heartbeat_age_s > self.peer_timeout:
                dead[rank] = (f"rank {rank} (pid {writer.pid}) published no heartbeat for "
                              f"{writer.heartbeat_age_s:.1f}s (peer_timeout_s={self.peer_timeout})")
        if self.link is not None:
            for rank, why in self.link.dead_peers(self.peer_timeout).items():
                if rank in self._remote_pending:
                    dead.setdefault(rank, why)
            now = time.monotonic()
            for rank, since in self._remote_blocked_since.items():
                if now - since > self.peer_timeout:
                    dead.setdefault(rank, f"rank {rank} on another node has taken no control record for "
                                          f"{now - since:.1f}s (peer_timeout_s={self.peer_timeout})")
        if self._blocked_since is not None and time.monotonic() - self._blocked_since > self.peer_timeout:
            waited = time.monotonic() - self._blocked_since
            for info in self.writer.readers():
                laggard = next((r for r, reader in self.readers.items() if reader_pid(reader) == info.pid), None)
                if laggard is not None and info.lag > 0 and laggard not in dead:
                    dead[laggard] = (f"rank {laggard} (pid {info.pid}) has not read this rank's control ring "
                                     f"for {waited:.1f}s (peer_timeout_s={self.peer_timeout}; ring full)")
        return dead

    def close(self) -> None:
        if self._closed:
            return
        self._heartbeat.stop()
        with self._lock:
            self._closed = True
        if self.link is not None:
            self.link.close()
        for reader in self.readers.values():
            reader.close()
        self.doorbell.close()
        self.writer.close()


def reader_pid(reader: object) -> int:
    """The pid of the writer of the ring `reader` reads (the peer's process)."""
    return reader.writer().pid
