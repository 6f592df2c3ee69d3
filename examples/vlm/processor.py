"""What a Qwen-VL processor hands the encoder engine, synthesized without a tokenizer or PIL.

The real processor (tokenizer + image processor) turns a chat message into:

- `input_ids [1, S]`: the text's token ids, each image spelled as
  `<vision_start> <image_pad> * n <vision_end>` with `n = t * h * w / merge**2`;
- `mm_token_type_ids [1, S]`: 0 for text, 1 for image placeholders (2 for video);
- `pixel_values [sum(t * h * w), C * temporal_patch * patch * patch]`: every image cut into
  `patch x patch` squares, the squares of one `merge x merge` window consecutive, each square
  flattened as `[C, temporal_patch, patch, patch]` (a still image repeats its one frame
  `temporal_patch` times);
- `image_grid_thw [images, 3]`: `(t, h, w)` of each image in patches.

Here the text ids are random, the images random pixels already at a size the processor's
resize would produce (a multiple of `patch * merge` on both sides), normalized with the
model's mean and standard deviation and cut into patches in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig

from .models import ModelFamily, text_vocab_size


@dataclass(frozen=True)
class Image:
    """An image of `height x width` pixels (after the processor's resize); with `seed`, its
    pixels come from that seed alone, so the same image can appear in several prompts (a
    chat's turns)."""

    height: int
    width: int
    seed: int | None = None


@dataclass(frozen=True)
class Prompt:
    """A user turn: `int` segments are that many text tokens, `Image` segments an image."""

    name: str
    segments: tuple[int | Image, ...]

    @property
    def images(self) -> list[Image]:
        return [s for s in self.segments if isinstance(s, Image)]


@dataclass(frozen=True)
class ProcessorOutput:
    input_ids: torch.Tensor  # [1, S] int64
    mm_token_type_ids: torch.Tensor  # [1, S] int32
    pixel_values: torch.Tensor | None  # [patches, C * temporal_patch * patch * patch] float32
    image_grid_thw: torch.Tensor | None  # [images, 3] int64

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> ProcessorOutput:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ProcessorOutput(move(self.input_ids), move(self.mm_token_type_ids),
                               move(self.pixel_values), move(self.image_grid_thw))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the monolithic model's forward and generate."""
        inputs = {"input_ids": self.input_ids, "mm_token_type_ids": self.mm_token_type_ids}
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
            inputs["image_grid_thw"] = self.image_grid_thw
        return inputs


def patchify(image: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """`[C, H, W]` -> `[(H / patch) * (W / patch), C * temporal_patch * patch * patch]`,
    rows in merge-window order (the order the vision tower's merger expects)."""
    channels, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    windows = image.reshape(channels, grid_h // merge_size, merge_size, patch_size,
                            grid_w // merge_size, merge_size, patch_size)
    # -> [window row, window col, row in window, col in window, C, patch row, patch col]
    windows = windows.permute(1, 4, 2, 5, 0, 3, 6)
    frames = windows.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    return frames.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)


def synthesize(config: PreTrainedConfig, family: ModelFamily, prompt: Prompt,
               seed: int = 0) -> ProcessorOutput:
    """The processor output for `prompt`: random text ids and random images, from `seed`."""
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(family.image_mean).view(-1, 1, 1)
    std = torch.tensor(family.image_std).view(-1, 1, 1)

    ids: list[torch.Tensor] = []
    patches: list[torch.Tensor] = []
    grids: list[tuple[int, int, int]] = []
    for segment in prompt.segments:
        if isinstance(segment, int):
            ids.append(torch.randint(0, text_vocab_size(config), (segment,), generator=gen))
            continue
        if segment.height % factor or segment.width % factor or min(segment.height, segment.width) < factor:
            raise ValueError(f"prompt {prompt.name!r}: image {segment.height}x{segment.width}: expected "
                             f"positive multiples of patch_size * spatial_merge_size = {factor}")
        source = gen if segment.seed is None else torch.Generator().manual_seed(segment.seed)
        pixels = torch.randint(0, 256, (vision.in_channels, segment.height, segment.width), generator=source)
        normalized = (pixels.float() / 255.0 - mean) / std
        patches.append(patchify(normalized, vision.patch_size, vision.spatial_merge_size,
                                vision.temporal_patch_size))
        grid = (1, segment.height // vision.patch_size, segment.width // vision.patch_size)
        grids.append(grid)
        placeholders = grid[0] * grid[1] * grid[2] // vision.spatial_merge_size ** 2
        ids.append(torch.tensor([config.vision_start_token_id]))
        ids.append(torch.full((placeholders,), config.image_token_id))
        ids.append(torch.tensor([config.vision_end_token_id]))

    input_ids = torch.cat(ids).to(torch.int64).unsqueeze(0)
    mm_token_type_ids = (input_ids == config.image_token_id).to(torch.int32)
    return ProcessorOutput(
        input_ids=input_ids,
        mm_token_type_ids=mm_token_type_ids,
        pixel_values=torch.cat(patches) if patches else None,
        image_grid_thw=torch.tensor(grids, dtype=torch.int64) if grids else None,
    )
