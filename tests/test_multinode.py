"""Beyond one node, in CI: `embxfer demo --nodes 2` simulates two nodes on this machine
(own node ids and shared-memory prefixes; records between them over the zmq link with
CURVE, TCP loopback), and two `torchrun` launches join one world as two nodes.

- every request verified with the encoder on node 0 and the language engine (TP 2) on
  node 1, and with the language TP group split across the nodes;
- kill -9 of every process of one node mid-run: the other node's requests fail cleanly
  and the run exits non-zero within 2 x peer_timeout_s;
- connections without the job's keys are refused, replayed and misaddressed cross-node
  frames and a record speaking for another rank are dropped and counted while the job
  goes on;
- two torchrun invocations (`--nnodes 2`, node ranks 0 and 1, one c10d rendezvous)
  run a short demo to completion over the cross-node path.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from tests.procs import log_times, run_demo, run_group, unique_prefix
from tests.reliability.faultkit import DemoSession, all_shm_entries

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("split, layout", [
    ("roles", ["--encoders", "2", "--encoder-tp", "1", "--language-tp", "2"]),  # encoders | language
    ("even", ["--encoders", "1", "--encoder-tp", "1", "--language-tp", "2"]),   # encoder + leader | follower
])
def test_two_simulated_nodes_verify_every_request(tmp_path, split, layout):
    path = tmp_path / "demo.json"
    prefix = unique_prefix()
    code, out, err = run_demo("--nodes", "2", "--node-split", split, *layout, "--requests", "8",
                              "--lengths", "9168,2000,64,12000", "--dim", "256", "--default-alloc-tokens", "2048",
                              "--language-pool-blocks", "32", "--staging-mb", "1", "--timeout", "200",
                              "--json", str(path), prefix=prefix)
    assert code == 0, err[-3000:]
    assert ", 2 nodes;" in out  # the ranks saw two node ids: records between them went over zmq
    result = json.loads(path.read_text())
    assert result["totals"]["verified"] == 8 and result["totals"]["failed"] == 0
    assert result["totals"]["resumes"] > 0
    assert result["leaks"] == {"encoder_blocks_in_use": 0, "language_blocks_in_use": 0}
    assert not all_shm_entries(prefix)


PEER_TIMEOUT_S = 3.0
KILL_ENV = {"EMBXFER_PEER_TIMEOUT_S": str(PEER_TIMEOUT_S), "EMBXFER_HEARTBEAT_INTERVAL_S": "0.2"}


@pytest.mark.parametrize("victim_node", [0, 1])
def test_losing_a_whole_node_fails_the_other_nodes_requests_and_ends_the_run(victim_node):
    """Node 0 holds the encoder (and embxfer's store), node 1 the language TP group."""
    with DemoSession("--nodes", "2", "--requests", "2000", "--min-tokens", "500", "--max-tokens", "6000",
                     "--dim", "512", "--default-alloc-tokens", "2048", "--language-pool-blocks", "48",
                     "--staging-mb", "0.5", "--timeout", "300", env=KILL_ENV) as demo:
        ranks = demo.wait_until_connected(world_size=3)
        time.sleep(1.0)
        nodes = demo.nodes()
        victims = next(pids for node, pids in nodes.items() if node.endswith(f"node{victim_node}"))
        survivors = [rank for rank, pid in ranks.items() if pid not in victims]
        killed_wall, killed = time.time(), time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        code, out, err = demo.collect(4 * PEER_TIMEOUT_S)
        exited_s = time.monotonic() - killed
        gone_s = demo.wait_until_gone(killed, 2 * PEER_TIMEOUT_S)
    assert code not in (0, None), err[-3000:]
    assert "Traceback" not in err and "terminate called" not in err, err[-3000:]
    for rank in survivors:
        lines = [line for line in err.splitlines() if line.startswith(f"embxfer demo: rank {rank} (")]
        assert len(lines) == 1 and "the job is lost" in lines[0] and "request(s) failed" in lines[0], err[-3000:]
    detected = [t for rank, pid in ranks.items() if pid in victims for t in log_times(err, f"(pid {pid} on")]
    assert detected, err[-3000:]
    print(f"\n[multinode] SIGKILL of node {victim_node} (ranks {sorted(set(ranks) - set(survivors))}, "
          f"T={PEER_TIMEOUT_S:g}s): detected after {min(detected) - killed_wall:.3f}s, run exited {code} after "
          f"{exited_s:.2f}s, every process and segment gone after {gone_s:.2f}s")
    assert exited_s <= 2 * PEER_TIMEOUT_S


def test_forged_and_replayed_cross_node_records_are_dropped_and_counted(tmp_path):
    prefix = unique_prefix()
    env = dict(os.environ, EMBXFER_SHM_PREFIX=prefix)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = run_group([sys.executable, "-m", "tests.reliability.engines", "--result", str(tmp_path / "r"),
                        "--nodes", "2", "--tamper", "--requests", "30"], timeout=180, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    encoder, leader, follower = (json.loads((tmp_path / f"r.{rank}").read_text()) for rank in range(3))
    assert encoder["ok"] and leader["ok"] and follower["ok"], (encoder, leader, follower)
    # An outsider without the job's keys refused at the handshake; from a socket with the keys, at least
    # one replayed frame and one readdressed to another member (forged), dropped by the link; an ABORT
    # over the encoder's own link claiming rank 2 as its source, dropped by the bus: nothing was aborted.
    assert leader["link"]["refused"] >= 1, leader
    assert leader["link"]["forged"] == 1 and leader["link"]["replayed"] >= 1, leader
    assert leader["spoofed"] == 1, leader
    assert follower["link"]["forged"] == follower["link"]["replayed"] == follower["spoofed"] == 0, follower
    print(f"\n[multinode] attack on the language leader's link: {leader['link']}, spoofed {leader['spoofed']}; "
          f"all {leader['verified']} requests verified")
    assert not all_shm_entries(prefix)


def test_two_torchrun_launches_join_as_two_nodes(tmp_path):
    """`torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`
    twice on this machine: torchrun's node rank makes two node ids (runtime/api.py
    `_node_id`), so the cross-node path carries the records."""
    from embxfer.runtime.launch import free_port

    port = free_port()
    prefix = unique_prefix()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["EMBXFER_SHM_PREFIX"] = prefix
    path = tmp_path / "demo.json"
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", f"embxfer-test-{port}", "-m", "embxfer.demo", "--quiet", "--encoders", "1",
         "--encoder-tp", "2", "--language-tp", "2", "--requests", "6", "--lengths", "9168,100,3000",
         "--timeout", "120", "--json", str(path)]
        for node in (0, 1)
    ]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda cmd: run_group(cmd, timeout=240, env=env, cwd=tmp_path), commands))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    out = "".join(r.stdout for r in results)
    assert "6/6 requests verified" in out and ", 2 nodes;" in out, out
    assert json.loads(path.read_text())["totals"]["verified"] == 6
    assert not all_shm_entries(prefix)
