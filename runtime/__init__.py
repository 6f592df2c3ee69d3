"""embxfer.runtime: the engine-facing layer (pools, allocator, endpoints, transport, CLI)."""

from .allocator import BlockAllocator, allocated_tokens, blocks_for_tokens
from .config import Config
from .payload import Payload
from .pool import BlockPool

__all__ = ["BlockAllocator", "BlockPool", "Config", "Payload", "allocated_tokens", "blocks_for_tokens"]
