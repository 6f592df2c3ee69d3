"""Two separately launched engines (docs/examples/two_engines.py) joined by rendezvous.

Every engine is started on its own, as separate `python` processes or one `torchrun` per
engine, with its own default process group on which the example runs collectives before,
during and after the transfers; embxfer's world is formed by `embxfer.connect()` at a
rendezvous address. Each test has a hard timeout, kills every process it started (and
their children) if it fails, and checks that nothing with its own shared-memory prefix is
left in /dev/shm and that the rendezvous port is closed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embxfer.runtime.launch import free_port
from tests.procs import shm_entries, unique_prefix

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "docs" / "examples" / "two_engines.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "EMBXFER_RENDEZVOUS", "EMBXFER_NODE_ID", "EMBXFER_BIND_HOST")
REQUESTS = 50


def child_env(prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_ENV and not k.startswith("TORCHELASTIC_") and not k.startswith("EMBXFER_")}
    env.update(EMBXFER_SHM_PREFIX=prefix, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               EMBXFER_SECRET="two-engines-test-secret-" + prefix)
    return env


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun starts its workers in sessions of their own,
    so killing the launcher's process group would not reach them)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in open(f"/proc/{parent}/task/{task}/children").read().split()]
            except OSError:
                continue
            found.extend(children)
            frontier.extend(children)
    return found


class Engines:
    """Processes of one test, each in a session of its own; whatever is still alive when the
    block ends (a failure, a timeout) is killed, children first, by process id."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.server: subprocess.Popen | None = None

    def start(self, name: str, command: list[str]) -> None:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=child_env(self.prefix), cwd=ROOT, start_new_session=True)
        self.processes.append((name, process))

    def example(self, name: str, *args: str) -> None:
        self.start(name, [sys.executable, EXAMPLE, *args])

    def rendezvous(self) -> str:
        """`embxfer rendezvous` on a free port: its address once it listens."""
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "embxfer.runtime.rendezvous", "--port", str(port)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=child_env(self.prefix), cwd=ROOT, start_new_session=True)
        self.server = process
        address = f"tcp://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not listening(address):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        return address

    def stop_rendezvous(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            self.server.communicate(timeout=10)

    def finish(self, timeout: float) -> dict[str, tuple[int, str, str]]:
        deadline = time.monotonic() + timeout
        outcomes = {}
        for name, process in self.processes:
            try:
                out, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{name} (and the others) did not finish within {timeout:g} s")
            outcomes[name] = (process.returncode, out, err)
        return outcomes

    def kill(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.communicate()
        for _, process in self.processes:
            if process.poll() is None:
                for pid in [*reversed(descendants(process.pid)), process.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                process.wait()

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        for _, process in self.processes:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


def listening(address: str) -> bool:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def assert_clean(outcomes: dict[str, tuple[int, str, str]], prefix: str, address: str) -> None:
    for name, (_, _, err) in outcomes.items():
        assert "Traceback" not in err and "terminate called" not in err, f"{name}:\n{err[-3000:]}"
    assert shm_entries(prefix) == set()
    assert not listening(address)


def assert_transferred(outcomes: dict[str, tuple[int, str, str]], encoder_tp: int, language_tp: int,
                       encoders: int = 1) -> None:
    for name, (code, out, err) in outcomes.items():
        assert code == 0, f"{name} exited {code}:\n{out[-2000:]}\n{err[-3000:]}"
    text = "".join(out for _, out, _ in outcomes.values())
    for rank in range(language_tp):
        assert f"language TP rank {rank}: {REQUESTS}/{REQUESTS} requests bit-exact" in text, text
        assert f"language TP rank {rank}: closed" in text, text
    for engine in range(encoders):
        for rank in range(encoder_tp):
            sent = len(range(engine, REQUESTS, encoders))
            assert f"encoder engine {engine} TP rank {rank}: {sent} requests sent, 0 failed" in text, text
            assert f"encoder engine {engine} TP rank {rank}: closed" in text, text
    assert "blocks in use 0" in text
    # The engine's own group ran its collectives before, during and after the transfers.
    # (Workers of one torchrun share its stdout: their lines may interleave.)
    runs = [int(count) for count in re.findall(r"ran (\d+) collectives", text)]
    assert len(runs) == encoders * encoder_tp + language_tp and min(runs) >= 3, text


@pytest.mark.timeout(150)
@pytest.mark.parametrize("encoders,encoder_tp,language_tp", [(1, 1, 2), (1, 2, 1), (2, 1, 1)])
def test_separately_launched_python_engines_move_50_requests_bit_exact(encoders: int, encoder_tp: int,
                                                                       language_tp: int) -> None:
    prefix = unique_prefix()
    with Engines(prefix) as engines:
        address = engines.rendezvous()
        language_world = f"tcp://127.0.0.1:{free_port()}"
        for rank in range(language_tp):
            engines.example(f"language {rank}", "language", "--rendezvous", address, "--encoders", str(encoders),
                            "--tp-rank", str(rank), "--tp-size", str(language_tp), "--engine-address",
                            language_world, "--requests", str(REQUESTS), "--timeout", "90")
        for engine in range(encoders):
            encoder_world = f"tcp://127.0.0.1:{free_port()}"
            for rank in range(encoder_tp):
                engines.example(f"encoder {engine}/{rank}", "encoder", "--rendezvous", address, "--engine",
                                str(engine), "--tp-rank", str(rank), "--tp-size", str(encoder_tp),
                                "--engine-address", encoder_world, "--encoders", str(encoders), "--requests",
                                str(REQUESTS), "--timeout", "90")
        outcomes = engines.finish(timeout=120)
        engines.stop_rendezvous()
    assert_transferred(outcomes, encoder_tp, language_tp, encoders)
    assert_clean(outcomes, prefix, address)


@pytest.mark.timeout(150)
def test_two_torchrun_commands_move_50_requests_bit_exact() -> None:
    prefix = unique_prefix()
    with Engines(prefix) as engines:
        address = engines.rendezvous()
        for role, size in (("language", 2), ("encoder", 1)):
            engines.start(role, [TORCHRUN, "--nproc-per-node", str(size), "--master-port", str(free_port()),
                                 EXAMPLE, role, "--rendezvous", address, "--requests", str(REQUESTS),
                                 "--timeout", "90"])
        outcomes = engines.finish(timeout=120)
        engines.stop_rendezvous()
    assert_transferred(outcomes, encoder_tp=1, language_tp=2)
    assert_clean(outcomes, prefix, address)


# A process that calls connect() directly, without an engine world of its own, so that
# a missing TP rank of an engine leaves its other ranks free to reach connect().
CONNECT = """
import sys, time, embxfer
embxfer.connect  # loads torch and the runtime before the clock starts
role, tp_rank, tp_size, address, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
started = time.monotonic()
try:
    embxfer.connect(role, tp_rank=tp_rank, tp_size=tp_size, dim=64, rendezvous_address=address, timeout_s=timeout,
                    wait_for=["language0" if role == "encoder" else "encoder0"]).close()
except TimeoutError as exc:
    print(f"ELAPSED {time.monotonic() - started:.3f}")
    print(f"TimeoutError: {exc}")
    sys.exit(4)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("missing", ["encoder engine 1", "language TP rank 1"])
def test_a_rank_that_never_arrives_is_named_within_the_deadline(missing: str) -> None:
    """The engine that waits for the missing one names it at its deadline."""
    prefix = unique_prefix()
    timeout_s = 4.0
    with Engines(prefix) as engines:
        address = engines.rendezvous()
        if missing == "encoder engine 1":
            # Both engines run the example (with their own worlds); the language engine
            # expects a second encoder engine, which is never launched.
            language_world = f"tcp://127.0.0.1:{free_port()}"
            for rank in range(2):
                engines.example(f"language {rank}", "language", "--rendezvous", address, "--encoders", "2",
                                "--tp-rank", str(rank), "--tp-size", "2", "--engine-address", language_world,
                                "--timeout", str(timeout_s))
            # Its own deadline is later, so that what ends it is the language engine giving up.
            engines.example("encoder 0", "encoder", "--rendezvous", address, "--tp-rank", "0", "--tp-size", "1",
                            "--engine-address", f"tcp://127.0.0.1:{free_port()}", "--timeout", str(3 * timeout_s))
            expected = "engine 'encoder1' never joined"
        else:
            for role, rank, size in (("language", 0, 2), ("encoder", 0, 1)):
                engines.start(f"{role} {rank}", [sys.executable, "-c", CONNECT, role, str(rank), str(size), address,
                                                 str(timeout_s)])
            expected = "its own engine 'language0' is joining (TP rank(s) 1 never joined)"
        started = time.monotonic()
        outcomes = engines.finish(timeout=60)
        engines.stop_rendezvous()
    for name, (code, out, err) in outcomes.items():
        if missing == "language TP rank 1" and name.startswith("encoder"):
            # The encoder waits for language0, which never becomes whole: it names that. Both
            # deadlines are timeout_s from each process's own start, so on a slow machine the
            # language engine may give up first: then the encoder names it dead, also right.
            assert code != 0 and ("engine 'language0' is joining" in out + err
                                  or "engine 'language0' is dead" in out + err), f"{name}:\n{out}\n{err[-2000:]}"
            continue
        if missing == "encoder engine 1" and name.startswith("encoder"):
            # Only the language engine waits for encoder1; encoder0 joined, and cannot
            # finish once the language engine gave up (it fails, naming what it lost).
            assert code != 0 and "language engine 'language0'" in err, f"{name}:\n{out}\n{err[-2000:]}"
            continue
        assert code != 0, f"{name} exited 0:\n{out}\n{err[-2000:]}"
        assert expected in out + err, f"{name}:\n{out}\n{err[-2000:]}"
    # Each process's deadline runs from its own start (a Python start-up with torch takes
    # seconds on a busy machine); none waits much past it.
    assert time.monotonic() - started < timeout_s + 25
    for name, (_, out, _) in outcomes.items():
        if "ELAPSED " in out:
            assert float(out.split("ELAPSED ")[1].split()[0]) < timeout_s + 2.0, f"{name}:\n{out}"
    assert_clean(outcomes, prefix, address)
