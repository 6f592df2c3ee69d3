"""`LocalCluster`: a whole encoder/language layout inside one process.

Every endpoint is real (Sender, Receiver, pools, allocators, staging channels, encoded
records); only the two transports are in-process stand-ins: a `LocalBusHub` for the
control records and a `LoopbackHub` for the staging chunks. Engine developers can use it
to test their integration without processes or GPUs; embxfer's own tests use it to
drive the protocol step by step and deterministically.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby

import torch

from .bus import LocalBusHub
from .config import Config
from .payload import Payload
from .receiver import Receiver
from .sender import Sender
from .state import RequestState
from .topology import Role, Topology
from .transport import LoopbackHub


class LocalCluster:
    def __init__(
        self,
        topology: Topology | None = None,
        config: Config | None = None,
        *,
        dim: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        deepstack_layers: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.topology = topology or Topology()
        self.config = config or Config()
        self.bus_hub = LocalBusHub(self.config.limits, self.config.slot_bytes - 16)
        self.p2p = LoopbackHub()
        self.senders: dict[int, Sender] = {}
        self.receivers: dict[int, Receiver] = {}
        self._of_engine: dict[tuple[str, int], list] = {}  # (role, engine index) -> its endpoints
        for rank in range(self.topology.world_size):
            common = dict(
                config=self.config, topology=self.topology, rank=rank, bus=self.bus_hub.bus(rank),
                transport=self.p2p.transport(rank), dim=dim, dtype=dtype,
                deepstack_layers=deepstack_layers, device=device,
            )
            if self.topology.role(rank) is Role.ENCODER:
                self.senders[rank] = Sender(**common)
            else:
                self.receivers[rank] = Receiver(**common)

    @property
    def endpoints(self) -> list[Sender | Receiver]:
        return [*self.senders.values(), *self.receivers.values()]

    @property
    def leader(self) -> Receiver:
        return self.receivers[self.topology.language_leader]

    def language_receivers(self, engine: int) -> list[Receiver]:
        return self._endpoints_of("language", engine)

    def engine_senders(self, engine: int) -> list[Sender]:
        return self._endpoints_of("encoder", engine)

    def _endpoints_of(self, role: str, engine: int) -> list:
        found = self._of_engine.get((role, engine))
        if found is None:  # cached: the engine's loop asks for every request
            found = self._of_engine[(role, engine)] = (
                [self.receivers[r] for r in self.topology.language_engine_ranks(engine)] if role == "language"
                else [self.senders[r] for r in self.topology.encoder_ranks(engine)])
        return found

    def step(self) -> bool:
        """One progress call on every endpoint; True if any did something."""
        worked = False
        for endpoint in self.endpoints:
            worked |= endpoint.progress()
        return worked

    def run_until(self, done: Callable[[], bool], max_steps: int = 100_000,
                  each_step: Callable[[], None] | None = None) -> int:
        """Step until `done()`; RuntimeError if nothing moves any more (a deadlock) or
        after `max_steps`."""
        idle = 0
        for steps in range(1, max_steps + 1):
            if done():
                return steps
            worked = self.step()
            if each_step is not None:
                each_step()
            idle = 0 if worked else idle + 1
            if idle > 3:
                raise RuntimeError(f"no progress after {steps} steps: {self.describe()}")
        raise RuntimeError(f"not done after {max_steps} steps: {self.describe()}")

    def submit(self, request_id: int, payload: Payload, engine: int = 0, language: int | None = None) -> None:
        for sender in self.engine_senders(engine):
            sender.submit(request_id, payload, language_engine=language)

    def admit(self, request_id: int, engine: int = 0, language: int = 0) -> None:
        for receiver in self.language_receivers(language):
            receiver.admit(request_id, encoder_engine=engine)

    def states(self, request_id: int, language: int = 0) -> list[RequestState]:
        return [r._lookup(request_id).state for r in self.language_receivers(language)]

    def transfer(self, payloads: dict[int, Payload], engine_of: Callable[[int], int] = lambda rid: 0,
                 **run_kwargs) -> dict[int, list[Payload]]:
        """Admit and submit every payload, run to completion, take every copy: what an
        engine's loop does (`finished()` each step, never a scan of every request).

        Returns, per request id, the payload taken on each rank of language engine 0 (in
        rank order), the one engine it admits on. RuntimeError if any request ends FAILED.
        It consumes every endpoint's `finished()`."""
        receivers = self.language_receivers(0)
        endpoints = [*self.senders.values(), *receivers]
        for endpoint in endpoints:
            endpoint.finished()  # what finished before is not this transfer's
        # What a step's scheduler does: one batch call per engine and run of its requests
        # (and the count of finished() ids to wait for, per run, not per request).
        expected = 0
        for engine, run in groupby(payloads.items(), key=lambda item: engine_of(item[0])):
            run = list(run)
            senders = self.engine_senders(engine)
            for receiver in receivers:
                receiver.admit_many([rid for rid, _ in run], encoder_engine=engine)
            for sender in senders:
                sender.submit_many(run)
            expected += len(run) * (len(receivers) + len(senders))
        finished: dict[int, list[int]] = {id(e): [] for e in endpoints}
        count = 0

        def collect() -> None:
            nonlocal count
            for endpoint in endpoints:
                done = [rid for rid in endpoint.finished() if rid in payloads]
                if done:
                    finished[id(endpoint)].extend(done)
                    count += len(done)

        self.run_until(lambda: count >= expected, each_step=collect, **run_kwargs)
        failed = {rid: self.leader.error(rid) for rid in finished[id(self.leader)]
                  if self.leader.state(rid) is RequestState.FAILED}
        if failed:
            raise RuntimeError(f"requests failed: {failed}")
        ids = list(payloads)
        copies = [r.take_many(ids) for r in receivers]
        taken = dict(zip(ids, map(list, zip(*copies, strict=True)), strict=True))
        for sender in self.senders.values():
            sender.release_many(finished[id(sender)])
        self.settle(**run_kwargs)
        return taken

    def settle(self, **run_kwargs) -> int:
        """Step until no endpoint has anything in flight."""
        return self.run_until(lambda: not any(e.busy for e in self.endpoints), **run_kwargs)

    def blocks_in_use(self) -> dict[int, int]:
        return {e.rank: e._blocks_in_use() for e in self.endpoints}

    def describe(self) -> str:
        parts = []
        for e in self.endpoints:
            live = {rid: r.state.value for rid, r in e.requests.items()}
            parts.append(f"rank {e.rank} ({e.me.describe()}): blocks used {e._blocks_in_use()}, requests {live}")
        return "; ".join(parts)

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()


def random_payload(num_tokens: int, dim: int = 64, *, dtype: torch.dtype = torch.bfloat16,
                   deepstack_layers: int = 0, seed: int = 0, device: torch.device | str = "cpu") -> Payload:
    """A payload of random bit patterns (NaN and Inf included) for tests and examples."""
    gen = torch.Generator().manual_seed(seed)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    info = torch.iinfo(bits)

    def floats(cols: int) -> torch.Tensor:
        return torch.randint(info.min, info.max, (num_tokens, cols), generator=gen, dtype=bits).view(dtype).to(device)

    return Payload(
        embeddings=floats(dim),
        fill_ids=torch.randint(0, 150_000, (num_tokens,), generator=gen, dtype=torch.int32).to(device),
        mrope_positions=torch.randint(0, 1 << 20, (3, num_tokens), generator=gen, dtype=torch.int32).to(device),
        mrope_delta=int(torch.randint(-(1 << 40), 1 << 40, (1,), generator=gen).item()),
        deepstack=floats(deepstack_layers * dim) if deepstack_layers else None,
    )

