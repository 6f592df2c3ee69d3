"""The few CUDA driver calls the launch path makes itself (ctypes on libcuda).

A launch of the copy kernel issues three things: the upload of its table, the kernel,
and an event that says when the table's buffers may be reused. Through torch each is a
Python-level call of 2-7 us (argument parsing, dispatch, the caching host allocator's
own event for a pinned copy); the driver calls underneath take about 1 us. Here they
are called directly: a `ctypes` call with declared argument types costs a fraction of
a microsecond, and every handle (stream, event, graph) travels as a plain integer.

The calls run in the context torch made current for the device (its primary context):
callers make them after torch has touched the device, inside `torch.cuda.device(...)`
when it is not the current one. Every call's result is checked; a failure raises
`CudaError` with the driver's name for it.

`driver()` is None where libcuda cannot be loaded; the launch path then uses torch's
calls instead (slower, same semantics).
"""

from __future__ import annotations

import ctypes
import threading

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_READY = 600
EVENT_DISABLE_TIMING = 0x2
EVENT_RECORD_EXTERNAL = 0x1
CAPTURE_MODE_THREAD_LOCAL = 1


class CudaError(RuntimeError):
    pass


class CudaDriver:
    """Typed entry points of libcuda; handles and pointers are ints."""

    def __init__(self, library: ctypes.CDLL) -> None:
        u64, vp, size, uint = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint

        def bind(name: str, *argtypes):
            function = getattr(library, name)
            function.argtypes = list(argtypes)
            function.restype = ctypes.c_int
            return function

        self._error_name = bind("cuGetErrorName", ctypes.c_int, ctypes.POINTER(ctypes.c_char_p))
        self._memcpy = bind("cuMemcpyHtoDAsync_v2", u64, vp, size, vp)
        self._event_create = bind("cuEventCreate", ctypes.POINTER(vp), uint)
        self._event_destroy = bind("cuEventDestroy_v2", vp)
        self._event_record = bind("cuEventRecord", vp, vp)
        self._event_record_flags = bind("cuEventRecordWithFlags", vp, vp, uint)
        self._event_query = bind("cuEventQuery", vp)
        self._event_synchronize = bind("cuEventSynchronize", vp)
        self._stream_wait = bind("cuStreamWaitEvent", vp, vp, uint)
        self._begin_capture = bind("cuStreamBeginCapture_v2", vp, ctypes.c_int)
        self._end_capture = bind("cuStreamEndCapture", vp, ctypes.POINTER(vp))
        self._instantiate = bind("cuGraphInstantiateWithFlags", ctypes.POINTER(vp), vp, ctypes.c_ulonglong)
        self._graph_destroy = bind("cuGraphDestroy", vp)
        self._graph_launch = bind("cuGraphLaunch", vp, vp)
        self._graph_exec_destroy = bind("cuGraphExecDestroy", vp)

    def check(self, result: int, what: str) -> None:
        if result != CUDA_SUCCESS:
            name = ctypes.c_char_p()
            self._error_name(result, ctypes.byref(name))
            raise CudaError(f"{what}: {(name.value or b'?').decode()} ({result})")

    def memcpy_to_device(self, device_pointer: int, host_pointer: int, nbytes: int, stream: int) -> None:
        """Asynchronous copy from pinned host memory on `stream`."""
        result = self._memcpy(device_pointer, host_pointer, nbytes, stream)
        if result:
            self.check(result, "cuMemcpyHtoDAsync")

    def event_create(self) -> int:
        event = ctypes.c_void_p()
        self.check(self._event_create(ctypes.byref(event), EVENT_DISABLE_TIMING), "cuEventCreate")
        return event.value

    def event_destroy(self, event: int) -> None:
        self._event_destroy(event)

    def event_record(self, event: int, stream: int) -> None:
        result = self._event_record(event, stream)
        if result:
            self.check(result, "cuEventRecord")

    def event_record_in_graph(self, event: int, stream: int) -> None:
        """While `stream` is being captured: a graph node that records `event` on every replay."""
        self.check(self._event_record_flags(event, stream, EVENT_RECORD_EXTERNAL), "cuEventRecordWithFlags")

    def event_done(self, event: int) -> bool:
        result = self._event_query(event)
        if result == CUDA_ERROR_NOT_READY:
            return False
        if result:
            self.check(result, "cuEventQuery")
        return True

    def event_synchronize(self, event: int) -> None:
        self.check(self._event_synchronize(event), "cuEventSynchronize")

    def stream_wait(self, stream: int, event: int) -> None:
        result = self._stream_wait(stream, event, 0)
        if result:
            self.check(result, "cuStreamWaitEvent")

    def begin_capture(self, stream: int) -> None:
        self.check(self._begin_capture(stream, CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCapture")

    def end_capture(self, stream: int) -> int:
        """Ends the capture and returns the instantiated graph (an executable graph)."""
        graph = ctypes.c_void_p()
        self.check(self._end_capture(stream, ctypes.byref(graph)), "cuStreamEndCapture")
        executable = ctypes.c_void_p()
        try:
            self.check(self._instantiate(ctypes.byref(executable), graph, 0), "cuGraphInstantiateWithFlags")
        finally:
            self._graph_destroy(graph)
        return executable.value

    def graph_destroy(self, executable: int) -> None:
        self.check(self._graph_exec_destroy(executable), "cuGraphExecDestroy")

    def graph_launch(self, executable: int, stream: int) -> None:
        result = self._graph_launch(executable, stream)
        if result:
            self.check(result, "cuGraphLaunch")


_DRIVER: CudaDriver | None = None
_LOADED = False
_LOCK = threading.Lock()


def driver() -> CudaDriver | None:
    """The process's driver bindings, or None where libcuda (or one of its entry points) is missing."""
    global _DRIVER, _LOADED
    if not _LOADED:
        with _LOCK:
            if not _LOADED:
                try:
                    _DRIVER = CudaDriver(ctypes.CDLL("libcuda.so.1"))
                except (OSError, AttributeError):
                    _DRIVER = None
                _LOADED = True
    return _DRIVER
