"""What an operator sees means what it says: configuration (flags over EMBXFER_* over
defaults, and what runs is what `embxfer info`, the start-up line and the JSON report
print), `embxfer ring ls|rm` under EMBXFER_SHM_PREFIX, a progress bar that counts only
verified requests, abort reasons clipped to one length everywhere."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from embxfer.runtime import Config
from embxfer.runtime.demo import ArgumentParser, add_demo_arguments, config_of
from tests.procs import run_group, shm_entries, unique_prefix

pytestmark = pytest.mark.timeout(240)

ENV_SETTINGS = {"EMBXFER_BLOCK_SIZE": "64", "EMBXFER_DEFAULT_ALLOC_TOKENS": "1000",
                "EMBXFER_LANGUAGE_POOL_BLOCKS": "40", "EMBXFER_REQUEST_TIMEOUT_S": "77",
                "EMBXFER_STAGING_BYTES": "1048576"}


def demo_args(*flags: str):
    parser = ArgumentParser(prog="embxfer demo")
    add_demo_arguments(parser)
    return parser.parse_args(list(flags))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EMBXFER_") and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, **extra}


def test_flags_over_environment_over_defaults(monkeypatch):
    for name in list(os.environ):
        if name.startswith("EMBXFER_"):
            monkeypatch.delenv(name)
    plain = config_of(demo_args())
    assert (plain.block_size, plain.language_pool_blocks, plain.staging_bytes) == (128, 256, 8 << 20)
    for name, value in ENV_SETTINGS.items():
        monkeypatch.setenv(name, value)
    from_env = config_of(demo_args())
    assert (from_env.block_size, from_env.default_alloc_tokens, from_env.language_pool_blocks,
            from_env.request_timeout_s, from_env.staging_bytes) == (64, 1000, 40, 77.0, 1 << 20)
    flagged = config_of(demo_args("--block-size", "32", "--language-pool-blocks", "50", "--staging-mb", "2",
                                  "--default-alloc-tokens", "512"))
    assert (flagged.block_size, flagged.default_alloc_tokens, flagged.language_pool_blocks,
            flagged.staging_bytes, flagged.request_timeout_s) == (32, 512, 50, 2 << 20, 77.0)


def info_configuration(env: dict[str, str]) -> dict[str, str]:
    """What `embxfer info` says the demo (no flags) runs with: the configuration block,
    then the demo's own lines over it."""
    result = subprocess.run([sys.executable, "-m", "embxfer", "info"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    values = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^  (\w+)\s*= (\S+)", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


@pytest.mark.parametrize("settings, flags", [({}, []), (ENV_SETTINGS, ["--block-size", "32"])])
def test_what_runs_is_what_info_and_the_report_print(tmp_path, settings, flags):
    prefix = unique_prefix()
    env = clean_env(**settings, EMBXFER_SHM_PREFIX=prefix)
    expected = info_configuration(env)
    if flags:
        expected["block_size"] = "32"  # a flag wins over the environment
    path = tmp_path / "demo.json"
    result = run_group([sys.executable, "-m", "embxfer.demo", "--quiet", "--requests", "3", "--lengths", "900,64",
                        "--dim", "64", "--json", str(path), *flags], timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    effective = json.loads(path.read_text())["config"]["effective"]
    assert {name: str(value) for name, value in effective.items()} == expected
    pool, staging = int(expected["language_pool_blocks"]), int(expected["staging_bytes"]) / 2**20
    assert (f"block {expected['block_size']}," in result.stdout
            and f"language pool {pool} blocks, staging 2 x {staging:g} MiB" in result.stdout), result.stdout
    assert not shm_entries(prefix)


def test_ring_commands_honour_the_prefix_variable():
    from embxfer.control.ring import Doorbell

    prefix = unique_prefix()
    # A doorbell whose creator exits without closing it: stale.
    subprocess.run([sys.executable, "-c", "import os; from embxfer.control.ring import Doorbell; "
                    f"d = Doorbell.create({prefix!r}); print(d.name); os._exit(0)"], check=True, timeout=60)
    alive = Doorbell.create(prefix)
    try:
        env = clean_env(EMBXFER_SHM_PREFIX=prefix)
        listed = subprocess.run([sys.executable, "-m", "embxfer", "ring", "ls"], capture_output=True, text=True,
                                env=env, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert "stale (creator gone)" in listed.stdout and alive.name.lstrip("/") in listed.stdout
        assert listed.stdout.count(prefix) == 2, listed.stdout
        removed = subprocess.run([sys.executable, "-m", "embxfer", "ring", "rm"], capture_output=True, text=True,
                                 env=env, timeout=60)
        assert removed.returncode == 0 and "1 removed" in removed.stdout, removed.stdout + removed.stderr
        assert shm_entries(prefix) == {f"sem.{alive.name.lstrip('/')}"}
        for action in ("ls", "rm"):
            bad = subprocess.run([sys.executable, "-m", "embxfer", "ring", action], capture_output=True, text=True,
                                 env=clean_env(EMBXFER_SHM_PREFIX="not/a-prefix"), timeout=60)
            lines = bad.stderr.strip().splitlines()
            assert bad.returncode == 2 and len(lines) == 1 and "prefix" in lines[0], bad.stderr
            assert "Traceback" not in bad.stderr
    finally:
        alive.close()


def test_progress_bar_counts_verified_requests_and_shows_failures(tmp_path):
    pytest.importorskip("tqdm")
    prefix = unique_prefix()
    path = tmp_path / "demo.json"
    result = run_group([sys.executable, "-m", "embxfer.demo", "--requests", "12", "--lengths", "20000,200",
                        "--dim", "64", "--default-alloc-tokens", "1024", "--language-pool-blocks", "16",
                        "--abort-rate", "0.7", "--seed", "3", "--json", str(path)],
                       timeout=180, env=clean_env(EMBXFER_SHM_PREFIX=prefix), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    totals = json.loads(path.read_text())["totals"]
    assert totals["aborted"] > 0 and totals["verified"] < 12
    final = result.stderr.replace("\r", "\n").strip().splitlines()
    bar = [line for line in final if "embxfer demo:" in line and "req" in line][-1]
    assert f" {totals['verified']}/12 " in bar, bar
    assert f"aborted={totals['aborted']}" in bar and "failed=0" in bar, bar
    assert not shm_entries(prefix)  # aborts on both sides leave no ring, no doorbell


def test_a_long_abort_reason_is_clipped_in_the_log_and_the_error_alike(caplog):
    from embxfer.control.records import MAX_MESSAGE_BYTES
    from embxfer.runtime.local import LocalCluster, random_payload
    from embxfer.runtime.topology import Topology

    cluster = LocalCluster(Topology(1, 1, 2), Config(default_alloc_tokens=1024, language_pool_blocks=16,
                                                     staging_bytes=1 << 14), dim=16)
    cluster.admit(1)
    cluster.submit(1, random_payload(3000, 16, seed=1))
    cluster.step()
    with caplog.at_level(logging.DEBUG, logger="embxfer"):
        cluster.leader.abort(1, "x" * 2000)
        cluster.settle()
    errors = [cluster.leader.error(1), cluster.senders[0].error(1), cluster.receivers[2].error(1)]
    assert all(e and "xxx" in e for e in errors[:2]), errors
    assert all(len(e.encode()) <= MAX_MESSAGE_BYTES + 64 for e in errors if e), errors
    messages = [r.getMessage() for r in caplog.records]
    assert any("x" * 100 in m for m in messages)
    assert max(len(m) for m in messages) <= MAX_MESSAGE_BYTES + 200, max(messages, key=len)[:200]


def test_a_rank_line_reaches_stderr_in_one_write(monkeypatch):
    """The launcher and its ranks share stderr; `print` writes a line and its newline apart
    (two writes when stderr is unbuffered, PYTHONUNBUFFERED=1), which let two ranks' lines
    run into each other (`test_sigterm_to_the_launcher_stops_the_world_and_cleans_up`
    failed so). What the demo and the launcher say about a rank goes out in one write."""
    import io

    from embxfer.runtime import launch

    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return super().write(text)

    recorder = Recorder()
    monkeypatch.setattr("sys.stderr", recorder)
    launch.say("embxfer demo: rank 2 (language engine 'language0' TP rank 1): stopped by SIGTERM")
    assert recorder.writes == ["embxfer demo: rank 2 (language engine 'language0' TP rank 1): stopped by SIGTERM\n"]
