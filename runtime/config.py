"""One configuration dataclass for embxfer, with defaults and `EMBXFER_*` overrides.

Every size that crosses the wire is counted in whole blocks (SPEC R2), so the
configuration keeps `default_alloc_tokens` as the engine wrote it and the allocator
rounds it up; `default_alloc_blocks` is the number that actually matters.

Every field is validated when the object is made, alone and against the others (a ring
slot that cannot hold the largest record this configuration produces, a timeout that is
not a finite positive number): what is accepted here runs.

Memory a language rank holds, all bounded here: the landing pool
(`language_pool_blocks` x `block_size` tokens, allocated once), the staging buffers
(`staging_depth` x `staging_bytes` per encoder rank it receives from), and the outputs
of requests in flight and not yet taken (at most `output_budget_bytes`; an admission
whose payload does not fit waits, one that can never fit fails with a clear error). An
encoder rank holds only its staging buffers: it packs straight from the payloads the
engine submitted, which the engine keeps unchanged until the request is finished.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "EMBXFER_"
MAX_SEGMENTS_PER_MESSAGE = 1024


@dataclass(frozen=True)
class Config:
    """Tunables shared by both engines. Field `x` reads env var `EMBXFER_X`."""

    block_size: int = 128
    default_alloc_tokens: int = 8192
    language_pool_blocks: int = 1024
    # Outputs (payloads landed, not yet taken) a language rank may hold, in bytes.
    output_budget_bytes: int = 8 << 30
    # Upper bound on the tokens one resume round may ask for; 0 means "all of the remainder".
    max_resume_tokens: int = 0
    # One staging chunk: the unit of a P2P message (of one or many requests) and of pipelining.
    staging_bytes: int = 32 << 20
    # Staging chunks per peer and direction (bounds staging memory; 2 = double buffering).
    staging_depth: int = 2
    # Segments (request rounds, or parts of them) one staging message may carry.
    max_segments_per_message: int = 64
    heartbeat_interval_s: float = 0.5
    # A peer whose heartbeat is older than this is dead (its requests fail).
    peer_timeout_s: float = 10.0
    # A request that makes no progress for this long fails with a timeout.
    request_timeout_s: float = 120.0
    # Completed payloads kept for reuse by content hash (0: no cache).
    cache_bytes: int = 0
    ring_slots: int = 1024
    # 0: derived from the largest record the pool and the message size produce.
    ring_slot_bytes: int = 0
    # Shared-memory names are <shm_prefix>-<pid>-<random>; `embxfer ring ls|rm` finds them.
    shm_prefix: str = "embxfer"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def default_alloc_blocks(self) -> int:
        return -(-self.default_alloc_tokens // self.block_size)

    @property
    def limits(self):
        """What a rank of this configuration accepts in a record (its pool, its messages)."""
        from embxfer.control.records import Limits

        return Limits.for_pool(self.language_pool_blocks, self.max_segments_per_message)

    @property
    def slot_bytes(self) -> int:
        """The ring slot size that runs: `ring_slot_bytes`, or the smallest one that holds
        the largest record of this configuration (`ring_slot_bytes` = 0)."""
        if self.ring_slot_bytes:
            return self.ring_slot_bytes
        from embxfer.control.records import max_record_bytes
        from embxfer.control.ring import slot_bytes_for

        return max(4096, slot_bytes_for(max_record_bytes(self.limits)))

    def validate(self) -> None:
        positive_ints = (
            "block_size",
            "default_alloc_tokens",
            "language_pool_blocks",
            "output_budget_bytes",
            "staging_bytes",
            "staging_depth",
            "max_segments_per_message",
            "ring_slots",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.{name}={value!r}: expected a positive integer")
        for name in ("max_resume_tokens", "cache_bytes", "ring_slot_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"config.{name}={value!r}: expected an integer >= 0 (0 = {_ZERO_MEANS[name]})")
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"config.block_size={self.block_size}: expected 1..1024")
        from embxfer.control.records import MAX_BLOCK_INDEX

        if self.language_pool_blocks > MAX_BLOCK_INDEX + 1:
            raise ValueError(f"config.language_pool_blocks={self.language_pool_blocks}: expected at most "
                             f"{MAX_BLOCK_INDEX + 1} (block indices are 24-bit on the wire)")
        if self.max_segments_per_message > MAX_SEGMENTS_PER_MESSAGE:
            raise ValueError(f"config.max_segments_per_message={self.max_segments_per_message}: expected "
                             f"1..{MAX_SEGMENTS_PER_MESSAGE}")
        for name in ("heartbeat_interval_s", "peer_timeout_s", "request_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not value > 0:
                raise ValueError(f"config.{name}={value!r}: expected a finite positive number of seconds")
        if not isinstance(self.shm_prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.]{1,24}", self.shm_prefix):
            raise ValueError(f"config.shm_prefix={self.shm_prefix!r}: expected 1-24 characters from [A-Za-z0-9_.]")
        if self.peer_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"config.peer_timeout_s={self.peer_timeout_s}: expected at least twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        if self.ring_slot_bytes:
            from embxfer.control.records import max_record_bytes
            from embxfer.control.ring import slot_bytes_for

            needed = slot_bytes_for(max_record_bytes(self.limits))
            if self.ring_slot_bytes < needed or self.ring_slot_bytes % 64:
                raise ValueError(
                    f"config.ring_slot_bytes={self.ring_slot_bytes}: expected a multiple of 64 of at least "
                    f"{needed}, the largest record of {self.language_pool_blocks} pool blocks and "
                    f"{self.max_segments_per_message} segments per message (0 derives it)"
                )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then `EMBXFER_*` variables, then explicit keyword overrides."""
        return cls(**{**cls.env_values(env), **overrides})

    @classmethod
    def env_values(cls, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The fields that `EMBXFER_*` variables set, parsed (ValueError naming the variable)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(raw.strip())
            except ValueError:
                raise ValueError(
                    f"config.{f.name}: {ENV_PREFIX}{f.name.upper()}={raw!r}: expected {kind.__name__}"
                ) from None
        return values

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        width = max(len(f.name) for f in fields(self))
        lines = [f"  {f.name:<{width}} = {getattr(self, f.name)}" for f in fields(self)]
        if not self.ring_slot_bytes:
            lines[[f.name for f in fields(self)].index("ring_slot_bytes")] += f" (derived: {self.slot_bytes})"
        return "\n".join(lines)


_ZERO_MEANS = {"max_resume_tokens": "no cap", "cache_bytes": "no cache", "ring_slot_bytes": "derived"}
