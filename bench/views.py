"""What one output view costs: the ways to cut a message's outputs into per-request tensors.

    python bench/rooms.py . bench/views.py [--device cuda] [--json bench/results/views-{device}.json]

`BlockPool.empty_rows_together` makes a message's outputs with one allocation per field and
hands each request views of it: its embeddings and fill ids by `split`, its mrope
positions `[3, n]` (a contiguous block of the whole's flat buffer) by `unbind` of one
strided `[k, 3, n]` view per run of equal counts. On the GPU hosts those views were the
largest single item of many_small's host profile (bench/results/pipeline-NOTES.md,
twentieth session), and the profile charged the mrope `unbind` about 2.7x a `split` per
view. This measures each way to make them, in microseconds per view made, for a message
of 52 requests of 256 tokens (D = 3584 on CUDA, 64 on a CPU), so that the choice is read
on the device it matters on. Prints one line per way; `--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import host_yardstick, result_path  # noqa: E402 - bench/pipeline.py, next to this file

REQUESTS, TOKENS = 52, 256


def ways(device: str) -> dict:
    """Name -> a call that cuts the views of one message (REQUESTS views each)."""
    k, n = REQUESTS, TOKENS
    dim = 3584 if device == "cuda" else 64
    embeddings = torch.empty(k * n, dim, dtype=torch.bfloat16, device=device)
    fill_ids = torch.empty(k * n, dtype=torch.int32, device=device)
    flat = torch.empty(3 * k * n, dtype=torch.int32, device=device)  # the whole's mrope, read flat
    counts = [n] * k
    return {
        "split (embeddings)": lambda: embeddings.split(counts),
        "split_with_sizes (embeddings)": lambda: embeddings.split_with_sizes(counts),
        "view [k, n, D] + unbind (embeddings)": lambda: embeddings.view(k, n, dim).unbind(0),
        "split (fill ids)": lambda: fill_ids.split(counts),
        "as_strided [k, 3, n] + unbind (mrope, as shipped)": lambda: flat.as_strided((k, 3, n), (3 * n, n, 1), 0).unbind(0),
        "view [k, 3, n] + unbind (mrope)": lambda: flat.view(k, 3, n).unbind(0),
        "as_strided per request (mrope)": lambda: [flat.as_strided((3, n), (n, 1), i * 3 * n) for i in range(k)],
        "split + view per request (mrope)": lambda: [x.view(3, n) for x in flat.split([3 * n] * k)],
    }


def measure(device: str, number: int) -> dict[str, float]:
    out = {}
    for name, cut in ways(device).items():
        cut()
        out[name] = timeit.timeit(cut, number=number) / number / REQUESTS * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--number", type=int, default=300, help="messages cut per way")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    yardstick = host_yardstick()
    costs = measure(args.device, args.number)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}: us per view, {REQUESTS} requests of {TOKENS} tokens a message (host yardstick {yardstick:.0f} us)")
    for way, us in costs.items():
        print(f"  {way:50s} {us:6.3f}")
    if args.json:
        result = {"benchmark": "views", "device": name, "torch": torch.__version__, "host_yardstick_us": yardstick,
                  "requests": REQUESTS, "tokens": TOKENS, "us_per_view": costs}
        result_path(args.json, name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
