"""Reusable per-device buffers for the kernels' metadata (block tables, segment tables).

Each launch needs a few kilobytes of int64 metadata on the device. Allocating it per call
would put a device allocation on the hot path, so each device keeps a small ring of
slots; a slot is a pinned host buffer plus a device buffer of the same size plus an
event, and both buffers grow geometrically (doubling) only when a bigger batch comes.
The launcher writes its table straight into the slot's pinned buffer (`acquire`), so
nothing is built twice, and the upload copies a power-of-two prefix through views made
once per size, so no tensor is sliced per call.

Why reusing a slot is safe: the H2D copy out of the pinned buffer is asynchronous
(`non_blocking=True`), so the host may not overwrite that buffer until the copy has
read it, and the device buffer may not be overwritten until the kernel that reads it
has finished. After its launch, a slot records an event on the launching stream, which
completes only after both the copy and the kernel. Before a slot is filled again, the
host waits on that event. With `NUM_SLOTS` slots, the wait is on the launch made
`NUM_SLOTS` calls ago, which in steady state finished long before (the wait costs
nothing); if the host ever runs that far ahead of the device it is throttled instead
of corrupting a table in flight. The event also covers launches from different
streams, which stream order alone would not.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

NUM_SLOTS = 8
MIN_CAPACITY = 1024


class _Slot:
    def __init__(self) -> None:
        self.capacity = 0
        self.host_array: np.ndarray | None = None
        self.uploads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # size -> (device, host) views
        self.device: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None
        self.recorded = False


class DeviceWorkspace:
    """The slots of one CUDA device. Use `with workspace.lock:` around acquire + upload +
    launch + `release`, so that concurrent callers never share a slot."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lock = threading.Lock()
        self._slots = [_Slot() for _ in range(NUM_SLOTS)]
        self._next = 0
        self._streams: dict[int, torch.cuda.Stream] = {}

    def acquire(self, n: int) -> tuple[np.ndarray, _Slot]:
        """A pinned int64 host array of `n` elements to fill, and its slot. The array is
        safe to write: the last launch that read this slot has finished."""
        slot = self._slots[self._next]
        self._next = (self._next + 1) % NUM_SLOTS
        if slot.recorded:
            slot.event.synchronize()
            slot.recorded = False
        if slot.capacity < n:
            capacity = max(MIN_CAPACITY, 1 << (n - 1).bit_length())
            host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
            slot.device = torch.empty(capacity, dtype=torch.int64, device=self.device)
            slot.host_array = host.numpy()
            slot.uploads = {}
            size = MIN_CAPACITY
            while size <= capacity:
                slot.uploads[size] = (slot.device[:size], host[:size])
                size *= 2
            slot.event = torch.cuda.Event()
            slot.capacity = capacity
        return slot.host_array[:n], slot

    def upload(self, slot: _Slot, n: int) -> torch.Tensor:
        """Copy the first `n` elements of the slot to the device (asynchronously, on the
        current stream); returns the slot's device buffer."""
        size = max(MIN_CAPACITY, 1 << (n - 1).bit_length())
        device, host = slot.uploads[size]
        device.copy_(host, non_blocking=True)
        return slot.device

    def release(self, slot: _Slot) -> None:
        """Mark the slot in use by everything queued on the current stream."""
        slot.event.record(self._current_stream())
        slot.recorded = True

    def _current_stream(self) -> torch.cuda.Stream:
        # torch.cuda.current_stream() makes a new Python object per call; the raw handle
        # of the current stream is cheap to read, so each stream's object is made once.
        raw = torch._C._cuda_getCurrentRawStream(self.device.index)
        stream = self._streams.get(raw)
        if stream is None:
            stream = self._streams[raw] = torch.cuda.current_stream(self.device)
        return stream


_WORKSPACES: dict[int, DeviceWorkspace] = {}
_WORKSPACES_LOCK = threading.Lock()


def workspace_for(device: torch.device) -> DeviceWorkspace:
    index = device.index if device.index is not None else torch.cuda.current_device()
    workspace = _WORKSPACES.get(index)
    if workspace is None:
        with _WORKSPACES_LOCK:
            workspace = _WORKSPACES.setdefault(index, DeviceWorkspace(torch.device("cuda", index)))
    return workspace
