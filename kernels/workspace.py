"""Reusable table buffers for the kernel launches of one device.

Each launch needs a few kilobytes of int64 table on the device (segment columns, block
tables: `triton_copy.py`). Allocating it per call would put allocations on the hot
path, so each launcher keeps a ring of `NUM_SLOTS` table buffers; a buffer is a pinned
host array plus a device array of the same size plus an event, and a slot's buffer is
replaced by a bigger one (doubling) only when a bigger batch comes. The launcher writes
its table straight into the pinned array, so nothing is built twice, and uploads
exactly the words it wrote with one driver call (`cuda_driver.py`).

Why reusing a buffer is safe: the upload out of the pinned array is asynchronous, so
the host may not overwrite that array until the copy has read it, and the device array
may not be overwritten until the kernel that reads it has finished. After its launch, a
buffer records an event on the launching stream, which completes only after both the
copy and the kernel. Before a buffer is filled again, the host waits on that event.
With `NUM_SLOTS` buffers, the wait is on the launch made `NUM_SLOTS` calls ago, which in
steady state finished long before (the wait costs nothing); if the host ever runs that
far ahead of the device it is throttled instead of corrupting a table in flight. The
event also covers launches from different streams, which stream order alone would not
(and an upload on a stream of its own: `Launcher(side_upload=True)`).

The CUDA graphs of the launcher's graph mode each own one such buffer (the graph's
upload reads its pinned array); their event is recorded by the graph itself.

On CPU (Triton's interpreter) a buffer is a plain host array the kernel reads in place.
"""

from __future__ import annotations

import numpy as np
import torch

from .cuda_driver import CudaDriver

NUM_SLOTS = 8
MIN_CAPACITY = 1024


class TableBuffer:
    """A pinned host array and its device twin (on CPU: the host array alone), an event
    recorded after the last launch that read them, and the template the host array holds
    (`owner`, see launch.py)."""

    def __init__(self, device: torch.device, capacity: int, driver: CudaDriver | None,
                 events: tuple | None = None) -> None:
        self.capacity = capacity
        self.owner = None
        self.recorded = False
        if device.type != "cuda":
            self.host = np.empty(capacity, dtype=np.int64)
            return
        self.host_tensor = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self.host = self.host_tensor.numpy()
        self.host_pointer = self.host_tensor.data_ptr()
        self.device = torch.empty(capacity, dtype=torch.int64, device=device)
        self.device_pointer = self.device.data_ptr()
        if events is not None:
            self.event, self.upload_event = events
        elif driver is not None:
            self.event, self.upload_event = driver.event_create(), None
        else:
            self.event, self.upload_event = torch.cuda.Event(), None


class TableSlots:
    """The ring of table buffers of one launcher. Callers hold the launcher's lock around
    acquire + upload + launch + `release`, so that concurrent calls never share a buffer."""

    def __init__(self, device: torch.device, driver: CudaDriver | None) -> None:
        self.device = device
        self.driver = driver
        self._buffers: list[TableBuffer | None] = [None] * NUM_SLOTS
        self._next = 0

    def acquire(self, n: int) -> TableBuffer:
        """The next buffer, at least `n` words, safe to write: the last launch that read it
        has finished."""
        index = self._next
        self._next = (index + 1) % NUM_SLOTS
        buffer = self._buffers[index]
        if buffer is not None and buffer.recorded:
            self._wait(buffer)
        if buffer is None or buffer.capacity < n:
            events = None if buffer is None or self.device.type != "cuda" else (buffer.event, buffer.upload_event)
            capacity = max(MIN_CAPACITY, 1 << (n - 1).bit_length())
            buffer = self._buffers[index] = TableBuffer(self.device, capacity, self.driver, events)
        return buffer

    def upload(self, buffer: TableBuffer, n: int, stream: int, upload_stream: int | None = None) -> None:
        """Copy the first `n` words to the device, asynchronously: on `stream`, or on
        `upload_stream` with `stream` made to wait for it."""
        driver = self.driver
        if driver is None:
            buffer.device[:n].copy_(buffer.host_tensor[:n], non_blocking=True)
        elif upload_stream is None:
            driver.memcpy_to_device(buffer.device_pointer, buffer.host_pointer, 8 * n, stream)
        else:
            if buffer.upload_event is None:
                buffer.upload_event = driver.event_create()
            driver.memcpy_to_device(buffer.device_pointer, buffer.host_pointer, 8 * n, upload_stream)
            driver.event_record(buffer.upload_event, upload_stream)
            driver.stream_wait(stream, buffer.upload_event)

    def release(self, buffer: TableBuffer, stream: int) -> None:
        """Mark the buffer in use by everything queued on `stream` so far."""
        if self.driver is None:
            buffer.event.record(torch.cuda.current_stream(self.device))
        else:
            self.driver.event_record(buffer.event, stream)
        buffer.recorded = True

    def _wait(self, buffer: TableBuffer) -> None:
        if self.driver is None:
            buffer.event.synchronize()
        elif not self.driver.event_done(buffer.event):
            self.driver.event_synchronize(buffer.event)
        buffer.recorded = False
