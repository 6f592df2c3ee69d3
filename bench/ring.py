"""How fast is the control ring, against what the earlier implementation used?

One run measures, on this machine:
  embxfer_hot     round trip A -> B -> A through two rings, 64-byte records, readers spinning
  embxfer_parked  the same with readers parked on their doorbells (no spinning at all)
  zmq_ipc         the same round trip over a zmq PAIR socket pair on ipc://
  mp_queue        the same over two multiprocessing.Queue
  gloo_allreduce  one all_reduce(MAX) of two int64 between 2 processes (how TP ranks synced)
  remote_link_hmac the cross-node path: round trip of a 100-byte frame between two
                  processes over RemoteLink with curve=False (HMAC-signed frames alone,
                  link threads) on TCP loopback, each caller parked in RemoteLink.wait
  remote_link_curve the same with the link's default, curve=True: CurveZMQ admission
                  and encryption under the HMAC framing
  remote_link_doorbell  remote_link_curve with each caller parked on a POSIX-semaphore
                  Doorbell that on_receive rings, as the runtime's loop parks
  zmq_tcp         the same 100-byte round trip over plain zmq PUSH/PULL on TCP loopback,
                  no signature, no threads of ours (the floor RemoteLink builds on)
  zmq_tcp_curve   zmq_tcp with CURVE on both sockets (the floor of a CURVE-only link)
plus the throughput of one writer and one reader (64-byte records, best of three runs;
once with a `read` per record, once with the reader taking batches with `poll_many`),
the one-way throughput of the cross-node cases (100-byte and 4 KiB frames, each case
best of two runs), and the CPU used by a reader parked on an idle ring for 5 s and by an
idle process holding a connected RemoteLink (heartbeats every 0.5 s, the runtime's
default).

    python bench/ring.py --json bench/results/ring-cpu.json
    python bench/ring.py --only remote --json bench/results/ring-remote-cpu.json

writes the JSON and a PNG of the latency distributions next to it, in about a minute
(`--only remote`: the cross-node cases alone, CURVE against HMAC, in half of that).

    python bench/ring.py --baseline REV [--rounds 7]

also measures the ring of git revision REV (its control/ring.py with the _process.py and
deadlines.py beside it, loaded as a package of its own) against the checkout's, in the
same run and interleaved: each round runs hot, parked and throughput for one, then the
other (the order alternating from round to round), so a drift of the machine's speed
hits both alike. The JSON's "compare" holds every round's figures and their medians.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

# embxfer/__init__.py imports the runtime and with it torch (about a second per process);
# the control plane needs neither, so processes here load embxfer.control on its own.
if "embxfer" not in sys.modules:
    _spec = importlib.util.find_spec("embxfer")
    _package = types.ModuleType("embxfer")
    _package.__path__ = list(_spec.submodule_search_locations)
    sys.modules["embxfer"] = _package

import embxfer.control.ring as checkout_ring  # noqa: E402

RECORD = bytes(range(64))
# A cross-node control record: a TRANSFER record is ~100 bytes before signing.
FRAME = bytes(range(100))
STOP = b"stop"
PREFIX = "embxferbench"
# Each latency case stops after this long even if it has fewer samples (a loaded machine).
CASE_BUDGET_S = 4.0
TARGETS = {
    "hot_p50_us": 10.0,
    "hot_vs_zmq_ratio": 20.0,
    "parked_p50_us": 200.0,
    "throughput_records_per_s": 300_000,
    "idle_cpu_fraction": 0.01,
    "remote_p50_us": 150.0,
    "remote_idle_cpu_fraction": 0.01,
}
# The RemoteLink cases: a per-job secret, and heartbeats at the runtime's default.
LINK_SECRET = bytes(range(32))
LINK_HEARTBEAT_S = 0.5
# One-way throughput of the cross-node cases: frames sent as fast as send() takes them.
STREAM_FRAMES = {100: 50_000, 4096: 20_000}
STREAM_CASES = {  # name -> (transport, curve)
    "remote_link_hmac": ("link", False),
    "remote_link_curve": ("link", True),
    "zmq_tcp": ("zmq", False),
    "zmq_tcp_curve": ("zmq", True),
}


# Where the two processes of a case run: "split" pins them to two different cores (how
# engine processes run; also the only placement where a spinning reader makes sense),
# "same" pins both to one core, "free" leaves it to the scheduler. Wake-up latencies
# differ several-fold between split and same on a VM (waking an idle vCPU is slow), so
# every case of a run uses one placement and the JSON records it.
PLACEMENT = {"split": (0, 1), "same": (0, 0), "free": (None, None)}


def _pin(cpu: int | None) -> None:
    """Run this process on CPU `cpu` only (an absolute id; None: leave it)."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _percentile(values: list[float], q: float) -> float:
    if not values:  # a case that got no sample within its budget
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------- which ring: the checkout's or REV's


def _ring(source: str | None) -> types.ModuleType:
    """The ring module: the checkout's (None) or the package `_extract_ring` made."""
    if source is None:
        return checkout_ring
    root, package = os.path.split(source)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{package}.ring")


def _extract_ring(revision: str, into: str) -> tuple[str, str]:
    """control/ring.py of git `revision` and the modules it imports relatively, as a
    package under `into`; (its path for `_ring`, the full commit id)."""
    repository = Path(__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(repository), "rev-parse", "--verify", f"{revision}^{{commit}}"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    package = Path(into) / f"ring_{commit[:12]}"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    for module in ("ring.py", "_process.py", "deadlines.py"):
        shown = subprocess.run(
            ["git", "-C", str(repository), "show", f"{commit}:control/{module}"], capture_output=True
        )
        if shown.returncode == 0:  # older revisions lack deadlines.py
            (package / module).write_bytes(shown.stdout)
    return str(package), commit


# ------------------------------------------------------------------ ring round trip


def _ring_echo(conn, name: str, spin_s: float, cpu: int | None, source: str | None = None) -> None:
    _pin(cpu)
    ring = _ring(source)
    reader = ring.RingReader.attach(name, spin_s=spin_s)
    writer = ring.RingWriter.create(64, 128, 1, prefix=PREFIX)
    try:
        conn.send(writer.name)
        conn.recv()
        while True:
            data = reader.read(timeout=30.0)
            if data is None or data == STOP:
                break
            writer.publish(data, timeout=5.0)
    finally:
        reader.close()
        writer.close()


def ring_round_trips(context, count: int, spin_s: float, cpus: tuple, source: str | None = None) -> list[float]:
    _pin(cpus[0])
    ring = _ring(source)
    with ring.RingWriter.create(64, 128, 1, prefix=PREFIX) as writer:
        parent, child = context.Pipe()
        process = context.Process(
            target=_ring_echo, args=(child, writer.name, spin_s, cpus[1], source), daemon=True
        )
        process.start()
        try:
            with ring.RingReader.attach(parent.recv(), spin_s=spin_s) as reader:
                parent.send("go")
                while not writer.readers():
                    time.sleep(0.001)
                samples = []
                clock = time.perf_counter_ns
                stop_at = clock() + int(CASE_BUDGET_S * 1e9)
                for index in range(count + count // 10):
                    start = clock()
                    if start > stop_at:
                        break
                    writer.publish(RECORD, timeout=5.0)
                    reply = reader.read(timeout=5.0)
                    elapsed = clock() - start
                    if reply is None:
                        raise TimeoutError("echo did not answer")
                    if index >= count // 10:  # the first tenth warms up
                        samples.append(elapsed / 1000)
                writer.publish(STOP, timeout=5.0)
        finally:
            process.join(10)
            if process.is_alive():
                process.kill()
    return samples


# ------------------------------------------------------------------------- zmq


def _zmq_echo(address: str, cpu: int | None) -> None:
    import zmq

    _pin(cpu)
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        while True:
            data = sock.recv()
            if data == STOP:
                break
            sock.send(data)
    finally:
        sock.close(linger=0)


def zmq_round_trips(context, count: int, cpus: tuple) -> list[float]:
    import zmq

    _pin(cpus[0])
    with tempfile.TemporaryDirectory() as scratch:
        address = f"ipc://{scratch}/pair"
        sock = zmq.Context.instance().socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
        process = context.Process(target=_zmq_echo, args=(address, cpus[1]), daemon=True)
        process.start()
        try:
            samples = []
            clock = time.perf_counter_ns
            stop_at = clock() + int(CASE_BUDGET_S * 1e9)
            for index in range(count + count // 10):
                start = clock()
                if start > stop_at:
                    break
                sock.send(RECORD)
                sock.recv()
                if index >= count // 10:
                    samples.append((clock() - start) / 1000)
            sock.send(STOP)
        finally:
            process.join(10)
            if process.is_alive():
                process.kill()
            sock.close(linger=0)
    return samples


# ------------------------------------------------------------- cross-node (TCP)


class _Parking:
    """How a caller sleeps until its link has frames: "wait" parks in RemoteLink.wait;
    "doorbell" parks on a POSIX-semaphore Doorbell that on_receive rings, as the
    runtime's loop does (one doorbell for its rings and its link)."""

    def __init__(self, how: str) -> None:
        from embxfer.control.ring import Doorbell

        self.doorbell = Doorbell.create(PREFIX) if how == "doorbell" else None
        self.on_receive = self.doorbell.ring if self.doorbell else None

    def wait(self, link, timeout: float) -> bool:
        if self.doorbell is None:
            return link.wait(timeout)
        # Frames that came with an earlier ring are taken by the caller's receive();
        # a stale post only costs one empty look.
        deadline = time.monotonic() + timeout
        while not link.pending:
            if not self.doorbell.wait(deadline - time.monotonic()):
                return bool(link.pending)
        return True

    def close(self) -> None:
        if self.doorbell is not None:
            self.doorbell.close()


def _link(member: int, curve: bool, on_receive=None, max_frame_bytes: int = 256):
    from embxfer.control.remote import RemoteLink

    return RemoteLink(
        member, LINK_SECRET, "127.0.0.1", max_frame_bytes=max_frame_bytes, heartbeat_interval_s=LINK_HEARTBEAT_S,
        on_receive=on_receive, curve=curve,
    )


def _link_echo(conn, cpu: int | None, seconds_idle: float, how: str = "wait", curve: bool = True) -> None:
    _pin(cpu)
    parking = _Parking(how)
    try:
        with _link(1, curve, parking.on_receive) as link:
            conn.send(link.endpoint)
            link.connect({0: conn.recv()})
            if seconds_idle:  # the idle-CPU case: nothing but heartbeats
                time.sleep(seconds_idle)
                return
            while parking.wait(link, 30.0):
                for _, frame in link.receive():
                    if frame == STOP:
                        return
                    while not link.send(0, frame):
                        time.sleep(0.0001)
    finally:
        parking.close()


def remote_round_trips(context, count: int, cpus: tuple, how: str, curve: bool) -> list[float]:
    """Ping-pong over two RemoteLinks, each caller parked between frames (`_Parking`)."""
    _pin(cpus[0])
    parent, child = context.Pipe()
    process = context.Process(target=_link_echo, args=(child, cpus[1], 0.0, how, curve), daemon=True)
    process.start()
    parking = _Parking(how)
    try:
        with _link(0, curve, parking.on_receive) as link:
            link.connect({1: parent.recv()})
            parent.send(link.endpoint)
            deadline = time.monotonic() + 10.0
            while not link.send(1, FRAME):  # until the TCP connection is up
                if time.monotonic() > deadline:
                    raise TimeoutError("RemoteLink echo never connected")
                time.sleep(0.001)
            parking.wait(link, 5.0)
            link.receive()
            samples = []
            clock = time.perf_counter_ns
            stop_at = clock() + int(CASE_BUDGET_S * 1e9)
            for index in range(count + count // 10):
                start = clock()
                if start > stop_at:
                    break
                if not link.send(1, FRAME):
                    raise RuntimeError(f"send failed: {link.stats.last_error}")
                if not parking.wait(link, 5.0):
                    raise TimeoutError("RemoteLink echo did not answer")
                link.receive()
                if index >= count // 10:
                    samples.append((clock() - start) / 1000)
            link.send(1, STOP)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
        parking.close()
    return samples


def _zmq_pair_sockets(context, curve: bool):
    """A PULL to bind and a PUSH to connect, with one CURVE keypair on both when asked
    (as RemoteLink's: the server's key is the client's)."""
    import zmq

    inbox, outbox = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    for sock in (inbox, outbox):
        sock.setsockopt(zmq.LINGER, 0)
    if curve:
        from embxfer.control.remote import curve_keys

        public, secret_key = curve_keys(LINK_SECRET)
        inbox.setsockopt(zmq.CURVE_SERVER, 1)
        inbox.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
        outbox.setsockopt(zmq.CURVE_SERVERKEY, public)
        outbox.setsockopt(zmq.CURVE_PUBLICKEY, public)
        outbox.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
    return inbox, outbox


def _zmq_tcp_echo(conn, cpu: int | None, curve: bool) -> None:
    import zmq

    _pin(cpu)
    context = zmq.Context()
    inbox, outbox = _zmq_pair_sockets(context, curve)
    try:
        inbox.bind("tcp://127.0.0.1:*")
        conn.send(inbox.getsockopt_string(zmq.LAST_ENDPOINT))
        outbox.connect(conn.recv())
        while True:
            data = inbox.recv()
            if data == STOP:
                break
            outbox.send(data)
    finally:
        inbox.close(linger=0)
        outbox.close(linger=0)
        context.term()


def zmq_tcp_round_trips(context, count: int, cpus: tuple, curve: bool) -> list[float]:
    """The same ping-pong over bare PUSH/PULL sockets (one per direction, as RemoteLink)."""
    import zmq

    _pin(cpus[0])
    zmq_context = zmq.Context()
    inbox, outbox = _zmq_pair_sockets(zmq_context, curve)
    parent, child = context.Pipe()
    process = context.Process(target=_zmq_tcp_echo, args=(child, cpus[1], curve), daemon=True)
    process.start()
    try:
        inbox.bind("tcp://127.0.0.1:*")
        outbox.connect(parent.recv())
        parent.send(inbox.getsockopt_string(zmq.LAST_ENDPOINT))
        samples = []
        clock = time.perf_counter_ns
        stop_at = clock() + int(CASE_BUDGET_S * 1e9)
        for index in range(count + count // 10):
            start = clock()
            if start > stop_at:
                break
            outbox.send(FRAME)
            if not inbox.poll(5000):
                raise TimeoutError("zmq echo did not answer")
            inbox.recv()
            if index >= count // 10:
                samples.append((clock() - start) / 1000)
        outbox.send(STOP)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
        inbox.close(linger=0)
        outbox.close(linger=0)
        zmq_context.term()
    return samples


def _stream_source(conn, cpu: int | None, transport: str, curve: bool, count: int, size: int) -> None:
    """Send `count` frames of `size` bytes as fast as the transport takes them."""
    _pin(cpu)
    frame = bytes(size)
    if transport == "link":
        with _link(0, curve, max_frame_bytes=size) as link:
            link.connect({1: conn.recv()})
            for _ in range(count):
                while not link.send(1, frame):
                    time.sleep(0.00005)
            conn.recv()  # the sink got everything: only now close
        return
    import zmq

    context = zmq.Context()
    _, outbox = _zmq_pair_sockets(context, curve)
    try:
        outbox.connect(conn.recv())
        for _ in range(count):
            outbox.send(frame)
        conn.recv()
    finally:
        outbox.close(linger=0)
        context.term()


def stream_throughput(context, cpus: tuple, transport: str, curve: bool, size: int) -> float:
    """Frames per second from one sender process to this one, first frame to last."""
    import zmq

    _pin(cpus[0])
    count = STREAM_FRAMES[size]
    parent, child = context.Pipe()
    process = context.Process(
        target=_stream_source, args=(child, cpus[1], transport, curve, count, size), daemon=True
    )
    process.start()
    zmq_context = None
    try:
        if transport == "link":
            with _link(1, curve, max_frame_bytes=size) as link:
                parent.send(link.endpoint)
                received, started = 0, None
                while received < count:
                    if not link.wait(10.0):
                        raise TimeoutError(f"stream stalled at {received} of {count} frames")
                    received += len(link.receive())
                    started = started or time.perf_counter()
                elapsed = time.perf_counter() - started
        else:
            zmq_context = zmq.Context()
            inbox, _ = _zmq_pair_sockets(zmq_context, curve)
            inbox.bind("tcp://127.0.0.1:*")
            parent.send(inbox.getsockopt_string(zmq.LAST_ENDPOINT))
            if not inbox.poll(10_000):
                raise TimeoutError("zmq stream never started")
            inbox.recv()
            started = time.perf_counter()
            for _ in range(count - 1):
                inbox.recv()
            elapsed = time.perf_counter() - started
            inbox.close(linger=0)
        parent.send("done")
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
        if zmq_context is not None:
            zmq_context.term()
    return (count - 1) / elapsed


def remote_idle_cpu_fraction(context, seconds: float) -> float:
    """CPU of a process whose only activity is a connected RemoteLink (its link thread,
    zmq's I/O thread, heartbeats both ways), over `seconds`."""
    parent, child = context.Pipe()
    process = context.Process(target=_link_echo, args=(child, None, seconds + 1.5), daemon=True)
    process.start()
    try:
        with _link(0, True) as link:
            link.connect({1: parent.recv()})
            parent.send(link.endpoint)
            time.sleep(0.5)
            before, start = _cpu_seconds(process.pid), time.monotonic()
            time.sleep(seconds)
            used, elapsed = _cpu_seconds(process.pid) - before, time.monotonic() - start
            if link.dead_peers(2 * LINK_HEARTBEAT_S + 0.5):
                raise RuntimeError(f"idle link looked dead: {link.dead_peers(1.5)}")
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    return used / elapsed


# ------------------------------------------------------------ multiprocessing.Queue


def _queue_echo(inbox, outbox, cpu: int | None) -> None:
    _pin(cpu)
    while True:
        data = inbox.get()
        if data == STOP:
            break
        outbox.put(data)


def queue_round_trips(context, count: int, cpus: tuple) -> list[float]:
    _pin(cpus[0])
    inbox, outbox = context.Queue(), context.Queue()
    process = context.Process(target=_queue_echo, args=(inbox, outbox, cpus[1]), daemon=True)
    process.start()
    try:
        samples = []
        clock = time.perf_counter_ns
        stop_at = clock() + int(CASE_BUDGET_S * 1e9)
        for index in range(count + count // 10):
            start = clock()
            if start > stop_at:
                break
            inbox.put(RECORD)
            outbox.get(timeout=5.0)
            if index >= count // 10:
                samples.append((clock() - start) / 1000)
        inbox.put(STOP)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    return samples


# ------------------------------------------------------------------ gloo all_reduce


def _gloo_rank(rank: int, port: int, count: int, conn, cpu: int | None) -> None:
    _pin(cpu)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        values = torch.tensor([rank, 7 * rank], dtype=torch.int64)
        samples = []
        clock = time.perf_counter_ns
        for index in range(count + count // 10):
            start = clock()
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
            if index >= count // 10:
                samples.append((clock() - start) / 1000)
        if conn is not None:
            conn.send((samples, torch.__version__))
    finally:
        dist.destroy_process_group()


def gloo_round_trips(context, count: int, cpus: tuple) -> tuple[list[float], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    parent, child = context.Pipe()
    ranks = [
        context.Process(target=_gloo_rank, args=(0, port, count, child, cpus[0]), daemon=True),
        context.Process(target=_gloo_rank, args=(1, port, count, None, cpus[1]), daemon=True),
    ]
    for process in ranks:
        process.start()
    try:
        if not parent.poll(120):
            raise TimeoutError("gloo ranks did not report")
        return parent.recv()
    finally:
        for process in ranks:
            process.join(10)
            if process.is_alive():
                process.kill()


# ---------------------------------------------------------- throughput, idle CPU


def _flood(name_conn, count: int, cpu: int | None, source: str | None = None) -> None:
    _pin(cpu)
    writer = _ring(source).RingWriter.create(1024, 128, 1, prefix=PREFIX)
    try:
        name_conn.send(writer.name)
        while not writer.readers():
            time.sleep(0.001)
        publish = writer.publish
        for _ in range(count):
            publish(RECORD, 5.0)
        name_conn.recv()  # the reader got everything; only now unlink
    finally:
        writer.close()


def throughput(
    context, count: int, cpus: tuple = (None, None), source: str | None = None, batch: int = 0
) -> float:
    """Records per second from one writer to one reader that takes them one `read` at a
    time, or with `batch`, up to that many per `poll_many` (a `read` when none is there)."""
    _pin(cpus[0])
    parent, child = context.Pipe()
    process = context.Process(target=_flood, args=(child, count, cpus[1], source), daemon=True)
    process.start()
    try:
        with _ring(source).RingReader.attach(parent.recv()) as reader:
            read, poll_many = reader.read, getattr(reader, "poll_many", None)
            read(10.0, 10.0)
            start = time.perf_counter()
            received = 1
            while received < count:
                taken = len(poll_many(batch)) if batch else 0
                if not taken:
                    if read(10.0, 10.0) is None:
                        raise TimeoutError("flood stalled")
                    taken = 1
                received += taken
            elapsed = time.perf_counter() - start
        parent.send("done")
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    return (count - 1) / elapsed


def _park(conn, name: str, seconds: float) -> None:
    with checkout_ring.RingReader.attach(name, spin_s=0.0) as reader:
        conn.send("parked")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            reader.read(timeout=deadline - time.monotonic())


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        raw = stat.read()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_fraction(context, seconds: float) -> float:
    with checkout_ring.RingWriter.create(64, 128, 1, prefix=PREFIX) as writer:
        parent, child = context.Pipe()
        process = context.Process(target=_park, args=(child, writer.name, seconds + 1.0), daemon=True)
        process.start()
        try:
            parent.recv()
            time.sleep(0.3)
            before, start = _cpu_seconds(process.pid), time.monotonic()
            time.sleep(seconds)
            used, elapsed = _cpu_seconds(process.pid) - before, time.monotonic() - start
        finally:
            process.join(10)
            if process.is_alive():
                process.kill()
    return used / elapsed


# ------------------------------------------------ before/after, interleaved in one run

COMPARED = ("hot_p50_us", "parked_p50_us", "records_per_s")


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def compare(context, baseline: str, rounds: int, scale: float, cpus: tuple) -> dict[str, object]:
    """The ring of git revision `baseline` ("before") against the checkout's ("after"):
    `rounds` rounds, each case run for both back to back, the order alternating by round."""
    with tempfile.TemporaryDirectory(prefix="embxfer-ring-baseline-") as scratch:
        source, commit = _extract_ring(baseline, scratch)
        sides = {"before": source, "after": None}
        cases = {
            "hot_p50_us": lambda side: _percentile(
                ring_round_trips(context, int(20_000 * scale), 30.0, cpus, sides[side]), 0.5
            ),
            "parked_p50_us": lambda side: _percentile(
                ring_round_trips(context, int(3_000 * scale), 0.0, cpus, sides[side]), 0.5
            ),
            "records_per_s": lambda side: throughput(context, int(300_000 * scale), cpus, sides[side]),
        }
        figures: dict[str, dict[str, list[float]]] = {side: {case: [] for case in cases} for side in sides}
        for round_index in range(rounds):
            order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
            for case, measure in cases.items():
                for side in order:
                    figures[side][case].append(round(measure(side), 3))
    summary = {}
    for case in cases:
        ratios = [after / before for before, after in zip(figures["before"][case], figures["after"][case], strict=True)]
        summary[case] = {
            "before": _spread(figures["before"][case]),
            "after": _spread(figures["after"][case]),
            "after_over_before": _spread(ratios),
        }
    return {
        "baseline": baseline,
        "baseline_commit": commit,
        "rounds": rounds,
        "how": "each round runs every case for before and after back to back (order alternating by "
        "round), same placement; hot/parked: p50 of 20k/3k round trips; records_per_s: one run of "
        "300k records (both scaled by --scale)",
        "rounds_figures": figures,
        "summary": summary,
    }


# --------------------------------------------------------------------- reporting


def _machine(torch_version: str | None, loadavg_at_start: list[float]) -> dict[str, object]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import posix_ipc
    import zmq

    return {
        "device": "cpu",
        "cpu": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "posix_ipc": posix_ipc.VERSION,
        "loadavg_at_start": loadavg_at_start,
    }


def plot(cases: dict[str, list[float]], path: Path, placement: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, samples in cases.items():
        if not samples:
            continue
        ordered = sorted(samples)
        fractions = [(index + 1) / len(ordered) for index in range(len(ordered))]
        axis.plot(ordered, fractions, label=f"{name} (p50 {_percentile(samples, 0.5):.1f} us)")
    axis.set_xscale("log")
    axis.set_xlabel("round trip / call latency (us, log scale)")
    axis.set_ylabel("fraction of samples")
    axis.set_title(f"control-plane latency, {os.cpu_count()}-core CPU, placement {placement}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _remote_cases(context, scale: float, cpus: tuple) -> tuple[dict[str, list[float]], dict[str, float]]:
    """The cross-node round trips and one-way throughputs: CURVE against HMAC alone."""
    samples: dict[str, list[float]] = {}
    samples["remote_link_hmac"] = remote_round_trips(context, int(10_000 * scale), cpus, "wait", False)
    samples["remote_link_curve"] = remote_round_trips(context, int(10_000 * scale), cpus, "wait", True)
    samples["remote_link_doorbell"] = remote_round_trips(context, int(10_000 * scale), cpus, "doorbell", True)
    samples["zmq_tcp"] = zmq_tcp_round_trips(context, int(10_000 * scale), cpus, False)
    samples["zmq_tcp_curve"] = zmq_tcp_round_trips(context, int(10_000 * scale), cpus, True)
    # Best of two runs each, the runs of all cases interleaved (the VM's load drifts).
    streams: dict[str, float] = {}
    for _ in range(2):
        for size in STREAM_FRAMES:
            for case, (transport, curve) in STREAM_CASES.items():
                rate = stream_throughput(context, cpus, transport, curve, size)
                streams[f"{case}_{size}B"] = max(streams.get(f"{case}_{size}B", 0.0), rate)
    return samples, {name: round(rate) for name, rate in streams.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/ring-cpu.json"), help="output JSON path")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every sample count")
    parser.add_argument(
        "--placement", choices=sorted(PLACEMENT), default="split",
        help="split: the two processes on two cores (default); same: one core; free: unpinned",
    )
    parser.add_argument("--only", choices=("all", "remote"), default="all",
                        help="remote: the cross-node cases alone (CURVE against HMAC)")
    parser.add_argument(
        "--baseline", metavar="REV",
        help="also measure the ring of git revision REV against the checkout's, interleaved (JSON 'compare')",
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the --baseline comparison")
    parser.add_argument("--compare-only", action="store_true", help="with --baseline: skip the other cases")
    args = parser.parse_args(argv)
    if args.compare_only and not args.baseline:
        parser.error("--compare-only needs --baseline")
    # Absolute CPU ids, taken before anything is pinned (children inherit the parent's mask).
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    cpus = tuple(None if slot is None else available[slot % len(available)] for slot in PLACEMENT[args.placement])
    context = multiprocessing.get_context("spawn")
    scale = args.scale
    began = time.monotonic()
    loadavg_at_start = [round(load, 2) for load in os.getloadavg()]
    comparison = compare(context, args.baseline, args.rounds, scale, cpus) if args.baseline else None
    if comparison is not None:
        _print_comparison(comparison)
        if args.compare_only:  # the comparison alone, written as the JSON's `compare`
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "benchmark": "ring-compare", "machine": _machine(None, loadavg_at_start),
                "config": {"placement": args.placement, "cpus": list(cpus), "scale": scale},
                "compare": comparison, "wall_s": round(time.monotonic() - began, 1)}, indent=1))
            print(f"wrote {args.json}")
            return 0
    samples: dict[str, list[float]] = {}
    torch_version = None
    if args.only == "all":
        samples["embxfer_hot"] = ring_round_trips(context, int(50_000 * scale), 30.0, cpus)
        samples["embxfer_parked"] = ring_round_trips(context, int(10_000 * scale), 0.0, cpus)
        samples["zmq_ipc"] = zmq_round_trips(context, int(20_000 * scale), cpus)
        samples["mp_queue"] = queue_round_trips(context, int(10_000 * scale), cpus)
        samples["gloo_allreduce"], torch_version = gloo_round_trips(context, int(5_000 * scale), cpus)
    remote_samples, streams = _remote_cases(context, scale, cpus)
    samples.update(remote_samples)
    cases = [
        {
            "name": name,
            "p50_us": round(_percentile(values, 0.5), 2) if values else None,
            "p99_us": round(_percentile(values, 0.99), 2) if values else None,
            "mean_us": round(sum(values) / max(1, len(values)), 2),
            "samples": len(values),
        }
        for name, values in samples.items()
    ]
    p50 = {case["name"]: case["p50_us"] for case in cases}
    remote_idle = remote_idle_cpu_fraction(context, 5.0)

    def ratio(numerator: str, denominator: str) -> float | None:
        return round(p50[numerator] / p50[denominator], 2) if p50.get(numerator) and p50.get(denominator) else None

    result: dict[str, object] = {
        "benchmark": "ring" if args.only == "all" else "ring-remote",
        "machine": _machine(torch_version, loadavg_at_start),
        "config": {
            "record_bytes": len(RECORD),
            "ring_slots": 64,
            "slot_bytes": 128,
            "throughput_slots": 1024,
            "throughput_poll_many_batch": 256,
            "remote_frame_bytes": len(FRAME),
            "remote_stream_frames": {f"{size}B": count for size, count in STREAM_FRAMES.items()},
            "remote_heartbeat_interval_s": LINK_HEARTBEAT_S,
            "placement": args.placement,
            "cpus": list(cpus),
            "only": args.only,
        },
        "cases": cases,
        "remote_stream_frames_per_s": streams,
        "remote_idle_cpu_fraction": round(remote_idle, 5),
        "remote_curve_vs_hmac_ratio": ratio("remote_link_curve", "remote_link_hmac"),
        "zmq_tcp_curve_vs_plain_ratio": ratio("zmq_tcp_curve", "zmq_tcp"),
        "remote_vs_zmq_tcp_ratio": ratio("remote_link_curve", "zmq_tcp_curve"),
    }
    met = {
        "remote_p50_us": bool(p50["remote_link_curve"]) and p50["remote_link_curve"] <= TARGETS["remote_p50_us"],
        "remote_idle_cpu_fraction": remote_idle < TARGETS["remote_idle_cpu_fraction"],
    }
    records_per_s = idle = hot_ratio = None
    if args.only == "all":
        # Two spinning processes own both cores of the development machine: anything else
        # that runs meanwhile halves the rate, so the best of three runs is the headline.
        throughput_runs = [throughput(context, int(500_000 * scale), cpus) for _ in range(3)]
        records_per_s = max(throughput_runs)
        batch_runs = [throughput(context, int(500_000 * scale), cpus, batch=256) for _ in range(3)]
        idle = idle_cpu_fraction(context, 5.0)
        hot_ratio = p50["zmq_ipc"] / p50["embxfer_hot"] if p50["embxfer_hot"] else float("nan")
        result.update({
            "throughput_records_per_s": round(records_per_s),
            "throughput_runs_records_per_s": [round(rate) for rate in throughput_runs],
            "throughput_poll_many_records_per_s": round(max(batch_runs)),
            "throughput_poll_many_runs_records_per_s": [round(rate) for rate in batch_runs],
            "idle_cpu_fraction": round(idle, 5),
            "hot_vs_zmq_ratio": round(hot_ratio, 1) if hot_ratio == hot_ratio else None,
        })
        met.update({
            "hot_p50_us": bool(p50["embxfer_hot"]) and p50["embxfer_hot"] <= TARGETS["hot_p50_us"],
            "hot_vs_zmq_ratio": hot_ratio >= TARGETS["hot_vs_zmq_ratio"],
            "parked_p50_us": p50["embxfer_parked"] <= TARGETS["parked_p50_us"],
            "throughput_records_per_s": records_per_s >= TARGETS["throughput_records_per_s"],
            "idle_cpu_fraction": idle < TARGETS["idle_cpu_fraction"],
        })
    result.update({
        "targets": TARGETS,
        "met": met,
        "loadavg_at_end": [round(load, 2) for load in os.getloadavg()],
        "wall_s": round(time.monotonic() - began, 1),
    })
    if comparison is not None:
        result["compare"] = comparison
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(samples, args.json.with_suffix(".png"), args.placement)
    for case in cases:
        print(f"{case['name']:<21} p50 {case['p50_us']} us   p99 {case['p99_us']} us")
    for name, rate in streams.items():
        print(f"{name:<32} {rate:,} frames/s")
    if records_per_s is not None:
        print(f"throughput       {records_per_s:,.0f} records/s (poll_many(256): {max(batch_runs):,.0f})")
        print(f"idle parked CPU  {idle:.3%} of a core")
        print(f"zmq / hot        {hot_ratio:.1f}x")
    print(f"idle link CPU    {remote_idle:.3%} of a core")
    print(f"CURVE / HMAC round trip {result['remote_curve_vs_hmac_ratio']}x   met: {met}   ({result['wall_s']} s)")
    if comparison is not None:
        _print_comparison(comparison)
    return 0


def _print_comparison(comparison: dict[str, object]) -> None:
    print(f"before = {comparison['baseline']} ({comparison['baseline_commit'][:10]}), after = checkout, "
          f"{comparison['rounds']} interleaved rounds: median [min - max]")
    for case, figures in comparison["summary"].items():
        line = "   ".join(
            f"{side} {figures[side]['median']:,.2f} [{figures[side]['min']:,.2f} - {figures[side]['max']:,.2f}]"
            for side in ("before", "after", "after_over_before")
        )
        print(f"  {case:<15} {line}")


if __name__ == "__main__":
    raise SystemExit(main())
