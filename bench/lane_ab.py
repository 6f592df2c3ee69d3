"""The lanes on and off, alternating in one process: bench/pipeline.py's batch and
many_small shapes through `LocalCluster`, with staging that holds whole requests or ends
messages inside them.

    python bench/lane_ab.py --lanes encoder --json bench/results/lane-ab-encoder-{device}.json

Each round builds one cluster with the lanes `--lanes` names on (language, encoder or
both: `receiver.LANE_ENABLED`, `sender.LANE_ENABLED`, read when an endpoint is made) and
one with both off, in alternating order, and times `--reps` batches on each after
two warm-ups: wall time and each side's host time per request (bench/pipeline.py's timers).
The staging sizes are given in tokens per message so that the CPU (D = 64) and a GPU
(D = 3584) cut messages alike, as bench/pipeline.py's 256 and 32 MiB do at D = 3584:
many_small's messages hold whole requests at 256 MiB (52 of them, 5 messages) and end
inside one at 32 MiB (18 a message); the batch case's (64 requests of 64..4096 tokens)
end inside one at both.

`--bookkeeping` (CPU only) replaces the data's copies (the reference kernels' pack,
unpack and read-out, the loopback wire's copy) by nothing: what is left is each side's
bookkeeping, which is what a GPU's host pays besides its launches (the CPU's reference
kernels cost a torch call per segment and field, a GPU launch one call a message).
Nothing is checked bit-exact then.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from embxfer.runtime import Config, receiver, sender
from embxfer.runtime.local import LocalCluster, random_payload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import result_path, time_engine_calls  # noqa: E402 - bench/pipeline.py, next to this file

BATCH = [random.Random(0).randint(64, 4096) for _ in range(64)]
CASES = {  # name: (lengths, staging tokens per message: what 256 / 32 MiB hold at D = 3584)
    "many_small_256MiB": ([256] * 256, 37_364),
    "many_small_32MiB": ([256] * 256, 4_670),
    "batch_256MiB": (BATCH, 37_364),
    "batch_32MiB": (BATCH, 4_670),
}


LANES = {"language": (True, False), "encoder": (False, True), "both": (True, True)}
BOOKKEEPING = False


def _bookkeeping_only() -> None:
    """No data copies from here on (`--bookkeeping`): the reference kernels and the
    loopback wire do nothing."""
    from embxfer.kernels import ops
    from embxfer.runtime import transport

    def nothing(*args, **kwargs) -> None:
        return None

    for name in ("pack_rows", "unpack_to_rows", "unpack_together", "unpack", "pack", "gather", "gather_addressed"):
        setattr(ops, name, nothing)  # (the runtime calls them as ops.NAME)

    def match(self, pair) -> None:
        sends, recvs = self._sends[pair], self._recvs[pair]
        while sends and recvs:
            (_, send_handle), (_, recv_handle) = sends.popleft(), recvs.popleft()
            send_handle.done = recv_handle.done = True

    transport.LoopbackHub._match = match


def one(device: torch.device, dim: int, lengths: list[int], tokens: int, lanes: tuple[bool, bool], reps: int) -> dict:
    config = Config(default_alloc_tokens=8192, language_pool_blocks=2048, staging_bytes=tokens * (2 * dim + 16))
    enabled = receiver.LANE_ENABLED, sender.LANE_ENABLED
    receiver.LANE_ENABLED, sender.LANE_ENABLED = lanes
    try:
        cluster = LocalCluster(config=config, dim=dim, device=device)
    finally:
        receiver.LANE_ENABLED, sender.LANE_ENABLED = enabled
    payloads = [random_payload(n, dim, seed=i, device=device) for i, n in enumerate(lengths)]
    next_id, walls, sides = 0, [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for rep in range(reps + 2):
        batch = {next_id + i: p for i, p in enumerate(payloads)}
        next_id += len(payloads)
        if rep == 2:
            spent = time_engine_calls(cluster)
        before = dict(spent) if rep >= 2 else None
        sync()
        started = time.perf_counter()
        taken = cluster.transfer(batch)
        sync()
        if rep == 0 and not BOOKKEEPING:
            assert all(copies[0].bit_equal(batch[rid]) for rid, copies in taken.items()), "not bit-exact"
        if rep >= 2:
            walls.append(time.perf_counter() - started)
            sides.append({side: spent[side] - before[side] for side in spent})
    cluster.close()
    n = len(lengths)
    return {"wall_us": 1e6 * statistics.median(walls) / n,
            **{f"{side}_us": 1e6 * statistics.median(s[side] for s in sides) / n for side in ("encoder", "language")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/results/lane-ab-{device}.json")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dim", type=int, default=None, help="D (default: 3584 on a GPU, 64 on the CPU)")
    parser.add_argument("--bookkeeping", action="store_true", help="no data copies (CPU; see the docstring)")
    parser.add_argument("--lanes", choices=sorted(LANES), default="language",
                        help="the lanes on in the 'lane' runs (the 'objects' runs have none)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.bookkeeping:
        if cuda:
            parser.error("--bookkeeping is for the CPU")
        global BOOKKEEPING
        BOOKKEEPING = True
        _bookkeeping_only()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    dim = args.dim or (3584 if cuda else 64)
    torch.set_num_threads(1)
    out = {"benchmark": "lane_ab", "device": name, "dim": dim, "lanes": args.lanes, "bookkeeping": args.bookkeeping,
           "cases": {}}
    print(f"{name}, D = {dim}: per request (us), with the {args.lanes} lane(s) / without; ratios of the wall, "
          "language side, encoder side")
    for case, (lengths, tokens) in CASES.items():
        rounds = []
        for r in range(args.rounds):
            pair = {}
            for lane in ((True, False) if r % 2 else (False, True)):
                gc.collect()
                pair["lane" if lane else "objects"] = one(device, dim, lengths, tokens,
                                                          LANES[args.lanes] if lane else (False, False), args.reps)
            rounds.append(pair)
        ratios = {f"{side}_ratio_median": statistics.median(p["lane"][f"{side}_us"] / p["objects"][f"{side}_us"]
                                                            for p in rounds)
                  for side in ("wall", "language", "encoder")}
        out["cases"][case] = {"requests": len(lengths), "tokens_per_message": tokens, "rounds": rounds, **ratios}
        print(f"  {case:17s} ratios {ratios['wall_ratio_median']:.3f} / {ratios['language_ratio_median']:.3f} / "
              f"{ratios['encoder_ratio_median']:.3f}: " + "; ".join(
            f"{p['lane']['wall_us']:.1f}/{p['objects']['wall_us']:.1f}" for p in rounds))
    path = result_path(args.json, name)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
