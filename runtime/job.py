"""Joining a job: what `embxfer.connect()` builds for one process, and takes down at close.

    store      the rendezvous (TCPStore client), seen through `SignedStore`
    directory  `LiveDirectory`: the job's members and engines, fed by a watcher thread
    bus        this process's ring (read by its peers on this node) and, when the job may
               span nodes, its signed cross-node link
    transport  `PairTransport`: data pairs made when first used

`Job` is the glue the endpoint calls into: linking a member that joined (attach its ring,
or connect the link), reporting one that died (a DEAD event at the rendezvous, its
shared memory removed when it lived on this node), `barrier`, `close`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from embxfer.control.deadlines import check_seconds

from .bus import ShmBus
from .config import Config
from .membership import (
    Change,
    LiveDirectory,
    MemberInfo,
    SignedStore,
    StaticDirectory,
    state_event,
)

log = logging.getLogger("embxfer")


@dataclass
class Job:
    store: SignedStore
    directory: LiveDirectory | StaticDirectory
    bus: ShmBus
    transport: Any
    config: Config
    raw_store: Any
    closed: bool = False

    @property
    def me(self) -> MemberInfo:
        return self.directory.me

    @property
    def app_store(self) -> Any:
        """A namespace of the rendezvous free for the caller's own keys (tests, the demo)."""
        return dist.PrefixStore(self.store.prefix + "app/", self.raw_store)

    def link_member(self, info: MemberInfo) -> None:
        if info.node == self.me.node:
            if not info.ring:
                raise RuntimeError(f"{info.describe()} published no ring")
            self.bus.add_local(info.member, info.ring, info.pid)
        else:
            if not info.link:
                raise RuntimeError(f"{info.describe()} is on node {info.node!r} and has no cross-node link")
            self.bus.add_remote(info.member, info.link)

    def report_dead(self, member: int, why: str, *, publish: bool = True) -> None:
        """Tell members that join later not to wait for it (`publish`: this rank found the
        death itself; one read from the log is there already), and remove what it left in
        /dev/shm when it lived on this node (only its creator unlinks, and it is gone)."""
        info = self.directory.member(member)
        if publish and isinstance(self.directory, LiveDirectory):
            try:
                self.directory.publish(state_event(Change.DEAD, member, why), remember=False)
            except Exception as exc:  # the rendezvous may be down: peers find the death themselves
                log.debug("could not post the death of %x: %s", member, exc)
        if info is not None and info.node == self.me.node:
            self._remove_stale_segments()

    def _remove_stale_segments(self) -> None:
        """Unlink the entries of this job's prefix whose creator is gone (only a creator
        unlinks its own: one killed, or one that died before it ever joined, leaves them)."""
        from embxfer.control.hygiene import remove_segments

        try:
            remove_segments(stale_only=True, prefix=self.config.shm_prefix)
        except Exception as exc:  # clean-up is best effort; `embxfer ring rm` exists
            log.debug("could not remove stale segments: %s", exc)

    def barrier(self, endpoint: Any, timeout_s: float) -> None:
        """Wait until every member this one works with (its own engine and the usable
        engines of the other role) has called `barrier` as often; records keep flowing,
        and a member that dies or leaves meanwhile is no longer waited for."""
        raw, prefix = self.store.store, self.store.prefix
        count = raw.add(f"{prefix}barrier/count/{self.me.member}", 1)
        raw.set(f"{prefix}barrier/{count}/{self.me.member}", b"1")
        deadline = time.monotonic() + timeout_s
        while True:
            members = sorted({m for view in endpoint.directory.current.values()
                              if view.state in ("usable", "draining")
                              and (view.name == self.me.engine or view.role.value != self.me.role)
                              for m in view.members if m is not None})
            absent = [m for m in members if not raw.check([f"{prefix}barrier/{count}/{m}"])]
            if not absent:
                return
            if time.monotonic() > deadline:
                names = ", ".join(endpoint.directory.describe_member(m) for m in absent)
                raise TimeoutError(f"barrier: {names} did not arrive within {timeout_s:g} s")
            if not endpoint.progress():
                endpoint.wait(0.005)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for part in (self.directory, self.transport, self.bus):
            try:
                part.close()
            except Exception as exc:  # tear everything down even if one part is broken
                log.warning("closing %s: %s", type(part).__name__, exc)
        self._remove_stale_segments()  # what processes of this prefix that died left behind
        self.raw_store = None


def wait_until_usable(endpoint: Any, names: Callable[[], list[str]], deadline: float, describe: str,
                      check_error: Callable[[], str | None] | None = None) -> None:
    """Progress until this endpoint's own engine and every engine in `names()` are usable;
    TimeoutError naming what is missing at the deadline."""
    attempt = 0
    while True:
        own = endpoint.directory.my_engine
        wanted = names()
        missing = [n for n in wanted if (v := endpoint.directory.engine(n)) is None or v.state != "usable"]
        if own.state == "usable" and not missing:
            return
        if check_error is not None and attempt % 20 == 0:
            problem = check_error()
            if problem:
                raise RuntimeError(problem)
        if endpoint.broken is not None:
            raise RuntimeError(f"{describe}: {endpoint.broken}")
        if own.state == "dead":
            raise ValueError(f"{describe}: {own.why}")
        if time.monotonic() > deadline:
            parts = []
            if own.state != "usable":
                absent = [str(tp) for tp, m in enumerate(own.members) if m is None]
                unlinked = [str(tp) for tp, m in enumerate(own.members) if m is not None and not endpoint._is_linked(m)]
                parts.append(f"its own engine '{own.name}' is {own.state}" +
                             (f" (TP rank(s) {', '.join(absent)} never joined)" if absent else "") +
                             (f" (TP rank(s) {', '.join(unlinked)} joined but never linked)" if unlinked else ""))
            for name in missing:
                view = endpoint.directory.engine(name)
                parts.append(f"engine '{name}' " + ("never joined" if view is None else f"is {view.state}"))
            raise TimeoutError(f"{describe}: after waiting, {'; '.join(parts)}")
        if not endpoint.progress():
            endpoint.wait(0.01)
        attempt += 1


def namespace_for(secret_namespace: str, suffix: str = "") -> str:
    if not suffix:
        return secret_namespace
    return f"{secret_namespace}-{hashlib.blake2b(suffix.encode(), digest_size=6).hexdigest()}"


def check_timeout(value: object) -> float:
    return check_seconds("timeout_s", value, positive=True)


def this_process() -> int:
    return os.getpid()
