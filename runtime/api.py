"""`embxfer.connect()`: one call gives an engine a ready `Sender` or `Receiver`.

    rx = embxfer.connect("language", tp_rank=r, tp_size=2, dim=3584, dtype=torch.bfloat16,
                         device="cuda", rendezvous="tcp://10.0.0.1:29600", encoders=1)
    rx.admit(request_id, encoder_engine=0)                   # per request
    rx.progress(); for rid in rx.finished(): ...             # per loop iteration
    rx.close()                                               # or `with embxfer.connect(...) as rx:`

What it does, in order (every step has a deadline; nothing touches the engine's own
default process group):

1. **Membership** (`groups.rendezvous`): separately launched engines meet at a
   rendezvous address (the language engine's TP rank 0 hosts embxfer's store there);
   under torchrun with no address, the roles come from the torchrun world and a layout.
   embxfer's own gloo/NCCL groups are built on that store.
2. **Agreement**: every rank shares the settings both sides must agree on (block size,
   staging size, segments per message, payload shape); a mismatch is a `ValueError`
   naming the field, the ranks and both values. The language leader's pool size sets the
   record limits everyone decodes with.
3. **Control bus**: ranks of one node (same node id: `EMBXFER_NODE_ID`, else torchrun's
   node rank with the host, else the host) share shared-memory rings; ranks on other
   nodes are reached through a signed zmq link, bound to the address this node reaches
   the rendezvous on (`EMBXFER_BIND_HOST` overrides; `EMBXFER_LINK_PORT` fixes the ports,
   `EMBXFER_ADVERTISE_HOST` the address peers dial), with a secret made for this job.
4. **Data**: staging messages move with point-to-point on embxfer's data group.
"""

from __future__ import annotations

import json
import logging
import os
import secrets

import torch

from .bus import ShmBus
from .config import Config
from .groups import Membership, default_node_id, rendezvous
from .receiver import Receiver
from .sender import Sender
from .topology import Role
from .transport import TorchP2P

log = logging.getLogger("embxfer")

BIND_HOST_ENV = "EMBXFER_BIND_HOST"
# The first port of this node's cross-node links (a process uses base + its index on the
# node); unset: any free port. And the address peers should dial, behind NAT.
LINK_PORT_ENV = "EMBXFER_LINK_PORT"
ADVERTISE_HOST_ENV = "EMBXFER_ADVERTISE_HOST"
# Settings both sides of a transfer must share (the layout of staging messages, the
# shape of a token's rows, block arithmetic).
AGREED = ("block_size", "staging_bytes", "max_segments_per_message", "dim", "dtype", "deepstack_layers")


def connect(
    role: str | None = None,
    *,
    engine: int = 0,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    dim: int,
    dtype: torch.dtype = torch.bfloat16,
    deepstack_layers: int = 0,
    device: str | torch.device = "cpu",
    rendezvous_address: str | None = None,
    encoders: int | None = None,
    layout: tuple[int, int, int] | None = None,
    config: Config | None = None,
    timeout_s: float = 120.0,
    node_id: str | None = None,
) -> Sender | Receiver:
    """A ready endpoint for this process: a `Sender` for an encoder rank, a `Receiver` for a
    language rank. By rendezvous (`rendezvous_address` "tcp://host:port", or
    `EMBXFER_RENDEZVOUS`): `role`, `engine`, `tp_rank`, `tp_size` say who this process is,
    and the language side says how many encoder `engines` to expect. Under torchrun with
    no address: `layout` = (encoder engines, encoder TP, language TP) must match the
    world, and the role comes from the rank. Everything else comes from `config` (default
    `Config.from_env()`). `close()` the endpoint (or use `with`) to tear it all down."""
    config = config or Config.from_env()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    membership = rendezvous(
        rendezvous_address, role, engine if role is not None else None, tp_rank, tp_size, encoders=encoders,
        layout=layout, timeout_s=timeout_s, device=device, node_id=node_id or _node_id(),
    )
    bus = transport = None
    try:
        config = _agree(membership, config, dim, dtype, deepstack_layers)
        bus = _control_bus(membership, config)
        transport = TorchP2P(membership.groups, membership.groups.backend)
        kind = Sender if membership.topology.role(membership.rank) is Role.ENCODER else Receiver
        endpoint = kind(config=config, topology=membership.topology, rank=membership.rank, bus=bus,
                        transport=transport, dim=dim, dtype=dtype, deepstack_layers=deepstack_layers,
                        device=device)
    except BaseException:
        for part in (transport, bus, membership):
            if part is not None:
                part.close()
        raise
    endpoint.membership = membership
    endpoint.resources = [transport, bus, membership]
    return endpoint


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


def _agree(membership: Membership, config: Config, dim: int, dtype: torch.dtype, deepstack_layers: int) -> Config:
    mine = {name: getattr(config, name) for name in AGREED if hasattr(config, name)}
    mine.update(dim=dim, dtype=str(dtype).removeprefix("torch."), deepstack_layers=deepstack_layers,
                language_pool_blocks=config.language_pool_blocks)
    everyone = [json.loads(raw) for raw in membership.groups.all_gather_bytes(json.dumps(mine).encode())]
    leader = membership.topology.language_leader
    for name in AGREED:
        for rank, theirs in enumerate(everyone):
            if theirs[name] != everyone[leader][name]:
                raise ValueError(
                    f"{name}: rank {rank} ({membership.describe(rank)}) has {theirs[name]!r}, the language "
                    f"leader (rank {leader}) has {everyone[leader][name]!r}; both sides must use the same value"
                )
    pool = everyone[leader]["language_pool_blocks"]
    return config if pool == config.language_pool_blocks else config.replace(language_pool_blocks=pool)


def _control_bus(membership: Membership, config: Config) -> ShmBus:
    groups = membership.groups
    rank = membership.rank
    nodes = [m.node_id for m in membership.members]
    local = [r for r in range(membership.world_size) if r != rank and nodes[r] == nodes[rank]]
    remote = [r for r in range(membership.world_size) if nodes[r] != nodes[rank]]

    def exchange(data: bytes) -> dict[int, bytes]:
        return dict(enumerate(groups.all_gather_bytes(data)))

    bus = ShmBus.create(rank, local, exchange, slots=config.ring_slots, slot_bytes=config.slot_bytes,
                        peer_timeout=config.peer_timeout_s, heartbeat_interval=config.heartbeat_interval_s,
                        limits=config.limits, prefix=config.shm_prefix)
    if len(set(nodes)) == 1:
        return bus
    try:
        from embxfer.control.remote import RemoteLink

        secret = exchange(secrets.token_bytes(32) if rank == 0 else b"")[0]
        host = os.environ.get(BIND_HOST_ENV) or membership.member(rank).address
        port = 0
        if os.environ.get(LINK_PORT_ENV):  # fixed ports (firewalls): base + this rank's index on its node
            port = int(os.environ[LINK_PORT_ENV]) + [r for r in range(membership.world_size)
                                                     if nodes[r] == nodes[rank]].index(rank)
        link = RemoteLink(rank, secret, host, port, max_frame_bytes=bus.writer.capacity,
                          heartbeat_interval_s=config.heartbeat_interval_s, on_receive=bus.doorbell.ring,
                          advertise_host=os.environ.get(ADVERTISE_HOST_ENV) or None)
        endpoints = exchange(link.endpoint.encode())
        link.connect({peer: endpoints[peer].decode() for peer in remote})
        bus.attach_link(link, remote)
        exchange(b"linked")
    except BaseException:
        bus.close()
        raise
    log.info("rank %d: %d peer(s) on this node (shared memory), %d on other nodes (zmq at %s)",
             rank, len(local), len(remote), link.endpoint)
    return bus
