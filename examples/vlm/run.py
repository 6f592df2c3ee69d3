"""Compare the split model (encoder engine -> embxfer -> language engine) with the monolithic one.

    python examples/vlm/run.py                                   # both models, CPU fp32, tiny
    python examples/vlm/run.py --model qwen3_vl --device cuda --dtype bf16 --json OUT.json

For every case (a prompt and an encoder/language layout) it runs the monolithic model
`--repeats` times to measure its own run-to-run spread, then the split model, and checks on
every language TP rank: the payload arrived exactly, the greedy tokens are the monolithic
ones, and the prefill and decode logits differ from the monolithic ones by no more than the
monolithic model differs from itself (on a CPU in fp32 both spreads are 0: equality).
Exit status 0 when every case passes, 1 otherwise. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable so `examples.vlm` resolves. It
    # goes last so that an installed embxfer wins over the repository's bare embxfer/ folder.
    sys.path.append(str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers (and huggingface_hub) load

import torch  # noqa: E402
import transformers  # noqa: E402

from embxfer.runtime.topology import Topology  # noqa: E402
from examples.vlm.engines import Greedy  # noqa: E402
from examples.vlm.models import MODELS, SCALES, build_model  # noqa: E402
from examples.vlm.pipeline import payload_mismatches, run_split, small_pool_config  # noqa: E402
from examples.vlm.processor import Image, Prompt, synthesize  # noqa: E402
from examples.vlm.reference import monolithic  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prompts(config: transformers.PreTrainedConfig) -> dict[str, Prompt]:
    """The test prompts, with image sizes in merge windows (one window = one visual token)."""
    factor = config.vision_config.patch_size * config.vision_config.spatial_merge_size

    def image(rows: int, cols: int) -> Image:
        return Image(rows * factor, cols * factor)

    return {
        "one_image": Prompt("one_image", (12, image(4, 6), 20)),
        "two_images": Prompt("two_images", (8, image(3, 5), 10, image(6, 4), 16)),
        "long": Prompt("long", (300, image(10, 8), 250, image(4, 4), 40)),
        "large": Prompt("large", (1000, image(30, 40), 500, image(20, 20), 100)),
    }


CASES = [
    ("one_image", Topology(1, 1, 1)),
    ("two_images", Topology(1, 1, 2)),
    ("two_images", Topology(1, 2, 1)),
    ("long", Topology(1, 3, 2)),
    ("large", Topology(1, 2, 2)),
]


def device_label(device: torch.device) -> str:
    """A short name for file names: the GPU's model ("h200") or "cpu"."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    model = re.search(r"\b([a-z]\d{2,3}[a-z]?)\b", name)
    return model.group(1) if model else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def run_case(model: torch.nn.Module, name: str, prompt: Prompt, topology: Topology, *,
             max_new_tokens: int, repeats: int, seed: int) -> dict:
    family = MODELS[name]
    inputs = synthesize(model.config, family, prompt, seed=seed)
    references: list[Greedy] = [monolithic(model, inputs, max_new_tokens) for _ in range(repeats)]
    reference = references[0]
    # The monolithic model against itself: how far two identical runs may land apart.
    prefill_spread = max(max_abs_diff(r.prefill_logits, reference.prefill_logits) for r in references)
    decode_spread = max(max_abs_diff(r.step_logits[1:], reference.step_logits[1:]) for r in references)
    reference_tokens_stable = all(torch.equal(r.tokens, reference.tokens) for r in references)

    config = small_pool_config()
    started = time.perf_counter()
    split = run_split(model, inputs, topology, config, max_new_tokens)
    split_seconds = time.perf_counter() - started

    ranks = []
    for rank, (copy, greedy) in enumerate(zip(split.copies, split.ranks, strict=True)):
        prefill_diff = max_abs_diff(greedy.prefill_logits, reference.prefill_logits)
        decode_diff = max_abs_diff(greedy.step_logits[1:], reference.step_logits[1:])
        mismatched = payload_mismatches(split.payload, copy)
        tokens_equal = greedy.tokens.tolist() == reference.tokens.tolist()
        ranks.append({
            "rank": rank,
            "payload_mismatches": mismatched,
            "tokens": greedy.tokens.tolist(),
            "tokens_equal": tokens_equal,
            "prefill_logits_max_abs_diff": prefill_diff,
            "decode_logits_max_abs_diff": decode_diff,
            "ok": (not mismatched and tokens_equal and prefill_diff <= prefill_spread
                   and decode_diff <= decode_spread),
        })
    payload = split.payload
    return {
        "model": name,
        "prompt": prompt.name,
        "topology": {"encoders": topology.encoders, "encoder_tp": topology.encoder_tp,
                     "language_tp": topology.language_tp},
        "prompt_tokens": inputs.num_tokens,
        "visual_tokens": int((inputs.mm_token_type_ids != 0).sum()),
        "images": [list(g) for g in inputs.image_grid_thw.tolist()],
        "mrope_delta": payload.mrope_delta,
        "deepstack_layers": 0 if payload.deepstack is None else payload.deepstack.shape[1] // payload.embeddings.shape[1],
        "resumes": split.stats["resumes"],
        "rounds": split.stats["rounds"],
        "split_seconds": split_seconds,
        "reference_tokens": reference.tokens.tolist(),
        "reference_tokens_stable": reference_tokens_stable,
        "run_to_run_prefill_max_abs_diff": prefill_spread,
        "run_to_run_decode_max_abs_diff": decode_spread,
        # generate computes its first logits for the last position only: a matmul of another
        # shape than the full forward's, so it may round differently (reported, not judged).
        "generate_vs_forward_first_logits_max_abs_diff": max_abs_diff(
            reference.step_logits[0], reference.prefill_logits[-1]),
        "ranks": ranks,
        "ok": reference_tokens_stable and len(ranks) == topology.language_tp and all(r["ok"] for r in ranks),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*sorted(MODELS), "all"], default="all")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--scale", choices=SCALES, default=None,
                        help="model size; default: small on a GPU, tiny on the CPU")
    parser.add_argument("--new-tokens", type=int, default=10, help="greedy tokens per case (default 10)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="monolithic runs per case, to measure its run-to-run spread (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the prompts (weights: seed 0)")
    parser.add_argument("--json", default=None,
                        help="write the results here; {device} becomes the GPU's model (h200) or cpu")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.scale = args.scale or ("small" if on_gpu else "tiny")
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("expected --new-tokens >= 2 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = sorted(MODELS) if args.model == "all" else [args.model]
    device = torch.device(args.device)
    results = []
    for name in names:
        model = build_model(name, scale=args.scale, dtype=DTYPES[args.dtype], device=device, seed=0)
        for prompt_name, topology in CASES:
            prompt = prompts(model.config)[prompt_name]
            result = run_case(model, name, prompt, topology, max_new_tokens=args.new_tokens,
                              repeats=args.repeats, seed=args.seed)
            results.append(result)
            worst_prefill = max(r["prefill_logits_max_abs_diff"] for r in result["ranks"])
            worst_decode = max(r["decode_logits_max_abs_diff"] for r in result["ranks"])
            print(f"{name} {prompt_name:10s} enc {topology.encoder_tp} lang {topology.language_tp}: "
                  f"{result['prompt_tokens']} tokens ({result['visual_tokens']} visual), "
                  f"delta {result['mrope_delta']}, resumes {result['resumes']}, "
                  f"prefill diff {worst_prefill:.3g} (self {result['run_to_run_prefill_max_abs_diff']:.3g}), "
                  f"decode diff {worst_decode:.3g} (self {result['run_to_run_decode_max_abs_diff']:.3g}), "
                  f"tokens {'equal' if all(r['tokens_equal'] for r in result['ranks']) else 'DIFFER'}: "
                  f"{'ok' if result['ok'] else 'MISMATCH'}", flush=True)
        del model
    ok = all(r["ok"] for r in results)
    report = {
        "ok": ok,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "dtype": args.dtype,
        "scale": args.scale,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "config": {k: v for k, v in vars(small_pool_config()).items()
                   if k in ("block_size", "default_alloc_tokens", "language_pool_blocks", "staging_bytes")},
        "cases": results,
    }
    if args.json is not None:
        path = Path(args.json.replace("{device}", device_label(device)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    print(f"vlm example: {'ok' if ok else 'MISMATCH'} ({sum(r['ok'] for r in results)}/{len(results)} cases)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
