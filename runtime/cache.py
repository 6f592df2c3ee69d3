"""`PayloadCache`: recent payloads and multimodal items by content hash, bounded in bytes,
LRU, one budget for both.

Two kinds of entry:

- **a whole payload**, keyed by the request's content hash (the key covers the prompt's
  tokens and all its images together): an engine that admits a request with a hash the
  cache holds gets the payload without any transfer.
- **an item** (an image, a video), keyed by the item's own content hash (vLLM's
  `mm_hash`: the pixels and the processor settings): its rows, every field, with its
  mrope positions kept relative to its first row. A request that names the item at
  admission gets it from the cache, the encoder engine skips the vision model for it and
  sends only the rows that are missing, and the language side puts the item's rows back
  in place, its positions shifted to where the item sits in this prompt (the `anchor`,
  its first row's positions, which the encoder side computes without the vision model).
  So the second turn of a chat about one picture moves the text rows only.

Each language rank keeps its own cache and changes it only in the TP leader's decision
order (an insert when the leader completes a request, a hit or a pin when it decides
one), so the ranks' caches hold the same entries in the same order: a hit on the leader
is a hit on every rank. An item a request relies on is **pinned** until that request ends
(SUCCESS or FAILED): eviction never takes it, so a request whose item was held when the
encoder skipped it always finds it. Entries are copies (the engine owns and may change
what `take()` handed it), and every hit hands out a new copy.

Why the cache never hands out wrong rows: an entry is found only by its full content hash
(up to 32 bytes; engines use a cryptographic digest of everything that determines the
rows) and only if its shape agrees with what the request declares (an item's row count,
the payload's dim and dtype); an entry is written only from rows this rank received under
that hash. A different item that collides on a 256-bit digest is not a case a design can
do anything about; a different item under the same hash with another row count is a
miss, never someone else's rows.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from embxfer.kernels import RowTensors

PAYLOAD, ITEM = "payload", "item"


def _nbytes(rows: RowTensors) -> int:
    return sum(t.numel() * t.element_size() for t in rows if t is not None)


def _copy(rows: RowTensors) -> RowTensors:
    return RowTensors(*(None if t is None else t.clone(memory_format=torch.contiguous_format) for t in rows))


class PayloadCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[tuple[str, bytes], tuple[RowTensors, int]] = OrderedDict()
        self.pins: dict[tuple[str, bytes], set[int]] = {}  # item -> requests that rely on it
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.inserts = 0
        self.item_hits = 0
        self.item_misses = 0

    # -- whole payloads
    def contains(self, content_hash: bytes) -> bool:
        return (PAYLOAD, content_hash) in self.entries

    def hit(self, content_hash: bytes) -> tuple[RowTensors, int] | None:
        """The entry (rows, mrope delta), now the most recently used; None if absent."""
        key = (PAYLOAD, content_hash)
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return entry

    def insert(self, content_hash: bytes, rows: RowTensors, mrope_delta: int) -> None:
        """Keep a copy of `rows` (evicting the least recently used unpinned entries past
        the capacity; a payload larger than what can be freed is not kept)."""
        self._insert((PAYLOAD, content_hash), rows, mrope_delta)

    # -- items
    def holds_item(self, content_hash: bytes, count: int) -> bool:
        """An item of `count` rows under this hash is cached (another row count: a miss)."""
        entry = self.entries.get((ITEM, content_hash))
        return entry is not None and entry[0].fill_ids.shape[0] == count

    def pin(self, content_hash: bytes, request_id: int) -> bool:
        """Keep the item for `request_id` until `unpin_request` (it becomes the most
        recently used); False if it is not cached."""
        key = (ITEM, content_hash)
        if key not in self.entries:
            self.item_misses += 1
            return False
        self.entries.move_to_end(key)
        self.pins.setdefault(key, set()).add(request_id)
        self.item_hits += 1
        return True

    def unpin_request(self, request_id: int, hashes: list[bytes]) -> None:
        for content_hash in hashes:
            key = (ITEM, content_hash)
            holders = self.pins.get(key)
            if holders is not None:
                holders.discard(request_id)
                if not holders:
                    del self.pins[key]

    def item(self, content_hash: bytes) -> RowTensors | None:
        """The item's rows (positions relative to its first row); the caller copies."""
        entry = self.entries.get((ITEM, content_hash))
        return None if entry is None else entry[0]

    def insert_item(self, content_hash: bytes, rows: RowTensors) -> None:
        """Keep a copy of an item's rows, its mrope positions made relative to its first row."""
        key = (ITEM, content_hash)
        if key in self.entries:  # another request brought the same item: keep the first
            self.entries.move_to_end(key)
            return
        if _nbytes(rows) > self.capacity_bytes:
            return
        positions = rows.mrope_positions
        # One op makes the copy of the positions and moves them to count from the first row.
        copy = RowTensors(rows.embeddings.clone(memory_format=torch.contiguous_format),
                          rows.fill_ids.clone(memory_format=torch.contiguous_format),
                          positions - positions[:, :1],
                          None if rows.deepstack is None else rows.deepstack.clone(memory_format=torch.contiguous_format))
        self._insert(key, copy, 0, copied=True)

    # -- both
    def _insert(self, key: tuple[str, bytes], rows: RowTensors, mrope_delta: int, copied: bool = False) -> None:
        size = _nbytes(rows)
        if size > self.capacity_bytes:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= _nbytes(old[0])
        if self.bytes + size > self.capacity_bytes:
            victims, freed = [], 0
            for victim, (evicted, _) in self.entries.items():  # least recently used first
                if victim not in self.pins:
                    victims.append(victim)
                    freed += _nbytes(evicted)
                    if self.bytes - freed + size <= self.capacity_bytes:
                        break
            if self.bytes - freed + size > self.capacity_bytes:
                return  # what is left is pinned by requests in flight: keep what is there
            for victim in victims:
                del self.entries[victim]
            self.bytes -= freed
            self.evictions += len(victims)
        self.entries[key] = (rows if copied else _copy(rows), mrope_delta)
        self.bytes += size
        self.inserts += 1

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_evictions": self.evictions,
                "cache_bytes": self.bytes, "cache_entries": len(self.entries), "item_hits": self.item_hits,
                "item_misses": self.item_misses}
