"""Authenticated frames between processes on different nodes, over zmq/TCP.

The shared-memory ring is the node-local path of the control plane; a `RemoteLink` is
the path to peers on other nodes. Each process owns one link: it binds one receiving
socket on its node's address and connects one sending socket to each remote peer. A
frame is opaque bytes (the runtime's encoded record); the link signs it, carries it,
verifies it and hands it to the caller, in the order its sender sent it.

Threads and sockets (zmq sockets are not thread-safe, so every socket has one owner at
a time)::

    caller thread(s)                              link thread "embxfer-link-r<rank>"
    ----------------                              ----------------------------------
    send(peer, frame) --[peer lock]--+            every heartbeat_interval_s:
                                     |              --[peer lock]--+
                                     v                             v
                           PUSH socket of peer p  (one per remote peer, TCP, signs,
                                     |             counter++ under the same lock)
                                     '----------------- TCP ------------------> peer p

    peer q --- TCP ---> PULL socket (bound on bind_host; only the link thread reads it)
                             | verify: size, header, HMAC, destination, replay
                             v
    receive() <-- inbox (list + lock) <-------- verified frames (heartbeats only refresh
    wait(t)   <-- ready pipe <----------------- liveness); when the inbox turns
                                                non-empty: ready pipe if a thread is in
                                                wait(), then on_receive() (the runtime
                                                rings its doorbell)
    close(), connect(), receive() after a pause --> wake pipe --> link thread

- A peer's PUSH socket is used by the caller (`send`) and by the link thread
  (heartbeats), always under that peer's lock: the lock is the full memory barrier zmq
  asks for when a socket changes threads, and it makes data frames and heartbeats share
  one counter and one TCP connection, in order. `send` takes the lock, signs, and makes
  one non-blocking zmq send: microseconds, never a wait on the network.
- The PULL socket belongs to the link thread alone. It sleeps in `zmq_poll` on the PULL
  socket and a wake pipe, with a deadline at the next heartbeat, so an idle link wakes
  once per interval. The caller never touches the PULL socket: it drains the inbox.
  After a wake-up the thread does its bookkeeping first and hands frames over last,
  so that it goes straight back to sleep while the woken caller replies: on a busy
  core the caller's reply, zmq's I/O thread and this thread compete for one CPU and
  one GIL.
- Each link has its own zmq context, whose one I/O thread (native, no GIL) moves bytes
  between the sockets and TCP; `close()` ends it with the context.
- Heartbeats come from the link thread, not from the caller's loop: a long engine step
  (no call into the link for many seconds) does not make this process look dead. The
  caveat is CPython's: the link thread needs the GIL, which Python code yields every
  few milliseconds and torch releases around its kernels; only a C extension holding
  the GIL for longer than the peer timeout could starve it.

Wire format of one frame (one zmq message, little endian)::

    offset  size  field
     0       4    magic  b"EBXL"
     4       1    version (1)
     5       1    kind: 1 data, 2 heartbeat (a heartbeat carries no payload)
     6       2    reserved, zero
     8       4    source rank (u32)
    12       4    destination rank (u32)
    16      16    source incarnation nonce (random per RemoteLink, fixed for its life)
    32       8    counter (u64): per (source incarnation, destination), strictly
                  increasing, starts at 1; data frames and heartbeats share it
    40       N    payload, 0 <= N <= max_frame_bytes
    40+N    32    HMAC-SHA256(secret, bytes 0 .. 40+N)

Verification, in order; a frame failing a check is dropped, counted, and described in
`stats.last_error`, and the link carries on with the next one:

1. `malformed`: shorter than header + MAC, longer than header + max_frame_bytes + MAC,
   wrong magic, version or kind, non-zero reserved bytes, or a heartbeat with payload.
   Messages above twice that maximum are cut by zmq (MAXMSGSIZE) before Python sees
   them: the connection that sent one is closed and is not counted here.
2. `forged`: the MAC does not match (no secret, wrong secret, any byte changed); or it
   matches but the frame is addressed to another rank (a frame captured on one link and
   delivered to another), or claims this link's own rank as its source.
3. `replayed`: from a source's current incarnation, a counter not greater than the
   last one accepted from it; or any frame of an incarnation that source has left.

Incarnations (restarts). A link draws a fresh 16-byte nonce when it is made. The first
verified frame from a rank sets that rank's incarnation. A verified frame with a nonce
never seen from that rank is a restart: the new incarnation is accepted from whatever
counter it carries, the old nonce is retired (its frames count as replays from then
on), and `stats.restarted` counts it. Only a holder of the secret can mint a nonce, so
an outsider cannot restart anyone; a replay of an old incarnation's frames is refused.
Limit: the replay memory lives as long as the receiving link. A receiver that is itself
re-made in the same job forgets it, so frames recorded before could be replayed into
it once; a job that re-makes links should also make a new secret.

Who may send: any rank that signs with the job's secret (except this rank), whether or
not this link connected to it, so a peer that finished set-up first is not dropped.
The secret is the trust boundary: it is made per job (`secrets.token_bytes(32)`) and
travels only through the runtime's own store, never over these sockets.

Liveness: a peer is alive while verified frames or heartbeats from it arrive.
`dead_peers(t)` lists the peers connected to (counted from `connect`) and the ranks
heard from that have been silent for more than t seconds. A SIGKILLed process, or one
whose link was closed, stops its heartbeats, so it is listed within t plus one
interval. Heartbeats are signed and counted like frames: a replayed heartbeat cannot
keep a dead peer alive. If the caller leaves more than `max_pending_bytes` in the inbox,
the link thread stops reading (TCP backpressure reaches the senders, whose `send`
returns False) and silence during that pause is not held against anyone. A peer behind
a cut without a TCP reset keeps its connection open as far as zmq knows: frames for it
queue up to `send_queue_frames`, then `send` returns False, and `dead_peers` names it.

Network set-up (what to open, what to set):

- Each process listens on one TCP port, on `bind_host`, and opens one outgoing TCP
  connection to each remote peer's port. Between nodes, inbound TCP to every process's
  port must be open. Port 0 takes a free port from the kernel's ephemeral range
  (`/proc/sys/net/ipv4/ip_local_port_range`); behind a firewall pass fixed ports (for
  example a base port plus the local rank) and open that range.
- `bind_host` is required: bind to the address the other nodes reach this node on (the
  runtime defaults to the address torchrun reaches it on and takes `EMBXFER_BIND_HOST`
  to override). With several interfaces, pick the one on the network the other nodes
  route to (e.g. the IB/RoCE or data-centre interface, not docker0). A host name is
  resolved once, here; an interface name such as `eth0` goes to zmq as it is.
- Listening on every interface ("0.0.0.0", "::" or "*") is refused unless
  `advertise_host` is given too, since peers cannot connect to a wildcard address.
- Behind NAT, bind to the local interface address and set `advertise_host` to the
  address peers reach (the public or forwarded address), with a fixed `port` that the
  NAT forwards to the same number: `endpoint` is what peers are told.

No pickle anywhere: frames are bytes, headers are `struct`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from .deadlines import check_seconds

MAGIC = b"EBXL"
VERSION = 1
KIND_DATA = 1
KIND_HEARTBEAT = 2
HEADER = struct.Struct("<4sBBHII16sQ")
HEADER_BYTES = HEADER.size  # 40
_HEADER_PREFIX = struct.Struct("<4sBBHII16s")  # the header up to the counter
_COUNTER = struct.Struct("<Q")
MAC_BYTES = 32
NONCE_BYTES = 16
MIN_SECRET_BYTES = 32
MAX_RANK = 2**32 - 1
# Largest frame a link accepts to carry; control records are far smaller.
MAX_FRAME_BYTES_LIMIT = 64 << 20
# How long close() waits for the link thread (it wakes on the pipe at once unless an
# on_receive callback blocks).
CLOSE_TIMEOUT_S = 5.0
# Messages read per wake-up before the link thread looks at the clock again, so a flood
# of input never delays this process's own heartbeats by more than one batch.
RECEIVE_BATCH = 64
# A silent peer's retired incarnations kept per rank (replays of older ones are refused
# as "unknown incarnation" only while remembered; restarts are rare).
RETIRED_INCARNATIONS = 256
# Bookkeeping charged per pending frame on top of its length, so a flood of empty frames
# is bounded too.
PENDING_OVERHEAD_BYTES = 64

_WILDCARDS = {"*", "0.0.0.0", "::", ""}
_ENDPOINT_RE = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")
_monotonic = time.monotonic


@dataclass(frozen=True)
class LinkStats:
    """Counters of one link since it was made (a snapshot)."""

    received: int  # data frames verified and delivered to the inbox
    sent: int  # data frames queued by send()
    send_dropped: int  # send() calls that returned False
    forged: int  # bad MAC, wrong destination, or own rank as source
    replayed: int  # counter not above the last accepted, or a retired incarnation
    malformed: int  # wrong size or header
    restarted: int  # sources seen coming back with a new incarnation
    last_error: str  # the latest drop or failure, naming peer/endpoint ("" if none)


class _Peer:
    """Sending side towards one remote rank: its socket, lock and counter."""

    __slots__ = (
        "rank", "endpoint", "socket", "lock", "counter", "sent", "dropped", "connected_at",
        "data_prefix", "heartbeat_prefix",
    )

    def __init__(
        self, rank: int, endpoint: str, sock: zmq.Socket, connected_at: float, source: int, incarnation: bytes
    ) -> None:
        self.rank = rank
        self.endpoint = endpoint
        self.socket = sock
        self.lock = threading.Lock()
        self.counter = 0
        self.sent = 0
        self.dropped = 0
        self.connected_at = connected_at
        # Every header field but the counter is fixed per (source, destination, kind).
        self.data_prefix = _HEADER_PREFIX.pack(MAGIC, VERSION, KIND_DATA, 0, source, rank, incarnation)
        self.heartbeat_prefix = _HEADER_PREFIX.pack(MAGIC, VERSION, KIND_HEARTBEAT, 0, source, rank, incarnation)


class _Source:
    """What the receiver remembers of one sending rank (link thread only)."""

    __slots__ = ("incarnation", "counter", "retired")

    def __init__(self, incarnation: bytes, counter: int) -> None:
        self.incarnation = incarnation
        self.counter = counter
        self.retired: dict[bytes, None] = {}  # insertion-ordered set

    def retire_current(self, incarnation: bytes, counter: int) -> None:
        self.retired[self.incarnation] = None
        while len(self.retired) > RETIRED_INCARNATIONS:
            del self.retired[next(iter(self.retired))]
        self.incarnation = incarnation
        self.counter = counter


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _resolve_bind_host(host: str) -> str:
    """An IP literal as it is; a host name resolved once (IPv4 first); else as given
    (zmq also takes interface names such as eth0)."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        if infos:
            return str(infos[0][4][0])
    return host


class RemoteLink:
    """This process's link to its peers on other nodes; see the module docstring.

    `rank` is this process's rank; `secret` the job's shared key (>= 32 bytes);
    `bind_host` the address to listen on (required; see "Network set-up"); `port` 0
    picks a free port. `max_frame_bytes` bounds one frame's payload;
    `heartbeat_interval_s` is how often every connected peer hears from this process.
    `on_receive()` runs on the link thread each time verified frames reach an empty
    inbox (frames added to a non-empty one were announced already and the next
    `receive()` takes them): it must be quick and must not block (ring a doorbell).
    `advertise_host` replaces the host in `endpoint` (NAT, wildcard binds);
    `send_queue_frames` is each peer's send queue (zmq SNDHWM); `max_pending_bytes`
    bounds what waits in the inbox for `receive()`.
    """

    def __init__(
        self,
        rank: int,
        secret: bytes,
        bind_host: str,
        port: int = 0,
        *,
        max_frame_bytes: int,
        heartbeat_interval_s: float,
        on_receive: Callable[[], None] | None = None,
        advertise_host: str | None = None,
        send_queue_frames: int = 1000,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
            raise ValueError(f"rank={rank!r}: expected an int in [0, {MAX_RANK}]")
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
            size = len(secret) if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
            raise ValueError(
                f"secret: expected >= {MIN_SECRET_BYTES} bytes (secrets.token_bytes(32)), got {size}"
            )
        if not isinstance(bind_host, str):
            raise ValueError(f"bind_host={bind_host!r}: expected an address string")
        if bind_host.strip("[]") in _WILDCARDS and not advertise_host:
            raise ValueError(
                f"bind_host={bind_host!r} listens on every interface: pass the address other "
                "nodes reach this node on, or give advertise_host= too to listen on all of them"
            )
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port={port!r}: expected an int in [0, 65535] (0: any free port)")
        if (
            isinstance(max_frame_bytes, bool)
            or not isinstance(max_frame_bytes, int)
            or not 1 <= max_frame_bytes <= MAX_FRAME_BYTES_LIMIT
        ):
            raise ValueError(f"max_frame_bytes={max_frame_bytes!r}: expected an int in [1, {MAX_FRAME_BYTES_LIMIT}]")
        self._interval = check_seconds("heartbeat_interval_s", heartbeat_interval_s, positive=True)
        if not isinstance(send_queue_frames, int) or send_queue_frames < 1:
            raise ValueError(f"send_queue_frames={send_queue_frames!r}: expected an int >= 1")
        if not isinstance(max_pending_bytes, int) or max_pending_bytes < max_frame_bytes:
            raise ValueError(f"max_pending_bytes={max_pending_bytes!r}: expected an int >= max_frame_bytes")
        if on_receive is not None and not callable(on_receive):
            raise ValueError(f"on_receive={on_receive!r}: expected a callable or None")

        self.rank = rank
        self.max_frame_bytes = max_frame_bytes
        self.incarnation = secrets.token_bytes(NONCE_BYTES)
        self._mac_base = hmac.new(bytes(secret), digestmod=hashlib.sha256)
        self._on_receive = on_receive
        self._send_queue_frames = send_queue_frames
        self._max_pending_bytes = max_pending_bytes
        self._max_wire_bytes = HEADER_BYTES + max_frame_bytes + MAC_BYTES

        self._peers: dict[int, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._sources: dict[int, _Source] = {}
        self._last_heard: dict[int, float] = {}
        self._inbox: list[tuple[int, bytes]] = []
        self._pending_bytes = 0
        self._paused_since: float | None = None
        self._inbox_lock = threading.Lock()
        self._waiters = 0  # threads inside wait()
        self._received = self._forged = self._replayed = self._malformed = self._restarted = 0
        self._last_error = ""
        self._failure = ""
        self._unknown_dropped = 0
        self._heartbeat_now = False
        self._release_on_exit = False
        self._released = False
        self._stop = False
        self._closed = False
        self._close_lock = threading.Lock()

        # wake: caller side -> link thread; ready: link thread -> threads inside wait().
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_read, self._ready_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._context = zmq.Context(io_threads=1)
        address = _resolve_bind_host(bind_host)
        url = f"tcp://{_url_host(address)}:{port or '*'}"
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.MAXMSGSIZE, 2 * self._max_wire_bytes)
        if ":" in address:
            self._pull.setsockopt(zmq.IPV6, 1)
        try:
            self._pull.bind(url)
        except zmq.ZMQError as exc:
            self._pull.close(linger=0)
            self._context.term()
            for fd in (self._wake_read, self._wake_write, self._ready_read, self._ready_write):
                os.close(fd)
            raise OSError(f"RemoteLink rank {rank}: cannot bind {bind_host}:{port or 0} ({url}): {exc}") from None
        bound = self._pull.getsockopt_string(zmq.LAST_ENDPOINT)
        if advertise_host:
            bound = f"tcp://{_url_host(advertise_host)}:{bound.rsplit(':', 1)[1]}"
        self.endpoint: str = bound
        self._thread = threading.Thread(target=self._run, name=f"embxfer-link-r{rank}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side

    def connect(self, peers: dict[int, str]) -> None:
        """Connect to each remote peer (rank -> endpoint). Peers may come up in any
        order: zmq retries until the other side is there. May be called again to add
        ranks; a rank already connected must keep its endpoint."""
        self._check_open("connect")
        checked: dict[int, str] = {}
        for peer, endpoint in peers.items():
            if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer <= MAX_RANK:
                raise ValueError(f"RemoteLink rank {self.rank}: peer rank {peer!r}: expected an int in [0, {MAX_RANK}]")
            if peer == self.rank:
                raise ValueError(f"RemoteLink rank {self.rank}: cannot connect to its own rank ({endpoint!r})")
            match = _ENDPOINT_RE.match(endpoint) if isinstance(endpoint, str) else None
            if match is None or not 0 < int(match.group(2)) <= 65535 or match.group(1).strip("[]") in _WILDCARDS:
                raise ValueError(
                    f"RemoteLink rank {self.rank}: peer {peer} endpoint {endpoint!r}: expected tcp://HOST:PORT"
                )
            known = self._peers.get(peer)
            if known is not None and known.endpoint != endpoint:
                raise ValueError(
                    f"RemoteLink rank {self.rank}: peer {peer} is already connected to {known.endpoint}, not {endpoint}"
                )
            checked[peer] = endpoint
        now = _monotonic()
        for peer, endpoint in checked.items():
            if peer in self._peers:
                continue
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self._send_queue_frames)
            # Queue only on a completed connection: send() says False instead of piling
            # frames up for a peer that is not there.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            if endpoint.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise OSError(f"RemoteLink rank {self.rank}: cannot connect to peer {peer} at {endpoint}: {exc}") from None
            with self._peers_lock:
                self._peers[peer] = _Peer(peer, endpoint, sock, now, self.rank, self.incarnation)
        self._heartbeat_now = True
        self._wake()

    def send(self, peer: int, frame: bytes) -> bool:
        """Queue one frame for `peer` without waiting; False (counted in
        `stats.send_dropped`, reason in `stats.last_error`) if it cannot be queued now:
        the peer is not connected (yet, or any more) or its queue is full."""
        if self._closed:
            raise RuntimeError(f"RemoteLink rank {self.rank}: send to peer {peer} after close()")
        size = len(frame)
        if size > self.max_frame_bytes:
            raise ValueError(
                f"RemoteLink rank {self.rank}: frame of {size} bytes for peer {peer} is over "
                f"max_frame_bytes={self.max_frame_bytes}"
            )
        target = self._peers.get(peer)
        if target is None:
            self._last_error = f"send: peer {peer} is not connected (connect() was not given it)"
            with self._peers_lock:
                self._unknown_dropped += 1
            return False
        with target.lock:
            counter = target.counter + 1
            body = target.data_prefix + _COUNTER.pack(counter) + frame
            mac = self._mac_base.copy()
            mac.update(body)
            try:
                target.socket.send(body + mac.digest(), zmq.NOBLOCK)
            except zmq.Again:
                target.dropped += 1
                self._last_error = (
                    f"send: peer {peer} at {target.endpoint} takes nothing now "
                    f"(not connected, or {self._send_queue_frames} frames queued)"
                )
                return False
            except zmq.ZMQError as exc:  # closed under us by close() on another thread
                target.dropped += 1
                self._last_error = f"send: peer {peer} at {target.endpoint}: {exc}"
                return False
            target.counter = counter
            target.sent += 1
        return True

    @property
    def pending(self) -> int:
        """Frames waiting in the inbox (a cheap look; `receive()` takes them)."""
        return len(self._inbox)

    def receive(self) -> list[tuple[int, bytes]]:
        """Every verified frame waiting, as (source rank, frame), each source's in the
        order it sent them; [] if none. Never waits."""
        with self._inbox_lock:
            frames, self._inbox = self._inbox, []
            self._pending_bytes = 0
        if self._paused_since is not None:
            self._wake()
        if not frames and self._failure:
            raise RuntimeError(f"RemoteLink rank {self.rank}: {self._failure}")
        return frames

    def wait(self, timeout: float) -> bool:
        """Block until frames are waiting in the inbox or `timeout` seconds pass; True
        if frames are waiting. Returns False at once on a closed link."""
        seconds = check_seconds("timeout", timeout)
        if self._closed:
            return False
        if self._inbox:
            return True
        deadline = _monotonic() + seconds
        with self._inbox_lock:
            self._waiters += 1
            ready = bool(self._inbox)
        try:
            # The link thread appends to an empty inbox, then (seeing a waiter registered
            # under the same lock) writes the ready pipe; reading the pipe before looking
            # at the inbox again means a frame is never missed, only a stale byte re-read.
            while not ready:
                if self._closed or self._failure:
                    return False
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    return False
                # Open while this thread is counted in _waiters, even after close().
                select.select([self._ready_read], [], [], remaining)
                try:
                    os.read(self._ready_read, 4096)
                except BlockingIOError:
                    pass
                ready = bool(self._inbox)
            return True
        finally:
            with self._inbox_lock:
                self._waiters -= 1
                self._close_ready_pipe_if_unused()

    def dead_peers(self, peer_timeout_s: float) -> dict[int, str]:
        """Peers silent (no verified frame or heartbeat) for more than `peer_timeout_s`:
        rank -> one line naming rank, endpoint and the silence. Connected peers never
        heard from count from `connect()`; ranks that only send to this link count from
        their first frame."""
        timeout = check_seconds("peer_timeout_s", peer_timeout_s, positive=True)
        paused_since = self._paused_since
        now = _monotonic() if paused_since is None else paused_since
        heard = dict(self._last_heard)
        with self._peers_lock:
            peers = {rank: (peer.endpoint, peer.connected_at) for rank, peer in self._peers.items()}
        dead: dict[int, str] = {}
        for rank in sorted(set(peers) | set(heard)):
            endpoint, connected_at = peers.get(rank, ("(not connected; it sends to this rank)", None))
            last = heard.get(rank)
            since = last if last is not None else connected_at
            if connected_at is not None and last is not None:
                since = max(last, connected_at)
            silence = now - since
            if silence > timeout:
                what = "silent" if last is not None else "never heard from since connect(), for"
                dead[rank] = (
                    f"peer rank {rank} at {endpoint}: {what} {silence:.1f} s "
                    f"(peer_timeout_s={timeout:g}, seen by rank {self.rank} at {self.endpoint})"
                )
        return dead

    @property
    def peers(self) -> dict[int, str]:
        """rank -> endpoint of every peer connected to."""
        with self._peers_lock:
            return {rank: peer.endpoint for rank, peer in self._peers.items()}

    @property
    def stats(self) -> LinkStats:
        with self._peers_lock:
            peers = list(self._peers.values())
            unknown = self._unknown_dropped
        return LinkStats(
            received=self._received,
            sent=sum(peer.sent for peer in peers),
            send_dropped=unknown + sum(peer.dropped for peer in peers),
            forged=self._forged,
            replayed=self._replayed,
            malformed=self._malformed,
            restarted=self._restarted,
            last_error=self._failure or self._last_error,
        )

    def close(self) -> None:
        """Stop the link thread and close every socket with linger 0 (unsent frames are
        dropped). Idempotent; bounded by CLOSE_TIMEOUT_S."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop = True
        self._wake()
        self._wake_waiters()
        if threading.current_thread() is self._thread:
            self._release_on_exit = True  # called from on_receive: the thread finishes it
            return
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            # Its PULL socket is still in use: leave the context (term would wait on it).
            self._failure = (
                f"close: link thread did not stop within {CLOSE_TIMEOUT_S} s (is on_receive blocking?)"
            )
            return
        self._release()

    def __enter__(self) -> RemoteLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteLink(rank={self.rank}, endpoint={self.endpoint!r}, peers={sorted(self._peers)})"

    # -------------------------------------------------------------------- internals

    def _check_open(self, verb: str) -> None:
        if self._closed:
            raise RuntimeError(f"RemoteLink rank {self.rank}: {verb} after close()")

    def _wake(self) -> None:
        with self._inbox_lock:  # never write to the number of a pipe _release() closed
            if self._released:
                return
            try:
                os.write(self._wake_write, b"\0")
            except BlockingIOError:
                pass  # a full pipe is already a pending wake-up

    def _wake_waiters(self) -> None:
        # Called by the link thread or by close(), both before _release().
        try:
            os.write(self._ready_write, b"\0")
        except BlockingIOError:
            pass

    def _close_ready_pipe_if_unused(self) -> None:
        """With _inbox_lock held: the last one out (close or a waiter) closes it."""
        if self._released and not self._waiters and self._ready_read >= 0:
            os.close(self._ready_read)
            os.close(self._ready_write)
            self._ready_read = self._ready_write = -1

    def _release(self) -> None:
        """Close what the caller side owns, once the link thread has closed the PULL."""
        with self._peers_lock:
            peers = list(self._peers.values())
        for peer in peers:
            with peer.lock:
                peer.socket.close(linger=0)
        with self._inbox_lock:
            self._released = True
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._close_ready_pipe_if_unused()
        self._context.term()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # any failure must reach the caller
            self._failure = f"link thread failed: {type(exc).__name__}: {exc}"
        finally:
            self._pull.close(linger=0)
            self._wake_waiters()
            if self._release_on_exit:
                self._release()

    def _loop(self) -> None:
        pull = self._pull
        both = zmq.Poller()
        both.register(pull, zmq.POLLIN)
        both.register(self._wake_read, zmq.POLLIN)
        pipe_only = zmq.Poller()
        pipe_only.register(self._wake_read, zmq.POLLIN)
        next_heartbeat = _monotonic()
        full = False
        # The bookkeeping comes right after a wake-up and the hand-off of frames comes
        # last, so that between waking a caller and sleeping again this thread runs a
        # few bytecodes only: the caller's reply needs this core and this GIL.
        while True:
            remaining_ms = (next_heartbeat - _monotonic()) * 1000
            events = (pipe_only if full else both).poll(max(0, math.ceil(remaining_ms)))
            if self._stop:
                return
            now = _monotonic()
            if now >= next_heartbeat or self._heartbeat_now:
                self._heartbeat_now = False
                self._send_heartbeats()
                next_heartbeat = now + self._interval
            readable = full  # after a pause, look at the socket that was not polled
            for ready, _ in events:
                if ready is pull:
                    readable = True
                else:
                    try:
                        os.read(self._wake_read, 4096)
                    except BlockingIOError:
                        pass
            full = self._pending_bytes >= self._max_pending_bytes
            if full and self._paused_since is None:
                self._paused_since = now
                # receive() wakes this thread only if it sees the pause: look again after
                # announcing it, in case the inbox was drained in between.
                full = self._pending_bytes >= self._max_pending_bytes
                if not full:
                    self._paused_since = None
            elif not full and self._paused_since is not None:
                self._paused_since = None
            if readable and not full:
                self._drain(pull)

    def _send_heartbeats(self) -> None:
        with self._peers_lock:
            peers = list(self._peers.values())
        for peer in peers:
            with peer.lock:
                counter = peer.counter + 1
                body = peer.heartbeat_prefix + _COUNTER.pack(counter)
                mac = self._mac_base.copy()
                mac.update(body)
                try:
                    peer.socket.send(body + mac.digest(), zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue  # not connected or queue full: the peer judges our silence
                peer.counter = counter

    def _drain(self, pull: zmq.Socket) -> None:
        """Read and verify what the PULL socket holds (up to RECEIVE_BATCH messages or
        the inbox bound), then hand the verified frames over at once."""
        accepted: list[tuple[int, bytes]] = []
        budget = self._max_pending_bytes - self._pending_bytes
        recv, verify = pull.recv, self._verify
        for _ in range(RECEIVE_BATCH):
            try:
                data = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            verified = verify(data)
            if verified is not None:
                accepted.append(verified)
                budget -= len(verified[1]) + PENDING_OVERHEAD_BYTES
                if budget <= 0:
                    break
            if not pull.get(zmq.EVENTS) & zmq.POLLIN:
                break
        if accepted:
            self._deliver(accepted)

    def _deliver(self, frames: list[tuple[int, bytes]]) -> None:
        """Append to the inbox; on its empty -> non-empty edge wake the waiters and call
        on_receive (a caller that has not taken the earlier frames was woken already,
        and its receive() takes these too)."""
        added = sum(len(frame) for _, frame in frames) + PENDING_OVERHEAD_BYTES * len(frames)
        with self._inbox_lock:
            was_empty = not self._inbox
            self._inbox += frames
            self._pending_bytes += added
            wake_waiters = was_empty and self._waiters
        self._received += len(frames)
        if wake_waiters:
            self._wake_waiters()
        if was_empty and self._on_receive is not None:
            try:
                self._on_receive()
            except Exception as exc:  # a bug in the callback must not stop the link
                self._last_error = f"on_receive raised {type(exc).__name__}: {exc}"

    def _verify(self, data: bytes) -> tuple[int, bytes] | None:
        """(source, payload) of a verified data frame; None for a heartbeat or a drop."""
        size = len(data)
        if size < HEADER_BYTES + MAC_BYTES or size > self._max_wire_bytes:
            self._malformed += 1
            self._last_error = (
                f"receive: malformed frame of {size} bytes (expected {HEADER_BYTES + MAC_BYTES} to "
                f"{self._max_wire_bytes}, max_frame_bytes={self.max_frame_bytes})"
            )
            return None
        magic, version, kind, reserved, source, destination, incarnation, counter = HEADER.unpack_from(data)
        if (
            magic != MAGIC
            or version != VERSION
            or kind not in (KIND_DATA, KIND_HEARTBEAT)
            or reserved
            or (kind == KIND_HEARTBEAT and size != HEADER_BYTES + MAC_BYTES)
        ):
            self._malformed += 1
            self._last_error = (
                f"receive: malformed header claiming rank {source} (magic {magic!r}, version "
                f"{version}, kind {kind}, reserved {reserved}, {size} bytes)"
            )
            return None
        mac = self._mac_base.copy()
        mac.update(memoryview(data)[: size - MAC_BYTES])
        if not hmac.compare_digest(mac.digest(), data[size - MAC_BYTES :]):
            self._forged += 1
            self._last_error = f"receive: bad MAC on a frame claiming rank {source} (forged or tampered)"
            return None
        if destination != self.rank or source == self.rank:
            self._forged += 1
            self._last_error = (
                f"receive: signed frame from rank {source} to rank {destination} arrived at rank "
                f"{self.rank} ({self.endpoint}); dropped"
            )
            return None
        state = self._sources.get(source)
        if state is None:
            self._sources[source] = _Source(incarnation, counter)
        elif incarnation == state.incarnation:
            if counter <= state.counter:
                self._replayed += 1
                self._last_error = (
                    f"receive: replay from rank {source}: counter {counter} <= {state.counter} already accepted"
                )
                return None
            state.counter = counter
        elif incarnation in state.retired:
            self._replayed += 1
            self._last_error = f"receive: replay of a retired incarnation of rank {source} (counter {counter})"
            return None
        else:
            state.retire_current(incarnation, counter)
            self._restarted += 1
        self._last_heard[source] = _monotonic()
        if kind == KIND_HEARTBEAT:
            return None
        return source, data[HEADER_BYTES : size - MAC_BYTES]


__all__ = ["HEADER_BYTES", "MAC_BYTES", "LinkStats", "RemoteLink"]
