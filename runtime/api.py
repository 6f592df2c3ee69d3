"""`embxfer.connect()`: one call gives an engine a ready `Sender` or `Receiver`.

    rx = embxfer.connect("language", engine="llm-a", tp_rank=r, tp_size=2, dim=3584,
                         dtype=torch.bfloat16, device="cuda", rendezvous_address="tcp://10.0.0.1:29600")
    rx.admit(request_id, encoder_engine="vit-0")             # per request
    rx.progress(); for rid in rx.finished(): ...             # per loop iteration
    rx.close(drain=True)                                     # or `with embxfer.connect(...) as rx:`

What it does, in order (every step has a deadline; nothing touches the engine's own
default process group):

1. **Checks** what it is given (role, names, sizes, device, timeout, configuration, the
   memory the pool and staging need), warns once about misspelled `EMBXFER_*` variables,
   and loads the job's secret (`secret.py`).
2. **Membership** (`membership.py`): reaches the rendezvous (`embxfer rendezvous`, at
   `rendezvous_address` or `EMBXFER_RENDEZVOUS`; retried until the deadline), claims its
   place in its engine's incarnation, publishes itself (signed), and starts watching for
   other members. Under torchrun with no address, `layout` = (encoder engines, encoder
   TP, language TP[, language engines]) names the engines of the one world, torchrun's
   store is the rendezvous, and connect returns once all of them are usable.
3. **Control**: its ring in shared memory (peers on this node attach to it), and, when
   the job may span nodes (a rendezvous on a non-loopback address, `EMBXFER_NODE_ID` or
   `EMBXFER_BIND_HOST` set, torchrun over several nodes), its signed zmq link, bound to
   the address this node reaches the rendezvous on (`EMBXFER_BIND_HOST` overrides;
   `EMBXFER_LINK_PORT` fixes the port, `EMBXFER_ADVERTISE_HOST` the address peers dial).
4. **Data**: data pairs are made when first used (`pairs.py`).

It returns once its own engine is whole (every TP rank joined and linked) and the
engines named in `wait_for` (or the layout's) are usable; engines that join later become
usable as they come.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch

from . import settings as env_settings
from .bus import ShmBus
from .config import Config, check_device, check_memory
from .groups import (
    _connect_store,
    _Deadline,
    _local_address_towards,
    _torchrun_store,
    default_node_id,
    parse_address,
)
from .job import Job, namespace_for, wait_until_usable
from .membership import (
    LiveDirectory,
    MemberInfo,
    Role,
    SignedStore,
    claim_incarnation,
    engine_name,
    join_event,
    new_member_id,
    post_error,
)
from .pairs import PairTransport
from .receiver import Receiver
from .secret import load_secret
from .sender import Sender
from .topology import Topology

log = logging.getLogger("embxfer")

RENDEZVOUS_ENV = "EMBXFER_RENDEZVOUS"
# Settings both sides of a transfer must share (the layout of staging messages, the
# shape of a token's rows, block arithmetic); checked engine pair by engine pair.
AGREED = ("block_size", "staging_bytes", "max_segments_per_message")
_LOOPBACK = ("127.", "::1", "localhost")


def connect(
    role: str | None = None,
    *,
    engine: str | int = 0,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    dim: int,
    dtype: torch.dtype = torch.bfloat16,
    deepstack_layers: int = 0,
    device: str | torch.device = "cpu",
    rendezvous_address: str | None = None,
    encoders: int | None = None,
    wait_for: tuple[str, ...] | list[str] = (),
    layout: tuple[int, ...] | Topology | None = None,
    config: Config | None = None,
    timeout_s: float = 120.0,
    node_id: str | None = None,
) -> Sender | Receiver:
    """A ready endpoint for this process: a `Sender` for an encoder rank, a `Receiver` for a
    language rank.

    By rendezvous (`rendezvous_address` "tcp://host:port", or `EMBXFER_RENDEZVOUS`):
    `role`, `engine` (a name such as "vit-0"; an int i means "encoder<i>" /
    "language<i>"), `tp_rank` and `tp_size` say who this process is. `wait_for` names
    engines to wait for before returning (`encoders=n`, kept from the one-star layouts,
    waits for "encoder0".."encoder<n-1>"). Under torchrun with no address: `layout`
    = (encoders, encoder_tp, language_tp[, languages]) must match the world, and the
    role comes from the rank. Everything else comes from `config` (default
    `Config.from_env()`). `close()` the endpoint (or use `with`) to leave."""
    env_settings.warn_unknown_variables()
    from embxfer.control.remote import raise_open_files_limit

    raise_open_files_limit()  # a flood of connections needs room to be refused in
    config = config or Config.from_env()
    timeout_s = _check_timeout(timeout_s)
    device = check_device(device)
    deadline = time.monotonic() + timeout_s
    secret = load_secret()
    address = rendezvous_address if rendezvous_address is not None else os.environ.get(RENDEZVOUS_ENV) or None
    topology = _check_layout(layout)
    torchrun_run = ""
    if address is not None:
        host, port = parse_address(address)
        if role is None or tp_rank is None or tp_size is None:
            missing = [n for n, v in (("role", role), ("tp_rank", tp_rank), ("tp_size", tp_size)) if v is None]
            raise ValueError(f"{', '.join(missing)}: required when joining by rendezvous at {address}")
        role_, name, tp_rank, tp_size = _check_identity(role, engine, tp_rank, tp_size)
    else:
        if not _under_torchrun():
            raise ValueError(f"rendezvous_address=None: expected tcp://host:port (or {RENDEZVOUS_ENV}), or a "
                             "torchrun world (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with a layout")
        if topology is None:
            raise ValueError("layout=None: under torchrun, expected (encoders, encoder_tp, language_tp)")
        role_, name, tp_rank, tp_size = _identity_from_torchrun(topology, role, engine, tp_rank, tp_size)
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        address = f"tcp://{host}:{port}"
        torchrun_run = f"{os.environ.get('TORCHELASTIC_RUN_ID') or port}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    me_text = f"{role_.value} engine '{name}' TP rank {tp_rank} of {tp_size}"
    check_memory(config, device, dim, dtype, deepstack_layers, role=role_.value)
    if encoders is not None:
        if isinstance(encoders, bool) or not isinstance(encoders, int) or encoders < 1:
            raise ValueError(f"encoders={encoders!r}: expected a positive integer")
        wait_for = (*wait_for, *(f"encoder{e}" for e in range(encoders)))
    wanted = [engine_name(Role.ENCODER if n.startswith("encoder") else Role.LANGUAGE, n) for n in wait_for]
    if topology is not None:
        wanted += [topology.engine_name(r) for r in range(topology.world_size) if topology.is_leader(r)]
    wanted = [n for n in dict.fromkeys(wanted) if n != name]

    node = node_id or _node_id()
    local_address = _local_address_towards(host, port)
    member = new_member_id()
    parts: list[Any] = []
    store = incarnation = None
    try:
        if torchrun_run:
            raw, _hosts = _torchrun_store(host, port, _Deadline(max(1.0, deadline - time.monotonic())), address,
                                          timeout_s)
            rank_call = raw.add(f"embxfer/{torchrun_run}/calls/{os.environ['RANK']}", 1)
            namespace = namespace_for(secret.namespace, f"{torchrun_run}/{rank_call}")
        else:
            raw = _connect_store(host, port, _Deadline(max(1.0, deadline - time.monotonic())), address,
                                 "the rendezvous is not up (start `embxfer rendezvous` there)", me_text)
            namespace = secret.namespace
        raw.set_timeout(timedelta(seconds=max(30.0, timeout_s)))
        store = SignedStore(raw, secret, namespace)
        bus = ShmBus.open(member, slots=config.ring_slots, slot_bytes=config.slot_bytes,
                          peer_timeout=config.peer_timeout_s, heartbeat_interval=config.heartbeat_interval_s,
                          limits=config.limits, prefix=config.shm_prefix)
        parts.append(bus)
        link_endpoint = ""
        bind = None
        if _needs_link(host, node_id):
            link, bind = _open_link(member, secret, bus, config, local_address)
            bus.attach_link(link)
            link_endpoint = link.endpoint
        incarnation = claim_incarnation(store, name, role_, tp_rank, tp_size, member, deadline, me_text)
        settings = {name_: getattr(config, name_) for name_ in AGREED}
        settings.update(dim=dim, dtype=str(dtype).removeprefix("torch."), deepstack_layers=deepstack_layers,
                        language_pool_blocks=config.language_pool_blocks)
        me = MemberInfo(member=member, engine=name, role=role_.value, incarnation=incarnation, tp_rank=tp_rank,
                        tp_size=tp_size, node=node, host=socket.gethostname(), pid=os.getpid(), ring=bus.ring_name,
                        link=link_endpoint, settings=tuple(sorted(settings.items())))
        directory = LiveDirectory(store, me, on_change=bus.wake)
        parts.insert(0, directory)
        directory.publish(join_event(me))
        directory.start()
        transport = PairTransport(raw, member, secret, device, setup_timeout_s=max(30.0, config.peer_timeout_s * 3),
                                  op_timeout_s=600.0, local_address=bind or local_address,
                                  describe=lambda m: directory.describe_member(m))
        parts.insert(1, transport)
        job = Job(store, directory, bus, transport, config, raw)
        kind = Sender if role_ is Role.ENCODER else Receiver
        endpoint = kind(config=config, directory=directory, bus=bus, transport=transport, dim=dim, dtype=dtype,
                        deepstack_layers=deepstack_layers, device=device, topology=topology)
        endpoint.membership = job
        endpoint.resources = [job]
        parts = [job]

        def own_error() -> str | None:
            posted = store.get(f"error/{name}/{incarnation}")
            return None if posted is None else f"{posted.get('by')} failed to start: {posted.get('message')}"

        wait_until_usable(endpoint, lambda: wanted, deadline, f"{me_text} at {address}", own_error)
    except BaseException as exc:
        if store is not None and incarnation is not None and not isinstance(exc, KeyboardInterrupt):
            post_error(store, name, incarnation, me_text, f"{type(exc).__name__}: {exc}")
        for part in parts:
            try:
                part.close()
            except Exception as close_error:  # the first error is the one that matters
                log.debug("closing %s after a failed connect: %s", type(part).__name__, close_error)
        raise
    log.info("%s joined at %s as member %x (incarnation %x)", me_text, address, member, incarnation)
    return endpoint


def _check_timeout(value: object) -> float:
    from embxfer.control.deadlines import check_timeout

    return check_timeout("timeout_s", value)


def _needs_link(rendezvous_host: str, node_id: str | None) -> bool:
    """Whether peers on other nodes may exist: then this process needs a cross-node link."""
    if node_id or os.environ.get("EMBXFER_NODE_ID") or os.environ.get(env_settings.BIND_HOST):
        return True
    if os.environ.get("LOCAL_WORLD_SIZE") and os.environ.get("WORLD_SIZE") \
            and int(os.environ["LOCAL_WORLD_SIZE"]) < int(os.environ["WORLD_SIZE"]):
        return True
    return not rendezvous_host.startswith(_LOOPBACK)


def _open_link(member: int, secret, bus: ShmBus, config: Config, local_address: str | None):
    from embxfer.control.remote import RemoteLink

    bind = env_settings.bind_host() or local_address or "127.0.0.1"
    port = env_settings.link_port() or 0
    advertise = env_settings.advertise_host()
    link = None
    for attempt in range(64 if port else 1):
        try:
            link = RemoteLink(member, secret.key("link"), bind, port + attempt if port else 0,
                              max_frame_bytes=bus.writer.capacity, heartbeat_interval_s=config.heartbeat_interval_s,
                              on_receive=bus.doorbell.ring, advertise_host=advertise)
            break
        except OSError:
            if not port or attempt == 63:
                raise
    return link, bind


def _node_id() -> str:
    """EMBXFER_NODE_ID; under a multi-node torchrun launch, the host and torchrun's node
    rank (so `--nnodes 2` on one machine makes two nodes); else the host."""
    if os.environ.get("EMBXFER_NODE_ID"):
        return os.environ["EMBXFER_NODE_ID"]
    group = os.environ.get("GROUP_RANK")
    if group is not None and os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE", "1")) > \
            int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))):
        return f"{default_node_id()}-node{group}"
    return default_node_id()


def _check_layout(layout: tuple[int, ...] | Topology | None) -> Topology | None:
    if layout is None or isinstance(layout, Topology):
        return layout
    try:
        values = tuple(layout)
        if len(values) not in (3, 4):
            raise ValueError
        return Topology(*values)
    except (TypeError, ValueError) as exc:
        detail = f": {exc}" if str(exc) else ""
        raise ValueError(f"layout={layout!r}: expected (encoders, encoder_tp, language_tp[, languages]){detail}") from None


def _check_identity(role: object, engine: object, tp_rank: object, tp_size: object) -> tuple[Role, str, int, int]:
    try:
        role_ = Role(role)
    except ValueError:
        raise ValueError(f"role={role!r}: expected 'encoder' or 'language'") from None
    name = engine_name(role_, engine)
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size={tp_size!r}: expected an integer >= 1")
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank!r}: expected 0..{tp_size - 1} (tp_size={tp_size})")
    return role_, name, tp_rank, tp_size


def _under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _identity_from_torchrun(topology: Topology, role: object, engine: object, tp_rank: object,
                            tp_size: object) -> tuple[Role, str, int, int]:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size != topology.world_size:
        raise ValueError(f"layout={topology}: it needs a world of {topology.world_size} processes, but torchrun's "
                         f"WORLD_SIZE={world_size}")
    derived = {"role": topology.role(rank).value, "engine": topology.engine_name(rank),
               "tp_rank": topology.tp_index(rank), "tp_size": topology.tp_size(rank)}
    given = {"role": role, "engine": None if engine in (0, None) else engine, "tp_rank": tp_rank, "tp_size": tp_size}
    if isinstance(given["engine"], int):
        given["engine"] = engine_name(derived["role"], given["engine"])
    for key, value in given.items():
        if value is not None and value != derived[key]:
            raise ValueError(f"{key}={value!r}: torchrun RANK={rank} is {derived[key]!r} in layout={topology}")
    return Role(derived["role"]), derived["engine"], derived["tp_rank"], derived["tp_size"]



