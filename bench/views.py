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

It also times the allocation under the views (`allocations`): `BlockPool.empty_rows` makes
one `torch.empty` per field, three for a request without deepstack, where one byte buffer
cut by typed views would make one. On the 2-core CPU VM the single buffer costs twice the
three allocations (5.2 against 2.6 us: a CPU `torch.empty` costs about what a view does),
so it is only worth taking where a device allocation costs several views: the latency
case's one request of 1024 tokens and many_small's message of 52 x 256, microseconds per
set of outputs.
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


def one_buffer(tokens: int, dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outputs of `tokens` tokens from one byte buffer: the embeddings `[n, D]` bf16 at
    its start, the fill ids `[n]` and the mrope positions `[3, n]` int32 after them, each a
    contiguous typed view."""
    start = -(-tokens * dim * 2 // 256) * 256  # the int32 fields from a 256-byte boundary
    buffer = torch.empty(start + 16 * tokens, dtype=torch.uint8, device=device)
    words = buffer.view(torch.int32)
    return (buffer.view(torch.bfloat16).as_strided((tokens, dim), (dim, 1), 0),
            words.as_strided((tokens,), (1,), start // 4), words.as_strided((3, tokens), (tokens, 1), start // 4 + tokens))


def allocations(device: str) -> dict:
    """Name -> a call that makes one set of outputs, as shipped and from one buffer."""
    dim = 3584 if device == "cuda" else 64
    cases = {"latency, 1 x 1024": 1024, f"message, {REQUESTS} x {TOKENS}": REQUESTS * TOKENS}
    out = {}
    for case, n in cases.items():
        out[f"three torch.empty, as shipped ({case})"] = lambda n=n: (
            torch.empty(n, dim, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.int32, device=device),
            torch.empty(3, n, dtype=torch.int32, device=device))
        out[f"one byte buffer + typed views ({case})"] = lambda n=n: one_buffer(n, dim, device)
    return out


def measure(device: str, number: int) -> dict[str, float]:
    out = {}
    for name, cut in ways(device).items():
        cut()
        out[name] = timeit.timeit(cut, number=number) / number / REQUESTS * 1e6
    return out


def measure_allocations(device: str, number: int) -> dict[str, float]:
    """Microseconds per set of outputs, each way, the two ways alternated over 3 rounds
    (the best round: an allocation's cost, not the host's drift)."""
    made = allocations(device)
    best = dict.fromkeys(made, float("inf"))
    for _ in range(3):
        for name, make in made.items():
            make()
            best[name] = min(best[name], timeit.timeit(make, number=number) / number * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--number", type=int, default=300, help="messages cut per way")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    yardstick = host_yardstick()
    costs = measure(args.device, args.number)
    allocated = measure_allocations(args.device, args.number)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}: us per view, {REQUESTS} requests of {TOKENS} tokens a message (host yardstick {yardstick:.0f} us)")
    for way, us in costs.items():
        print(f"  {way:50s} {us:6.3f}")
    print("us per set of outputs (embeddings, fill ids, mrope positions):")
    for way, us in allocated.items():
        print(f"  {way:50s} {us:6.3f}")
    if args.json:
        result = {"benchmark": "views", "device": name, "torch": torch.__version__, "host_yardstick_us": yardstick,
                  "requests": REQUESTS, "tokens": TOKENS, "us_per_view": costs, "us_per_allocation": allocated}
        result_path(args.json, name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
