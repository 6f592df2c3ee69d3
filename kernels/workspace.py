"""Reusable per-device buffers for the kernels' metadata (block tables, segment tables).

Each launch needs a few kilobytes of int64 metadata on the device. Allocating it per call
would put a device allocation on the hot path, so each device keeps a small ring of
slots; a slot is a pinned host buffer plus a device buffer of the same size plus an
event, and both buffers grow geometrically (doubling) only when a bigger batch comes.

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


class _Slot:
    def __init__(self) -> None:
        self.host: torch.Tensor | None = None
        self.host_array: np.ndarray | None = None
        self.device: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None
        self.recorded = False


class DeviceWorkspace:
    """The slots of one CUDA device. Use `with workspace.lock:` around upload + launch +
    `release`, so that concurrent callers never share a slot."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lock = threading.Lock()
        self._slots = [_Slot() for _ in range(NUM_SLOTS)]
        self._next = 0
        self._current: _Slot | None = None

    def upload(self, metadata: np.ndarray) -> torch.Tensor:
        """Copy `metadata` (1-D int64) to the device; returns a device view of it, valid
        until `release()` has been called and NUM_SLOTS further uploads have happened."""
        slot = self._slots[self._next]
        self._next = (self._next + 1) % NUM_SLOTS
        if slot.recorded:
            slot.event.synchronize()
        n = metadata.shape[0]
        if slot.host is None or slot.host.numel() < n:
            capacity = max(1024, 1 << (n - 1).bit_length())
            slot.host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
            slot.host_array = slot.host.numpy()
            slot.device = torch.empty(capacity, dtype=torch.int64, device=self.device)
            slot.event = torch.cuda.Event()
        slot.host_array[:n] = metadata
        slot.device[:n].copy_(slot.host[:n], non_blocking=True)
        self._current = slot
        return slot.device

    def release(self) -> None:
        """Mark the last uploaded slot in use by everything queued on the current stream."""
        slot, self._current = self._current, None
        slot.event.record(torch.cuda.current_stream(self.device))
        slot.recorded = True


_WORKSPACES: dict[int, DeviceWorkspace] = {}
_WORKSPACES_LOCK = threading.Lock()


def workspace_for(device: torch.device) -> DeviceWorkspace:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _WORKSPACES_LOCK:
        if index not in _WORKSPACES:
            _WORKSPACES[index] = DeviceWorkspace(torch.device("cuda", index))
        return _WORKSPACES[index]
