"""A model of the engine-facing API (docs/integration.md), checked on a CPU LocalCluster.

A hypothesis state machine plays the router and every TP rank of every engine of a small
layout at once: it routes request ids to (encoder engine, language engine) pairs, admits
and submits them in either order with any number of steps in between (on some TP ranks
first, the rest later, one by one or in batches, with size hints or announcements),
steps the cluster, takes what finished, aborts from either side at any moment, releases,
re-uses ids, and makes every kind of bad call. It checks, after every call:

- a bad call raises (ValueError / KeyError) naming the field, and changes nothing;
- states only move forward through the lifecycle tables, `finished()` reports each
  request once on each rank, as soon as it is terminal, and `arrived()` never goes back;
- an abort turns the aborting rank FAILED at once with `user: <message>`;

and at the end of each run (every due admit and submit made, everything run to the
end, taken or released): every request succeeded on every rank of both engines unless it
was aborted, an aborted one failed everywhere unless its completion was already on its
way (an abort on the language leader, or any abort before the leader allocated, leaves
no such way), every payload taken is bit-exact, a request whose size the leader knew
before allocating needed no resume, and no rank holds a block, a request or output
bytes; a fresh request then still goes through every engine pair bit-exact.

`EMBXFER_TEST_API_MODEL_EXAMPLES` and `EMBXFER_TEST_API_MODEL_STEPS` search harder (defaults keep
the file well under a minute on two cores).

Paths of a reused id that the runtime cannot tell from its previous request are kept out
of the generated runs, each behind one flag at the top. What the model found and the
runtime now does right is checked by the tests named after it (test_aborts.py,
test_protocol.py, test_batch_calls.py, test_config.py).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from embxfer import Config, LocalCluster, Payload, RequestState, Topology
from embxfer.kernels import staging_nbytes
from embxfer.runtime.local import random_payload

S = RequestState
EXAMPLES = int(os.environ.get("EMBXFER_TEST_API_MODEL_EXAMPLES", "150"))
STEPS = int(os.environ.get("EMBXFER_TEST_API_MODEL_STEPS", "50"))
MAX_INCARNATIONS = 10  # routings per run (ids re-used included)
# Order of the language side's states (the encoder side skips WAITING_FOR_INPUT).
PROGRESS = {S.BOOTSTRAPPING: 0, S.WAITING_FOR_INPUT: 1, S.TRANSFERRING: 2, S.SUCCESS: 3, S.FAILED: 3}
IN_FLIGHT = (S.BOOTSTRAPPING, S.WAITING_FOR_INPUT, S.TRANSFERRING)

# Reused ids that the runtime cannot tell apart from their previous request (records and
# aborts name the id, not the request: docs/integration.md, "An abort names the id").
# These paths are kept out of the generated runs; True lets the model generate one (and
# fail on it).
# An abort for a reused id that reaches a rank still holding the id's previous, finished
# request, or remembering it once handed back, is dropped there as late (a rank of the
# other engine, or a TP peer of the aborting rank): that rank's later admit/submit of the
# new request does not fail, which then waits.
ABORT_BEFORE_THE_OTHER_SIDE_SEES_A_REUSED_ID = False
# An abort still on its way when the other side (which aborted too, or completed) forgets
# the id and admits/submits it again fails the id's next request. Off: an id aborted
# anywhere is routed again only after two steps (every record of it read by every rank).
REUSE_AN_ID_RIGHT_AFTER_AN_ABORT = False
# A language TP follower that still remembers a reused id's previous request drops its
# leader's ADMIT decision for the new one as late; its engine's admit a step later then
# makes a request that never gets its round. Off: such a request is admitted on all its
# language ranks at once.
FOLLOWER_ADMITS_A_REUSED_ID_LATE = False
# What reaches an encoder rank after it aborted a request is kept for the id's next
# request: a round-0 allocation (that request, submitted before its own allocation comes,
# is sent with the old one and waits) or the language side's abort (it fails at its
# submit). Off: an id the encoder side aborted is not routed again.
REUSE_AN_ID_THE_ENCODER_ABORTED = False
# A rank that aborts a request it has not bound to the other engine yet (an encoder rank
# without an allocation, a language TP follower before its first segment) tells every
# engine of the other role, which remember it: the id routed there later fails at once.
# Off: an aborted id is routed again only to the same engine pair.
REUSE_AN_ABORTED_ID_ON_OTHER_ENGINES = False


@dataclass(eq=False)
class Incarnation:
    """One routing of a request id to an engine pair, from the router's decision until
    every rank of both engines has forgotten it."""

    rid: int
    encoder: int
    language: int
    payload: Payload
    target: int | None  # `language_engine=` at submit (None: whoever allocates it)
    admitted: set[int] = field(default_factory=set)  # language ranks whose engine admitted it
    submitted: set[int] = field(default_factory=set)  # encoder ranks whose engine submitted it
    gave_up: bool = False  # the encoder engine gave up on it: no rank submits it any more
    announced: int | None = None  # the last size announced before the language leader admitted it
    exact: bool = False  # the language leader knew N (right) before its first allocation
    aborted: bool = False  # some rank aborted it while it was in flight (or never submitted)
    encoder_aborted: bool = False  # an encoder rank aborted it while it was in flight there
    strict: bool = False  # ... so early that no completion can have been on its way
    last_abort: int | None = None  # the model's step count at the last abort of it (either side)
    final: dict[int, S] = field(default_factory=dict)  # rank -> state when it forgot the request
    leader_resumes: int | None = None

    @property
    def n(self) -> int:
        return self.payload.num_tokens

    def __repr__(self) -> str:
        return f"Incarnation(id={self.rid}, encoder{self.encoder} -> language{self.language}, N={self.n})"


@dataclass(eq=False)
class Track:
    """What the model saw of one incarnation on one rank that holds it."""

    inc: Incarnation
    last: S | None = None
    reported: bool = False  # finished() named it
    rows: int = 0  # arrived() so far (language ranks)

    def __repr__(self) -> str:
        return f"Track({self.inc!r}, {self.last})"


def fingerprint(cluster: LocalCluster) -> list:
    """Everything a refused call must leave as it was, on every rank and on the bus."""
    out = []
    for e in cluster.endpoints:
        part = [e.rank, sorted((rid, r.state.value, r.error) for rid, r in e.requests.items()),
                list(e.retired.items()), e.in_flight, e._blocks_in_use(), e.stats.as_dict(),
                len(e.bus.outbox.records), list(e._just_finished), e.draining,
                [len(getattr(c, "queue", ())) for c in e.channels.values()]]
        for name in ("output_bytes", "_early_aborts", "_announced", "_admission", "_awaiting_free",
                     "_early_allocations", "_early_completions", "_unallocated_new"):
            value = getattr(e, name, None)
            if value is not None:
                part.append((name, value if isinstance(value, int) else len(value)))
        out.append(part)
    out.append(sorted((rank, len(inbox)) for rank, inbox in cluster.bus_hub.inboxes.items()))
    return out


def bits_of(payload: Payload) -> bytes:
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes()
                    for t in (payload.embeddings, payload.fill_ids, payload.mrope_positions, payload.deepstack)
                    if t is not None)


class ApiModel(RuleBasedStateMachine):
    """Router, language engines and encoder engines of one LocalCluster, driven by
    hypothesis; the checks are described in the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.cluster: LocalCluster | None = None
        self.incs: list[Incarnation] = []
        self.current: dict[int, Incarnation] = {}  # id -> its latest routing
        self.live: dict[int, dict[int, Track]] = {}  # rank -> id -> what its engine holds
        self.forgotten: dict[int, set[int]] = {}  # rank -> ids its engine took or released
        self.unused = 10**15  # ids never routed: unknown everywhere
        self.fresh_small = 0
        self.fresh_huge = 0
        self.steps = 0  # cluster steps so far

    # -- set-up ------------------------------------------------------------------------------
    @initialize(data=st.data())
    def setup(self, data: st.DataObject) -> None:
        d = data.draw
        topology = Topology(d(st.integers(1, 2), label="encoders"), d(st.integers(1, 2), label="encoder_tp"),
                            d(st.integers(1, 2), label="language_tp"), d(st.integers(1, 2), label="languages"))
        self.dim = d(st.sampled_from([8, 16, 24, 64]), label="dim")
        self.layers = d(st.sampled_from([0, 0, 1, 2]), label="deepstack_layers")
        self.dtype = d(st.sampled_from([torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]),
                       label="dtype")
        block = d(st.sampled_from([4, 8, 16]), label="block_size")
        default = block * d(st.integers(1, 4)) - d(st.sampled_from([0, 0, 1]))  # sometimes not whole blocks
        default_blocks = -(-default // block)
        pool_blocks = default_blocks * d(st.integers(1, 3)) + d(st.integers(0, 2))
        self.default_tokens = min(default_blocks, pool_blocks) * block
        self.pool_tokens = pool_blocks * block
        self.max_tokens = 3 * self.default_tokens
        row = self.dtype.itemsize * self.dim * (1 + self.layers) + 16
        budget = d(st.sampled_from([None, 1, 2]), label="budget")  # x the largest request: rounds wait for it
        self.metadata_bound = d(st.sampled_from([1024, 64]), label="max_metadata_bytes")
        self.config = Config(
            block_size=block, default_alloc_tokens=default, language_pool_blocks=pool_blocks,
            staging_bytes=staging_nbytes(d(st.sampled_from([1, 2, 5, 40]), label="message rows"), self.dim,
                                         self.dim * self.layers, self.dtype) + d(st.sampled_from([0, 7])),
            staging_depth=d(st.integers(1, 2)), max_segments_per_message=d(st.sampled_from([1, 3, 64])),
            max_resume_tokens=d(st.sampled_from([0, 0, block])),
            output_budget_bytes=(8 << 30) if budget is None else budget * self.max_tokens * row,
            max_metadata_bytes=self.metadata_bound,
        )
        self.topology = topology
        self.cluster = LocalCluster(topology, self.config, dim=self.dim, dtype=self.dtype,
                                    deepstack_layers=self.layers)
        self.live = {e.rank: {} for e in self.cluster.endpoints}
        self.forgotten = {e.rank: set() for e in self.cluster.endpoints}

    # -- helpers -----------------------------------------------------------------------------
    def endpoint(self, rank: int):
        return self.cluster.receivers.get(rank) or self.cluster.senders[rank]

    def language_ranks(self, inc: Incarnation) -> list[int]:
        return self.topology.language_engine_ranks(inc.language)

    def encoder_ranks(self, inc: Incarnation) -> list[int]:
        return self.topology.encoder_ranks(inc.encoder)

    def leader_of(self, inc: Incarnation) -> int:
        return self.language_ranks(inc)[0]

    def open_incs(self) -> list[Incarnation]:
        return [inc for inc in self.incs if not self.closed(inc)]

    def closed(self, inc: Incarnation) -> bool:
        """Every rank that will ever hold it has forgotten it."""
        return all(r in inc.final for r in self.language_ranks(inc)) and not self.submit_ranks(inc) \
            and all(r in inc.final for r in inc.submitted)

    def admit_ranks(self, inc: Incarnation) -> list[int]:
        """Language ranks whose engine still has to admit `inc`."""
        return [r for r in self.language_ranks(inc) if r not in inc.admitted and inc.rid not in self.live[r]]

    def submit_ranks(self, inc: Incarnation) -> list[int]:
        """Encoder ranks whose engine still has to submit `inc` (and may now: the id's
        previous incarnation is released there)."""
        if inc.gave_up:
            return []
        return [r for r in self.encoder_ranks(inc) if r not in inc.submitted]

    def free_submit_ranks(self, inc: Incarnation) -> list[int]:
        return [r for r in self.submit_ranks(inc) if inc.rid not in self.live[r]]

    def tracked(self, language: bool, where=None) -> list[tuple[int, int, Track]]:
        """(rank, id, track) of what the engines hold, on one side, filtered by state."""
        out = []
        for rank, tracks in self.live.items():
            if (rank in self.cluster.receivers) != language:
                continue
            for rid, track in tracks.items():
                if where is None or where(self.endpoint(rank).state(rid)):
                    out.append((rank, rid, track))
        return sorted(out, key=lambda item: (item[0], item[1]))

    def pick(self, data: st.DataObject, incs: list[Incarnation], label: str) -> Incarnation:
        """One of `incs`, drawn (and shown) by its index in the run."""
        return self.incs[data.draw(st.sampled_from([self.incs.index(inc) for inc in incs]), label=label)]

    def pick_held(self, data: st.DataObject, held: list[tuple[int, int, Track]], label: str) -> tuple[int, int, Track]:
        """One of `held` (`tracked()` items), drawn (and shown) as (rank, id)."""
        rank, rid = data.draw(st.sampled_from([(rank, rid) for rank, rid, _ in held]), label=label)
        return rank, rid, self.live[rank][rid]

    def leader_state(self, inc: Incarnation) -> S | None:
        """The language leader's state of `inc` (as it forgot it, once it did); None while
        its engine has not admitted it."""
        leader = self.leader_of(inc)
        if leader in inc.final:
            return inc.final[leader]
        return self.endpoint(leader).state(inc.rid) if leader in inc.admitted else None

    def reusable(self, inc: Incarnation) -> bool:
        """The router may route `inc`'s id again: no engine has it in flight (the language
        side forgot it; every encoder rank submitted it, or gave up, and holds it finished)."""
        if not REUSE_AN_ID_THE_ENCODER_ABORTED and (inc.encoder_aborted or inc.gave_up):
            return False
        if not REUSE_AN_ID_RIGHT_AFTER_AN_ABORT and inc.last_abort is not None and self.steps < inc.last_abort + 2:
            return False
        return all(r in inc.final for r in self.language_ranks(inc)) and not self.submit_ranks(inc) \
            and all(self.endpoint(r).state(inc.rid).terminal for r in inc.submitted if r not in inc.final)

    def pairs_for(self, rid: int) -> list[tuple[int, int]]:
        """The (encoder, language) engine pairs the router may route `rid` to: any, or only
        the pair of an earlier aborted incarnation (REUSE_AN_ABORTED_ID_ON_OTHER_ENGINES)."""
        pairs = [(e, lang) for e in range(self.topology.encoders) for lang in range(self.topology.languages)]
        if not REUSE_AN_ABORTED_ID_ON_OTHER_ENGINES:
            for inc in self.incs:
                if inc.rid == rid and inc.aborted:
                    pairs = [pair for pair in pairs if pair == (inc.encoder, inc.language)]
        return pairs

    def fresh_id(self, huge: bool) -> int:
        if huge:
            self.fresh_huge += 1
            return 2**63 - self.fresh_huge
        self.fresh_small += 1
        return self.fresh_small - 1

    def unused_id(self) -> int:
        self.unused += 1
        return self.unused

    def follow(self, rank: int, inc: Incarnation) -> None:
        self.live[rank][inc.rid] = Track(inc)

    def forget(self, rank: int, rid: int, state: S) -> None:
        """`rank`'s engine took, released or aborted a finished request: it is remembered."""
        track = self.live[rank].pop(rid)
        track.inc.final[rank] = state
        if rank == self.leader_of(track.inc):
            track.inc.leader_resumes = self.endpoint(rank)._lookup(rid).resumes
        self.forgotten[rank].add(rid)
        endpoint = self.endpoint(rank)
        assert endpoint.state(rid) is state, f"rank {rank}: {rid} forgotten as {state}, remembered otherwise"
        assert endpoint.in_flight >= 0

    def refused(self, call, exception: type[Exception], needle: str) -> None:
        """`call()` raises `exception` whose message names `needle`, and changes nothing."""
        before = fingerprint(self.cluster)
        with pytest.raises(exception) as error:
            call()
        assert needle in str(error.value), f"{error.value!r} does not name {needle!r}"
        assert fingerprint(self.cluster) == before, f"a refused call ({error.value}) changed the cluster"

    def engine_arg(self, engine: int, role: str, data: st.DataObject) -> int | str:
        """An engine as an engine names it: its index, or its name."""
        return data.draw(st.sampled_from([engine, f"{role}{engine}"]), label=f"{role} engine as")

    def make_payload(self, n: int, seed: int, metadata: bool) -> Payload:
        p = random_payload(n, self.dim, dtype=self.dtype, deepstack_layers=self.layers, seed=seed)
        if not metadata:
            return p
        grid = torch.tensor([[1, n, seed % 7 + 1]], dtype=torch.int64)
        return Payload(p.embeddings, p.fill_ids, p.mrope_positions, p.mrope_delta, p.deepstack,
                       metadata={"image_grid_thw": grid})

    def check_taken(self, rank: int, rid: int, payload: Payload) -> None:
        inc = self.live[rank][rid].inc
        assert payload.bit_equal(inc.payload), \
            f"rank {rank}: {rid} arrived with {payload.mismatches(inc.payload)} different"
        assert bits_of(payload) == bits_of(inc.payload)

    def abort_counts(self, inc: Incarnation, strict: bool) -> None:
        """An abort of `inc` happened; `strict`: so early that every rank must end FAILED."""
        inc.aborted = True
        inc.strict = inc.strict or strict
        inc.last_abort = self.steps

    # -- the router ----------------------------------------------------------------------------
    @precondition(lambda self: len(self.incs) < MAX_INCARNATIONS)
    @rule(data=st.data())
    def route(self, data: st.DataObject) -> None:
        """The router picks an id (new, or one no engine has in flight any more) and a pair."""
        reusable = sorted(rid for rid, inc in self.current.items() if self.reusable(inc) and self.pairs_for(rid))
        if reusable and data.draw(st.booleans(), label="re-use an id"):
            rid = data.draw(st.sampled_from(reusable), label="id")
        else:
            rid = self.fresh_id(data.draw(st.booleans(), label="huge id"))
        encoder, language = data.draw(st.sampled_from(self.pairs_for(rid)), label="encoder, language")
        d = self.default_tokens  # around the allocation's edges, or anywhere up to three of them
        n = data.draw(st.sampled_from([1, d - 1, d, d + 1, 2 * d + 1, self.max_tokens]).filter(lambda k: k >= 1)
                      | st.integers(1, self.max_tokens), label="tokens")
        payload = self.make_payload(n, data.draw(st.integers(0, 2**16), label="seed"),
                                    data.draw(st.booleans(), label="metadata"))
        inc = Incarnation(rid, encoder, language, payload,
                          data.draw(st.sampled_from([language, None]), label="submit target"))
        self.incs.append(inc)
        self.current[rid] = inc

    # -- the language engine -------------------------------------------------------------------
    @precondition(lambda self: any(self.admit_ranks(inc) for inc in self.open_incs()))
    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        """Some (usually all) TP ranks of the language engine admit a request, or a batch."""
        inc = self.pick(data, [inc for inc in self.open_incs() if self.admit_ranks(inc)], "admit")
        due = self.admit_ranks(inc)
        mode = data.draw(st.sampled_from(["cluster", "each", "many"]), label="admit with")
        ranks = due if self.admit_together(inc) or mode == "cluster" or data.draw(st.booleans(), label="all ranks") else \
            data.draw(st.lists(st.sampled_from(due), min_size=1, unique=True), label="ranks")
        if mode == "cluster" and len(due) < len(self.language_ranks(inc)):
            mode = "each"
        engine = self.engine_arg(inc.encoder, "encoder", data)
        leader = self.leader_of(inc)
        if mode == "many":
            batch = [inc] + [other for other in self.open_incs() if other is not inc
                             and (other.encoder, other.language) == (inc.encoder, inc.language)
                             and (set(ranks) == set(self.admit_ranks(other)) or set(ranks) < set(self.admit_ranks(other))
                                  and not self.admit_together(other))
                             and data.draw(st.booleans(), label=f"batch {other.rid}")]
            for rank in ranks:
                self.endpoint(rank).admit_many([b.rid for b in batch], encoder_engine=engine)
            for b in batch:
                self.admitted(b, ranks, None)
            return
        hint = None
        if mode == "each":
            hint = data.draw(st.sampled_from([None, inc.n, max(1, inc.n // 2), 2 * inc.n]), label="expected")
        if mode == "cluster":
            self.cluster.admit(inc.rid, engine=inc.encoder, language=inc.language)
        else:
            for rank in ranks:
                self.endpoint(rank).admit(inc.rid, encoder_engine=engine, expected_tokens=hint)
        self.admitted(inc, ranks, hint)
        assert leader not in ranks or self.leader_state(inc) is not None

    def admit_together(self, inc: Incarnation) -> bool:
        """`inc` re-uses an id a language rank still remembers: all its ranks admit it at
        once (FOLLOWER_ADMITS_A_REUSED_ID_LATE)."""
        return not FOLLOWER_ADMITS_A_REUSED_ID_LATE and any(inc.rid in self.forgotten[r] for r in self.admit_ranks(inc))

    def admitted(self, inc: Incarnation, ranks: list[int], hint: int | None) -> None:
        """`ranks` admitted `inc` (the leader with `expected_tokens=hint`)."""
        for rank in ranks:
            inc.admitted.add(rank)
            self.follow(rank, inc)
        leader = self.leader_of(inc)
        if leader in ranks:
            inc.exact = (hint if hint is not None else inc.announced) == inc.n

    @precondition(lambda self: any(True for _ in self.tracked(True, lambda s: s is S.SUCCESS)))
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        """A language rank takes some of its SUCCESS requests, or every rank of the engine
        takes one (bit-exact, then forgotten)."""
        done = self.tracked(True, lambda s: s is S.SUCCESS)
        if data.draw(st.booleans(), label="on every rank"):
            rank, rid, track = self.pick_held(data, done, "take")
            batches = [(r, [rid]) for r, other, t in done if t.inc is track.inc]
        else:
            rank = data.draw(st.sampled_from(sorted({r for r, _, _ in done})), label="rank")
            batches = [(rank, data.draw(st.lists(st.sampled_from([rid for r, rid, _ in done if r == rank]),
                                                 min_size=1, unique=True), label="take"))]
        many = data.draw(st.booleans(), label="take_many")
        for rank, ids in batches:
            rx = self.endpoint(rank)
            for rid in ids:
                n = self.live[rank][rid].inc.n
                assert rx.arrived(rid) == (n, n)
            payloads = rx.take_many(ids) if many else [rx.take(rid) for rid in ids]
            for rid, payload in zip(ids, payloads, strict=True):
                self.check_taken(rank, rid, payload)
                self.forget(rank, rid, S.SUCCESS)
                self.refused(lambda rx=rx, rid=rid: rx.take(rid), ValueError, "already taken or released")

    @precondition(lambda self: any(True for _ in self.tracked(True, lambda s: s.terminal)))
    @rule(data=st.data())
    def language_release(self, data: st.DataObject) -> None:
        """A language rank, or every rank of the engine, releases (or aborts: the same for a
        finished one) a finished request: a SUCCESS not taken drops its payload."""
        for rank, rid in self.release_finished(True, data):
            self.refused(lambda rank=rank, rid=rid: self.endpoint(rank).take(rid), ValueError,
                         "already taken or released")

    def release_finished(self, language: bool, data: st.DataObject) -> list[tuple[int, int]]:
        """Release or abort a finished request on one rank of one side, or on every rank
        of that side that holds it finished; the (rank, id) acted on."""
        done = self.tracked(language, lambda s: s.terminal)
        rank, rid, track = self.pick_held(data, done, "release")
        held = [(r, other) for r, other, t in done if t.inc is track.inc] \
            if data.draw(st.booleans(), label="on every rank") else [(rank, rid)]
        abort = data.draw(st.booleans(), label="with abort")
        for rank, rid in held:
            endpoint = self.endpoint(rank)
            state = endpoint.state(rid)
            if abort:
                endpoint.abort(rid)
            else:
                endpoint.release(rid)
            self.forget(rank, rid, state)
        return held

    @precondition(lambda self: any(True for _ in self.tracked(True, lambda s: s in IN_FLIGHT)))
    @rule(data=st.data())
    def language_abort(self, data: st.DataObject) -> None:
        """One TP rank of the language engine aborts a request in flight."""
        rank, rid, track = self.pick_held(data, self.in_flight(True, data), "abort")
        inc = track.inc
        leader = self.leader_state(inc)
        if not ABORT_BEFORE_THE_OTHER_SIDE_SEES_A_REUSED_ID and self.reused_unseen(inc, self.encoder_ranks(inc)):
            return
        message = f"model: language abort of {rid}"
        self.endpoint(rank).abort(rid, message)
        assert self.endpoint(rank).state(rid) is S.FAILED
        assert self.endpoint(rank).error(rid) == f"user: {message}"
        is_leader = rank == self.leader_of(inc)
        self.abort_counts(inc, is_leader or leader in (None, S.BOOTSTRAPPING))

    def in_flight(self, language: bool, data: st.DataObject) -> list[tuple[int, int, Track]]:
        """What one side holds in flight; sometimes only what is TRANSFERRING (an abort
        then may cross the completion)."""
        held = self.tracked(language, lambda s: s in IN_FLIGHT)
        moving = [item for item in held if self.endpoint(item[0]).state(item[1]) is S.TRANSFERRING]
        return moving if moving and data.draw(st.booleans(), label="a transferring one") else held

    def reused_unseen(self, inc: Incarnation, ranks: list[int]) -> bool:
        """One of `ranks` holds or remembers an earlier incarnation of `inc`'s id and has not
        seen this one (ABORT_BEFORE_THE_OTHER_SIDE_SEES_A_REUSED_ID)."""
        return any(r not in inc.submitted and r not in inc.admitted
                   and (inc.rid in self.forgotten[r] or inc.rid in self.live[r]) for r in ranks)

    # -- the encoder engine --------------------------------------------------------------------
    @precondition(lambda self: any(self.free_submit_ranks(inc) for inc in self.open_incs()))
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        """Some (usually all) TP ranks of the encoder engine submit a request, or a batch;
        sometimes announcing its size first (right or wrong)."""
        inc = self.pick(data, [inc for inc in self.open_incs() if self.free_submit_ranks(inc)], "submit")
        due = self.free_submit_ranks(inc)
        mode = data.draw(st.sampled_from(["cluster", "each", "many"]), label="submit with")
        ranks = due if mode == "cluster" or data.draw(st.booleans(), label="all ranks") else \
            data.draw(st.lists(st.sampled_from(due), min_size=1, unique=True), label="ranks")
        if mode == "cluster" and len(due) < len(self.encoder_ranks(inc)):
            mode = "each"
        if data.draw(st.booleans(), label="announce"):
            size = data.draw(st.sampled_from([inc.n, inc.n, inc.n + 1, max(1, inc.n - 1)]), label="announced")
            named = inc.language if self.topology.languages > 1 or data.draw(st.booleans()) else None
            for rank in self.encoder_ranks(inc):
                self.endpoint(rank).announce(inc.rid, size, language_engine=named)
            if self.leader_state(inc) is None and self.leader_of(inc) not in inc.admitted:
                inc.announced = size
        target = None if inc.target is None else self.engine_arg(inc.target, "language", data)
        if mode == "many":
            batch = [inc] + [other for other in self.open_incs() if other is not inc
                             and (other.encoder, other.target) == (inc.encoder, inc.target)
                             and set(ranks) <= set(self.free_submit_ranks(other))
                             and data.draw(st.booleans(), label=f"batch {other.rid}")]
            for rank in ranks:
                self.endpoint(rank).submit_many([(b.rid, b.payload) for b in batch], language_engine=target)
            for b in batch:
                self.submitted(b, ranks)
            return
        if mode == "cluster":
            self.cluster.submit(inc.rid, inc.payload, engine=inc.encoder, language=inc.target)
        else:
            for rank in ranks:
                self.endpoint(rank).submit(inc.rid, inc.payload, language_engine=target)
        self.submitted(inc, ranks)

    def submitted(self, inc: Incarnation, ranks: list[int]) -> None:
        for rank in ranks:
            inc.submitted.add(rank)
            self.follow(rank, inc)

    @precondition(lambda self: any(True for _ in self.tracked(False, lambda s: s.terminal)))
    @rule(data=st.data())
    def encoder_release(self, data: st.DataObject) -> None:
        """An encoder rank, or every rank of the engine, releases (or aborts: the same) a
        finished request."""
        self.release_finished(False, data)

    @precondition(lambda self: any(True for _ in self.tracked(False, lambda s: s in IN_FLIGHT)))
    @rule(data=st.data())
    def encoder_abort(self, data: st.DataObject) -> None:
        """One TP rank of the encoder engine aborts a request in flight there."""
        rank, rid, track = self.pick_held(data, self.in_flight(False, data), "abort")
        inc = track.inc
        if not ABORT_BEFORE_THE_OTHER_SIDE_SEES_A_REUSED_ID \
                and self.reused_unseen(inc, self.language_ranks(inc) + self.encoder_ranks(inc)):
            return  # (also the engine's own ranks that have not submitted it yet)
        leader = self.leader_state(inc)
        message = f"model: encoder abort of {rid}"
        inc.encoder_aborted = True
        self.endpoint(rank).abort(rid, message)
        assert self.endpoint(rank).state(rid) is S.FAILED
        assert self.endpoint(rank).error(rid) == f"user: {message}"
        self.abort_counts(inc, leader in (None, S.BOOTSTRAPPING, S.WAITING_FOR_INPUT))

    def may_give_up(self, inc: Incarnation) -> bool:
        """Some encoder rank has not submitted `inc`, and none still holds the id's previous
        incarnation (an abort there would release that one)."""
        return bool(self.submit_ranks(inc)) and self.submit_ranks(inc) == self.free_submit_ranks(inc)

    @precondition(lambda self: any(self.may_give_up(inc) for inc in self.open_incs()))
    @rule(data=st.data())
    def encoder_gives_up(self, data: st.DataObject) -> None:
        """The encoder engine gives up on a request some of its ranks never submitted (its
        vision model failed): every rank calls abort (in any order: whichever comes first
        tells the language side); no rank submits it any more."""
        inc = self.pick(data, [inc for inc in self.open_incs() if self.may_give_up(inc)], "give up")
        if not ABORT_BEFORE_THE_OTHER_SIDE_SEES_A_REUSED_ID and self.reused_unseen(inc, self.language_ranks(inc)):
            return
        leader = self.leader_state(inc)
        message = f"model: encoder gives up on {inc.rid}"
        aborted = False
        for rank in data.draw(st.permutations(self.encoder_ranks(inc)), label="ranks in order"):
            tx = self.endpoint(rank)
            state = tx.state(inc.rid) if inc.rid in self.live[rank] else None
            tx.abort(inc.rid, message)
            if state is None or state in IN_FLIGHT:
                aborted = True  # never submitted here: the language side is told; in flight: FAILED
            if state in IN_FLIGHT:
                inc.encoder_aborted = True
                assert tx.state(inc.rid) is S.FAILED and tx.error(inc.rid) == f"user: {message}"
            elif state is not None:
                self.forget(rank, inc.rid, state)
        inc.gave_up = True
        if aborted:
            self.abort_counts(inc, leader in (None, S.BOOTSTRAPPING, S.WAITING_FOR_INPUT))

    # -- time --------------------------------------------------------------------------------------
    @rule(count=st.sampled_from([1, 1, 2, 5, 30]))
    def step(self, count: int) -> None:
        """Every rank makes `count` progress() calls (the checks run after each)."""
        for _ in range(count):
            self.cluster.step()
            self.steps += 1
            self.observe()

    @rule(count=st.sampled_from([1, 3, 10]))
    def engine_loops(self, count: int) -> None:
        """`count` iterations of every engine's loop: a step, then every rank takes or
        releases what finished."""
        for _ in range(count):
            self.cluster.step()
            self.steps += 1
            self.engines_act(serve_due=False)

    # -- bad calls ---------------------------------------------------------------------------------
    @precondition(lambda self: self.incs)
    @rule(data=st.data())
    def bad_arguments(self, data: st.DataObject) -> None:
        """Calls with arguments no state makes right: ValueError/KeyError naming the field."""
        rx = self.endpoint(data.draw(st.sampled_from(sorted(self.cluster.receivers)), label="language rank"))
        tx = self.endpoint(data.draw(st.sampled_from(sorted(self.cluster.senders)), label="encoder rank"))
        endpoint = data.draw(st.sampled_from([rx, tx]), label="side")
        good = self.make_payload(3, 1, False)
        fresh, other = self.unused_id(), self.unused_id()
        bad_id = data.draw(st.sampled_from([-1, 2**63, True, "7", 1.0, None]), label="bad id")
        bad_seconds = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, -1, -1e-9, True, "1"]),
                                label="bad seconds")
        bad_count = data.draw(st.sampled_from([0, -1, True, 2**32, 1.5, "3"]), label="bad count")
        wrong = {
            "dim": random_payload(3, self.dim + 1, dtype=self.dtype, deepstack_layers=self.layers),
            "dtype": random_payload(3, self.dim, dtype=torch.float32 if self.dtype != torch.float32
                                    else torch.bfloat16, deepstack_layers=self.layers),
            "deepstack": random_payload(3, self.dim, dtype=self.dtype, deepstack_layers=self.layers + 1),
        }
        kind = data.draw(st.sampled_from(sorted(wrong)), label="wrong payload")
        bad_encoder = data.draw(st.sampled_from([-1, True, 1.5]), label="bad encoder engine")
        bad_language = data.draw(st.sampled_from([-1, True]), label="bad language engine")
        needle = "payload.deepstack" if kind == "deepstack" else "payload.embeddings"
        cases = [
            (lambda: endpoint.state(bad_id), ValueError, "request_id"),
            (lambda: endpoint.state(fresh), KeyError, str(fresh)),
            (lambda: endpoint.abort(bad_id), ValueError, "request_id"),
            (lambda: endpoint.release(bad_id), ValueError, "request_id"),
            (lambda: endpoint.wait(bad_seconds), ValueError, "timeout"),
            (lambda: endpoint.drain(timeout_s=bad_seconds), ValueError, "timeout_s"),
            (lambda: endpoint.drain(timeout_s=0), ValueError, "timeout_s"),
            (lambda: rx.admit(bad_id), ValueError, "request_id"),
            (lambda: rx.admit(fresh, encoder_engine=self.topology.encoders), ValueError, "encoder_engine"),
            (lambda: rx.admit(fresh, encoder_engine=bad_encoder), ValueError, "engine"),
            (lambda: rx.admit(fresh, expected_tokens=bad_count), ValueError, "expected_tokens"),
            (lambda: rx.admit(fresh, content_hash=b""), ValueError, "content_hash"),
            (lambda: rx.admit_many([fresh, other, fresh]), ValueError, "request_ids[2]"),
            (lambda: rx.admit_many([fresh, bad_id]), ValueError, "request_ids[1]"),
            (lambda: rx.admit_many(fresh), ValueError, "request_ids"),
            (lambda: rx.take(bad_id), ValueError, "request_id"),
            (lambda: rx.take(fresh), KeyError, str(fresh)),
            (lambda: rx.take_many([fresh]), KeyError, str(fresh)),
            (lambda: rx.take_many([other, other]), ValueError, "request_ids[1]"),
            (lambda: rx.arrived(bad_id), ValueError, "request_id"),
            (lambda: rx.arrived(fresh), KeyError, str(fresh)),
            (lambda: tx.submit(bad_id, good), ValueError, "request_id"),
            (lambda: tx.submit(fresh, "not a payload"), ValueError, "payload"),
            (lambda: tx.submit(fresh, wrong[kind]), ValueError, needle),
            (lambda: tx.submit(fresh, good, language_engine=bad_language), ValueError, "engine"),
            (lambda: tx.submit_many([(fresh, good), (other, wrong[kind])]), ValueError, "submits[1]"),
            (lambda: tx.submit_many([(fresh, good), (fresh, good)]), ValueError, "submits[1]"),
            (lambda: tx.submit_many([(fresh,)]), ValueError, "submits[0]"),
            (lambda: tx.submit_many("12"), ValueError, "submits"),
            (lambda: tx.announce(fresh, bad_count), ValueError, "num_tokens"),
            (lambda: tx.announce(bad_id, 5), ValueError, "request_id"),
        ]
        if self.metadata_bound < 1024:
            big = self.make_payload(3, 2, True)
            big = Payload(big.embeddings, big.fill_ids, big.mrope_positions, big.mrope_delta, big.deepstack,
                          metadata={"t": torch.zeros(self.metadata_bound + 1, dtype=torch.uint8)})
            cases.append((lambda: tx.submit(fresh, big), ValueError, "max_metadata_bytes"))
        call, exception, needle = data.draw(st.sampled_from(cases), label="bad call")
        self.refused(call, exception, needle)

    @precondition(lambda self: any(self.live.values()))
    @rule(data=st.data())
    def bad_calls_in_a_state(self, data: st.DataObject) -> None:
        """Calls the lifecycle tables refuse in the request's present state: admit or submit
        of an id in flight, take of one not SUCCESS, release of one in flight, and batches
        with one such entry: ValueError naming it, and nothing of the batch acts."""
        rank, rid, track = self.pick_held(data, self.tracked(True) + self.tracked(False), "held")
        endpoint = self.endpoint(rank)
        state = endpoint.state(rid)
        fresh = self.unused_id()
        cases = []
        if rank in self.cluster.receivers:
            cases += [(lambda: endpoint.admit(rid), ValueError, "already admitted"),
                      (lambda: endpoint.admit_many([fresh, rid]), ValueError, f"request_ids[1]={rid}: already")]
            if state is not S.SUCCESS:
                cases += [(lambda: endpoint.take(rid), ValueError, "take() needs state SUCCESS"),
                          (lambda: endpoint.take_many([rid]), ValueError, f"request_ids[0]={rid}")]
                success = [r for at, r, _ in self.tracked(True, lambda s: s is S.SUCCESS) if at == rank]
                if success:
                    cases.append((lambda: endpoint.take_many([success[0], rid]), ValueError,
                                  f"request_ids[1]={rid}"))
        else:
            p = track.inc.payload
            cases += [(lambda: endpoint.submit(rid, p), ValueError, "already submitted"),
                      (lambda: endpoint.submit_many([(fresh, p), (rid, p)]), ValueError, "submits[1]")]
        if state in IN_FLIGHT:
            cases.append((lambda: endpoint.release(rid), ValueError, "release() needs a finished request"))
        call, exception, needle = data.draw(st.sampled_from(cases), label="call")
        self.refused(call, exception, needle)

    @precondition(lambda self: self.incs)
    @rule(data=st.data())
    def harmless_calls(self, data: st.DataObject) -> None:
        """What the tables call a no-op changes nothing: release of an unknown or forgotten
        id on either side, abort of one on the language side, take of a forgotten one
        (ValueError while it is remembered)."""
        rank = data.draw(st.sampled_from(sorted(self.live)), label="rank")
        endpoint = self.endpoint(rank)
        forgotten = sorted(rid for rid in self.forgotten[rank] if self.harmless(rank, rid))
        rid = data.draw(st.sampled_from([self.unused_id(), *forgotten]), label="id")
        before = fingerprint(self.cluster)
        endpoint.release(rid)
        if rank in self.cluster.receivers:
            endpoint.abort(rid)
        assert fingerprint(self.cluster) == before
        if rank in self.cluster.receivers and rid in forgotten:
            self.refused(lambda: endpoint.take(rid), ValueError, "already taken or released")

    def harmless(self, rank: int, rid: int) -> bool:
        """`rank` forgot `rid` and cannot hold a newer incarnation of it (a language TP
        follower may, before its engine admits it: the leader's decision came first)."""
        if rid in self.live[rank]:
            return False
        latest = self.current[rid]
        return rank not in self.cluster.receivers or latest.language != self.topology.engine_of(rank) \
            or rank in latest.final

    # -- checks after every call -------------------------------------------------------------------
    @invariant()
    def observe(self) -> None:
        """finished() names each request once, when it is terminal; states move forward;
        arrived() grows up to N."""
        if self.cluster is None:
            return
        for e in self.cluster.endpoints:
            for rid in e.finished():
                track = self.live[e.rank].get(rid)
                assert track is not None, f"rank {e.rank}: finished() named {rid}, which its engine does not hold"
                assert not track.reported, f"rank {e.rank}: finished() named {rid} twice"
                assert e.state(rid).terminal, f"rank {e.rank}: finished() named {rid} in {e.state(rid)}"
                track.reported = True
        for rank, tracks in self.live.items():
            e = self.endpoint(rank)
            language = rank in self.cluster.receivers
            for rid, track in tracks.items():
                state = e.state(rid)
                assert language or state is not S.WAITING_FOR_INPUT
                if track.last is not None:
                    assert PROGRESS[state] >= PROGRESS[track.last], f"rank {rank}: {rid} {track.last} -> {state}"
                    assert not track.last.terminal or state is track.last, f"rank {rank}: {rid} {track.last} -> {state}"
                track.last = state
                assert not state.terminal or track.reported, f"rank {rank}: {rid} is {state}, finished() never said"
                if language:
                    rows, total = e.arrived(rid)
                    assert total in (None, track.inc.n) and 0 <= rows <= track.inc.n, (rank, rid, rows, total)
                    if state is S.SUCCESS:
                        assert (rows, total) == (track.inc.n, track.inc.n)
                    elif state in IN_FLIGHT:
                        assert rows >= track.rows, f"rank {rank}: arrived({rid}) went back from {track.rows} to {rows}"
                        track.rows = rows

    # -- the end of a run ----------------------------------------------------------------------------
    def teardown(self) -> None:
        if self.cluster is None:
            return
        try:
            if sys.exc_info()[0] is None:  # (a run that failed already is not finished)
                self.finish()
        finally:
            self.cluster.close()

    def engines_act(self, serve_due: bool = True) -> None:
        """What the engines' loops do: take or release what finished and, with `serve_due`
        (at the end of a run), admit and submit what the router still has due."""
        self.observe()
        for rank in sorted(self.live):
            endpoint = self.endpoint(rank)
            done = {rid: endpoint.state(rid) for rid in self.live[rank] if endpoint.state(rid).terminal}
            success = [rid for rid, state in done.items() if state is S.SUCCESS and rank in self.cluster.receivers]
            if success:
                for rid, payload in zip(success, endpoint.take_many(success), strict=True):
                    self.check_taken(rank, rid, payload)
                    self.forget(rank, rid, S.SUCCESS)
            for rid, state in done.items():
                if rid in self.live[rank]:
                    endpoint.release(rid)
                    self.forget(rank, rid, state)
        for inc in self.open_incs() if serve_due else ():
            ranks = self.admit_ranks(inc)
            for rank in ranks:
                self.endpoint(rank).admit(inc.rid, encoder_engine=inc.encoder)
            self.admitted(inc, ranks, None)
            ranks = self.free_submit_ranks(inc)
            for rank in ranks:
                self.endpoint(rank).submit(inc.rid, inc.payload, language_engine=inc.target)
            self.submitted(inc, ranks)
        self.observe()

    def finish(self) -> None:
        """Run everything to its end and check the outcomes and that nothing is left."""
        cluster = self.cluster
        self.engines_act()
        cluster.run_until(lambda: not self.open_incs(), max_steps=3_000, each_step=self.engines_act)
        cluster.settle()
        for inc in self.incs:
            self.check_outcome(inc)
        self.check_empty()
        for encoder in range(self.topology.encoders):
            for language in range(self.topology.languages):
                self.check_a_fresh_request(encoder, language)
        self.check_empty()

    def check_outcome(self, inc: Incarnation) -> None:
        finals = {rank: inc.final[rank] for rank in [*self.language_ranks(inc), *sorted(inc.submitted)]}
        leader = finals[self.leader_of(inc)]
        what = f"request {inc.rid} ({inc.n} tokens, encoder {inc.encoder} -> language {inc.language}): {finals}"
        if not inc.aborted:
            assert set(finals.values()) == {S.SUCCESS}, f"not aborted, yet {what}"
        if inc.strict:
            assert leader is S.FAILED, f"aborted before any completion could be on its way, yet {what}"
        if leader is S.FAILED:
            assert set(finals.values()) == {S.FAILED}, f"the language leader failed it, yet {what}"
        if inc.exact and inc.n <= self.pool_tokens and leader is S.SUCCESS:
            assert inc.leader_resumes == 0, f"the leader knew N before allocating, yet {inc.leader_resumes} resumes: {what}"

    def check_empty(self) -> None:
        """Nothing held anywhere, once the records still on the bus are read (a leader also
        drops what failed from its admission queue at its next step)."""
        cluster = self.cluster
        assert any(not cluster.step() for _ in range(10)), "still working after 10 steps"
        assert not any(self.live.values())
        assert set(cluster.blocks_in_use().values()) == {0}, cluster.describe()
        for e in cluster.endpoints:
            assert e.requests == {} and e.in_flight == 0 and not e.busy, cluster.describe()
            assert not any(getattr(c, "queue", ()) for c in e.channels.values())
        for rx in cluster.receivers.values():
            assert rx.output_bytes == 0 and not rx._awaiting_free and not rx._admission and not rx._budget_waiting

    def check_a_fresh_request(self, encoder: int, language: int) -> None:
        """After all that, a new request still goes through the pair bit-exact."""
        rid = self.fresh_id(False)
        inc = Incarnation(rid, encoder, language, self.make_payload(self.max_tokens, rid, False), language)
        self.incs.append(inc)
        self.current[rid] = inc
        self.engines_act()
        self.cluster.run_until(lambda: self.closed(inc), each_step=self.engines_act)
        self.cluster.settle()
        self.check_outcome(inc)


ApiModel.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, report_multiple_bugs=False, database=None,
    # the same runs in every CI run; a search (EMBXFER_TEST_API_MODEL_EXAMPLES set) draws new ones
    derandomize="EMBXFER_TEST_API_MODEL_EXAMPLES" not in os.environ,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # (no explain: slow tracing)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestApiModel = ApiModel.TestCase
