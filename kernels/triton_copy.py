"""One Triton kernel behind pack, unpack, unpack_to_rows, gather and scatter.

All five are the same operation: for every token of a batch of segments, copy its
rows of every field (embeddings, deepstack, fill_ids, the three mrope positions) from
a *source side* to a *destination side*. A side is either

* a **pool** (block-table addressed): token t of a segment sits in block
  `table[t // block_size]` at row `t % block_size`; or
* **linear**: the segment's rows are contiguous, at per-segment offsets from one base
  pointer (the staging buffer, or payload-shaped row tensors).

pack = pool -> linear (staging), unpack = linear -> pool, unpack_to_rows = linear ->
linear, gather = pool -> linear (rows), scatter = linear (rows) -> pool.

Grid. Axis 0 walks a flat list of work items, each `(segment, first token)` covering
`TOKENS` tokens of one segment, built on the host so that one launch serves a batch
of any shape (no program is spent on a segment it does not own). Axis 1 walks column
tiles of `BLOCK_W` words across a token's row: first the embeddings tiles, then the
deepstack tiles, so a wide row (D = 8192, or K*D = 24k) spreads over many programs
and even one short request fills the GPU. The programs of column tile 0 also carry
the token's fill_id and mrope positions (16 bytes a token, too few for their own
programs).

Block shape. Each program moves a `TOKENS x BLOCK_W` tile, sized on the host to
about `tile_words` 4-byte words (16 KiB by default): large enough that every thread
has several independent 16-byte loads in flight before its first store (what a copy
needs to reach HBM bandwidth), small enough to keep thousands of programs for the
scheduler to balance. `BLOCK_W` is picked so that it wastes the fewest lanes on the
row's last tile (D = 3584 bf16 is 1792 words = 7 x 256).

Width. Rows are copied as raw words (int32 when the row length and all base
addresses allow, else int16): the copy is bit-exact whatever the dtype, and bf16,
fp16 and fp32 share one compiled kernel. `VEC` is how many words make 16 bytes given
the alignment the host proved; the `multiple_of` hints and the VEC-granular column
mask let the compiler emit 16-byte loads and stores even for D = 1000.

Offsets are int64 throughout: a pool of 100k tokens x 8192 x 2 B already overflows
int32 byte offsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .types import PoolTensors
from .workspace import workspace_for

# Segment table: one row of int64 per segment.
#   column 0: the segment's token count
#   columns 1-5: source side, columns 6-10: destination side; for a side that is
#     a pool:   (offset of the segment's blocks in the block table, first token
#               relative to the first of those blocks, unused x3)
#     linear:   (embeddings offset in words, deepstack offset in words, fill_ids offset
#               in int32s, mrope offset in int32s, mrope stride between t/h/w rows)
SEGMENT_COLUMNS = tl.constexpr(11)
SOURCE = tl.constexpr(1)
DESTINATION = tl.constexpr(6)


@triton.jit
def _token_offsets(
    segment_row,
    table,
    side: tl.constexpr,
    tokens,
    token_mask,
    block_size,
    emb_words,
    ds_words,
    POOL: tl.constexpr,
    VEC: tl.constexpr,
):
    """Per token of the tile: (embeddings row offset, deepstack row offset, fill_ids offset,
    mrope t-row offset) on one side, plus that side's stride between the mrope rows.

    The host proved every row offset a multiple of VEC words. The hint goes on the ops
    that make the offsets, here: a hint on a jit function's argument would be lost when
    the call is inlined."""
    if POOL:
        table_offset = tl.load(segment_row + side)
        first = tl.load(segment_row + side + 1)
        position = first + tokens
        block = tl.load(table + table_offset + position // block_size, mask=token_mask, other=0)
        row = position % block_size
        slot = block * block_size + row
        mrope = block * (3 * block_size) + row
        mrope_stride = block_size.to(tl.int64)
        emb = tl.multiple_of(slot * emb_words, VEC)
        ds = tl.multiple_of(slot * ds_words, VEC)
        return emb, ds, slot, mrope, mrope_stride
    else:
        emb = tl.multiple_of(tl.load(segment_row + side) + tokens * emb_words, VEC)
        ds = tl.multiple_of(tl.load(segment_row + side + 1) + tokens * ds_words, VEC)
        fill = tl.load(segment_row + side + 2) + tokens
        mrope = tl.load(segment_row + side + 3) + tokens
        mrope_stride = tl.load(segment_row + side + 4)
        return emb, ds, fill, mrope, mrope_stride


@triton.jit
def _copy_rows(
    src,
    src_rows,
    dst,
    dst_rows,
    first_column,
    row_words,
    token_mask,
    BLOCK_W: tl.constexpr,
    VEC: tl.constexpr,
):
    columns = first_column + tl.arange(0, BLOCK_W)
    columns = tl.max_contiguous(tl.multiple_of(columns, BLOCK_W), BLOCK_W)
    # row_words is a multiple of VEC: comparing in VEC units keeps the mask constant
    # over each 16-byte group, which the vectorizer needs.
    in_row = (columns // VEC) < (row_words // VEC)
    mask = token_mask[:, None] & in_row[None, :]
    values = tl.load(
        src + src_rows[:, None] + columns[None, :], mask=mask, eviction_policy="evict_first"
    )
    tl.store(dst + dst_rows[:, None] + columns[None, :], values, mask=mask)


@triton.jit(do_not_specialize=["block_size"])
def _copy_kernel(
    work,
    segments,
    table,
    src_emb,
    src_ds,
    src_fill,
    src_mrope,
    dst_emb,
    dst_ds,
    dst_fill,
    dst_mrope,
    block_size,
    emb_words,
    ds_words,
    emb_tiles,
    SRC_POOL: tl.constexpr,
    DST_POOL: tl.constexpr,
    HAS_DS: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    VEC: tl.constexpr,
):
    item = tl.program_id(0)
    column_tile = tl.program_id(1)
    segment = tl.load(work + 2 * item)
    first_token = tl.load(work + 2 * item + 1)
    segment_row = segments + segment * SEGMENT_COLUMNS
    count = tl.load(segment_row)
    tokens = first_token + tl.arange(0, TOKENS).to(tl.int64)
    token_mask = tokens < count

    s_emb, s_ds, s_fill, s_mrope, s_mrope_stride = _token_offsets(
        segment_row,
        table,
        SOURCE,
        tokens,
        token_mask,
        block_size,
        emb_words,
        ds_words,
        SRC_POOL,
        VEC,
    )
    d_emb, d_ds, d_fill, d_mrope, d_mrope_stride = _token_offsets(
        segment_row,
        table,
        DESTINATION,
        tokens,
        token_mask,
        block_size,
        emb_words,
        ds_words,
        DST_POOL,
        VEC,
    )

    if column_tile < emb_tiles:
        _copy_rows(
            src_emb,
            s_emb,
            dst_emb,
            d_emb,
            column_tile * BLOCK_W,
            emb_words,
            token_mask,
            BLOCK_W,
            VEC,
        )
    else:
        if HAS_DS:
            _copy_rows(
                src_ds,
                s_ds,
                dst_ds,
                d_ds,
                (column_tile - emb_tiles) * BLOCK_W,
                ds_words,
                token_mask,
                BLOCK_W,
                VEC,
            )

    if column_tile == 0:
        fill = tl.load(src_fill + s_fill, mask=token_mask)
        tl.store(dst_fill + d_fill, fill, mask=token_mask)
        for axis in tl.static_range(3):
            position = tl.load(src_mrope + s_mrope + axis * s_mrope_stride, mask=token_mask)
            tl.store(dst_mrope + d_mrope + axis * d_mrope_stride, position, mask=token_mask)


@dataclass(frozen=True)
class TileConfig:
    """Launch shape knobs (see the module docstring); the defaults are the tuned ones."""

    tile_words: int = 4096
    max_block_w: int = 1024
    num_warps: int = 4


_tile_config = TileConfig()


def set_tile_config(config: TileConfig) -> TileConfig:
    """Swap the launch shape (benchmark sweeps); returns the previous one."""
    global _tile_config
    previous, _tile_config = _tile_config, config
    return previous


def pick_word(alignment: int) -> tuple[torch.dtype, int, int]:
    """(word dtype, word bytes, VEC) for rows whose lengths and base addresses are all
    multiples of `alignment` bytes."""
    aligned = math.gcd(alignment, 16)
    word_bytes = min(4, aligned)
    word = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[word_bytes]
    return word, word_bytes, aligned // word_bytes


def pick_tile(row_words: int, max_tokens: int) -> tuple[int, int]:
    """(TOKENS, BLOCK_W) for rows of `row_words` words (the widest field)."""
    config = _tile_config
    candidates = [w for w in (64, 128, 256, 512, 1024, 2048, 4096) if w <= config.max_block_w]
    fitting = [w for w in candidates if w >= row_words]
    if fitting:
        block_w = fitting[0]
    else:
        # Fewest wasted lanes on the last tile; ties go to the wider tile.
        block_w = min(candidates, key=lambda w: (-(-row_words // w) * w - row_words, -w))
    tokens = max(1, config.tile_words // block_w)
    tokens = min(tokens, 1 << max(0, (max_tokens - 1).bit_length()))
    return tokens, block_w


class PoolSide(NamedTuple):
    """A pool, and per segment the blocks holding its tokens and its first token's row
    relative to the first of them (from `checks.covered_blocks`)."""

    pool: PoolTensors
    plans: list[tuple[np.ndarray, int]]


class LinearSide(NamedTuple):
    """Contiguous per-segment rows. Addresses are absolute byte addresses, one per
    segment; the kernel reaches them as offsets from `words_base` (embeddings and
    deepstack) and `ints_base` (fill_ids and mrope), which must be live tensors on the
    same device (the staging buffer, or the first output's tensors)."""

    words_base: torch.Tensor
    ints_base: torch.Tensor
    emb_addresses: np.ndarray
    ds_addresses: np.ndarray
    fill_addresses: np.ndarray
    mrope_addresses: np.ndarray
    mrope_strides: np.ndarray


Side = PoolSide | LinearSide


def copy_segments(
    counts: np.ndarray, src: Side, dst: Side, *, dim: int, deepstack_dim: int, element_size: int
) -> None:
    """Copy every field of every segment from `src` to `dst` in one launch. The caller has
    validated everything (shapes, dtypes, devices, block bounds, disjoint writes)."""
    counts = np.asarray(counts, dtype=np.int64)
    if not counts.any():
        return
    emb_row_bytes, ds_row_bytes = dim * element_size, deepstack_dim * element_size
    word, word_bytes, vec = pick_word(_alignment((emb_row_bytes, ds_row_bytes), src, dst, counts))
    emb_words, ds_words = emb_row_bytes // word_bytes, ds_row_bytes // word_bytes
    tokens, block_w = pick_tile(max(emb_words, ds_words), int(counts.max()))

    segment_table = np.zeros((counts.shape[0], SEGMENT_COLUMNS.value), dtype=np.int64)
    segment_table[:, 0] = counts
    block_tables = []
    table_length = 0
    for side, column in ((src, SOURCE.value), (dst, DESTINATION.value)):
        if isinstance(side, PoolSide):
            lengths = np.array([len(blocks) for blocks, _ in side.plans], dtype=np.int64)
            segment_table[:, column] = table_length + np.cumsum(lengths) - lengths
            segment_table[:, column + 1] = [offset for _, offset in side.plans]
            block_tables.extend(blocks for blocks, _ in side.plans)
            table_length += int(lengths.sum())
        else:
            live = counts > 0
            words_ptr, ints_ptr = side.words_base.data_ptr(), side.ints_base.data_ptr()
            columns = segment_table[:, column : column + 5]
            columns[live, 0] = (side.emb_addresses[live] - words_ptr) // word_bytes
            columns[live, 1] = (
                (side.ds_addresses[live] - words_ptr) // word_bytes if ds_words else 0
            )
            columns[live, 2] = (side.fill_addresses[live] - ints_ptr) // 4
            columns[live, 3] = (side.mrope_addresses[live] - ints_ptr) // 4
            columns[live, 4] = side.mrope_strides[live]
    block_table = np.concatenate(block_tables) if block_tables else np.zeros(0, dtype=np.int64)

    # Work items: (segment, first token) for every TOKENS tokens of every segment.
    tiles = -(-counts // tokens)
    segment_of_item = np.repeat(np.arange(counts.shape[0], dtype=np.int64), tiles)
    first_of_item = (
        np.arange(segment_of_item.shape[0], dtype=np.int64)
        - np.repeat(np.cumsum(tiles) - tiles, tiles)
    ) * tokens
    items = np.stack([segment_of_item, first_of_item], axis=1)

    metadata, items_start, table_start = _pack_metadata(segment_table, items, block_table)
    device = _device_of(src)
    emb_tiles = -(-emb_words // block_w)
    grid = (items.shape[0], emb_tiles + (-(-ds_words // block_w) if ds_words else 0))
    src_pointers, dst_pointers = _pointers(src, word), _pointers(dst, word)
    src_pool, dst_pool = isinstance(src, PoolSide), isinstance(dst, PoolSide)
    block_size = (
        (src if src_pool else dst).pool.embeddings.shape[1] if (src_pool or dst_pool) else 1
    )

    def run(on_device: torch.Tensor) -> None:
        _copy_kernel[grid](
            on_device[items_start:table_start],
            on_device[:items_start],
            on_device[table_start:],
            *src_pointers,
            *dst_pointers,
            block_size,
            emb_words,
            ds_words,
            emb_tiles,
            SRC_POOL=src_pool,
            DST_POOL=dst_pool,
            HAS_DS=ds_words > 0,
            TOKENS=tokens,
            BLOCK_W=block_w,
            VEC=vec,
            num_warps=_tile_config.num_warps,
        )

    if device.type != "cuda":
        run(torch.from_numpy(metadata))  # the interpreter: host memory, nothing in flight
        return
    workspace = workspace_for(device)
    with workspace.lock, torch.cuda.device(device):
        run(workspace.upload(metadata))
        workspace.release()


def _pack_metadata(
    segment_table: np.ndarray, items: np.ndarray, block_table: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """[segment table | work items | block table] in one int64 array, each section
    starting on a 16-byte boundary; returns it with the start of the items and the table."""
    items_start = segment_table.size + segment_table.size % 2
    table_start = items_start + items.size  # items.size is even
    metadata = np.zeros(table_start + max(2, block_table.shape[0]), dtype=np.int64)
    metadata[: segment_table.size] = segment_table.reshape(-1)
    metadata[items_start:table_start] = items.reshape(-1)
    metadata[table_start : table_start + block_table.shape[0]] = block_table
    return metadata, items_start, table_start


def _alignment(row_bytes: tuple[int, int], src: Side, dst: Side, counts: np.ndarray) -> int:
    """The largest power of two (<= 16) dividing every row length and every base address
    of the embeddings and deepstack on both sides."""
    values = [16, *row_bytes]
    live = counts > 0
    for side in (src, dst):
        if isinstance(side, PoolSide):
            values.append(side.pool.embeddings.data_ptr())
            if side.pool.deepstack is not None:
                values.append(side.pool.deepstack.data_ptr())
        else:
            values.append(side.words_base.data_ptr())
            values.append(int(np.bitwise_or.reduce(side.emb_addresses[live])))
            if row_bytes[1]:
                values.append(int(np.bitwise_or.reduce(side.ds_addresses[live])))
    alignment = 0
    for value in values:
        alignment = math.gcd(alignment, value)
    return alignment & -alignment


def _pointers(side: Side, word: torch.dtype) -> tuple[torch.Tensor, ...]:
    if isinstance(side, PoolSide):
        pool = side.pool
        emb = pool.embeddings.view(word)
        ds = pool.deepstack.view(word) if pool.deepstack is not None else emb
        return emb, ds, pool.fill_ids, pool.mrope_positions
    words = side.words_base.view(word)
    return words, words, side.ints_base, side.ints_base


def _device_of(side: Side) -> torch.device:
    return side.pool.embeddings.device if isinstance(side, PoolSide) else side.words_base.device
