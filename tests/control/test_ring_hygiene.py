"""Leftovers of crashed runs: listed, removed only when their creator is gone; and the
control plane's layering (no torch, no runtime, no kernels)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ringworkers
from ringworkers import SCAN_PREFIX

from embxfer.control import hygiene
from embxfer.control.ring import RingReader, RingWriter

pytestmark = pytest.mark.timeout(60)

CONTROL_DIR = Path(__file__).resolve().parents[2] / "control"


def test_live_segments_are_listed_and_kept(prefix):
    with RingWriter.create(4, 64, 1, prefix=prefix) as writer, RingReader.attach(writer.name) as reader:
        listed = {info.name: info for info in hygiene.list_segments(SCAN_PREFIX)}
        ring = listed[writer.name]
        assert (ring.kind, ring.creator_pid, ring.alive) == ("ring", os.getpid(), True)
        assert ring.size == writer.slots * writer.slot_bytes + 256 + 192
        doorbell = listed[reader.doorbell.name.lstrip("/")]
        assert (doorbell.kind, doorbell.creator_pid, doorbell.alive) == ("doorbell", os.getpid(), True)
        assert hygiene.remove_segments(prefix=SCAN_PREFIX) == []  # nothing stale
        with pytest.raises(ValueError, match="no such segment"):
            hygiene.remove_segments([f"{prefix}-1-missing"])


def test_a_crashed_writer_leaves_what_remove_segments_takes_away(spawn, prefix):
    parent_end, child_end = spawn.context.Pipe()
    process = spawn(ringworkers.publishing_writer, child_end, 1, 4)
    name = parent_end.recv()
    with RingReader.attach(name) as reader:
        assert parent_end.recv() == "go"
        process.kill()
        process.join(10)
        stale = [info for info in hygiene.list_segments(SCAN_PREFIX) if info.creator_pid == process.pid]
        assert {info.kind for info in stale} == {"ring", "doorbell"}
        assert not any(info.alive for info in stale)
        removed = hygiene.remove_segments(prefix=SCAN_PREFIX)
        assert sorted(removed) == sorted(info.name for info in stale)
        assert reader.doorbell.name.lstrip("/") not in removed  # ours is alive
        # the next run is not disturbed: a new ring with the same prefix works
        with RingWriter.create(4, 64, 1, prefix=prefix) as writer, RingReader.attach(writer.name) as fresh:
            writer.publish(b"fresh", timeout=1)
            assert fresh.poll() == b"fresh"


def test_remove_named_live_entries_only_when_forced(prefix):
    writer = RingWriter.create(4, 64, 1, prefix=prefix)
    try:
        assert hygiene.remove_segments([writer.name], stale_only=True) == []
        assert hygiene.remove_segments([writer.name], stale_only=False) == [writer.name]
        assert writer.name not in {info.name for info in hygiene.list_segments(SCAN_PREFIX)}
    finally:
        writer.close()  # unlinking an already removed segment is fine


def test_control_imports_no_torch_runtime_or_kernels():
    forbidden = ("torch", "triton", "embxfer", "kernels", "runtime")
    for path in CONTROL_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: stays inside control/
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_control_loads_without_torch():
    code = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('embxfer')\n"
        "package = types.ModuleType('embxfer'); package.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['embxfer'] = package\n"
        "import embxfer.control.records, embxfer.control.ring, embxfer.control.remote, embxfer.control.hygiene\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
