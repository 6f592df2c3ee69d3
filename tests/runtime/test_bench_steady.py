"""bench/steady.py (the pipeline cases rep by rep, with the collector's mode), on the CPU."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import steady  # noqa: E402 - bench/steady.py


@pytest.mark.parametrize("mode", ["on", "import", "setup"])
def test_each_rep_is_counted_and_the_collector_is_left_as_found(mode, tmp_path, capsys):
    hooks = list(gc.callbacks)
    out = tmp_path / "steady.jsonl"
    assert steady.main(["--gc", mode, "--reps", "2", "--cases", "many_small", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["case"], r["gc"], r["rep"]) for r in rows] == [("many_small", mode, 0), ("many_small", mode, 1)]
    for row in rows:
        assert row["ms"] > 0 and row["gbps"] > 0
        assert row["captures"] == row["waits"] == row["drops"] == 0  # no CUDA here: no graphs
        assert all(row[f"gc{g}"] >= 0 and row[f"gc{g}_ms"] >= 0 for g in range(3))
        assert (row["frozen"] > 0) == (mode != "on")
    assert gc.callbacks == hooks and gc.get_freeze_count() == 0


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        steady.main(["--cases", "nope"])
    with pytest.raises(SystemExit):
        steady.main(["--reps", "0"])


def test_the_wrapped_methods_are_put_back():
    from embxfer.kernels import cuda_driver, launch

    before = (launch.Launcher._capture, launch.Launcher._drop_graphs, cuda_driver.CudaDriver.event_synchronize)
    assert steady.main(["--reps", "1", "--cases", "many_small"]) == 0
    assert (launch.Launcher._capture, launch.Launcher._drop_graphs, cuda_driver.CudaDriver.event_synchronize) == before
