"""The monolithic model, run the way `transformers` runs it, as the reference to match."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel

from .engines import Greedy
from .processor import ProcessorOutput


@torch.no_grad()
def monolithic(model: PreTrainedModel, inputs: ProcessorOutput, max_new_tokens: int) -> Greedy:
    """Prefill logits of `model(input_ids, pixel_values, image_grid_thw, ...)` and the tokens
    and logits of `model.generate` (greedy, no end-of-sequence stop)."""
    device = model.get_input_embeddings().weight.device
    model_inputs = inputs.to(device).model_inputs()
    prefill_logits = model(**model_inputs).logits[0]
    greedy = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              eos_token_id=None, use_cache=True, output_logits=True,
                              return_dict_in_generate=True)
    # An explicit all-ones mask: without one, generate guesses padding from the pad token id,
    # which a random prompt may contain.
    attention_mask = torch.ones_like(model_inputs["input_ids"])
    out = model.generate(**model_inputs, attention_mask=attention_mask, generation_config=greedy)
    tokens = out.sequences[0, inputs.num_tokens:]
    return Greedy(prefill_logits, tokens.cpu(), torch.stack([step[0] for step in out.logits]))
