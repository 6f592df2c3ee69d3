"""Soak: 2000 requests of random sizes with random aborts through small pools, in a real
local world. Every non-aborted request verifies, blocks in use return to zero, and open
fds, threads and /dev/shm entries do not grow between steady state and the end."""

from __future__ import annotations

import json

import pytest

from tests.procs import run_demo, shm_entries, unique_prefix


@pytest.mark.timeout(400)
def test_soak_2000_requests_with_random_aborts(tmp_path):
    path = tmp_path / "soak.json"
    prefix = unique_prefix()
    code, out, err = run_demo(
        "--requests", "2000", "--min-tokens", "1", "--max-tokens", "3000", "--dim", "64", "--abort-rate", "0.1",
        "--language-pool-blocks", "16", "--default-alloc-tokens", "1024",
        "--timeout", "300", "--json", str(path), timeout=360, prefix=prefix,
    )
    assert code == 0, err[-3000:]
    result = json.loads(path.read_text())
    totals = result["totals"]
    print(f"\n[soak] {totals['verified']} verified, {totals['aborted']} aborted, {totals['resumes']} resumes "
          f"in {totals['seconds']:.1f}s; resources {result['resources']}")
    assert totals["failed"] == 0 and totals["aborted"] > 0
    assert totals["verified"] + totals["aborted"] == 2000
    assert result["leaks"] == {"encoder_blocks_in_use": 0, "language_blocks_in_use": 0}
    res = result["resources"]
    for name in ("fds", "threads", "shm_entries"):
        assert res[f"{name}_end"] == res[f"{name}_start"], (name, res)
    assert not shm_entries(prefix)
