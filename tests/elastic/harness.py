"""An elastic job on this machine: a rendezvous, engine processes that come and go, and a
router that routes requests to engine pairs (tests and `bench/elastic.py`).

    with Job(tmp_prefix) as job:
        job.start("vit-0", "encoder", tp=1); job.start("llm-a", "language", tp=2)
        job.wait_up("vit-0", "llm-a")
        rid = job.route("vit-0", "llm-a", tokens=700)
        job.wait_done([rid])
        job.kill("vit-0", tp_rank=0)        # kill -9
        job.start("vit-0", "encoder", tp=1) # the same name: a new incarnation

Every engine rank is `tests.elastic.engine`; its JSON lines are collected by a reader
thread per process. `outcomes(engine)` are the finished requests as that engine's ranks
reported them.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from embxfer.runtime.rendezvous import RendezvousServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Rank:
    engine: str
    role: str
    tp_rank: int
    process: subprocess.Popen
    started: float
    events: list[dict] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def first(self, event: str) -> dict | None:
        return next((e for e in list(self.events) if e.get("event") == event), None)


class Job:
    def __init__(self, prefix: str, *, secret: str | None = None, env: dict[str, str] | None = None,
                 server: RendezvousServer | None = None, separate_router: bool = False) -> None:
        self.server = server or RendezvousServer("127.0.0.1", 0)
        # The routes at the rendezvous, or (separate_router) in a store of their own, so that
        # the rendezvous can go down while the router still reaches the engines.
        self.router = RendezvousServer("127.0.0.1", 0) if separate_router else None
        self.prefix = prefix
        self.env = dict(os.environ, EMBXFER_RENDEZVOUS=self.server.address, EMBXFER_SHM_PREFIX=prefix,
                        EMBXFER_SECRET=secret or secrets.token_hex(32), OMP_NUM_THREADS="1",
                        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
        if self.router is not None:
            self.env["ELASTIC_ROUTER"] = f"{self.router.host}:{self.router.port}"
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "EMBXFER_NODE_ID"):
            self.env.pop(name, None)
        self.ranks: list[Rank] = []
        self.latest: dict[str, list[Rank]] = {}  # engine -> the ranks of its latest start
        self._routes = 0
        self._store = None
        self._namespace = None

    # -- engines
    def start(self, name: str, role: str, tp: int = 1, env: dict[str, str] | None = None,
              tp_ranks: list[int] | None = None, extra: tuple[str, ...] = ()) -> list[Rank]:
        if name in self.latest:  # a new start of an engine that was drained: not drained again
            self.app().delete_key(f"drain/{name}")
        started = []
        for tp_rank in range(tp) if tp_ranks is None else tp_ranks:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.elastic.engine", role, name, str(tp_rank), str(tp), *extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(self.env, **(env or {})),
                cwd=ROOT,
            )
            rank = Rank(name, role, tp_rank, process, time.time())
            threading.Thread(target=self._read, args=(rank,), daemon=True).start()
            threading.Thread(target=self._read_err, args=(rank,), daemon=True).start()
            self.ranks.append(rank)
            started.append(rank)
        self.latest[name] = started
        return started

    def _read(self, rank: Rank) -> None:
        for line in rank.process.stdout:
            try:
                rank.events.append(json.loads(line))
            except ValueError:
                rank.stderr.append(line)

    def _read_err(self, rank: Rank) -> None:
        for line in rank.process.stderr:
            rank.stderr.append(line)

    def live(self, name: str) -> list[Rank]:
        return [r for r in self.ranks if r.engine == name and r.process.poll() is None]

    def wait_up(self, *names: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            while not all(r.first("up") for r in self.latest[name]):
                dead = [r for r in self.latest[name] if r.process.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise AssertionError(f"{name} did not come up: " + self.describe(name))
                time.sleep(0.02)

    def kill(self, name: str, tp_rank: int = 0, sig: int = signal.SIGKILL) -> Rank:
        rank = next(r for r in self.live(name) if r.tp_rank == tp_rank)
        rank.process.send_signal(sig)
        rank.process.wait(timeout=30)
        return rank

    def drain(self, name: str) -> None:
        self.app().set(f"drain/{name}", b"1")

    def stop_engine(self, name: str, timeout: float = 30.0) -> None:
        for rank in self.live(name):
            rank.process.send_signal(signal.SIGTERM)
        for rank in [r for r in self.ranks if r.engine == name]:
            try:
                rank.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rank.process.kill()
                rank.process.wait()

    # -- the router
    def app(self):
        if self._store is None and self.router is not None:
            self._raw = self.router.client()
            self._store = dist.PrefixStore("app/", self._raw)
        if self._store is None:
            from embxfer.runtime.membership import SignedStore
            from embxfer.runtime.secret import load_secret

            client = dist.TCPStore(self.server.host, self.server.port, None, False, timedelta(seconds=30),
                                   wait_for_workers=False)
            secret = load_secret({"EMBXFER_SECRET": self.env["EMBXFER_SECRET"]})
            namespace = SignedStore(client, secret).prefix
            self._raw = client
            self._store = dist.PrefixStore(namespace + "app/", client)
        return self._store

    def route(self, encoder: str, language: str, tokens: int, rid: int | None = None) -> int:
        self._routes += 1
        rid = self._routes if rid is None else rid
        store = self.app()
        # One router: the count moves only after the route is written (readers see no hole).
        store.set(f"route/{self._routes}", f"{rid} {encoder} {language} {tokens}".encode())
        store.add("route/count", 1)
        return rid

    # -- outcomes
    def outcomes(self, name: str) -> dict[int, list[dict]]:
        """rid -> the 'done' events of the engine's ranks (every incarnation)."""
        found: dict[int, list[dict]] = defaultdict(list)
        for rank in self.ranks:
            if rank.engine == name:
                for event in list(rank.events):
                    if event.get("event") == "done":
                        found[event["rid"]].append(event)
        return found

    def wait_done(self, language: str, rids: list[int], ranks: int, timeout: float = 60.0) -> dict[int, list[dict]]:
        """Until every rid has `ranks` outcomes from `language`'s ranks."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.outcomes(language)
            if all(len(found.get(rid, [])) >= ranks for rid in rids):
                return found
            if time.monotonic() > deadline:
                missing = [rid for rid in rids if len(found.get(rid, [])) < ranks]
                raise AssertionError(f"requests {missing[:10]} of {language} not finished: {self.describe(language)}")
            time.sleep(0.02)

    def describe(self, name: str | None = None) -> str:
        parts = []
        for rank in self.ranks:
            if name is None or rank.engine == name:
                parts.append(f"{rank.engine}/{rank.tp_rank} pid {rank.process.pid} rc {rank.process.poll()}: "
                             f"{''.join(rank.stderr)[-1500:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for rank in self.ranks:
            if rank.process.poll() is None:
                rank.process.send_signal(signal.SIGTERM)
        for rank in self.ranks:
            try:
                rank.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                rank.process.kill()
                rank.process.wait()
        self._store = self._raw = None
        self.server.close()
        if self.router is not None:
            self.router.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
