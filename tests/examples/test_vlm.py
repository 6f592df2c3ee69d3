"""A real (tiny, random) Qwen-VL split across embxfer behaves exactly like the monolithic model.

The encoder engine runs the vision tower and builds the payload; embxfer moves it (with
resumes, TP copies and dummy encoder ranks); the language engine prefills and decodes
from what arrived. Prefill logits must equal `model(input_ids, pixel_values,
image_grid_thw, mm_token_type_ids)` bit for bit, and the greedy tokens those of
`model.generate`. fp32 on the CPU; weights and inputs from fixed seeds.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip(
    "transformers", minversion="5.17",
    reason="the VLM example needs the 'examples' extra: pip install -e '.[examples]' (transformers>=5.17)",
)

from embxfer.runtime.topology import Topology  # noqa: E402
from examples.vlm.engines import Greedy, LanguageEngine  # noqa: E402
from examples.vlm.models import MODELS, build_model  # noqa: E402
from examples.vlm.pipeline import payload_mismatches, run_chat, run_split, small_pool_config  # noqa: E402
from examples.vlm.processor import Image, ProcessorOutput, Prompt, synthesize  # noqa: E402
from examples.vlm.reference import monolithic  # noqa: E402

# The first token comes from the prefill, each later one from a decode step: 9 decode steps.
MAX_NEW_TOKENS = 10

# Image sizes are multiples of patch_size * spatial_merge_size = 16 (tiny configs).
PROMPTS = {
    "one_image": Prompt("one_image", (12, Image(64, 96), 20)),
    "two_images": Prompt("two_images", (8, Image(48, 80), 10, Image(96, 64), 16)),
    # 690 tokens against a blind 256-token allocation in a 256-token pool: three rounds.
    "long": Prompt("long", (300, Image(160, 128), 250, Image(64, 64), 40)),
    "text_only": Prompt("text_only", (40,)),
}

CASES = [
    ("one_image", Topology(1, 1, 1)),
    ("two_images", Topology(1, 1, 1)),
    ("long", Topology(1, 1, 1)),
    ("two_images", Topology(1, 1, 2)),  # language TP 2: two identical copies
    ("two_images", Topology(1, 2, 1)),  # encoder TP rank 1 serves no language rank: a dummy
    ("long", Topology(1, 3, 2)),  # language TP 2, encoder rank 2 a dummy, with resumes
    ("text_only", Topology(1, 1, 1)),  # no image: zero deepstack rows, delta 0
]


def case_id(case: tuple[str, Topology]) -> str:
    prompt, t = case
    return f"{prompt}-enc{t.encoders}x{t.encoder_tp}-lang{t.language_tp}"


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return build_model(request.param, seed=0)


@pytest.fixture(scope="module")
def references(model):
    """Monolithic runs, computed once per (model, prompt)."""
    cache: dict[str, tuple[ProcessorOutput, Greedy]] = {}

    def get(prompt_name: str) -> tuple[ProcessorOutput, Greedy]:
        if prompt_name not in cache:
            inputs = synthesize(model.config, MODELS[model.config.model_type], PROMPTS[prompt_name], seed=1)
            cache[prompt_name] = (inputs, monolithic(model, inputs, MAX_NEW_TOKENS))
        return cache[prompt_name]

    return get


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_split_model_matches_monolithic(model, references, case) -> None:
    prompt_name, topology = case
    inputs, reference = references(prompt_name)
    config = small_pool_config()
    run = run_split(model, inputs, topology, config, MAX_NEW_TOKENS)

    assert len(run.copies) == topology.language_tp
    for rank, copy in enumerate(run.copies):
        assert payload_mismatches(run.payload, copy) == [], f"language rank {rank}"
    if prompt_name == "long":
        assert inputs.num_tokens > 2 * config.default_alloc_tokens
        assert run.stats["resumes"] >= 2, run.stats

    for rank, split in enumerate(run.ranks):
        where = f"{model.config.model_type} {case_id(case)} language rank {rank}"
        assert torch.equal(split.prefill_logits, reference.prefill_logits), where
        assert len(split.tokens) == MAX_NEW_TOKENS
        assert split.tokens.tolist() == reference.tokens.tolist(), where
        # generate computes its first logits for the last position only (logits_to_keep=1),
        # a matmul of another shape that may round differently from the full forward.
        torch.testing.assert_close(split.step_logits[0], reference.step_logits[0], rtol=0, atol=1e-5)
        assert torch.equal(split.step_logits[1:], reference.step_logits[1:]), where


def test_every_field_is_needed(model, references) -> None:
    """Against vacuous passes: spoiling one field of a correct payload changes the output."""
    inputs, reference = references("two_images")
    payload = run_split(model, inputs, Topology(1, 1, 1), small_pool_config(), 1).copies[0]
    language = LanguageEngine(model)
    text_positions = torch.arange(inputs.num_tokens, dtype=torch.int32).expand(3, -1).contiguous()
    spoiled = {
        "mrope_positions": replace(payload, mrope_positions=text_positions),
        "mrope_delta": replace(payload, mrope_delta=0),
    }
    if payload.deepstack is not None:
        spoiled["deepstack"] = replace(payload, deepstack=torch.zeros_like(payload.deepstack))
    assert payload.mrope_delta != 0
    for field, bad in spoiled.items():
        out = language.generate(bad, 3)
        if field == "mrope_delta":  # the prompt is unchanged; only decode positions move
            assert torch.equal(out.prefill_logits, reference.prefill_logits)
            assert not torch.equal(out.step_logits[1:], reference.step_logits[1:3]), field
        else:
            assert not torch.equal(out.prefill_logits, reference.prefill_logits), field


def test_run_script(tmp_path) -> None:
    """examples/vlm/run.py, as the GPU check calls it (here on the CPU, one model, short)."""
    script = Path(__file__).resolve().parents[2] / "examples" / "vlm" / "run.py"
    out = tmp_path / "vlm.json"
    result = subprocess.run(
        [sys.executable, str(script), "--model", "qwen2_5_vl", "--device", "cpu", "--repeats", "1",
         "--new-tokens", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vlm example: ok" in result.stdout
    report = json.loads(out.read_text())
    assert report["ok"] and report["dtype"] == "fp32" and report["scale"] == "tiny"
    by_prompt = {case["prompt"]: case for case in report["cases"]}
    assert by_prompt["long"]["resumes"] >= 2
    assert all(rank["prefill_logits_max_abs_diff"] == 0.0 for case in report["cases"] for rank in case["ranks"])


def test_a_chats_second_turn_with_the_same_image_skips_it(model) -> None:
    """Turn 2 asks another question about the picture of turn 1 (the picture is more than
    90 % of its rows): the language side holds the picture, the encoder engine skips the
    vision tower for it and sends the text rows only; the language ranks put the picture's
    rows back, and the logits are the monolithic model's on turn 2, bit for bit."""
    family = MODELS[model.config.model_type]
    picture = Image(192, 256, seed=11)
    turns = [synthesize(model.config, family, Prompt("turn1", (10, picture, 6)), seed=1),
             synthesize(model.config, family, Prompt("turn2", (12, picture, 5)), seed=2)]
    config = replace(small_pool_config(), cache_bytes=64 << 20, language_pool_blocks=8)
    chat = run_chat(model, turns, Topology(1, 1, 2), config, MAX_NEW_TOKENS)
    first, second = chat
    image_rows = second.payload.items[0].count
    assert image_rows >= 0.9 * turns[1].num_tokens
    assert first.images_encoded == 1 and second.images_encoded == 0
    assert first.rows_sent == turns[0].num_tokens
    assert second.rows_sent == turns[1].num_tokens - image_rows  # the picture's rows stayed home
    reference = monolithic(model, turns[1], MAX_NEW_TOKENS)
    for rank, (copy, split) in enumerate(zip(second.copies, second.ranks, strict=True)):
        assert payload_mismatches(second.payload, copy) == [], f"language rank {rank}"
        assert torch.equal(split.prefill_logits, reference.prefill_logits), f"language rank {rank}"
        assert split.tokens.tolist() == reference.tokens.tolist()
