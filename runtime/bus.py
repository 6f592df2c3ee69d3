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

    def linked(self, member: int) -> bool:
        return True

    def wake(self) -> None:
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
    """This process's rings in POSIX shared memory, and its link to other nodes.

    Peers come and go (`add_local`, `add_remote`, `forget`): a member joins the bus of
    every peer it works with, and leaves it when it dies or departs. `rank` is this
    process's member id; every record's `src_rank` must be the id of the ring or link
    source it came from."""

    def __init__(self, rank: int, writer: object, doorbell: object, *, peer_timeout: float,
                 heartbeat_interval: float, limits: rec.Limits) -> None:
        self.rank = rank
        self.writer = writer
        self.readers: dict[int, object] = {}
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
        # Frames from authenticated sources this process does not know yet (a member that
        # joined a moment ago): kept, bounded, until the directory learns of it.
        self._unknown: dict[int, deque[bytes]] = {}
        self._stash: list[tuple[int, bytes]] = []
        self._source_of: dict[int, int] = {}
        self._pids: dict[int, int] = {}
        self._linked: set[int] = set()
        self._closed = False
        self._lock = threading.Lock()  # the heartbeat thread against close() and attach
        self._heartbeat = Heartbeat(self._beat, heartbeat_interval, f"embxfer-heartbeat-{rank:x}")

    @classmethod
    def open(cls, rank: int, *, slots: int, slot_bytes: int, peer_timeout: float, heartbeat_interval: float,
             limits: rec.Limits, prefix: str = "embxfer", max_readers: int | None = None) -> ShmBus:
        """This process's ring (no reader yet) and its doorbell."""
        from embxfer.control.ring import MAX_READERS, Doorbell, RingWriter

        writer = RingWriter.create(slots=slots, slot_bytes=slot_bytes, max_readers=max_readers or MAX_READERS,
                                   prefix=prefix)
        try:
            if len(writer.name.encode()) > NAME_BYTES:
                raise ValueError(f"ring name {writer.name!r} longer than {NAME_BYTES} bytes")
            doorbell = Doorbell.create(prefix)
        except BaseException:
            writer.close()
            raise
        return cls(rank, writer, doorbell, peer_timeout=peer_timeout, heartbeat_interval=heartbeat_interval,
                   limits=limits)

    @classmethod
    def create(cls, rank: int, peers: list[int], exchange: Callable[[bytes], dict[int, bytes]], *,
               slots: int, slot_bytes: int, peer_timeout: float, heartbeat_interval: float,
               limits: rec.Limits, prefix: str = "embxfer") -> ShmBus:
        """A bus whose peers are known up front: ring names travel through `exchange` (a
        collective over this node's ranks: it takes this rank's bytes and returns every
        participant's, by rank); a second exchange is the barrier after which every
        reader is in place."""
        bus = cls.open(rank, slots=slots, slot_bytes=slot_bytes, peer_timeout=peer_timeout,
                       heartbeat_interval=heartbeat_interval, limits=limits, prefix=prefix)
        try:
            names = exchange(bus.writer.name.encode())
            for peer in peers:
                bus.add_local(peer, names[peer].decode())
            exchange(b"attached")
        except BaseException:
            bus.close()
            raise
        return bus

    @property
    def ring_name(self) -> str:
        return self.writer.name

    def add_local(self, member: int, ring: str, pid: int | None = None) -> None:
        """Read `member`'s ring (a peer on this node). RingError if it is gone."""
        from embxfer.control.ring import RingReader

        if member in self.readers:
            return
        reader = RingReader.attach(ring, doorbell=self.doorbell)
        with self._lock:
            self.readers[member] = reader
        self._source_of[id(reader)] = member
        self._pids[member] = reader.writer().pid if pid is None else pid

    def attach_link(self, link: object, remote_peers: list[int] = ()) -> None:
        """Reach peers on other nodes through `link`; its arrivals ring this bus's doorbell."""
        self.link = link
        for peer in remote_peers:
            self._remote_pending.setdefault(peer, deque())
            self.remote_peers.append(peer)

    def add_remote(self, member: int, endpoint: str) -> None:
        """Reach `member` (a peer on another node) at its link endpoint."""
        if self.link is None:
            raise RuntimeError(f"member {member:x} is on another node, and this process has no cross-node link "
                               "(the rendezvous is on a loopback address: give it an address other nodes reach)")
        if member in self._remote_pending:
            return
        self.link.connect({member: endpoint})
        self._remote_pending[member] = deque()
        self.remote_peers.append(member)
        self._linked.add(member)

    def linked(self, member: int) -> bool:
        """True once `member` reads this process's records and this process reads its own
        (same node: each has attached to the other's ring; another node: the link)."""
        if member in self._linked:
            return True
        if member not in self.readers:
            return False
        pid = self._pids.get(member)
        # Attached, not just an entry: records published from now on are all the member's.
        if any(info.pid == pid and info.attached for info in self.writer.readers()):
            self._linked.add(member)
            return True
        return False

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
        if not self._remote_pending:
            return
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
        """Stop reading a dead or departed peer's ring and stop waiting for it on ours (a
        remote peer: stop queueing frames for it and close its connection)."""
        self._linked.discard(rank)
        self._pids.pop(rank, None)
        self._unknown.pop(rank, None)
        if self._remote_pending.pop(rank, None) is not None:
            self.remote_peers.remove(rank)
            disconnect = getattr(self.link, "disconnect", None)
            if disconnect is not None:
                try:
                    disconnect(rank)
                except Exception as exc:  # a link closing under us: nothing left to drop
                    log.debug("link disconnect of %x: %s", rank, exc)
        self._remote_blocked_since.pop(rank, None)
        with self._lock:
            reader = self.readers.pop(rank, None)
        if reader is not None:
            self._source_of.pop(id(reader), None)
            reader.close()
        self._evict_dead_readers()

    # -- in ------------------------------------------------------------------------
    def drain(self) -> list[rec.Record]:
        from embxfer.control.ring import RingCorruptError

        out: list[rec.Record] = []
        if self._stash:
            stash, self._stash = self._stash, []
            for source, data in stash:
                self._decode(source, data, out)
        for source, reader in self.readers.items():
            while True:
                try:
                    frames = reader.poll_many(64)  # one cursor store per batch
                except RingCorruptError as exc:  # counted and skipped by the ring; go on
                    self.rejected += 1
                    log.warning("rank %x: skipped a corrupt slot in %x's ring: %s", self.rank, source, exc)
                    continue
                for data in frames:
                    self._decode(source, data, out)
                if len(frames) < 64:
                    break
        if self.link is not None:
            for source, frame in self.link.receive():
                if source in self._remote_pending:
                    self._decode(source, frame, out)
                else:
                    held = self._unknown.setdefault(source, deque(maxlen=4096))
                    held.append(frame)
            if self._unknown:
                for source in [s for s in self._unknown if s in self._remote_pending]:
                    for frame in self._unknown.pop(source):
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
                self.doorbell.wait(timeout)
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
            source = self._source_of.get(id(reader))
            if source is not None:
                self._stash.append((source, data))

    def wake(self) -> None:
        """Cut a `wait` short (another thread has news: a member joined)."""
        self.doorbell.ring()

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
                dead[rank] = f"pid {writer.pid} is gone"
            elif writer.heartbeat_age_s > self.peer_timeout:
                dead[rank] = (f"pid {writer.pid} published no heartbeat for {writer.heartbeat_age_s:.1f}s "
                              f"(peer_timeout_s={self.peer_timeout})")
        if self.link is not None:
            for rank, why in self.link.dead_peers(self.peer_timeout).items():
                if rank in self._remote_pending:
                    dead.setdefault(rank, why)
            now = time.monotonic()
            for rank, since in self._remote_blocked_since.items():
                if now - since > self.peer_timeout:
                    dead.setdefault(rank, f"on another node, it has taken no control record for "
                                          f"{now - since:.1f}s (peer_timeout_s={self.peer_timeout})")
        if self._blocked_since is not None and time.monotonic() - self._blocked_since > self.peer_timeout:
            waited = time.monotonic() - self._blocked_since
            for info in self.writer.readers():
                laggard = next((r for r, pid in self._pids.items() if pid == info.pid), None)
                if laggard is not None and info.lag > 0 and laggard not in dead:
                    dead[laggard] = (f"pid {info.pid} has not read this process's control ring for {waited:.1f}s "
                                     f"(peer_timeout_s={self.peer_timeout}; ring full)")
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
