"""`embxfer demo`: stream synthetic payloads from encoder engines to language engines,
verify every one bit-exact on every language rank, and print a summary.

Without torchrun it starts a rendezvous (in the launcher, which is no engine), makes a
secret for the job, and spawns one process per rank; each joins by rendezvous as an
engine of its own (`encoder<e>`, `language<l>`). Under torchrun
(`torchrun --nproc-per-node K -m embxfer.demo ...`) each process is one rank of the
one-world layout. Request i goes from encoder engine `i % encoders` to language engine
`i % languages` (the router's choice, made the same way on both sides).
Payloads are generated from (seed, request id) on both sides, so the language side
can verify without the data travelling twice. Embedding bits are drawn uniformly, so
NaN and Inf patterns are part of every payload and must arrive bit-exact.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from embxfer.control import records as rec

from .config import Config
from .launch import say
from .payload import Payload
from .receiver import Receiver
from .sender import Sender
from .state import RequestState
from .topology import Role, Topology

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

# Per-request outcome codes exchanged at the end of the run (int8 over gloo).
NOT_MINE, VERIFIED, MISMATCH, FAILED, ABORTED, UNFINISHED = range(6)
OUTCOME_NAMES = {VERIFIED: "verified", MISMATCH: "mismatch", FAILED: "failed", ABORTED: "aborted",
                 UNFINISHED: "unfinished"}


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoders", type=int, default=1, help="encoder engines (default 1)")
    parser.add_argument("--encoder-tp", type=int, default=1, help="TP ranks per encoder engine (default 1)")
    parser.add_argument("--languages", type=int, default=1, help="language engines (default 1)")
    parser.add_argument("--language-tp", type=int, default=2, help="TP ranks per language engine (default 2)")
    parser.add_argument("--requests", type=int, default=24, help="requests to stream (default 24)")
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated token counts, cycled")
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=1024, help="embedding dim D (default 1024)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--deepstack", type=int, default=0, metavar="K", help="deepstack layers K (default 0)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per block (default: config)")
    parser.add_argument("--default-alloc-tokens", type=int, default=None,
                        help="first allocation of a request of unknown size (default: config)")
    parser.add_argument("--language-pool-blocks", type=int, default=None,
                        help="landing blocks per language rank (default: 256, or EMBXFER_LANGUAGE_POOL_BLOCKS)")
    parser.add_argument("--staging-mb", type=float, default=None,
                        help="bytes of one staging chunk, MiB (default 8 on CPU, 256 on GPUs, where "
                             "each chunk costs fixed launch overhead)")
    parser.add_argument("--inflight", type=int, default=8, help="requests in flight per engine (default 8)")
    parser.add_argument("--abort-rate", type=float, default=0.0,
                        help="fraction of requests the language engine aborts at a random moment")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--nodes", type=int, default=1,
                        help="simulate N nodes on this machine (own node ids and shm prefixes; records between "
                             "nodes over zmq/TCP loopback); spawned worlds only (default 1)")
    parser.add_argument("--node-split", choices=("roles", "even"), default="roles",
                        help="with --nodes 2: 'roles' puts the encoder ranks on node 0 and the language ranks "
                             "on node 1; 'even' splits the ranks in order (a TP group may span both nodes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, metavar="PATH", help="write results as JSON")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run (default 600)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="debug logs of every state transition")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve each rank's Prometheus metrics on 127.0.0.1:PORT+rank (the language leader "
                             "is rank encoders*encoder-tp); needs embxfer[metrics]")
    parser.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                        help="with --metrics-port: keep serving the final figures this long before exiting")


def validate_args(args: argparse.Namespace) -> None:
    """ValueError with one line naming the flag; nothing is started before this passes."""
    positive = ["encoders", "encoder_tp", "languages", "language_tp", "requests", "min_tokens", "max_tokens", "dim",
                "block_size", "default_alloc_tokens", "language_pool_blocks", "inflight"]
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value}: expected a positive integer")
    if args.deepstack < 0:
        raise ValueError(f"--deepstack={args.deepstack}: expected K >= 0")
    if not 0 < args.timeout:
        raise ValueError(f"--timeout={args.timeout}: expected a positive number of seconds")
    if not 0.0 <= args.abort_rate <= 1.0:
        raise ValueError(f"--abort-rate={args.abort_rate}: expected 0..1")
    if args.staging_mb is not None and not args.staging_mb > 0:
        raise ValueError(f"--staging-mb={args.staging_mb}: expected a positive size")
    if args.metrics_port is not None and not (1 <= args.metrics_port <= 65535 and args.metrics_linger >= 0):
        raise ValueError(f"--metrics-port={args.metrics_port} --metrics-linger={args.metrics_linger}: "
                         "expected a port in 1..65535 and seconds >= 0")
    if args.min_tokens > args.max_tokens:
        raise ValueError(f"--min-tokens={args.min_tokens} > --max-tokens={args.max_tokens}")
    if args.block_size is not None and args.block_size > 1024:
        raise ValueError(f"--block-size={args.block_size}: expected 1..1024")
    request_lengths(args)
    if not 1 <= args.nodes <= 8:
        raise ValueError(f"--nodes={args.nodes}: expected 1..8")
    if args.nodes > 1 and args.nodes > topology_of(args).world_size:
        raise ValueError(f"--nodes={args.nodes}: more nodes than the {topology_of(args).world_size} ranks")
    if args.nodes > 2 and args.node_split == "roles":
        raise ValueError(f"--nodes={args.nodes} with --node-split roles: expected 2 nodes (or --node-split even)")


def request_lengths(args: argparse.Namespace) -> list[int]:
    if args.lengths:
        try:
            given = [int(x) for x in args.lengths.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--lengths={args.lengths!r}: expected comma-separated integers") from None
        if not given or min(given) < 1:
            raise ValueError(f"--lengths={args.lengths!r}: expected positive token counts")
        return [given[i % len(given)] for i in range(args.requests)]
    rng = random.Random(args.seed)
    return [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.requests)]


def make_payload(args: argparse.Namespace, request_id: int, num_tokens: int, device: torch.device) -> Payload:
    """Deterministic payload of `request_id`: the same bits on every rank that makes it."""
    dtype = DTYPES[args.dtype]
    bits = _BITS[dtype]
    info = torch.iinfo(bits)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + request_id)

    def random_floats(cols: int) -> torch.Tensor:
        raw = torch.randint(info.min, info.max, (num_tokens, cols), generator=gen, dtype=bits)
        return raw.view(dtype).to(device)

    embeddings = random_floats(args.dim)
    fill_ids = torch.randint(0, 152_000, (num_tokens,), generator=gen, dtype=torch.int32).to(device)
    positions = torch.randint(0, 1 << 20, (3, num_tokens), generator=gen, dtype=torch.int32).to(device)
    delta = int(torch.randint(-(1 << 40), 1 << 40, (1,), generator=gen).item())
    deepstack = random_floats(args.deepstack * args.dim) if args.deepstack else None
    return Payload(embeddings, fill_ids, positions, mrope_delta=delta, deepstack=deepstack)


class ResourceProbe:
    """Open fds, threads and this run's /dev/shm entries of this process, sampled once the
    run is in steady state (the first `inflight` requests done, so lazily created threads
    and connections exist) and again at the end: a soak must show no growth."""

    def __init__(self, prefix: str, steady_after: int) -> None:
        self.prefix = prefix
        self.steady_after = steady_after
        self.start: list[int] | None = None
        self.end: list[int] = [0, 0, 0]

    def sample(self) -> list[int]:
        shm = sum(n.removeprefix("sem.").startswith(self.prefix + "-") for n in os.listdir("/dev/shm"))
        return [len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task")), shm]

    def done(self, finished: int) -> None:
        if self.start is None and finished >= self.steady_after:
            self.start = self.sample()

    def finish(self) -> None:
        self.end = self.sample()
        if self.start is None:
            self.start = self.end


@dataclass
class Outcome:
    code: int = NOT_MINE
    error: str = ""
    resumes: int = 0
    latency_s: float = 0.0


def node_layout(args: argparse.Namespace, topology: Topology) -> list[int]:
    """The simulated node of each rank (--nodes, --node-split)."""
    if args.nodes == 1:
        return [0] * topology.world_size
    if args.node_split == "roles":
        return [0 if topology.role(r) is Role.ENCODER else 1 for r in range(topology.world_size)]
    per_node = -(-topology.world_size // args.nodes)
    return [r // per_node for r in range(topology.world_size)]


def topology_of(args: argparse.Namespace) -> Topology:
    return Topology(args.encoders, args.encoder_tp, args.language_tp, args.languages)


def config_of(args: argparse.Namespace, device_kind: str = "cpu") -> Config:
    """Flags over `EMBXFER_*` over the demo's defaults over `Config`'s: what runs is what the
    start-up line, `embxfer info` and the JSON report print. The demo's own defaults (a
    smaller pool; a staging size that suits the device) apply only where neither a flag
    nor the environment says anything."""
    demo_defaults = {"language_pool_blocks": 256,
                     "staging_bytes": (256 if device_kind == "cuda" else 8) << 20,
                     "request_timeout_s": min(Config().request_timeout_s, args.timeout),
                     "admission_timeout_s": min(Config().admission_timeout_s, args.timeout)}
    flags = {name: getattr(args, name) for name in ("block_size", "default_alloc_tokens", "language_pool_blocks")
             if getattr(args, name) is not None}
    if args.staging_mb is not None:
        flags["staging_bytes"] = int(args.staging_mb * (1 << 20))
    return Config(**{**demo_defaults, **Config.env_values(), **flags})


def demo_configuration(argv: Sequence[str] = ()) -> tuple[Config, str]:
    """The configuration `embxfer demo argv` runs with here, and the device kind it picks
    (for `embxfer info`)."""
    from .launch import pick_device

    parser = ArgumentParser(prog="embxfer demo")
    add_demo_arguments(parser)
    args = parser.parse_args(list(argv))
    device_kind = pick_device(args.device, topology_of(args).world_size)
    return config_of(args, device_kind), device_kind


# -- how a rank ends -------------------------------------------------------------------------
# Seconds a rank's tear-down (closing its endpoint, leaving the store) may take, however
# the run ended; past that the rank unlinks its own shared memory and exits.
TEARDOWN_GRACE_S = 3.0


class RankLifetime:
    """How a rank ends, whatever ends it: the end of the run, a lost peer, an error, SIGTERM
    (a scheduler, the launcher stopping the world, or the launcher dying: spawned ranks get
    SIGTERM then), Ctrl-C.

    The first SIGTERM or SIGINT unwinds the rank (SystemExit, KeyboardInterrupt) through
    its tear-down. Once tear-down has started, further signals are ignored (a second one
    would cut `close()` short and leave gloo's connections half closed), and a watchdog
    thread bounds it: after `grace_s` it unlinks this process's own shared memory and what
    dead processes of the job left, and ends the process with the status decided so far.
    """

    def __init__(self, grace_s: float = TEARDOWN_GRACE_S) -> None:
        self.grace_s = grace_s
        self.prefix = os.environ.get("EMBXFER_SHM_PREFIX", "embxfer")
        self.label = f"rank {os.environ.get('RANK', '?')}"
        self.code = 1
        self.signal_name: str | None = None
        self.ending = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.ending:
            return
        self.signal_name = signal.Signals(signum).name
        self.end(128 + signum)
        self.check()

    def check(self) -> None:
        """Raise what a signal asked for. The handler raises it too, but a C extension
        that runs handlers itself may swallow it (posix_ipc turns it into a SignalError,
        which a parked `wait()` ignores), so the rank's loops call this as well."""
        if self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        if self.signal_name is not None:
            raise SystemExit(self.code)

    def end(self, code: int) -> None:
        """Tear-down starts now: the status is `code` (the first one given wins), signals
        are ignored from here on, and the watchdog runs."""
        if self.ending:
            return
        self.ending = True
        self.code = code
        threading.Thread(target=self._watchdog, name="embxfer-demo-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        main = threading.main_thread().ident
        time.sleep(self.grace_s)
        where = _where(sys._current_frames().get(main))
        try:
            from embxfer.control.hygiene import remove_own_segments, remove_segments

            removed = f"removed its {len(remove_own_segments(self.prefix))} shared-memory entries"
            # and what dead peers left, as the tear-down would have (`run_rank`): under
            # torchrun no launcher of ours removes it
            stale = len(remove_segments(stale_only=True, prefix=self.prefix))
            if stale:
                removed += f" and {stale} of dead processes"
        except Exception as exc:  # exiting matters more than a complete clean-up
            removed = f"could not remove its shared memory ({type(exc).__name__}: {exc})"
        say(f"embxfer demo: {self.label}: tear-down took more than {self.grace_s:g}s (at {where}); {removed} "
            "and exited")
        os._exit(self.code)


def _where(frame: object, depth: int = 4) -> str:
    """The innermost `depth` calls of a thread's stack, outermost first ("file:line
    function > ..."): what a tear-down that overran was doing."""
    calls = []
    while frame is not None and len(calls) < depth:
        code = frame.f_code
        calls.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " > ".join(reversed(calls)) or "an unknown place"


def _end_process(code: int) -> None:
    """A rank's process ends here, once its own tear-down is done: interpreter
    finalization would add nothing but destroying torch's C++ threads in an order no one
    controls, which is where gloo's `terminate called without an active exception` comes
    from."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# -- one rank -------------------------------------------------------------------------------
def run_rank(args: argparse.Namespace, lifetime: RankLifetime) -> int:
    from embxfer.control.hygiene import remove_segments

    from .api import connect
    from .launch import pick_device

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    topology = topology_of(args)
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != topology.world_size:
        raise ValueError(f"world size {world_size} does not match the layout {topology.describe()} "
                         f"({topology.world_size} ranks)")
    rank = int(os.environ["RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device_kind = pick_device(args.device, local_world)
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    config = config_of(args, device_kind)
    lifetime.prefix = config.shm_prefix
    role = topology.role(rank).value
    lifetime.label = f"rank {rank} ({role} engine '{topology.engine_name(rank)}' TP rank {topology.tp_index(rank)})"
    engines = [topology.engine_name(r) for r in range(topology.world_size) if topology.is_leader(r)]
    common = dict(dim=args.dim, dtype=DTYPES[args.dtype], deepstack_layers=args.deepstack, device=device,
                  config=config, timeout_s=args.timeout)
    endpoint = None
    code = 1
    try:
        if os.environ.get("EMBXFER_RENDEZVOUS"):
            endpoint = connect(topology.role(rank).value, engine=topology.engine_name(rank),
                               tp_rank=topology.tp_index(rank), tp_size=topology.tp_size(rank), wait_for=engines,
                               **common)
        else:
            endpoint = connect(layout=(args.encoders, args.encoder_tp, args.language_tp, args.languages), **common)
        code = run_job(args, config, topology, rank, endpoint, lifetime.check)
        return code
    finally:
        lifetime.end(code)
        if endpoint is not None:
            endpoint.close()
        # What peers killed on this node left behind (only the creator unlinks, and it is
        # gone): without a launcher of ours (torchrun), no one else would remove it.
        try:
            remove_segments(stale_only=True, prefix=config.shm_prefix)
        except Exception as exc:
            logging.getLogger("embxfer").warning("could not clean /dev/shm: %s", exc)


def run_job(args: argparse.Namespace, config: Config, topology: Topology, rank: int,
            endpoint: Sender | Receiver, check_signals: Callable[[], None]) -> int:
    """This rank's part of the demo; 0 when the whole job succeeded (as far as this rank
    can tell), 1 otherwise, with one line on stderr saying why. `check_signals` raises
    when the rank was told to stop; every loop calls it."""
    lengths = request_lengths(args)
    if rank == topology.language_leader:
        backend = "nccl" if endpoint.spec.device.type == "cuda" else "gloo"
        nodes = len({m.node for m in endpoint.directory.members.values()})
        print(f"embxfer demo: {len(lengths)} requests of {min(lengths)}..{max(lengths)} tokens; "
              f"{topology.describe()}; {backend} on {endpoint.spec.device}"
              f"{f', {nodes} nodes' if nodes > 1 else ''}; block {config.block_size}, default "
              f"allocation {config.default_alloc_blocks * config.block_size} tokens, language pool "
              f"{config.language_pool_blocks} blocks, staging "
              f"{config.staging_depth} x {config.staging_bytes / 2**20:g} MiB, peer timeout "
              f"{config.peer_timeout_s:g}s", flush=True)
        logging.getLogger("embxfer").debug("configuration:\n%s", config.describe())
    deadline = time.monotonic() + args.timeout
    outcomes = [Outcome() for _ in lengths]
    probe = ResourceProbe(config.shm_prefix, steady_after=min(args.inflight, len(lengths)))
    started = time.monotonic()
    metrics_server = None
    if args.metrics_port is not None:
        from .metrics import Metrics

        metrics_server = Metrics([endpoint]).serve(args.metrics_port + rank)
    try:
        engine = topology.engine_of(rank)
        if isinstance(endpoint, Sender):
            tally = run_encoder(args, endpoint, engine, lengths, deadline, probe, check_signals)
        else:
            tally = run_language(args, endpoint, engine, lengths, outcomes, deadline, rank == topology.language_leader,
                                 probe, check_signals)
        elapsed = time.monotonic() - started
        gathered = None if endpoint.dead_peers else finish_together(endpoint, topology, rank, outcomes, probe,
                                                                    deadline, check_signals)
        if gathered is None:
            # The job cannot finish together: say what this rank saw, and go.
            say(f"embxfer demo: rank {rank} ({endpoint.me.describe()}): the job is lost: {_lost_peers(endpoint)}; "
                f"{tally.describe()}")
            return 1
        if metrics_server is not None:
            time.sleep(args.metrics_linger)  # every rank is done: the figures are final
        if rank == topology.language_leader:
            codes, blocks, resources = gathered
            return report(args, config, topology, lengths, outcomes, codes, blocks, resources, endpoint, elapsed)
        return 0
    finally:
        if metrics_server is not None:
            metrics_server.close()


def _lost_peers(endpoint: Sender | Receiver) -> str:
    """The peers this rank lost, first the first it noticed, each with why; a last look at
    liveness adds those that died meanwhile (a survivor that saw the loss first and left
    may otherwise be the only one named)."""
    lost = dict(endpoint.dead_peers)
    try:
        for rank, why in endpoint.bus.dead_ranks().items():
            lost.setdefault(rank, f"{endpoint._describe_peer(rank)}: {why}")
    except Exception:  # the bus may be half gone with its peers; what we have is enough
        pass
    return "; ".join(rec.clip_message(why, 200) for why in lost.values()) or "a peer was lost"


@dataclass
class Tally:
    """What one rank's loop did with its requests, for its last line."""

    succeeded: int = 0
    failed: int = 0
    failed_by_peers: int = 0  # a peer aborted them, or a peer they needed was lost
    not_started: int = 0
    other: str = ""  # the first failure that was not a peer's doing

    def count_failure(self, error: str | None) -> None:
        self.failed += 1
        if error and (error.startswith(("peer_dead", "shutdown")) or "aborted by" in error
                      or "by the TP leader" in error):
            self.failed_by_peers += 1
        elif not self.other:
            self.other = error or "no reason given"

    def describe(self) -> str:
        other = f" (first other failure: {rec.clip_message(self.other, 200)})" if self.other else ""
        return (f"{self.failed} request(s) failed ({self.failed_by_peers} of them by a lost peer or a "
                f"peer's abort), {self.succeeded} succeeded, {self.not_started} not started{other}")


def run_encoder(args: argparse.Namespace, sender: Sender, engine: int, lengths: list[int], deadline: float,
                probe: ResourceProbe, check_signals: Callable[[], None]) -> Tally:
    """Produce and submit this engine's payloads, `--inflight` at a time. A lost peer ends
    the loop at once: no payload is built for a job that cannot finish."""
    todo = deque(rid for rid in range(len(lengths)) if rid % args.encoders == engine)
    active: set[int] = set()
    tally = Tally()
    while (todo or active or sender.busy) and time.monotonic() < deadline and not sender.dead_peers:
        check_signals()
        while todo and len(active) < args.inflight and sender.lost_peer() is None:
            rid = todo.popleft()
            sender.submit(rid, make_payload(args, rid, lengths[rid], sender.spec.device),
                          language_engine=rid % args.languages)
            active.add(rid)
        worked = sender.progress()
        for rid in sender.finished():  # what turned SUCCESS or FAILED in this step, never a scan
            if rid not in active:
                continue
            if sender.state(rid) is RequestState.SUCCESS:
                tally.succeeded += 1
            else:
                tally.count_failure(sender.error(rid))
            sender.release(rid)
            active.discard(rid)
            probe.done(tally.succeeded + tally.failed)
        if not worked:
            sender.wait(0.001 if sender.busy else 0.02)
    for rid in active:  # the loop ended with them in flight: the endpoint fails them on close
        tally.count_failure(sender.error(rid) or (f"peer_dead: {sender.lost_peer()}" if sender.dead_peers else None))
    tally.not_started = len(todo)
    probe.finish()
    return tally


def run_language(args: argparse.Namespace, receiver: Receiver, engine: int, lengths: list[int],
                 outcomes: list[Outcome], deadline: float, show_progress: bool, probe: ResourceProbe,
                 check_signals: Callable[[], None]) -> Tally:
    """Admit this engine's requests, verify each payload that arrives against its
    regenerated source. A lost peer ends the loop at once (the requests in flight are
    failed)."""
    rng = random.Random(args.seed + 17)
    abort_after = {rid: rng.randint(0, 200) for rid in range(len(lengths)) if rng.random() < args.abort_rate}
    todo = deque(rid for rid in range(len(lengths)) if rid % args.languages == engine)
    active: dict[int, float] = {}
    # --abort-rate: the leader aborts each chosen request once `abort_after[rid]` steps have
    # passed since its admission without it finishing (only those are looked at each step).
    doomed: dict[int, int] = {}
    step = 0
    tally = Tally()
    aborted = 0
    bar = _progress_bar(len(todo), show_progress and not args.quiet)
    while (todo or active or receiver.busy) and time.monotonic() < deadline and not receiver.dead_peers:
        check_signals()
        while todo and len(active) < args.inflight:
            rid = todo.popleft()
            receiver.admit(rid, encoder_engine=rid % args.encoders)
            active[rid] = time.monotonic()
            if receiver.is_leader and rid in abort_after:
                doomed[rid] = step + abort_after[rid]
        worked = receiver.progress()
        step += 1
        for rid, due in list(doomed.items()):
            if rid not in active:
                del doomed[rid]
            elif step > due:
                del doomed[rid]
                if not receiver.state(rid).terminal:
                    receiver.abort(rid, "demo --abort-rate")  # (it is among finished() below)
        for rid in receiver.finished():  # what turned SUCCESS or FAILED in this step, never a scan
            if rid not in active:
                continue
            state = receiver.state(rid)
            outcome = outcomes[rid]
            outcome.latency_s = time.monotonic() - active.pop(rid)
            outcome.resumes = receiver._lookup(rid).resumes
            if state is RequestState.SUCCESS:
                received = receiver.take(rid)
                expected = make_payload(args, rid, lengths[rid], receiver.pool.device)
                diffs = expected.mismatches(received)
                outcome.code = MISMATCH if diffs else VERIFIED
                outcome.error = f"fields differ: {', '.join(diffs)}" if diffs else ""
            else:
                outcome.error = receiver.error(rid) or "failed"
                user = outcome.error.split(":")[0] == "user"
                outcome.code = ABORTED if rid in abort_after and user else FAILED
                receiver.release(rid)
            if outcome.code == VERIFIED:
                tally.succeeded += 1
            elif outcome.code == ABORTED:
                aborted += 1
            else:
                tally.count_failure(outcome.error)
            probe.done(tally.succeeded + tally.failed + aborted)
            if bar is not None:
                # Done means verified; failures and aborts are shown beside the count.
                if outcome.code == VERIFIED:
                    bar.update(1)
                else:
                    bar.set_postfix(failed=tally.failed, aborted=aborted)
        if not worked:
            receiver.wait(0.001 if receiver.busy else 0.02)
    # Blocks of aborted rounds are freed once the rest of the round has been received and
    # discarded (a follower's, once its leader's decision came): let that finish before
    # blocks are counted as leaks (bounded: a real leak is reported after it).
    settle_until = min(deadline, time.monotonic() + 10.0)
    while (receiver.busy or receiver._blocks_in_use()) and time.monotonic() < settle_until \
            and not receiver.dead_peers:
        check_signals()
        if not receiver.progress():
            receiver.wait(0.001)
    probe.finish()
    for rid in active:
        outcome = outcomes[rid]
        if receiver.dead_peers:
            outcome.code = FAILED
            outcome.error = receiver.error(rid) or "the job was lost"
            tally.count_failure(outcome.error)
        else:
            outcome.code = UNFINISHED
            outcome.error = f"unfinished after --timeout={args.timeout:.0f}s"
            tally.failed += 1
    tally.not_started = len(todo)
    if bar is not None:
        bar.close()
    return tally


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", desc="embxfer demo", file=sys.stderr, dynamic_ncols=True)


def finish_together(endpoint: Sender | Receiver, topology: Topology, rank: int, outcomes: list[Outcome],
                    probe: ResourceProbe, deadline: float,
                    check_signals: Callable[[], None]) -> tuple[np.ndarray, list[int], dict[str, list[int]]] | None:
    """Exchange per-request outcomes, blocks in use and resource samples through the
    rendezvous. Waiting for the others is waiting for peers: `progress()` runs between
    looks, so a peer that dies meanwhile ends the wait (None: the job is lost) within its
    detection time, not at the deadline."""
    tail = [endpoint._blocks_in_use(), *probe.start, *probe.end]
    mine = np.array([o.code for o in outcomes] + [o.resumes for o in outcomes]
                    + [int(o.latency_s * 1e6) for o in outcomes] + tail, dtype=np.int64).tobytes()
    store = endpoint.membership.app_store
    keys = [f"demo/finish/{r}" for r in range(topology.world_size)]
    lost_store_at = None
    # Ranks reach this point together, give or take the last verifications; one that ran
    # into --timeout still gets a moment to hand in what it has.
    deadline = max(deadline, time.monotonic() + 30.0)
    try:
        store.set(keys[rank], mine)
    except Exception:  # the rendezvous is gone; liveness names the peer below
        lost_store_at = time.monotonic()
    while True:
        check_signals()
        if lost_store_at is None:
            try:
                if store.check(keys):
                    break
            except Exception:
                lost_store_at = time.monotonic()
        if endpoint.dead_peers:
            return None
        now = time.monotonic()
        if lost_store_at is not None and now - lost_store_at > endpoint.config.peer_timeout_s + 1.0:
            raise ConnectionError("lost the rendezvous, and no peer is known to be dead")
        if now > deadline:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            raise TimeoutError(f"rank(s) {missing} did not finish within --timeout")
        if not endpoint.progress():
            endpoint.wait(0.02)
    gathered = [np.frombuffer(store.get(key), dtype=np.int64) for key in keys]
    n = len(outcomes)
    codes = np.stack([g[:n] for g in gathered])
    for rid, outcome in enumerate(outcomes):  # resumes and latency as the request's language leader saw them
        source = gathered[_leader_of(topology, rid)]
        outcome.resumes, outcome.latency_s = int(source[n + rid]), int(source[2 * n + rid]) / 1e6
    n *= 3
    blocks = [int(g[n]) for g in gathered]
    names = ("fds", "threads", "shm_entries")
    resources = {
        f"{name}_{when}": [int(g[n + 1 + offset + i]) for g in gathered]
        for offset, when in ((0, "start"), (3, "end")) for i, name in enumerate(names)
    }
    return codes, blocks, resources


def _leader_of(topology: Topology, rid: int) -> int:
    """The rank that leads request `rid`'s language engine."""
    return topology.language_engine_ranks(rid % topology.languages)[0]


def report(args, config, topology: Topology, lengths, outcomes, codes, blocks, resources, receiver,
           elapsed) -> int:
    language = topology.language_ranks
    rows = []
    bad = []
    for rid, tokens in enumerate(lengths):
        per_rank = [int(codes[r][rid]) for r in topology.language_engine_ranks(rid % args.languages)]
        worst = max(per_rank, key=lambda c: (c != VERIFIED, c))
        status = OUTCOME_NAMES.get(worst, "unknown")
        verified = all(c == VERIFIED for c in per_rank)
        row = {"id": rid, "tokens": tokens, "resumes": outcomes[rid].resumes, "status": status,
               "verified": verified}
        if not verified:
            row["error"] = outcomes[rid].error or f"rank outcomes {per_rank}"
            if worst != ABORTED:
                bad.append(row)
        rows.append(row)
    verified_rows = [r for r in rows if r["verified"]]
    token_count = sum(r["tokens"] for r in verified_rows)
    payload_bytes = token_count * receiver.pool.bytes_per_token + 8 * len(verified_rows)
    moved = payload_bytes * args.language_tp
    latencies = sorted(o.latency_s for o, r in zip(outcomes, rows, strict=True) if r["verified"])
    encoder_blocks = sum(blocks[r] for r in range(topology.language_leader))
    language_blocks = sum(blocks[r] for r in language)
    totals = {
        "requests": len(rows),
        "verified": len(verified_rows),
        "failed": len(bad),
        "aborted": sum(r["status"] == "aborted" for r in rows),
        "tokens": token_count,
        "gb_moved": moved / 1e9,
        "seconds": elapsed,
        "gbps": moved / 1e9 / elapsed if elapsed > 0 else 0.0,
        "resumes": sum(r["resumes"] for r in rows),
        "latency_p50_s": _quantile(latencies, 0.50),
        "latency_p99_s": _quantile(latencies, 0.99),
    }
    leaks = {"encoder_blocks_in_use": encoder_blocks, "language_blocks_in_use": language_blocks}
    print(
        f"embxfer demo: {totals['verified']}/{totals['requests']} requests verified bit-exact on "
        f"every rank of their language engine ({args.languages} engine(s) of TP {args.language_tp}); "
        f"{totals['aborted']} aborted, {totals['failed']} failed\n"
        f"  layout   {topology.describe()}; device {receiver.pool.device}, {args.dtype}, D={args.dim}, "
        f"deepstack K={args.deepstack}\n"
        f"  moved    {token_count} tokens, {totals['gb_moved']:.3f} GB in {elapsed:.2f}s "
        f"= {totals['gbps']:.2f} GB/s; {totals['resumes']} resumes\n"
        f"  latency  p50 {totals['latency_p50_s'] * 1e3:.1f} ms, p99 {totals['latency_p99_s'] * 1e3:.1f} ms\n"
        f"  leaks    encoder blocks in use {encoder_blocks}, language blocks in use {language_blocks}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {**vars(args), "effective": config.__dict__}, "requests": rows,
                       "totals": totals, "leaks": leaks, "resources": resources}, f, indent=2, default=str)
    if bad or encoder_blocks or language_blocks:
        first = bad[0] if bad else None
        what = f"request {first['id']}: {first['error']}" if first else "blocks still in use"
        say(f"embxfer demo: FAILED: {len(bad)} request(s) not verified (first: {what})")
        return 1
    return 0


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


class UsageError(Exception):
    """Bad command line: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` (one line) instead of printing its usage block."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message}")


def main(argv: Sequence[str] | None = None) -> int:
    from .launch import CHILD_ENV, spawn_local_world, under_torchrun

    parser = ArgumentParser(prog="embxfer demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        validate_args(args)
        topology = topology_of(args)
        config = config_of(args)
    except (UsageError, ValueError) as exc:
        say(f"embxfer demo: error: {exc}" if isinstance(exc, ValueError) else str(exc))
        return 2
    if under_torchrun() or os.environ.get(CHILD_ENV):
        _end_process(_rank_main(args))
    from .rendezvous import RendezvousServer
    from .secret import SECRET_ENV, SECRET_FILE_ENV

    server = RendezvousServer("127.0.0.1", 0)
    env = {"EMBXFER_RENDEZVOUS": server.address}
    if not os.environ.get(SECRET_ENV) and not os.environ.get(SECRET_FILE_ENV):
        env[SECRET_ENV] = secrets.token_hex(32)  # the demo's own job: made here, never on a socket
    try:
        # Survivors report a lost rank themselves within peer_timeout_s (sooner for a
        # process that is gone); past that the launcher stops them.
        return spawn_local_world("embxfer.demo", argv, topology.world_size, deadline_s=args.timeout + 60,
                                 node_of=node_layout(args, topology),
                                 failure_grace_s=config.peer_timeout_s + config.heartbeat_interval_s + 1.0,
                                 extra_env=env)
    except KeyboardInterrupt:
        say("embxfer demo: interrupted; the local world was stopped")
        return 130
    finally:
        server.close()


def _rank_main(args: argparse.Namespace) -> int:
    """One rank, start to end: its status, and one line on stderr whenever it is not 0
    (the language leader prints the report of a run that finished)."""
    lifetime = RankLifetime()
    lifetime.install()
    try:
        return run_rank(args, lifetime)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; tear-down has run
        say(f"embxfer demo: {lifetime.label}: interrupted")
        return 130
    except SystemExit as exc:  # SIGTERM
        say(f"embxfer demo: {lifetime.label}: stopped by {lifetime.signal_name or 'SystemExit'}")
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # one line per failing rank, the full story in --verbose
        logging.getLogger("embxfer").debug("rank failed", exc_info=True)
        first_line = (str(exc).splitlines() or [""])[0]
        say(f"embxfer demo: {lifetime.label}: {type(exc).__name__}: {rec.clip_message(first_line, 300)}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
