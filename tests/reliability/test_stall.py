"""A live but busy engine is never declared dead (SPEC section 10): a rank whose engine
loop makes no call into embxfer for longer than `peer_timeout_s` (a long prefill, a
compile) keeps beating from its own thread, on the rings and on the cross-node link,
and the job completes."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from tests.procs import run_group, shm_entries, unique_prefix
from tests.reliability.faultkit import all_shm_entries

pytestmark = pytest.mark.timeout(240)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("stalled, stall_s, peer_timeout_s, heartbeat_s, nodes", [
    (1, 12.0, 10.0, 0.5, 1),  # the language leader, with the defaults: the case
    (0, 3.0, 2.0, 0.2, 2),    # the encoder, on the other node: its link's thread beats
])
def test_an_engine_step_longer_than_peer_timeout_is_not_a_dead_rank(tmp_path, stalled, stall_s, peer_timeout_s,
                                                                     heartbeat_s, nodes):
    prefix = unique_prefix()
    env = dict(os.environ, EMBXFER_SHM_PREFIX=prefix, EMBXFER_PEER_TIMEOUT_S=str(peer_timeout_s),
               EMBXFER_HEARTBEAT_INTERVAL_S=str(heartbeat_s))
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    started = time.monotonic()
    result = run_group([sys.executable, "-m", "tests.reliability.engines", "--result", str(tmp_path / "r"),
                        "--requests", "15", "--nodes", str(nodes), "--stall", f"{stalled}:3:{stall_s}"],
                       timeout=180, env=env, cwd=ROOT)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is dead" not in result.stderr, result.stderr[-3000:]
    outcomes = [json.loads((tmp_path / f"r.{rank}").read_text()) for rank in range(3)]
    assert all(o["ok"] and not o["dead_peers"] for o in outcomes), outcomes
    assert elapsed > stall_s
    print(f"\n[stall] rank {stalled} stalled {stall_s:g}s with peer_timeout_s={peer_timeout_s:g}: job completed, "
          f"no rank declared dead ({elapsed:.1f}s)")
    assert not shm_entries(prefix) and not all_shm_entries(prefix)
