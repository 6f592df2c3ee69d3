"""Elastic engines on this machine: how long a join and a restart take to serve, what a
kill costs, what membership costs at idle (issue 19's numbers).

    python bench/elastic.py --json bench/results/elastic-{device}.json [--runs 10]

Every engine rank is a process of its own (`tests/elastic/engine.py`), joined at an
`embxfer rendezvous` (in this process), CPU tensors and gloo, D = 64; the router is this
script. Figures:

  join_to_first_s       a new encoder engine's process starts -> the first request routed
                        to it completes on the language engine (TP 2); also from the
                        moment it said it was up (`up_to_first_s`)
  restart_to_first_s    an encoder killed with -9 is started again under its name ->
                        its first request completes
  lost_per_kill         per run: requests bound to the killed encoder when it died (they
                        must all fail, naming it) and requests on the other encoder (none
                        may fail); over `--runs` runs
  idle_cpu_percent      CPU time of each engine process over 20 s with nothing to do (its
                        loop: progress, then wait(0.5)), as a percentage of one core: the
                        membership watcher, heartbeats, parking
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.elastic.harness import Job  # noqa: E402


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(index: int) -> dict:
    out: dict = {"run": index}
    with Job(f"bel{secrets.token_hex(3)}") as job:
        job.start("vit-0", "encoder")
        job.start("llm-a", "language", tp=2)
        job.wait_up("vit-0", "llm-a", timeout=120)
        warm = [job.route("vit-0", "llm-a", 512) for _ in range(4)]
        job.wait_done("llm-a", warm, ranks=2)

        started = time.time()
        newcomer = job.start("vit-1", "encoder")[0]
        job.wait_up("vit-1", timeout=60)
        up = newcomer.first("up")["at"]
        rid = job.route("vit-1", "llm-a", 512)
        done = job.wait_done("llm-a", [rid], ranks=2)[rid]
        out["join_to_first_s"] = max(e["at"] for e in done) - started
        out["up_to_first_s"] = max(e["at"] for e in done) - up

        victim = job.latest["vit-0"][0]
        victim.process.send_signal(signal.SIGSTOP)
        bound = [job.route("vit-0", "llm-a", 600) for _ in range(3)]
        others = [job.route("vit-1", "llm-a", 600) for _ in range(3)]
        job.wait_done("llm-a", others, ranks=2)
        time.sleep(0.3)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        outcomes = job.wait_done("llm-a", bound, ranks=2)
        failed_bound = sum(all(e["status"] == "failed" and "encoder engine 'vit-0'" in e["error"]
                               for e in outcomes[r]) for r in bound)
        failed_others = sum(any(e["status"] != "verified" for e in outcomes[r]) for r in others)
        out["lost_per_kill"] = {"bound": len(bound), "failed_bound": failed_bound, "failed_others": failed_others}

        restarted = time.time()
        job.start("vit-0", "encoder")
        job.wait_up("vit-0", timeout=60)
        rid = job.route("vit-0", "llm-a", 512)
        done = job.wait_done("llm-a", [rid], ranks=2)[rid]
        out["restart_to_first_s"] = max(e["at"] for e in done) - restarted
    if index == 0:
        out["idle_cpu_percent"] = idle_cost()
    return out


def idle_cost(seconds: float = 20.0) -> dict[str, float]:
    """An encoder engine and a language engine of TP 2 that joined and have nothing to do,
    each looping `progress(); wait(0.5)` as an idle engine does, with the default liveness
    settings (heartbeat 0.5 s, peer timeout 10 s): CPU % of one core each."""
    env = {"ELASTIC_HEARTBEAT_S": "0.5", "ELASTIC_PEER_TIMEOUT_S": "10"}
    with Job(f"bid{secrets.token_hex(3)}", env=env) as job:
        job.start("vit-0", "encoder", extra=("--idle",))
        job.start("llm-a", "language", tp=2, extra=("--idle",))
        job.wait_up("vit-0", "llm-a", timeout=120)
        pids = {f"{r.engine}/{r.tp_rank}": r.process.pid for r in job.ranks}
        time.sleep(2.0)
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(seconds)
        return {name: 100 * (cpu_seconds(pid) - before[name]) / seconds for name, pid in pids.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/results/elastic-{device}.json")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    runs = []
    for index in range(args.runs):
        run = one_run(index)
        runs.append(run)
        print(f"run {index}: join -> first {run['join_to_first_s']:.2f}s (up -> first {run['up_to_first_s']:.3f}s), "
              f"restart -> first {run['restart_to_first_s']:.2f}s, kill: {run['lost_per_kill']}", flush=True)

    def summary(key: str) -> dict:
        values = [r[key] for r in runs]
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    idle = runs[0]["idle_cpu_percent"]
    result = {
        "benchmark": "elastic", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch": torch.__version__, "runs": runs,
        "join_to_first_s": summary("join_to_first_s"), "up_to_first_s": summary("up_to_first_s"),
        "restart_to_first_s": summary("restart_to_first_s"),
        "kills": {"runs": len(runs), "bound": sum(r["lost_per_kill"]["bound"] for r in runs),
                  "failed_bound": sum(r["lost_per_kill"]["failed_bound"] for r in runs),
                  "failed_others": sum(r["lost_per_kill"]["failed_others"] for r in runs)},
        "idle_cpu_percent": idle, "idle_cpu_percent_max": max(idle.values()),
        "targets": {"join_to_first_s": 2.0, "restart_to_first_s": 5.0, "idle_cpu_percent": 0.5},
    }
    path = Path(args.json.replace("{device}", "cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("join_to_first_s", "up_to_first_s", "restart_to_first_s", "kills",
                                              "idle_cpu_percent_max")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
