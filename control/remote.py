"""The same control records between nodes, over pyzmq (the ring is the node-local path).

A `RecordReceiver` binds a PULL socket (127.0.0.1 unless another host is given; port 0
picks a free one, see `.endpoint`); any number of `RecordSender`s connect PUSH sockets
to it. One record per zmq message, encoded with `records.encode`.

Validation on receipt: every message goes through `records.decode`. A malformed one is
counted (`stats.rejected`, `stats.last_error`) and dropped, and `recv` keeps waiting for
a valid record within its deadline: a broken or hostile peer must not take the receiver
down. zmq's MAXMSGSIZE drops oversized messages (and their connection) before they
reach Python. Every send and receive has a timeout; sockets close with linger 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import zmq

from .records import MAX_RECORD_BYTES, Record, RecordError, decode, encode


@dataclass(frozen=True)
class RemoteStats:
    received: int  # valid records returned by recv
    rejected: int  # messages dropped because they did not decode
    last_error: str  # why the last one was dropped ("" if none)


class RecordReceiver:
    """Receives records from any number of senders on other nodes."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_record_bytes: int = MAX_RECORD_BYTES,
        context: zmq.Context | None = None,
    ) -> None:
        self._socket = (context or zmq.Context.instance()).socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_record_bytes)
        try:
            self._socket.bind(f"tcp://{host}:{port if port else '*'}")
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            raise OSError(f"RecordReceiver: cannot bind tcp://{host}:{port or '*'}: {exc}") from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._received = 0
        self._rejected = 0
        self._last_error = ""

    @property
    def stats(self) -> RemoteStats:
        return RemoteStats(self._received, self._rejected, self._last_error)

    def recv(self, timeout: float) -> Record | None:
        """The next valid record, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if not self._socket.poll(max(0, int(remaining * 1000)), zmq.POLLIN):
                if remaining <= 0 or time.monotonic() >= deadline:
                    return None
                continue
            data = self._socket.recv(zmq.NOBLOCK, copy=True)
            try:
                record = decode(data)
            except RecordError as exc:
                self._rejected += 1
                self._last_error = str(exc)
                continue
            self._received += 1
            return record

    def close(self) -> None:
        """Close the socket (linger 0). Idempotent."""
        if not self._socket.closed:
            self._socket.close(linger=0)

    def __enter__(self) -> RecordReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RecordSender:
    """Sends records to one `RecordReceiver` endpoint."""

    def __init__(self, endpoint: str, *, high_water_mark: int = 1000, context: zmq.Context | None = None) -> None:
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, high_water_mark)
        # Queue only on a completed connection: with no receiver there, send times out
        # instead of piling records up in a pipe nobody reads.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        try:
            self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            raise ValueError(f"RecordSender: cannot connect to {endpoint!r}: {exc}") from None
        self.endpoint = endpoint

    def send(self, record: Record, timeout: float) -> None:
        """Encode and queue `record`; TimeoutError if the peer takes nothing for `timeout` s."""
        self.send_bytes(encode(record), timeout)

    def send_bytes(self, data: bytes, timeout: float) -> None:
        """Queue already-encoded bytes as they are (the receiver validates them)."""
        if not self._socket.poll(max(0, int(timeout * 1000)), zmq.POLLOUT):
            raise TimeoutError(f"RecordSender: {self.endpoint} accepted nothing for {timeout:.3f}s")
        self._socket.send(data, zmq.NOBLOCK, copy=True)

    def close(self) -> None:
        """Close the socket (linger 0: unsent records are dropped). Idempotent."""
        if not self._socket.closed:
            self._socket.close(linger=0)

    def __enter__(self) -> RecordSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["RecordReceiver", "RecordSender", "RemoteStats"]
