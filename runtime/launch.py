"""Spawning a local world, picking a device, and the default-group world of the benchmarks.

`spawn_local_world` runs an entry point as a local world of subprocesses when there is
no torchrun (`embxfer demo`), with a deadline and no orphans: ranks die with the
launcher, a failed rank stops the world within the peer timeout, and what dead ranks
left in /dev/shm is removed.

`init_world` (used by `bench/e2e.py` only; the runtime builds its groups with
`embxfer.connect()`) reads the torchrun environment, joins (or reuses) the default
process group and makes two groups on it: `data_group` for point-to-point staging chunks
(NCCL on GPUs, gloo on CPU) and `meta_group` (gloo).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

CHILD_ENV = "EMBXFER_SPAWNED_CHILD"
# After SIGTERM, a rank has this long to tear down before it is killed (a rank bounds its
# own tear-down a little below this, see demo.TEARDOWN_GRACE_S).
STOP_GRACE_S = 4.0
# After Ctrl-C (which every rank receives too), how long ranks get to end on their own
# before the launcher sends SIGTERM (a rank's tear-down takes about 0.4 s).
INTERRUPT_GRACE_S = 1.5
# Deaths by signal that are a rank's own doing, never the launcher's.
_CRASHES = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    data_group: object
    meta_group: object
    owns_default_group: bool = True

    def close(self) -> None:
        """Destroy embxfer's groups; the default group only if `init_world` created it (an
        engine that initialised torch.distributed itself keeps it)."""
        if not dist.is_initialized():
            return
        if self.owns_default_group:
            dist.destroy_process_group()
        else:
            for group in (self.data_group, self.meta_group):
                dist.destroy_process_group(group)


def group_exchange(group: object, world_size: int, size: int = 128):
    """An `exchange(bytes) -> {rank: bytes}` over a gloo group (all_gather of fixed-size,
    zero-padded byte tensors: no pickle)."""

    def exchange(data: bytes) -> dict[int, bytes]:
        if len(data) > size:
            raise ValueError(f"exchange: {len(data)} bytes, at most {size}")
        mine = torch.zeros(size + 1, dtype=torch.uint8)
        mine[0] = len(data)
        mine[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[1:1]
        gathered = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine, group=group)
        return {rank: bytes(t[1 : 1 + int(t[0])].tolist()) for rank, t in enumerate(gathered)}

    return exchange


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(preference: str, world_size: int) -> str:
    """`auto`: CUDA when every rank can have a GPU of its own, else CPU."""
    if preference == "cpu":
        return "cpu"
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if preference == "cuda":
        if have < 1:
            raise ValueError("--device cuda: no CUDA device is visible")
        return "cuda"
    return "cuda" if have >= world_size else "cpu"


def init_world(device_kind: str, timeout_s: float) -> World:
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_kind == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    owns_default_group = not dist.is_initialized()
    if owns_default_group:
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo",
            rank=rank, world_size=world_size, timeout=timeout,
        )
    data_group = dist.new_group(backend=backend, timeout=timeout)
    meta_group = dist.new_group(backend="gloo", timeout=timeout)
    return World(rank, world_size, local_rank, device, backend, data_group, meta_group, owns_default_group)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int) -> Callable[[], None]:
    """What a spawned rank runs before exec: SIGTERM when the launcher dies (Linux
    `PR_SET_PDEATHSIG`), so a kill -9 of the launcher never leaves ranks running (they
    unwind and unlink their segments). A launcher that died before the call was made
    cannot send it: then the rank ends at once."""

    def arm() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:
            os._exit(128 + signal.SIGTERM)

    return arm


def spawn_local_world(module: str, argv: list[str], world_size: int, deadline_s: float,
                      node_of: list[int] | None = None, failure_grace_s: float = 30.0,
                      stop_grace_s: float = STOP_GRACE_S, extra_env: dict[str, str] | None = None) -> int:
    """Run `python -m module argv` as ranks 0..world_size-1 of a local world.

    `node_of[rank]` simulates several nodes on this machine: each simulated node gets a
    node id and a shared-memory prefix of its own, so its ranks reach the others through
    the cross-node path (zmq over loopback TCP), as on separate machines.

    Returns 0 when every rank succeeded, else the status of the first rank that failed by
    itself (128 + the signal number for one killed by a signal). Once a rank has failed
    the others get `failure_grace_s` to report it themselves; past that, or past the
    deadline, they get SIGTERM, and `stop_grace_s` later SIGKILL; what dead ranks left in
    /dev/shm is removed. `extra_env` is added to every rank's environment (the
    rendezvous address and the job's secret of `embxfer demo`).
    """
    port = free_port()
    started = time.monotonic()
    children: list[subprocess.Popen] = []
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                WORLD_SIZE=str(world_size), **{CHILD_ENV: "1"}, **(extra_env or {}))
    base.setdefault("OMP_NUM_THREADS", "1")
    # Stopping the spawner (SIGTERM from a scheduler, SIGINT) stops the world with it.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        node_of = node_of or [0] * world_size
        run = secrets.token_hex(3)
        prefix = os.environ.get("EMBXFER_SHM_PREFIX", "embxfer")
        for rank in range(world_size):
            node = node_of[rank]
            on_node = [r for r in range(world_size) if node_of[r] == node]
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(on_node.index(rank)),
                       LOCAL_WORLD_SIZE=str(len(on_node)))
            if len(set(node_of)) > 1:
                env.update(EMBXFER_NODE_ID=f"sim-{run}-node{node}", EMBXFER_SHM_PREFIX=f"{prefix[:20]}.n{node}")
            children.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env,
                                             preexec_fn=_die_with_parent(os.getpid())))
        deadline = time.monotonic() + deadline_s
        first_failure: tuple[int, int] | None = None
        while True:
            codes = [c.poll() for c in children]
            if first_failure is None:
                failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
                # Seen in one look, a rank killed by a signal is the cause; the others are
                # survivors that reported its loss.
                failed.sort(key=lambda item: item[1] >= 0)
                if failed:
                    # Give the survivors time to notice and report the failure themselves.
                    first_failure = failed[0]
                    deadline = min(deadline, time.monotonic() + failure_grace_s)
            if all(code is not None for code in codes):
                break
            running = [c for c, code in zip(children, codes, strict=True) if code is None]
            if first_failure is not None and all(_stopped(c.pid) for c in running):
                break  # what is left is stopped (SIGSTOP): it reports nothing, waiting is pointless
            if time.monotonic() > deadline:
                say(f"embxfer: stopping the local world ({'a rank failed' if first_failure else 'timeout'} "
                    f"after {time.monotonic() - started:.0f}s)")
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole foreground process group: the ranks got the SIGINT too
        # and end by themselves. Give them a moment before SIGTERM, else one still busy may
        # act on the launcher's SIGTERM first and report the wrong cause.
        _wait_all(children, INTERRUPT_GRACE_S)
        raise
    finally:
        _stop(children, stop_grace_s)
        _remove_leftovers()
        signal.signal(signal.SIGTERM, previous)
        for rank, child in enumerate(children):
            # A rank that crashed (SIGABRT, SIGSEGV) is news even when the world was being
            # stopped; SIGTERM and SIGKILL are what stopping it sends.
            if child.returncode is not None and -child.returncode in _CRASHES:
                say(f"embxfer: rank {rank} ended by {signal.Signals(-child.returncode).name}")
    codes = [c.returncode for c in children]
    if first_failure is not None:
        rank, code = first_failure
        if code < 0 and -code not in _CRASHES:
            say(f"embxfer: rank {rank} was killed by signal {-code} ({signal.Signals(-code).name})")
        return code if code > 0 else 128 - code
    return max((code if code >= 0 else 128 - code) for code in codes) if codes else 1


def _remove_leftovers() -> None:
    """Segments of ranks that died without closing (SIGKILL) would outlive the run."""
    try:
        from embxfer.control.hygiene import remove_segments

        from .config import Config

        prefix = Config.from_env().shm_prefix
        for name in (prefix, *(f"{prefix[:20]}.n{node}" for node in range(8))):
            remove_segments(stale_only=True, prefix=name)
    except Exception as exc:  # cleanup must never hide the run's own outcome
        say(f"embxfer: could not clean /dev/shm: {exc}")


def say(line: str) -> None:
    """One line on stderr, in one write: a launcher and its ranks share the stream, and
    `print` writes a text and its newline apart (two writes when stderr is unbuffered, as
    with PYTHONUNBUFFERED=1), so two ranks' lines could run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP, a debugger)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :].split()[0] in (b"T", b"t")


def _wait_all(children: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait (at most `timeout_s` in all) for every child to end."""
    end = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


def _stop(children: list[subprocess.Popen], grace_s: float) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.send_signal(signal.SIGCONT)  # a stopped rank wakes up to tear down
    end = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
