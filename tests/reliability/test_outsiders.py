"""An outsider on the job's network (here 127.0.0.1) without the secret: it reads every key
the rendezvous holds, registers as a rank, writes error and event keys, squats on a data
pair. The job learns nothing it should not give, loses nothing, and counts what it
dropped (security issue, rows 1 and 2 of its table).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from embxfer.runtime.pairs import PairTransport
from embxfer.runtime.rendezvous import RendezvousServer
from embxfer.runtime.secret import load_secret
from tests.elastic.harness import Job
from tests.procs import shm_entries

pytestmark = pytest.mark.timeout(180)


def outsider_store(server: RendezvousServer):
    return dist.TCPStore(server.host, server.port, None, False, timedelta(seconds=10), wait_for_workers=False)


def every_value(store) -> dict[str, bytes]:
    return {key: bytes(store.get(key)) for key in store.list_keys()}


def test_nothing_the_rendezvous_holds_gives_the_secret_or_a_key_away():
    secret_text = secrets.token_hex(32)
    with Job(f"os{secrets.token_hex(3)}", secret=secret_text) as job:
        job.start("vit-0", "encoder")
        job.start("llm-a", "language", tp=2)
        job.wait_up("vit-0", "llm-a")
        rids = [job.route("vit-0", "llm-a", 700 + i) for i in range(4)]
        job.wait_done("llm-a", rids, ranks=2)
        values = every_value(outsider_store(job.server))
    secret = load_secret({"EMBXFER_SECRET": secret_text})
    forbidden = [secret_text.encode(), secret.material, *(secret.key(p) for p in ("rendezvous", "link", "pair"))]
    forbidden += [k.hex().encode() for k in forbidden[1:]]
    assert values, "the rendezvous held nothing?"
    for key, value in values.items():
        for needle in forbidden:
            assert needle not in value and needle not in key.encode(), key


def test_a_process_without_the_secret_cannot_register_post_errors_or_events():
    """An outsider watches the rendezvous and, as each key appears, writes what would make
    the job fail or admit it: a slot claim for every TP rank, an error for the engine's
    incarnation, a pointer to an incarnation of its own, join and death events. The job
    forms and moves every request; its members count the values they ignored."""
    with Job(f"os{secrets.token_hex(3)}") as job:
        stop = threading.Event()
        written = []

        def outsider() -> None:
            store = outsider_store(job.server)
            seen = set()
            while not stop.is_set():
                for key in store.list_keys():
                    if key in seen or not key.startswith("embxfer/") or "/pair/" in key:
                        continue
                    seen.add(key)
                    parts = key.split("/")
                    if len(parts) >= 6 and parts[2] == "slot":  # embxfer/<ns>/slot/<engine>/<inc>/<tp>
                        namespace, engine, incarnation = parts[1], parts[3], parts[4]
                        for target, value in (
                            (f"embxfer/{namespace}/error/{engine}/{incarnation}", b"EXV1" + b"\0" * 32 + b'{"by":"x"}'),
                            (f"embxfer/{namespace}/slot/{engine}/{incarnation}/1", b'{"member": 1}'),
                            (f"embxfer/{namespace}/engine/{engine}", b'{"incarnation": 7, "role": "language"}'),
                        ):
                            store.set(target, value)
                            written.append(target)
                        index = store.add(f"embxfer/{namespace}/log", 1)
                        store.set(f"embxfer/{namespace}/log/{index}", b'{"kind": "dead", "member": 5}')
                time.sleep(0.002)

        thread = threading.Thread(target=outsider, daemon=True)
        thread.start()
        try:
            job.start("llm-a", "language", tp=2)
            job.start("vit-0", "encoder")
            job.wait_up("vit-0", "llm-a", timeout=60)
            rids = [job.route("vit-0", "llm-a", 500 + 50 * i) for i in range(6)]
            done = job.wait_done("llm-a", rids, ranks=2)
        finally:
            stop.set()
            thread.join(timeout=5)
        assert written, "the outsider found nothing to write"
        assert all(e["status"] == "verified" for events in done.values() for e in events)


def test_a_squatter_with_another_secret_gets_no_slot_and_no_data():
    """A process of another job (or a forger) starts as language TP rank 1 before the real
    one: its values do not verify, so it never becomes a member; the real rank joins and
    receives every payload; the squatter's connect ends without a byte of payload. The
    squatter is killed; the job's members remove what it left in /dev/shm when they close."""
    prefix = f"os{secrets.token_hex(3)}"
    with Job(prefix) as job:
        squatter = job.start("llm-a", "language", tp=2, env={"EMBXFER_SECRET": secrets.token_hex(32)},
                             tp_ranks=[1])[0]
        time.sleep(1.0)  # it registers first, under the wrong key
        job.latest.pop("llm-a")
        real = job.start("llm-a", "language", tp=2)
        job.start("vit-0", "encoder")
        job.wait_up("vit-0", "llm-a")
        rids = [job.route("vit-0", "llm-a", 400 + i) for i in range(5)]
        done = job.wait_done("llm-a", rids, ranks=2)
        assert all(e["status"] == "verified" for events in done.values() for e in events)
        assert squatter.first("up") is None and not [e for e in squatter.events if e.get("event") == "done"]
        squatter.process.kill()
        squatter.process.wait(timeout=30)  # dead before the members close (a kill is not instant)
        assert len(real) == 2
    assert not shm_entries(prefix)


class Squatter:
    """What an outsider can do at a data pair: find its keys at the rendezvous (list_keys
    shows the pair's prefix) and answer there, without the secret (its MACs are wrong)."""

    def __init__(self, real) -> None:
        self.real = real
        self.fake = load_secret({"EMBXFER_SECRET": "not-the-job-secret-" + "x" * 20})
        self.authenticated = True

    def sign(self, purpose: str, *parts: bytes) -> bytes:
        if len(parts) == 2:  # the pair's key prefix: copied from what the rendezvous shows
            return self.real.sign(purpose, *parts)
        return self.fake.sign(purpose, *parts)


def test_a_pair_whose_peer_lacks_the_secret_sends_nothing():
    """A squatter takes the other end of a data pair (same keys at the rendezvous, not the
    secret): the handshake fails on both sides, counted as refused, and no send of data is
    ever posted."""
    server = RendezvousServer("127.0.0.1", 0)
    secret = load_secret({"EMBXFER_SECRET": "a" * 32})
    try:
        ours = PairTransport(server.client(), 10, secret, torch.device("cpu"), setup_timeout_s=10, op_timeout_s=10)
        theirs = PairTransport(server.client(), 20, Squatter(secret), torch.device("cpu"), setup_timeout_s=10,
                               op_timeout_s=10)
        ours.ensure(20)
        theirs.ensure(10)
        deadline = time.monotonic() + 30
        while "pending" in (ours.state(20)[0], theirs.state(10)[0]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ours.state(20)[0] == "failed" and "did not prove the job's secret" in ours.state(20)[1]
        assert theirs.state(10)[0] == "failed"
        assert ours.refused == 1 and theirs.refused == 1
        with pytest.raises(RuntimeError, match="data pair"):
            ours.isend(torch.zeros(4), 20)
        ours.close()
        theirs.close()
    finally:
        server.close()


STALLED_PEER = """
import sys, threading, time, torch
from embxfer.runtime.pairs import PairTransport
from embxfer.runtime.rendezvous import RendezvousServer
from embxfer.runtime.secret import load_secret

class Stalled(PairTransport):  # makes its end of the pair, then never answers the handshake
    release = threading.Event()
    def _handshake(self, pair, lo, hi, my_rank):
        self.release.wait(60)
        raise RuntimeError("stalled")

server = RendezvousServer("127.0.0.1", 0)
secret = load_secret({"EMBXFER_SECRET": "a" * 32})
ours = PairTransport(server.client(), 10, secret, torch.device("cpu"), setup_timeout_s=60, op_timeout_s=60)
theirs = Stalled(server.client(), 20, secret, torch.device("cpu"), setup_timeout_s=60, op_timeout_s=60)
ours.ensure(20)
if sys.argv[1] == "handshake":
    theirs.ensure(10)
    deadline = time.monotonic() + 30
    while ours._pairs[20].backend is None and time.monotonic() < deadline:
        time.sleep(0.01)
time.sleep(0.3)  # ours is waiting for the peer's nonce now, or for the peer to come
assert ours.state(20)[0] == "pending", ours.state(20)
started = time.monotonic()
ours.close()
print(f"closed in {time.monotonic() - started:.3f} s; pair threads alive "
      f"{sum(t.name.startswith('embxfer-pair-a-') and t.is_alive() for t in threading.enumerate())}")
Stalled.release.set()
theirs.close()
if sys.argv[1] == "handshake":
    server.close()
# else the store stays up until the interpreter ends: a thread still inside gloo's
# construction (waiting in the store for the peer) would return into a finalizing one
"""


@pytest.mark.parametrize("stage", ["handshake", "peer not come"])
def test_closing_a_pair_being_made_cuts_its_wait_and_leaves_no_thread_in_gloo(stage):
    """A pair is made on its own thread, which waits for the peer to come, then in gloo
    for its nonce (each up to the setup timeout, 30 s or more). Closing the transport cuts
    either wait: close returns at once, the thread is gone, and the process exits
    cleanly. Before, the thread stayed in gloo (the handshake) or in the store (gloo's
    construction) until the timeout, and an exit meanwhile aborted the process
    ("terminate called without an active exception")."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", STALLED_PEER, stage], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr, result.stderr[-3000:]
    closed = re.search(r"closed in ([\d.]+) s; pair threads alive (\d+)", result.stdout)
    assert closed, result.stdout + result.stderr[-3000:]
    assert float(closed.group(1)) < 2.0 and closed.group(2) == "0", closed.group(0)
    assert time.monotonic() - started < 30


def test_a_pair_whose_peer_never_comes_fails_at_the_setup_timeout_naming_it():
    server = RendezvousServer("127.0.0.1", 0)
    try:
        ours = PairTransport(server.client(), 10, load_secret({"EMBXFER_SECRET": "a" * 32}), torch.device("cpu"),
                             setup_timeout_s=0.5, op_timeout_s=60, describe=lambda m: f"the engine of member {m}")
        started = time.monotonic()
        ours.ensure(20)
        while ours.state(20)[0] == "pending" and time.monotonic() - started < 30:
            time.sleep(0.01)
        state, why = ours.state(20)
        assert state == "failed" and why == "TimeoutError: the engine of member 20 did not come to the pair within 0.5 s"
        assert time.monotonic() - started < 5
        ours.close()
    finally:
        server.close()
