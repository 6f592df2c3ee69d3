"""Reuse per multimodal item: what a chat's second turn about the same picture saves, and
what the item path costs when nothing is cached.

    python bench/items.py --device cpu  --json bench/results/items-cpu.json
    python bench/items.py --device cuda --json bench/results/items-{device}.json

One process, `LocalCluster` (the real Sender/Receiver state machines, loopback wire; the
bytes it moves are the bytes NCCL or gloo would move). The encoder engine runs a stand-in
vision model (two `[D, D]` linear layers over the picture's rows) and asks
`lookup_items` before it runs it: a picture the language side holds is skipped, its
rows neither computed nor sent.

chat: turn 1 = 64 text rows + a picture of P rows + 32 text rows; turn 2 = a longer
  prompt (96 text rows before the same picture, 48 after): the picture is >= 90 % of the
  rows. Reported per turn: rows and bytes on the wire, vision-model time, transfer time
  (admit + submit -> take, data on the device), and turn 2 again with reuse switched off
  (neither side names the picture: the encoder computes and sends everything). Each turn-2 copy is checked bit-exact
  against the full payload. `wire_fall` (1 - bytes with reuse / bytes without) is
  compared with `item_share` (the picture's rows / all rows). One cluster serves every
  repetition (each names its picture by a hash of its own, so turn 1 always misses), as
  an engine does: the times are the steady state. The first repetition, on the fresh
  cluster, is reported apart (`first_turn_ms`): it pays each new message shape's
  one-off costs (on CUDA the launch routes and the graph captures of the first messages
  with a skipped item).
cost: one request of P + 96 rows at a time, (a) no items named, (b) the same rows named
  as one item with a new hash each time (a miss: the language side caches it, copying
  its rows and evicting older ones), (c) as b with caching off (the item path without
  the copy), interleaved a, b, c, a, b, c...; p50 and p99 of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from embxfer.runtime import Config
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.payload import Item, Payload
from embxfer.runtime.state import RequestState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import result_path  # noqa: E402 - bench/pipeline.py, next to this file


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Chat:
    """An encoder engine with a stand-in vision model, one language engine (TP `tp`)."""

    def __init__(self, dim: int, picture_rows: int, tp: int, device: str) -> None:
        from embxfer.runtime.topology import Topology

        self.dim, self.device = dim, device
        config = Config(block_size=64, default_alloc_tokens=4096, language_pool_blocks=512,
                        staging_bytes=64 << 20, cache_bytes=1 << 30)
        self.cluster = LocalCluster(Topology(1, 1, tp), config, dim=dim, device=device)
        gen = torch.Generator().manual_seed(0)
        self.layers = [(torch.randn(dim, dim, generator=gen) / dim**0.5).to(device, torch.bfloat16) for _ in range(2)]
        self.pixels = torch.randn(picture_rows, dim, generator=gen).to(device, torch.bfloat16)
        self.texts: dict[tuple[int, int, int], Payload] = {}

    def vision(self) -> torch.Tensor:
        rows = self.pixels
        for weight in self.layers:
            rows = torch.nn.functional.gelu(rows @ weight)
        return rows

    def prompt(self, seed: int, before: int, after: int, picture: torch.Tensor | None,
               picture_hash: bytes = b"picture") -> tuple[Payload, list[Item]]:
        """Text rows, the picture (positions counted from where it starts), text rows."""
        count = self.pixels.shape[0]
        text = self.texts.get((seed, before, after))
        if text is None:
            text = self.texts[seed, before, after] = random_payload(before + after, self.dim, seed=seed,
                                                                    device=self.device)
        rows = torch.empty(before + count + after, self.dim, dtype=torch.bfloat16, device=self.device)
        rows[:before], rows[before + count:] = text.embeddings[:before], text.embeddings[before:]
        if picture is not None:
            rows[before:before + count] = picture
        fill = torch.full((before + count + after,), 151655, dtype=torch.int32, device=self.device)
        fill[:before], fill[before + count:] = text.fill_ids[:before], text.fill_ids[before:]
        positions = torch.arange(before + count + after, dtype=torch.int32, device=self.device).expand(3, -1).clone()
        grid = torch.arange(count, dtype=torch.int32, device=self.device)
        positions[1, before:before + count] = before + grid // 32
        positions[2, before:before + count] = before + grid % 32
        items = [Item(picture_hash, before, count)]
        return Payload(rows, fill, positions, 5, items=items), items

    def turn(self, rid: int, before: int, after: int, *, reuse: bool, picture_hash: bytes) -> dict:
        cluster = self.cluster
        sender = cluster.senders[0]
        bytes_before, tokens_before = cluster.p2p.bytes, sender.stats.tokens
        self.prompt(rid, before, after, None)  # the text rows exist before the clock starts
        sync(self.device)
        started = time.perf_counter()
        _, items = self.prompt(rid, before, after, None, picture_hash)
        if not reuse:
            items = []  # neither side names the picture: everything is computed and sent
        for receiver in cluster.receivers.values():
            receiver.admit(rid, 0, items=items)
        for _ in range(3):
            cluster.step()  # the held items reach the encoder engine
        held = sender.lookup_items(rid)
        vision_started = time.perf_counter()
        picture = None if picture_hash in held else self.vision()
        sync(self.device)
        vision_s = time.perf_counter() - vision_started
        payload, _ = self.prompt(rid, before, after, picture, picture_hash)
        if not reuse:
            payload = Payload(payload.embeddings, payload.fill_ids, payload.mrope_positions, payload.mrope_delta)
        sender.submit(rid, payload)
        cluster.run_until(lambda: all(s.terminal for s in cluster.states(rid)))
        copies = [r.take(rid) for r in cluster.receivers.values()]
        sync(self.device)
        elapsed = time.perf_counter() - started
        cluster.run_until(lambda: sender.state(rid).terminal)
        sender.release(rid)
        cluster.settle()
        full, _ = self.prompt(rid, before, after, self.vision(), picture_hash)
        if not reuse:
            full = Payload(full.embeddings, full.fill_ids, full.mrope_positions, full.mrope_delta)
        for copy in copies:
            if copy is None or not copy.bit_equal(full):
                raise SystemExit(f"chat: request {rid} is not bit-exact")
        rows = payload.num_tokens
        return {"rows": rows, "picture_rows": self.pixels.shape[0], "skipped": bool(held),
                "rows_sent": sender.stats.tokens - tokens_before, "wire_bytes": cluster.p2p.bytes - bytes_before,
                "vision_s": vision_s, "turn_s": elapsed}


def chat_case(dim: int, picture_rows: int, tp: int, device: str, reps: int) -> dict:
    turns = {"turn1": [], "turn2": [], "turn2_no_reuse": []}
    rid = 0
    chat = Chat(dim, picture_rows, tp, device)
    for rep in range(reps + 1):  # the first repetition meets every shape for the first time
        picture_hash = b"picture-%d" % rep  # a new picture to the cache: turn 1 misses
        turns["turn1"].append(chat.turn(rid := rid + 1, 64, 32, reuse=True, picture_hash=picture_hash))
        turns["turn2"].append(chat.turn(rid := rid + 1, 96, 48, reuse=True, picture_hash=picture_hash))
        turns["turn2_no_reuse"].append(chat.turn(rid := rid + 1, 96, 48, reuse=False, picture_hash=picture_hash))
    out = {"case": "chat", "dim": dim, "language_tp": tp}
    for name, runs in turns.items():
        first, runs = runs[0], runs[1:]
        last = runs[-1]
        out[name] = {"rows": last["rows"], "rows_sent": last["rows_sent"], "wire_bytes": last["wire_bytes"],
                     "skipped": last["skipped"],
                     "vision_ms": 1e3 * statistics.median(r["vision_s"] for r in runs),
                     "turn_ms": 1e3 * statistics.median(r["turn_s"] for r in runs),
                     "first_turn_ms": 1e3 * first["turn_s"]}
    second, full = out["turn2"], out["turn2_no_reuse"]
    out["item_share"] = picture_rows / second["rows"]
    out["wire_fall"] = 1 - second["wire_bytes"] / full["wire_bytes"]
    out["rows_fall"] = 1 - second["rows_sent"] / full["rows_sent"]
    return out


def cost_case(dim: int, picture_rows: int, device: str, reps: int) -> dict:
    """One request at a time, interleaved: no items; one item that misses and is cached
    (the language side copies its rows, evicting older items); one item that misses with
    caching off (`cache_bytes=0`: the item path alone, no copy)."""
    def make(cache_bytes: int) -> LocalCluster:
        return LocalCluster(config=Config(block_size=64, default_alloc_tokens=4096, language_pool_blocks=512,
                                          staging_bytes=64 << 20, cache_bytes=cache_bytes), dim=dim, device=device)

    cached, uncached = make((picture_rows * dim * 2 + 4096) * 4), make(0)
    variants = {"no_items": (cached, False), "item_miss": (cached, True), "item_no_cache": (uncached, True)}
    base = random_payload(picture_rows + 96, dim, seed=1, device=device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(len(variants) * (reps + 20)):
        name = list(variants)[rep % len(variants)]
        cluster, named = variants[name]
        sender, leader = cluster.senders[0], cluster.leader
        items = [Item(rep.to_bytes(8, "little"), 32, picture_rows)] if named else []
        payload = Payload(base.embeddings, base.fill_ids, base.mrope_positions, base.mrope_delta, items=items)
        sync(device)
        started = time.perf_counter()
        for receiver in cluster.receivers.values():
            receiver.admit(rep, 0, items=items)
        sender.submit(rep, payload)
        while leader.state(rep) is not RequestState.SUCCESS:
            cluster.step()
        taken = leader.take(rep)
        sync(device)
        elapsed = time.perf_counter() - started
        cluster.settle()
        sender.release(rep)
        if rep < len(variants) and not taken.bit_equal(payload):
            raise SystemExit(f"cost {name}: not bit-exact")
        if rep >= len(variants) * 20:
            times[name].append(elapsed)
    out = {"case": "cost", "dim": dim, "rows": base.num_tokens, "item_rows": picture_rows,
           "items_cached": len(cached.leader.cache.entries)}
    for name, values in times.items():
        values.sort()
        out[name] = {"p50_us": 1e6 * statistics.median(values),
                     "p99_us": 1e6 * values[min(len(values) - 1, int(0.99 * len(values)))]}
    out["p50_ratio"] = out["item_miss"]["p50_us"] / out["no_items"]["p50_us"]
    out["p50_ratio_no_cache"] = out["item_no_cache"]["p50_us"] / out["no_items"]["p50_us"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench/results/items-{device}.json")
    parser.add_argument("--dim", type=int, default=None, help="hidden size (default 3584 on CUDA, 1024 on CPU)")
    parser.add_argument("--picture-rows", type=int, default=1600)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cost-reps", type=int, default=200)
    args = parser.parse_args(argv)
    device = args.device
    dim = args.dim or (3584 if device == "cuda" else 1024)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    cases = [chat_case(dim, args.picture_rows, tp, device, args.reps) for tp in (1, 2)]
    cases.append(cost_case(dim, args.picture_rows, device, args.cost_reps))
    path = result_path(args.json, name)
    path.write_text(json.dumps({"benchmark": "items", "device": name, "torch": torch.__version__,
                                "cases": cases}, indent=2))
    print(f"{name}: D = {dim}, picture {args.picture_rows} rows")
    for case in cases:
        if case["case"] == "chat":
            t1, t2, t2n = case["turn1"], case["turn2"], case["turn2_no_reuse"]
            print(f"  chat TP{case['language_tp']}: picture {case['item_share']:.1%} of turn 2's rows; "
                  f"wire bytes turn 2 {t2['wire_bytes'] / 1e6:.2f} MB vs {t2n['wire_bytes'] / 1e6:.2f} MB without reuse "
                  f"(-{case['wire_fall']:.1%}); vision {t1['vision_ms']:.2f} ms -> {t2['vision_ms']:.3f} ms; "
                  f"turn {t2n['turn_ms']:.2f} -> {t2['turn_ms']:.2f} ms (first use on a fresh cluster "
                  f"{t2n['first_turn_ms']:.2f} -> {t2['first_turn_ms']:.2f} ms)")
        else:
            print(f"  cost {case['rows']} rows: p50 no items {case['no_items']['p50_us']:.0f} us, "
                  f"one item missed and cached {case['item_miss']['p50_us']:.0f} us (x{case['p50_ratio']:.3f}), "
                  f"missed, caching off {case['item_no_cache']['p50_us']:.0f} us (x{case['p50_ratio_no_cache']:.3f}); "
                  f"p99 {case['no_items']['p99_us']:.0f} / {case['item_miss']['p99_us']:.0f} / "
                  f"{case['item_no_cache']['p99_us']:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
