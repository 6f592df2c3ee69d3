"""Helpers for tests that run `embxfer demo` as a real local world of processes."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

DEMO = [sys.executable, "-m", "embxfer.demo"]
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


@dataclass
class DemoRun:
    process: subprocess.Popen
    started: float

    def children(self) -> dict[int, int]:
        """rank -> pid of the spawned ranks alive now."""
        path = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
        try:
            pids = [int(p) for p in open(path).read().split()]
        except OSError:
            return {}
        ranks = {}
        for pid in pids:
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = pid
        return ranks

    def wait_until_connected(self, world_size: int, timeout: float = 120.0) -> dict[int, int]:
        """Until every rank has created its control ring (transfers start right after)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ranks = self.children()
            if len(ranks) == world_size and all(
                any(name.split("-")[-2] == str(pid) for name in os.listdir("/dev/shm")) for pid in ranks.values()
            ):
                return ranks
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                raise AssertionError(f"demo exited early with {self.process.returncode}: {err[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"ranks did not connect within {timeout}s")

    def finish(self, timeout: float) -> tuple[int, str, str]:
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in self.children().values():
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
            out, err = self.process.communicate()
            raise AssertionError(f"demo did not finish within {timeout}s:\n{err[-3000:]}") from None
        return self.process.returncode, out, err


def start_demo(*args: str, env: dict[str, str] | None = None, prefix: str = "embxfer") -> DemoRun:
    full_env = dict(os.environ, **(env or {}), EMBXFER_SHM_PREFIX=prefix)
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    process = subprocess.Popen([*DEMO, "--quiet", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=full_env)
    return DemoRun(process, time.time())


def run_demo(*args: str, timeout: float = 240.0, env: dict[str, str] | None = None,
             prefix: str = "embxfer") -> tuple[int, str, str]:
    return start_demo(*args, env=env, prefix=prefix).finish(timeout)


def log_times(text: str, needle: str) -> list[float]:
    """Wall-clock times (epoch seconds) of log lines containing `needle`."""
    times = []
    for line in text.splitlines():
        match = LOG_TIME.match(line)
        if match and needle in line:
            stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
            times.append(stamp)
    return times


def unique_prefix() -> str:
    """A shared-memory prefix of one test's own, so its leftovers are told apart from any
    other run on the machine."""
    return f"embxferT{os.getpid()}{random.randrange(1 << 20):05x}"[:24]


def shm_entries(prefix: str) -> set[str]:
    """Segments and doorbells in /dev/shm whose names start with `prefix-`."""
    return {n for n in os.listdir("/dev/shm") if n.removeprefix("sem.").startswith(prefix + "-")}


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own, killed whole on timeout, so a stuck
    launcher (torchrun) leaves no ranks behind."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"{cmd[:6]} did not finish within {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, process.returncode, out, err)
