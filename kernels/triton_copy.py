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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .checks import BlockPlan
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
    column_tiles,
    SRC_POOL: tl.constexpr,
    DST_POOL: tl.constexpr,
    HAS_DS: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    VEC: tl.constexpr,
    COLUMNS_FASTEST: tl.constexpr,
):
    if COLUMNS_FASTEST:
        # 1-D grid, a token tile's column tiles on consecutive programs: the programs in
        # flight at one time cover whole rows, i.e. long contiguous runs of the linear side.
        program = tl.program_id(0)
        item = program // column_tiles
        column_tile = program % column_tiles
    else:
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
    columns_fastest: bool = False


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
    """A pool, and where the batch's tokens sit in it (from `checks.covered_blocks`)."""

    pool: PoolTensors
    plan: BlockPlan


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
    counts: Sequence[int], src: Side, dst: Side, *, dim: int, deepstack_dim: int, element_size: int
) -> None:
    """Copy every field of every segment from `src` to `dst` in one launch. The caller has
    validated everything (shapes, dtypes, devices, block bounds, disjoint writes).

    Host cost matters here (it is paid on every call, and for a small request it is
    longer than the kernel): the tables are built with a handful of whole-batch numpy
    operations, never a Python loop over segments or blocks."""
    counts = np.asarray(counts, dtype=np.int64)
    num_segments = counts.shape[0]
    largest = int(counts.max()) if num_segments else 0
    if largest == 0:
        return
    emb_row_bytes, ds_row_bytes = dim * element_size, deepstack_dim * element_size
    word, word_bytes, vec = pick_word(_alignment((emb_row_bytes, ds_row_bytes), src, dst, counts))
    emb_words, ds_words = emb_row_bytes // word_bytes, ds_row_bytes // word_bytes
    tokens, block_w = pick_tile(max(emb_words, ds_words), largest)

    # Work items: (segment, first token) for every TOKENS tokens of every segment.
    tiles = -(-counts // tokens)
    num_items = int(tiles.sum())
    item_segment = np.repeat(np.arange(num_segments, dtype=np.int64), tiles)
    item_first = (
        np.arange(num_items, dtype=np.int64) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    ) * tokens

    # One int64 array: [segment table | work items | block table], each section
    # starting on a 16-byte boundary.
    columns = SEGMENT_COLUMNS.value
    items_start = num_segments * columns + (num_segments * columns) % 2
    table_start = items_start + 2 * num_items
    pool_sides = [side for side in (src, dst) if isinstance(side, PoolSide)]
    table_length = sum(side.plan.blocks.size for side in pool_sides)
    metadata = np.zeros(table_start + max(2, table_length), dtype=np.int64)
    segment_table = metadata[: num_segments * columns].reshape(num_segments, columns)
    segment_table[:, 0] = counts
    items = metadata[items_start:table_start].reshape(num_items, 2)
    items[:, 0] = item_segment
    items[:, 1] = item_first
    table_used = 0
    for side, column in ((src, SOURCE.value), (dst, DESTINATION.value)):
        if isinstance(side, PoolSide):
            plan = side.plan
            segment_table[:, column] = table_used + np.cumsum(plan.lengths) - plan.lengths
            segment_table[:, column + 1] = plan.first_rows
            metadata[table_start + table_used : table_start + table_used + plan.blocks.size] = (
                plan.blocks
            )
            table_used += plan.blocks.size
        else:
            words_ptr, ints_ptr = side.words_base.data_ptr(), side.ints_base.data_ptr()
            segment_table[:, column] = (side.emb_addresses - words_ptr) // word_bytes
            segment_table[:, column + 1] = (
                (side.ds_addresses - words_ptr) // word_bytes if ds_words else 0
            )
            segment_table[:, column + 2] = (side.fill_addresses - ints_ptr) // 4
            segment_table[:, column + 3] = (side.mrope_addresses - ints_ptr) // 4
            segment_table[:, column + 4] = side.mrope_strides

    emb_tiles = -(-emb_words // block_w)
    column_tiles = emb_tiles + (-(-ds_words // block_w) if ds_words else 0)
    columns_fastest = _tile_config.columns_fastest
    grid = (num_items * column_tiles,) if columns_fastest else (num_items, column_tiles)
    src_pointers, dst_pointers = _pointers(src, word), _pointers(dst, word)
    block_size = pool_sides[0].pool.embeddings.shape[1] if pool_sides else 1

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
            column_tiles,
            SRC_POOL=isinstance(src, PoolSide),
            DST_POOL=isinstance(dst, PoolSide),
            HAS_DS=ds_words > 0,
            TOKENS=tokens,
            BLOCK_W=block_w,
            VEC=vec,
            COLUMNS_FASTEST=columns_fastest,
            num_warps=_tile_config.num_warps,
        )

    device = src_pointers[0].device
    if device.type != "cuda":
        run(torch.from_numpy(metadata))  # the interpreter: host memory, nothing in flight
        return
    workspace = workspace_for(device)
    with workspace.lock:
        if device.index == torch.cuda.current_device():
            run(workspace.upload(metadata))
        else:
            with torch.cuda.device(device):
                run(workspace.upload(metadata))
        workspace.release()


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
