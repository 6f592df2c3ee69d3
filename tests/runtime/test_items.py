"""Reuse per multimodal item, metadata that travels, progress per request (issue 20).

A chat about one picture: turn 1 sends the picture's rows and the language side caches
them as an item; turn 2 puts the same picture at another place in a longer prompt: the
encoder side learns the item is held, skips it (its rows in the payload are left
unset), and sends the other rows only; the language side puts the item's rows back with
their positions moved to where the item now sits. The result must equal, bit for bit,
the payload the encoder would have sent in full.
"""

from __future__ import annotations

import pytest
import torch

from embxfer.runtime import Config
from embxfer.runtime.local import LocalCluster, random_payload
from embxfer.runtime.payload import Item, Payload
from embxfer.runtime.state import RequestState
from embxfer.runtime.topology import Topology

DIM = 32


def cluster_for(language_tp: int = 1, cache_bytes: int = 1 << 22, **overrides) -> LocalCluster:
    config = Config(**{"block_size": 16, "default_alloc_tokens": 256, "language_pool_blocks": 64,
                       "staging_bytes": 1 << 16, "cache_bytes": cache_bytes, **overrides})
    return LocalCluster(Topology(1, 1, language_tp), config, dim=DIM, deepstack_layers=1)


def picture(seed: int, count: int) -> Payload:
    """The vision model's rows for one picture: embeddings, deepstack, image-pad ids and
    positions (t, h, w) counted from the picture's first row."""
    rows = random_payload(count, DIM, deepstack_layers=1, seed=seed)
    pad = torch.full((count,), 151655, dtype=torch.int32)
    grid = torch.stack([torch.zeros(count, dtype=torch.int32), torch.arange(count, dtype=torch.int32) // 8,
                        torch.arange(count, dtype=torch.int32) % 8])
    return Payload(rows.embeddings, pad, grid, 0, deepstack=rows.deepstack)


def prompt(seed: int, layout: list, delta: int = 7) -> tuple[Payload, list[Item]]:
    """A payload of text rows and pictures: `layout` is a list of ints (text rows) and
    (hash, Payload) pictures; a picture's positions are its own plus where it starts."""
    parts, items, row = [], [], 0
    for index, part in enumerate(layout):
        if isinstance(part, int):
            text = random_payload(part, DIM, deepstack_layers=1, seed=seed * 100 + index)
            positions = torch.arange(row, row + part, dtype=torch.int32).expand(3, part)
            parts.append((text.embeddings, text.fill_ids, positions, text.deepstack))
            row += part
        else:
            content_hash, rows = part
            parts.append((rows.embeddings, rows.fill_ids, rows.mrope_positions + row, rows.deepstack))
            items.append(Item(content_hash, row, rows.num_tokens))
            row += rows.num_tokens
    payload = Payload(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                      torch.cat([p[2] for p in parts], dim=1).contiguous(), delta,
                      deepstack=torch.cat([p[3] for p in parts]), items=items)
    return payload, items


def blanked(payload: Payload, skipped: set[bytes]) -> Payload:
    """What an encoder engine that skipped the vision model for `skipped` has: those items'
    embeddings and deepstack rows never computed (poisoned here), positions and ids known."""
    embeddings, deepstack = payload.embeddings.clone(), payload.deepstack.clone()
    for item in payload.items:
        if item.content_hash in skipped:
            embeddings[item.start : item.start + item.count].view(torch.int16).fill_(-1)
            deepstack[item.start : item.start + item.count].view(torch.int16).fill_(-1)
    return Payload(embeddings, payload.fill_ids, payload.mrope_positions, payload.mrope_delta, deepstack=deepstack,
                   items=payload.items, metadata=payload.metadata)


def run(cluster: LocalCluster, rid: int, payload: Payload, items: list[Item], *, skip: bool = True,
        settle: bool = True) -> list[Payload]:
    """Admit on every language rank (naming the items), let the held items reach the
    encoder, submit what it then has, and take every rank's copy."""
    for receiver in cluster.receivers.values():
        receiver.admit(rid, 0, items=items)
    for _ in range(3):
        cluster.step()
    sender = cluster.senders[0]
    held = sender.lookup_items(rid) if skip else set()
    cluster.submit(rid, blanked(payload, held) if held else payload)
    cluster.run_until(lambda: all(s.terminal for s in cluster.states(rid)))
    failed = [r.error(rid) for r in cluster.receivers.values() if r.state(rid) is RequestState.FAILED]
    assert not failed, failed
    copies = [r.take(rid) for r in cluster.receivers.values()]
    cluster.run_until(lambda: sender.state(rid).terminal)
    sender.release(rid)
    if settle:
        cluster.settle()
    return copies


@pytest.mark.parametrize("language_tp", [1, 2])
def test_a_second_turn_with_the_same_picture_sends_only_the_text(language_tp):
    cluster = cluster_for(language_tp)
    cat = picture(1, 96)
    first, first_items = prompt(1, [20, (b"cat", cat), 12])
    for copy in run(cluster, 1, first, first_items):
        assert copy.bit_equal(first) and copy.items == tuple(first_items)
    sent_before = cluster.senders[0].stats.tokens
    second, second_items = prompt(2, [45, (b"cat", cat), 30])  # the picture 25 rows later
    assert cluster.leader.cache.holds_item(b"cat", 96)
    copies = run(cluster, 2, second, second_items)
    for copy in copies:
        assert copy.bit_equal(second), copy.mismatches(second)
    assert cluster.senders[0].stats.tokens - sent_before == 45 + 30  # the text rows only
    assert all(r.cache.item_hits == 1 for r in cluster.receivers.values())
    assert len({tuple(r.cache.entries) for r in cluster.receivers.values()}) == 1  # identical on every rank


def test_a_mix_of_cached_and_new_items_in_one_request():
    cluster = cluster_for(2)
    cat, dog, owl = picture(1, 40), picture(2, 33), picture(3, 17)
    first, items = prompt(1, [5, (b"cat", cat), 3, (b"dog", dog), 4])
    run(cluster, 1, first, items)
    second, items = prompt(2, [9, (b"owl", owl), (b"dog", dog), 2, (b"cat", cat), 1])
    for copy in run(cluster, 2, second, items):
        assert copy.bit_equal(second), copy.mismatches(second)
    assert cluster.senders[0].stats.tokens == (5 + 40 + 3 + 33 + 4) + (9 + 17 + 2 + 1)
    third, items = prompt(3, [1, (b"owl", owl), 1])  # the item the second turn brought
    for copy in run(cluster, 3, third, items):
        assert copy.bit_equal(third)


def test_an_item_in_use_is_not_evicted_and_the_request_completes():
    """The cache holds one picture's worth; while request 2 relies on the cat, other
    requests bring new pictures that would evict it: they are not cached instead."""
    cat = picture(1, 60)
    row_bytes = DIM * 2 * 2 + 16
    cluster = cluster_for(2, cache_bytes=70 * row_bytes)
    first, items = prompt(1, [4, (b"cat", cat), 4])
    run(cluster, 1, first, items)
    second, second_items = prompt(2, [10, (b"cat", cat), 10])
    for receiver in cluster.receivers.values():
        receiver.admit(2, 0, items=second_items)
    for _ in range(3):
        cluster.step()
    assert cluster.senders[0].lookup_items(2) == {b"cat"}
    # Meanwhile another request brings a 60-row picture: no room unless the cat goes.
    fox = picture(9, 60)
    third, third_items = prompt(3, [2, (b"fox", fox), 2])
    for copy in run(cluster, 3, third, third_items, settle=False):  # request 2 is still in flight
        assert copy.bit_equal(third)
    assert all(r.cache.holds_item(b"cat", 60) and not r.cache.holds_item(b"fox", 60) for r in cluster.receivers.values())
    cluster.submit(2, blanked(second, {b"cat"}))
    cluster.run_until(lambda: all(s.terminal for s in cluster.states(2)))
    for receiver in cluster.receivers.values():
        assert receiver.take(2).bit_equal(second)
    cluster.run_until(lambda: cluster.senders[0].state(2).terminal)
    cluster.senders[0].release(2)
    cluster.settle()
    assert all(not r.cache.pins for r in cluster.receivers.values())  # released with the request


def test_the_same_hash_with_another_row_count_is_a_miss_never_wrong_rows():
    """An engine that reuses a hash for different rows (a different picture size under one
    key, a collision attempt) gets no cached rows: the lookup names the row count too."""
    cluster = cluster_for(1)
    first, items = prompt(1, [3, (b"img", picture(1, 50)), 3])
    run(cluster, 1, first, items)
    impostor = picture(2, 49)
    second, items = prompt(2, [3, (b"img", impostor), 3])
    copies = run(cluster, 2, second, items)
    assert cluster.senders[0].lookup_items(2) == set()
    assert copies[0].bit_equal(second)
    assert cluster.leader.cache.item_hits == 0


def test_an_encoder_that_computed_a_held_item_anyway_still_sends_only_the_rest():
    cluster = cluster_for(2)
    cat = picture(1, 30)
    first, items = prompt(1, [2, (b"cat", cat), 2])
    run(cluster, 1, first, items)
    second, items = prompt(2, [7, (b"cat", cat), 1])
    sent_before = cluster.senders[0].stats.tokens
    for copy in run(cluster, 2, second, items, skip=False):  # the full payload, picture included
        assert copy.bit_equal(second)
    assert cluster.senders[0].stats.tokens - sent_before == 7 + 1


def test_metadata_travels_to_every_rank_and_its_bounds_are_checked():
    cluster = cluster_for(2)
    grid = torch.tensor([[1, 4, 6]], dtype=torch.int32)
    stamps = torch.tensor([0.0, 0.5, 1.25], dtype=torch.bfloat16)
    base = random_payload(50, DIM, deepstack_layers=1, seed=3)
    payload = Payload(base.embeddings, base.fill_ids, base.mrope_positions, base.mrope_delta, deepstack=base.deepstack,
                      metadata={"image_grid_thw": grid, "timestamps": stamps})
    for copy in run(cluster, 1, payload, []):
        assert copy.bit_equal(payload) and set(copy.metadata) == {"image_grid_thw", "timestamps"}
        assert torch.equal(copy.metadata["image_grid_thw"], grid)
    with pytest.raises(ValueError, match="records.MAX_METADATA_BYTES=1024"):  # the wire's bound
        Payload(base.embeddings, base.fill_ids, base.mrope_positions, 0, deepstack=base.deepstack,
                metadata={"x": torch.zeros(300, dtype=torch.int32)})  # 1200 bytes
    small = cluster_for(1, max_metadata_bytes=100)
    over = Payload(base.embeddings, base.fill_ids, base.mrope_positions, 0, deepstack=base.deepstack,
                   metadata={"x": torch.zeros(30, dtype=torch.int32)})  # 120 bytes: this engine's bound is 100
    sender = small.senders[0]
    with pytest.raises(ValueError, match="config.max_metadata_bytes=100"):
        sender.submit(9, over)
    assert 9 not in sender.requests and not any(c.queue for c in sender.channels.values())
    with pytest.raises(ValueError, match="payload.metadata"):
        Payload(base.embeddings, base.fill_ids, base.mrope_positions, 0, deepstack=base.deepstack,
                metadata={"bad name!": grid})
    with pytest.raises(ValueError, match="payload.metadata"):
        Payload(base.embeddings, base.fill_ids, base.mrope_positions, 0, deepstack=base.deepstack,
                metadata={"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="payload.items"):
        Payload(base.embeddings, base.fill_ids, base.mrope_positions, 0, deepstack=base.deepstack,
                items=[Item(b"a", 40, 20)])  # past N


def test_arrived_counts_the_rows_a_request_has_so_far():
    cluster = cluster_for(1, cache_bytes=0, default_alloc_tokens=64)
    payload = random_payload(300, DIM, deepstack_layers=1, seed=5)
    receiver = cluster.leader
    receiver.admit(1, 0)
    assert receiver.arrived(1) == (0, None)
    cluster.submit(1, payload)
    seen = []
    cluster.run_until(lambda: receiver.state(1).terminal, each_step=lambda: seen.append(receiver.arrived(1)))
    got = [rows for rows, _ in seen]
    assert got == sorted(got) and seen[-1] == (300, 300)
    assert {total for rows, total in seen if rows} == {300}  # N is known from the first segment on
    assert any(0 < rows < 300 for rows in got)  # it grows round by round
    assert receiver.take(1).bit_equal(payload)


def test_a_follower_that_reads_the_stream_before_it_finds_the_encoder_usable_keeps_its_payload_info():
    """What travels with a payload (PAYLOAD_INFO: which items were skipped) comes just
    before its first TRANSFER; a language follower that has not yet found the encoder
    engine usable when it reads them holds both and replays them in order, so the skipped
    item's rows are still filled in, bit-exact."""
    cluster = cluster_for(2)
    cat = picture(1, 40)
    first, first_items = prompt(1, [6, (b"cat", cat), 4])
    run(cluster, 1, first, first_items)
    follower = cluster.receivers[cluster.topology.language_ranks[1]]
    view = follower.directory.view_of(cluster.topology.encoder_ranks(0)[0])
    source = follower.sources.pop(view.incarnation)
    follower.channels.pop(source.serving)
    view.state = "joining"
    follower._joining.append(view)
    make_source = follower._source

    def source_that_goes_on(view):  # the stream goes on: a new channel would start at message 0
        made = make_source(view)
        made.channel.next_message = source.channel.next_message
        return made

    follower._source = source_that_goes_on
    second, second_items = prompt(2, [9, (b"cat", cat), 5])
    for receiver in cluster.receivers.values():
        receiver.admit(2, 0, items=second_items)
    others = [e for e in cluster.endpoints if e is not follower]
    for _ in range(3):
        for endpoint in others:
            endpoint.progress()
    assert cluster.senders[0].lookup_items(2) == {b"cat"}
    cluster.submit(2, blanked(second, {b"cat"}))
    for _ in range(3):  # the encoder sends the info and the text rows before the follower steps
        for endpoint in others:
            endpoint.progress()
    cluster.run_until(lambda: all(s.terminal for s in cluster.states(2)))
    for receiver in cluster.receivers.values():
        assert receiver.take(2).bit_equal(second)
    assert not follower._early_records
    cluster.run_until(lambda: cluster.senders[0].state(2).terminal)
    cluster.senders[0].release(2)
    cluster.settle()
