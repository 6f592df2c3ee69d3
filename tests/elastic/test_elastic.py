"""Engines that join, drain, crash and restart while the rest keeps serving (issue 19).

One scenario, start to end, with every request's fate predicted: an encoder added
mid-run, an encoder killed with -9 (while requests wait on it) and restarted under its
name, a language engine drained, a language TP follower killed. Requests that wait on an
engine when it dies are made deterministic by stopping the engine first (SIGSTOP): they
are admitted and bound, and cannot finish.
"""

from __future__ import annotations

import secrets
import signal
import time

import pytest

from tests.elastic.harness import Job
from tests.procs import shm_entries

pytestmark = pytest.mark.timeout(240)


def statuses(events: list[dict]) -> set[str]:
    return {e["status"] for e in events}


@pytest.mark.parametrize("nodes", [1, 2])
def test_the_elastic_scenario_predicts_every_request(nodes):
    """With nodes=2 the encoders run on one simulated node and the language engines on
    another (node ids and shared-memory prefixes of their own): every record between them
    crosses the signed cross-node link."""
    prefix = f"el{secrets.token_hex(3)}"
    prefixes = [prefix] if nodes == 1 else [f"{prefix}.e", f"{prefix}.l"]

    def on_node(role: str) -> dict[str, str]:
        if nodes == 1:
            return {}
        side = "e" if role == "encoder" else "l"
        return {"EMBXFER_NODE_ID": f"{prefix}-node-{side}", "EMBXFER_SHM_PREFIX": f"{prefix}.{side}"}

    with Job(prefix) as job:
        start = job.start

        def start_on_node(name: str, role: str, tp: int = 1, **kwargs):
            return start(name, role, tp, env=on_node(role), **kwargs)

        job.start = start_on_node
        job.start("vit-0", "encoder")
        job.start("llm-a", "language", tp=2)
        job.start("llm-b", "language")
        job.wait_up("vit-0", "llm-a", "llm-b")
        verified_on = {"llm-a": [], "llm-b": []}

        def route(encoder: str, language: str, tokens: int) -> int:
            rid = job.route(encoder, language, tokens)
            verified_on[language].append(rid)
            return rid

        # 1. one encoder, two language engines (one of TP 2)
        first = [route("vit-0", "llm-a" if i % 2 else "llm-b", 300 + 97 * i) for i in range(8)]
        job.wait_done("llm-a", [r for r in first if r in verified_on["llm-a"]], ranks=2)
        job.wait_done("llm-b", [r for r in first if r in verified_on["llm-b"]], ranks=1)

        # 2. an encoder joins mid-run: usable by every peer, its first request completes
        joined_at = time.time()
        job.start("vit-1", "encoder")
        job.wait_up("vit-1")
        rid = route("vit-1", "llm-a", 900)
        done = job.wait_done("llm-a", [rid], ranks=2)
        join_to_first = max(e["at"] for e in done[rid]) - joined_at
        assert join_to_first < 5.0  # the 2 s figure is bench/elastic.py's, on a quiet machine

        # 3. kill -9 of an encoder with requests bound to it, then restart it
        stuck_rank = job.latest["vit-0"][0]
        stuck_rank.process.send_signal(signal.SIGSTOP)
        doomed = [job.route("vit-0", language, 500) for language in ("llm-a", "llm-b", "llm-a")]
        fine = [route("vit-1", language, 400) for language in ("llm-a", "llm-b")]
        job.wait_done("llm-a", [r for r in fine if r in verified_on["llm-a"]], ranks=2)
        job.wait_done("llm-b", [r for r in fine if r in verified_on["llm-b"]], ranks=1)
        time.sleep(0.5)  # the doomed ones are admitted and bound by now
        stuck_rank.process.send_signal(signal.SIGKILL)
        stuck_rank.process.wait(timeout=10)
        failed_a = job.wait_done("llm-a", [r for r in doomed if r != doomed[1]], ranks=2)
        failed_b = job.wait_done("llm-b", [doomed[1]], ranks=1)
        for events in [*(failed_a[r] for r in (doomed[0], doomed[2])), failed_b[doomed[1]]]:
            assert statuses(events) == {"failed"}
            for event in events:
                assert event["error"].startswith("peer_dead:") and "encoder engine 'vit-0' TP rank 0" in event["error"]
        restarted_at = time.time()
        job.start("vit-0", "encoder")
        job.wait_up("vit-0")
        rid = route("vit-0", "llm-b", 600)
        done = job.wait_done("llm-b", [rid], ranks=1)
        restart_to_first = max(e["at"] for e in done[rid]) - restarted_at
        assert restart_to_first < 10.0  # 5 s is bench/elastic.py's figure
        again = [route(encoder, "llm-a", 250) for encoder in ("vit-0", "vit-1")]
        job.wait_done("llm-a", again, ranks=2)

        # 4. drain a language engine with requests in flight: they complete, nobody fails
        last_b = [route(encoder, "llm-b", 2000) for encoder in ("vit-0", "vit-1")]
        job.drain("llm-b")
        job.wait_done("llm-b", last_b, ranks=1)
        for rank in job.latest["llm-b"]:
            rank.process.wait(timeout=30)
            assert rank.process.returncode == 0 and rank.first("left") is not None
            assert rank.first("left")["blocks"] == 0

        # 5. kill -9 of a language TP follower with requests bound to its engine
        follower = job.latest["llm-a"][1]
        follower.process.send_signal(signal.SIGSTOP)
        lost_a = [job.route(encoder, "llm-a", 700) for encoder in ("vit-0", "vit-1")]
        time.sleep(0.5)
        follower.process.send_signal(signal.SIGKILL)
        follower.process.wait(timeout=10)
        leader_view = job.wait_done("llm-a", lost_a, ranks=1)
        for rid_ in lost_a:
            assert statuses(leader_view[rid_]) == {"failed"}
            assert "language engine 'llm-a' TP rank 1" in leader_view[rid_][0]["error"]
        for encoder, rid_ in zip(("vit-0", "vit-1"), lost_a, strict=True):
            deadline = time.monotonic() + 30
            while not job.outcomes(encoder).get(rid_) and time.monotonic() < deadline:
                time.sleep(0.02)
            events = job.outcomes(encoder)[rid_]
            assert statuses(events) == {"failed"} and "language engine 'llm-a' TP rank 1" in events[0]["error"]

        # every other request: verified on every rank of its language engine
        lost = set(doomed) | set(lost_a)
        for language, ranks in (("llm-a", 2), ("llm-b", 1)):
            outcomes = job.outcomes(language)
            for rid_ in verified_on[language]:
                assert rid_ not in lost
                events = outcomes[rid_]
                assert len(events) >= ranks and statuses(events) == {"verified"}, (rid_, events)
        job.stop_engine("llm-a")
        job.stop_engine("vit-0")
        job.stop_engine("vit-1")
        for rank in job.ranks:
            closed = rank.first("closed") or rank.first("left")
            if rank.process.returncode in (-signal.SIGKILL,):
                continue
            assert closed is not None, job.describe(rank.engine)
            assert closed["blocks"] == 0
            assert closed["fds"] <= rank.first("up")["fds"] + 2
    for name in prefixes:
        assert not shm_entries(name)


def test_while_the_rendezvous_is_down_joined_engines_serve_on_and_a_join_waits_for_it():
    """The rendezvous (not the router: its routes live elsewhere here) stops; the engines
    that joined keep moving data; an engine started meanwhile waits; the rendezvous comes
    back empty on the same address, the members publish themselves again, and the new
    engine joins and serves."""
    from embxfer.runtime.rendezvous import RendezvousServer

    with Job(f"rv{secrets.token_hex(3)}", separate_router=True) as job:
        job.start("vit-0", "encoder")
        job.start("llm-a", "language", tp=2)
        job.wait_up("vit-0", "llm-a")
        before = [job.route("vit-0", "llm-a", 300 + 50 * i) for i in range(3)]
        job.wait_done("llm-a", before, ranks=2)

        port = job.server.port
        job.server.close()  # down
        time.sleep(1.0)
        during = [job.route("vit-0", "llm-a", 500 + 50 * i) for i in range(4)]
        job.wait_done("llm-a", during, ranks=2, timeout=30)
        late = job.start("vit-1", "encoder")[0]
        time.sleep(3.0)
        assert late.first("up") is None and late.process.poll() is None, job.describe("vit-1")

        job.server = RendezvousServer("127.0.0.1", port)  # back, empty
        job.wait_up("vit-1", timeout=45)
        after = [job.route(encoder, "llm-a", 400) for encoder in ("vit-1", "vit-0")]
        job.wait_done("llm-a", after, ranks=2, timeout=30)
        outcomes = job.outcomes("llm-a")
        for rid in before + during + after:
            assert len(outcomes[rid]) == 2 and statuses(outcomes[rid]) == {"verified"}, (rid, outcomes[rid])


def test_restarts_grow_the_log_by_their_own_events_and_a_new_rank_does_not_report_old_deaths():
    """An engine killed and started again, three times: each restart adds its JOIN and the
    DEAD events of the peers that found the death (at most one per member that read its
    records: the three language ranks), whatever came before. The new rank reads the
    earlier deaths in the log: it neither posts them again nor logs them as its errors.
    (Before: every joiner re-posted every death it replayed, so restart k added k + 5
    events and the log grew with the square of the restarts; each new rank logged every
    earlier death at ERROR.)"""
    from embxfer.runtime.membership import SignedStore
    from embxfer.runtime.secret import load_secret

    with Job(f"lg{secrets.token_hex(3)}") as job:
        store = SignedStore(job.server.client(), load_secret({"EMBXFER_SECRET": job.env["EMBXFER_SECRET"]}))
        job.start("llm-a", "language", tp=2)
        job.start("llm-b", "language")
        job.start("vit-0", "encoder")
        job.wait_up("llm-a", "llm-b", "vit-0")
        rid = job.route("vit-0", "llm-a", 300)
        job.wait_done("llm-a", [rid], ranks=2)
        for restart in range(3):
            before = store.log_length()
            job.kill("vit-0")
            deadline = time.monotonic() + 20
            while store.log_length() == before and time.monotonic() < deadline:
                time.sleep(0.05)  # a language rank found the death and posted it
            time.sleep(0.5)
            new = job.start("vit-0", "encoder")[0]
            job.wait_up("vit-0")
            rid = job.route("vit-0", "llm-a" if restart % 2 else "llm-b", 400)
            job.wait_done("llm-a" if restart % 2 else "llm-b", [rid], ranks=2 if restart % 2 else 1)
            time.sleep(0.5)
            added = store.log_length() - before
            assert 2 <= added <= 4, (restart, added)
            assert not [line for line in new.stderr if " is dead" in line], new.stderr


def test_kills_restarts_and_a_drain_under_traffic_fail_only_what_a_kill_caught():
    """Traffic from two encoders to two language engines (one of TP 2) while encoders are
    killed with -9 and started again three times, then a language engine drained with
    requests in flight and started again: every request ends on every rank of its
    language engine, verified, or failed naming the encoder engine that was killed after
    it was routed (nothing hangs, nothing else fails)."""
    import random

    rng = random.Random(4)
    routed: dict[int, tuple[str, str, float]] = {}  # rid -> encoder, language, when
    kills: list[tuple[float, str]] = []
    with Job(f"tr{secrets.token_hex(3)}") as job:
        job.start("vit-0", "encoder")
        job.start("vit-1", "encoder")
        job.start("llm-a", "language", tp=2)
        job.start("llm-b", "language")
        job.wait_up("vit-0", "vit-1", "llm-a", "llm-b")

        def burst(count: int, encoders=("vit-0", "vit-1"), languages=("llm-a", "llm-b")) -> None:
            for _ in range(count):
                encoder, language = rng.choice(encoders), rng.choice(languages)
                routed[job.route(encoder, language, rng.randint(1, 2500))] = (encoder, language, time.time())

        for _ in range(3):
            burst(30)
            time.sleep(rng.uniform(0.05, 0.3))
            victim = rng.choice(["vit-0", "vit-1"])
            kills.append((time.time(), victim))
            job.kill(victim)
            burst(15, encoders=tuple(e for e in ("vit-0", "vit-1") if e != victim))
            time.sleep(rng.uniform(0.1, 0.5))
            job.start(victim, "encoder")
            job.wait_up(victim)
            burst(20)
        burst(15, languages=("llm-b",))
        job.drain("llm-b")
        for rank in job.latest["llm-b"]:
            rank.process.wait(timeout=60)
            assert rank.first("left")["blocks"] == 0
        job.start("llm-b", "language")
        job.wait_up("llm-b")
        burst(30)
        for language, ranks in (("llm-a", 2), ("llm-b", 1)):
            mine = [rid for rid, (_, lang, _) in routed.items() if lang == language]
            outcomes = job.wait_done(language, mine, ranks=ranks, timeout=90)
            for rid in mine:
                encoder, _, at = routed[rid]
                caught = any(name == encoder and when > at for when, name in kills)
                for event in outcomes[rid]:
                    if event["status"] == "verified":
                        continue
                    assert event["status"] == "failed" and caught, (rid, routed[rid], event)
                    assert event["error"].startswith("peer_dead:") and f"encoder engine '{encoder}'" in event["error"]
