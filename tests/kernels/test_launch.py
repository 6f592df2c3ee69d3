"""The launch path (kernels/launch.py) under Triton's interpreter: routes, table templates
reused across messages and table buffers, row sides addressed per message, the
fixed-grid kernel of graph mode, and `ops.unpack_addressed_rows`, against the torch
reference. Fresh random bits per case (seed in the test id), every output poisoned,
every byte compared."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from kernel_cases import DTYPES, Message, assert_bitwise_equal, odd_batch

from embxfer import kernels
from embxfer.kernels import launch, ops
from embxfer.kernels.launch import Launcher, grid_bucket
from embxfer.kernels.triton_copy import HEADER_WORDS, PoolSide, TileConfig, set_tile_config

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the interpreter grid runs on CPU; test_launch_gpu.py covers CUDA",
)

INTERPRETER_TILES = TileConfig(tile_words=32768, max_block_w=4096, min_programs=1)
OPERATIONS = ("pack", "unpack", "pack_addressed_rows", "unpack_addressed_rows", "gather_addressed")


@pytest.fixture(autouse=True)
def interpreter_tiles():
    previous = set_tile_config(INTERPRETER_TILES)
    yield
    set_tile_config(previous)


@pytest.fixture(params=["direct", "graph"])
def launcher(request, monkeypatch):
    """A fresh launcher; in graph mode every grid is rounded up well past the message's
    programs, so the fixed-grid kernel's idle programs are exercised."""
    if request.param == "graph":
        monkeypatch.setattr(launch, "grid_bucket", lambda programs: 2 * programs + 3)
    return Launcher("cpu", mode=request.param)


GRID = [
    (dtype, dim, layers, block_size)
    for dtype in DTYPES
    for dim, layers in ((1000, 0), (33, 2), (3584, 1))
    for block_size in (4, 16)
]


def _case_id(case):
    dtype, dim, layers, block_size = case
    return f"{str(dtype).removeprefix('torch.')}-D{dim}-K{layers}-bs{block_size}"


@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_operations_match_reference(launcher, case):
    """Every runtime operation, two messages of one layout in a row (the second reuses the
    route and its template, with other blocks and starts), interleaved with the other
    operations so that table buffers change hands: 1 token, block_size - 1, block_size,
    block_size + 1 tokens."""
    dtype, dim, layers, block_size = case
    seed = zlib.crc32(f"{launcher.mode}-{_case_id(case)}".encode()) % 10_000
    generator = torch.Generator().manual_seed(seed)
    counts, starts = odd_batch(block_size)
    layout = kernels.staging_layout(counts, dim, layers * dim, dtype)
    messages = [Message(layout, block_size, starts, generator), Message(layout, block_size, starts[::-1], generator)]
    for message in messages:
        for operation in OPERATIONS:
            what = f"{operation} seed={seed} {_case_id(case)} mode={launcher.mode}"
            assert_bitwise_equal(message.run(operation, launcher, "triton"), message.run(operation, launcher, "torch"),
                                 what=what)


@pytest.mark.parametrize("counts", [[37], [5, 9, 1]], ids=["one-segment", "three-segments"])
def test_addressed_rows_take_the_runtimes_tuples_and_lists(launcher, counts):
    """The runtime passes its row-address tuples and its list of starts as they are (a
    message of one segment then builds no array): the same bytes as arrays give."""
    generator = torch.Generator().manual_seed(len(counts))
    layout = kernels.staging_layout(counts, 40, 40, torch.bfloat16)
    message = Message(layout, 4, [1] * len(counts), generator)
    for operation in ("pack_addressed_rows", "unpack_addressed_rows"):
        want = message.run(operation, launcher, "torch")
        assert_bitwise_equal(message.run(operation, launcher, "triton"), want, what=f"{operation} arrays")
        assert_bitwise_equal(message.run(operation, launcher, "triton", as_lists=True), want,
                             what=f"{operation} tuples and lists")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers", [0, 1])
def test_unpack_addressed_rows_through_ops(dtype, layers):
    """`ops.unpack_addressed_rows` on both paths, all segments and a subset (the others'
    rows stay poisoned), odd row lengths (D = 7: 2-byte words for bf16 / fp16)."""
    generator = torch.Generator().manual_seed(3 + layers)
    for dim, counts in ((7, [1, 3, 4, 5]), (1000, [5, 0, 17, 1])):
        layout = kernels.staging_layout(counts, dim, layers * dim, dtype)
        message = Message(layout, 4, [3, 0, 2, 1], generator)
        for segments in (None, [0, 2, 3], [1]):
            results = []
            for backend in ("triton", "torch"):
                outputs = message.outputs()
                chosen = range(len(counts)) if segments is None else segments
                addresses = np.array([ops.row_addresses(outputs[i]) for i in chosen], dtype=np.int64)
                ops.unpack_addressed_rows(message.staging, layout, outputs[0], addresses,
                                          message.row_starts[list(chosen)], [outputs[i] for i in chosen],
                                          segments=segments, triton=backend == "triton")
                results.append(tuple(outputs[0]) + tuple(outputs[-1]))
            assert_bitwise_equal(*results, what=f"D={dim} {dtype} K={layers} segments={segments}")


@pytest.mark.parametrize("operation", OPERATIONS)
def test_empty_messages_launch_nothing(launcher, operation):
    generator = torch.Generator().manual_seed(4)
    layout = kernels.staging_layout([0, 0], 40, 0, torch.bfloat16)
    message = Message(layout, 4, [1, 2], generator)
    assert_bitwise_equal(message.run(operation, launcher, "triton"), message.run(operation, launcher, "torch"))


@pytest.mark.parametrize("value", [-1, 1.5, True, None, float("nan")])
def test_a_bad_host_table_limit_is_refused(value):
    with pytest.raises(ValueError, match=r"host_table_max_bytes=.*expected an integer >= 0"):
        Launcher("cpu", host_table_max_bytes=value)


@pytest.mark.parametrize("value", ["upload", "", None, 1])
def test_a_bad_graph_fetch_is_refused(value):
    with pytest.raises(ValueError, match=r"graph_fetch=.*expected one of \('copy', 'kernel'\)"):
        Launcher("cpu", graph_fetch=value)


def test_use_launcher_replaces_the_devices_launcher_until_it_is_put_back():
    mine = Launcher("cpu", mode="direct", graph_fetch="kernel")
    previous = launch.use_launcher(mine)
    try:
        assert launch.launcher_for(torch.device("cpu")) is mine
        assert launch.launcher_of(torch.empty(1)) is mine
    finally:
        restored = launch.use_launcher(previous) if previous is not None else launch._LAUNCHERS.pop(-1)
    assert restored is mine
    assert launch.launcher_for(torch.device("cpu")) is not mine
    with pytest.raises(TypeError, match=r"use_launcher: launcher='direct', expected a Launcher"):
        launch.use_launcher("direct")


def test_table_buffers_change_hands_between_routes():
    """Three layouts (S = 4, 1, 2) packed in turn through one launcher, more messages than
    it has table buffers: each buffer holds another route's template every time it comes
    round, and every message is still exact."""
    generator = torch.Generator().manual_seed(5)
    launcher = Launcher("cpu", mode="direct")
    layouts = [kernels.staging_layout(c, 24, 24, torch.float16) for c in ([1, 3, 4, 5], [9], [2, 6])]
    for i in range(14):
        layout = layouts[i % 3]
        message = Message(layout, 4, [i % 4] * layout.num_segments, generator)
        assert_bitwise_equal(message.run("pack", launcher, "triton"), message.run("pack", launcher, "torch"),
                             what=f"message {i}")


def _recorded_tables(monkeypatch):
    """Replace the launch by a recorder of (grid, table, scalars, constants)."""
    calls = []

    def record(grid, metadata, scalars, tensors, constants, header, num_warps, *, warmup=False):
        calls.append((grid, metadata.numpy().copy(), scalars, constants, header))

    monkeypatch.setattr(launch, "launch_jit", record)
    return calls


def test_route_tables_equal_the_general_tables(monkeypatch):
    """A route's table (template + the message's own columns) is word for word the table
    the general path builds from the same sides, for pack and unpack, on the route's first
    and later messages."""
    calls = _recorded_tables(monkeypatch)
    generator = torch.Generator().manual_seed(6)
    layout = kernels.staging_layout([1, 3, 4, 5], 40, 40, torch.bfloat16)
    launcher = Launcher("cpu", mode="direct")
    for starts in ([3, 0, 2, 1], [0, 1, 3, 2]):
        message = Message(layout, 4, starts, generator)
        side = ops.staging_side(message.staging, layout)
        widths = {"dim": 40, "deepstack_dim": 40, "element_size": 2}
        counts = np.asarray(layout.counts, dtype=np.int64)
        launcher.pack(message.pool, message.plan, message.staging, layout)
        launcher.copy(counts, PoolSide(message.pool, message.plan), side, **widths)
        launcher.unpack(message.staging, layout, message.pool, message.plan)
        launcher.copy(counts, side, PoolSide(message.pool, message.plan), **widths)
    assert len(calls) == 8
    for route_call, general_call in zip(calls[0::2], calls[1::2], strict=True):
        assert route_call[0] == general_call[0] and route_call[2:] == general_call[2:]
        np.testing.assert_array_equal(route_call[1], general_call[1])


def test_row_columns_address_the_rows(monkeypatch):
    """A row side's columns, decoded (word offset x word bytes + the staging buffer's
    address), are the rows' own addresses; the word follows the rows' alignment."""
    calls = _recorded_tables(monkeypatch)
    generator = torch.Generator().manual_seed(7)
    for dim, word_bytes in ((40, 4), (7, 2)):
        layout = kernels.staging_layout([1, 3, 4, 5], dim, dim, torch.bfloat16)
        message = Message(layout, 4, [3, 0, 2, 1], generator)
        addresses = np.array([ops.row_addresses(r) for r in message.sources], dtype=np.int64)
        Launcher("cpu", mode="direct").pack_addressed_rows(addresses, message.row_starts, message.staging, layout)
        _, table, (s, *_), _, _ = calls[-1]
        columns = table[HEADER_WORDS.value + 2 * s : HEADER_WORDS.value + 7 * s].reshape(5, s)
        base, starts, row = message.staging.data_ptr(), message.row_starts, dim * 2
        np.testing.assert_array_equal(columns[0] * word_bytes + base, addresses[:, 0] + starts * row)
        np.testing.assert_array_equal(columns[1] * word_bytes + base, addresses[:, 1] + starts * row)
        np.testing.assert_array_equal(columns[2] * 4 + base, addresses[:, 2] + 4 * starts)
        np.testing.assert_array_equal(columns[3] * 4 + base, addresses[:, 3] + 4 * starts)
        np.testing.assert_array_equal(columns[4], addresses[:, 4])


def test_grid_buckets():
    """At least the programs, at most a quarter more, four per doubling past 8."""
    buckets = [grid_bucket(n) for n in range(1, 70_000)]
    assert all(n <= b <= max(4, n + n // 4) for n, b in enumerate(buckets, start=1))
    assert all(a <= b for a, b in zip(buckets, buckets[1:], strict=False))
    assert len(set(buckets)) <= 8 + 4 * (70_000 // 8).bit_length()
