"""Request states and per-endpoint statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class RequestState(str, Enum):
    """SPEC section 3: BOOTSTRAPPING -> WAITING_FOR_INPUT -> TRANSFERRING -> SUCCESS, or FAILED.

    On the encoder side, BOOTSTRAPPING means "submitted, waiting for the language side's
    allocation"; WAITING_FOR_INPUT is not used there. `terminal` is a plain attribute of
    each member (the engine loop asks it for every request, every iteration).
    """

    BOOTSTRAPPING = "BOOTSTRAPPING"
    WAITING_FOR_INPUT = "WAITING_FOR_INPUT"
    TRANSFERRING = "TRANSFERRING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"

    terminal: bool


for _state in RequestState:
    _state.terminal = _state in (RequestState.SUCCESS, RequestState.FAILED)
del _state


@dataclass
class Stats:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    aborted: int = 0
    rounds: int = 0
    resumes: int = 0
    tokens: int = 0
    bytes: int = 0
    messages: int = 0
    late_records: int = 0
    rejected_records: int = 0
    discarded_segments: int = 0
    cached: int = 0
    announced: int = 0  # encoder leader: sizes it announced for submits still without an allocation
    blocks_in_use: int = 0
    in_flight: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
