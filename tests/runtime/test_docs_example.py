"""docs/integration.md as a test: its examples run as documented, its lifecycle tables
hold cell by cell, and its sections on exact-size admission and content-hash reuse do
what they say (in one process, through `LocalCluster`; the two separately launched
engines of docs/examples/two_engines.py are tests/runtime/test_two_engines.py).

The lifecycle test reads the two tables from the document itself, so a cell that is
changed there is checked against the code from then on.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import embxfer
from embxfer import Config, LocalCluster, Payload, RequestState, Topology
from embxfer.runtime.local import random_payload
from embxfer.runtime.payload import Item

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integration.md"
ENGINE_LOOP = ROOT / "docs" / "examples" / "engine_loop.py"
DIM = 32
BLOCK = 128


def test_engine_loop_example_runs() -> None:
    result = subprocess.run([sys.executable, str(ENGINE_LOOP)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in (
        "request 1: SUCCESS, embeddings (700, 256) torch.bfloat16, bit-exact on 2 language ranks: True",
        "request 2: SUCCESS, embeddings (5000, 256) torch.bfloat16, bit-exact on 2 language ranks: True",
        "request 3: FAILED (user: client disconnected)",
        "request 4: rejected by submit: payload.embeddings: D=128, expected 256",
        "request 5: SUCCESS from the cache, no transfer: True, bit-exact on 2 language ranks: True",
        "blocks in use: {0: 0, 1: 0, 2: 0}",
        "engine loop example: ok",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_every_name_the_document_uses_exists() -> None:
    text = DOC.read_text()
    used = set(re.findall(r"\bembxfer\.([A-Za-z_]\w*)", text))
    assert used, "no embxfer.<name> found in the document"
    assert {name for name in used if not hasattr(embxfer, name)} == set()
    cluster = make_cluster((1, 1, 1))
    endpoints = {"rx": [cluster.leader], "tx": [cluster.senders[0]], "endpoint": cluster.endpoints}
    missing = {f"{who}.{name}" for who, name in re.findall(r"\b(rx|tx|endpoint)\.(\w+)", text)
               if not all(hasattr(e, name) for e in endpoints[who])}
    assert missing == set()
    # The configuration table names every field of Config, and nothing else.
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    assert documented == {field.name for field in dataclasses.fields(Config)}


# --------------------------------------------------------------------------- the lifecycle tables


def doc_table(side: str) -> dict[tuple[str, str], str]:
    """(call, state) -> cell of the lifecycle table whose first header cell is `side`."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\|\s*{side}\s*\|", line))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        call = re.match(r"`(\w+)", cells[0]).group(1)
        for state, cell in zip(header[1:], cells[1:], strict=True):
            table[(call, state)] = cell.replace("`", "")
    return table


def make_cluster(topology: tuple[int, int, int], pool_blocks: int = 64, **settings) -> LocalCluster:
    config = Config(block_size=BLOCK, default_alloc_tokens=1024, language_pool_blocks=pool_blocks,
                    staging_bytes=1 << 14, **settings)
    return LocalCluster(Topology(*topology), config, dim=DIM)


def everyone(cluster: LocalCluster, request_id: int) -> dict[int, RequestState | None]:
    """The request's state on every rank (None where the rank does not know it)."""
    states = {}
    for endpoint in cluster.endpoints:
        try:
            states[endpoint.rank] = endpoint.state(request_id)
        except KeyError:
            states[endpoint.rank] = None
    return states


def language_states(cluster: LocalCluster, request_id: int) -> set[RequestState | None]:
    return {everyone(cluster, request_id)[r] for r in cluster.receivers}


def run_until_language(cluster: LocalCluster, request_id: int, state: RequestState) -> None:
    cluster.run_until(lambda: language_states(cluster, request_id) == {state})


def quiet(cluster: LocalCluster) -> None:
    """Steps enough for every record now queued to reach every rank (and its answers back)."""
    for _ in range(6):
        cluster.step()


RID = 5
TOKENS = 3000  # two rounds of many 16 KiB staging messages: it stays TRANSFERRING a while


class Scene:
    """A cluster with request RID in one state on one side, and the payload it carries."""

    def __init__(self, topology: tuple[int, int, int]) -> None:
        self.payload = random_payload(TOKENS, DIM, seed=RID)
        self.cluster: LocalCluster | None = None
        self.topology = topology

    def make(self, **kwargs) -> LocalCluster:
        self.cluster = make_cluster(self.topology, **kwargs)
        return self.cluster

    def admit(self, request_id: int = RID) -> None:
        for receiver in self.cluster.receivers.values():
            receiver.admit(request_id, encoder_engine=0)

    def submit(self, request_id: int = RID) -> None:
        for sender in self.cluster.senders.values():
            sender.submit(request_id, self.payload)


def language_scene(topology: tuple[int, int, int], state: str) -> Scene:
    scene = Scene(topology)
    if state == "BOOTSTRAPPING":
        cluster = scene.make(pool_blocks=8)  # one default allocation, taken by request 1
        scene.admit(1)
        cluster.step()
        scene.admit()
        scene.submit()
        cluster.step()
        assert language_states(cluster, RID) == {RequestState.BOOTSTRAPPING}
        return scene
    cluster = scene.make()
    if state == "unknown":
        return scene
    scene.admit()
    if state == "WAITING_FOR_INPUT":  # the encoder engine is still running its vision model
        run_until_language(cluster, RID, RequestState.WAITING_FOR_INPUT)
        return scene
    scene.submit()
    run_until_language(cluster, RID, RequestState.TRANSFERRING)
    if state == "FAILED":
        cluster.senders[0].abort(RID, "the encoder engine gave up")
        run_until_language(cluster, RID, RequestState.FAILED)
        quiet(cluster)
    elif state != "TRANSFERRING":
        run_until_language(cluster, RID, RequestState.SUCCESS)
        quiet(cluster)  # the encoder side hears of it too
        if state == "taken or released":
            for receiver in cluster.receivers.values():
                receiver.take(RID)
    return scene


def encoder_scene(topology: tuple[int, int, int], state: str) -> Scene:
    scene = Scene(topology)
    cluster = scene.make()
    senders = list(cluster.senders.values())

    def encoder_states() -> set[RequestState | None]:
        return {everyone(cluster, RID)[s.rank] for s in senders}

    if state == "unknown":
        return scene
    scene.submit()
    if state == "BOOTSTRAPPING":  # the language engine has not admitted it yet
        cluster.step()
        assert encoder_states() == {RequestState.BOOTSTRAPPING}
        return scene
    scene.admit()
    cluster.run_until(lambda: encoder_states() == {RequestState.TRANSFERRING})
    if state == "FAILED":
        cluster.leader.abort(RID, "the client went away")
        cluster.run_until(lambda: encoder_states() == {RequestState.FAILED})
        quiet(cluster)
    elif state != "TRANSFERRING":
        cluster.run_until(lambda: encoder_states() == {RequestState.SUCCESS})
        quiet(cluster)
        if state == "released":
            for sender in senders:
                sender.release(RID)
    return scene


def drain(cluster: LocalCluster) -> None:
    """Abort whatever is left and forget everything: every block must be free again, and
    no output held."""
    quiet(cluster)
    for endpoint in cluster.endpoints:
        for rid in list(endpoint.requests):
            endpoint.abort(rid, "the test is over")
    quiet(cluster)
    for endpoint in cluster.endpoints:
        for rid in list(endpoint.requests):
            endpoint.release(rid)
    cluster.settle()
    assert set(cluster.blocks_in_use().values()) == {0}, cluster.describe()
    assert all(receiver.output_bytes == 0 for receiver in cluster.receivers.values())


def restart_and_finish(scene: Scene, side: str) -> None:
    """RID was just started again on `side`: the other engine forgets its old request (as
    it must before an id is reused: see test_reusing_an_id_*) and starts it too; the new
    request completes bit-exact."""
    cluster = scene.cluster
    peers = cluster.senders.values() if side == "language side" else cluster.receivers.values()
    for peer in peers:
        request = peer.requests.get(RID)
        if request is not None:
            assert request.state.terminal, cluster.describe()
            peer.release(RID)
    scene.submit() if side == "language side" else scene.admit()
    run_until_language(cluster, RID, RequestState.SUCCESS)
    assert all(receiver.take(RID).bit_equal(scene.payload) for receiver in cluster.receivers.values())


def check_cell(scene: Scene, side: str, call: str, cell: str) -> None:
    """Make `call` on RID where the engines would make it (on every TP rank; an abort that
    fails a request in flight on one rank only: the last, a follower under TP) and check
    `cell`."""
    cluster = scene.cluster
    endpoints = list(cluster.receivers.values() if side == "language side" else cluster.senders.values())
    peers = list(cluster.senders.values() if side == "language side" else cluster.receivers.values())
    before = everyone(cluster, RID)
    output_bytes = sum(r.output_bytes for r in cluster.receivers.values())
    calls = {
        "admit": lambda e: e.admit(RID, encoder_engine=0),
        "admit_many": lambda e: e.admit_many([RID], encoder_engine=0),
        "take": lambda e: e.take(RID),
        "take_many": lambda e: e.take_many([RID])[0],
        "submit": lambda e: e.submit(RID, scene.payload),
        "submit_many": lambda e: e.submit_many([(RID, scene.payload)]),
        "abort": lambda e: e.abort(RID, "the test aborts it"),
        "release": lambda e: e.release(RID),
        "release_many": lambda e: e.release_many([RID]),
    }
    method = calls[call]
    start = calls["admit" if side == "language side" else "submit"]
    targets = endpoints[-1:] if cell == "FAILED on both sides" else endpoints

    if cell in ("ValueError", "KeyError"):
        for endpoint in targets:
            with pytest.raises(ValueError if cell == "ValueError" else KeyError):
                method(endpoint)
        assert everyone(cluster, RID) == before
    elif cell == "no-op":  # only where the request is gone or never was: nothing moves by itself
        quiet(cluster)
        before = everyone(cluster, RID)
        held = [RID in endpoint.requests for endpoint in targets]
        for endpoint in targets:
            assert method(endpoint) is None
        quiet(cluster)
        assert everyone(cluster, RID) == before
        assert [RID in endpoint.requests for endpoint in targets] == held
    elif cell == "starts it":
        for endpoint in targets:
            method(endpoint)
        started = {RequestState.BOOTSTRAPPING, RequestState.WAITING_FOR_INPUT}
        assert all(endpoint.state(RID) in started for endpoint in targets), everyone(cluster, RID)
        restart_and_finish(scene, side)
    elif cell == "returns the payload, forgets it":
        for endpoint in targets:
            assert method(endpoint).bit_equal(scene.payload)
            assert RID not in endpoint.requests
    elif cell in ("forgets it", "drops the payload, forgets it"):
        for endpoint in targets:
            assert RID in endpoint.requests, "nothing to forget"
            method(endpoint)
            assert RID not in endpoint.requests
        if cell.startswith("drops"):
            assert output_bytes > 0 and sum(r.output_bytes for r in cluster.receivers.values()) == 0
        quiet(cluster)
        for endpoint in targets:  # forgotten: the id can be used again
            start(endpoint)
        restart_and_finish(scene, side)
    elif cell == "FAILED on both sides":
        method(targets[0])
        assert targets[0].state(RID) is RequestState.FAILED
        assert targets[0].error(RID) == "user: the test aborts it"
        quiet(cluster)
        for endpoint in [*endpoints, *peers]:
            if RID not in endpoint.requests:  # the peer engine has not got to it yet: it fails at once
                calls["submit" if endpoint in cluster.senders.values() else "admit"](endpoint)
            assert endpoint.state(RID) is RequestState.FAILED, everyone(cluster, RID)
            assert endpoint.error(RID).startswith("user: ")
    else:
        pytest.fail(f"docs/integration.md, {side} table, {call}: no check for the cell {cell!r}")
    drain(cluster)


LANGUAGE_TABLE = doc_table("language side")
ENCODER_TABLE = doc_table("encoder side")
TOPOLOGIES = [(1, 1, 1), (1, 1, 2), (1, 2, 2)]


def test_the_tables_cover_every_state_and_call() -> None:
    assert {state for _, state in LANGUAGE_TABLE} == {
        "BOOTSTRAPPING", "WAITING_FOR_INPUT", "TRANSFERRING", "SUCCESS", "FAILED", "taken or released", "unknown"}
    assert {call for call, _ in LANGUAGE_TABLE} == {"admit", "admit_many", "take", "take_many", "abort", "release"}
    assert {state for _, state in ENCODER_TABLE} == {
        "BOOTSTRAPPING", "TRANSFERRING", "SUCCESS", "FAILED", "released", "unknown"}
    assert {call for call, _ in ENCODER_TABLE} == {"submit", "submit_many", "abort", "release", "release_many"}


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda t: f"enc_tp{t[1]}-lang_tp{t[2]}")
@pytest.mark.parametrize("call,state", sorted(LANGUAGE_TABLE), ids=[f"{c}-{s}" for c, s in sorted(LANGUAGE_TABLE)])
def test_language_side_lifecycle_table(call: str, state: str, topology: tuple[int, int, int]) -> None:
    check_cell(language_scene(topology, state), "language side", call, LANGUAGE_TABLE[(call, state)])


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda t: f"enc_tp{t[1]}-lang_tp{t[2]}")
@pytest.mark.parametrize("call,state", sorted(ENCODER_TABLE), ids=[f"{c}-{s}" for c, s in sorted(ENCODER_TABLE)])
def test_encoder_side_lifecycle_table(call: str, state: str, topology: tuple[int, int, int]) -> None:
    check_cell(encoder_scene(topology, state), "encoder side", call, ENCODER_TABLE[(call, state)])



# --------------------------------------------------------------------------- lifecycle corners


def test_a_follower_that_admits_late_still_reports_the_request_in_finished() -> None:
    cluster = make_cluster((1, 1, 2))
    follower = cluster.receivers[2]
    payload = random_payload(700, DIM, seed=1)
    cluster.leader.admit(1)
    cluster.senders[0].submit(1, payload)
    cluster.run_until(lambda: 1 in follower.requests and follower.state(1).terminal)
    follower.finished()  # an engine's loop ignores ids it has not admitted
    follower.admit(1)
    assert 1 in follower.finished()
    assert follower.take(1).bit_equal(payload)


def test_reusing_an_id_the_encoder_has_not_released_yet() -> None:
    cluster = make_cluster((1, 1, 1))
    tx, rx = cluster.senders[0], cluster.leader
    first, second = random_payload(700, DIM, seed=1), random_payload(900, DIM, seed=2)
    rx.admit(1)
    tx.submit(1, first)
    cluster.run_until(lambda: tx.state(1) is RequestState.SUCCESS)
    assert rx.take(1).bit_equal(first)
    rx.admit(1)  # the language engine reuses the id; its encoder engine has not released it yet
    quiet(cluster)
    tx.release(1)
    tx.submit(1, second)
    cluster.run_until(lambda: rx.state(1).terminal)
    assert rx.take(1).bit_equal(second)


# --------------------------------------------------------------------------- exact-size admission


def transfer_with_hints(cluster: LocalCluster, payload: Payload, request_id: int = 1, *,
                        expected_tokens: int | None = None, announce: int | None = None) -> int:
    """Admit (with `expected_tokens`) and submit on every rank, announcing first if asked;
    check every language copy bit for bit and the first allocation; returns the resumes."""
    if announce is not None:
        for sender in cluster.senders.values():
            sender.announce(request_id, announce)
        quiet(cluster)
    for receiver in cluster.receivers.values():
        receiver.admit(request_id, encoder_engine=0, expected_tokens=expected_tokens)
    cluster.submit(request_id, payload)
    cluster.run_until(lambda: language_states(cluster, request_id) == {RequestState.SUCCESS})
    resumes = cluster.leader._lookup(request_id).resumes
    assert all(receiver.take(request_id).bit_equal(payload) for receiver in cluster.receivers.values())
    drain(cluster)
    return resumes


def first_allocation(cluster: LocalCluster, request_id: int) -> list[int]:
    """Blocks of the leader's first allocation for `request_id` (observed at admission)."""
    seen: list[int] = []
    admit = cluster.leader._assign

    def spy(request, blocks):
        if request.request_id == request_id and request.round == 0:
            seen.append(len(blocks))
        admit(request, blocks)

    cluster.leader._assign = spy
    return seen


POOL_TOKENS = 64 * BLOCK


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda t: f"enc_tp{t[1]}-lang_tp{t[2]}")
@pytest.mark.parametrize("tokens", [1, BLOCK - 1, BLOCK, BLOCK + 1, 1000, 1025, 5000, POOL_TOKENS])
def test_a_correct_expected_size_allocates_exactly_and_never_resumes(tokens: int, topology) -> None:
    cluster = make_cluster(topology)
    blocks = first_allocation(cluster, 1)
    assert transfer_with_hints(cluster, random_payload(tokens, DIM, seed=tokens), expected_tokens=tokens) == 0
    assert blocks == [-(-tokens // BLOCK)]


@pytest.mark.parametrize("tokens", [BLOCK + 1, 1000, 5000])
@pytest.mark.parametrize("off_by", [-BLOCK, BLOCK])
def test_a_hint_off_by_one_block_gives_the_same_result(tokens: int, off_by: int) -> None:
    payload = random_payload(tokens, DIM, seed=tokens)
    blind = make_cluster((1, 1, 2))
    blind_resumes = transfer_with_hints(blind, payload)
    hinted = make_cluster((1, 1, 2))
    resumes = transfer_with_hints(hinted, payload, expected_tokens=tokens + off_by)
    # Too small: the last block's worth comes in one resume round; too large: one round.
    # Blind: the default allocation, then one resume for all of the rest (the pool has room).
    assert resumes == (1 if off_by < 0 else 0)
    assert blind_resumes == (1 if tokens > 1024 else 0)
    assert set(hinted.blocks_in_use().values()) == {0}  # the spare block went back too


def test_a_hint_larger_than_the_pool_is_capped_by_it() -> None:
    cluster = make_cluster((1, 1, 1))
    blocks = first_allocation(cluster, 1)
    payload = random_payload(POOL_TOKENS - 5, DIM, seed=3)
    assert transfer_with_hints(cluster, payload, expected_tokens=10 * POOL_TOKENS) == 0
    assert blocks == [64]


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda t: f"enc_tp{t[1]}-lang_tp{t[2]}")
def test_an_announcement_before_admission_makes_the_first_allocation_exact(topology) -> None:
    cluster = make_cluster(topology)
    blocks = first_allocation(cluster, 1)
    assert transfer_with_hints(cluster, random_payload(5000, DIM, seed=1), announce=5000) == 0
    assert blocks == [40]


@pytest.mark.parametrize("first_ends", ["taken", "aborted"])
def test_an_announcement_of_a_reused_id_before_its_admission_makes_its_allocation_exact(first_ends) -> None:
    """The leader keeps an announced size for an id it has retired too: the id's next
    request is announced before it is admitted (it was dropped as late for the previous
    request, and the new one took the default allocation and a resume)."""
    cluster = make_cluster((1, 1, 2))
    first = random_payload(300, DIM, seed=1)
    if first_ends == "taken":
        assert transfer_with_hints(cluster, first) == 0
        cluster.senders[0].release(1)
    else:
        cluster.admit(1)
        cluster.submit(1, first)
        cluster.leader.abort(1)
        quiet(cluster)
        for endpoint in cluster.endpoints:
            endpoint.release(1)
    quiet(cluster)
    assert 1 in cluster.leader.retired
    blocks = first_allocation(cluster, 1)
    assert transfer_with_hints(cluster, random_payload(5000, DIM, seed=2), announce=5000) == 0
    assert blocks == [40]
    drain(cluster)


def test_an_announcement_while_waiting_for_blocks_makes_the_first_allocation_exact() -> None:
    cluster = make_cluster((1, 1, 2), pool_blocks=8)  # one default allocation, taken by request 1
    scene_payload = random_payload(700, DIM, seed=1)
    for receiver in cluster.receivers.values():
        receiver.admit(1)
        receiver.admit(2)
    quiet(cluster)
    assert language_states(cluster, 2) == {RequestState.BOOTSTRAPPING}
    blocks = first_allocation(cluster, 2)
    for sender in cluster.senders.values():
        sender.announce(2, 300)  # its size is known now, while it still waits for blocks
    cluster.submit(1, scene_payload)
    second = random_payload(300, DIM, seed=2)
    cluster.submit(2, second)
    cluster.run_until(lambda: language_states(cluster, 2) == {RequestState.SUCCESS})
    assert blocks == [3] and cluster.leader._lookup(2).resumes == 0
    assert all(receiver.take(2).bit_equal(second) for receiver in cluster.receivers.values())
    drain(cluster)


def test_an_announcement_after_the_allocation_is_ignored_and_harmless() -> None:
    cluster = make_cluster((1, 1, 1))
    payload = random_payload(2500, DIM, seed=1)
    cluster.leader.admit(1)
    quiet(cluster)  # the default allocation is made
    cluster.senders[0].announce(1, 2500)
    cluster.senders[0].submit(1, payload)
    cluster.run_until(lambda: cluster.leader.state(1) is RequestState.SUCCESS)
    assert cluster.leader._lookup(1).resumes == 1  # 1024, then the other 1476: as without the announcement
    assert cluster.leader.take(1).bit_equal(payload)
    drain(cluster)


def test_a_submit_still_without_its_allocation_a_step_later_is_announced_and_allocated_exactly() -> None:
    """The engine announces nothing: the encoder leader announces request 2's size itself,
    one step after the submit, because its allocation has not come (the pool is held by
    request 1); the admission waiting for blocks then takes 3 blocks, not the default 8."""
    cluster = make_cluster((1, 1, 2), pool_blocks=8)  # one default allocation, taken by request 1
    for receiver in cluster.receivers.values():
        receiver.admit(1)
        receiver.admit(2)
    quiet(cluster)
    blocks = first_allocation(cluster, 2)
    scene_payload, second = random_payload(700, DIM, seed=1), random_payload(300, DIM, seed=2)
    cluster.submit(1, scene_payload)
    cluster.submit(2, second)
    cluster.run_until(lambda: language_states(cluster, 2) == {RequestState.SUCCESS})
    assert blocks == [3] and cluster.leader._lookup(2).resumes == 0
    assert cluster.senders[0].stats.announced == 1  # request 2 only: request 1 had its allocation
    assert all(receiver.take(2).bit_equal(second) for receiver in cluster.receivers.values())
    assert all(receiver.take(1).bit_equal(scene_payload) for receiver in cluster.receivers.values())
    drain(cluster)


def test_a_submit_whose_allocation_comes_within_a_step_announces_nothing() -> None:
    """Admitted and submitted together, with blocks free: the allocation reaches the encoder
    leader at the next step, before anything is announced (also for a whole batch)."""
    cluster = make_cluster((1, 2, 2))
    payloads = {rid: random_payload(100 + 37 * rid, DIM, seed=rid) for rid in range(1, 9)}
    taken = cluster.transfer(payloads)
    assert all(copy.bit_equal(payloads[rid]) for rid, copies in taken.items() for copy in copies)
    assert sum(sender.stats.announced for sender in cluster.senders.values()) == 0
    drain(cluster)


def test_an_announced_size_is_the_rows_that_travel() -> None:
    """A request that waits for blocks is announced with the rows that travel: with an item
    the language side holds, fewer than the payload's, and its allocation is that many."""
    cluster = make_cluster((1, 1, 1), pool_blocks=8, cache_bytes=1 << 20)
    leader, sender = cluster.leader, cluster.senders[0]

    def payload(text_before: int, picture: Payload, text_after: int, seed: int) -> Payload:
        text = random_payload(text_before + text_after, DIM, seed=seed)
        rows = picture.num_tokens
        positions = torch.arange(text_before + rows + text_after, dtype=torch.int32).expand(3, -1).clone()
        return Payload(torch.cat([text.embeddings[:text_before], picture.embeddings, text.embeddings[text_before:]]),
                       torch.cat([text.fill_ids[:text_before], picture.fill_ids, text.fill_ids[text_before:]]),
                       positions, 0, items=[Item(b"picture", text_before, rows)])

    picture = random_payload(256, DIM, seed=3)
    first = payload(10, picture, 6, seed=4)
    leader.admit(1, items=list(first.items))  # a miss: the picture is cached at completion
    sender.submit(1, first)
    cluster.run_until(lambda: leader.state(1) is RequestState.SUCCESS)
    assert leader.take(1).bit_equal(first)
    drain(cluster)
    leader.admit(9)  # takes the whole pool (one default allocation)
    second = payload(64, picture, 36, seed=5)
    leader.admit(2, items=list(second.items))
    quiet(cluster)
    assert sender.lookup_items(2) == {b"picture"}
    blocks = first_allocation(cluster, 2)
    sender.submit(2, second)
    quiet(cluster)
    assert sender.stats.announced == 1 and leader.state(2) is RequestState.BOOTSTRAPPING
    sender.submit(9, random_payload(40, DIM, seed=6))
    cluster.run_until(lambda: leader.state(2) is RequestState.SUCCESS)
    assert blocks == [1] and leader._lookup(2).resumes == 0  # the 100 text rows, not the payload's 356
    assert leader.take(2).bit_equal(second)
    drain(cluster)


def test_expected_tokens_at_admission_wins_over_an_announcement() -> None:
    cluster = make_cluster((1, 1, 1))
    blocks = first_allocation(cluster, 1)
    assert transfer_with_hints(cluster, random_payload(1000, DIM, seed=1), expected_tokens=1000,
                               announce=3000) == 0
    assert blocks == [8]


# --------------------------------------------------------------------------- content-hash reuse


def cached_cluster(topology: tuple[int, int, int] = (1, 1, 2), cache_bytes: int = 1 << 20) -> LocalCluster:
    return make_cluster(topology, cache_bytes=cache_bytes)


def admit_with_hash(cluster: LocalCluster, request_id: int, key: str) -> None:
    for receiver in cluster.receivers.values():
        receiver.admit(request_id, encoder_engine=0, content_hash=key)


def transfer_with_hash(cluster: LocalCluster, request_id: int, key: str, payload: Payload) -> list[Payload]:
    admit_with_hash(cluster, request_id, key)
    cluster.submit(request_id, payload)
    cluster.run_until(lambda: language_states(cluster, request_id) == {RequestState.SUCCESS})
    quiet(cluster)
    for sender in cluster.senders.values():
        sender.release(request_id)
    return [receiver.take(request_id) for receiver in cluster.receivers.values()]


def messages(cluster: LocalCluster) -> list[int]:
    return [endpoint.snapshot_stats()["messages"] for endpoint in cluster.endpoints]


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda t: f"enc_tp{t[1]}-lang_tp{t[2]}")
@pytest.mark.parametrize("encoder_submits", ["before the word arrives", "after", "never (lookup)"])
def test_a_repeated_hash_completes_everywhere_without_a_staging_message(topology, encoder_submits: str) -> None:
    cluster = cached_cluster(topology)
    payload = random_payload(3000, DIM, seed=1)
    transfer_with_hash(cluster, 1, "prompt+image-A", payload)
    sent = messages(cluster)
    assert min(sent) > 0

    admit_with_hash(cluster, 2, "prompt+image-A")
    assert cluster.leader.state(2) is RequestState.SUCCESS  # at once, inside admit
    if encoder_submits == "before the word arrives":
        cluster.submit(2, payload)
    quiet(cluster)
    assert language_states(cluster, 2) == {RequestState.SUCCESS}  # a hit on the leader is a hit everywhere
    assert all(sender.lookup(2) for sender in cluster.senders.values())
    if encoder_submits == "after":
        cluster.submit(2, payload)
    if encoder_submits != "never (lookup)":
        assert {sender.state(2) for sender in cluster.senders.values()} == {RequestState.SUCCESS}
        quiet(cluster)
    assert messages(cluster) == sent
    for receiver in cluster.receivers.values():
        assert receiver.take(2).bit_equal(payload)
        assert receiver.snapshot_stats()["cached"] == 1
    assert cluster.leader.cache.stats()["cache_hits"] == 1
    assert cluster.leader.cache.stats()["cache_misses"] == 1
    drain(cluster)


def test_evictions_keep_the_byte_bound_and_the_least_recently_used_goes_first() -> None:
    one = 1000 * (2 * DIM + 16)  # bytes of one 1000-token payload in the cache
    cluster = cached_cluster(cache_bytes=2 * one + one // 2)
    payloads = {key: random_payload(1000, DIM, seed=i) for i, key in enumerate("ABCDE")}
    rid = 0
    for key in "AB":
        rid += 1
        transfer_with_hash(cluster, rid, key, payloads[key])
    rid += 1
    admit_with_hash(cluster, rid, "A")  # a hit: A is now the most recently used
    quiet(cluster)
    for receiver in cluster.receivers.values():
        receiver.take(rid)
    for key in "CDE":
        rid += 1
        transfer_with_hash(cluster, rid, key, payloads[key])
        for receiver in cluster.receivers.values():
            assert receiver.cache.bytes <= receiver.cache.capacity_bytes
    for receiver in cluster.receivers.values():
        assert [key for _, key in receiver.cache.entries] == [b"D", b"E"]
        assert receiver.cache.stats()["cache_evictions"] == 3
    # B went before A (A had been used since): B is a miss now, A was evicted after it.
    assert cluster.leader.cache.stats()["cache_misses"] == 5
    big = random_payload(3000, DIM, seed=9)  # larger than the whole cache: not kept
    rid += 1
    transfer_with_hash(cluster, rid, "big", big)
    assert all([key for _, key in r.cache.entries] == [b"D", b"E"] for r in cluster.receivers.values())
    drain(cluster)


def test_tp_ranks_keep_identical_caches() -> None:
    one = 700 * (2 * DIM + 16)
    cluster = cached_cluster((1, 2, 2), cache_bytes=3 * one)
    payloads = {key: random_payload(700, DIM, seed=i) for i, key in enumerate("ABCDEF")}
    for rid, key in enumerate("ABCADBEDF", start=1):
        if cluster.leader.cache.contains(key.encode()):
            admit_with_hash(cluster, rid, key)
            quiet(cluster)
            copies = [receiver.take(rid) for receiver in cluster.receivers.values()]
        else:
            copies = transfer_with_hash(cluster, rid, key, payloads[key])
        assert all(copy.bit_equal(payloads[key]) for copy in copies)
        orders = {tuple(receiver.cache.entries) for receiver in cluster.receivers.values()}
        assert len(orders) == 1, orders
    hits = cluster.leader.cache.stats()
    assert hits["cache_hits"] == 2 and hits["cache_evictions"] == 4
    for receiver in cluster.receivers.values():
        assert receiver.snapshot_stats()["cached"] == 2
        assert receiver.cache.stats() | {"cache_misses": 0} == hits | {"cache_misses": 0}
    drain(cluster)


def test_cached_tensors_are_never_handed_out_twice() -> None:
    cluster = cached_cluster((1, 1, 1))
    payload = random_payload(500, DIM, seed=1)
    (first,) = transfer_with_hash(cluster, 1, "A", payload)
    first.embeddings.zero_()  # the engine owns what it took: the cache kept its own copy
    hits = []
    for rid in (2, 3):
        admit_with_hash(cluster, rid, "A")
        hits.append(cluster.leader.take(rid))
    second, third = hits
    assert second.bit_equal(payload) and third.bit_equal(payload)
    for name in ("embeddings", "fill_ids", "mrope_positions"):
        assert getattr(second, name).data_ptr() != getattr(third, name).data_ptr()
    second.embeddings.fill_(1.0)
    second.mrope_positions.zero_()
    assert third.bit_equal(payload)
    admit_with_hash(cluster, 4, "A")
    assert cluster.leader.take(4).bit_equal(payload)
    drain(cluster)


def test_a_follower_abort_racing_completion_keeps_the_caches_identical() -> None:
    cluster = cached_cluster((1, 1, 2))
    follower = cluster.receivers[2]
    payload = random_payload(700, DIM, seed=1)
    admit_with_hash(cluster, 1, "A")
    cluster.submit(1, payload)
    # The follower has read the last round and told the leader; the leader's decision is on its way.
    cluster.run_until(lambda: follower.requests[1].round_read)
    follower.abort(1, "the client went away (seen on this rank)")
    quiet(cluster)
    for endpoint in cluster.endpoints:
        endpoint.release(1)
    admit_with_hash(cluster, 2, "A")
    cluster.submit(2, payload)
    cluster.run_until(lambda: all(s is not None and s.terminal for s in language_states(cluster, 2)))
    assert language_states(cluster, 2) == {RequestState.SUCCESS}, {r.rank: r.error(2) for r in cluster.receivers.values()}
    assert len({tuple(receiver.cache.entries) for receiver in cluster.receivers.values()}) == 1
