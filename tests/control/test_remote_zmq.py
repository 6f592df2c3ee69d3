"""RemoteLink within one process: round trips in order, every bad frame dropped, counted
and logged while good traffic goes on, connections without the job's key refused, members
that join and leave, liveness, bounds, clean close, idle CPU."""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import re
import secrets
import socket
import threading
import time

import pytest
import zmq

from embxfer.control import remote
from embxfer.control.remote import (
    HEADER_BYTES,
    MAC_BYTES,
    MAX_MEMBER,
    MIN_MAX_MESSAGE_BYTES,
    RemoteLink,
    curve_keys,
    raise_open_files_limit,
)

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
MAX_FRAME = 256


@pytest.fixture
def secret() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def make_link(secret):
    """RemoteLink factory; every link is closed after the test, pass or fail."""
    links: list[RemoteLink] = []

    def make(rank: int, **options) -> RemoteLink:
        options.setdefault("max_frame_bytes", MAX_FRAME)
        options.setdefault("heartbeat_interval_s", 0.1)
        link = RemoteLink(rank, options.pop("secret", secret), HOST, **options)
        links.append(link)
        return link

    yield make
    for link in links:
        link.close()


@pytest.fixture
def raw_sockets():
    """Plain zmq sockets standing in for a hostile or recording peer; closed afterwards.
    With `secret`, the socket holds the job's CURVE keys (a PULL serves them, a PUSH
    presents them): past admission, only the HMAC framing stands in its way."""
    context = zmq.Context()
    sockets: list[zmq.Socket] = []

    def make(kind: int, secret: bytes | None = None) -> zmq.Socket:
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if secret is not None:
            public, secret_key = curve_keys(secret)
            if kind == zmq.PULL:
                sock.setsockopt(zmq.CURVE_SERVER, 1)
            else:
                sock.setsockopt(zmq.CURVE_SERVERKEY, public)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
        sockets.append(sock)
        return sock

    yield make
    for sock in sockets:
        sock.close(linger=0)
    context.term()


def _pair(make_link, **options) -> tuple[RemoteLink, RemoteLink]:
    a, b = make_link(0, **options), make_link(1, **options)
    a.connect({1: b.endpoint})
    b.connect({0: a.endpoint})
    return a, b


def _send(link: RemoteLink, peer: int, frame: bytes, timeout: float = 5.0) -> None:
    """Send, retrying while the TCP connection comes up (send never waits by itself)."""
    deadline = time.monotonic() + timeout
    while not link.send(peer, frame):
        assert time.monotonic() < deadline, f"send to {peer} kept failing: {link.stats.last_error}"
        time.sleep(0.002)


def _collect(link: RemoteLink, count: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    frames: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"got {len(frames)} of {count} frames; stats {link.stats}"
        link.wait(remaining)
        frames += link.receive()
    return frames


def _until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _record_wire(make_link, raw_sockets, secret, destination: int, frames: list[bytes], curve: bool = True) -> list[bytes]:
    """Wire messages of a member-0 link to `destination`, recorded by a raw PULL socket
    posing as that destination (with the job's CURVE keys when `curve`; heartbeats left
    out). With curve=False they are signed."""
    recorder = raw_sockets(zmq.PULL, secret if curve else None)
    recorder.bind(f"tcp://{HOST}:*")
    sender = make_link(0, heartbeat_interval_s=5.0, curve=curve)
    sender.connect({destination: recorder.getsockopt_string(zmq.LAST_ENDPOINT)})
    for frame in frames:
        _send(sender, destination, frame)
    wire = []
    while len(wire) < len(frames):
        assert recorder.poll(5000), "the recorder got nothing"
        message = recorder.recv()
        if message[5] == 1:  # kind: data
            wire.append(message)
    sender.close()
    return wire


def test_round_trip_in_one_process_in_order(make_link):
    a, b = _pair(make_link)
    assert a.endpoint.startswith(f"tcp://{HOST}:") and a.endpoint != b.endpoint
    frames = [b"", bytes(MAX_FRAME)] + [i.to_bytes(4, "little") * (i % 50) for i in range(300)]
    _send(a, 1, frames[0])
    for frame in frames[1:]:
        _send(a, 1, frame)
    assert _collect(b, len(frames)) == [(0, frame) for frame in frames]
    for frame in frames[:50]:
        _send(b, 0, frame)
    assert _collect(a, 50) == [(1, frame) for frame in frames[:50]]
    assert b.receive() == [] and not b.wait(0.0)
    stats_a, stats_b = a.stats, b.stats
    assert (stats_a.sent, stats_a.received, stats_b.sent, stats_b.received) == (len(frames), 50, 50, len(frames))
    assert stats_b.forged == stats_b.replayed == stats_b.malformed == 0, stats_b


def test_each_sources_frames_arrive_in_its_order(make_link):
    """Member ids span 48 bits: the smallest, a large one and the largest."""
    receiver = make_link(2**40 + 9)
    senders = [make_link(member) for member in (0, 2**33 + 1, MAX_MEMBER)]
    for sender in senders:
        sender.connect({receiver.member: receiver.endpoint})
        _send(sender, receiver.member, b"start")
    for index in range(200):  # interleaved, as three peers on other nodes would send
        for sender in senders:
            _send(sender, receiver.member, sender.member.to_bytes(8, "little") + index.to_bytes(4, "little"))
    frames = _collect(receiver, 3 * 201)
    for sender in senders:
        mine = [frame for source, frame in frames if source == sender.member]
        assert mine == [b"start"] + [sender.member.to_bytes(8, "little") + i.to_bytes(4, "little") for i in range(200)]


def test_on_receive_rings_and_wait_wakes(make_link):
    rung = threading.Event()
    a = make_link(0)
    b = make_link(1, on_receive=rung.set)
    a.connect({1: b.endpoint})
    assert not b.wait(0.05)
    _send(a, 1, b"ping")
    assert rung.wait(5) and b.wait(5) and b.pending == 1
    assert b.receive() == [(0, b"ping")] and b.pending == 0

    # A waiter on another thread is woken by a frame, and by close().
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(b.wait(10.0)))
    waiter.start()
    time.sleep(0.05)
    _send(a, 1, b"pong")
    waiter.join(5)
    assert result == [True]
    b.receive()
    waiter = threading.Thread(target=lambda: result.append(b.wait(10.0)))
    waiter.start()
    time.sleep(0.05)
    started = time.monotonic()
    b.close()
    waiter.join(5)
    assert result == [True, False] and time.monotonic() - started < 2


def test_send_without_a_peer_returns_false_and_counts(make_link):
    a = make_link(0)
    assert a.send(7, b"x") is False
    assert "peer 7 is not connected" in a.stats.last_error
    # A port where nobody listens (bound, never listening): refused, zmq keeps retrying.
    with socket.socket() as reserved:
        reserved.bind((HOST, 0))
        endpoint = f"tcp://{HOST}:{reserved.getsockname()[1]}"
        a.connect({3: endpoint})
        started = time.perf_counter()
        assert a.send(3, b"x") is False
        assert time.perf_counter() - started < 0.05  # never waits on the network
    stats = a.stats
    assert (stats.sent, stats.send_dropped) == (0, 2)
    assert endpoint in stats.last_error and "peer 3" in stats.last_error


def test_without_curve_forged_tampered_replayed_and_misrouted_frames_are_dropped_and_counted(
    make_link, raw_sockets, secret
):
    """curve=False: anyone may connect, and the HMAC framing alone decides."""
    wire = _record_wire(make_link, raw_sockets, secret, destination=1, frames=[b"first", b"second"], curve=False)
    receiver = make_link(1, curve=False)
    intruder = raw_sockets(zmq.PUSH)
    intruder.connect(receiver.endpoint)

    # Signed with another secret, not signed at all, and one payload byte flipped.
    body = wire[0][:-MAC_BYTES]
    tampered = bytearray(wire[0])
    tampered[HEADER_BYTES] ^= 0x01
    for message in (body + hmac.digest(secrets.token_bytes(32), body, "sha256"), body + bytes(MAC_BYTES), tampered):
        intruder.send(bytes(message))
    _until(lambda: receiver.stats.forged == 3, what="three forged frames counted")
    assert "bad MAC on a frame claiming member 0" in receiver.stats.last_error

    # The recorded frames once (accepted, in order), then again (replays).
    for message in wire + wire:
        intruder.send(message)
    assert _collect(receiver, 2) == [(0, b"first"), (0, b"second")]
    _until(lambda: receiver.stats.replayed == 2, what="two replays counted")
    assert "replay from member 0" in receiver.stats.last_error

    # The same signed frame delivered to member 2: right secret, wrong destination.
    other = make_link(2, curve=False)
    misroute = raw_sockets(zmq.PUSH)
    misroute.connect(other.endpoint)
    misroute.send(wire[0])
    _until(lambda: other.stats.forged == 1, what="the misrouted frame counted")
    assert "to member 1 arrived at member 2" in other.stats.last_error

    # Valid traffic goes on from a real peer after all that.
    sender = make_link(3, curve=False)
    sender.connect({1: receiver.endpoint})
    _send(sender, 1, b"still here")
    assert _collect(receiver, 1) == [(3, b"still here")]
    stats = receiver.stats
    assert (stats.received, stats.forged, stats.replayed, stats.malformed, stats.refused) == (3, 3, 2, 0, 0), stats
    assert other.receive() == []


def test_with_curve_outsiders_are_refused_and_a_member_gone_wrong_cannot_replay_or_misroute(
    make_link, raw_sockets, secret
):
    wire = _record_wire(make_link, raw_sockets, secret, destination=1, frames=[b"first", b"second"])
    receiver = make_link(1)
    outsider = raw_sockets(zmq.PUSH)  # no keys: its handshake fails, nothing gets through
    outsider.connect(receiver.endpoint)
    for message in wire:
        outsider.send(message)
    _until(lambda: receiver.stats.refused >= 1, what="the outsider refused")
    insider = raw_sockets(zmq.PUSH, secret)  # the job's keys: only the frames' own checks remain
    insider.connect(receiver.endpoint)
    for message in wire + wire:
        insider.send(message)
    assert _collect(receiver, 2) == [(0, b"first"), (0, b"second")]
    _until(lambda: receiver.stats.replayed == 2, what="two replays counted")
    other = make_link(2)
    misroute = raw_sockets(zmq.PUSH, secret)
    misroute.connect(other.endpoint)
    misroute.send(wire[0])
    _until(lambda: other.stats.forged == 1, what="the misrouted frame counted")
    assert "to member 1 arrived at member 2" in other.stats.last_error
    stats = receiver.stats
    assert (stats.received, stats.forged, stats.replayed, stats.malformed) == (2, 0, 2, 0), stats
    assert receiver.receive() == [] and other.receive() == []


def test_malformed_and_oversized_messages_are_dropped(make_link, raw_sockets, secret):
    receiver = make_link(1)
    intruder = raw_sockets(zmq.PUSH, secret)
    intruder.connect(receiver.endpoint)
    longest = HEADER_BYTES + MAX_FRAME  # with CURVE the link adds no MAC
    for garbage in (b"", b"garbage", bytes(HEADER_BYTES), bytes(longest + 1)):
        intruder.send(garbage)
    _until(lambda: receiver.stats.malformed == 4, what="four malformed messages counted")
    assert "malformed" in receiver.stats.last_error
    assert receiver.receive() == []


def test_oversized_messages_never_reach_python(make_link, raw_sockets, secret):
    receiver = make_link(1)
    intruder = raw_sockets(zmq.PUSH, secret)
    intruder.connect(receiver.endpoint)
    intruder.send(bytes(max(2 * (HEADER_BYTES + MAX_FRAME), MIN_MAX_MESSAGE_BYTES) + 1))  # over MAXMSGSIZE
    sender = make_link(0)
    sender.connect({1: receiver.endpoint})
    _send(sender, 1, b"after the flood")
    assert _collect(receiver, 1) == [(0, b"after the flood")]
    assert receiver.stats.malformed == 0  # zmq cut that connection; Python never saw it
    with pytest.raises(ValueError, match="over max_frame_bytes"):
        sender.send(1, bytes(MAX_FRAME + 1))


def test_a_restarted_sender_needs_a_fresh_incarnation(make_link, raw_sockets, secret):
    wire = _record_wire(make_link, raw_sockets, secret, destination=1, frames=[b"old life"])
    receiver = make_link(1)
    intruder = raw_sockets(zmq.PUSH, secret)
    intruder.connect(receiver.endpoint)
    intruder.send(wire[0])
    assert _collect(receiver, 1) == [(0, b"old life")]
    reborn = make_link(0)  # same rank, new nonce: a restart
    reborn.connect({1: receiver.endpoint})
    _send(reborn, 1, b"new life")
    assert _collect(receiver, 1) == [(0, b"new life")]
    intruder.send(wire[0])  # the old incarnation's frame, once more
    _until(lambda: receiver.stats.replayed == 1, what="the retired incarnation refused")
    assert "retired incarnation of member 0" in receiver.stats.last_error
    assert receiver.stats.restarted == 1 and receiver.receive() == []


def test_connections_without_the_jobs_keys_are_refused_and_counted(make_link, raw_sockets, secret):
    receiver = make_link(1)
    # zmq without keys (NULL), another job's link, the job's server key with a client
    # key of one's own, and bytes that are not ZMTP at all.
    plain = raw_sockets(zmq.PUSH)
    plain.connect(receiver.endpoint)
    plain.send(b"hello")
    stranger = make_link(0, secret=secrets.token_bytes(32))
    stranger.connect({1: receiver.endpoint})
    impostor = raw_sockets(zmq.PUSH)
    public, secret_key = zmq.curve_keypair()
    impostor.setsockopt(zmq.CURVE_SERVERKEY, curve_keys(secret)[0])
    impostor.setsockopt(zmq.CURVE_PUBLICKEY, public)
    impostor.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
    impostor.connect(receiver.endpoint)
    host, port = receiver.endpoint[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as garbage:
        garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
        _until(lambda: receiver.stats.refused >= 4, what="four kinds of refusal")
    assert not stranger.send(1, b"let me in")  # its handshake never completes
    member = make_link(2)
    member.connect({1: receiver.endpoint})
    _send(member, 1, b"a member")
    assert _collect(receiver, 1) == [(2, b"a member")]
    stats = receiver.stats
    assert stats.received == 1 and stats.forged == stats.malformed == stats.replayed == 0, stats
    assert stats.last_error.startswith("accept: ")


def test_drops_are_logged_once_per_origin_per_interval(make_link, raw_sockets, secret, caplog):
    caplog.set_level(logging.WARNING, logger="embxfer.control.remote")
    interval = 0.5
    wire = _record_wire(make_link, raw_sockets, secret, destination=1, frames=[b"x"], curve=False)
    receiver = make_link(1, report_interval_s=interval, curve=False)
    intruder = raw_sockets(zmq.PUSH)
    intruder.connect(receiver.endpoint)
    tampered = bytearray(wire[0])
    tampered[HEADER_BYTES] ^= 0x01
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < 3 * interval:  # forged frames claiming member 0, and garbage
        intruder.send(bytes(tampered))
        intruder.send(b"garbage")
        sent += 1
        time.sleep(0.005)
    _until(lambda: receiver.stats.forged == sent and receiver.stats.malformed == sent, what="every drop counted")
    time.sleep(interval + 0.3)  # the last interval's line
    elapsed = time.monotonic() - started
    lines: dict[str, list[str]] = {}
    for record in caplog.records:
        message = record.getMessage()
        origin = re.search(r" from (.+?): ", message)
        if message.startswith(f"link member 1 at {receiver.endpoint}: dropped") and origin:
            lines.setdefault(origin[1], []).append(message)
    assert set(lines) == {"member 0", "frames without a header"}, lines
    for origin, kind in (("member 0", "forged"), ("frames without a header", "malformed")):
        assert len(lines[origin]) <= math.ceil(elapsed / interval) + 1, lines[origin]
        counted = sum(int(re.search(rf"(\d+) {kind} frames", line)[1]) for line in lines[origin])
        assert counted == sent, (origin, counted, sent, lines[origin])
    assert "in the last 0." in lines["member 0"][1] and "bad MAC" in lines["member 0"][0]


def test_members_join_and_depart_at_any_time(make_link):
    a, b = _pair(make_link)
    _send(a, 1, b"before")
    assert _collect(b, 1) == [(0, b"before")]
    _send(b, 0, b"reply")
    assert _collect(a, 1) == [(1, b"reply")]
    b.disconnect(0)
    b.disconnect(0)  # idempotent
    b.disconnect(12345)  # never connected: only remembered as departed
    assert b.peers == {} and not b.send(0, b"to the departed")
    assert "peer 0 is not connected" in b.stats.last_error
    _send(a, 1, b"late")
    _until(lambda: b.stats.departed >= 1, what="a departed member's frame dropped")
    time.sleep(0.3)  # heartbeats of the departed are dropped too, and do not keep it listed
    assert b.receive() == [] and b.dead_peers(0.1) == {}
    assert "which was disconnected" in b.stats.last_error
    with pytest.raises(ValueError, match="member ids are not reused"):
        b.connect({0: a.endpoint})
    stats = b.stats
    assert (stats.sent, stats.received, stats.forged, stats.replayed) == (1, 1, 0, 0), stats
    # A member joining later is connected incrementally and talks both ways.
    c = make_link(2**47 + 3)
    c.connect({1: b.endpoint})
    b.connect({c.member: c.endpoint})
    _send(c, 1, b"newcomer")
    _send(b, c.member, b"welcome")
    assert _collect(b, 1) == [(c.member, b"newcomer")] and _collect(c, 1) == [(1, b"welcome")]
    assert b.peers == {c.member: c.endpoint}


def test_member_ids_are_checked(make_link, secret):
    options = {"max_frame_bytes": 64, "heartbeat_interval_s": 0.5}
    for bad in (-1, 2**48, True, 1.0, "1"):
        with pytest.raises(ValueError, match="expected a member id"):
            RemoteLink(bad, secret, HOST, **options)
    link = make_link(MAX_MEMBER)
    for bad in (-1, 2**48, True):
        with pytest.raises(ValueError, match="expected a member id"):
            link.connect({bad: "tcp://127.0.0.1:5000"})
        with pytest.raises(ValueError, match="expected a member id"):
            link.disconnect(bad)


def test_open_files_limit_is_raised_once_and_high_descriptors_work(make_link):
    import resource

    before, now = raise_open_files_limit()
    assert raise_open_files_limit() == (before, now)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == now >= before and (hard == resource.RLIM_INFINITY or now == hard)
    if soft < 1200:
        pytest.skip(f"RLIMIT_NOFILE {soft}: no room for descriptors above 1023")
    # wait() parks on a pipe: a link made when numbers above 1023 are in use still waits
    # (select.select would refuse them).
    spare: list[int] = []
    try:
        while not spare or spare[-1] < 1030:
            spare.append(os.dup(0))
        a, b = _pair(make_link)
        assert min(b._ready_read, b._wake_read) > 1023
        assert not b.wait(0.01)
        _send(a, 1, b"high")
        assert b.wait(5) and b.receive() == [(0, b"high")]
    finally:
        for fd in spare:
            os.close(fd)


def test_a_closed_link_is_reported_dead_and_the_others_go_on(make_link):
    interval, timeout = 0.1, 0.5
    a, b, c = (make_link(rank, heartbeat_interval_s=interval) for rank in range(3))
    for link in (a, b, c):
        link.connect({other.member: other.endpoint for other in (a, b, c) if other is not link})
    time.sleep(2 * timeout)
    assert a.dead_peers(timeout) == {} and b.dead_peers(timeout) == {}
    c_endpoint = c.endpoint
    c.close()  # a network cut, as far as a and b can tell
    cut = time.monotonic()
    _until(lambda: 2 in a.dead_peers(timeout) and 2 in b.dead_peers(timeout), timeout=5, what="c reported dead")
    assert time.monotonic() - cut <= timeout + interval + 0.3
    reason = a.dead_peers(timeout)[2]
    assert reason.startswith(f"peer member 2 at {c_endpoint}: silent ") and "peer_timeout_s=0.5" in reason
    assert set(a.dead_peers(timeout)) == {2}
    _send(a, 1, b"a to b")
    assert _collect(b, 1) == [(0, b"a to b")]
    assert not a.send(2, b"to the dead")  # its connection is gone: refused, not queued


def test_a_peer_never_heard_from_counts_from_connect(make_link):
    a = make_link(0)
    with socket.socket() as reserved:
        reserved.bind((HOST, 0))
        a.connect({5: f"tcp://{HOST}:{reserved.getsockname()[1]}"})
        connected = time.monotonic()
        assert a.dead_peers(0.3) == {}
        _until(lambda: 5 in a.dead_peers(0.3), what="rank 5 reported")
        assert time.monotonic() - connected >= 0.3
        assert "never heard from since connect()" in a.dead_peers(0.3)[5]


def test_a_full_inbox_pushes_back_without_losing_frames_or_liveness(make_link):
    size = 16384
    a = make_link(0, max_frame_bytes=size, send_queue_frames=4)
    b = make_link(1, max_frame_bytes=size, max_pending_bytes=2 * size)
    a.connect({1: b.endpoint})
    b.connect({0: a.endpoint})
    _send(a, 1, b"hello")
    _until(lambda: b.pending == 1, what="first frame")
    dropped_before = a.stats.send_dropped  # while the connection came up
    sent, refused = 0, 0
    deadline = time.monotonic() + 10
    while refused < 20 and time.monotonic() < deadline:  # b's caller takes nothing meanwhile
        if a.send(1, sent.to_bytes(4, "little") * (size // 4)):
            sent += 1
        else:
            refused += 1
            time.sleep(0.002)
    assert refused == 20, (sent, a.stats)  # the queue filled up: send said so, did not wait
    time.sleep(0.5)
    assert b.dead_peers(0.3) == {}  # not reading is b's doing, not a's silence
    frames = b.receive()
    frames += _collect(b, sent + 1 - len(frames), timeout=10)
    assert [frame for _, frame in frames] == [b"hello"] + [i.to_bytes(4, "little") * (size // 4) for i in range(sent)]
    assert a.stats.send_dropped - dropped_before == refused


def test_arguments_are_checked(make_link, secret):
    options = {"max_frame_bytes": 64, "heartbeat_interval_s": 0.5}
    with pytest.raises(ValueError, match="listens on every interface"):
        RemoteLink(0, secret, "0.0.0.0", **options)
    with pytest.raises(ValueError, match="listens on every interface"):
        RemoteLink(0, secret, "*", **options)
    with pytest.raises(ValueError, match="secret: expected >= 32 bytes"):
        RemoteLink(0, secret[:16], HOST, **options)
    with pytest.raises(ValueError, match="heartbeat_interval_s"):
        RemoteLink(0, secret, HOST, max_frame_bytes=64, heartbeat_interval_s=math.inf)
    with pytest.raises(OSError, match=r"cannot bind 203\.0\.113\.1:4242"):
        RemoteLink(0, secret, "203.0.113.1", 4242, **options)
    link = make_link(0)
    with pytest.raises(OSError, match=r"cannot bind 127\.0\.0\.1:\d+"):
        RemoteLink(1, secret, HOST, int(link.endpoint.rsplit(":", 1)[1]), **options)
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="timeout="):
            link.wait(bad)
        with pytest.raises(ValueError, match="peer_timeout_s="):
            link.dead_peers(bad)
    with pytest.raises(ValueError, match="cannot connect to itself"):
        link.connect({0: link.endpoint})
    for endpoint in ("127.0.0.1:5000", "tcp://127.0.0.1", "tcp://*:5000", "ipc:///tmp/x"):
        with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
            link.connect({1: endpoint})
    with RemoteLink(2, secret, "0.0.0.0", advertise_host="10.1.2.3", **options) as everywhere:
        assert everywhere.endpoint.startswith("tcp://10.1.2.3:")


def test_close_is_idempotent_and_leaves_no_thread_or_fd(make_link, secret):
    before = set(threading.enumerate())
    fds_before = sorted(os.listdir("/proc/self/fd"))
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(RemoteLink(0, secret, HOST, max_frame_bytes=64, heartbeat_interval_s=0.05))
        b = stack.enter_context(RemoteLink(1, secret, HOST, max_frame_bytes=64, heartbeat_interval_s=0.05))
        a.connect({1: b.endpoint})
        b.connect({0: a.endpoint})
        _send(a, 1, b"x")
        assert _collect(b, 1) == [(0, b"x")]
        assert len(set(threading.enumerate()) - before) == 2
        waiter = threading.Thread(target=b.wait, args=(10.0,))
        waiter.start()  # still waiting when the link closes
        time.sleep(0.05)
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    waiter.join(5)
    assert set(threading.enumerate()) - before == set()
    assert sorted(os.listdir("/proc/self/fd")) == fds_before  # sockets, pipes, zmq's own
    a.close()
    b.close()
    with pytest.raises(RuntimeError, match="after close"):
        a.send(1, b"x")
    assert not a.wait(0.0)


def test_a_close_that_gives_up_on_its_thread_leaves_the_release_to_it(make_link, monkeypatch, secret):
    """close() waits CLOSE_TIMEOUT_S for the link thread, then returns (here the thread is
    inside an on_receive that blocks). The thread, when it stops, closes the sockets and
    terminates the context itself: left to the garbage collector, the context's finalizer
    could run before its last socket's and wait in term() for ever (what a loaded test run
    showed)."""
    monkeypatch.setattr(remote, "CLOSE_TIMEOUT_S", 0.2)
    inside, go_on = threading.Event(), threading.Event()

    def on_receive() -> None:
        inside.set()
        go_on.wait(10)

    a = make_link(0)
    b = RemoteLink(1, secret, HOST, max_frame_bytes=MAX_FRAME, heartbeat_interval_s=0.1, on_receive=on_receive)
    thread = b._thread
    try:
        a.connect({1: b.endpoint})
        b.connect({0: a.endpoint})
        _send(a, 1, b"x")
        assert inside.wait(5)
        b.close()
        assert thread.is_alive() and "did not stop within 0.2 s" in b.stats.last_error
        assert not b._released and not b._context.closed  # (its thread still uses them)
    finally:
        go_on.set()
    thread.join(5)
    assert not thread.is_alive()
    assert b._released and b._context.closed, "the context was left to the garbage collector"


def test_a_link_that_fails_to_start_closes_what_it_opened(monkeypatch, secret):
    """Any failure once the context exists (not only a bind) closes its sockets and pipes
    and terminates it: nothing is left for the garbage collector."""
    def broken(sock, handshake_ms):
        raise RuntimeError("setsockopt failed")

    fds_before = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(remote, "_set_tcp_options", broken)
    with pytest.raises(RuntimeError, match="setsockopt failed"):
        RemoteLink(0, secret, HOST, max_frame_bytes=64, heartbeat_interval_s=0.05)
    assert sorted(os.listdir("/proc/self/fd")) == fds_before


def test_close_from_on_receive_does_not_deadlock(make_link, secret):
    before = set(threading.enumerate())
    holder: list[RemoteLink] = []
    b = RemoteLink(1, secret, HOST, max_frame_bytes=64, heartbeat_interval_s=0.1, on_receive=lambda: holder[0].close())
    holder.append(b)
    try:
        a = make_link(0)
        a.connect({1: b.endpoint})
        _send(a, 1, b"bye")
        _until(lambda: not b._thread.is_alive(), what="b's thread gone")
        assert set(threading.enumerate()) - before == {a._thread}
    finally:
        b.close()


IDLE_CHILD = """
import secrets, sys, time
from embxfer.control.remote import RemoteLink
key = secrets.token_bytes(32)
a = RemoteLink(0, key, "127.0.0.1", max_frame_bytes=4096, heartbeat_interval_s=0.5)
b = RemoteLink(1, key, "127.0.0.1", max_frame_bytes=4096, heartbeat_interval_s=0.5)
a.connect({1: b.endpoint}); b.connect({0: a.endpoint})
time.sleep(0.3)
windows = []
for _ in range(2):  # the least of two windows: the VM's noise only inflates one
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(3.0)
    windows.append((time.process_time() - cpu) / (time.monotonic() - wall))
used = min(windows)
alive = a.dead_peers(1.5) == {} and b.dead_peers(1.5) == {}
a.close(); b.close()
print(used, alive)
"""


def test_an_idle_link_uses_little_cpu():
    """Measured in a process of its own: threads other tests left running in this one
    (and the test runner) would be counted too."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", IDLE_CHILD], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr[-800:]
    used, alive = out.stdout.split()
    # Both ends of the link live in that process: a process with one link uses half. The
    # bound, 2 % of a core, is twice the one this test had: two full CI runs of the
    # thirteenth session's VM gave 1.07-1.20 % (0.1 % in bench/results/ring-NOTES.md); a
    # link thread that spins uses a whole core.
    assert float(used) < 0.02, f"two idle links used {float(used):.2%} of a core"
    assert alive == "True"
