"""Leftovers of crashed runs: listed, removed only when their creator is gone; and the
control plane's layering (no torch, no runtime, no kernels)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import posix_ipc
import pytest
import ringworkers
from ringworkers import TEST_PREFIX

from embxfer.control import hygiene
from embxfer.control.ring import Doorbell, RingReader, RingWriter

pytestmark = pytest.mark.timeout(60)

CONTROL_DIR = Path(__file__).resolve().parents[2] / "control"


def test_live_segments_are_listed_and_kept(prefix):
    with RingWriter.create(4, 64, 1, prefix=prefix) as writer, RingReader.attach(writer.name) as reader:
        listed = {info.name: info for info in hygiene.list_segments(TEST_PREFIX)}
        ring = listed[writer.name]
        assert (ring.kind, ring.creator_pid, ring.alive) == ("ring", os.getpid(), True)
        assert ring.size == writer.slots * writer.slot_bytes + 256 + 192
        doorbell = listed[reader.doorbell.name.lstrip("/")]
        assert (doorbell.kind, doorbell.creator_pid, doorbell.alive) == ("doorbell", os.getpid(), True)
        assert hygiene.remove_segments(prefix=TEST_PREFIX) == []  # nothing stale
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
        stale = [info for info in hygiene.list_segments(TEST_PREFIX) if info.creator_pid == process.pid]
        assert {info.kind for info in stale} == {"ring", "doorbell"}
        assert not any(info.alive for info in stale)
        removed = hygiene.remove_segments(prefix=TEST_PREFIX)
        assert sorted(removed) == sorted(info.name for info in stale)
        assert reader.doorbell.name.lstrip("/") not in removed  # ours is alive
        # the next run is not disturbed: a new ring with the same prefix works
        with RingWriter.create(4, 64, 1, prefix=prefix) as writer, RingReader.attach(writer.name) as fresh:
            writer.publish(b"fresh", timeout=1)
            assert fresh.poll() == b"fresh"


def test_remove_named_live_entries_only_when_forced(prefix):
    writer = RingWriter.create(4, 64, 1, prefix=prefix)
    try:
        assert hygiene.remove_segments([writer.name], stale_only=True, prefix=prefix) == []
        assert hygiene.remove_segments([writer.name], stale_only=False, prefix=prefix) == [writer.name]
        assert writer.name not in {info.name for info in hygiene.list_segments(TEST_PREFIX)}
    finally:
        writer.close()  # unlinking an already removed segment is fine


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _plant(prefix: str, pid: int, doorbell: bool = False) -> str:
    """An entry named as a crashed run of `prefix` would leave it; its name."""
    if doorbell:
        name = f"{prefix}-db-{pid}-00ff00ff"
        posix_ipc.Semaphore("/" + name, posix_ipc.O_CREX, mode=0o600).close()
    else:
        name = f"{prefix}-{pid}-00ff00ff00ff00ff"
        posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
    return name


def test_a_non_default_prefix_is_matched_whole():
    """Prefix P (dots, underscores, digits: any valid EMBXFER_SHM_PREFIX) finds its own
    entries and never those of prefix P + 'z', which starts with it."""
    prefix = f"x.{os.getpid()}_y"
    longer = prefix + "z"
    dead = _dead_pid()
    planted: list[tuple[str, str]] = []
    try:
        with Doorbell.create(prefix) as doorbell, RingWriter.create(4, 64, 1, prefix, doorbell) as writer:
            for owner in (prefix, longer):
                planted += [(owner, _plant(owner, dead)), (owner, _plant(owner, dead, doorbell=True))]
            mine = {name for owner, name in planted if owner == prefix}
            theirs = {name for owner, name in planted if owner == longer}
            listed = {info.name: info for info in hygiene.list_segments(prefix)}
            assert set(listed) == {writer.name, doorbell.name.lstrip("/")} | mine
            assert listed[writer.name].kind == "ring" and listed[writer.name].alive
            assert {listed[name].kind for name in mine} == {"segment", "doorbell"}
            assert not any(listed[name].alive for name in mine)
            assert sorted(hygiene.remove_segments(prefix=prefix)) == sorted(mine)
            assert {info.name for info in hygiene.list_segments(longer)} == theirs  # untouched
            with pytest.raises(ValueError, match=f"no such segment or doorbell with prefix '{prefix}'"):
                hygiene.remove_segments(sorted(theirs), prefix=prefix)
            assert sorted(hygiene.remove_segments(prefix=longer)) == sorted(theirs)
    finally:
        for _, name in planted:
            try:
                if "-db-" in name:
                    posix_ipc.unlink_semaphore("/" + name)
                else:
                    posix_ipc.unlink_shared_memory("/" + name)
            except posix_ipc.ExistentialError:
                pass


def test_another_prefix_s_doorbell_is_never_taken_for_a_segment(prefix):
    """With prefix 'sem', the semaphore files (sem.<other>-db-...) are not 'sem' entries:
    they are neither listed nor removed, even when named and forced."""
    with Doorbell.create(prefix) as doorbell:
        entry = "sem." + doorbell.name.lstrip("/")
        assert all(info.name.startswith("sem-") for info in hygiene.list_segments("sem"))
        with pytest.raises(ValueError, match="no such segment or doorbell with prefix 'sem'"):
            hygiene.remove_segments([entry], stale_only=False, prefix="sem")
        assert os.path.exists(f"/dev/shm/{entry}")
        doorbell.ring()  # still works


@pytest.mark.timeout(20)
def test_a_fifo_planted_under_a_ring_name_does_not_hang_the_listing(prefix):
    path = f"/dev/shm/{prefix}-{_dead_pid()}-abcdef"
    os.mkfifo(path, 0o600)
    try:
        listed = [info for info in hygiene.list_segments(prefix) if f"/dev/shm/{info.name}" == path]
        assert [(info.kind, info.alive) for info in listed] == [("segment", False)]
        assert hygiene.remove_segments(prefix=prefix) == [os.path.basename(path)]
    finally:
        if os.path.lexists(path):
            os.unlink(path)


@pytest.mark.parametrize("bad", ["", "has-dash", "a" * 25, "sl/ash", f"{TEST_PREFIX}-", None])
def test_an_invalid_prefix_is_refused(bad):
    with pytest.raises(ValueError, match="prefix="):
        hygiene.list_segments(bad)
    with pytest.raises(ValueError, match="prefix="):
        hygiene.remove_segments(prefix=bad)


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
