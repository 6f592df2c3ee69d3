"""`embxfer ring ls|rm`: the command-line face of the hygiene helpers."""

from __future__ import annotations

import pytest
import ringworkers
from ringworkers import TEST_PREFIX

from embxfer.control.ring import RingWriter
from embxfer.runtime.cli import main

pytestmark = pytest.mark.timeout(60)


def test_ls_shows_live_rings_and_rm_keeps_them(capsys):
    with RingWriter.create(4, 64, 1, prefix=TEST_PREFIX) as writer:
        assert main(["ring", "ls", "--prefix", TEST_PREFIX]) == 0
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.startswith(writer.name))
        assert " ring " in line and line.endswith("alive")
        assert main(["ring", "rm", "--prefix", TEST_PREFIX, writer.name]) == 0
        assert f"kept {writer.name}" in capsys.readouterr().out


def test_rm_removes_what_a_killed_writer_left(spawn, capsys):
    parent_end, child_end = spawn.context.Pipe()
    process = spawn(ringworkers.publishing_writer, child_end, 1, 4)
    name = parent_end.recv()
    process.kill()
    process.join(10)
    assert main(["ring", "ls", "--prefix", TEST_PREFIX]) == 0
    assert "stale (creator gone)" in capsys.readouterr().out
    assert main(["ring", "rm", "--prefix", TEST_PREFIX]) == 0
    out = capsys.readouterr().out
    assert f"removed {name}" in out and "2 removed" in out
    assert main(["ring", "ls", "--prefix", TEST_PREFIX]) == 0
    assert "no ring segments" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert main(["ring"]) == 2
    assert main(["ring", "rm", f"{TEST_PREFIX}-1-nothere"]) == 2
    assert "no such segment" in capsys.readouterr().err
