"""`PayloadCache`: recently completed payloads by content hash, bounded in bytes, LRU.

An engine that admits a request with a content hash (vLLM's `mm_hash`, SGLang's
multimodal cache key) gets a payload that is still cached without any transfer. Each
language rank keeps its own cache, and changes it only in the TP leader's decision order
(an insert when the leader completes a request, a hit when it serves one), so the
ranks' caches hold the same entries in the same order: a hit on the leader is a hit on
every rank. Entries are copies of the outputs (the engine owns and may change what
`take()` handed it), and every hit hands out a new copy.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from embxfer.kernels import RowTensors


def _nbytes(rows: RowTensors) -> int:
    return sum(t.numel() * t.element_size() for t in rows if t is not None)


class PayloadCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[bytes, tuple[RowTensors, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.inserts = 0

    def contains(self, content_hash: bytes) -> bool:
        return content_hash in self.entries

    def hit(self, content_hash: bytes) -> tuple[RowTensors, int] | None:
        """The entry (rows, mrope delta), now the most recently used; None if absent."""
        entry = self.entries.get(content_hash)
        if entry is not None:
            self.entries.move_to_end(content_hash)
            self.hits += 1
        return entry

    def insert(self, content_hash: bytes, rows: RowTensors, mrope_delta: int) -> None:
        """Keep a copy of `rows` (evicting the least recently used entries past the
        capacity; a payload larger than the whole capacity is not kept)."""
        size = _nbytes(rows)
        if size > self.capacity_bytes:
            return
        old = self.entries.pop(content_hash, None)
        if old is not None:
            self.bytes -= _nbytes(old[0])
        while self.entries and self.bytes + size > self.capacity_bytes:
            _, (evicted, _) = self.entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)
            self.evictions += 1
        copy = RowTensors(*(None if t is None else t.clone(memory_format=torch.contiguous_format) for t in rows))
        self.entries[content_hash] = (copy, mrope_delta)
        self.bytes += size
        self.inserts += 1

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_evictions": self.evictions,
                "cache_bytes": self.bytes, "cache_entries": len(self.entries)}
