"""Authenticated frames between processes on different nodes, over zmq/TCP.

The shared-memory ring is the node-local path of the control plane; a `RemoteLink` is
the path to peers on other nodes. Each process owns one link: it binds one receiving
socket on its node's address and connects one sending socket to each remote peer. A
frame is opaque bytes (the runtime's encoded record); the link numbers it, carries it
over an authenticated channel, verifies it and hands it to the caller, in the order its
sender sent it.

Peers are named by *member ids*: job-unique integers in [0, 2**48 - 1] that the runtime
hands out and never reuses (a restarted process joins with a new id).

Threads and sockets (zmq sockets are not thread-safe, so every socket has one owner at
a time)::

    caller thread(s)                              link thread "embxfer-link-m<member>"
    ----------------                              ------------------------------------
    send(peer, frame) --[peer lock]--+            every heartbeat_interval_s:
                                     |              --[peer lock]--+
                                     v                             v
                           PUSH socket of peer p  (one per remote peer, TCP, CURVE,
                                     |             counter++ under the same lock)
                                     '----------------- TCP ------------------> peer p

    peer q --- TCP ---> PULL socket (bound on bind_host; only the link thread reads it)
                             | verify: size, header, (HMAC), destination, departed, replay
                             v
    receive() <-- inbox (list + lock) <-------- verified frames (heartbeats only refresh
    wait(t)   <-- ready pipe <----------------- liveness); when the inbox turns
                                                non-empty: ready pipe if a thread is in
                                                wait(), then on_receive() (the runtime
                                                rings its doorbell)
    close(), connect(), disconnect(),
    receive() after a pause ------> wake pipe --> link thread
                                    ZAP socket --> link thread: admits the job's key only
                        PULL's monitor socket --> link thread: counts refused connections

- A peer's PUSH socket is used by the caller (`send`) and by the link thread
  (heartbeats), always under that peer's lock: the lock is the full memory barrier zmq
  asks for when a socket changes threads, and it makes data frames and heartbeats share
  one counter and one TCP connection, in order. `send` takes the lock, builds the header
  (and the HMAC with curve=False), and makes one non-blocking zmq send: microseconds,
  never a wait on the network.
- The PULL socket belongs to the link thread alone. It sleeps in `zmq_poll` on the PULL
  socket, the ZAP and monitor sockets and a wake pipe, with a deadline at the next
  heartbeat, so an idle link wakes once per interval. The caller never touches the PULL
  socket: it drains the inbox. After a wake-up the thread does its bookkeeping first and
  hands frames over last, so that it goes straight back to sleep while the woken caller
  replies: on a busy core the caller's reply, zmq's I/O thread and this thread compete
  for one CPU and one GIL.
- Each link has its own zmq context, whose one I/O thread (native, no GIL) moves bytes
  between the sockets and TCP, and runs the CURVE handshakes and encryption; `close()`
  ends it with the context.
- Heartbeats come from the link thread, not from the caller's loop: a long engine step
  (no call into the link for many seconds) does not make this process look dead. The
  caveat is CPython's: the link thread needs the GIL, which Python code yields every
  few milliseconds and torch releases around its kernels; only a C extension holding
  the GIL for longer than the peer timeout could starve it.

Wire format of one frame (one zmq message, little endian), version 2::

    offset  size  field
     0       4    magic  b"EBXL"
     4       1    version (2; version 1 had u32 ranks at 8 and 12)
     5       1    kind: 1 data, 2 heartbeat (a heartbeat carries no payload)
     6       2    reserved, zero
     8       8    source member id (u64, at most 2**48 - 1)
    16       8    destination member id (u64, at most 2**48 - 1)
    24      16    source incarnation nonce (random per RemoteLink, fixed for its life)
    40       8    counter (u64): per (source incarnation, destination), strictly
                  increasing, starts at 1; data frames and heartbeats share it
    48       N    payload, 0 <= N <= max_frame_bytes
    48+N    32    with curve=False only: HMAC-SHA256(secret, bytes 0 .. 48+N)

Authentication (who may connect, who may send). With `curve=True` (the default) every
socket speaks CurveZMQ with one keypair derived from the job's secret (`curve_keys`):
the secret key is HMAC-SHA256(secret, b"embxfer-curve"), so every member derives the
same pair and nobody else can. A client must know the server's public key to get past
its first handshake command, and the link's ZAP handler (on the link thread) then
admits only clients that prove they hold the job's secret key. Every frame then travels
encrypted and authenticated (XSalsa20-Poly1305, per-connection keys, nonces that only
go up: a frame cannot be altered, replayed into another connection or read by anyone
without the secret), so the link adds no MAC of its own. `curve=False` (for a libzmq
without CURVE) signs every frame with HMAC-SHA256 instead, which keeps the frames
honest but not the port: anyone who reaches it can complete zmq's NULL handshake and
hold a connection open (a descriptor and about 22 KiB) for as long as they like. Every
member of a job must use the same setting (a mixed pair never completes a handshake).

Why CURVE and not the HMAC framing (`bench/ring.py --only remote`, 2-core VM, loopback,
100-byte frames, three runs): round trip p50 128 - 133 us with CURVE against 131 - 139
us with the HMAC; one-way 299k - 305k frames/s against 229k - 234k (4 KiB frames:
118k - 124k against 108k - 113k). CURVE's cryptography runs in zmq's I/O thread without
the GIL, the HMAC in Python on both ends. Both together measured 136 - 148 us and 201k -
206k frames/s (76k - 84k at 4 KiB): the slowest, for no protection the channel does not
give already. Only CURVE stops connection floods.

Admission limits. A connection that does not finish its handshake within
`handshake_timeout_s` is closed by zmq (ZMQ_HANDSHAKE_IVL), so nothing but the job's
members holds a descriptor of this process for longer than that. Connections carry TCP
keepalive (a member behind a cut is closed after about KEEPALIVE_IDLE_S +
KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S of silence); messages over twice the largest
frame are cut by zmq (MAXMSGSIZE).

Floods: no outside connection pattern kills the link or grows its process without
bound. A connection costs a descriptor (and a few KiB) only from its accept to the end
of its handshake (failure, refusal or timeout: at most `handshake_timeout_s`); the
kernel's accept queue (zmq's backlog, 100) makes the rest of a flood wait in the
attacker's SYN retries. So the descriptors in use peak at what a flood gets accepted
within one handshake timeout, and come back by themselves within that time after it
ends. Freed memory goes back to the system too: glibc keeps what zmq's I/O thread freed
in its arena, so once refused connections stop for TRIM_QUIET_S the link thread calls
`malloc_trim(0)` (glibc only; elsewhere nothing). `tests/control/test_remote_floods.py`
runs 20,000 connect+close cycles, a slow drip and 10,000 idle connections against a
link that keeps receiving frames: every frame arrives in order and the descriptors and
RSS come back (20 descriptors and 24.6 MiB before; a peak of 944 - 5,141 descriptors
and 28 - 44 MiB; 20 and 24 - 26 MiB 2 - 6 s after; malloc_trim itself takes well under
a millisecond). The limit is the process's
descriptor table: with the common soft limit of 1024 that peak fills it, and while it
is full the link goes on (its connections are open already) but anything else in the
process that opens a descriptor fails. Run with RLIMIT_NOFILE raised
(`raise_open_files_limit`); a per-source connection limit in the firewall caps what no
process can.

Verification, in order; a frame failing a check is dropped, counted in `stats` and
described in `stats.last_error`, and the link carries on with the next one:

1. `malformed`: shorter than the header (+ MAC), longer than header + max_frame_bytes
   (+ MAC), wrong magic, version or kind, non-zero reserved bytes, a member id above
   2**48 - 1, or a heartbeat with payload. Messages above twice that maximum (and at
   least MIN_MAX_MESSAGE_BYTES) are cut by zmq (MAXMSGSIZE) before Python sees them: the
   connection that sent one is closed and is not counted here.
2. `forged`: with curve=False, the MAC does not match (no secret, wrong secret, any
   byte changed); in both modes, a frame addressed to another member (a frame captured
   on one link and delivered to another) or claiming this link's own member id as its
   source.
3. `departed`: from a member this link was told to `disconnect()` (late frames of a
   member declared dead or gone; member ids are not reused).
4. `replayed`: from a source's current incarnation, a counter not greater than the
   last one accepted from it; or any frame of an incarnation that source has left.

Connections refused (`refused`): every accepted TCP connection whose zmq handshake did
not succeed: closed or timed out before the end of the handshake, a protocol error
(not ZMTP, or not this job's server key), or a client key the ZAP handler refused.
Counted from the PULL socket's monitor events; a flood beyond MONITOR_QUEUE events
waiting at once is undercounted (the figure is then a lower bound).

Drops are logged (logger `embxfer.control.remote`, WARNING) at most once per origin
per `report_interval_s`: the first drop from an origin at once, later ones as one line
with the counts since the previous line. The origin of a dropped frame is the member
its header claims; the origin of a refused connection is its source address (read
from the descriptor zmq accepted, a moment later: best effort, "an unknown address"
when it was already closed). At most REPORT_ORIGINS origins are tracked per interval;
the rest are reported together.

Incarnations (restarts). A link draws a fresh 16-byte nonce when it is made. The first
verified frame from a member sets that member's incarnation. A verified frame with a
nonce never seen from that member is a restart: the new incarnation is accepted from
whatever counter it carries, the old nonce is retired (its frames count as replays from
then on), and `stats.restarted` counts it. Only a holder of the secret can deliver a
frame, so an outsider cannot restart anyone; a replay of an old incarnation's frames is
refused. Limit: the replay memory lives as long as the receiving link. A receiver that
is itself re-made in the same job forgets it, so frames recorded before could be
replayed into it once (with curve=False by anyone on the network, with CURVE only by a
holder of the secret); a job that re-makes links should also make a new secret.

Who may send: any holder of the job's secret (except this member), whether or not this
link connected to it, so a peer that finished set-up first is not dropped. The secret
is the trust boundary: it is made per job (`secrets.token_bytes(32)`) and travels only
through the runtime's own store, never over these sockets. All members share one key,
so a holder can claim any member id as its source (the runtime's records say who speaks
for whom, and the bus checks it).

Members come and go: `connect` adds peers at any time; `disconnect(member)` closes the
PUSH socket to that member and forgets its liveness and replay state, and from then on
its frames are dropped as `departed` (the last DEPARTED_MEMBERS departures are
remembered).

Liveness: a peer is alive while verified frames or heartbeats from it arrive.
`dead_peers(t)` lists the peers connected to (counted from `connect`) and the members
heard from that have been silent for more than t seconds. A SIGKILLed process, or one
whose link was closed, stops its heartbeats, so it is listed within t plus one
interval. Heartbeats are authenticated and counted like frames: a replayed heartbeat
cannot keep a dead peer alive. If the caller leaves more than `max_pending_bytes` in the
inbox, the link thread stops reading (TCP backpressure reaches the senders, whose
`send` returns False) and silence during that pause is not held against anyone. A peer behind
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

import bisect
import collections
import ctypes
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import resource
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from .deadlines import check_seconds

log = logging.getLogger(__name__)

MAGIC = b"EBXL"
VERSION = 2
KIND_DATA = 1
KIND_HEARTBEAT = 2
HEADER = struct.Struct("<4sBBHQQ16sQ")
HEADER_BYTES = HEADER.size  # 48
_HEADER_PREFIX = struct.Struct("<4sBBHQQ16s")  # the header up to the counter
_COUNTER = struct.Struct("<Q")
MAC_BYTES = 32  # the HMAC-SHA256 trailer, with curve=False only
NONCE_BYTES = 16
MIN_SECRET_BYTES = 32
MAX_MEMBER = 2**48 - 1
# zmq's MAXMSGSIZE also bounds CURVE's handshake commands (INITIATE is ~300 bytes).
MIN_MAX_MESSAGE_BYTES = 4096
# Largest frame a link accepts to carry; control records are far smaller.
MAX_FRAME_BYTES_LIMIT = 64 << 20
# How long close() waits for the link thread (it wakes on the pipe at once unless an
# on_receive callback blocks).
CLOSE_TIMEOUT_S = 5.0
# Messages read per wake-up before the link thread looks at the clock again, so a flood
# of input never delays this process's own heartbeats by more than one batch.
RECEIVE_BATCH = 64
# The same for monitor events (three per refused connection).
MONITOR_BATCH = 1024
# Monitor events that may wait for the link thread; beyond, zmq drops them (a flood is
# then undercounted, never buffered without bound). About 100 bytes each.
MONITOR_QUEUE = 50_000
# A silent peer's retired incarnations kept per member (replays of older ones are refused
# as "unknown incarnation" only while remembered; restarts are rare).
RETIRED_INCARNATIONS = 256
# Members passed to disconnect() whose late frames are still recognised and dropped.
DEPARTED_MEMBERS = 4096
# Bookkeeping charged per pending frame on top of its length, so a flood of empty frames
# is bounded too.
PENDING_OVERHEAD_BYTES = 64
# Connections from members tracked by the refusal count (far more than any job has).
MAX_MEMBER_CONNECTIONS = 4096
# Origins (claimed members, source addresses) with drops tracked between two reports.
REPORT_ORIGINS = 64
# After refused connections stop for this long, give freed memory back (malloc_trim).
TRIM_QUIET_S = 1.0
# TCP keepalive on every connection: a member that vanished without a reset is closed
# after about IDLE + COUNT * INTERVAL seconds of silence.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3
# The derivation label of the job's CURVE keypair.
CURVE_LABEL = b"embxfer-curve"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "embxfer"

_WILDCARDS = {"*", "0.0.0.0", "::", ""}
_ENDPOINT_RE = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")
_MONITOR_EVENT = struct.Struct("=HI")  # event id, value (libzmq writes host order)
_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "closed or timed out before the end of the handshake",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake protocol error (not ZMTP, or not this job's server key)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "client key refused (not this job's)",
}
_NOT_ZMTP = "not a ZMTP peer (cut at its greeting)"
_MONITOR_EVENTS = (  # distinct bits
    zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | sum(_HANDSHAKE_FAILURES)
)
_DROP_KINDS = ("forged", "replayed", "malformed", "departed", "refused")
_DROP_LABELS = {
    "forged": "forged frames",
    "replayed": "replayed frames",
    "malformed": "malformed frames",
    "departed": "frames from a departed member",
    "refused": "refused connections",
}
_monotonic = time.monotonic


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


@dataclass(frozen=True)
class LinkStats:
    """Counters of one link since it was made (a snapshot). The names are stable: the
    runtime exports them (`snapshot_stats()`, Prometheus)."""

    received: int  # data frames verified and delivered to the inbox
    sent: int  # data frames queued by send()
    send_dropped: int  # send() calls that returned False
    forged: int  # bad MAC, wrong destination, or own member id as source
    replayed: int  # counter not above the last accepted, or a retired incarnation
    malformed: int  # wrong size or header
    departed: int  # authenticated frames from a member passed to disconnect()
    refused: int  # TCP connections whose zmq handshake failed, was refused or timed out
    restarted: int  # sources seen coming back with a new incarnation
    last_error: str  # the latest drop or failure, naming peer/endpoint ("" if none)


def curve_keys(secret: bytes) -> tuple[bytes, bytes]:
    """The job's CURVE keypair (public, secret), Z85-encoded, derived from the job's
    secret: the secret key is HMAC-SHA256(secret, CURVE_LABEL). Every member derives the
    same pair; without the secret nobody can."""
    secret_key = z85.encode(hmac.digest(bytes(secret), CURVE_LABEL, "sha256"))
    return zmq.curve_public(secret_key), secret_key


_limit_lock = threading.Lock()
_limit_raised: tuple[int, int] | None = None


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, once per process (later
    calls change nothing); returns (soft limit before, soft limit now).

    For the runtime to call at start-up: with the common soft limit of 1024 a burst of
    connections to any listening port of the process (this link's, gloo's) can use up
    the descriptor table, and whatever opens a descriptor next fails (gloo aborts the
    process on EMFILE). The link does not depend on it: its descriptors come back after
    a flood whatever the limit. Descriptors above 1023 cannot go to `select.select()`;
    embxfer uses poll.
    """
    global _limit_raised
    with _limit_lock:
        if _limit_raised is None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            target = hard
            if hard == resource.RLIM_INFINITY:  # the kernel caps it at fs.nr_open
                try:
                    with open("/proc/sys/fs/nr_open") as nr_open:
                        target = int(nr_open.read())
                except (OSError, ValueError):
                    target = 1 << 20
            if soft != resource.RLIM_INFINITY and soft < target:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                except (OSError, ValueError):
                    target = soft
            else:
                target = soft
            _limit_raised = (soft, target)
        return _limit_raised


def _check_member(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MEMBER:
        raise ValueError(f"{what}={value!r}: expected a member id, an int in [0, 2**48 - 1]")
    return value


class _Peer:
    """Sending side towards one remote member: its socket, lock and counter."""

    __slots__ = (
        "member", "endpoint", "socket", "lock", "counter", "sent", "dropped", "connected_at",
        "data_prefix", "heartbeat_prefix",
    )

    def __init__(
        self, member: int, endpoint: str, sock: zmq.Socket, connected_at: float, source: int, incarnation: bytes
    ) -> None:
        self.member = member
        self.endpoint = endpoint
        self.socket = sock
        self.lock = threading.Lock()
        self.counter = 0
        self.sent = 0
        self.dropped = 0
        self.connected_at = connected_at
        # Every header field but the counter is fixed per (source, destination, kind).
        self.data_prefix = _HEADER_PREFIX.pack(MAGIC, VERSION, KIND_DATA, 0, source, member, incarnation)
        self.heartbeat_prefix = _HEADER_PREFIX.pack(MAGIC, VERSION, KIND_HEARTBEAT, 0, source, member, incarnation)


class _Source:
    """What the receiver remembers of one sending member (link thread only)."""

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


class _DropReport:
    """Drops counted per origin and logged at most once per origin per interval: the
    first at once, later ones as one line with the counts since the previous line.
    Link thread only."""

    __slots__ = ("_describe", "_interval", "_origins")

    def __init__(self, describe: Callable[[], str], interval: float) -> None:
        self._describe = describe
        self._interval = interval
        # origin -> [counts by kind, latest reason, when the last line was written]
        self._origins: dict[str, list] = {}

    def add(self, origin: str, kind: str, reason: str, now: float) -> None:
        entry = self._origins.get(origin)
        if entry is None:
            if len(self._origins) >= REPORT_ORIGINS:
                origin = "other origins"
                entry = self._origins.get(origin)
            if entry is None:
                entry = self._origins[origin] = [{}, "", -math.inf]
        counts = entry[0]
        counts[kind] = counts.get(kind, 0) + 1
        entry[1] = reason
        if now - entry[2] >= self._interval:
            self._write(origin, entry, now)

    def flush(self, now: float) -> None:
        """Write what waited for its interval to pass; forget origins quiet for one."""
        for origin, entry in list(self._origins.items()):
            if now - entry[2] < self._interval:
                continue
            if entry[0]:
                self._write(origin, entry, now)
            else:
                del self._origins[origin]

    def _write(self, origin: str, entry: list, now: float) -> None:
        counts, reason, last = entry
        window = "" if last == -math.inf else f" in the last {now - last:.1f} s"
        what = ", ".join(f"{count} {_DROP_LABELS[kind]}" for kind, count in counts.items())
        log.warning("%s: dropped%s from %s: %s (latest: %s)", self._describe(), window, origin, what, reason)
        entry[0] = {}
        entry[2] = now


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


def _peer_address(fd: int) -> str:
    """The remote address of a connection zmq accepted, from the descriptor number in
    its monitor event. Best effort: read a moment after the accept, the descriptor may
    be closed already (or hold a newer connection). The descriptor stays zmq's."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return "an unknown address"
    try:
        address = sock.getpeername()
    except OSError:
        return "an unknown address"
    finally:
        sock.detach()
    return str(address[0]) if isinstance(address, tuple) else "an unknown address"


def _set_tcp_options(sock: zmq.Socket, handshake_ms: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HANDSHAKE_IVL, handshake_ms)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_COUNT)


class RemoteLink:
    """This process's link to its peers on other nodes; see the module docstring.

    `member` is this process's member id (an int in [0, 2**48 - 1], unique in the job and
    never reused); `secret` the job's shared key (>= 32 bytes); `bind_host` the address
    to listen on (required; see "Network set-up"); `port` 0 picks a free port.
    `max_frame_bytes` bounds one frame's payload; `heartbeat_interval_s` is how often
    every connected peer hears from this process. `on_receive()` runs on the link thread
    each time verified frames reach an empty inbox (frames added to a non-empty one were
    announced already and the next `receive()` takes them): it must be quick and must
    not block (ring a doorbell). `advertise_host` replaces the host in `endpoint` (NAT,
    wildcard binds); `send_queue_frames` is each peer's send queue (zmq SNDHWM);
    `max_pending_bytes` bounds what waits in the inbox for `receive()`. `curve` admits
    connections with CurveZMQ keys derived from the secret (see "Admission"; every
    member of a job must agree on it); `handshake_timeout_s` is how long a connection
    may take to finish its handshake before it is closed; drops are logged at most once
    per origin per `report_interval_s`.
    """

    def __init__(
        self,
        member: int,
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
        curve: bool = True,
        handshake_timeout_s: float = 2.0,
        report_interval_s: float = 10.0,
    ) -> None:
        _check_member(member, "member")
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
        handshake_s = check_seconds("handshake_timeout_s", handshake_timeout_s, positive=True)
        report_s = check_seconds("report_interval_s", report_interval_s, positive=True)
        if not isinstance(send_queue_frames, int) or send_queue_frames < 1:
            raise ValueError(f"send_queue_frames={send_queue_frames!r}: expected an int >= 1")
        if not isinstance(max_pending_bytes, int) or max_pending_bytes < max_frame_bytes:
            raise ValueError(f"max_pending_bytes={max_pending_bytes!r}: expected an int >= max_frame_bytes")
        if on_receive is not None and not callable(on_receive):
            raise ValueError(f"on_receive={on_receive!r}: expected a callable or None")
        if curve not in (True, False):
            raise ValueError(f"curve={curve!r}: expected True or False")
        if curve and not zmq.has("curve"):
            raise ValueError(
                f"curve=True: libzmq {zmq.zmq_version()} was built without CURVE; install a pyzmq "
                "wheel (it bundles libsodium) or pass curve=False (HMAC framing only)"
            )

        self.member = member
        self.max_frame_bytes = max_frame_bytes
        self.curve = curve
        self.incarnation = secrets.token_bytes(NONCE_BYTES)
        # With CURVE the channel authenticates every frame and the link adds no MAC.
        self._mac_base = None if curve else hmac.new(bytes(secret), digestmod=hashlib.sha256)
        self._mac_bytes = 0 if curve else MAC_BYTES
        self._curve_keys = curve_keys(secret) if curve else None
        self._handshake_ms = max(1, round(handshake_s * 1000))
        self._on_receive = on_receive
        self._send_queue_frames = send_queue_frames
        self._max_pending_bytes = max_pending_bytes
        self._max_wire_bytes = HEADER_BYTES + max_frame_bytes + self._mac_bytes

        self._peers: dict[int, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._departed: dict[int, None] = {}  # insertion-ordered set, under _peers_lock
        self._forget: list[int] = []  # departed members whose state the link thread drops
        self._sent_before = 0  # sent / dropped by peers since disconnected
        self._dropped_before = 0
        self._sources: dict[int, _Source] = {}
        self._last_heard: dict[int, float] = {}
        self._inbox: list[tuple[int, bytes]] = []
        self._pending_bytes = 0
        self._paused_since: float | None = None
        self._inbox_lock = threading.Lock()
        self._waiters = 0  # threads inside wait()
        self._received = self._restarted = 0
        self._dropped = dict.fromkeys(_DROP_KINDS, 0)
        self._report = _DropReport(lambda: f"link member {self.member} at {self.endpoint}", report_s)
        # From the monitor: descriptor -> (address, event number of its accept), the
        # event numbers of handshakes that succeeded, refusals awaiting their address.
        self._monitor_events = 0
        self._accepted: dict[int, tuple[str, int]] = {}
        self._handshakes: list[int] = []
        self._refusals: collections.deque[str] = collections.deque()
        self._trim_due = False
        self._last_refusal = 0.0
        self._last_error = ""
        self._failure = ""
        self._unknown_dropped = 0
        self._heartbeat_now = False
        self._release_on_exit = False
        self._thread_done = False
        self._released = False
        self._stop = False
        self._closed = False
        self._close_lock = threading.Lock()

        # wake: caller side -> link thread; ready: link thread -> threads inside wait().
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_read, self._ready_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A context is never left to the garbage collector: pyzmq's finalizer terminates it,
        # and in a collection that also holds its sockets the context may be finalized
        # first, its term() then waiting for ever on a socket whose own finalizer comes
        # after it on the same thread. Every path that ends a link closes its sockets and
        # terminates its context itself (`_release`; here, a failed start).
        self._context = zmq.Context(io_threads=1)
        self._zap: zmq.Socket | None = None
        self._pull = self._monitor = None
        url = f"tcp://{bind_host}:{port or '*'}"
        try:
            address = _resolve_bind_host(bind_host)
            url = f"tcp://{_url_host(address)}:{port or '*'}"
            self._pull = self._context.socket(zmq.PULL)
            _set_tcp_options(self._pull, self._handshake_ms)
            self._pull.setsockopt(zmq.MAXMSGSIZE, max(2 * self._max_wire_bytes, MIN_MAX_MESSAGE_BYTES))
            if ":" in address:
                self._pull.setsockopt(zmq.IPV6, 1)
            monitor_url = f"inproc://embxfer-link-monitor-{self.incarnation.hex()}"
            self._monitor = self._context.socket(zmq.PAIR)
            self._monitor.setsockopt(zmq.LINGER, 0)
            self._monitor.setsockopt(zmq.RCVHWM, MONITOR_QUEUE)
            if curve:
                # The ZAP handler must be bound before the first connection arrives.
                self._zap = self._context.socket(zmq.ROUTER)
                self._zap.setsockopt(zmq.LINGER, 0)
                self._zap.bind(ZAP_ENDPOINT)
                self._pull.setsockopt(zmq.CURVE_SERVER, 1)
                self._pull.setsockopt(zmq.CURVE_SECRETKEY, self._curve_keys[1])
                self._pull.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            self._pull.monitor(monitor_url, _MONITOR_EVENTS)
            self._monitor.connect(monitor_url)
            self._pull.bind(url)
        except BaseException as exc:
            for sock in (self._pull, self._monitor, self._zap):
                if sock is not None:
                    sock.close(linger=0)
            self._context.term()
            for fd in (self._wake_read, self._wake_write, self._ready_read, self._ready_write):
                os.close(fd)
            self._released = True
            if isinstance(exc, zmq.ZMQError):
                raise OSError(f"RemoteLink member {member}: cannot bind {bind_host}:{port or 0} ({url}): {exc}") from None
            raise
        bound = self._pull.getsockopt_string(zmq.LAST_ENDPOINT)
        if advertise_host:
            bound = f"tcp://{_url_host(advertise_host)}:{bound.rsplit(':', 1)[1]}"
        self.endpoint: str = bound
        self._thread = threading.Thread(target=self._run, name=f"embxfer-link-m{member}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side

    def connect(self, peers: dict[int, str]) -> None:
        """Connect to each remote peer (member id -> endpoint). Peers may come up in any
        order: zmq retries until the other side is there. Call it again whenever members
        join; a member already connected must keep its endpoint, and a member passed to
        `disconnect()` cannot come back (a restarted process has a new member id)."""
        self._check_open("connect")
        checked: dict[int, str] = {}
        for peer, endpoint in peers.items():
            _check_member(peer, f"RemoteLink member {self.member}: peer")
            if peer == self.member:
                raise ValueError(f"RemoteLink member {self.member}: cannot connect to itself ({endpoint!r})")
            if peer in self._departed:
                raise ValueError(
                    f"RemoteLink member {self.member}: member {peer} was disconnected; member ids are "
                    "not reused (a restarted process joins with a new one)"
                )
            match = _ENDPOINT_RE.match(endpoint) if isinstance(endpoint, str) else None
            if match is None or not 0 < int(match.group(2)) <= 65535 or match.group(1).strip("[]") in _WILDCARDS:
                raise ValueError(
                    f"RemoteLink member {self.member}: peer {peer} endpoint {endpoint!r}: expected tcp://HOST:PORT"
                )
            known = self._peers.get(peer)
            if known is not None and known.endpoint != endpoint:
                raise ValueError(
                    f"RemoteLink member {self.member}: peer {peer} is already connected to {known.endpoint}, "
                    f"not {endpoint}"
                )
            checked[peer] = endpoint
        now = _monotonic()
        for peer, endpoint in checked.items():
            if peer in self._peers:
                continue
            sock = self._context.socket(zmq.PUSH)
            _set_tcp_options(sock, self._handshake_ms)
            sock.setsockopt(zmq.SNDHWM, self._send_queue_frames)
            # Queue only on a completed connection: send() says False instead of piling
            # frames up for a peer that is not there.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            if self._curve_keys is not None:
                public, secret_key = self._curve_keys
                sock.setsockopt(zmq.CURVE_SERVERKEY, public)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
            if endpoint.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise OSError(
                    f"RemoteLink member {self.member}: cannot connect to peer {peer} at {endpoint}: {exc}"
                ) from None
            with self._peers_lock:
                self._peers[peer] = _Peer(peer, endpoint, sock, now, self.member, self.incarnation)
        self._heartbeat_now = True
        self._wake()

    def disconnect(self, peer: int) -> None:
        """Drop a member that died or left: close the PUSH socket to it (frames still
        queued for it are dropped), forget its liveness and replay state, and drop its
        frames from now on (counted in `stats.departed`). Frames of it already in the
        inbox stay there. A member never connected to may be passed too (it only sent
        to this link). Idempotent."""
        self._check_open("disconnect")
        _check_member(peer, f"RemoteLink member {self.member}: peer")
        with self._peers_lock:
            target = self._peers.pop(peer, None)
            self._departed[peer] = None
            while len(self._departed) > DEPARTED_MEMBERS:
                del self._departed[next(iter(self._departed))]
            self._forget.append(peer)
        if target is not None:
            with target.lock:  # a send() or heartbeat on it finishes first
                target.socket.close(linger=0)
                sent, dropped = target.sent, target.dropped
            with self._peers_lock:
                self._sent_before += sent
                self._dropped_before += dropped
        self._wake()

    def send(self, peer: int, frame: bytes) -> bool:
        """Queue one frame for `peer` without waiting; False (counted in
        `stats.send_dropped`, reason in `stats.last_error`) if it cannot be queued now:
        the peer is not connected (yet, or any more) or its queue is full."""
        if self._closed:
            raise RuntimeError(f"RemoteLink member {self.member}: send to peer {peer} after close()")
        size = len(frame)
        if size > self.max_frame_bytes:
            raise ValueError(
                f"RemoteLink member {self.member}: frame of {size} bytes for peer {peer} is over "
                f"max_frame_bytes={self.max_frame_bytes}"
            )
        target = self._peers.get(peer)
        if target is None:
            self._last_error = f"send: peer {peer} is not connected (connect() was not given it, or it departed)"
            with self._peers_lock:
                self._unknown_dropped += 1
            return False
        with target.lock:
            counter = target.counter + 1
            body = target.data_prefix + _COUNTER.pack(counter) + frame
            if self._mac_base is not None:
                mac = self._mac_base.copy()
                mac.update(body)
                body += mac.digest()
            try:
                target.socket.send(body, zmq.NOBLOCK)
            except zmq.Again:
                target.dropped += 1
                self._last_error = (
                    f"send: peer {peer} at {target.endpoint} takes nothing now "
                    f"(not connected, or {self._send_queue_frames} frames queued)"
                )
                return False
            except zmq.ZMQError as exc:  # closed under us by close() or disconnect()
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
        """Every verified frame waiting, as (source member, frame), each source's in the
        order it sent them; [] if none. Never waits."""
        with self._inbox_lock:
            frames, self._inbox = self._inbox, []
            self._pending_bytes = 0
        if self._paused_since is not None:
            self._wake()
        if not frames and self._failure:
            raise RuntimeError(f"RemoteLink member {self.member}: {self._failure}")
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
            # poll, not select: the pipe's number may be above 1023 in a process with
            # many descriptors (a raised RLIMIT_NOFILE).
            poller = select.poll()
            poller.register(self._ready_read, select.POLLIN)
            while not ready:
                if self._closed or self._failure:
                    return False
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    return False
                # Open while this thread is counted in _waiters, even after close().
                poller.poll(math.ceil(remaining * 1000))
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
        member -> one line naming member, endpoint and the silence. Connected peers never
        heard from count from `connect()`; members that only send to this link count from
        their first frame. Members passed to `disconnect()` are not listed."""
        timeout = check_seconds("peer_timeout_s", peer_timeout_s, positive=True)
        paused_since = self._paused_since
        now = _monotonic() if paused_since is None else paused_since
        heard = dict(self._last_heard)
        with self._peers_lock:
            peers = {member: (peer.endpoint, peer.connected_at) for member, peer in self._peers.items()}
            departed = set(self._departed)
        dead: dict[int, str] = {}
        for member in sorted((set(peers) | set(heard)) - departed):
            endpoint, connected_at = peers.get(member, ("(not connected; it sends to this member)", None))
            last = heard.get(member)
            since = last if last is not None else connected_at
            if connected_at is not None and last is not None:
                since = max(last, connected_at)
            silence = now - since
            if silence > timeout:
                what = "silent" if last is not None else "never heard from since connect(), for"
                dead[member] = (
                    f"peer member {member} at {endpoint}: {what} {silence:.1f} s "
                    f"(peer_timeout_s={timeout:g}, seen by member {self.member} at {self.endpoint})"
                )
        return dead

    @property
    def peers(self) -> dict[int, str]:
        """member -> endpoint of every peer connected to."""
        with self._peers_lock:
            return {member: peer.endpoint for member, peer in self._peers.items()}

    @property
    def stats(self) -> LinkStats:
        with self._peers_lock:
            peers = list(self._peers.values())
            sent, dropped = self._sent_before, self._dropped_before + self._unknown_dropped
        dropped_by_kind = self._dropped
        return LinkStats(
            received=self._received,
            sent=sent + sum(peer.sent for peer in peers),
            send_dropped=dropped + sum(peer.dropped for peer in peers),
            forged=dropped_by_kind["forged"],
            replayed=dropped_by_kind["replayed"],
            malformed=dropped_by_kind["malformed"],
            departed=dropped_by_kind["departed"],
            refused=dropped_by_kind["refused"],
            restarted=self._restarted,
            last_error=self._failure or self._last_error,
        )

    def close(self) -> None:
        """Stop the link thread and close every socket with linger 0 (unsent frames are
        dropped). Idempotent; bounded by CLOSE_TIMEOUT_S: a thread that has not stopped by
        then (an on_receive that blocks) closes everything itself when it does."""
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
        with self._close_lock:
            if not self._thread_done:
                # Its PULL socket is still in use (term would wait on it): the thread
                # releases everything itself when it stops (`_run`).
                self._failure = (
                    f"close: link thread did not stop within {CLOSE_TIMEOUT_S} s (is on_receive blocking?)"
                )
                self._release_on_exit = True
                return
        self._release()

    def __enter__(self) -> RemoteLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteLink(member={self.member}, endpoint={self.endpoint!r}, peers={sorted(self._peers)})"

    # -------------------------------------------------------------------- internals

    def _check_open(self, verb: str) -> None:
        if self._closed:
            raise RuntimeError(f"RemoteLink member {self.member}: {verb} after close()")

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
        """Close what the caller side owns, once the link thread has closed its sockets."""
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
            self._pull.close(linger=0)  # stops its monitor too
            self._monitor.close(linger=0)
            if self._zap is not None:
                self._zap.close(linger=0)
            self._wake_waiters()
            with self._close_lock:  # (close() decides under it whether the thread releases)
                self._thread_done = True
                release = self._release_on_exit
            if release:
                self._release()

    def _loop(self) -> None:
        pull, zap, monitor = self._pull, self._zap, self._monitor
        without_pull = zmq.Poller()
        without_pull.register(self._wake_read, zmq.POLLIN)
        without_pull.register(monitor, zmq.POLLIN)
        if zap is not None:
            without_pull.register(zap, zmq.POLLIN)
        with_pull = zmq.Poller()
        for sock in (self._wake_read, monitor, zap, pull):
            if sock is not None:
                with_pull.register(sock, zmq.POLLIN)
        next_heartbeat = _monotonic()
        full = False
        # The bookkeeping comes right after a wake-up and the hand-off of frames comes
        # last, so that between waking a caller and sleeping again this thread runs a
        # few bytecodes only: the caller's reply needs this core and this GIL.
        while True:
            remaining_ms = (next_heartbeat - _monotonic()) * 1000
            events = (without_pull if full else with_pull).poll(max(0, math.ceil(remaining_ms)))
            if self._stop:
                return
            now = _monotonic()
            if self._forget:
                self._forget_departed()
            if now >= next_heartbeat or self._heartbeat_now:
                self._heartbeat_now = False
                self._send_heartbeats()
                self._housekeeping(now)
                next_heartbeat = now + self._interval
            readable = full  # after a pause, look at the socket that was not polled
            for ready, _ in events:
                if ready is pull:
                    readable = True
                elif ready is monitor:
                    self._read_monitor(now)
                elif ready is zap:
                    self._answer_zap()
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
                if self._mac_base is not None:
                    mac = self._mac_base.copy()
                    mac.update(body)
                    body += mac.digest()
                try:
                    peer.socket.send(body, zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue  # not connected, queue full, or disconnected: the peer judges
                peer.counter = counter

    def _housekeeping(self, now: float) -> None:
        """Once per heartbeat interval: the drop report, and memory back after a flood."""
        self._report.flush(now)
        if self._trim_due and now - self._last_refusal >= TRIM_QUIET_S:
            self._trim_due = False
            if _malloc_trim is not None:
                _malloc_trim(0)

    def _forget_departed(self) -> None:
        with self._peers_lock:
            members, self._forget = self._forget, []
        for member in members:
            self._sources.pop(member, None)
            self._last_heard.pop(member, None)

    def _answer_zap(self) -> None:
        """The ZAP handler (RFC 27): admit CURVE clients holding the job's key only."""
        zap = self._zap
        job_key = z85.decode(self._curve_keys[0])
        while True:
            try:
                request = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # routing id, b"", version, request id, domain, address, identity, mechanism, key
            if len(request) < 8:
                continue  # not a ZAP request: libzmq never sends one
            allowed = request[2] == b"1.0" and request[7] == b"CURVE" and request[8:] == [job_key]
            status = (b"200", b"OK") if allowed else (b"400", b"not this job's key")
            zap.send_multipart([request[0], b"", b"1.0", request[3], *status, b"", b""])

    def _read_monitor(self, now: float) -> None:
        """Count refused connections from the PULL socket's monitor events.

        A failed handshake's event comes right before the disconnect of its descriptor,
        whose address was read at accept time. A peer that is not ZMTP at all is cut at
        its greeting with a disconnect alone, as is a member's connection that ends: a
        disconnect without a failure before it is a member's if a handshake succeeded
        after its accept and is not matched to an earlier disconnect yet, else refused.
        """
        monitor, accepted, handshakes = self._monitor, self._accepted, self._handshakes
        for _ in range(MONITOR_BATCH):
            try:
                message = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event, value = _MONITOR_EVENT.unpack_from(message[0])
            self._monitor_events += 1
            if event == zmq.EVENT_ACCEPTED:
                accepted[value] = (_peer_address(value), self._monitor_events)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                handshakes.append(self._monitor_events)
                if len(handshakes) > MAX_MEMBER_CONNECTIONS:
                    del handshakes[0]
            elif event == zmq.EVENT_DISCONNECTED:
                address, since = accepted.pop(value, ("an unknown address", 0))
                if self._refusals:
                    self._report.add(address, "refused", self._refusals.popleft(), now)
                    continue
                later = bisect.bisect_right(handshakes, since)
                if later < len(handshakes):
                    del handshakes[later]  # a member's connection ended
                else:
                    self._refuse(_NOT_ZMTP, now)
                    self._report.add(address, "refused", self._refusals.popleft(), now)
            elif event in _HANDSHAKE_FAILURES:
                if len(self._refusals) >= MONITOR_BATCH:  # their disconnects went missing
                    self._report.add("an unknown address", "refused", self._refusals.popleft(), now)
                self._refuse(_HANDSHAKE_FAILURES[event], now)

    def _refuse(self, reason: str, now: float) -> None:
        self._dropped["refused"] += 1
        self._last_error = f"accept: {reason}"
        self._refusals.append(reason)
        self._last_refusal = now
        self._trim_due = True

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

    def _drop(self, kind: str, origin: str, reason: str) -> None:
        self._dropped[kind] += 1
        self._last_error = f"receive: {reason}"
        self._report.add(origin, kind, reason, _monotonic())

    def _verify(self, data: bytes) -> tuple[int, bytes] | None:
        """(source, payload) of a verified data frame; None for a heartbeat or a drop."""
        size = len(data)
        mac_bytes = self._mac_bytes
        if size < HEADER_BYTES + mac_bytes or size > self._max_wire_bytes:
            self._drop(
                "malformed", "frames without a header",
                f"malformed frame of {size} bytes (expected {HEADER_BYTES + mac_bytes} to "
                f"{self._max_wire_bytes}, max_frame_bytes={self.max_frame_bytes})",
            )
            return None
        magic, version, kind, reserved, source, destination, incarnation, counter = HEADER.unpack_from(data)
        if (
            magic != MAGIC
            or version != VERSION
            or kind not in (KIND_DATA, KIND_HEARTBEAT)
            or reserved
            or source > MAX_MEMBER
            or destination > MAX_MEMBER
            or (kind == KIND_HEARTBEAT and size != HEADER_BYTES + mac_bytes)
        ):
            self._drop(
                "malformed", f"member {source}" if source <= MAX_MEMBER else "frames without a header",
                f"malformed header claiming member {source} (magic {magic!r}, version "
                f"{version}, kind {kind}, reserved {reserved}, {size} bytes)",
            )
            return None
        if self._mac_base is not None:
            mac = self._mac_base.copy()
            mac.update(memoryview(data)[: size - mac_bytes])
            if not hmac.compare_digest(mac.digest(), data[size - mac_bytes :]):
                self._drop(
                    "forged", f"member {source}", f"bad MAC on a frame claiming member {source} (forged or tampered)"
                )
                return None
        if destination != self.member or source == self.member:
            self._drop(
                "forged", f"member {source}",
                f"frame from member {source} to member {destination} arrived at member "
                f"{self.member} ({self.endpoint}); dropped",
            )
            return None
        if source in self._departed:
            self._drop("departed", f"member {source}", f"frame from member {source}, which was disconnected")
            return None
        state = self._sources.get(source)
        if state is None:
            self._sources[source] = _Source(incarnation, counter)
        elif incarnation == state.incarnation:
            if counter <= state.counter:
                self._drop(
                    "replayed", f"member {source}",
                    f"replay from member {source}: counter {counter} <= {state.counter} already accepted",
                )
                return None
            state.counter = counter
        elif incarnation in state.retired:
            self._drop(
                "replayed", f"member {source}",
                f"replay of a retired incarnation of member {source} (counter {counter})",
            )
            return None
        else:
            state.retire_current(incarnation, counter)
            self._restarted += 1
        self._last_heard[source] = _monotonic()
        if kind == KIND_HEARTBEAT:
            return None
        return source, data[HEADER_BYTES : size - mac_bytes]


__all__ = [
    "HEADER", "HEADER_BYTES", "MAC_BYTES", "MAX_MEMBER", "LinkStats", "RemoteLink", "curve_keys",
    "raise_open_files_limit",
]
