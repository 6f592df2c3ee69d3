"""`embxfer demo` as a real local world: gloo point-to-point, shared-memory rings,
several TP layouts; and its command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.procs import run_demo, run_group, shm_entries, unique_prefix

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("layout", [
    # encoders, encoder TP, language TP, extra flags
    ("1", "1", "2", ["--lengths", "9168,2000,12000,1,129", "--deepstack", "3", "--dim", "256"]),
    ("2", "2", "1", ["--lengths", "3000,700,5000", "--dtype", "fp32", "--dim", "1000"]),
])
def test_demo_layouts_verify_every_request(tmp_path, layout):
    encoders, encoder_tp, language_tp, extra = layout
    path = tmp_path / "demo.json"
    prefix = unique_prefix()
    code, out, err = run_demo("--encoders", encoders, "--encoder-tp", encoder_tp, "--language-tp", language_tp,
                              "--requests", "6", "--default-alloc-tokens", "1024", "--language-pool-blocks", "24",
                              "--staging-mb", "1", "--timeout", "200", "--json", str(path), *extra, prefix=prefix)
    assert code == 0, err[-3000:]
    result = json.loads(path.read_text())
    assert result["totals"]["verified"] == 6 and result["totals"]["failed"] == 0
    assert all(r["verified"] and r["status"] == "verified" for r in result["requests"])
    assert result["totals"]["resumes"] > 0
    assert result["leaks"] == {"encoder_blocks_in_use": 0, "language_blocks_in_use": 0}
    assert "6/6 requests verified" in out
    assert not shm_entries(prefix)


@pytest.mark.parametrize("flags, needle", [
    (["--requests", "0"], "--requests"),
    (["--language-pool-blocks", "0"], "--language-pool-blocks"),
    (["--dtype", "int8"], "--dtype"),
    (["--encoder-tp", "two"], "--encoder-tp"),
    (["--min-tokens", "900", "--max-tokens", "10"], "--min-tokens"),
    (["--lengths", "5,x"], "--lengths"),
    (["--block-size", "4096"], "--block-size"),
    (["--staging-mb", "-1"], "--staging-mb"),
    (["--bogus"], "unrecognized"),
])
def test_bad_flags_exit_2_with_one_line(flags, needle):
    result = subprocess.run([sys.executable, "-m", "embxfer", "demo", *flags], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_demo_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 3 -m embxfer.demo` runs the same job, one rank per process."""
    path = tmp_path / "demo.json"
    prefix = unique_prefix()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["EMBXFER_SHM_PREFIX"] = prefix
    result = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
         "-m", "embxfer.demo", "--quiet", "--requests", "4", "--lengths", "9168,100",
         "--json", str(path)],
        timeout=180, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4/4 requests verified" in result.stdout
    assert json.loads(path.read_text())["totals"]["verified"] == 4
    assert not shm_entries(prefix)


def test_world_size_that_does_not_match_the_layout_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "embxfer.demo", "--quiet", "--language-tp", "2"],
        timeout=120, env=env, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "world size 2 does not match the layout" in result.stderr
