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

Grid. Work items are `(segment, first token)` tiles of `TOKENS` tokens, numbered
segment after segment; each is split into column tiles of `BLOCK_W` words across the
token's row (first the embeddings, then the deepstack), so a wide row (D = 8192, or
K*D = 24k) spreads over several programs. The grid is 1-D with the column tiles
fastest: program p does column tile p % column_tiles of item p // column_tiles, so the
programs in flight together cover whole rows, i.e. long contiguous runs of the staging
buffer (measured 2-5% faster on an H100 than items-fastest). A program finds its
segment by binary search over the segments' first items, so one launch serves a batch
of any shape and no table per item is built or copied. The programs of column tile 0
also carry the token's fill_id and mrope positions (16 bytes a token, too few for
programs of their own).

Block shape. Each program moves a `TOKENS x BLOCK_W` tile of about `tile_words`
4-byte words (32 KiB by default, 4 warps: each thread has 16 independent 16-byte
loads in flight before its first store, what a copy needs to approach HBM bandwidth).
A persistent grid (a few programs per SM striding over the tiles) measured 2-10%
slower than one program per tile, and was dropped.
`BLOCK_W` is the narrowest power of two that covers the row, or, for rows wider than
2048 words, the width that wastes the fewest lanes on the row's last tile. For small
requests TOKENS halves until the launch has at least `min_programs` programs, so that
even 1000 tokens spread over every SM. The defaults are the best of a sweep on an
H100 (bench/kernels.py --sweep; results in bench/results/kernels-h100.json).

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
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .plan import BlockPlan
from .types import PoolTensors

# Metadata: one int64 array per launch. A header of HEADER_WORDS words (the segment
# count S, the number of programs that have work, the offset of the block tables from
# the columns, unused), then S rows of columns stored column-major (column c of segment
# s at HEADER_WORDS + c * S + s), then the block table:
#   column 0: the segment's token count
#   column 1: the segment's first work item (exclusive prefix sum of its token tiles)
#   columns 2-6: source side, columns 7-11: destination side; for a side that is
#     a pool:   (offset of the segment's blocks in the block table, first token
#               relative to the first of those blocks, unused x3)
#     linear:   (embeddings offset in words, deepstack offset in words, fill_ids offset
#               in int32s, mrope offset in int32s, mrope stride between t/h/w rows)
#   then, 12 * S words after the columns' start: the block tables of the pool sides,
#   concatenated, and one 0 (so that it is never empty).
# The header is what a launch with a fixed grid reads (HEADER, see `_copy_kernel`); a
# launch sized for its message gets S and the table's offset as arguments.
HEADER_WORDS = tl.constexpr(4)
SEGMENT_COLUMNS = tl.constexpr(12)
SOURCE = tl.constexpr(2)
DESTINATION = tl.constexpr(7)


@triton.jit
def _token_offsets(
    segments,
    num_segments,
    segment,
    table,
    side: tl.constexpr,
    first_token,
    tokens,
    token_mask,
    block_size,
    emb_words,
    ds_words,
    POOL: tl.constexpr,
    VEC: tl.constexpr,
    TOKENS: tl.constexpr,
):
    """Per token of the tile: (embeddings row offset, deepstack row offset, fill_ids offset,
    mrope t-row offset) on one side, plus that side's stride between the mrope rows.

    The host proved every row offset a multiple of VEC words. The hint goes on the ops
    that make the offsets, here: a hint on a jit function's argument would be lost when
    the call is inlined."""
    if POOL:
        table_offset = tl.load(segments + side * num_segments + segment)
        first = tl.load(segments + (side + 1) * num_segments + segment)
        # The tile's tokens are consecutive: one division for its first token, then 32-bit
        # steps (a 64-bit division per token cost more instructions than the copy's own).
        start = first + first_token
        first_block = start // block_size
        row = (start - first_block * block_size).to(tl.int32) + tl.arange(0, TOKENS)
        if TOKENS <= block_size:  # the tile spans at most two blocks
            step = (row >= block_size).to(tl.int32)
        else:
            step = row // block_size
        row -= step * block_size
        block = tl.load(table + table_offset + first_block + step, mask=token_mask, other=0)
        slot = block * block_size + row
        mrope = block * (3 * block_size) + row
        mrope_stride = block_size.to(tl.int64)
        emb = tl.multiple_of(slot * emb_words, VEC)
        ds = tl.multiple_of(slot * ds_words, VEC)
        return emb, ds, slot, mrope, mrope_stride
    else:
        column = segments + segment
        emb = tl.multiple_of(tl.load(column + side * num_segments) + tokens * emb_words, VEC)
        ds = tl.multiple_of(tl.load(column + (side + 1) * num_segments) + tokens * ds_words, VEC)
        fill = tl.load(column + (side + 2) * num_segments) + tokens
        mrope = tl.load(column + (side + 3) * num_segments) + tokens
        mrope_stride = tl.load(column + (side + 4) * num_segments)
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
    STREAM: tl.constexpr,
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
    if STREAM:  # written once, read by another kernel much later: do not keep it in L2
        tl.store(dst + dst_rows[:, None] + columns[None, :], values, mask=mask, cache_modifier=".cs")
    else:
        tl.store(dst + dst_rows[:, None] + columns[None, :], values, mask=mask)


FETCH_BLOCK = 1024  # words of a table each program of `_fetch_table` copies


@triton.jit
def _fetch_table(host, device, words, BLOCK: tl.constexpr):
    """A graph's table from its pinned host array (mapped into the device's address space,
    read across the bus) into its device buffer: a kernel node in the graph, where a
    copy node would put the copy engine's start-up on the copy kernel's critical path."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < words
    tl.store(device + offsets, tl.load(host + offsets, mask=mask), mask=mask)


def fetch_table(host: torch.Tensor, device: torch.Tensor, words: int, stream: torch.cuda.Stream) -> None:
    """Launch `_fetch_table` on `stream` for the first `words` words (while a graph is
    captured there: once per graph, so Triton's dispatcher is fine)."""
    with torch.cuda.stream(stream):
        _fetch_table[(triton.cdiv(words, FETCH_BLOCK),)](host, device, words, BLOCK=FETCH_BLOCK)


@triton.jit(do_not_specialize=["num_segments", "table_start", "block_size"])
def _copy_kernel(
    metadata,
    num_segments,
    table_start,
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
    STREAM: tl.constexpr,
    HEADER: tl.constexpr,
):
    """One `TOKENS x BLOCK_W` tile per program (see the module docstring).

    HEADER: the grid is fixed (a launch captured once in a CUDA graph and replayed for
    many messages): S and the table's offset come from the table's header, and the
    programs past the message's last tile leave at once."""
    program = tl.program_id(0)
    if HEADER:
        if program >= tl.load(metadata + 1):
            return
        num_segments = tl.load(metadata).to(tl.int32)
        table_start = tl.load(metadata + 2)
    segments = metadata + HEADER_WORDS
    item = program // column_tiles
    column_tile = program % column_tiles
    # The segment owning this work item: the last one whose first item is <= item
    # (binary search over column 1; empty segments share their successor's first item).
    low = 0
    high = num_segments
    while high - low > 1:
        middle = (low + high) // 2
        right = tl.load(segments + num_segments + middle) <= item
        low = tl.where(right, middle, low)
        high = tl.where(right, high, middle)
    segment = low
    first_token = (item - tl.load(segments + num_segments + segment)) * TOKENS
    count = tl.load(segments + segment)
    table = segments + table_start
    tokens = first_token + tl.arange(0, TOKENS).to(tl.int64)
    token_mask = tokens < count

    s_emb, s_ds, s_fill, s_mrope, s_mrope_stride = _token_offsets(
        segments,
        num_segments,
        segment,
        table,
        SOURCE,
        first_token,
        tokens,
        token_mask,
        block_size,
        emb_words,
        ds_words,
        SRC_POOL,
        VEC,
        TOKENS,
    )
    d_emb, d_ds, d_fill, d_mrope, d_mrope_stride = _token_offsets(
        segments,
        num_segments,
        segment,
        table,
        DESTINATION,
        first_token,
        tokens,
        token_mask,
        block_size,
        emb_words,
        ds_words,
        DST_POOL,
        VEC,
        TOKENS,
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
            STREAM,
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
                STREAM,
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

    tile_words: int = 8192
    max_block_w: int = 2048
    num_warps: int = 4
    min_programs: int = 1024
    streaming_stores: bool = False


# Per-device defaults, matched against the device name (bench/kernels.py --sweep picks
# them; bench/results/kernels-NOTES.md has the sweeps). Devices not listed use TileConfig().
DEVICE_TILE_CONFIGS: dict[str, TileConfig] = {
    # Sweep of bench/kernels.py on an H200 (results/kernels-NOTES.md): narrower tiles and
    # fewer warps (8 KiB per program) keep more programs resident; 0.86-0.91 of the
    # copy ceiling over cases a, b and d, against 0.82-0.90 with the H100's default.
    "H200": TileConfig(tile_words=2048, max_block_w=256, num_warps=2),
}

_DEFAULT_TILES = TileConfig()
_override: TileConfig | None = None
_by_device: dict[int, TileConfig] = {}


def set_tile_config(config: TileConfig | None) -> TileConfig | None:
    """Force one launch shape on every device (benchmark sweeps, tests); None goes back to
    the per-device defaults. Returns the previous override."""
    global _override
    previous, _override = _override, config
    return previous


def tile_config(device: torch.device) -> TileConfig:
    """The launch shape for `device`: the override if set, else its per-device default
    (the same object every call: launch routes keep it and compare by identity)."""
    if device.type != "cuda":
        return tiles_at(-1)
    return tiles_at(device.index if device.index is not None else torch.cuda.current_device())


def tiles_at(index: int) -> TileConfig:
    """`tile_config` of CUDA device `index` (-1: the CPU) for callers that keep the index: a
    launcher asks at every route lookup, where making a device object would cost more."""
    if _override is not None:
        return _override
    if index < 0:
        return _DEFAULT_TILES
    config = _by_device.get(index)
    if config is None:
        name = torch.cuda.get_device_name(index)
        config = next((c for key, c in DEVICE_TILE_CONFIGS.items() if key in name), _DEFAULT_TILES)
        _by_device[index] = config
    return config


def pick_word(alignment: int) -> tuple[torch.dtype, int, int]:
    """(word dtype, word bytes, VEC) for rows whose lengths and base addresses are all
    multiples of `alignment` bytes."""
    aligned = math.gcd(alignment, 16)
    word_bytes = min(4, aligned)
    word = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[word_bytes]
    return word, word_bytes, aligned // word_bytes


_BLOCK_WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096)


def pick_tile(emb_words: int, ds_words: int, counts: np.ndarray, config: TileConfig | None = None) -> tuple[int, int, int]:
    """(TOKENS, BLOCK_W, work items) for rows of `emb_words` + `ds_words` words.

    BLOCK_W covers a row with the fewest wasted lanes; TOKENS makes a tile of about
    `tile_words`, then halves while the launch would have fewer than `min_programs`
    programs, so that a small request still spreads over every SM."""
    config = config or TileConfig()
    block_w, column_tiles = _block_width(emb_words, ds_words, config.max_block_w)
    tokens = max(1, config.tile_words // block_w)
    tokens = min(tokens, 1 << max(0, (int(counts.max()) - 1).bit_length()))
    items = int((-(-counts // tokens)).sum())
    while tokens > 1 and items * column_tiles < config.min_programs:
        tokens //= 2
        items = int((-(-counts // tokens)).sum())
    return tokens, block_w, items


@lru_cache(maxsize=256)
def _block_width(emb_words: int, ds_words: int, max_block_w: int) -> tuple[int, int]:
    """(BLOCK_W, column tiles): the narrowest width that covers a row, else the one that
    wastes the fewest lanes on a row's last tile (ties go to the wider one)."""
    row_words = max(emb_words, ds_words)
    candidates = [w for w in _BLOCK_WIDTHS if w <= max_block_w]
    fitting = [w for w in candidates if w >= row_words]
    if fitting:
        block_w = fitting[0]
    else:
        block_w = min(candidates, key=lambda w: (-(-row_words // w) * w - row_words, -w))
    return block_w, -(-emb_words // block_w) + (-(-ds_words // block_w) if ds_words else 0)


class PoolSide(NamedTuple):
    """A pool, and where the batch's tokens sit in it (a `BlockPlan`)."""

    pool: PoolTensors
    plan: BlockPlan


class LinearSide(NamedTuple):
    """Contiguous per-segment rows. Addresses are absolute byte addresses, one per
    segment; the kernel reaches them as offsets from `words_base` (embeddings and
    deepstack) and `ints_base` (fill_ids and mrope), which must be live tensors on the
    same device (the staging buffer, or the first output's tensors).

    `staging`: the addresses are a staging buffer's (a 128-byte aligned region base plus
    whole rows), so their alignment follows from the row length alone."""

    words_base: torch.Tensor
    ints_base: torch.Tensor
    emb_addresses: np.ndarray
    ds_addresses: np.ndarray
    fill_addresses: np.ndarray
    mrope_addresses: np.ndarray
    mrope_strides: np.ndarray
    staging: bool = False
    # word bytes -> the side's five table columns, for sides reused across calls (a
    # staging buffer's, see ops.staging_side)
    columns: dict | None = None


Side = PoolSide | LinearSide


def copy_segments(
    counts: Sequence[int] | np.ndarray, src: Side, dst: Side, *, dim: int, deepstack_dim: int, element_size: int
) -> None:
    """Copy every field of every segment from `src` to `dst` in one launch. The caller has
    validated everything (shapes, dtypes, devices, block bounds, disjoint writes).

    The general path, for any pair of sides: the launch's shape and whole table are
    worked out per call (a handful of whole-batch numpy operations, never a Python loop
    over segments or blocks) and issued through the device's `Launcher` (launch.py).
    The runtime's own operations take the launcher's cached routes instead."""
    from .launch import launcher_for

    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape[0] == 0 or int(counts.max()) == 0:
        return
    launcher_for(side_device(src)).copy(counts, src, dst, dim=dim, deepstack_dim=deepstack_dim,
                                        element_size=element_size)


class LaunchShape(NamedTuple):
    """How one message is cut into programs (see the module docstring), given the word
    the rows are copied in."""

    word: torch.dtype
    word_bytes: int
    vec: int
    emb_words: int
    ds_words: int
    tokens: int
    block_w: int
    items: int
    emb_tiles: int
    column_tiles: int

    @property
    def programs(self) -> int:
        return self.items * self.column_tiles

    def constants(self, src_pool: bool, dst_pool: bool, config: TileConfig) -> tuple:
        """The kernel's constexprs SRC_POOL .. STREAM, in signature order (HEADER apart)."""
        return (src_pool, dst_pool, self.ds_words > 0, self.tokens, self.block_w, self.vec, config.streaming_stores)


def launch_shape(counts: np.ndarray, emb_row_bytes: int, ds_row_bytes: int, alignment: int,
                 config: TileConfig) -> LaunchShape:
    """The shape of a launch over segments of `counts` tokens whose rows and bases are all
    multiples of `alignment` bytes."""
    word, word_bytes, vec = pick_word(alignment)
    emb_words, ds_words = emb_row_bytes // word_bytes, ds_row_bytes // word_bytes
    tokens, block_w, items = pick_tile(emb_words, ds_words, counts, config)
    emb_tiles = -(-emb_words // block_w)
    column_tiles = emb_tiles + (-(-ds_words // block_w) if ds_words else 0)
    return LaunchShape(word, word_bytes, vec, emb_words, ds_words, tokens, block_w, items, emb_tiles, column_tiles)


def table_head(num_segments: int) -> int:
    """Words of a table before its block tables: the header and the segment columns."""
    return HEADER_WORDS.value + SEGMENT_COLUMNS.value * num_segments


def table_size(src: Side, dst: Side, num_segments: int) -> int:
    blocks = sum(side.plan.blocks.size for side in (src, dst) if isinstance(side, PoolSide))
    return table_head(num_segments) + blocks + 1


def fill_header_and_counts(out: np.ndarray, counts: np.ndarray, shape: LaunchShape) -> None:
    """The header and the columns that depend on the counts alone (0 and 1)."""
    s = counts.shape[0]
    columns = HEADER_WORDS.value
    out[0], out[1], out[2], out[3] = s, shape.programs, SEGMENT_COLUMNS.value * s, 0
    tiles = -(-counts // shape.tokens)
    out[columns : columns + s] = counts
    first_items = out[columns + s : columns + 2 * s]
    np.cumsum(tiles, out=first_items)
    first_items -= tiles


def fill_pool_columns(out: np.ndarray, base: int, head: int, plan: BlockPlan) -> int:
    """A pool side's varying columns (the offset of each segment's blocks in the block
    table, its first row) and its block table at `head`; returns the block count."""
    s = plan.lengths.shape[0]
    if s == 1:  # the latency case: scalar stores cost less than array operations
        out[base] = 0
        out[base + 1] = plan.first_rows[0]
    else:
        first_block = out[base : base + s]
        np.cumsum(plan.lengths, out=first_block)
        first_block -= plan.lengths
        out[base + s : base + 2 * s] = plan.first_rows
    n = plan.blocks.size
    out[head : head + n] = plan.blocks
    out[head + n] = 0
    return n


def _fill_metadata(out: np.ndarray, counts: np.ndarray, shape: LaunchShape, src: Side, dst: Side) -> None:
    """The launch's whole int64 table (layout at the top of this file), written into `out`."""
    s = counts.shape[0]
    fill_header_and_counts(out, counts, shape)
    head = table_head(s)
    columns = HEADER_WORDS.value
    for base, side in ((columns + SOURCE.value * s, src), (columns + DESTINATION.value * s, dst)):
        if isinstance(side, PoolSide):
            out[base + 2 * s : base + 5 * s] = 0
            head += fill_pool_columns(out, base, head, side.plan)
        else:
            out[base : base + 5 * s] = _linear_columns(side, shape.word_bytes, shape.ds_words)
    out[head] = 0


def _linear_columns(side: LinearSide, word_bytes: int, ds_words: int) -> np.ndarray:
    """A linear side's five columns (int64 [5 * S]): offsets from its bases, in words and
    int32s, and the mrope stride; kept in `side.columns` for a reused side."""
    if side.columns is not None and word_bytes in side.columns:
        return side.columns[word_bytes]
    s = side.emb_addresses.shape[0]
    columns = np.empty(5 * s, dtype=np.int64)
    words_ptr, ints_ptr = side.words_base.data_ptr(), side.ints_base.data_ptr()
    np.subtract(side.emb_addresses, words_ptr, out=columns[0:s])
    if ds_words:
        np.subtract(side.ds_addresses, words_ptr, out=columns[s : 2 * s])
    else:
        columns[s : 2 * s] = 0
    columns[0 : 2 * s] //= word_bytes
    np.subtract(side.fill_addresses, ints_ptr, out=columns[2 * s : 3 * s])
    np.subtract(side.mrope_addresses, ints_ptr, out=columns[3 * s : 4 * s])
    columns[2 * s : 4 * s] //= 4
    columns[4 * s :] = side.mrope_strides
    if side.columns is not None:
        side.columns[word_bytes] = columns
    return columns


def side_device(side: Side) -> torch.device:
    return (side.pool.embeddings if isinstance(side, PoolSide) else side.words_base).device


def side_pointers(side: Side) -> tuple[int, int, int, int]:
    """(embeddings, deepstack, fill_ids, mrope) base addresses of a side."""
    if isinstance(side, PoolSide):
        return pool_pointers(side.pool)
    words, ints = side.words_base.data_ptr(), side.ints_base.data_ptr()
    return words, words, ints, ints


def pool_pointers(pool: PoolTensors) -> tuple[int, int, int, int]:
    emb = pool.embeddings.data_ptr()
    ds = pool.deepstack.data_ptr() if pool.deepstack is not None else emb
    return emb, ds, pool.fill_ids.data_ptr(), pool.mrope_positions.data_ptr()


def pool_tensors(pool: PoolTensors, word: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A pool's four bases as typed tensors (what Triton's dispatcher and interpreter need)."""
    emb = pool.embeddings.view(word)
    ds = pool.deepstack.view(word) if pool.deepstack is not None else emb
    return emb, ds, pool.fill_ids, pool.mrope_positions


def linear_tensors(words_base: torch.Tensor, ints_base: torch.Tensor, word: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A linear side's bases as typed tensors: words for embeddings and deepstack, int32
    for fill_ids and mrope (a byte buffer is cut to a whole number of words first)."""
    words, ints = _typed(words_base, word), _typed(ints_base, torch.int32)
    return words, words, ints, ints


def _typed(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.dtype == dtype:
        return tensor
    if tensor.dim() == 1 and tensor.dtype == torch.uint8:
        tensor = tensor[: tensor.numel() // dtype.itemsize * dtype.itemsize]
    return tensor.view(dtype)


def side_tensors(side: Side, word: torch.dtype) -> tuple[torch.Tensor, ...]:
    if isinstance(side, PoolSide):
        return pool_tensors(side.pool, word)
    return linear_tensors(side.words_base, side.ints_base, word)


def constexprs(constants: tuple, header: bool) -> dict:
    src_pool, dst_pool, has_ds, tokens, block_w, vec, stream = constants
    return {"SRC_POOL": src_pool, "DST_POOL": dst_pool, "HAS_DS": has_ds, "TOKENS": tokens, "BLOCK_W": block_w,
            "VEC": vec, "STREAM": stream, "HEADER": header}


def launch_jit(grid: int, metadata: torch.Tensor, scalars: tuple, tensors: tuple, constants: tuple, header: bool,
               num_warps: int, *, warmup: bool = False):
    """Through Triton's dispatcher (or interpreter). `scalars`: num_segments, table_start,
    then block_size, emb_words, ds_words, emb_tiles, column_tiles; `tensors` the eight
    bases (source then destination) as typed tensors."""
    arguments = (metadata, scalars[0], scalars[1], *tensors, *scalars[2:])
    options = {**constexprs(constants, header), "num_warps": num_warps}
    if warmup:
        return _copy_kernel.warmup(*arguments, grid=(grid,), **options)
    return _copy_kernel[(grid,)](*arguments, **options)


class DirectLaunch(NamedTuple):
    """A compiled variant with its arguments bound: `launch(programs, stream, table)`
    enqueues it with no Python between the caller and Triton's C launcher but one call."""

    function: object
    head: tuple
    tail: tuple

    def __call__(self, programs: int, stream: int, table: int) -> None:
        self.function(programs, 1, 1, stream, *self.head, table, *self.tail)


class _CompiledKernels:
    """Compiled `_copy_kernel` variants, launched without Triton's dispatcher.

    The dispatcher re-derives on every call what does not change between calls of one
    shape (argument binding, specialization key, cache lookup, launch hooks); on the GPU
    machine's CPU that costs 11-20 microseconds per call. Here a variant is compiled once
    (`JITFunction.warmup`, which finds it in Triton's cache when it was built before) under
    a key that is at least as fine as Triton's own specialization (16-byte alignment of
    every pointer; for every specialized integer: == 1, multiple of 16, fits int32), and
    `bind` returns a `DirectLaunch` that calls Triton's generated C launcher straight
    away, pointers as integers. Anything unexpected (a Triton without these internals)
    makes `bind` return None, and callers launch through the dispatcher."""

    def __init__(self) -> None:
        self._kernels: dict[tuple, object] = {}
        self._usable = True

    def bind(self, pointers: tuple, scalars: tuple, tensors: tuple, constants: tuple, header: bool, num_warps: int,
             word: torch.dtype, device_index: int, metadata: torch.Tensor) -> DirectLaunch | None:
        """`pointers`: the table's, then the eight bases; `scalars` as for `launch_jit`."""
        if not self._usable:
            return None
        key = (constants, header, num_warps, word, device_index, tuple(p % 16 == 0 for p in pointers),
               tuple((v == 1, v % 16 == 0, v < 2**31) for v in scalars))
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = launch_jit(1, metadata, scalars, tensors, constants, header, num_warps, warmup=True)
            try:
                kernel.run  # noqa: B018 - loads the module, makes the launcher
                kernel.function, kernel.packed_metadata  # noqa: B018
            except AttributeError:
                self._usable = False
                return None
            self._kernels[key] = kernel
        tail = (*scalars[:2], *pointers[1:], *scalars[2:], *constants, header)
        run = kernel.run
        if (getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 1) == 0
                and hasattr(run, "launch")):
            # Triton's CudaLauncher.__call__ only adds the (here empty) scratch buffers
            head = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                    kernel.packed_metadata, None, None, None)
            return DirectLaunch(run.launch, head, tail)
        return DirectLaunch(run, (kernel.function, kernel.packed_metadata, None, None, None), tail)


_LAUNCHER = _CompiledKernels()
try:
    from triton import knobs as _knobs  # Triton >= 3.3; older ones have no launch hooks here
except ImportError:
    _knobs = None


def launch_hooks_set() -> bool:
    """Whether a profiler set Triton launch hooks (then the dispatcher must call them).
    Triton 3.6 keeps them in chains that are never None: look at what the chain holds."""
    if _knobs is None:
        return False
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def side_alignment(row_bytes: tuple[int, int], src: Side, dst: Side, counts: np.ndarray) -> int:
    """The largest power of two (<= 16) dividing every row length and every base address
    of the embeddings and deepstack on both sides."""
    value = 16 | row_bytes[0] | row_bytes[1]
    for side in (src, dst):
        if isinstance(side, PoolSide):
            value |= side.pool.embeddings.data_ptr()
            if side.pool.deepstack is not None:
                value |= side.pool.deepstack.data_ptr()
        elif not side.staging:
            live = counts > 0
            value |= side.words_base.data_ptr() | int(np.bitwise_or.reduce(side.emb_addresses[live]))
            if row_bytes[1]:
                value |= int(np.bitwise_or.reduce(side.ds_addresses[live]))
    return value & -value
