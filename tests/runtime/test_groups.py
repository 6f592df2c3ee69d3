"""embxfer's own groups (runtime/groups.py): separately launched engines join by
rendezvous without touching their default groups; missing members and conflicts are
named; the torchrun one-world mode goes through the same call; Ctrl-C never aborts.

Multi-process tests run real `python` processes (tests/runtime/groups_worker.py), each
in a process group of its own that is killed whole if the test fails or times out.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from embxfer.runtime.groups import StatelessGroups, parse_address, rendezvous
from embxfer.runtime.launch import free_port
from embxfer.runtime.topology import Topology
from tests.procs import run_group

WORKER = str(Path(__file__).with_name("groups_worker.py"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "EMBXFER_RENDEZVOUS")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


class Processes:
    """Worker processes started together; whatever is still alive at exit is killed whole."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, *args: str, env: dict[str, str] | None = None, join: subprocess.Popen | None = None) -> subprocess.Popen:
        # Own process group each (or `join`'s, to be interrupted together like a terminal's Ctrl-C).
        process = subprocess.Popen(
            [sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env or child_env(), process_group=0 if join is None else join.pid,
        )
        self.processes.append(process)
        return process

    def finish(self, timeout: float) -> list[tuple[int, str, str]]:
        deadline = time.monotonic() + timeout
        outcomes = []
        for process in self.processes:
            try:
                out, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"workers did not finish within {timeout}s") from None
            outcomes.append((process.returncode, out, err))
        return outcomes

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        for process in self.processes:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


def results(outcomes: list[tuple[int, str, str]]) -> list[dict]:
    parsed = []
    for code, out, err in outcomes:
        assert code == 0, f"worker exited {code}:\n{out[-2000:]}\n{err[-3000:]}"
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, out
        parsed.append(json.loads(lines[0][len("RESULT "):]))
    return sorted(parsed, key=lambda r: r["rank"])


def listening(address: str) -> bool:
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def shm_of(pids: list[int]) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if any(f"-{pid}-" in name for pid in pids)]


def gpus_for(count: int) -> None:
    if torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} CUDA devices (NCCL will not put two ranks on one GPU)")


# --------------------------------------------------------------------------- two engines


@pytest.mark.parametrize("encoder_tp,language_tp,device,late_s", [
    (1, 2, "cpu", 2.0),
    (2, 1, "cpu", 0.0),
    pytest.param(1, 1, "cuda", 2.0, marks=pytest.mark.gpu),
])
def test_separately_launched_engines_join_and_exchange(encoder_tp: int, language_tp: int, device: str,
                                                       late_s: float) -> None:
    if device == "cuda":
        gpus_for(encoder_tp + language_tp)
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    rng = random.Random(seed)
    address = f"tcp://127.0.0.1:{free_port()}"
    engine_ports = {"encoder": free_port(), "language": free_port()}
    members = [("encoder", r, encoder_tp) for r in range(encoder_tp)] + [("language", r, language_tp) for r in range(language_tp)]
    rng.shuffle(members)
    late = rng.randrange(len(members))
    with Processes() as workers:
        for index, (role, tp_rank, tp_size) in enumerate(members):
            env = child_env(CUDA_VISIBLE_DEVICES=str(index)) if device == "cuda" else None
            workers.start("engine", "--rendezvous", address, "--role", role, "--tp-rank", str(tp_rank),
                          "--tp-size", str(tp_size), "--engine-port", str(engine_ports[role]),
                          "--delay", str(late_s if index == late else 0.0), "--device", device, "--timeout", "40",
                          env=env)
        found = results(workers.finish(timeout=90))

    topology = Topology(1, encoder_tp, language_tp)
    assert [r["rank"] for r in found] == list(range(topology.world_size))
    assert len({r["job_id"] for r in found}) == 1
    for r in found:
        assert r["layout"] == [1, encoder_tp, language_tp]
        assert r["role"] == topology.role(r["rank"]).value and r["tp_rank"] == topology.tp_index(r["rank"])
        own_tp = encoder_tp if r["role"] == "encoder" else language_tp
        # The engine's default group was neither replaced nor resized.
        assert r["default"] == [own_tp, r["tp_rank"]]
        assert r["exchanged"] == (language_tp if r["role"] == "encoder" else encoder_tp)
        assert len(set(r["nodes"])) == 1
    assert not listening(address)


# --------------------------------------------------------------------------- missing members


def test_a_member_that_never_arrives_is_named_by_everyone_within_the_deadline() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    timeout_s = 3.0
    with Processes() as workers:
        for role, tp_rank, tp_size in (("language", 1, 2), ("encoder", 0, 1), ("language", 0, 2)):
            workers.start("engine", "--rendezvous", address, "--role", role, "--tp-rank", str(tp_rank),
                          "--tp-size", str(tp_size), "--encoders", "2", "--timeout", str(timeout_s))
        pids = [p.pid for p in workers.processes]
        outcomes = workers.finish(timeout=60)
    for code, out, err in outcomes:
        assert code == 4, f"exit {code}\n{out}\n{err[-2000:]}"
        assert f"encoder engine 1 TP rank 0 of 1 never arrived at {address}" in out, out
        elapsed = float(out.split("ELAPSED ")[1].split()[0])
        assert elapsed < timeout_s + 2.0, out
        assert "terminate called" not in err
    assert not listening(address)
    assert shm_of(pids) == []


def join_all(address: str, calls: list[dict], timeout_s: float = 10.0) -> list[BaseException | None]:
    """Run rendezvous calls in threads of this process; each one's exception (or None).
    A call's `delay` starts it later: a conflict that arrives once the others are
    registered reaches all of them (one that races the leader's own start may find only
    a store that is already gone: a ConnectionError)."""
    errors: list[BaseException | None] = [None] * len(calls)

    def join(index: int) -> None:
        call = dict(calls[index])
        time.sleep(call.pop("delay", 0.0))
        try:
            rendezvous(address, call.pop("role"), call.pop("engine"), call.pop("tp_rank"), call.pop("tp_size"),
                       timeout_s=timeout_s, **call).close()
        except BaseException as exc:  # noqa: B036 - reported to the test
            errors[index] = exc

    threads = [threading.Thread(target=join, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 10)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def member(role: str, engine: int, tp_rank: int, tp_size: int, **extra: object) -> dict:
    # `extra`: rendezvous keyword arguments, and `delay` (seconds) for join_all.
    return dict(role=role, engine=engine, tp_rank=tp_rank, tp_size=tp_size, **extra)


def test_a_leader_that_never_comes_up_is_named() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="language engine's TP rank 0, which hosts it, has not come up"):
        rendezvous(address, "encoder", 0, 0, 1, timeout_s=1.0)
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("calls,expected", [
    # Language TP rank 1 never comes, so the world cannot form before the conflict is seen.
    ([member("language", 0, 0, 2), member("encoder", 0, 0, 1), member("encoder", 0, 0, 1, delay=0.5)],
     "tp_rank=0: encoder engine 0 TP rank 0 of 1 .* is already registered by pid"),
    ([member("language", 0, 0, 1), member("encoder", 0, 0, 2), member("encoder", 0, 1, 3, delay=0.5)],
     r"tp_size=\d: encoder engine 0 TP rank \d of \d says tp_size=\d, but encoder engine 0 .* registered tp_size=\d"),
    ([member("language", 0, 0, 1, encoders=2), member("encoder", 0, 0, 1), member("encoder", 1, 0, 2, delay=0.5),
      member("encoder", 1, 1, 2, delay=0.5)],
     "every encoder engine must have the same TP size"),
    ([member("language", 0, 0, 1), member("encoder", 1, 0, 1)],
     "engine=1: encoder engine 1 TP rank 0 of 1 .* joined, but the language engine expects encoders=1"),
    ([member("language", 0, 0, 2), member("language", 0, 1, 3, delay=0.5), member("encoder", 0, 0, 1)],
     r"tp_size=\d: language engine TP rank \d of \d says tp_size=\d"),
], ids=["same-slot-twice", "tp-size-within-engine", "encoder-tp-across-engines", "unexpected-engine",
        "language-tp-size"])
def test_conflicting_registrations_fail_every_member_fast(calls: list[dict], expected: str) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    errors = join_all(address, calls, timeout_s=15.0)
    assert time.monotonic() - started < 10.0, "conflicts must not wait for the deadline"
    for error in errors:
        assert isinstance(error, ValueError), repr(error)
        assert error.__class__ is ValueError
    assert all(re.search(expected, str(error)) for error in errors), [str(e) for e in errors]
    assert not listening(address)


def test_a_process_that_arrives_after_the_world_formed_fails_alone() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    formed: dict[str, object] = {}

    def join(role: str) -> None:
        formed[role] = rendezvous(address, role, 0, 0, 1, timeout_s=15.0)

    threads = [threading.Thread(target=join, args=(role,)) for role in ("language", "encoder")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(formed) == {"language", "encoder"}
    try:
        with pytest.raises(ValueError, match="tp_rank=0: encoder engine 0 TP rank 0 of 1 .* is already registered"):
            rendezvous(address, "encoder", 0, 0, 1, timeout_s=5.0)
        # The world that formed is untouched: its meta exchange still works.
        gathered: list[list[bytes]] = []
        exchange = [threading.Thread(target=lambda m=m: gathered.append(m.groups.all_gather_bytes(b"x")))
                    for m in formed.values()]
        for thread in exchange:
            thread.start()
        for thread in exchange:
            thread.join(15)
        assert gathered == [[b"x", b"x"]] * 2
    finally:
        closing = [threading.Thread(target=m.close) for m in formed.values()]
        for thread in closing:
            thread.start()
        for thread in closing:
            thread.join(15)
    assert not listening(address)


@pytest.mark.parametrize("kwargs,expected", [
    (dict(address="http://127.0.0.1:1"), "address='http://127.0.0.1:1': expected tcp://host:port"),
    (dict(address="tcp://127.0.0.1"), "address='tcp://127.0.0.1': expected tcp://host:port"),
    (dict(address="tcp://127.0.0.1:0"), "address='tcp://127.0.0.1:0': expected tcp://host:port"),
    (dict(address="127.0.0.1:29600"), "expected tcp://host:port"),
    (dict(timeout_s=float("nan")), "timeout_s=nan: expected a finite number of seconds > 0"),
    (dict(timeout_s=float("inf")), "timeout_s=inf: expected a finite number"),
    (dict(timeout_s=0), "timeout_s=0: expected"),
    (dict(timeout_s=-1.0), "timeout_s=-1.0: expected"),
    (dict(timeout_s=True), "timeout_s=True: expected"),
    (dict(role="vision"), "role='vision': expected 'encoder' or 'language'"),
    (dict(tp_rank=2, tp_size=2), r"tp_rank=2: expected 0..1 \(tp_size=2\)"),
    (dict(tp_size=0), "tp_size=0: expected an integer >= 1"),
    (dict(role="language", engine=1), "engine=1: there is one language engine; expected 0"),
    (dict(engine=-1), "engine=-1: expected an integer >= 0"),
    (dict(device="meta"), "device='meta': expected 'cpu' or a CUDA device"),
    (dict(encoders=0), "encoders=0: expected an integer >= 1"),
    (dict(node_id=""), "node_id='': expected a non-empty string"),
    (dict(layout=(1, 2)), r"layout=\(1, 2\): expected \(encoders, encoder_tp, language_tp\)"),
])
def test_bad_arguments_name_the_argument(kwargs: dict, expected: str) -> None:
    call = dict(address=f"tcp://127.0.0.1:{free_port()}", role="encoder", engine=0, tp_rank=0, tp_size=1,
                timeout_s=1.0)
    call.update(kwargs)
    with pytest.raises(ValueError, match=expected):
        rendezvous(**call)


def test_without_address_or_torchrun_says_what_is_expected(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"address=None: expected tcp://host:port \(or EMBXFER_RENDEZVOUS\)"):
        rendezvous(None, "encoder", 0, 0, 1, timeout_s=1.0)


@pytest.mark.parametrize("layout,kwargs,expected", [
    ((1, 1, 1), {}, r"needs a world of 2 processes, but torchrun's WORLD_SIZE=3"),
    ((1, 1, 2), dict(role="language"), r"role='language': torchrun RANK=0 is 'encoder'"),
    ((1, 1, 2), dict(tp_size=2), r"tp_size=2: torchrun RANK=0 is 1"),
    (None, {}, "layout=None: under torchrun, expected"),
])
def test_torchrun_layout_must_match_the_world(monkeypatch: pytest.MonkeyPatch, layout, kwargs, expected) -> None:
    monkeypatch.delenv("EMBXFER_RENDEZVOUS", raising=False)
    for name, value in dict(RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=expected):
        rendezvous(layout=layout, timeout_s=1.0, **kwargs)


# --------------------------------------------------------------------------- torchrun mode


def test_torchrun_world_gets_the_same_groups_with_its_default_group_in_place() -> None:
    done = run_group([TORCHRUN, "--nproc-per-node", "3", "--standalone", WORKER, "torchrun",
                      "--layout", "1,1,2", "--default-group", "before"], timeout=120, env=child_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = [json.loads(line.split("RESULT ", 1)[1]) for line in done.stdout.splitlines() if "RESULT " in line]
    found = sorted(lines, key=lambda r: r["rank"])
    assert [r["rank"] for r in found] == [0, 1, 2] == [r["torchrun_rank"] for r in found]
    assert [r["role"] for r in found] == ["encoder", "language", "language"]
    assert [r["exchanged"] for r in found] == [2, 1, 1]
    assert all(r["default_group"] and r["agent_store"] == "True" for r in found)
    assert len({r["job_id"] for r in found}) == 1


def test_hand_started_world_with_nothing_listening() -> None:
    """MASTER_ADDR/PORT set by a spawner and nobody serving them: global rank 0 hosts the
    store; the engine's env:// default group, made afterwards on the same port, shares
    that server instead of failing to bind it."""
    port = free_port()
    with Processes() as workers:
        for rank in (2, 0, 1):
            env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="3", RANK=str(rank))
            workers.start("torchrun", "--layout", "1,1,2", "--default-group", "after", env=env)
        found = results(workers.finish(timeout=90))
    assert [r["torchrun_rank"] for r in found] == [0, 1, 2]
    assert [r["exchanged"] for r in found] == [2, 1, 1]
    assert all(r["default_group"] and r["agent_store"] is None for r in found)
    assert not listening(f"tcp://127.0.0.1:{port}")


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_ctrl_c_with_transfers_in_flight_never_aborts(device: str) -> None:
    if device == "cuda":
        gpus_for(2)
    address = f"tcp://127.0.0.1:{free_port()}"
    with Processes() as workers:
        first = None
        for index, role in enumerate(("language", "encoder")):
            env = child_env(CUDA_VISIBLE_DEVICES=str(index)) if device == "cuda" else None
            process = workers.start("sigint", "--rendezvous", address, "--role", role, "--device", device,
                                    "--timeout", "40", env=env, join=first)
            first = first or process
        for process in workers.processes:
            line = process.stdout.readline()
            assert line.strip() == "READY", line + process.stderr.read()[-3000:]
        time.sleep(0.2)
        # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
        os.killpg(first.pid, signal.SIGINT)
        started = time.monotonic()
        outcomes = workers.finish(timeout=30)
        took = time.monotonic() - started
    for code, out, err in outcomes:
        assert code in (-signal.SIGINT, 128 + signal.SIGINT), f"exit {code}\n{out}\n{err[-3000:]}"
        assert "terminate called" not in err and "Aborted" not in err, err[-3000:]
        assert "CLOSING" in out and "KeyboardInterrupt" in err
    assert took < 15.0
    assert not listening(address)


# --------------------------------------------------------------------------- groups alone


def test_stateless_groups_leave_the_default_world_alone() -> None:
    """A world of one over a local store: groups made and closed twice, never registered."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, None, True, wait_for_workers=False)
    before = dist.is_initialized()
    for attempt in range(2):
        groups = StatelessGroups(dist.PrefixStore(f"t{attempt}/", store), 0, 1, "cpu", timeout_s=10.0)
        assert groups.backend == "gloo"
        assert groups.all_gather_bytes(b"abc") == [b"abc"]
        groups.barrier()
        with pytest.raises(ValueError, match="peer=0: expected a rank in 0..0 other than 0"):
            groups.isend(torch.zeros(1), 0)
        groups.close()
        groups.close()
        with pytest.raises(RuntimeError, match="closed"):
            groups.irecv(torch.zeros(1), 0)
    assert dist.is_initialized() == before


@pytest.mark.gpu
def test_nccl_data_group_is_made_and_closed_on_one_gpu() -> None:
    """Constructor signatures and eager connection of ProcessGroupNCCL on this torch."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, None, True, wait_for_workers=False)
    groups = StatelessGroups(store, 0, 1, "cuda", timeout_s=30.0)
    assert groups.backend == "nccl" and groups.device.type == "cuda"
    value = torch.ones(4, device=groups.device)
    groups.data.allreduce([value]).wait()
    torch.cuda.synchronize()
    assert value.tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="tensor.device=cpu"):
        groups.isend(torch.zeros(1), 0)
    groups.close()
