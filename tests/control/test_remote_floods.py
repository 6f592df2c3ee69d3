"""A RemoteLink under a hostile network: while its real peer keeps sending, outsiders on
127.0.0.1 (a) open and close 20,000 connections to its port, (b) hold 10,000 idle
connections open, (c) drip a ZMTP greeting one byte per 100 ms. Afterwards every frame
the peer sent has arrived in order, the link's process is back near its descriptor
count and RSS from before the flood, and the refusals are counted and logged once per
source address per interval.

The link under attack runs in a process of its own (the victim); the peer is in the
test's process; the outsiders are plain sockets in subprocesses (several when one
process may not hold 10,000 descriptors). Every process has a hard deadline and is
killed and reaped whatever happens. The figures are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import secrets
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from embxfer.control.remote import RemoteLink

pytestmark = pytest.mark.timeout(120)

HOST = "127.0.0.1"
HANDSHAKE_S = 2.0  # the link's default handshake_timeout_s
REPORT_S = 5.0
CYCLES = 20_000
IDLE = 10_000
# Back "near the baseline" means within these margins of what was measured before the
# flood, within RECOVERY_S after it (handshakes of the last connections time out, then
# the link thread gives freed memory back).
FD_MARGIN = 5
RSS_MARGIN_BYTES = 4 << 20
RECOVERY_S = HANDSHAKE_S + 8.0
# The connect+close outsider stops after this long even if it made fewer cycles (a
# loaded machine); the test then needs at least MIN_CYCLES of them.
CYCLES_BUDGET_S = 30.0
MIN_CYCLES = 5_000

VICTIM = r"""
import json, logging, queue, resource, sys, threading
from dataclasses import asdict
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
from embxfer.control.remote import RemoteLink, raise_open_files_limit

if sys.argv[3] == "raised":
    raise_open_files_limit()  # as the runtime does at start-up
else:  # the common default: the link must not depend on a higher limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[3]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
secret = bytes.fromhex(sys.stdin.readline())
link = RemoteLink(1, secret, "127.0.0.1", max_frame_bytes=64, heartbeat_interval_s=0.2,
                  handshake_timeout_s=float(sys.argv[1]), report_interval_s=float(sys.argv[2]))
print(link.endpoint, flush=True)
link.connect({0: sys.stdin.readline().strip()})
commands = queue.Queue()  # read on a thread: stdin's buffer may hold lines poll() cannot see
threading.Thread(target=lambda: [commands.put(line.strip()) for line in sys.stdin] + [commands.put("")],
                 daemon=True).start()
expected = out_of_order = 0
while True:
    link.wait(0.05)
    for source, frame in link.receive():
        number = int.from_bytes(frame, "little")
        out_of_order += number != expected or source != 0
        expected = number + 1
    try:
        command = commands.get_nowait()
    except queue.Empty:
        continue
    if command != "report":
        break
    print(json.dumps({"received": expected, "out_of_order": out_of_order, "stats": asdict(link.stats)}), flush=True)
link.close()
"""

# argv: port, mode ("cycles" COUNT BUDGET_S | "hold" COUNT HOLD_S); prints a JSON line.
OUTSIDER = r"""
import json, resource, select, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, mode, count, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
address, poller, pending, began = ("127.0.0.1", port), select.poll(), {}, time.monotonic()
connected = attempts = done = 0
if mode == "cycles":  # 256 connects in flight; each one that completes is closed at once
    while done < count and time.monotonic() - began < seconds:
        while attempts < count and len(pending) < 256:
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(address)
            pending[sock.fileno()] = sock
            poller.register(sock, select.POLLOUT)
            attempts += 1
        for fd, _ in poller.poll(100):
            sock = pending.pop(fd)
            poller.unregister(fd)
            connected += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            sock.close()
            done += 1
else:  # hold: open COUNT connections, keep every one that completes open for HOLD_S
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(address)
        pending[sock.fileno()] = sock
        poller.register(sock, select.POLLOUT)
    deadline = time.monotonic() + seconds
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            sock = pending.pop(fd)
            poller.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                held.append(sock)
    connected = len(held)
    time.sleep(max(0.0, deadline - time.monotonic()))
print(json.dumps({"connected": connected, "seconds": round(time.monotonic() - began, 2)}), flush=True)
"""

# A ZMTP 3.0 greeting asking for CURVE: what a real client sends first.
GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\x00") + b"\x00" + bytes(31)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Victim:
    def __init__(self, secret: bytes, open_files: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", VICTIM, str(HANDSHAKE_S), str(REPORT_S), open_files],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.pid = self.process.pid
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.process.stdin.write(secret.hex() + "\n")
        self.process.stdin.flush()
        self.endpoint = self.readline(30.0)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line.rstrip("\n"))

    def readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"victim said nothing for {timeout} s; stderr: {self.stderr[-5:]}"
        line = self.process.stdout.readline()
        assert line, f"victim exited ({self.process.poll()}); stderr: {self.stderr[-5:]}"
        return line.strip()

    def tell(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def report(self) -> dict:
        self.tell("report")
        return json.loads(self.readline(10.0))

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.tell("stop")
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)


class Sampler:
    """Peak descriptor count and RSS of a process, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_fds = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak_fds = max(self.peak_fds, _fds(self.pid))
                self.peak_rss = max(self.peak_rss, _rss(self.pid))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Sender:
    """The real peer: numbered frames every 2 ms, each retried until queued."""

    def __init__(self, link: RemoteLink) -> None:
        self.link = link
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.link.send(1, self.sent.to_bytes(8, "little")):
                self.sent += 1
                time.sleep(0.002)
            else:
                time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _drip(port: int, result: dict) -> None:
    """One byte of a greeting per 100 ms; how long until the victim closes it."""
    began = time.monotonic()
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.setblocking(False)
        for index in range(200):
            try:
                sock.send(GREETING[index % len(GREETING) : index % len(GREETING) + 1])
                while sock.recv(4096):  # the victim's greeting; b"" when it closed
                    pass
                closed = True
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                break
            time.sleep(0.1)
    result["closed_after_s"] = time.monotonic() - began if closed else None
    result["bytes_sent"] = index


def _outsiders(port: int, mode: str, count: int, seconds: float, processes: int) -> list[subprocess.Popen]:
    share = math.ceil(count / processes)
    return [
        subprocess.Popen([sys.executable, "-c", OUTSIDER, str(port), mode, str(share), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]


def _collect(outsiders: list[subprocess.Popen], timeout: float) -> int:
    connected = 0
    for outsider in outsiders:
        out, _ = outsider.communicate(timeout=timeout)
        assert outsider.returncode == 0, f"outsider failed ({outsider.returncode})"
        connected += json.loads(out)["connected"]
    return connected


def _near_baseline(pid: int, fds: int, rss: int) -> bool:
    return _fds(pid) <= fds + FD_MARGIN and _rss(pid) <= rss + RSS_MARGIN_BYTES


@pytest.mark.parametrize("open_files", ["1024", "raised"])
def test_floods_neither_kill_nor_bloat_the_link_and_are_counted(open_files, capsys):
    """With the victim's RLIMIT_NOFILE at the common 1024 (the flood fills its table for
    a while: the link must not depend on a higher limit) and raised to the hard limit
    (`raise_open_files_limit`, as the runtime runs)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_process = IDLE if hard == resource.RLIM_INFINITY else hard - 100
    idle_processes = math.ceil(IDLE / max(1, per_process))
    if idle_processes > 8:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: 10,000 idle connections need {idle_processes} processes")
    secret = secrets.token_bytes(32)
    victim = Victim(secret, open_files)
    outsiders: list[subprocess.Popen] = []
    link = RemoteLink(0, secret, HOST, max_frame_bytes=64, heartbeat_interval_s=0.2)
    sender = sampler = None
    try:
        link.connect({1: victim.endpoint})
        victim.tell(link.endpoint)
        sender = Sender(link)
        deadline = time.monotonic() + 20
        while victim.report()["received"] < 100:
            assert time.monotonic() < deadline, "the peer's frames never reached the victim"
            time.sleep(0.1)
        time.sleep(0.5)
        base_fds, base_rss = _fds(victim.pid), _rss(victim.pid)
        sampler = Sampler(victim.pid)
        port = int(victim.endpoint.rsplit(":", 1)[1])
        began = time.monotonic()

        # (a) connect+close cycles, with (c) a slow drip at the same time
        drip: dict = {}
        dripper = threading.Thread(target=_drip, args=(port, drip), daemon=True)
        dripper.start()
        outsiders = _outsiders(port, "cycles", CYCLES, CYCLES_BUDGET_S, 1)
        cycles = _collect(outsiders, CYCLES_BUDGET_S + 30)
        dripper.join(30)
        peak_a = (sampler.peak_fds, sampler.peak_rss)
        # (b) idle connections held open for long enough to see every handshake time out
        hold_s = 2 * HANDSHAKE_S + 1.0
        outsiders = _outsiders(port, "hold", IDLE, hold_s, idle_processes)
        idle = _collect(outsiders, hold_s + 60)
        flood_s = time.monotonic() - began

        recovery_deadline = time.monotonic() + RECOVERY_S
        while not _near_baseline(victim.pid, base_fds, base_rss) and time.monotonic() < recovery_deadline:
            time.sleep(0.1)
        recovered_s = time.monotonic() - began - flood_s
        sampler.stop()
        after_fds, after_rss = _fds(victim.pid), _rss(victim.pid)
        sender.stop()
        time.sleep(0.5)
        report = victim.report()
        stats = report["stats"]
    finally:
        for outsider in outsiders:
            if outsider.poll() is None:
                outsider.kill()
            outsider.wait(10)
        if sender is not None:
            sender.stop()
        if sampler is not None:
            sampler.stop()
        link.close()
        victim.stop()

    refusal_lines = [line for line in victim.stderr if "refused connections" in line]
    mib = 1 << 20
    with capsys.disabled():
        print(
            f"\nflood (RLIMIT_NOFILE {open_files}): {cycles} connect+close cycles (peak {peak_a[0]} fds, {peak_a[1] / mib:.1f} MiB), "
            f"{idle} idle connections held in {idle_processes} process(es), drip closed after "
            f"{drip.get('closed_after_s')} s; {flood_s:.1f} s in all\n"
            f"victim fds: baseline {base_fds}, peak {sampler.peak_fds}, after {after_fds} "
            f"(back in {recovered_s:.1f} s); RSS MiB: baseline {base_rss / mib:.1f}, peak "
            f"{sampler.peak_rss / mib:.1f}, after {after_rss / mib:.1f}\n"
            f"refused {stats['refused']}, peer frames {report['received']} of {sender.sent}, "
            f"{len(refusal_lines)} log lines"
        )
    assert victim.process.returncode == 0, victim.stderr[-10:]
    # Every frame the peer queued arrived, in order.
    assert report["received"] == sender.sent and report["out_of_order"] == 0, report
    assert stats["forged"] == stats["malformed"] == stats["replayed"] == 0, stats
    # Descriptors and memory came back.
    assert after_fds <= base_fds + FD_MARGIN, (base_fds, sampler.peak_fds, after_fds)
    assert after_rss <= base_rss + RSS_MARGIN_BYTES, (base_rss, sampler.peak_rss, after_rss)
    # The floods happened, were refused and counted (the victim may have accepted a few
    # more connections than the outsiders saw complete, never far fewer). At the 1024 limit
    # the table is full while the idle outsiders hold it: idle connections queued in the
    # kernel then, and closed by the outsider before the link could accept them, never
    # reach the link (seen: 27,013 counted of 20,000 cycles + 8,697 idle).
    assert cycles >= MIN_CYCLES and idle >= IDLE // 2, (cycles, idle)
    idle_share = 0.5 if open_files == "1024" else 0.95
    assert stats["refused"] >= 0.95 * cycles + idle_share * idle, (stats["refused"], cycles, idle)
    assert drip["closed_after_s"] is not None and drip["closed_after_s"] <= HANDSHAKE_S + 3.0, drip
    # Logged once per source address per interval, each line with its count.
    by_origin: dict[str, list[int]] = {}
    for line in refusal_lines:
        match = re.search(r" from (.+?): (\d+) refused connections", line)
        assert match, line
        by_origin.setdefault(match[1], []).append(int(match[2]))
    assert by_origin and set(by_origin) <= {HOST, "an unknown address"}, by_origin
    for origin, counts in by_origin.items():
        assert len(counts) <= (flood_s + recovered_s + 1.0) / REPORT_S + 2, (origin, counts)
    assert sum(sum(counts) for counts in by_origin.values()) <= stats["refused"]
