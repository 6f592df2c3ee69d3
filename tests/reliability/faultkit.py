"""Run `embxfer demo` in a session of its own, hurt it, and time how long it takes to be
gone: every process of the session, and every /dev/shm entry of its prefix.

The session, not the launcher's children, is what is watched: once the launcher is
killed its ranks are re-parented, and only their session id still says they are ours.
Whatever happens in a test, `close()` kills what is left of the session and removes
what the run left in /dev/shm, so a failing test never leaves processes or segments.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.procs import shm_entries, unique_prefix

DEMO = [sys.executable, "-m", "embxfer.demo", "--quiet"]


def _live_processes():
    """(pid, session id, environment entries) of every live (non-zombie) process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
            fields = raw[raw.rindex(b")") + 2 :].split()
            if fields[0] in (b"Z", b"X"):
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        yield int(entry), int(fields[3]), environ


def _selected(environ: list[bytes], keys: tuple[bytes, ...]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, _, v in (e.partition(b"=") for e in environ) if k in keys}


def session_processes(session: int) -> dict[int, dict[str, str]]:
    """pid -> selected environment (RANK, EMBXFER_NODE_ID) of every live (non-zombie)
    process of `session`."""
    return {pid: _selected(environ, (b"RANK", b"EMBXFER_NODE_ID"))
            for pid, sid, environ in _live_processes() if sid == session}


def prefix_processes(prefix: str) -> dict[int, dict[str, str]]:
    """pid -> RANK of every live process whose environment has EMBXFER_SHM_PREFIX=prefix
    (torchrun starts its workers in sessions of their own)."""
    wanted = f"EMBXFER_SHM_PREFIX={prefix}".encode()
    return {pid: _selected(environ, (b"RANK",)) for pid, _, environ in _live_processes() if wanted in environ}


def all_shm_entries(prefix: str) -> set[str]:
    """Entries of `prefix` and of the per-node prefixes `--nodes` derives from it."""
    pattern = re.compile(rf"^(sem\.)?{re.escape(prefix[:20])}(\.n\d)?-")
    return {n for n in os.listdir("/dev/shm") if pattern.match(n)} | shm_entries(prefix)


class DemoSession:
    """One `embxfer demo` (the launcher and its ranks) in a session of its own."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.prefix = unique_prefix()
        full_env = dict(os.environ, **(env or {}), EMBXFER_SHM_PREFIX=self.prefix)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            full_env.pop(name, None)
        self.process = subprocess.Popen([*DEMO, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=full_env, start_new_session=True)
        self.session = self.process.pid
        self.out = self.err = ""

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the ranks alive now."""
        return {int(env["RANK"]): pid for pid, env in session_processes(self.session).items()
                if "RANK" in env and pid != self.process.pid}

    def nodes(self) -> dict[str, list[int]]:
        """simulated node id -> pids of its ranks alive now."""
        by_node: dict[str, list[int]] = {}
        for pid, env in session_processes(self.session).items():
            if "RANK" in env and pid != self.process.pid:
                by_node.setdefault(env.get("EMBXFER_NODE_ID", ""), []).append(pid)
        return by_node

    def wait_until_connected(self, world_size: int, timeout: float = 120.0) -> dict[int, int]:
        """Until every rank runs and has created its ring and doorbell."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ranks = self.ranks()
            if len(ranks) == world_size and all(
                sum(f"-{pid}-" in name for name in all_shm_entries(self.prefix)) >= 2 for pid in ranks.values()
            ):
                return ranks
            if self.process.poll() is not None:
                self.collect(5.0)
                raise AssertionError(f"demo exited early with {self.process.returncode}: {self.err[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"ranks did not connect within {timeout}s")

    def wait_until_gone(self, since: float, timeout: float) -> float:
        """Seconds from `since` (time.monotonic()) until no process of the session and no
        /dev/shm entry of its prefix is left; AssertionError past `timeout`."""
        deadline = since + timeout
        while True:
            now = time.monotonic()
            if not session_processes(self.session) and not all_shm_entries(self.prefix):
                return now - since
            if now > deadline:
                left = session_processes(self.session)
                raise AssertionError(f"{timeout:.1f}s after the fault: processes {left}, "
                                     f"/dev/shm {sorted(all_shm_entries(self.prefix))}")
            time.sleep(0.02)

    def collect(self, timeout: float) -> tuple[int | None, str, str]:
        """The launcher's status and what the session wrote (the ranks share its pipes)."""
        try:
            self.out, self.err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            self.out, self.err = self.process.communicate()
        return self.process.returncode, self.out, self.err

    def close(self) -> None:
        """Kill what is left of the session; remove what it left in /dev/shm."""
        for pid in session_processes(self.session):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for name in all_shm_entries(self.prefix):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass

    def __enter__(self) -> DemoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
