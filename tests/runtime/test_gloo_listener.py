"""What an outsider can do to gloo's listening port (torch's own exposure; not patched
here), and what bounds it. See docs/security-notes-gloo.md for the figures.

Two ranks make a gloo group the way runtime/groups.py's `_make_gloo` does
(`ProcessGroupGloo` over a `PrefixStore` of a `TCPStore`, `create_device(hostname=...)`);
an outsider on 127.0.0.1 connects to rank 1's gloo listener and closes at once:

- every such connection stays open in rank 1 (CLOSE_WAIT) for as long as the group
  lives, and the group keeps working;
- at the descriptor limit gloo's accept fails and the rank aborts (SIGABRT, "accept:
  Too many open files");
- destroying the group frees every leaked descriptor, and a group made again over a new
  store prefix works at once: re-making the group bounds the exposure;
- the listener is bound to the hostname given to `create_device` alone.

If gloo stops leaking (a torch upgrade), the first assertion says so: then update the
notes. Ranks are plain subprocesses with deadlines on every read, killed and reaped
whatever happens.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(120)

HOST = "127.0.0.1"
FLOOD = 400
LOW_LIMIT = 256  # RLIMIT_NOFILE of the rank that is flooded to death: FLOOD cannot fit

RANK = r"""
import gc, os, resource, sys
from datetime import timedelta
rank, store_port, host, limit = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if limit:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
import torch
import torch.distributed as dist

store = dist.TCPStore(host, store_port, 2, rank == 0, timeout=timedelta(seconds=60))

def make(generation):  # as runtime/groups.py _make_gloo, with local_address=host
    gloo = dist.ProcessGroupGloo
    options = gloo._Options()
    options._devices = [gloo.create_device(hostname=host)]
    options._timeout = timedelta(seconds=30)
    options._threads = 2
    return gloo(dist.PrefixStore(f"meta{generation}/", store), rank, 2, options)

group = make(0)
print("ready", flush=True)
for line in sys.stdin:
    command = line.split()
    if command[0] == "allreduce":
        values = torch.ones(4) * (rank + 1)
        group.allreduce([values]).wait()
        print("sum", int(values[0].item()), flush=True)
    elif command[0] == "destroy":
        group = None
        gc.collect()
        print("destroyed", flush=True)
    elif command[0] == "make":
        group = make(int(command[1]))
        print("made", flush=True)
    else:
        break
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_sockets(pid: int) -> list[tuple[str, int, str]]:
    """(local ip as hex, local port, state as hex) of each TCP socket `pid` holds."""
    inodes, sockets = _socket_inodes(pid), []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as entries:
            next(entries)
            for entry in entries:
                fields = entry.split()
                if fields[9] in inodes:
                    address, port = fields[1].split(":")
                    sockets.append((address, int(port, 16), fields[3]))
    return sockets


LISTEN, CLOSE_WAIT = "0A", "08"


class Ranks:
    """Two ranks of one gloo group; rank 1 with RLIMIT_NOFILE `limit` (0: inherited)."""

    def __init__(self, limit: int = 0) -> None:
        port = _free_port()
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-c", RANK, str(rank), str(port), HOST, str(limit if rank == 1 else 0)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for rank in range(2)
        ]
        self.store_port = port
        assert self.ask("") == ["ready", "ready"]

    def ask(self, command: str, timeout: float = 60.0) -> list[str]:
        if command:
            for process in self.processes:
                process.stdin.write(command + "\n")
                process.stdin.flush()
        answers = []
        for process in self.processes:
            ready, _, _ = select.select([process.stdout], [], [], timeout)
            assert ready, f"rank {process.pid} did not answer {command!r} within {timeout} s"
            answers.append(process.stdout.readline().strip())
        return answers

    def gloo_port(self, rank: int) -> int:
        """Rank's listening port other than the store's."""
        ports = [port for _, port, state in _tcp_sockets(self.processes[rank].pid)
                 if state == LISTEN and port != self.store_port]
        assert len(ports) == 1, ports
        return ports[0]

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    process.stdin.write("quit\n")
                    process.stdin.flush()
                except OSError:
                    pass
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _connect_and_close(port: int, count: int) -> int:
    done = 0
    for _ in range(count):
        try:
            with socket.create_connection((HOST, port), timeout=2):
                done += 1
        except OSError:
            break
    return done


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_gloo_listener_leaks_a_descriptor_per_connection_until_the_group_is_remade(capsys):
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < FLOOD + 200:
        pytest.skip(f"RLIMIT_NOFILE {soft}: no room for {FLOOD} leaked descriptors")
    ranks = Ranks()
    try:
        pid = ranks.processes[1].pid
        port = ranks.gloo_port(1)
        # Bound where create_device(hostname=) said, not on every interface.
        listeners = [address for address, local_port, state in _tcp_sockets(pid)
                     if local_port == port and state == LISTEN]  # (the pair's accepted side shares the port)
        assert listeners == ["0100007F"], listeners
        assert ranks.ask("allreduce") == ["sum 3", "sum 3"]
        baseline = _fds(pid)
        assert _connect_and_close(port, FLOOD) == FLOOD
        time.sleep(0.5)
        leaked = sum(state == CLOSE_WAIT for _, local_port, state in _tcp_sockets(pid) if local_port == port)
        flooded = _fds(pid)
        assert leaked == FLOOD and flooded >= baseline + FLOOD, (
            f"gloo no longer keeps closed connections ({leaked} CLOSE_WAIT, {baseline} -> {flooded} fds): "
            "update docs/security-notes-gloo.md"
        )
        assert ranks.ask("allreduce") == ["sum 3", "sum 3"]  # the group still works
        # Re-making the group frees what the old one leaked; the new one works at once.
        assert ranks.ask("destroy") == ["destroyed", "destroyed"]
        after_destroy = _fds(pid)
        began = time.monotonic()
        assert ranks.ask("make 1") == ["made", "made"]
        remade_s = time.monotonic() - began
        assert ranks.ask("allreduce") == ["sum 3", "sum 3"]
        new_port = ranks.gloo_port(1)
        remade = _fds(pid)
        assert remade <= baseline + 2, (baseline, flooded, after_destroy, remade)
    finally:
        ranks.close()
    with capsys.disabled():
        print(f"\ngloo listener: {FLOOD} connect+close -> {leaked} CLOSE_WAIT, rank fds {baseline} -> {flooded}; "
              f"destroyed {after_destroy}, re-made in {remade_s * 1000:.0f} ms -> {remade} (port {port} -> {new_port})")


def test_at_the_descriptor_limit_gloo_aborts_the_rank():
    ranks = Ranks(limit=LOW_LIMIT)
    try:
        pid = ranks.processes[1].pid
        port = ranks.gloo_port(1)
        assert ranks.ask("allreduce") == ["sum 3", "sum 3"]
        _connect_and_close(port, FLOOD)
        deadline = time.monotonic() + 20
        while ranks.processes[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        code = ranks.processes[1].poll()
        stderr = ranks.processes[1].stderr.read() if code is not None else ""
        assert code == -6 and "accept: Too many open files" in stderr, (
            f"rank 1 (pid {pid}, RLIMIT_NOFILE {LOW_LIMIT}) after {FLOOD} connections: exit {code}, "
            f"stderr {stderr[-300:]!r}: gloo changed, update docs/security-notes-gloo.md"
        )
    finally:
        ranks.close()
