"""Who is who in a torchrun world: encoder engines, the language engine, TP leaders.

Ranks `[0, E * encoder_tp)` are encoder ranks (engine e owns
`[e * encoder_tp, (e + 1) * encoder_tp)`), the next `language_tp` ranks are the
language engine. TP rank 0 of each engine is its leader.

Every encoder TP rank holds the whole payload, so any of them can serve any
language rank: language TP rank j is served by encoder TP rank `j % encoder_tp`.
Encoder TP ranks that no language rank maps to (`i >= language_tp`) are *dummies*:
they follow every decision and send nothing (SPEC section 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property


class Role(str, Enum):
    ENCODER = "encoder"
    LANGUAGE = "language"


@dataclass(frozen=True)
class Topology:
    encoders: int = 1
    encoder_tp: int = 1
    language_tp: int = 1

    def __post_init__(self) -> None:
        for name in ("encoders", "encoder_tp", "language_tp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"topology.{name}={value!r}: expected a positive integer")

    @property
    def world_size(self) -> int:
        return self.encoders * self.encoder_tp + self.language_tp

    @cached_property
    def language_ranks(self) -> list[int]:
        first = self.encoders * self.encoder_tp
        return list(range(first, first + self.language_tp))

    @property
    def language_leader(self) -> int:
        return self.encoders * self.encoder_tp

    def encoder_ranks(self, engine: int) -> list[int]:
        self.check_engine(engine)
        return list(range(engine * self.encoder_tp, (engine + 1) * self.encoder_tp))

    def needed_by(self, engine: int) -> tuple[int, ...]:
        """Every rank a request from encoder `engine` needs (its engine and the language
        engine), cached: asked at every admit and submit."""
        cache = self.__dict__.setdefault("_needed", {})
        ranks = cache.get(engine)
        if ranks is None:
            ranks = cache[engine] = (*self.encoder_ranks(engine), *self.language_ranks)
        return ranks

    def encoder_leader(self, engine: int) -> int:
        leaders = self.__dict__.get("_leaders")
        if leaders is None:
            leaders = self.__dict__["_leaders"] = tuple(e * self.encoder_tp for e in range(self.encoders))
        if type(engine) is int and 0 <= engine < self.encoders:
            return leaders[engine]
        self.check_engine(engine)  # raises, naming the value
        return leaders[engine]

    def check_engine(self, engine: int) -> None:
        if isinstance(engine, bool) or not isinstance(engine, int) or not 0 <= engine < self.encoders:
            raise ValueError(f"encoder_engine={engine!r}: expected 0..{self.encoders - 1}")

    def check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank}: expected 0..{self.world_size - 1} for {self}")

    def role(self, rank: int) -> Role:
        self.check_rank(rank)
        return Role.LANGUAGE if rank >= self.language_leader else Role.ENCODER

    def engine_of(self, rank: int) -> int:
        """Encoder engine index of an encoder rank."""
        if self.role(rank) is not Role.ENCODER:
            raise ValueError(f"rank {rank} is a language rank, not an encoder rank")
        return rank // self.encoder_tp

    def tp_index(self, rank: int) -> int:
        if self.role(rank) is Role.LANGUAGE:
            return rank - self.language_leader
        return rank % self.encoder_tp

    def is_leader(self, rank: int) -> bool:
        return self.tp_index(rank) == 0

    def served_language_ranks(self, encoder_rank: int) -> list[int]:
        """Language ranks this encoder rank sends to (empty for a dummy)."""
        index = self.tp_index(encoder_rank)
        return [r for r in self.language_ranks if self.tp_index(r) % self.encoder_tp == index]

    def serving_encoder_rank(self, language_rank: int, engine: int) -> int:
        """The encoder rank of `engine` that sends to `language_rank`."""
        return self.encoder_ranks(engine)[self.tp_index(language_rank) % self.encoder_tp]

    def describe(self) -> str:
        parts = [f"encoder engine {e}: ranks {self.encoder_ranks(e)}" for e in range(self.encoders)]
        parts.append(f"language engine: ranks {self.language_ranks}")
        return "; ".join(parts)
