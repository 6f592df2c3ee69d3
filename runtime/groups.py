"""embxfer's own process groups, made from a store, and the rendezvous that forms them
between separately launched engines.

An engine already has a `torch.distributed` world of its own (its TP group); that world is
not ours to touch. As NCCL's `ncclCommInitRank(comm, nranks, id, rank)` makes a
communicator from an id, `StatelessGroups` makes embxfer's groups from a store, a rank
and a world size, without `init_process_group` and without registering anything in
torch's global state:

    meta   gloo (CPU)                     set-up and tear-down
    data   NCCL on CUDA, gloo on CPU      point-to-point staging chunks (tag 0)

P2P goes straight to the backends (`Backend.send([tensor], peer, 0)`), because
`dist.isend` only knows groups registered in the default world. Set-up exchanges
(`barrier`, `all_gather_bytes`) go through the store: they poll with a deadline, can be
interrupted by Ctrl-C, and say which ranks are missing.

`rendezvous` forms the embxfer world:

* by rendezvous (`tcp://host:port`, or EMBXFER_RENDEZVOUS): the language engine's TP
  rank 0 (the *leader*) hosts a TCPStore on that address; everyone else connects,
  retrying until the deadline. The keys, under `embxfer/rdzv/`:

      expect                      leader: {encoders, language_tp}, so anyone can say who is missing
      slot/<role>/<engine>/<tp>   a member's record; claimed with compare_set (duplicates fail)
      tp_size/<role>/<engine>     first TP size seen for an engine; later ones must agree
      encoder_tp                  first encoder TP size seen; every encoder engine must agree
      arrivals, arrival/<n>       counter + log of claimed slots (who is registered, in order)
      error                       first failure {kind, message, by}; every waiter raises it
      seen/<token>                a member has read `error` (the leader keeps the store up till then)
      layout                      leader: {job_id, encoders, encoder_tp, language_tp, members}
      job/<job_id>/...            the groups' keys (meta/, data/, coll/), departures, app/

  Global ranks follow `Topology`: encoder engine 0's TP ranks, engine 1's, ..., then the
  language TP ranks. A conflict found while the world forms fails every member at once;
  a process that arrives after the layout was published fails alone (the world stands).
* under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, no address given), with
  a layout from the caller: the same protocol on a store of our own at MASTER_ADDR:
  MASTER_PORT (a client of torchrun's agent store when TORCHELASTIC_USE_AGENT_STORE=True,
  else global rank 0 hosts it, sharing the server of a default group made in the same
  process), namespaced `embxfer/<run id>/<restart>/<call>/`. The engine's default group
  may or may not exist; it is never used, made or destroyed.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from embxfer.control.deadlines import check_seconds as _check_seconds

from .topology import Role, Topology

RENDEZVOUS_ENV = "EMBXFER_RENDEZVOUS"
NODE_ID_ENV = "EMBXFER_NODE_ID"
# P2P works may wait this long for their peer (NCCL's own default); set-up uses timeout_s.
DEFAULT_OP_TIMEOUT_S = 600.0
# How long the process that hosts the store waits at close for the others to leave it.
DEPARTURE_GRACE_S = 2.0
P2P_TAG = 0
# Never used for data: `_sever_gloo` receives on it.
SEVER_TAG = 0x7EB0


# --------------------------------------------------------------------------- checks


def parse_address(address: str) -> tuple[str, int]:
    """`tcp://host:port` -> (host, port); IPv6 hosts in brackets."""
    expected = "expected tcp://host:port, e.g. tcp://10.0.0.1:29600"
    if not isinstance(address, str):
        raise ValueError(f"address={address!r}: {expected}")
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError:
        raise ValueError(f"address={address!r}: {expected}") from None
    if (parts.scheme != "tcp" or not parts.hostname or port is None or not 0 < port < 65536
            or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username):
        raise ValueError(f"address={address!r}: {expected}")
    return parts.hostname, port


def check_seconds(name: str, value: object) -> float:
    return _check_seconds(name, value, positive=True)


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return value


def _check_role(role: object) -> str:
    try:
        return Role(role).value
    except ValueError:
        raise ValueError(f"role={role!r}: expected 'encoder' or 'language'") from None


def _check_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: expected 'cpu' or a CUDA device ('cuda', 'cuda:N')") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'cpu' or a CUDA device ('cuda', 'cuda:N')")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA device is visible")
        if resolved.index is None:
            # The engine has chosen its GPU already; embxfer never changes the current device.
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return time.monotonic() >= self.end


def _pause(attempt: int) -> None:
    """Polling back-off: 1 ms doubling to 50 ms, so a wait is prompt but never spins."""
    time.sleep(min(0.05, 0.001 * (2 ** min(attempt, 6))))


# --------------------------------------------------------------------------- backends


def _backend_class(name: str) -> Any:
    cls = getattr(dist, name, None)
    if cls is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.distributed.{name}: embxfer's "
            f"{'data group on CUDA needs NCCL' if name == 'ProcessGroupNCCL' else 'meta group needs gloo'}"
        )
    return cls


def _make_gloo(store: dist.Store, rank: int, world_size: int, timeout: timedelta,
               local_address: str | None) -> Any:
    """A gloo backend. Its timeout bounds both the connection at construction and every
    operation (gloo ignores `set_timeout` for point-to-point), so it is chosen here.

    Without GLOO_SOCKET_IFNAME, gloo would bind the address its host name resolves to
    (often 127.0.1.1 in containers); the address that routes to the store is a better
    guess for every peer, so that one is used when known.
    """
    gloo = _backend_class("ProcessGroupGloo")
    if local_address and not os.environ.get("GLOO_SOCKET_IFNAME"):
        options_class = getattr(gloo, "_Options", None)
        create_device = getattr(gloo, "create_device", None)
        if options_class is not None and create_device is not None:
            options = options_class()
            options._devices = [create_device(hostname=local_address)]
            options._timeout = timeout
            options._threads = 2
            return gloo(store, rank, world_size, options)
    return gloo(store, rank, world_size, timeout)


def _make_nccl(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> Any:
    """An NCCL backend whose communicators are made lazily, as `dist.new_group` makes them.

    The first isend/irecv between two ranks makes their two-rank communicator (and blocks
    until the peer posts its side); after that each pair has a stream of its own, so a
    receive from a slow peer never holds up traffic with another. Connecting eagerly
    (`data.eager_connect_single_device(device)`) would fail earlier, but newer torch then
    runs all of a rank's P2P on the world communicator's single stream.
    """
    if not dist.is_nccl_available():
        raise RuntimeError(f"device=cuda: torch {torch.__version__} was built without NCCL")
    nccl = _backend_class("ProcessGroupNCCL")
    try:
        options = nccl.Options()
        options._timeout = timeout
    except AttributeError as exc:
        raise RuntimeError(
            f"torch {torch.__version__}: ProcessGroupNCCL.Options has no _timeout ({exc}); "
            "embxfer's stateless NCCL group needs it"
        ) from None
    return nccl(store, rank, world_size, options)


def _sever_gloo(backend: Any, rank: int, world_size: int) -> None:
    """Close every connection of a gloo backend now, so that whatever waits on it (a
    thread in `Work.wait()`, a collective on gloo's workers) fails at once.

    Gloo has no way to cancel a posted receive from Python, and a thread still blocked in
    `wait()` when the interpreter finalizes is killed while unwinding C++ (SIGABRT,
    "terminate called without an active exception") as soon as its peer goes away. A
    receive on an unused tag, waited on for 1 ms, times out, and gloo's documented
    response to an application timeout is to close all pairs of the context.
    """
    if backend is None or world_size < 2:
        return
    try:
        probe = backend.recv([torch.empty(1, dtype=torch.uint8)], (rank + 1) % world_size, SEVER_TAG)
        probe.wait(timedelta(milliseconds=1))
    except Exception:  # the expected outcome: the timeout that closed the pairs
        pass


def _stop_backend(backend: Any, in_flight: bool) -> None:
    """Shut a backend down without ever taking the process with it.

    `shutdown()` is the graceful end (NCCL flushes its queue); with work still in flight
    (a receive whose peer is gone, a Ctrl-C mid-transfer) it could wait for that work, so
    then `abort()` ends the communicators at once instead.
    """
    if backend is None:
        return
    for name in (("abort", "shutdown") if in_flight else ("shutdown", "abort")):
        method = getattr(backend, name, None)
        if method is None:
            continue
        try:
            method()
            return
        except Exception:  # a failed graceful end falls through to the other
            continue


# --------------------------------------------------------------------------- groups

_open_groups: weakref.WeakSet[StatelessGroups] = weakref.WeakSet()


@atexit.register
def _close_open_groups() -> None:
    # A backend destroyed during interpreter teardown (NCCL's watchdog thread still
    # running) can abort the process; ending them while Python still runs cannot.
    for groups in list(_open_groups):
        groups.close()


class StatelessGroups:
    """embxfer's `meta` and `data` groups over `store`, never registered with torch.

    Collective at construction: every rank of `world_size` must make one with the same
    store namespace. `rank`s are embxfer's global ranks; `peer` arguments are too.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        device: str | torch.device = "cpu",
        *,
        timeout_s: float = 120.0,
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
        local_address: str | None = None,
        describe_rank: Callable[[int], str] | None = None,
    ) -> None:
        _check_count("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}: expected 0..{world_size - 1}")
        set_up = timedelta(seconds=check_seconds("timeout_s", timeout_s))
        operations = timedelta(seconds=check_seconds("op_timeout_s", op_timeout_s))
        self.rank = rank
        self.world_size = world_size
        self.device = _check_device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.timeout_s = float(timeout_s)
        self._describe = describe_rank or (lambda r: f"rank {r}")
        self._store = store
        self._coll = dist.PrefixStore("coll/", store)
        self._coll_sequence = 0
        self._lock = threading.Lock()
        self._in_flight: list[Any] = []
        self.closed = False
        self.meta: Any = None
        self.data: Any = None
        try:
            self.meta = _make_gloo(dist.PrefixStore("meta/", store), rank, world_size, set_up, local_address)
            data_store = dist.PrefixStore("data/", store)
            if self.backend == "nccl":
                self.data = _make_nccl(data_store, rank, world_size, operations)
            else:
                self.data = _make_gloo(data_store, rank, world_size, operations, local_address)
        except BaseException:
            self.close()
            raise
        _open_groups.add(self)

    # -- point to point on the data group

    def isend(self, tensor: torch.Tensor, peer: int) -> dist.Work:
        """Post a send of `tensor` to global rank `peer`; returns the backend's Work.

        On gloo a Work learns it completed only inside `wait()` (see transport.TorchP2P).
        On NCCL the sends and receives between two ranks run in posting order on one
        stream: a receive posted before a send that the peer waits for deadlocks."""
        self._check_p2p(tensor, peer, "isend")
        work = self.data.send([tensor], peer, P2P_TAG)
        self._track(work)
        return work

    def irecv(self, tensor: torch.Tensor, peer: int) -> dist.Work:
        """Post a receive into `tensor` from global rank `peer`; returns the backend's Work."""
        self._check_p2p(tensor, peer, "irecv")
        work = self.data.recv([tensor], peer, P2P_TAG)
        self._track(work)
        return work

    def _check_p2p(self, tensor: torch.Tensor, peer: int, verb: str) -> None:
        if self.closed:
            raise RuntimeError(f"{verb}: embxfer's groups are closed")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != self.device.type:
            raise ValueError(
                f"tensor.device={tensor.device}: the data group is {self.backend} and moves {self.device.type} tensors"
            )
        if not tensor.is_contiguous():
            raise ValueError("tensor: expected a contiguous tensor")
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"peer={peer!r}: expected a rank in 0..{self.world_size - 1} other than {self.rank}")

    def _track(self, work: Any) -> None:
        # What is still in flight at close() decides how the data group ends.
        with self._lock:
            if len(self._in_flight) >= 64:
                self._in_flight = [w for w in self._in_flight if not w.is_completed()]
            self._in_flight.append(work)

    # -- set-up exchanges through the store

    def all_gather_bytes(self, data: bytes, timeout_s: float | None = None) -> list[bytes]:
        """Every rank's `data`, in rank order. Collective; ranks must call it in the same order."""
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"data: expected bytes, got {type(data).__name__}")
        if self.closed:
            raise RuntimeError("all_gather_bytes: embxfer's groups are closed")
        deadline = _Deadline(check_seconds("timeout_s", self.timeout_s if timeout_s is None else timeout_s))
        sequence = self._coll_sequence
        self._coll_sequence += 1
        # A marker byte: no store is ever asked to hold an empty value.
        self._coll.set(f"{sequence}/{self.rank}", b"v" + bytes(data))
        keys = [f"{sequence}/{r}" for r in range(self.world_size)]
        attempt = 0
        while not self._coll.check(keys):
            if deadline.passed():
                missing = [r for r in range(self.world_size) if not self._coll.check([keys[r]])]
                names = ", ".join(f"{r} ({self._describe(r)})" for r in missing)
                raise TimeoutError(
                    f"embxfer meta exchange #{sequence}: rank(s) {names} did not arrive within {deadline.seconds:g} s"
                )
            _pause(attempt)
            attempt += 1
        values = [self._coll.get(key)[1:] for key in keys]
        if sequence > 0:
            # Every rank has written #sequence, so every rank has read #sequence-1.
            self._coll.delete_key(f"{sequence - 1}/{self.rank}")
        return values

    def barrier(self, timeout_s: float | None = None) -> None:
        self.all_gather_bytes(b"", timeout_s)

    # -- tear-down

    def close(self) -> None:
        """Shut down the backends this object made (nothing else); idempotent.

        Safe with work in flight and from Ctrl-C: NCCL is aborted rather than drained;
        gloo's connections are closed first, so that threads blocked in `wait()` on its
        works return now rather than during interpreter shutdown (which aborts the
        process), and given a moment to get out.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            pending = [work for work in self._in_flight if not work.is_completed()]
            self._in_flight.clear()
        if self.backend == "gloo" and pending:
            _sever_gloo(self.data, self.rank, self.world_size)
            # Works that a thread waits on complete now; any never waited on stay as they are.
            drained = _Deadline(0.5)
            attempt = 0
            while any(not work.is_completed() for work in pending) and not drained.passed():
                _pause(attempt)
                attempt += 1
            time.sleep(0.01)  # let the woken threads take the GIL and leave the C++ call
        _stop_backend(self.data, bool(pending))
        _sever_gloo(self.meta, self.rank, self.world_size)
        _stop_backend(self.meta, False)
        self.data = self.meta = self._store = self._coll = None
        _open_groups.discard(self)

    def __enter__(self) -> StatelessGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- members


@dataclass(frozen=True)
class Member:
    """One process of the embxfer world, as it registered itself."""

    role: str
    engine: int
    tp_rank: int
    tp_size: int
    hostname: str
    address: str
    pid: int
    node_id: str
    token: str

    def describe(self) -> str:
        return _describe_slot(self.role, self.engine, self.tp_rank, self.tp_size)

    def where(self) -> str:
        return f"pid {self.pid} on {self.hostname}"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Member:
        return cls(**json.loads(raw))


def _describe_slot(role: str, engine: int, tp_rank: int, tp_size: int | None) -> str:
    owner = f"encoder engine {engine}" if role == Role.ENCODER.value else "language engine"
    of = f" of {tp_size}" if tp_size else ""
    return f"{owner} TP rank {tp_rank}{of}"


def _slot_key(role: str, engine: int, tp_rank: int) -> str:
    return f"slot/{role}/{engine}/{tp_rank}"


def global_rank(topology: Topology, role: str, engine: int, tp_rank: int) -> int:
    if role == Role.LANGUAGE.value:
        return topology.language_leader + tp_rank
    return engine * topology.encoder_tp + tp_rank


def default_node_id() -> str:
    """EMBXFER_NODE_ID, else host name + boot id: processes that share a kernel (and so
    can share /dev/shm) get one id, two containers with their own host names do not."""
    explicit = os.environ.get(NODE_ID_ENV)
    if explicit:
        return explicit
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}-{boot}"


def _local_address_towards(host: str, port: int) -> str | None:
    """The local address this process uses to reach host:port (no packet is sent)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return probe.getsockname()[0]
    except OSError:
        return None


# --------------------------------------------------------------------------- membership


@dataclass
class Membership:
    """This process's place in the embxfer world, and the groups and store that came with it."""

    rank: int
    world_size: int
    topology: Topology
    role: str
    engine: int
    tp_rank: int
    tp_size: int
    job_id: str
    address: str
    mode: str
    members: tuple[Member, ...]
    groups: StatelessGroups
    # Free for the caller's own set-up keys (embxfer's keys live beside it); None once closed.
    store: Any
    _job_store: Any = field(repr=False)
    _hosts_store: bool = field(repr=False, default=False)
    _server: Any = field(repr=False, default=None)
    closed: bool = False

    @property
    def is_leader(self) -> bool:
        return self.tp_rank == 0

    def member(self, rank: int) -> Member:
        return self.members[rank]

    def describe(self, rank: int | None = None) -> str:
        return self.members[self.rank if rank is None else rank].describe()

    def close(self, gone: Iterable[int] = ()) -> None:
        """Shut down embxfer's groups, leave the store, and (on the process that hosts the
        store) wait briefly for the others to leave it first, except ranks known `gone`
        (dead: they will never say so). Idempotent; never touches the engine's default
        process group."""
        if self.closed:
            return
        self.closed = True
        self.groups.close()
        try:
            self._job_store.set(f"departed/{self.rank}", b"1")
            if self._hosts_store:
                gone = set(gone)
                keys = [f"departed/{r}" for r in range(self.world_size) if r not in gone]
                deadline = _Deadline(DEPARTURE_GRACE_S)
                attempt = 0
                while not self._job_store.check(keys) and not deadline.passed():
                    _pause(attempt)
                    attempt += 1
        except Exception:  # the store's host may be gone already; nothing to wait for
            pass
        # The last references to the store: on its host, this stops the server.
        self.store = self._job_store = self._server = None

    def __enter__(self) -> Membership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rendezvous(
    address: str | None = None,
    role: str | None = None,
    engine: int | None = None,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    *,
    encoders: int | None = None,
    layout: Topology | Sequence[int] | None = None,
    timeout_s: float = 120.0,
    device: str | torch.device = "cpu",
    node_id: str | None = None,
    op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
) -> Membership:
    """Join the embxfer world and build its groups.

    By rendezvous when `address` (or EMBXFER_RENDEZVOUS) is given: `role`, `engine`
    (encoder engine index; 0 for the language engine), `tp_rank` and `tp_size` are what
    this engine knows about itself; `encoders` (the language side's, default 1) is how
    many encoder engines to wait for. Under torchrun with no address: `layout`
    (encoders, encoder_tp, language_tp) must match WORLD_SIZE, and role/engine/tp_rank/
    tp_size, when given, must match what the layout says of RANK.

    Raises ValueError for bad arguments and conflicting registrations (naming the
    field), TimeoutError when a member is missing at the deadline (naming it).
    """
    timeout_s = check_seconds("timeout_s", timeout_s)
    op_timeout_s = check_seconds("op_timeout_s", op_timeout_s)
    resolved_device = _check_device(device)
    if node_id is None:
        node_id = default_node_id()
    elif not isinstance(node_id, str) or not node_id:
        raise ValueError(f"node_id={node_id!r}: expected a non-empty string")
    topology = _check_layout(layout)
    if encoders is not None:
        _check_count("encoders", encoders, 1)
        if topology is not None and encoders != topology.encoders:
            raise ValueError(f"encoders={encoders}: disagrees with layout={topology}")
    address = address if address is not None else os.environ.get(RENDEZVOUS_ENV) or None
    deadline = _Deadline(timeout_s)

    if address is not None:
        host, port = parse_address(address)
        if role is None or tp_rank is None or tp_size is None:
            missing = [n for n, v in (("role", role), ("tp_rank", tp_rank), ("tp_size", tp_size)) if v is None]
            raise ValueError(f"{', '.join(missing)}: required when joining by rendezvous at {address}")
        role, engine, tp_rank, tp_size = _check_identity(role, 0 if engine is None else engine, tp_rank, tp_size)
        if topology is not None:
            _check_against_layout(topology, role, engine, tp_rank, tp_size)
        is_leader = role == Role.LANGUAGE.value and tp_rank == 0
        local_address = _local_address_towards(host, port)
        server = None
        if is_leader:
            server = _host_store(host, port, timeout_s, address)
            root = server
        else:
            root = _connect_store(host, port, deadline, address,
                                  "the language engine's TP rank 0, which hosts it, has not come up",
                                  _describe_slot(role, engine, tp_rank, tp_size))
        namespace = dist.PrefixStore("embxfer/rdzv/", root)
        hosts_store = is_leader
        mode = "rendezvous"
    else:
        if not _under_torchrun():
            raise ValueError(
                f"address=None: expected tcp://host:port (or {RENDEZVOUS_ENV}), or a torchrun world "
                "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
            )
        if topology is None:
            raise ValueError("layout=None: under torchrun, expected (encoders, encoder_tp, language_tp)")
        role, engine, tp_rank, tp_size = _identity_from_torchrun(topology, role, engine, tp_rank, tp_size)
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        address = f"tcp://{host}:{port}"
        local_address = _local_address_towards(host, port)
        root, hosts_store = _torchrun_store(host, port, deadline, address, timeout_s)
        server = root if hosts_store else None
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") or f"local-{port}"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        base = f"embxfer/{run_id}/{restart}"
        # Repeated calls in one world get fresh keys: every rank counts its own calls.
        call = root.add(f"{base}/calls/{os.environ['RANK']}", 1)
        namespace = dist.PrefixStore(f"{base}/{call}/", root)
        encoders = topology.encoders
        is_leader = role == Role.LANGUAGE.value and tp_rank == 0
        mode = "torchrun"

    me = Member(role=role, engine=engine, tp_rank=tp_rank, tp_size=tp_size, hostname=socket.gethostname(),
                address=local_address or "", pid=os.getpid(), node_id=node_id, token=secrets.token_hex(8))
    joined = job_store = None
    try:
        try:
            joined = _Join(namespace, me, address, deadline)
            agreed, members, job_id = joined.lead(encoders or 1) if is_leader else joined.follow(encoders)
        except RuntimeError as exc:  # torch's DistError: the store went away under us
            raise ConnectionError(
                f"rendezvous at {address}: lost the store, which the language engine's TP rank 0 hosts "
                f"(has it exited?): {exc}"
            ) from exc
        if topology is not None and agreed != topology:
            raise ValueError(f"layout={topology}: the leader published {agreed}")
        rank = global_rank(agreed, role, engine, tp_rank)
        if mode == "torchrun" and rank != int(os.environ["RANK"]):
            raise RuntimeError(f"embxfer rank {rank} != torchrun RANK={os.environ['RANK']} (a bug)")
        job_store = dist.PrefixStore(f"job/{job_id}/", namespace)
        names = {r: m.describe() for r, m in enumerate(members)}
        # A fresh budget: everyone is known to be there, this is only the connecting.
        groups = StatelessGroups(
            job_store, rank, agreed.world_size, resolved_device, timeout_s=timeout_s,
            op_timeout_s=op_timeout_s, local_address=local_address,
            describe_rank=lambda r: names.get(r, f"rank {r}"),
        )
        # From here on the store serves NCCL's lazy communicator set-up inside a pair's
        # first isend/irecv, which may wait for the peer as long as any P2P may.
        root.set_timeout(timedelta(seconds=op_timeout_s))
    except (ValueError, TimeoutError, ConnectionError) as exc:
        # The error says what happened; its frames would keep the store (and, on the
        # leader, its listening socket) alive for as long as the caller keeps the error.
        server = root = namespace = joined = job_store = None
        _drop_frames(exc)
        raise exc
    return Membership(
        rank=rank, world_size=agreed.world_size, topology=agreed, role=role, engine=engine,
        tp_rank=tp_rank, tp_size=tp_size, job_id=job_id, address=address, mode=mode,
        members=members, groups=groups, store=dist.PrefixStore("app/", job_store),
        _job_store=job_store, _hosts_store=hosts_store, _server=server,
    )


def _drop_frames(error: BaseException) -> None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


def _check_layout(layout: Topology | Sequence[int] | None) -> Topology | None:
    if layout is None or isinstance(layout, Topology):
        return layout
    try:
        encoders, encoder_tp, language_tp = layout
    except (TypeError, ValueError):
        raise ValueError(f"layout={layout!r}: expected (encoders, encoder_tp, language_tp)") from None
    try:
        return Topology(encoders, encoder_tp, language_tp)
    except ValueError as exc:
        raise ValueError(f"layout={layout!r}: {exc}") from None


def _check_identity(role: object, engine: object, tp_rank: object, tp_size: object) -> tuple[str, int, int, int]:
    role = _check_role(role)
    engine = _check_count("engine", engine, 0)
    tp_size = _check_count("tp_size", tp_size, 1)
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank!r}: expected 0..{tp_size - 1} (tp_size={tp_size})")
    if role == Role.LANGUAGE.value and engine != 0:
        raise ValueError(f"engine={engine}: there is one language engine; expected 0")
    return role, engine, tp_rank, tp_size


def _check_against_layout(topology: Topology, role: str, engine: int, tp_rank: int, tp_size: int) -> None:
    expected_size = topology.language_tp if role == Role.LANGUAGE.value else topology.encoder_tp
    if tp_size != expected_size:
        raise ValueError(f"tp_size={tp_size}: layout={topology} gives the {role} engine TP size {expected_size}")
    if role == Role.ENCODER.value and engine >= topology.encoders:
        raise ValueError(f"engine={engine}: layout={topology} has encoder engines 0..{topology.encoders - 1}")


def _under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _identity_from_torchrun(topology: Topology, role: object, engine: object, tp_rank: object,
                            tp_size: object) -> tuple[str, int, int, int]:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size != topology.world_size:
        raise ValueError(
            f"layout={topology}: it needs a world of {topology.world_size} processes, "
            f"but torchrun's WORLD_SIZE={world_size}"
        )
    derived_role = topology.role(rank).value
    derived = {
        "role": derived_role,
        "engine": topology.engine_of(rank) if derived_role == Role.ENCODER.value else 0,
        "tp_rank": topology.tp_index(rank),
        "tp_size": topology.language_tp if derived_role == Role.LANGUAGE.value else topology.encoder_tp,
    }
    given = {"role": None if role is None else _check_role(role), "engine": engine, "tp_rank": tp_rank, "tp_size": tp_size}
    for name, value in given.items():
        if value is not None and value != derived[name]:
            raise ValueError(f"{name}={value!r}: torchrun RANK={rank} is {derived[name]!r} in layout={topology}")
    return derived["role"], derived["engine"], derived["tp_rank"], derived["tp_size"]


# --------------------------------------------------------------------------- stores


def _host_store(host: str, port: int, timeout_s: float, address: str) -> dist.TCPStore:
    """The leader's TCPStore server, listening on `host` only (not every interface)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"address={address!r}: cannot resolve {host}: {exc}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(sockaddr)
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise ValueError(
            f"address={address!r}: the language engine's TP rank 0 cannot host the rendezvous store there "
            f"({exc.strerror or exc}); is another language TP rank 0 (or another program) already using it?"
        ) from None
    timeout = timedelta(seconds=timeout_s)
    errors = []
    # libuv is the default server; torch builds where it cannot adopt a listening socket
    # fall back to the classic one.
    for use_libuv in (True, False):
        try:
            store = dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False,
                                  master_listen_fd=listener.fileno(), use_libuv=use_libuv)
        except (RuntimeError, TypeError) as exc:
            errors.append(f"use_libuv={use_libuv}: {exc}")
            continue
        listener.detach()  # the server owns the socket now
        return store
    listener.close()
    raise RuntimeError(f"could not start the rendezvous store at {address}: {'; '.join(errors)}")


def _connect_store(host: str, port: int, deadline: _Deadline, address: str, absent: str,
                   me: str) -> dist.TCPStore:
    """A TCPStore client, once something accepts connections there (a plain socket probe
    first: TCPStore's own retry loop is not interruptible and logs every attempt)."""
    attempt = 0
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(1.0, deadline.left()))):
                break
        except OSError:
            if deadline.passed():
                raise TimeoutError(
                    f"could not reach the rendezvous store at {address} within {deadline.seconds:g} s: "
                    f"{absent} (this is {me})"
                ) from None
            _pause(attempt + 3)
            attempt += 1
    try:
        return dist.TCPStore(host, port, None, False, timedelta(seconds=max(deadline.left(), 1.0)),
                             wait_for_workers=False)
    except RuntimeError as exc:
        raise TimeoutError(f"could not connect to the rendezvous store at {address}: {exc} (this is {me})") from None


def _torchrun_store(host: str, port: int, deadline: _Deadline, address: str,
                    timeout_s: float) -> tuple[dist.TCPStore, bool]:
    """A store at MASTER_ADDR:MASTER_PORT and whether this process hosts its server."""
    rank = int(os.environ["RANK"])
    me = f"torchrun RANK={rank}"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return _connect_store(host, port, deadline, address, "torchrun's agent store is not answering", me), False
    if rank == 0:
        try:
            # multi_tenant: a default group made in this process (env://) shares its server.
            store = dist.TCPStore(host, port, None, True, timedelta(seconds=timeout_s),
                                  wait_for_workers=False, multi_tenant=True)
            return store, True
        except RuntimeError:
            pass  # another process serves that port already: use it as a client
    return _connect_store(host, port, deadline, address, "global rank 0 hosts it and has not come up", me), False


# --------------------------------------------------------------------------- the protocol


class _Join:
    """The rendezvous protocol on one namespace of a store (see the module docstring)."""

    def __init__(self, store: dist.Store, me: Member, address: str, deadline: _Deadline) -> None:
        self.store = store
        self.me = me
        self.address = address
        self.deadline = deadline

    # -- registration

    def _register(self) -> None:
        me = self.me
        mine = me.to_bytes().decode()
        held = self.store.compare_set(_slot_key(me.role, me.engine, me.tp_rank), "", mine)
        if held.decode() != mine:
            other = Member.from_bytes(held)
            self._fail(ValueError(
                f"tp_rank={me.tp_rank}: {me.describe()} ({me.where()}) is already registered by "
                f"{other.where()}; two processes were given the same role, engine and tp_rank"
            ))
        self._agree(f"tp_size/{me.role}/{me.engine}", "tp_size",
                    f"{me.describe()} says tp_size={me.tp_size}, but {{other}} registered tp_size={{value}}")
        if me.role == Role.ENCODER.value:
            self._agree("encoder_tp", "tp_size",
                        f"encoder engine {me.engine} has TP size {me.tp_size}, but {{other}} has TP size "
                        "{value}; every encoder engine must have the same TP size")
        count = self.store.add("arrivals", 1)
        self.store.set(f"arrival/{count}", _slot_key(me.role, me.engine, me.tp_rank))

    def _agree(self, key: str, name: str, message: str) -> None:
        mine = json.dumps({"value": self.me.tp_size, "by": self.me.describe()})
        held = json.loads(self.store.compare_set(key, "", mine))
        if held["value"] != self.me.tp_size:
            self._fail(ValueError(f"{name}={self.me.tp_size}: " + message.format(other=held["by"], value=held["value"])))

    def _fail(self, error: Exception) -> None:
        """Publish the first failure so every member stops at once, then raise it here."""
        kind = "timeout" if isinstance(error, TimeoutError) else "value"
        text = json.dumps({"kind": kind, "message": str(error), "by": self.me.describe()})
        try:
            self.store.compare_set("error", "", text)
            self.store.set(f"seen/{self.me.token}", b"1")
        except Exception:  # the failure itself matters more than telling others
            pass
        raise error

    def _raise_published_error(self) -> None:
        if not self.store.check(["error"]):
            return
        posted = json.loads(self.store.get("error"))
        self.store.set(f"seen/{self.me.token}", b"1")
        text = f"rendezvous at {self.address} failed ({posted['by']} reported): {posted['message']}"
        raise TimeoutError(text) if posted["kind"] == "timeout" else ValueError(text)

    # -- who is there

    def _arrived(self, since: int, arrived: dict[tuple[str, int, int], Member]) -> int:
        """Read the arrival log from entry `since`+1 on; returns how far it got."""
        count = self.store.add("arrivals", 0)
        while since < count and self.store.check([f"arrival/{since + 1}"]):
            slot = self.store.get(f"arrival/{since + 1}").decode()
            member = Member.from_bytes(self.store.get(slot))
            arrived[(member.role, member.engine, member.tp_rank)] = member
            since += 1
        return since

    @staticmethod
    def _missing(arrived: dict[tuple[str, int, int], Member], encoders: int, language_tp: int) -> list[str]:
        encoder_sizes = {m.tp_size for m in arrived.values() if m.role == Role.ENCODER.value}
        encoder_tp = min(encoder_sizes) if encoder_sizes else None
        missing = []
        for engine in range(encoders):
            if encoder_tp is None:
                missing.append(f"encoder engine {engine} (no TP rank of any encoder engine arrived, so its TP size is unknown)")
                continue
            absent = [r for r in range(encoder_tp) if (Role.ENCODER.value, engine, r) not in arrived]
            if absent:
                missing.append(f"encoder engine {engine} {_ranks_phrase(absent, encoder_tp)}")
        absent = [r for r in range(language_tp) if (Role.LANGUAGE.value, 0, r) not in arrived]
        if absent:
            missing.append(f"language engine {_ranks_phrase(absent, language_tp)}")
        return missing

    # -- the leader

    def lead(self, encoders: int) -> tuple[Topology, tuple[Member, ...], str]:
        try:
            self._register()
            return self._lead(encoders)
        except (ValueError, TimeoutError):
            self._linger()
            raise

    def _linger(self) -> None:
        """Keep the store up until every registered member has read the published failure
        (at most a second), so they fail with its message rather than a lost store."""
        linger = _Deadline(1.0)
        attempt = 0
        try:
            arrived: dict[tuple[str, int, int], Member] = {}
            self._arrived(0, arrived)
            keys = [f"seen/{m.token}" for m in arrived.values() if m.token != self.me.token]
            while keys and not self.store.check(keys) and not linger.passed():
                _pause(attempt)
                attempt += 1
        except Exception:  # a store in trouble cannot be waited on; the failure stands
            pass

    def _lead(self, encoders: int) -> tuple[Topology, tuple[Member, ...], str]:
        me = self.me
        self.store.set("expect", json.dumps({"encoders": encoders, "language_tp": me.tp_size}))
        arrived: dict[tuple[str, int, int], Member] = {}
        seen = 0
        attempt = 0
        while True:
            self._raise_published_error()
            seen = self._arrived(seen, arrived)
            for member in arrived.values():
                if member.role == Role.ENCODER.value and member.engine >= encoders:
                    self._fail(ValueError(
                        f"engine={member.engine}: {member.describe()} ({member.where()}) joined, but the language "
                        f"engine expects encoders={encoders} (engines 0..{encoders - 1})"
                    ))
            missing = self._missing(arrived, encoders, me.tp_size)
            if not missing:
                break
            if self.deadline.passed():
                self._fail(TimeoutError(
                    f"{_join_phrases(missing)} never arrived at {self.address} within {self.deadline.seconds:g} s "
                    f"(registered: {_registered_phrase(arrived)})"
                ))
            _pause(attempt)
            attempt += 1
        encoder_tp = next(m.tp_size for m in arrived.values() if m.role == Role.ENCODER.value)
        topology = Topology(encoders, encoder_tp, me.tp_size)
        members = sorted(arrived.values(), key=lambda m: global_rank(topology, m.role, m.engine, m.tp_rank))
        job_id = secrets.token_hex(8)
        self.store.set("layout", json.dumps({
            "job_id": job_id, "encoders": encoders, "encoder_tp": encoder_tp, "language_tp": me.tp_size,
            "members": [asdict(m) for m in members],
        }))
        return topology, tuple(members), job_id

    # -- everyone else

    def follow(self, encoders: int | None) -> tuple[Topology, tuple[Member, ...], str]:
        me = self.me
        self._register()
        attempt = 0
        while not self.store.check(["layout"]):
            self._raise_published_error()
            if self.deadline.passed():
                self._raise_follower_timeout()
            _pause(attempt)
            attempt += 1
        published = json.loads(self.store.get("layout"))
        topology = Topology(published["encoders"], published["encoder_tp"], published["language_tp"])
        if encoders is not None and encoders != topology.encoders:
            raise ValueError(f"encoders={encoders}: the language engine's TP rank 0 expects encoders={topology.encoders}")
        if me.role == Role.ENCODER.value and me.engine >= topology.encoders:
            raise ValueError(
                f"engine={me.engine}: {me.describe()} joined after the layout was published with "
                f"encoders={topology.encoders} (engines 0..{topology.encoders - 1})"
            )
        members = tuple(Member(**m) for m in published["members"])
        rank = global_rank(topology, me.role, me.engine, me.tp_rank)
        if members[rank].token != me.token:
            raise ValueError(f"tp_rank={me.tp_rank}: the layout gives {me.describe()} to {members[rank].where()}, not to {me.where()}")
        return topology, members, published["job_id"]

    def _raise_follower_timeout(self) -> None:
        arrived: dict[tuple[str, int, int], Member] = {}
        self._arrived(0, arrived)
        waiting = (f"{self.me.describe()} waited {self.deadline.seconds:g} s at {self.address} for the layout from "
                   f"the language engine's TP rank 0 (the leader); registered: {_registered_phrase(arrived)}")
        if self.store.check(["expect"]):
            expect = json.loads(self.store.get("expect"))
            missing = self._missing(arrived, expect["encoders"], expect["language_tp"])
            if missing:
                raise TimeoutError(f"{_join_phrases(missing)} never arrived at {self.address} ({waiting})")
        raise TimeoutError(waiting)


def _ranks_phrase(ranks: list[int], size: int) -> str:
    if len(ranks) == 1:
        return f"TP rank {ranks[0]} of {size}"
    return f"TP ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]} of {size}"


def _join_phrases(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _registered_phrase(arrived: dict[tuple[str, int, int], Member]) -> str:
    if not arrived:
        return "nobody"
    return "; ".join(f"{m.describe()} ({m.where()})" for m in sorted(
        arrived.values(), key=lambda m: (m.role != Role.ENCODER.value, m.engine, m.tp_rank)))
