"""The per-request floor of the engine-facing API: what any runtime behind today's calls
pays for each request, however its bookkeeping is kept.

    python bench/floor.py --json bench/results/floor-{device}.json

The API hands requests in and out as Python objects: `submit` takes a `Payload` whose
tensors must be checked and whose rows must be addressed, `take` hands out a `Payload` of
three tensors of its own. These costs stay with any design of the bookkeeping in between
(issue 18's "requests as rows" included). This benchmark times them alone, with the
runtime's own functions, for bench/pipeline.py's many_small shape (256 requests of 256
tokens, D = 3584, bf16; CUDA when there is one), so that a side's host time per request
(`bench/pipeline.py`, `*_host_us_per_request`) splits into this floor and the rest:

  encoder   the id checked, the payload checked against the endpoint's row spec
            (`RowSpec.check_payload`), its row addresses read (`ops.row_addresses`, CUDA
            only), the request remembered (one dict entry)
  language  the id checked and remembered at admit; the outputs of a message's requests
            made together (`BlockPool.empty_rows_together`, one allocation per field and a
            view per field and request); the `Payload` made at take and the id forgotten

Each figure is the median over repetitions of one pass over the 256 requests, per request.
Per-message costs (a kernel launch on each side, a wire call) are not in it: see
bench/kernels.py (host per launch) and bench/pipeline.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from embxfer.kernels import ops
from embxfer.runtime.endpoint import check_request_id
from embxfer.runtime.local import random_payload
from embxfer.runtime.payload import Payload, RowSpec
from embxfer.runtime.pool import BlockPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import result_path  # noqa: E402 - bench/pipeline.py, next to this file

REQUESTS, TOKENS, DIM = 256, 256, 3584
PER_MESSAGE = 51  # bench/pipeline.py's many_small: 5 messages of 256 MiB for 256 requests


def _median_per_request(work, reps: int) -> float:
    for _ in range(3):
        work()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times) / REQUESTS


def measure(device: torch.device, reps: int) -> dict:
    payloads = [random_payload(TOKENS, DIM, seed=i, device=device) for i in range(REQUESTS)]
    spec = RowSpec(DIM, 0, torch.bfloat16, device)
    pool = BlockPool(1, 16, DIM, torch.bfloat16, 0, device)
    cuda = device.type == "cuda"
    ids = list(range(1 << 40, (1 << 40) + REQUESTS))

    def encoder() -> None:
        held = {}
        for request_id, payload in zip(ids, payloads, strict=True):
            check_request_id(request_id)
            spec.check_payload(payload, "encoder")
            held[request_id] = ops.row_addresses(payload) if cuda else payload

    def language_admit() -> None:
        held = {}
        for request_id in ids:
            held[check_request_id(request_id)] = None

    def language_outputs() -> list:
        views = []
        for start in range(0, REQUESTS, PER_MESSAGE):
            count = min(PER_MESSAGE, REQUESTS - start)
            views.extend(pool.empty_rows_together([TOKENS] * count)[1])
        return views

    outputs = language_outputs()

    def language_take() -> list:
        held = dict.fromkeys(ids)
        taken = []
        for request_id, rows in zip(ids, outputs, strict=True):
            held.pop(request_id)
            taken.append(Payload._trusted(rows[0], rows[1], rows[2], 0, rows[3]))
        return taken

    out = {"encoder_us": _median_per_request(encoder, reps),
           "language_admit_us": _median_per_request(language_admit, reps),
           "language_outputs_us": _median_per_request(language_outputs, reps),
           "language_take_us": _median_per_request(language_take, reps)}
    out["language_us"] = out["language_admit_us"] + out["language_outputs_us"] + out["language_take_us"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/results/floor-{device}.json")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="times the whole measurement is repeated")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rounds = [measure(device, args.reps) for _ in range(args.rounds)]
    result = {"benchmark": "floor", "device": name, "torch": torch.__version__, "requests": REQUESTS,
              "tokens": TOKENS, "dim": DIM, "per_message": PER_MESSAGE, "rounds": rounds}
    path = result_path(args.json, name)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: the API's floor per request, {REQUESTS} x {TOKENS} x {DIM} (us; one line per round)")
    for r in rounds:
        print(f"  encoder {r['encoder_us']:.2f}   language {r['language_us']:.2f} (admit {r['language_admit_us']:.2f}, "
              f"outputs {r['language_outputs_us']:.2f}, take {r['language_take_us']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
