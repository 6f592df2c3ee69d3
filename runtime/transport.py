"""Data-plane transport: point-to-point moves of staging chunks.

`TorchP2P` is the real one: `torch.distributed` isend/irecv in a process group of its
own (NCCL for CUDA tensors, gloo for CPU tensors), so embxfer's messages never
interleave with the engine's collectives. `LoopbackHub` is an in-process stand-in with
the same matching rules (per ordered pair of ranks, first-posted send meets
first-posted receive), used by tests that drive several endpoints in one process.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict, deque
from typing import Protocol

import torch


class Handle(Protocol):
    def is_completed(self) -> bool: ...

    def wait(self) -> None: ...


class Transport(Protocol):
    def isend(self, tensor: torch.Tensor, peer: int) -> Handle: ...

    def irecv(self, tensor: torch.Tensor, peer: int) -> Handle: ...


class TorchP2P:
    """isend/irecv on embxfer's data group (global embxfer ranks as peers): a
    `groups.StatelessGroups` (its own store, never registered with torch), or a group of
    the default world (`dist.isend(..., group=group)`).

    NCCL works answer `is_completed()` from their CUDA events. Gloo's point-to-point
    works only learn that they completed inside `wait()`, so on gloo every work is
    handed to a waiter thread of its peer (one per peer and direction, so a slow peer
    never delays another's completions) and `is_completed()` reads the flag it sets.
    """

    def __init__(self, group: object | None = None, backend: str = "nccl") -> None:
        self.group = group
        self.backend = backend
        self._waiters: dict[tuple[str, int], _Waiter] = {}

    def isend(self, tensor: torch.Tensor, peer: int) -> Handle:
        if hasattr(self.group, "isend"):
            return self._track("send", peer, self.group.isend(tensor, peer))
        import torch.distributed as dist

        return self._track("send", peer, dist.isend(tensor, dst=peer, group=self.group))

    def irecv(self, tensor: torch.Tensor, peer: int) -> Handle:
        if hasattr(self.group, "irecv"):
            return self._track("recv", peer, self.group.irecv(tensor, peer))
        import torch.distributed as dist

        return self._track("recv", peer, dist.irecv(tensor, src=peer, group=self.group))

    def _track(self, direction: str, peer: int, work: Handle) -> Handle:
        if self.backend != "gloo":
            return work
        waiter = self._waiters.get((direction, peer))
        if waiter is None:
            waiter = self._waiters[(direction, peer)] = _Waiter(f"embxfer-{direction}-{peer}")
        return waiter.watch(work)

    def close(self) -> None:
        for waiter in self._waiters.values():
            waiter.stop()
        self._waiters.clear()


class _WatchedWork:
    def __init__(self, work: Handle) -> None:
        self.work = work
        self.done = threading.Event()
        self.error: BaseException | None = None

    def is_completed(self) -> bool:
        return self.done.is_set()

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class _Waiter:
    """A daemon thread that waits on works in the order they were posted."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_WatchedWork | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, work: Handle) -> _WatchedWork:
        watched = _WatchedWork(work)
        self._queue.put(watched)
        return watched

    def stop(self) -> None:
        self._queue.put(None)

    def join(self, timeout: float) -> bool:
        """Wait for the thread to leave (after `stop`, once its current wait returned);
        True if it did. A thread still inside gloo's C++ when the interpreter exits is
        killed mid-unwind (SIGABRT, "terminate called without an active exception")."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                item.work.wait()
            except BaseException as exc:  # surfaced by the owner through is_completed()/error
                item.error = exc
            finally:
                item.done.set()


class _LoopbackHandle:
    def __init__(self) -> None:
        self.done = False

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> None:
        if not self.done:
            raise RuntimeError("loopback transfer waited on before its peer posted the other side")


class LoopbackHub:
    """Matches sends and receives between endpoints living in one process."""

    def __init__(self) -> None:
        self._sends: dict[tuple[int, int], deque[tuple[torch.Tensor, _LoopbackHandle]]] = defaultdict(deque)
        self._recvs: dict[tuple[int, int], deque[tuple[torch.Tensor, _LoopbackHandle]]] = defaultdict(deque)
        self.messages = 0
        self.bytes = 0

    def transport(self, rank: int) -> LoopbackTransport:
        return LoopbackTransport(self, rank)

    def _match(self, pair: tuple[int, int]) -> None:
        sends, recvs = self._sends[pair], self._recvs[pair]
        while sends and recvs:
            (src, send_handle), (dst, recv_handle) = sends.popleft(), recvs.popleft()
            if src.numel() != dst.numel() or src.dtype != dst.dtype:
                raise RuntimeError(
                    f"loopback {pair}: send of {src.numel()} {src.dtype} met receive of {dst.numel()} {dst.dtype}"
                )
            dst.copy_(src)
            send_handle.done = recv_handle.done = True
            self.messages += 1
            self.bytes += src.numel() * src.element_size()


class LoopbackTransport:
    def __init__(self, hub: LoopbackHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank

    def isend(self, tensor: torch.Tensor, peer: int) -> Handle:
        handle = _LoopbackHandle()
        self.hub._sends[(self.rank, peer)].append((tensor, handle))
        self.hub._match((self.rank, peer))
        return handle

    def irecv(self, tensor: torch.Tensor, peer: int) -> Handle:
        handle = _LoopbackHandle()
        self.hub._recvs[(peer, self.rank)].append((tensor, handle))
        self.hub._match((peer, self.rank))
        return handle
