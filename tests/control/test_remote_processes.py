"""RemoteLink between two processes: a round trip in order; heartbeats keep a peer whose
caller stalls (sleeps, then runs Python) alive; a SIGKILLed peer is reported within
peer_timeout_s plus one heartbeat interval. Children are plain subprocesses with hard
deadlines on every read, killed and reaped whatever happens."""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time

import pytest

from embxfer.control.remote import RemoteLink

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"

# The peer process: echoes every frame to its sender; b"stall:S:B" makes its caller
# sleep S seconds and then run a Python loop for B seconds (calling nothing of the
# link) before it answers b"stalled"; b"stop" ends it. It talks to the test on stdio.
CHILD = r"""
import sys, time
from embxfer.control.remote import RemoteLink

rank, interval = int(sys.argv[1]), float(sys.argv[2])
secret = bytes.fromhex(sys.stdin.readline())
with RemoteLink(rank, secret, "127.0.0.1", max_frame_bytes=1024, heartbeat_interval_s=interval) as link:
    print(link.endpoint, flush=True)
    peer, endpoint = sys.stdin.readline().split()
    link.connect({int(peer): endpoint})

    def reply(source, frame):
        deadline = time.monotonic() + 10
        while not link.send(source, frame):
            if time.monotonic() > deadline:
                sys.exit(f"child: cannot answer rank {source}: {link.stats.last_error}")
            time.sleep(0.001)

    quiet_until = time.monotonic() + 25
    while time.monotonic() < quiet_until:
        if not link.wait(1.0):
            continue
        for source, frame in link.receive():
            if frame == b"stop":
                print(f"received {link.stats.received}", flush=True)
                sys.exit(0)
            if frame.startswith(b"stall:"):
                sleep_s, busy_s = map(float, frame.split(b":")[1:])
                time.sleep(sleep_s)
                busy_until = time.monotonic() + busy_s
                while time.monotonic() < busy_until:
                    sum(range(1000))
                reply(source, b"stalled")
            else:
                reply(source, frame)
"""


class Child:
    def __init__(self, rank: int, secret: bytes, interval: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(rank), str(interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.process.stdin.write(secret.hex() + "\n")
        self.process.stdin.flush()
        self.endpoint = self.readline(15.0)

    def readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"child {self.process.pid} said nothing for {timeout} s"
        line = self.process.stdout.readline()
        assert line, f"child {self.process.pid} exited with {self.process.wait(5)}"
        return line.strip()

    def connect(self, rank: int, endpoint: str) -> None:
        self.process.stdin.write(f"{rank} {endpoint}\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


@pytest.fixture
def pair():
    """(this process's link, the child) connected both ways; both closed afterwards."""
    made = []

    def make(interval: float) -> tuple[RemoteLink, Child]:
        secret = secrets.token_bytes(32)
        link = RemoteLink(0, secret, HOST, max_frame_bytes=1024, heartbeat_interval_s=interval)
        made.append(link)
        child = Child(1, secret, interval)
        made.append(child)
        link.connect({1: child.endpoint})
        child.connect(0, link.endpoint)
        return link, child

    yield make
    for thing in reversed(made):
        if isinstance(thing, Child):
            thing.kill()
        else:
            thing.close()


def _send(link: RemoteLink, frame: bytes) -> None:
    deadline = time.monotonic() + 10
    while not link.send(1, frame):
        assert time.monotonic() < deadline, link.stats.last_error
        time.sleep(0.002)


def _receive(link: RemoteLink, count: int, timeout: float) -> list[bytes]:
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(frames)} of {count} frames; {link.stats}"
        link.wait(min(remaining, 0.5))
        for source, frame in link.receive():
            assert source == 1
            frames.append(frame)
    return frames


def test_round_trip_between_two_processes(pair):
    link, child = pair(0.2)
    frames = [os.urandom(index % 1000) for index in range(200)]
    for frame in frames:
        _send(link, frame)
    assert _receive(link, len(frames), timeout=15) == frames
    _send(link, b"stop")
    assert child.readline(10) == f"received {len(frames) + 1}"
    assert child.process.wait(10) == 0
    stats = link.stats
    assert (stats.sent, stats.received, stats.forged, stats.replayed, stats.malformed) == (201, 200, 0, 0, 0)


def test_heartbeats_keep_a_stalled_peer_alive_and_a_killed_one_is_reported(pair):
    interval, timeout = 0.2, 1.0
    link, child = pair(interval)
    _send(link, b"hello")
    assert _receive(link, 1, timeout=10) == [b"hello"]

    # The child's caller sleeps 2.5 s, then runs Python for 1 s, never calling its link.
    _send(link, b"stall:2.5:1.0")
    stall_end = time.monotonic() + 3.5
    while time.monotonic() < stall_end:
        assert link.dead_peers(timeout) == {}, "a live peer with a busy caller looked dead"
        time.sleep(0.05)
    assert _receive(link, 1, timeout=10) == [b"stalled"]

    child.process.send_signal(signal.SIGKILL)
    child.process.wait(5)
    killed = time.monotonic()
    while 1 not in link.dead_peers(timeout):
        assert time.monotonic() - killed < timeout + interval + 0.5, "the killed peer was not reported"
        time.sleep(0.01)
    # Heard from up to one interval before the kill: reported within timeout + interval.
    assert time.monotonic() - killed <= timeout + interval + 0.1
    reason = link.dead_peers(timeout)[1]
    assert reason.startswith(f"peer member 1 at {child.endpoint}: silent ")
