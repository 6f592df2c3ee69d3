"""The control bus of one process: records out to every peer, records in from every peer.

`ShmBus` is the node-local fast path: this process writes its own ring (single
writer), and reads every peer's ring with one reader cursor each; all those readers
share one doorbell, so an idle process parks on a single semaphore. `LocalBusHub`
gives endpoints living in one process the same interface (tests, examples).

Records always travel encoded (`embxfer.control.records`), also in-process, so the
wire format is exercised everywhere. A record whose `src_rank` disagrees with the
ring it came from is dropped and counted: a peer can only speak for itself.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from typing import Protocol

from embxfer.control import records as rec

log = logging.getLogger("embxfer.bus")

NAME_BYTES = 128


class Bus(Protocol):
    rank: int
    spoofed: int  # records dropped: their src_rank was not the ring's owner
    rejected: int  # records dropped: malformed or corrupt

    def publish(self, record: rec.Record) -> None: ...

    def drain(self) -> list[rec.Record]: ...

    def wait(self, timeout: float) -> None: ...

    def heartbeat(self) -> None: ...

    def dead_ranks(self) -> dict[int, str]: ...

    def forget(self, rank: int) -> None: ...

    def close(self) -> None: ...


class LocalBusHub:
    """In-process bus: every published record is appended to every other rank's inbox."""

    def __init__(self) -> None:
        self.inboxes: dict[int, deque[tuple[int, bytes]]] = defaultdict(deque)
        self.dead: dict[int, str] = {}

    def bus(self, rank: int) -> LocalBus:
        self.inboxes[rank]  # register so earlier publishers reach it
        return LocalBus(self, rank)


class LocalBus:
    def __init__(self, hub: LocalBusHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.spoofed = 0
        self.rejected = 0

    def publish(self, record: rec.Record) -> None:
        data = rec.encode(record)
        for rank, inbox in self.hub.inboxes.items():
            if rank != self.rank:
                inbox.append((self.rank, data))

    def drain(self) -> list[rec.Record]:
        inbox = self.hub.inboxes[self.rank]
        out = []
        while inbox:
            source, data = inbox.popleft()
            record = _decode_from(source, data, self)
            if record is not None:
                out.append(record)
        return out

    def wait(self, timeout: float) -> None:
        return None

    def heartbeat(self) -> None:
        return None

    def dead_ranks(self) -> dict[int, str]:
        return {r: why for r, why in self.hub.dead.items() if r != self.rank}

    def forget(self, rank: int) -> None:
        return None

    def close(self) -> None:
        return None


def _decode_from(source: int, data: bytes, bus: LocalBus | ShmBus) -> rec.Record | None:
    try:
        record = rec.decode(data)
    except ValueError as exc:
        bus.rejected += 1
        log.warning("rank %d: dropped a malformed record from rank %d: %s", bus.rank, source, exc)
        return None
    if getattr(record, "src_rank", source) != source:
        bus.spoofed += 1
        log.warning("rank %d: dropped a record from rank %d claiming src_rank=%d", bus.rank, source, record.src_rank)
        return None
    return record


class ShmBus:
    """Rings in POSIX shared memory between the processes of one node."""

    def __init__(self, rank: int, writer: object, readers: dict[int, object], doorbell: object,
                 publish_timeout: float, peer_timeout: float) -> None:
        self.rank = rank
        self.writer = writer
        self.readers = readers
        self.doorbell = doorbell
        self.publish_timeout = publish_timeout
        self.peer_timeout = peer_timeout
        self.spoofed = 0
        self.rejected = 0
        self._stash: list[tuple[int, bytes]] = []
        self._source_of = {id(reader): rank for rank, reader in readers.items()}
        self._closed = False

    @classmethod
    def connect(cls, rank: int, world_size: int, group: object, *, slots: int, slot_bytes: int,
                publish_timeout: float, peer_timeout: float, prefix: str = "embxfer") -> ShmBus:
        """Collective over `group` (a gloo group of the whole world): create this rank's
        ring, learn every peer's ring name, attach to all of them, then barrier so no
        record is published before every reader is in place."""
        import torch
        import torch.distributed as dist

        from embxfer.control.ring import Doorbell, RingReader, RingWriter

        writer = RingWriter.create(slots=slots, slot_bytes=slot_bytes, max_readers=max(1, world_size - 1),
                                   prefix=prefix)
        doorbell = None
        readers: dict[int, object] = {}
        try:
            doorbell = Doorbell.create(prefix)
            encoded = writer.name.encode()
            if len(encoded) > NAME_BYTES:
                raise ValueError(f"ring name {writer.name!r} longer than {NAME_BYTES} bytes")
            mine = torch.zeros(NAME_BYTES, dtype=torch.uint8)
            mine[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
            gathered = [torch.zeros(NAME_BYTES, dtype=torch.uint8) for _ in range(world_size)]
            dist.all_gather(gathered, mine, group=group)
            for peer, raw in enumerate(gathered):
                if peer == rank:
                    continue
                name = bytes(raw.tolist()).rstrip(b"\0").decode()
                readers[peer] = RingReader.attach(name, doorbell=doorbell)
            dist.barrier(group=group)
        except BaseException:
            for reader in readers.values():
                reader.close()
            if doorbell is not None:
                doorbell.close()
            writer.close()
            raise
        return cls(rank, writer, readers, doorbell, publish_timeout, peer_timeout)

    def publish(self, record: rec.Record) -> None:
        """Publish to every peer. A full ring whose laggard is a dead process is cleared of
        it and tried once more; otherwise the ring's error (naming the laggard) stands."""
        from embxfer.control.ring import PeerDeadError, RingFullError

        data = rec.encode(record)
        try:
            self.writer.publish(data, timeout=self.publish_timeout)
        except (RingFullError, PeerDeadError):
            if not self._evict_dead_readers():
                raise
            self.writer.publish(data, timeout=self.publish_timeout)

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
        """Stop reading a dead peer's ring and stop waiting for it on ours."""
        reader = self.readers.pop(rank, None)
        if reader is not None:
            reader.close()
        self._evict_dead_readers()

    def drain(self) -> list[rec.Record]:
        out = []
        stash, self._stash = self._stash, []
        for source, data in stash:
            record = _decode_from(source, data, self)
            if record is not None:
                out.append(record)
        from embxfer.control.ring import RingCorruptError

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
                record = _decode_from(source, data, self)
                if record is not None:
                    out.append(record)
        return out

    def wait(self, timeout: float) -> None:
        """Park on the doorbell (after a short spin) until a peer publishes or `timeout`
        passes; a record that woke us is kept for the next `drain`."""
        from embxfer.control.ring import PeerDeadError, wait_any

        if not self.readers:
            time.sleep(timeout)
            return
        import posix_ipc

        try:
            found = wait_any(list(self.readers.values()), self.doorbell, timeout, spin_s=min(timeout, 50e-6))
        except PeerDeadError:
            return  # liveness is checked (and reported) by the endpoint's heartbeat
        except posix_ipc.SignalError:
            return  # a signal cut the sleep short; its Python handler runs next
        if found is not None:
            reader, data = found
            self._stash.append((self._source_of[id(reader)], data))

    def heartbeat(self) -> None:
        self.writer.heartbeat()
        for reader in self.readers.values():
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
        return dead

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for reader in self.readers.values():
            reader.close()
        self.doorbell.close()
        self.writer.close()

