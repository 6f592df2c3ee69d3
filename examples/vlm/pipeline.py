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


@dataclass(frozen=True)
class ChatTurn:
    payload: Payload  # the whole payload of the turn (every image encoded), for comparison
    copies: list[Payload]  # what each language TP rank took
    images_encoded: int  # images the encoder engine ran through the vision tower this turn
    rows_sent: int  # rows that crossed (the skipped images' did not)
    ranks: list[Greedy]


def run_chat(model: PreTrainedModel, turns: list[ProcessorOutput], topology: Topology, config: Config,
             max_new_tokens: int) -> list[ChatTurn]:
    """A chat's turns through one job with an item cache: each turn the language engine
    names the prompt's images at admission; the encoder engine asks which of them the
    language side holds, skips the vision tower for those and submits the rest."""
    encoder = EncoderEngine(model)
    probe = encoder.encode(turns[0])
    cluster = LocalCluster(topology, config, dim=probe.embeddings.shape[1], dtype=probe.embeddings.dtype,
                           deepstack_layers=deepstack_layers(model), device=probe.embeddings.device)
    language = LanguageEngine(model)
    out = []
    try:
        for rid, inputs in enumerate(turns, start=1):
            items = encoder.items(inputs.to(encoder.device))
            for receiver in cluster.receivers.values():
                receiver.admit(rid, 0, items=items)
            for _ in range(3):  # the held items reach the encoder engine
                cluster.step()
            senders = cluster.engine_senders(0)
            held = senders[0].lookup_items(rid)
            before, sent_before = encoder.images_encoded, senders[0].stats.tokens
            payload = encoder.encode(inputs, skip=held)
            encoded = encoder.images_encoded - before
            for sender in senders:
                sender.submit(rid, payload)
            cluster.run_until(lambda r=rid: all(s.terminal for s in cluster.states(r)))
            copies = [receiver.take(rid) for receiver in cluster.receivers.values()]
            cluster.run_until(lambda r=rid, ss=senders: all(s.state(r).terminal for s in ss))
            rows_sent = senders[0].stats.tokens - sent_before
            for sender in senders:
                sender.release(rid)
            whole = EncoderEngine(model).encode(inputs)
            out.append(ChatTurn(whole, copies, encoded, rows_sent,
                                [language.generate(copy, max_new_tokens) for copy in copies]))
    finally:
        cluster.close()
    return out


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
