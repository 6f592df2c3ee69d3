"""The launch path: the host's part of every copy, a few microseconds per message.

A message's copy is one launch of `_copy_kernel`, but issuing it is work on the host
every time: the launch's shape, its table (written, then uploaded), the launch, and an
event that says when the table's buffers are free again. For a small message that work
takes longer than the copy. A `Launcher` keeps, per device, what makes it short:

- **Routes.** The runtime's operations (`pack`, `unpack`, `pack_addressed_rows`,
  `unpack_addressed_rows`, `gather_addressed`) see the same sides again and again: one
  pool, a few staging buffers, layouts that repeat. A route is one (operation, sides,
  layout): its launch shape, its compiled kernel with every argument bound but the
  table (`DirectLaunch`: one call into Triton's C launcher) and a *template*, the
  table's header and every column that does not change between its messages (counts,
  tile offsets, the staging buffer's addresses). A message writes only what is its own:
  a pool side's block table (4 numpy operations) or a row side's addresses (4 operations
  over one [5, S] array). Each table buffer remembers which template it holds, so the
  template is copied in only when the buffer last served another route.
- **Table buffers** (`workspace.py`): a ring of pinned host + device buffers, reused
  once the event recorded after their last launch has completed.
- **Driver calls** (`cuda_driver.py`): the upload and the event are direct driver calls.

Modes (`bench/kernels.py --launch` compares them; results in bench/results/kernels-NOTES.md):

- `"direct"`: upload on the launching stream, then the launch, then the event.
- `"graph"` (the default, for every message size): per (kernel variant, grid bucket,
  table bucket) a CUDA graph of the table's way to the device, a fixed-grid launch
  (`HEADER`: the kernel reads the message's segment count and size from the table,
  programs past its last tile leave at once) and the event is captured once; a message
  writes its table into the graph's pinned buffer and replays it: one driver call. The
  table goes up by a one-program kernel (`graph_fetch="kernel"`, `triton_copy._fetch_table`:
  it reads the pinned array across the bus into the device buffer), about 3 us of device
  time on an H100. The other way, `graph_fetch="copy"`, a copy node, puts the copy engine's
  start-up on the kernel's critical path (about 9.5 us), which is why graphs once stopped
  at 32 MiB and bigger messages went direct with a side-stream upload. Measured on an H100
  (seventeenth session, kernels-NOTES.md): the big cases a and d at 0.92-0.93 of the copy
  ceiling (0.94 direct, 0.87-0.90 with the copy node) for 7.5-9.4 us of host time per
  launch on the runtime path (18-20 direct), and every case of bench/pipeline.py as fast
  or faster than with the copy node up to 32 MiB and direct launches above (two runs
  each, alternating, one call). `graph_max_bytes` still sends bigger messages direct, for
  a caller that wants the last percent of a huge message's bandwidth.
- `side_upload=True` (direct launches): the table goes up on a stream of the launcher's
  own and the launching stream waits for it by an event, so that on a busy device the
  kernel does not queue behind its own upload (the upload overlaps the work before it).
- `host_table_max_bytes`: messages of at most that many payload bytes are not uploaded
  at all: the kernel reads its table where the host wrote it, in the buffer's pinned
  host array (pinned memory is mapped into the device's address space at the same
  address). A direct launch is then the launch and the event (two driver calls, not
  five); a graph holds the kernel and the event, no upload node. What the kernel pays
  instead: its reads of the table cross the bus, a chain of dependent reads in every
  program before it copies its tile. Measured on an H200 (bench/results/kernels-NOTES.md,
  tenth session) that chain costs far more device time than the upload: case a 0.71 of
  the copy ceiling against 0.93 with the side upload, d 0.77-0.79 against 0.91-0.93, the
  64-segment case b 0.45, for 1-11 us less host time per launch. So it is off by default
  (0) and kept for the benchmark's comparison. The buffer rules are the same: a host array
  is written again only after the event recorded behind its last reader.

The defaults (`DEFAULT_MODE`, `DEFAULT_SIDE_UPLOAD`) are what measured best.

On CPU (Triton's interpreter, the tests) the same routes, templates and tables are
used, the table buffers are plain host memory and the kernel is launched through
Triton's dispatcher; mode "graph" runs the fixed-grid kernel over the bucketed grid, so
the logic of both modes is tested without a GPU.

Nothing here checks its inputs: callers are `ops.py`'s operations (see there).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import warnings
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from . import cuda_driver
from .layout import StagingLayout
from .plan import BlockPlan
from .triton_copy import (
    _LAUNCHER,
    DESTINATION,
    HEADER_WORDS,
    SEGMENT_COLUMNS,
    SOURCE,
    DirectLaunch,
    LaunchShape,
    PoolSide,
    Side,
    TileConfig,
    _fill_metadata,
    fetch_table,
    fill_header_and_counts,
    fill_pool_columns,
    launch_hooks_set,
    launch_jit,
    launch_shape,
    linear_tensors,
    pool_pointers,
    pool_tensors,
    side_alignment,
    side_pointers,
    side_tensors,
    table_head,
    table_size,
    tile_config,
    tiles_at,
)
from .types import PoolTensors
from .workspace import TableBuffer, TableSlots

MODES = ("direct", "graph")
# The defaults (what `launcher_for` makes): graphs for every message (GRAPH_MAX_BYTES: no
# limit; a launcher made with a smaller one launches bigger messages direct, with the
# upload on its own stream).
DEFAULT_MODE = "graph"
DEFAULT_SIDE_UPLOAD = True
GRAPH_MAX_BYTES = 1 << 62
# How a graph's table reaches the device: "kernel" (`_fetch_table`, the default) or "copy"
# (a copy node: 6-7 us more device time per launch; see the module docstring).
GRAPH_FETCHES = ("copy", "kernel")
DEFAULT_GRAPH_FETCH = "kernel"
DEFAULT_HOST_TABLE_MAX_BYTES = 0  # no message: measured slower on the device (below)
GRAPH_COPIES = 4  # graphs per (variant, buckets): messages of one shape in flight at once
MAX_GRAPH_RINGS = 128  # then all are dropped and captured again as needed
MAX_ROUTES = 256
_PACK_ROW = struct.Struct("<5q").pack_into  # one segment's row columns into a table (an int64 array)

# side kinds of a route
POOL, STAGING, ROWS = "pool", "staging", "rows"
_OPERATIONS = {  # operation -> (source kind, destination kind)
    "pack": (POOL, STAGING),
    "unpack": (STAGING, POOL),
    "pack_rows": (ROWS, STAGING),
    "unpack_rows": (STAGING, ROWS),
    "gather": (POOL, ROWS),
}


class Launcher:
    """Issues the copy kernel for one device (see the module docstring).

    `embxfer.kernels.ops` uses one per device (`launcher_for`); a caller may keep its
    own, e.g. with another mode. Thread-safe: concurrent calls serialize on a lock
    around the table buffers (held a few microseconds)."""

    def __init__(self, device: torch.device | str, *, mode: str = DEFAULT_MODE, side_upload: bool = DEFAULT_SIDE_UPLOAD,
                 graph_max_bytes: int = GRAPH_MAX_BYTES, graph_fetch: str = DEFAULT_GRAPH_FETCH,
                 host_table_max_bytes: int = DEFAULT_HOST_TABLE_MAX_BYTES) -> None:
        if mode not in MODES:
            raise ValueError(f"Launcher: mode={mode!r}, expected one of {MODES}")
        if graph_fetch not in GRAPH_FETCHES:
            raise ValueError(f"Launcher: graph_fetch={graph_fetch!r}, expected one of {GRAPH_FETCHES}")
        self.graph_fetch = graph_fetch
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.cuda = device.type == "cuda"
        self.index = device.index if self.cuda else -1
        self.driver = cuda_driver.driver() if self.cuda else None
        # graphs need the driver's capture calls; without them every launch is direct
        self.mode = mode if not self.cuda or self.driver is not None else "direct"
        self.side_upload = side_upload and self.driver is not None
        self.graph_max_bytes = graph_max_bytes
        if isinstance(host_table_max_bytes, bool) or not isinstance(host_table_max_bytes, int) \
                or host_table_max_bytes < 0:
            raise ValueError(f"Launcher: host_table_max_bytes={host_table_max_bytes!r}, expected an integer >= 0 "
                             "(0: every table is uploaded)")
        # The largest payload whose table stays in host memory; -1 when none does (one
        # comparison per launch, whatever the setting).
        self._host_table_limit = host_table_max_bytes if self.cuda and host_table_max_bytes > 0 else -1
        self._routes: dict[tuple, _Route] = {}
        self._slots = TableSlots(device, self.driver)
        self._graphs: dict[tuple, _GraphRing] = {}
        self._lock = threading.Lock()
        self._streams: dict[str, torch.cuda.Stream] = {}

    # --- the runtime's operations ------------------------------------------------------
    def pack(self, pool: PoolTensors, plan: BlockPlan, staging: torch.Tensor, layout: StagingLayout) -> None:
        """Pool tokens of each segment -> the segment's rows of `staging` (ops.pack)."""
        self._issue(self._route("pack", layout, staging, pool), plan, None, (pool, staging))

    def unpack(self, staging: torch.Tensor, layout: StagingLayout, pool: PoolTensors, plan: BlockPlan) -> None:
        """Every segment of `staging` -> its pool rows (ops.unpack without `segments`)."""
        self._issue(self._route("unpack", layout, staging, pool), plan, None, (pool, staging))

    def pack_addressed_rows(self, addresses: np.ndarray | Sequence[tuple[int, ...]], starts: np.ndarray | Sequence[int],
                            staging: torch.Tensor, layout: StagingLayout) -> None:
        """Rows `[starts[i], starts[i] + counts[i])` of the row tensors whose
        `ops.row_addresses` are `addresses[i]` -> segment i of `staging` (arrays, or a list
        of address tuples and a list of starts: `_Route.row_offsets`)."""
        self._issue(self._route("pack_rows", layout, staging, None), None, (addresses, starts), (None, staging))

    def unpack_addressed_rows(self, staging: torch.Tensor, layout: StagingLayout,
                              addresses: np.ndarray | Sequence[tuple[int, ...]], starts: np.ndarray | Sequence[int]) -> None:
        """Segment i of `staging` -> rows `[starts[i], starts[i] + counts[i])` of the row
        tensors whose `ops.row_addresses` are `addresses[i]`."""
        self._issue(self._route("unpack_rows", layout, staging, None), None, (addresses, starts), (None, staging))

    def gather_addressed(self, pool: PoolTensors, plan: BlockPlan, counts: Sequence[int], addresses: np.ndarray,
                         starts: np.ndarray) -> None:
        """Pool tokens of segment i -> rows `[starts[i], starts[i] + counts[i])` of the row
        tensors whose `ops.row_addresses` are `addresses[i]`."""
        route = self._route("gather", tuple(counts), None, pool)
        self._issue(route, plan, (addresses, starts), (pool, None))

    def copy(self, counts: np.ndarray, src: Side, dst: Side, *, dim: int, deepstack_dim: int,
             element_size: int) -> None:
        """Any two sides (`triton_copy.copy_segments`): shape and table made per call."""
        config = tile_config(self.device)
        row_bytes = (dim * element_size, deepstack_dim * element_size)
        shape = launch_shape(counts, *row_bytes, side_alignment(row_bytes, src, dst, counts), config)
        block_size = next((s.pool.embeddings.shape[1] for s in (src, dst) if isinstance(s, PoolSide)), 1)
        variant = _Variant(None, shape, config, (isinstance(src, PoolSide), isinstance(dst, PoolSide)),
                           counts.shape[0], block_size, (*side_pointers(src), *side_pointers(dst)))
        size = table_size(src, dst, counts.shape[0])
        with self._lock, self._on_device():
            table, buffer = self._begin(variant, size, (src, dst))
            _fill_metadata(table, counts, shape, src, dst)
            self._end(variant, buffer, size, (src, dst))

    # --- routes ---------------------------------------------------------------------------
    def _route(self, operation: str, layout, staging: torch.Tensor | None, pool: PoolTensors | None) -> _Route:
        # a layout by identity (the runtime keeps them; hashing one costs a pass over its
        # counts), a gather's counts by value
        key = (operation, layout if type(layout) is tuple else id(layout), 0 if staging is None else staging.data_ptr(),
               0 if pool is None else id(pool.embeddings))
        route = self._routes.get(key)
        if route is None or not route.same_pool(pool) or route.config is not tiles_at(self.index):
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            route = self._routes[key] = _Route(self, operation, layout, staging, pool)
        return route

    def _issue(self, route: _Route, plan: BlockPlan | None, rows: tuple | None, objects: tuple) -> None:
        if route.empty:
            return
        if rows is None:
            variant = route.variant
            if variant is None:
                variant = route.variant = _Variant.of_route(self, route, route.alignment, objects)
        else:
            offsets, alignment = route.row_offsets(*rows)
            variant = route.variants.get(alignment)
            if variant is None:
                variant = route.variants[alignment] = _Variant.of_route(self, route, alignment, objects)
        size = variant.head + (0 if plan is None else plan.blocks.size) + 1
        with self._lock, self._on_device():
            table, buffer = self._begin(variant, size, objects)
            if plan is None:
                table[variant.head] = 0
            else:
                fill_pool_columns(table, route.pool_base, variant.head, plan)
            if rows is not None:
                s = route.num_segments
                if s == 1:  # five Python ints written in place (no list, no numpy call)
                    emb, deep, ids, mrope, stride = offsets
                    word = variant.shape.word_bytes
                    _PACK_ROW(table, 8 * route.rows_base, emb // word, deep // word, ids // 4, mrope // 4, stride)
                else:
                    np.floor_divide(offsets, variant.row_divisors,
                                    out=table[route.rows_base : route.rows_base + 5 * s].reshape(5, s))
            self._end(variant, buffer, size, objects)

    # --- one launch: a table buffer, its upload, the kernel, the event -------------------
    def _begin(self, variant: _Variant, size: int, objects: tuple) -> tuple[np.ndarray, TableBuffer]:
        """A table buffer for this launch (a graph's own in graph mode) with the variant's
        template in place."""
        buffer = None
        if self.cuda and self._graphed(variant):
            buffer = self._graph(variant, size, objects)
        if buffer is None:
            buffer = self._slots.acquire(size)
        table = buffer.host
        if variant.template is None:
            buffer.owner = None
        elif buffer.owner is not variant:
            table[: variant.head] = variant.template
            buffer.owner = variant
        return table, buffer

    def _end(self, variant: _Variant, buffer: TableBuffer, size: int, objects: tuple) -> None:
        if not self.cuda:  # the interpreter reads the host table in place
            header = self._graphed(variant)
            launch_jit(grid_bucket(variant.programs) if header else variant.programs,
                       torch.from_numpy(buffer.host[:size]), variant.scalars, variant.tensors(objects),
                       variant.constants, header, variant.num_warps)
            return
        stream = torch._C._cuda_getCurrentRawStream(self.index)
        if isinstance(buffer, _Graph):
            self.driver.graph_launch(buffer.executable, stream)
            buffer.pending = True
            return
        launch = variant.direct(self, buffer, objects)
        hooks = launch is None or launch_hooks_set()
        if not hooks and variant.payload_bytes <= self._host_table_limit:
            launch(variant.programs, stream, buffer.host_pointer)  # the kernel reads the pinned table
            self._slots.release(buffer, stream)
            return
        upload = self._stream("upload") if self.side_upload else None
        self._slots.upload(buffer, size, stream, upload)
        if hooks:
            launch_jit(variant.programs, buffer.device, variant.scalars, variant.tensors(objects),
                       variant.constants, False, variant.num_warps)
        else:
            launch(variant.programs, stream, buffer.device_pointer)
        self._slots.release(buffer, stream)

    def _graphed(self, variant: _Variant) -> bool:
        return self.mode == "graph" and variant.graphs and variant.payload_bytes <= self.graph_max_bytes

    def _on_device(self):
        """Nothing when the launcher's device is current (one cheap check), else a switch."""
        if not self.cuda or torch._C._cuda_getDevice() == self.index:
            return _NO_CONTEXT
        return torch.cuda.device(self.index)

    def _stream(self, name: str) -> int:
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = torch.cuda.Stream(self.device)
        return stream.cuda_stream

    # --- graphs ---------------------------------------------------------------------------
    def _graph(self, variant: _Variant, size: int, objects: tuple) -> _Graph | None:
        """The next graph of the variant's (grid bucket, table bucket) ring, free to be
        written; None when graphs cannot be used (then the launch is direct)."""
        words = 1024 if size <= 1024 else 1 << (size - 1).bit_length()
        # The variant remembers its rings by table bucket: a message of a known shape finds
        # its ring without hashing the variant's whole graph key (a dozen words) each time.
        ring = variant.rings.get(words)
        if ring is None or ring.dropped:
            programs = grid_bucket(variant.programs)
            key = (variant.graph_key, programs, words)  # variants of one key share their graphs
            ring = self._graphs.get(key)
            if ring is None:
                if len(self._graphs) >= MAX_GRAPH_RINGS:
                    self._drop_graphs()
                ring = self._graphs[key] = _GraphRing(programs)
            variant.rings[words] = ring
        # The first graph whose last replay has finished; another one is captured only
        # while all are still in flight (so an idle device needs one, and the copies are
        # made during warm-up under load, not in a later steady state), and past
        # GRAPH_COPIES the oldest is waited for.
        for graph in ring.graphs:
            if not graph.pending or self.driver.event_done(graph.event):
                graph.pending = False
                return graph
        if len(ring.graphs) == GRAPH_COPIES:
            graph = ring.graphs[ring.oldest]
            ring.oldest = (ring.oldest + 1) % GRAPH_COPIES
            self.driver.event_synchronize(graph.event)
            graph.pending = False
            return graph
        try:
            graph = self._capture(variant, ring.programs, words, objects,
                                  variant.payload_bytes <= self._host_table_limit)
        except Exception as error:  # noqa: BLE001 - any failure: launch directly from now on
            warnings.warn(f"embxfer: CUDA graph capture failed ({error!r}); launching directly", stacklevel=3)
            self.mode = "direct"
            return None
        ring.graphs.append(graph)
        return graph

    def _drop_graphs(self) -> None:
        for ring in self._graphs.values():
            ring.dropped = True  # (variants holding it look it up again)
            for graph in ring.graphs:
                if graph.pending:
                    self.driver.event_synchronize(graph.event)
                self.driver.graph_destroy(graph.executable)
                self.driver.event_destroy(graph.event)
        self._graphs.clear()

    def _capture(self, variant: _Variant, programs: int, words: int, objects: tuple, host_table: bool) -> _Graph:
        """Capture table fetch (`graph_fetch`: a kernel or a copy node) + fixed-grid
        kernel + event on the launcher's capture stream (`host_table`: the kernel reads the
        pinned array, no fetch). Every graph is right for every variant of its ring: the
        host array is written for each replay."""
        buffer = TableBuffer(self.device, words, self.driver)
        launch = variant.header_launch(self, buffer, objects)
        if launch is None:
            raise RuntimeError("no direct launch for the fixed-grid kernel")
        graph = _Graph(buffer)
        stream = self._stream("capture")
        capture = self._streams["capture"]
        fetch = not host_table and self.graph_fetch == "kernel"
        if fetch:  # loaded (compiled the first time) outside the capture
            fetch_table(buffer.host_tensor, buffer.device, words, capture)
            capture.synchronize()
        driver = self.driver
        driver.begin_capture(stream)
        try:
            if fetch:
                fetch_table(buffer.host_tensor, buffer.device, words, capture)
            elif not host_table:
                driver.memcpy_to_device(buffer.device_pointer, buffer.host_pointer, 8 * words, stream)
            launch(programs, stream, buffer.host_pointer if host_table else buffer.device_pointer)
            driver.event_record_in_graph(buffer.event, stream)
        except BaseException:
            try:
                driver.end_capture(stream)
            except cuda_driver.CudaError:
                pass
            raise
        graph.executable = driver.end_capture(stream)
        return graph


def grid_bucket(programs: int) -> int:
    """`programs` rounded up to m * 2**k with m in 4..7 (at most a quarter more): the
    fixed grids that graphs are captured for."""
    if programs <= 8:
        return programs
    shift = programs.bit_length() - 3
    return ((programs + (1 << shift) - 1) >> shift) << shift


class _Route:
    """One (operation, sides, layout): what does not change between its messages."""

    def __init__(self, launcher: Launcher, operation: str, layout, staging: torch.Tensor | None,
                 pool: PoolTensors | None) -> None:
        src_kind, dst_kind = self.kinds = _OPERATIONS[operation]
        self.layout = layout
        self.config: TileConfig = tile_config(launcher.device)
        self.pool_refs = None if pool is None else tuple(None if t is None else weakref.ref(t) for t in pool)
        if isinstance(layout, StagingLayout):
            counts = layout.counts
            emb_row, ds_row = layout.dim * layout.element_size, layout.deepstack_dim * layout.element_size
        else:
            counts = layout
            element = pool.embeddings.element_size()
            ds_dim = 0 if pool.deepstack is None else pool.deepstack.shape[2]
            emb_row, ds_row = pool.embeddings.shape[2] * element, ds_dim * element
        self.counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        s = self.num_segments = self.counts.shape[0]
        self.empty = s == 0 or int(self.counts.max()) == 0
        self.row_bytes = (emb_row, ds_row)
        self.block_size = 1 if pool is None else pool.embeddings.shape[1]
        columns = HEADER_WORDS.value
        bases = {src_kind: columns + SOURCE.value * s, dst_kind: columns + DESTINATION.value * s}
        self.pool_base, self.rows_base, self.staging_base = bases.get(POOL), bases.get(ROWS), bases.get(STAGING)
        alignment = 16 | emb_row | ds_row
        side_pointer = {}
        if pool is not None:
            side_pointer[POOL] = pool_pointers(pool)
            alignment |= side_pointer[POOL][0] | side_pointer[POOL][1]
        if staging is not None:
            side_pointer[STAGING] = (staging.data_ptr(),) * 4
        if ROWS in self.kinds:
            # Row sides are reached from the other side's bases: the kernel's arguments stay
            # the same whatever rows a message names.
            other = side_pointer[STAGING] if STAGING in side_pointer else side_pointer[POOL]
            words_base, ints_base = other[0], other[2]
            side_pointer[ROWS] = (words_base, words_base, ints_base, ints_base)
            self.row_steps = np.array([[emb_row], [ds_row], [4], [4], [0]], dtype=np.int64)
            self.row_bases = np.array([[words_base], [words_base], [ints_base], [ints_base], [0]], dtype=np.int64)
            self.row_constants = (emb_row, ds_row, words_base, ints_base)  # (one segment: Python ints)
            self.row_checked = 2 if ds_row else 1
            self.live = None if int(self.counts.min(initial=1)) > 0 else self.counts > 0
            self.variants: dict[int, _Variant] = {}
        self.alignment = alignment & -alignment
        self.pointers = (*side_pointer[src_kind], *side_pointer[dst_kind])
        self.variant: _Variant | None = None

    def same_pool(self, pool: PoolTensors | None) -> bool:
        refs = self.pool_refs
        if refs is None:
            return pool is None
        return (refs[0]() is pool.embeddings and refs[1]() is pool.fill_ids and refs[2]() is pool.mrope_positions
                and (pool.deepstack is None if refs[3] is None else refs[3]() is pool.deepstack))

    def row_offsets(self, addresses: np.ndarray | Sequence[tuple[int, ...]],
                    starts: np.ndarray | Sequence[int]) -> tuple[np.ndarray | tuple[int, ...], int]:
        """A message's row side as byte offsets from the route's bases ([5, S]: embeddings,
        deepstack, fill_ids, mrope, and the mrope stride), and the alignment they allow.
        `addresses`: an int64 [S, 5] array or S tuples of `ops.row_addresses`; `starts`: an
        array or a list. A message of one segment (every request on its own: the latency
        case) is worked out with Python integers, a tuple of 5: numpy's calls on a [5, 1]
        array cost more than the arithmetic, and a caller that passes its tuple and list
        as they are builds no array at all."""
        if self.num_segments == 1:
            start, row = int(starts[0]), addresses[0]
            embeddings, deepstack, fill_ids, mrope, stride = row.tolist() if isinstance(row, np.ndarray) else row
            emb_row, ds_row, words_base, ints_base = self.row_constants
            offsets = (emb_row * start + embeddings - words_base, ds_row * start + deepstack - words_base,
                       4 * start + fill_ids - ints_base, 4 * start + mrope - ints_base, stride)
            value = self.alignment | offsets[0] | (offsets[1] if self.row_checked == 2 else 0)
            return offsets, value & -value
        offsets = self.row_steps * np.asarray(starts, dtype=np.int64)
        offsets += np.asarray(addresses, dtype=np.int64).T
        offsets -= self.row_bases
        checked = offsets[: self.row_checked]
        if self.live is not None:
            checked = checked[:, self.live]
        value = self.alignment | int(np.bitwise_or.reduce(checked, axis=None))
        return offsets, value & -value


class _Variant:
    """One compiled shape of a route (or of one general call): launch shape, arguments,
    table template, and the bound direct launches."""

    def __init__(self, route: _Route | None, shape: LaunchShape, config: TileConfig,
                 pools: tuple[bool, bool], num_segments: int, block_size: int, pointers: tuple) -> None:
        self.route = route
        self.shape = shape
        self.programs = shape.programs
        self.constants = shape.constants(*pools, config)
        self.num_warps = config.num_warps
        self.head = table_head(num_segments)
        self.scalars = (num_segments, SEGMENT_COLUMNS.value * num_segments, block_size, shape.emb_words,
                        shape.ds_words, shape.emb_tiles, shape.column_tiles)
        self.pointers = pointers
        self.template: np.ndarray | None = None
        self.graphs = route is not None  # a general call's pointers change per call: no graphs
        self.payload_bytes = 0 if route is None else int(route.counts.sum()) * (sum(route.row_bytes) + 16)
        self.graph_key = (self.constants, self.num_warps, shape.word, pointers, self.scalars[2:])
        self._direct: DirectLaunch | None | bool = False  # False: not bound yet
        self._header: DirectLaunch | None | bool = False
        self.rings: dict[int, _GraphRing] = {}  # table bucket (words) -> the launcher's ring for it

    @classmethod
    def of_route(cls, launcher: Launcher, route: _Route, alignment: int, objects: tuple) -> _Variant:
        shape = launch_shape(route.counts, *route.row_bytes, alignment, route.config)
        src_kind, dst_kind = route.kinds
        variant = cls(route, shape, route.config, (src_kind == POOL, dst_kind == POOL),
                      route.num_segments, route.block_size, route.pointers)
        s = route.num_segments
        template = np.zeros(variant.head, dtype=np.int64)
        fill_header_and_counts(template, route.counts, shape)
        # bytes -> the kernel's units: words for embeddings and deepstack, int32 for the rest
        word_bytes = shape.word_bytes
        variant.row_divisors = np.array([[word_bytes], [word_bytes], [4], [4], [1]], dtype=np.int64)
        if route.staging_base is not None:
            np.floor_divide(route.layout.offset_arrays, variant.row_divisors,
                            out=template[route.staging_base : route.staging_base + 5 * s].reshape(5, s))
        variant.template = template
        return variant

    def tensors(self, objects: tuple) -> tuple[torch.Tensor, ...]:
        """The eight bases as typed tensors, for Triton's dispatcher and interpreter."""
        word = self.shape.word
        if self.route is None:
            src, dst = objects
            return (*side_tensors(src, word), *side_tensors(dst, word))
        pool, staging = objects
        by_kind = {}
        if pool is not None:
            by_kind[POOL] = pool_tensors(pool, word)
        if staging is not None:
            by_kind[STAGING] = linear_tensors(staging, staging, word)
        if ROWS in self.route.kinds:
            by_kind[ROWS] = (by_kind[STAGING] if staging is not None
                             else linear_tensors(pool.embeddings, pool.fill_ids, word))
        src_kind, dst_kind = self.route.kinds
        return (*by_kind[src_kind], *by_kind[dst_kind])

    def direct(self, launcher: Launcher, buffer: TableBuffer, objects: tuple) -> DirectLaunch | None:
        if self._direct is False:
            self._direct = self._bind(launcher, buffer.device, objects, header=False)
        return self._direct

    def header_launch(self, launcher: Launcher, buffer: TableBuffer, objects: tuple) -> DirectLaunch | None:
        if self._header is False:
            self._header = self._bind(launcher, buffer.device, objects, header=True)
        return self._header

    def _bind(self, launcher: Launcher, metadata: torch.Tensor, objects: tuple, header: bool) -> DirectLaunch | None:
        scalars = (0, 0, *self.scalars[2:]) if header else self.scalars
        return _LAUNCHER.bind((metadata.data_ptr(), *self.pointers), scalars, self.tensors(objects),
                              self.constants, header, self.num_warps, self.shape.word, launcher.index, metadata)


class _Graph:
    """A captured upload (none with a host table) + fixed-grid launch + event, and the
    table buffer it reads."""

    def __init__(self, buffer: TableBuffer) -> None:
        self.buffer = buffer
        self.host = buffer.host
        self.event = buffer.event
        self.executable = 0
        self.pending = False
        self.owner = None


class _GraphRing:
    def __init__(self, programs: int) -> None:
        self.programs = programs  # the fixed grid its graphs were captured with
        self.graphs: list[_Graph] = []
        self.oldest = 0
        self.dropped = False


_NO_CONTEXT = contextlib.nullcontext()
_LAUNCHERS: dict[int, Launcher] = {}  # CUDA device index (-1: the CPU) -> its launcher
_LAUNCHERS_LOCK = threading.Lock()


def launcher_for(device: torch.device) -> Launcher:
    """The launcher `embxfer.kernels.ops` uses on `device` (one per device, made on first use)."""
    if device.type != "cuda":
        return _launcher_at(-1)
    return _launcher_at(device.index if device.index is not None else torch.cuda.current_device())


def use_launcher(launcher: Launcher) -> Launcher | None:
    """Make `launcher` the one `launcher_for` returns on its device (e.g. another mode or
    `graph_fetch`, for a benchmark's comparison); returns the one it replaces, if any.
    Call it before the device's first operation: routes and graphs are per launcher."""
    if not isinstance(launcher, Launcher):
        raise TypeError(f"use_launcher: launcher={launcher!r}, expected a Launcher")
    with _LAUNCHERS_LOCK:
        previous = _LAUNCHERS.get(launcher.index)
        _LAUNCHERS[launcher.index] = launcher
    return previous


def launcher_of(tensor: torch.Tensor) -> Launcher:
    """`launcher_for(tensor.device)`, found by the tensor's device index: the operations'
    lookup on every call, without making a device object (~0.6 us)."""
    launcher = _LAUNCHERS.get(tensor.get_device())
    return launcher if launcher is not None else launcher_for(tensor.device)


def _launcher_at(index: int) -> Launcher:
    launcher = _LAUNCHERS.get(index)
    if launcher is None:
        with _LAUNCHERS_LOCK:
            launcher = _LAUNCHERS.get(index)
            if launcher is None:
                launcher = _LAUNCHERS[index] = Launcher(torch.device("cuda", index) if index >= 0 else "cpu")
    return launcher
