"""The two halves of a Qwen-VL model on either side of embxfer.

The encoder engine runs everything of the model's forward that needs the images, and
nothing after it; the language engine runs everything after it from the `Payload` alone.
What crosses, per request of N prompt tokens (D = text hidden size, K = deepstack layers):

- `embeddings [N, D]`: `embed_tokens(input_ids)` with the vision tower's merged image
  features scattered into the image placeholder rows (`masked_scatter`, as the model's
  forward does). The language engine feeds it to the decoder as `inputs_embeds`.
- `fill_ids [N]` int32: `input_ids`. The language engine finds the visual rows in it
  (`fill_ids == image or video token id`), the same mask the model builds from `input_ids`.
- `mrope_positions [3, N]` int32: rows t, h, w from the model's `get_rope_index(input_ids,
  mm_token_type_ids, image_grid_thw)`. The prefill's `position_ids` (`[3, 1, N]`).
- `mrope_delta`: the same call's `max(position) + 1 - N` (negative when images compress
  positions). After the prompt, text advances all three rows together: the token at
  sequence index i (i >= N) is at position `i + mrope_delta` on every row.
- `deepstack [N, K * D]` (Qwen3-VL; `None` for Qwen2.5-VL): the K deepstack mergers'
  outputs, layer k in columns `k * D .. (k + 1) * D`, at the visual rows; zeros at the text
  rows. The language engine passes the visual rows of block k as
  `deepstack_visual_embeds[k]`, which the decoder adds to the output of its layer k at the
  visual positions.

The zero rows cost `(N - visual) * K * D` elements on the wire; in exchange the field keeps
the payload's one-row-per-token shape, so blocks, resumes and TP copies need no special
case, and the language side needs no extra metadata: the visual rows are exactly the rows
whose `fill_ids` is a placeholder id, the same mask the model's own forward builds from
`input_ids`.

Both engines here hold the same model object so that the weights agree; each touches only
its own half (encoder: `visual`, `embed_tokens`, `get_rope_index`; language:
`language_model`, `lm_head`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from embxfer.runtime import Payload
from embxfer.runtime.payload import Item

from .processor import ProcessorOutput


@dataclass(frozen=True)
class Greedy:
    """A prompt's prefill logits and a greedy continuation of it."""

    prefill_logits: torch.Tensor  # [N, vocab], every prompt position
    tokens: torch.Tensor  # [steps] int64; tokens[0] comes from prefill_logits[-1]
    step_logits: torch.Tensor  # [steps, vocab]; step_logits[i] chose tokens[i]


def deepstack_layers(model: PreTrainedModel) -> int:
    """K: how many decoder layers receive deepstack features (0 for models without)."""
    return len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())


class EncoderEngine:
    """Processor output -> `Payload`, with the model's own vision tower, merge and rope index."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.base = model.model
        self.deepstack_layers = deepstack_layers(model)
        self.images_encoded = 0  # images run through the vision tower

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    def items(self, inputs: ProcessorOutput) -> list[Item]:
        """The request's multimodal items: each image's placeholder rows, under a digest of
        its pixels and grid (what vLLM's mm_hash covers)."""
        if inputs.pixel_values is None:
            return []
        image_id = self.base.config.image_token_id
        rows = (inputs.input_ids[0] == image_id).nonzero().flatten().tolist()
        merge = self.base.config.vision_config.spatial_merge_size
        items, row, patch = [], 0, 0
        for grid in inputs.image_grid_thw.tolist():
            patches = grid[0] * grid[1] * grid[2]
            count = patches // merge ** 2
            pixels = inputs.pixel_values[patch : patch + patches].float().cpu().contiguous()
            digest = hashlib.blake2b(pixels.numpy().tobytes() + str(grid).encode(), digest_size=32).digest()
            items.append(Item(digest, rows[row], count))
            row += count
            patch += patches
        return items

    @torch.no_grad()
    def encode(self, inputs: ProcessorOutput, skip: set[bytes] = frozenset()) -> Payload:
        """The payload of `inputs`. Items (images) whose hash is in `skip` are not run
        through the vision tower: their rows are left unset (the language side holds
        them, see embxfer's item cache); `self.images_encoded` counts the others."""
        inputs = inputs.to(self.device)
        input_ids = inputs.input_ids
        embeddings = self.base.get_input_embeddings()(input_ids)  # [1, N, D]
        num_tokens, dim = embeddings.shape[1], embeddings.shape[2]
        items = self.items(inputs)

        deepstack = None
        if inputs.pixel_values is not None:
            merge = self.base.config.vision_config.spatial_merge_size
            grids = inputs.image_grid_thw.tolist()
            keep = [item.content_hash not in skip for item in items]
            patch_counts = [t * h * w for t, h, w in grids]
            firsts = [sum(patch_counts[:i]) for i in range(len(grids))]
            image_mask = torch.zeros(num_tokens, dtype=torch.bool, device=embeddings.device)
            for item, kept in zip(items, keep, strict=True):
                image_mask[item.start : item.start + item.count] = kept
            if self.deepstack_layers:
                deepstack = embeddings.new_zeros(num_tokens, self.deepstack_layers * dim)
            if any(keep):
                pixel_values = torch.cat([inputs.pixel_values[f : f + n] for f, n, k in
                                          zip(firsts, patch_counts, keep, strict=True) if k])
                grid_thw = inputs.image_grid_thw[torch.tensor(keep, device=inputs.image_grid_thw.device)]
                vision = self.base.get_image_features(pixel_values, grid_thw, return_dict=True)
                self.images_encoded += len(grid_thw)
                image_features = torch.cat(vision.pooler_output).to(embeddings.device, embeddings.dtype)
                assert image_features.shape[0] == int(image_mask.sum()) == sum(
                    n // merge ** 2 for n, k in zip(patch_counts, keep, strict=True) if k)
                embeddings = embeddings.masked_scatter(image_mask.view(1, -1, 1).expand_as(embeddings),
                                                       image_features)
                if self.deepstack_layers:
                    # One feature per deepstack layer: a tensor of every image's rows
                    # (transformers 5.17) or a tuple with one tensor per image (5.18 on).
                    per_layer = [f if isinstance(f, torch.Tensor) else torch.cat(f)
                                 for f in vision.deepstack_features]
                    deepstack[image_mask] = torch.cat(per_layer, dim=1).to(deepstack.dtype)
        elif self.deepstack_layers:
            deepstack = embeddings.new_zeros(num_tokens, self.deepstack_layers * dim)

        positions, delta = self.base.get_rope_index(
            input_ids, mm_token_type_ids=inputs.mm_token_type_ids, image_grid_thw=inputs.image_grid_thw,
        )  # [3, 1, N], [1, 1]
        return Payload(
            embeddings=embeddings[0].contiguous(),
            fill_ids=input_ids[0].to(torch.int32),
            mrope_positions=positions[:, 0].to(torch.int32).contiguous(),
            mrope_delta=int(delta.reshape(-1)[0]),
            deepstack=deepstack,
            items=items,
        )


class LanguageEngine:
    """`Payload` -> prefill logits and greedy tokens, with the model's own decoder and head."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.decoder = model.model.language_model
        self.lm_head = model.lm_head
        self.placeholder_ids = (model.config.image_token_id, model.config.video_token_id)

    def _decoder_inputs(self, payload: Payload) -> dict:
        inputs = {
            "inputs_embeds": payload.embeddings.unsqueeze(0),
            "position_ids": payload.mrope_positions.to(torch.int64).unsqueeze(1),  # [3, 1, N]
        }
        if payload.deepstack is None:
            return inputs
        visual = torch.isin(payload.fill_ids, torch.tensor(self.placeholder_ids, dtype=torch.int32,
                                                            device=payload.fill_ids.device))
        if visual.any():  # as in the model's forward: deepstack only where there are images
            dim = payload.embeddings.shape[1]
            layers = payload.deepstack.shape[1] // dim
            inputs["visual_pos_masks"] = visual.unsqueeze(0)
            inputs["deepstack_visual_embeds"] = [
                payload.deepstack[visual, k * dim:(k + 1) * dim] for k in range(layers)
            ]
        return inputs

    @torch.no_grad()
    def generate(self, payload: Payload, max_new_tokens: int) -> Greedy:
        """Prefill from the payload, then choose `max_new_tokens` tokens greedily (the first
        from the prefill, each further one from a decode step)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
        cache = DynamicCache(config=self.decoder.config)
        hidden = self.decoder(**self._decoder_inputs(payload), past_key_values=cache,
                              use_cache=True).last_hidden_state
        prefill_logits = self.lm_head(hidden)[0]

        step_logits = [prefill_logits[-1]]
        tokens = [int(prefill_logits[-1].argmax())]
        device = payload.embeddings.device
        while len(tokens) < max_new_tokens:
            # The token just chosen sits at sequence index cache length; text after the
            # prompt advances all three mrope rows together, shifted by the prompt's delta.
            position = cache.get_seq_length() + payload.mrope_delta
            embeds = self.decoder.get_input_embeddings()(torch.tensor([[tokens[-1]]], device=device))
            hidden = self.decoder(inputs_embeds=embeds,
                                  position_ids=torch.full((3, 1, 1), position, device=device),
                                  past_key_values=cache, use_cache=True).last_hidden_state
            logits = self.lm_head(hidden)[0, -1]
            step_logits.append(logits)
            tokens.append(int(logits.argmax()))
        return Greedy(prefill_logits, torch.tensor(tokens), torch.stack(step_logits))
