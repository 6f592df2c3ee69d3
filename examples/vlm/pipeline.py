"""One request through the split model: encoder engine -> embxfer -> every language TP rank.

The transfer is embxfer's real protocol (senders, receivers, pools, resumes, staging
chunks) laid out in one process by `LocalCluster`; the language engine sees only what
arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from embxfer.runtime import Config, Payload
from embxfer.runtime.local import LocalCluster
from embxfer.runtime.topology import Topology

from .engines import EncoderEngine, Greedy, LanguageEngine, deepstack_layers
from .processor import ProcessorOutput

PAYLOAD_FIELDS = ("embeddings", "fill_ids", "mrope_positions", "mrope_delta", "deepstack")


def small_pool_config() -> Config:
    """Blocks of 128 tokens, a blind default allocation of two blocks and a language pool
    of exactly that much: a prompt of more than 512 tokens arrives in three rounds or more
    (two resumes), each round landing in blocks freed by the round before."""
    return Config(block_size=128, default_alloc_tokens=256, language_pool_blocks=2, staging_bytes=1 << 20)


@dataclass(frozen=True)
class SplitRun:
    payload: Payload  # what the encoder engine submitted
    copies: list[Payload]  # what each language TP rank took, in rank order
    stats: dict  # the language leader's statistics after the transfer
    ranks: list[Greedy]  # each language rank's prefill and greedy decode


def payload_mismatches(sent: Payload, received: Payload) -> list[str]:
    """Names of the fields that did not arrive exactly as sent."""
    wrong = []
    for name in PAYLOAD_FIELDS:
        a, b = getattr(sent, name), getattr(received, name)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        else:
            same = a == b
        if not same:
            wrong.append(name)
    return wrong


def run_split(model: PreTrainedModel, inputs: ProcessorOutput, topology: Topology, config: Config,
              max_new_tokens: int, request_id: int = 1) -> SplitRun:
    payload = EncoderEngine(model).encode(inputs)
    cluster = LocalCluster(topology, config, dim=payload.embeddings.shape[1], dtype=payload.embeddings.dtype,
                           deepstack_layers=deepstack_layers(model), device=payload.embeddings.device)
    try:
        copies = cluster.transfer({request_id: payload})[request_id]
        stats = cluster.leader.snapshot_stats()
    finally:
        cluster.close()
    language = LanguageEngine(model)
    ranks = [language.generate(copy, max_new_tokens) for copy in copies]
    return SplitRun(payload, copies, stats, ranks)
