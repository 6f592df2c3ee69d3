"""Data pairs: one point-to-point communicator per (encoder member, language member) that
moves staging messages, made when the pair is first used.

Engines come and go, so there is no world group: each pair that moves data has a group of
its own, two ranks (the lower member id is rank 0), NCCL between GPUs and gloo between
CPU tensors, built on the rendezvous store under a key prefix that only the job's members
can compute (`pair/<HMAC(pair key, ids)>/`). Building one blocks until both sides take
part, so it happens on a thread of its own; the channels wait for `ready(peer)` and go on
with other pairs meanwhile. Each side starts a pair when it first needs it: the encoder
rank when its first staging message for that language rank is due, the language rank when
the first TRANSFER record from that encoder rank arrives, so both sides come within a
control record of each other.

**Before any data, the pair authenticates.** The store that carried torch's bootstrap
keys is not authenticated, so an outsider could have put its own address there. Both
sides exchange 32-byte nonces over the new group, then HMAC-SHA256 of (both ids, both
nonces, its side) under the job's pair key, and check the other's: a peer that does not
know the secret never gets a byte of payload, and the pair fails with a clear error
(counted in `refused`). With an unauthenticated job the handshake still runs (it then
only proves the peer runs embxfer).

A pair whose peer died or left is shut down (`drop`); a restarted engine has new member
ids, hence new pairs.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .groups import _make_gloo, _make_nccl, _sever_gloo, _stop_backend
from .secret import JobSecret
from .transport import Handle, _Waiter

log = logging.getLogger("embxfer")

P2P_TAG = 0
NONCE_BYTES = 32
# How long closing a pair waits for its waiter threads to leave gloo (they do at once once
# the pair is severed; the bound is for a backend that does not answer).
WAITER_JOIN_S = 2.0


@dataclass
class _Pair:
    peer: int
    state: str = "pending"  # pending -> ready | failed
    error: str = ""
    backend: Any = None
    peer_rank: int = 1
    thread: threading.Thread | None = None
    waiters: dict[str, _Waiter] = field(default_factory=dict)
    in_flight: list = field(default_factory=list)


class PairTransport:
    """`isend`/`irecv` by peer member id over lazily made, authenticated pair groups."""

    def __init__(self, store: Any, me: int, secret: JobSecret, device: torch.device, *,
                 setup_timeout_s: float, op_timeout_s: float, local_address: str | None = None,
                 describe: Any = None) -> None:
        self.store = store
        self.me = me
        self.secret = secret
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.setup_timeout = timedelta(seconds=setup_timeout_s)
        self.op_timeout = timedelta(seconds=op_timeout_s)
        self.local_address = local_address
        self.describe = describe or (lambda member: f"member {member:x}")
        self.refused = 0
        self._pairs: dict[int, _Pair] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle of a pair
    def ensure(self, peer: int) -> None:
        """Start making the pair with `peer` (no-op if it exists or is being made)."""
        if peer in self._pairs or self._closed:
            return
        pair = self._pairs[peer] = _Pair(peer, peer_rank=0 if peer < self.me else 1)
        pair.thread = threading.Thread(target=self._make, args=(pair,), daemon=True,
                                       name=f"embxfer-pair-{self.me:x}-{peer:x}")
        pair.thread.start()

    def state(self, peer: int) -> tuple[str, str]:
        """("absent" | "pending" | "ready" | "failed", why)."""
        pair = self._pairs.get(peer)
        return ("absent", "") if pair is None else (pair.state, pair.error)

    def ready(self, peer: int) -> bool:
        pair = self._pairs.get(peer)
        return pair is not None and pair.state == "ready"

    def _make(self, pair: _Pair) -> None:
        lo, hi = sorted((self.me, pair.peer))
        tag = self.secret.sign("pair", lo.to_bytes(8, "little"), hi.to_bytes(8, "little"))[:12].hex()
        my_rank = 1 - pair.peer_rank
        try:
            store = dist.PrefixStore(f"embxfer/pair/{tag}/", self.store.clone())
            if not self._await_peer(store, pair, my_rank):
                return
            if self.backend == "nccl":
                backend = _make_nccl(store, my_rank, 2, self.op_timeout)
            else:
                backend = _make_gloo(store, my_rank, 2, self.op_timeout, self.local_address)
            with self._lock:  # a pair closed or dropped meanwhile never starts its handshake
                abandoned = self._closed or pair.state != "pending"
                if not abandoned:
                    pair.backend = backend
            if abandoned:
                _stop_backend(backend, False)
                return
            self._handshake(pair, lo, hi, my_rank)
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0][:300]
            with self._lock:
                abandoned = self._closed or pair.state != "pending"  # (its wait was severed by `_stop_pair`)
                if not abandoned:
                    pair.state, pair.error = "failed", f"{type(exc).__name__}: {first}"
            log.log(logging.DEBUG if abandoned else logging.ERROR, "embxfer: data pair with %s failed: %s",
                    self.describe(pair.peer), f"{type(exc).__name__}: {first}")
            return
        with self._lock:
            if self._closed or pair.state != "pending":
                return
            pair.state = "ready"

    def _await_peer(self, store: Any, pair: _Pair, my_rank: int) -> bool:
        """Both sides say they are here before either builds its backend, whose
        construction waits for the peer inside the store's C++ call (up to the store's
        timeout) where nothing can cut it: this wait is Python's, so a pair closed or
        dropped while its peer has not come leaves no thread behind (False). The peer
        is looked for every 1 ms at first, then less often, at most every 50 ms;
        TimeoutError once `setup_timeout` has passed."""
        store.set(f"here/{my_rank}", b"1")
        peer_key = f"here/{1 - my_rank}"
        deadline = time.monotonic() + self.setup_timeout.total_seconds()
        pause = 0.001
        while not store.check([peer_key]):
            with self._lock:
                if self._closed or pair.state != "pending":
                    return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.describe(pair.peer)} did not come to the pair within "
                                   f"{self.setup_timeout.total_seconds():g} s")
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        return True

    def _handshake(self, pair: _Pair, lo: int, hi: int, my_rank: int) -> None:
        """Nonces, then MACs, lower rank sending first (a receive posted before a send the
        peer waits for would deadlock NCCL)."""
        backend, peer_rank = pair.backend, pair.peer_rank
        mine = torch.frombuffer(bytearray(secrets.token_bytes(NONCE_BYTES)), dtype=torch.uint8)
        theirs = torch.empty(NONCE_BYTES, dtype=torch.uint8)

        def exchange(out: torch.Tensor, into: torch.Tensor) -> None:
            out_d, into_d = out.to(self.device), torch.empty_like(into, device=self.device)
            steps = [("send", out_d), ("recv", into_d)] if my_rank == 0 else [("recv", into_d), ("send", out_d)]
            for verb, tensor in steps:
                work = (backend.send if verb == "send" else backend.recv)([tensor], peer_rank, P2P_TAG)
                work.wait(self.setup_timeout) if self.backend == "gloo" else work.wait()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            into.copy_(into_d.cpu())

        exchange(mine, theirs)
        nonces = (bytes(mine.numpy()), bytes(theirs.numpy())) if my_rank == 0 else \
            (bytes(theirs.numpy()), bytes(mine.numpy()))

        def mac(rank: int) -> bytes:
            return self.secret.sign("pair", lo.to_bytes(8, "little"), hi.to_bytes(8, "little"), *nonces,
                                    bytes([rank]))

        proof = torch.frombuffer(bytearray(mac(my_rank)), dtype=torch.uint8)
        answer = torch.empty(32, dtype=torch.uint8)
        exchange(proof, answer)
        if not secrets.compare_digest(bytes(answer.numpy()), mac(peer_rank)):
            self.refused += 1
            raise PermissionError(f"the peer of this pair did not prove the job's secret (expected "
                                  f"{self.describe(pair.peer)}); no data was sent")

    def drop(self, peer: int) -> None:
        """Shut the pair with a dead or departed peer down (a pending one is abandoned)."""
        with self._lock:
            pair = self._pairs.pop(peer, None)
            if pair is None:
                return
            pair.state = "failed" if pair.state != "ready" else "dropped"
        self._stop_pair(pair)

    def _stop_pair(self, pair: _Pair, closing: bool = False) -> None:
        """Called once the pair is out of `_pairs` (and, closing, `_closed` is set): its
        backend, if `_make` had set one, is this call's to stop; one `_make` sets later is
        stopped there. A pair still in its handshake has a thread waiting in the backend
        for the peer's nonce or proof (up to `setup_timeout`): that wait is cut like a
        transfer's, and the thread joined. One still waiting for its peer to come leaves
        within 50 ms (`_await_peer`): `close` joins it; `drop`, on the engine's loop, does
        not wait for it (its peer may have died inside gloo's construction, which only the
        store's timeout ends)."""
        for waiter in pair.waiters.values():
            waiter.stop()
        with self._lock:
            backend = pair.backend
        if backend is not None:
            pending = pair.state not in ("ready", "dropped") or any(not w.is_completed() for w in pair.in_flight)
            if self.backend == "gloo" and pending:
                _sever_gloo(backend, 1 - pair.peer_rank, 2)
            _stop_backend(backend, pending)
        # Nothing of the pair may outlive this call inside gloo: its waiter threads and the
        # thread that made it leave (a severed wait raises at once) and its works go, so the
        # backend is destroyed now, on this thread, not during interpreter shutdown.
        left = [waiter.join(WAITER_JOIN_S) for waiter in pair.waiters.values()]
        maker = pair.thread
        if (backend is not None or closing) and maker is not None and maker is not threading.current_thread():
            maker.join(WAITER_JOIN_S)
            left.append(not maker.is_alive())
        if not all(left):
            log.warning("%s: a thread of the pair did not leave within %.0f s", self.describe(pair.peer),
                        WAITER_JOIN_S)
        pair.waiters.clear()
        pair.in_flight = []
        pair.backend = None

    # -- data
    def isend(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._post("send", tensor, peer)

    def irecv(self, tensor: torch.Tensor, peer: int) -> Handle:
        return self._post("recv", tensor, peer)

    def _post(self, verb: str, tensor: torch.Tensor, peer: int) -> Handle:
        pair = self._pairs.get(peer)
        if pair is None or pair.state != "ready":
            why = pair.error if pair is not None and pair.error else "not ready"
            raise RuntimeError(f"{verb} with {self.describe(peer)}: the data pair is {why}")
        backend = pair.backend
        work = (backend.send if verb == "send" else backend.recv)([tensor], pair.peer_rank, P2P_TAG)
        if len(pair.in_flight) >= 64:
            pair.in_flight = [w for w in pair.in_flight if not w.is_completed()]
        pair.in_flight.append(work)
        if self.backend != "gloo":
            return work
        # Gloo's point-to-point works learn they completed only inside wait(): a waiter
        # thread per pair and direction waits in posting order (transport.TorchP2P).
        waiter = pair.waiters.get(verb)
        if waiter is None:
            waiter = pair.waiters[verb] = _Waiter(f"embxfer-{verb}-{peer:x}")
        return waiter.watch(work)

    @property
    def pairs(self) -> dict[int, str]:
        return {peer: pair.state for peer, pair in self._pairs.items()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            self._stop_pair(pair, closing=True)
        self.store = None


def pair_threads_alive() -> int:
    """Pair threads still making a pair (tests: nothing outlives `close`)."""
    return sum(t.name.startswith("embxfer-pair-") and t.is_alive() for t in threading.enumerate())

