"""One configuration dataclass for embxfer, with defaults and `EMBXFER_*` overrides.

Every size that crosses the wire is counted in whole blocks (SPEC R2), so the
configuration keeps `default_alloc_tokens` as the engine wrote it and the allocator
rounds it up; `default_alloc_blocks` is the number that actually matters.

Every field is validated when the object is made, alone and against the others (a ring
slot that cannot hold the largest record this configuration produces, a pool larger
than a record's block list can name, a timeout outside 1 ms .. 1 week, a heartbeat not
well inside the peer timeout): what is accepted here runs. What depends on the machine
is checked where the machine is known: `check_device` (the device exists) and
`check_memory` (the pool and the staging buffers fit it).

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
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from embxfer.control.deadlines import check_timeout

from .settings import ENV_PREFIX, parse_float, parse_int, warn_unknown_variables

if TYPE_CHECKING:
    import torch

MAX_SEGMENTS_PER_MESSAGE = 1024
# A peer is declared dead only after it missed several heartbeats, not one late beat (a
# busy engine step, a scheduling hiccup): the timeout must span at least this many.
MIN_HEARTBEATS_PER_PEER_TIMEOUT = 3


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
    # Bytes of a payload's metadata tensors, in all (at most records.MAX_METADATA_BYTES).
    max_metadata_bytes: int = 1024
    heartbeat_interval_s: float = 0.5
    # A peer whose heartbeat is older than this is dead (its requests fail).
    peer_timeout_s: float = 10.0
    # A request that makes no progress for this long fails with a timeout.
    request_timeout_s: float = 120.0
    # An encoder request that no language engine allocates for this long after its submit
    # fails with a timeout, and the language side is told: the bound on how long an encoder
    # holds a payload nobody asks for (the wait for admission is backpressure, so it gets
    # far longer than request_timeout_s; vLLM's NIXL connector gives a prefill's KV blocks
    # the same 480 s).
    admission_timeout_s: float = 480.0
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
        from embxfer.control import ring
        from embxfer.control.records import MAX_BLOCKS, max_record_bytes

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
        from embxfer.control.records import MAX_METADATA_BYTES

        if isinstance(self.max_metadata_bytes, bool) or not isinstance(self.max_metadata_bytes, int) \
                or not 0 <= self.max_metadata_bytes <= MAX_METADATA_BYTES:
            raise ValueError(f"config.max_metadata_bytes={self.max_metadata_bytes!r}: expected an integer in "
                             f"0..{MAX_METADATA_BYTES} (the wire's bound)")
        for name in ("max_resume_tokens", "cache_bytes", "ring_slot_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"config.{name}={value!r}: expected an integer >= 0 (0 = {_ZERO_MEANS[name]})")
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"config.block_size={self.block_size}: expected 1..1024")
        # One limit for the pool and the wire: a pool the configuration accepts never
        # makes a record (an allocation of all of it) that decoding refuses.
        if self.language_pool_blocks > MAX_BLOCKS:
            raise ValueError(f"config.language_pool_blocks={self.language_pool_blocks}: expected at most "
                             f"{MAX_BLOCKS} (records.MAX_BLOCKS, the most blocks one record's block list carries)")
        if self.max_segments_per_message > MAX_SEGMENTS_PER_MESSAGE:
            raise ValueError(f"config.max_segments_per_message={self.max_segments_per_message}: expected "
                             f"1..{MAX_SEGMENTS_PER_MESSAGE}")
        if not 2 <= self.ring_slots <= ring.MAX_SLOTS:
            raise ValueError(f"config.ring_slots={self.ring_slots}: expected 2..{ring.MAX_SLOTS} (a ring needs two "
                             "slots to publish one while the other is read)")
        for name in ("heartbeat_interval_s", "peer_timeout_s", "request_timeout_s", "admission_timeout_s"):
            check_timeout(f"config.{name}", getattr(self, name))
        if not isinstance(self.shm_prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.]{1,24}", self.shm_prefix):
            raise ValueError(f"config.shm_prefix={self.shm_prefix!r}: expected 1-24 characters from [A-Za-z0-9_.]")
        if self.peer_timeout_s < MIN_HEARTBEATS_PER_PEER_TIMEOUT * self.heartbeat_interval_s:
            raise ValueError(
                f"config.peer_timeout_s={self.peer_timeout_s}: expected at least {MIN_HEARTBEATS_PER_PEER_TIMEOUT} x "
                f"config.heartbeat_interval_s={self.heartbeat_interval_s} (a peer is dead only after it missed "
                "several heartbeats)"
            )
        if self.ring_slot_bytes:
            needed = ring.slot_bytes_for(max_record_bytes(self.limits))
            if not needed <= self.ring_slot_bytes <= ring.MAX_SLOT_BYTES or self.ring_slot_bytes % 64:
                raise ValueError(
                    f"config.ring_slot_bytes={self.ring_slot_bytes}: expected a multiple of 64 from "
                    f"{needed}, the largest record of {self.language_pool_blocks} pool blocks and "
                    f"{self.max_segments_per_message} segments per message, to {ring.MAX_SLOT_BYTES} "
                    "(0 derives it)"
                )
        segment = ring.segment_bytes(self.ring_slots, self.slot_bytes, ring.MAX_READERS)
        if segment > ring.MAX_SEGMENT_BYTES:
            raise ValueError(
                f"config.ring_slots={self.ring_slots} x {self.slot_bytes}-byte slots (config.ring_slot_bytes, "
                f"from {self.language_pool_blocks} pool blocks when 0) make a {segment}-byte ring: expected at "
                f"most ring.MAX_SEGMENT_BYTES={ring.MAX_SEGMENT_BYTES}; fewer ring_slots"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then `EMBXFER_*` variables, then explicit keyword overrides."""
        return cls(**{**cls.env_values(env), **overrides})

    @classmethod
    def env_values(cls, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The fields that `EMBXFER_*` variables set, parsed: plain ASCII decimal integers
        and numbers only (ValueError `config.<field>: EMBXFER_<FIELD>='1_0': expected a
        decimal integer`). Warns, once per process, of `EMBXFER_*` names no one reads."""
        env = os.environ if env is None else env
        warn_unknown_variables(env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            variable = ENV_PREFIX + f.name.upper()
            raw = env.get(variable)
            if raw is None:
                continue
            if isinstance(f.default, int):
                values[f.name] = parse_int(variable, raw, owner=f"config.{f.name}")
            elif isinstance(f.default, float):
                values[f.name] = parse_float(variable, raw, owner=f"config.{f.name}")
            else:
                values[f.name] = raw.strip()
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
_DEVICE_EXPECTED = "expected 'cpu', 'cuda' or 'cuda:N'"


def check_device(device: str | int | torch.device) -> torch.device:
    """`device` as a torch.device that exists here: 'cpu', or 'cuda[:N]' with N below the
    visible device count ('cuda' alone: the current device, with its index). ValueError
    naming the device and what is missing otherwise."""
    import torch

    shown = repr(str(device)) if isinstance(device, torch.device) else repr(device)
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"device={shown}: {_DEVICE_EXPECTED}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device={shown}: {_DEVICE_EXPECTED}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ValueError(f"device={shown}: embxfer does not run on {parsed.type} devices; {_DEVICE_EXPECTED}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={shown}: no CUDA device is visible (torch.cuda.is_available() is False)")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if parsed.index is None else parsed.index
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"device={shown}: only {count} CUDA device{'s' if count != 1 else ''} visible "
                         f"(cuda:0 .. cuda:{count - 1}"
                         f"{f'; CUDA_VISIBLE_DEVICES={visible!r}' if visible is not None else ''})")
    return torch.device("cuda", index)


def check_memory(config: Config, device: str | int | torch.device, dim: int, dtype: torch.dtype,
                 deepstack_layers: int = 0, role: str = "language") -> int:
    """The bytes a rank of `role` allocates up front on `device` (a language rank: its pool,
    `language_pool_blocks` x `block_size` tokens of `dim` x element + 4 (fill id) + 12
    (mrope) + `deepstack_layers` x `dim` x element bytes; either rank: `staging_depth` x
    `staging_bytes` for one peer). ValueError naming the fields and both numbers when that
    is more than the device has free (CUDA: `torch.cuda.mem_get_info`; CPU: MemAvailable
    of /proc/meminfo); no check where the free memory cannot be read."""
    import torch

    from .payload import EMBEDDING_DTYPES

    device = check_device(device)
    for name, value, low in (("dim", dim, 1), ("deepstack_layers", deepstack_layers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"dtype={dtype}: expected one of {', '.join(str(d) for d in EMBEDDING_DTYPES)}")
    if role not in ("language", "encoder"):
        raise ValueError(f"role={role!r}: expected 'language' or 'encoder'")
    element = torch.empty((), dtype=dtype).element_size()
    bytes_per_token = dim * element + 4 + 12 + deepstack_layers * dim * element
    pool = config.language_pool_blocks * config.block_size * bytes_per_token if role == "language" else 0
    staging = config.staging_depth * config.staging_bytes
    free = _free_bytes(device)
    if free is None or pool + staging <= free[0]:
        return pool + staging
    parts = [f"config.staging_depth={config.staging_depth} x config.staging_bytes={config.staging_bytes} = "
             f"{_bytes(staging)} of staging (one peer)"]
    if pool:
        parts.insert(0, f"config.language_pool_blocks={config.language_pool_blocks} x config.block_size="
                        f"{config.block_size} tokens x {bytes_per_token} bytes a token (dim {dim}, {dtype}, "
                        f"{deepstack_layers} deepstack layers) = {_bytes(pool)} of pool")
    larger = "config.language_pool_blocks" if pool >= staging else "config.staging_bytes or config.staging_depth"
    raise ValueError(f"a {role} rank on {device} needs {_bytes(pool + staging)}: {' + '.join(parts)}; {device} has "
                     f"{_bytes(free[0])} free ({free[1]}): expected at most that, lower {larger}")


def _free_bytes(device: torch.device) -> tuple[int, str] | None:
    """(free bytes on `device`, where the number comes from), or None if unknown."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "torch.cuda.mem_get_info"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None


def _bytes(count: int) -> str:
    """`count` bytes, exactly and in the nearest binary unit."""
    size, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            break
        size /= 1024
    return f"{count} bytes ({size:.1f} {unit})" if unit != "B" else f"{count} bytes"
