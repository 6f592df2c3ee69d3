"""One configuration dataclass for embxfer, with defaults and `EMBXFER_*` overrides.

Every size that crosses the wire is counted in whole blocks (SPEC R2), so the
configuration keeps `default_alloc_tokens` as the engine wrote it and the allocator
rounds it up; `default_alloc_blocks` is the number that actually matters.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "EMBXFER_"


@dataclass(frozen=True)
class Config:
    """Tunables shared by both engines. Field `x` reads env var `EMBXFER_X`."""

    block_size: int = 128
    default_alloc_tokens: int = 8192
    encoder_pool_blocks: int = 1024
    language_pool_blocks: int = 1024
    # Upper bound on the tokens one resume round may ask for; 0 means "all of the remainder".
    max_resume_tokens: int = 0
    # One staging chunk: the unit of a P2P message and of pipelining.
    staging_bytes: int = 32 << 20
    # Staging chunks per peer and direction (bounds staging memory; 2 = double buffering).
    staging_depth: int = 2
    heartbeat_interval_s: float = 0.5
    # A peer whose heartbeat is older than this is dead (its requests fail).
    peer_timeout_s: float = 10.0
    # A request that makes no progress for this long fails with a timeout.
    request_timeout_s: float = 120.0
    ring_slots: int = 1024
    ring_slot_bytes: int = 4096
    # Shared-memory names are <shm_prefix>-<pid>-<random>; `embxfer ring ls|rm` finds them.
    shm_prefix: str = "embxfer"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def default_alloc_blocks(self) -> int:
        return -(-self.default_alloc_tokens // self.block_size)

    def validate(self) -> None:
        positive_ints = (
            "block_size",
            "default_alloc_tokens",
            "encoder_pool_blocks",
            "language_pool_blocks",
            "staging_bytes",
            "staging_depth",
            "ring_slots",
            "ring_slot_bytes",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.{name}={value!r}: expected a positive integer")
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"config.block_size={self.block_size}: expected 1..1024")
        if isinstance(self.max_resume_tokens, bool) or not isinstance(self.max_resume_tokens, int) or self.max_resume_tokens < 0:
            raise ValueError(
                f"config.max_resume_tokens={self.max_resume_tokens!r}: expected an integer >= 0 (0 = no cap)"
            )
        for name in ("heartbeat_interval_s", "peer_timeout_s", "request_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"config.{name}={value!r}: expected a positive number of seconds")
        if not isinstance(self.shm_prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.]{1,24}", self.shm_prefix):
            raise ValueError(f"config.shm_prefix={self.shm_prefix!r}: expected 1-24 characters from [A-Za-z0-9_.]")
        if self.peer_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"config.peer_timeout_s={self.peer_timeout_s}: expected at least twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then `EMBXFER_*` variables, then explicit keyword overrides."""
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
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        width = max(len(f.name) for f in fields(self))
        return "\n".join(f"  {f.name:<{width}} = {getattr(self, f.name)}" for f in fields(self))
