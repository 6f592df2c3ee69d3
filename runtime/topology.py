"""A fixed layout of engines: who is who in one torchrun world (`connect(layout=...)`) and
in `LocalCluster`.

Ranks `[0, E * encoder_tp)` are encoder ranks (engine e owns
`[e * encoder_tp, (e + 1) * encoder_tp)`), then come the language engines, `language_tp`
ranks each. TP rank 0 of each engine is its leader. Engines are named `encoder<e>` and
`language<l>`; in such a world a member's id is its rank.

Every encoder TP rank holds the whole payload, so any of them can serve any language
rank: language TP rank j is served by encoder TP rank `j % encoder_tp`. Encoder TP ranks
that no language rank maps to (`i >= language_tp`) are *dummies*: they follow every
decision and send nothing (SPEC section 8). Joined by rendezvous, the engines of a job
need no layout (`membership.py`); the same rules hold engine pair by engine pair.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cached_property

from .membership import MemberInfo, Role

__all__ = ["Role", "Topology"]


@dataclass(frozen=True)
class Topology:
    encoders: int = 1
    encoder_tp: int = 1
    language_tp: int = 1
    languages: int = 1

    def __post_init__(self) -> None:
        for name in ("encoders", "encoder_tp", "language_tp", "languages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"topology.{name}={value!r}: expected a positive integer")

    @property
    def world_size(self) -> int:
        return self.encoders * self.encoder_tp + self.languages * self.language_tp

    @property
    def language_leader(self) -> int:
        """The first language engine's TP rank 0."""
        return self.encoders * self.encoder_tp

    def language_engine_ranks(self, engine: int = 0) -> list[int]:
        first = self.language_leader + engine * self.language_tp
        return list(range(first, first + self.language_tp))

    @cached_property
    def language_ranks(self) -> list[int]:
        return list(range(self.language_leader, self.world_size))

    def encoder_ranks(self, engine: int) -> list[int]:
        self.check_engine(engine)
        return list(range(engine * self.encoder_tp, (engine + 1) * self.encoder_tp))

    def encoder_leader(self, engine: int) -> int:
        self.check_engine(engine)
        return engine * self.encoder_tp

    def check_engine(self, engine: int) -> None:
        if isinstance(engine, bool) or not isinstance(engine, int) or not 0 <= engine < self.encoders:
            raise ValueError(f"encoder_engine={engine!r}: expected 0..{self.encoders - 1}")

    def check_peer(self, role: Role, engine: str | int, field: str) -> None:
        """ValueError naming `field` unless `engine` (an index or a name) is one of this
        layout's engines of `role`: in a fixed layout no other engine can ever come."""
        count = self.encoders if role is Role.ENCODER else self.languages
        if type(engine) is int:
            if not 0 <= engine < count:
                raise ValueError(f"{field}={engine}: expected 0..{count - 1}")
        elif engine not in self._names[role]:
            raise ValueError(f"{field}={engine!r}: not an engine of this layout (expected {role.value}0.."
                             f"{role.value}{count - 1} or 0..{count - 1})")

    @cached_property
    def _names(self) -> dict[Role, frozenset[str]]:
        return {Role.ENCODER: frozenset(f"encoder{e}" for e in range(self.encoders)),
                Role.LANGUAGE: frozenset(f"language{e}" for e in range(self.languages))}

    def check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank}: expected 0..{self.world_size - 1} for {self}")

    def role(self, rank: int) -> Role:
        self.check_rank(rank)
        return Role.LANGUAGE if rank >= self.language_leader else Role.ENCODER

    def engine_of(self, rank: int) -> int:
        """Engine index of a rank within its role."""
        if self.role(rank) is Role.ENCODER:
            return rank // self.encoder_tp
        return (rank - self.language_leader) // self.language_tp

    def engine_name(self, rank: int) -> str:
        return f"{self.role(rank).value}{self.engine_of(rank)}"

    def tp_index(self, rank: int) -> int:
        if self.role(rank) is Role.LANGUAGE:
            return (rank - self.language_leader) % self.language_tp
        return rank % self.encoder_tp

    def is_leader(self, rank: int) -> bool:
        return self.tp_index(rank) == 0

    def tp_size(self, rank: int) -> int:
        return self.language_tp if self.role(rank) is Role.LANGUAGE else self.encoder_tp

    def members(self, node_of: list[str] | None = None) -> list[MemberInfo]:
        """Every rank as a member of a static directory (member id = rank)."""
        host = socket.gethostname()
        out = []
        for rank in range(self.world_size):
            tp = self.tp_index(rank)
            out.append(MemberInfo(
                member=rank, engine=self.engine_name(rank), role=self.role(rank).value, incarnation=rank - tp,
                tp_rank=tp, tp_size=self.tp_size(rank), node=node_of[rank] if node_of else "local", host=host,
                pid=os.getpid(),
            ))
        return out

    def describe(self) -> str:
        parts = [f"encoder engine {e}: ranks {self.encoder_ranks(e)}" for e in range(self.encoders)]
        if self.languages == 1:
            parts.append(f"language engine: ranks {self.language_ranks}")
        else:
            parts += [f"language engine {e}: ranks {self.language_engine_ranks(e)}" for e in range(self.languages)]
        return "; ".join(parts)
