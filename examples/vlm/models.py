"""Tiny random Qwen-VL models, built in code from their `transformers` config classes.

Two families: Qwen3-VL (deepstack: merged features of some vision layers are added to the
hidden states of the first decoder layers) and Qwen2.5-VL (no deepstack, window attention
in the vision tower). Both use multimodal rotary positions (mrope). Each comes in two
scales: `tiny` for the CPU tests (seconds) and `small` for the GPU check (real head size
and mrope sections, hidden size 1024).

The four special token ids (image, video, vision start, vision end) sit at the top of a
small vocabulary; `text_vocab_size(config)` is where ordinary text ids end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

SCALES = ("tiny", "small")

# Per-channel normalization of the models' image processors (Qwen2.5-VL keeps CLIP's).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_class: type[PreTrainedModel]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    has_deepstack: bool

    def config(self, scale: str = "tiny") -> PreTrainedConfig:
        if scale not in SCALES:
            raise ValueError(f"scale={scale!r}: expected one of {SCALES}")
        builder = _qwen3_vl_config if self.name == "qwen3_vl" else _qwen2_5_vl_config
        return builder(scale)


MODELS: dict[str, ModelFamily] = {
    "qwen3_vl": ModelFamily("qwen3_vl", Qwen3VLForConditionalGeneration,
                            (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), has_deepstack=True),
    "qwen2_5_vl": ModelFamily("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration,
                              _CLIP_MEAN, _CLIP_STD, has_deepstack=False),
}


def _vocab_and_special_ids(scale: str) -> dict[str, int]:
    vocab_size = 512 if scale == "tiny" else 8192
    return {
        "vocab_size": vocab_size,
        "image_token_id": vocab_size - 4,
        "video_token_id": vocab_size - 3,
        "vision_start_token_id": vocab_size - 2,
        "vision_end_token_id": vocab_size - 1,
    }


def _text_shape(scale: str) -> dict:
    # mrope_section splits head_dim / 2 rotary frequencies into (t, h, w) parts.
    if scale == "tiny":
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3])
    return dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, mrope_section=[24, 20, 20])


def _qwen3_vl_config(scale: str) -> Qwen3VLConfig:
    ids = _vocab_and_special_ids(scale)
    text = _text_shape(scale)
    mrope_section = text.pop("mrope_section")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text_config = dict(
        text, vocab_size=ids.pop("vocab_size"), head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5,
                         "mrope_section": mrope_section, "mrope_interleaved": True},
    )
    if scale == "tiny":
        vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                             patch_size=8, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    else:
        vision_config = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4,
                             patch_size=16, num_position_embeddings=2304,
                             deepstack_visual_indexes=[0, 1, 2])
    vision_config.update(in_channels=3, spatial_merge_size=2, temporal_patch_size=2,
                         out_hidden_size=text["hidden_size"])
    return Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **ids)


def _qwen2_5_vl_config(scale: str) -> Qwen2_5_VLConfig:
    ids = _vocab_and_special_ids(scale)
    text = _text_shape(scale)
    mrope_section = text.pop("mrope_section")
    text_config = dict(
        text, vocab_size=ids.pop("vocab_size"), bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
    )
    # window_size is in pixels: windows of window_size // patch_size // spatial_merge_size
    # merged tokens a side; the blocks in fullatt_block_indexes attend across the image.
    if scale == "tiny":
        vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                             patch_size=8, window_size=32, fullatt_block_indexes=[1])
    else:
        vision_config = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4,
                             patch_size=14, window_size=112, fullatt_block_indexes=[3])
    vision_config.update(in_channels=3, spatial_merge_size=2, temporal_patch_size=2,
                         tokens_per_second=2, out_hidden_size=text["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **ids)


def text_vocab_size(config: PreTrainedConfig) -> int:
    """Ids below this are ordinary text tokens."""
    return min(config.image_token_id, config.video_token_id,
               config.vision_start_token_id, config.vision_end_token_id)


def build_model(name: str, *, scale: str = "tiny", dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", seed: int = 0) -> PreTrainedModel:
    """A random model in eval mode. The weights are drawn on the CPU in fp32 from `seed`, so
    every device and dtype starts from the same numbers."""
    if name not in MODELS:
        raise ValueError(f"model={name!r}: expected one of {sorted(MODELS)}")
    family = MODELS[name]
    config = family.config(scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.model_class(config)
    return model.to(device=device, dtype=dtype).eval()
