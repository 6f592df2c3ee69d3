"""Backends and stores: the torch pieces embxfer builds its own groups and rendezvous from.

An engine already has a `torch.distributed` world of its own (its TP group); that world is
not ours to touch. As NCCL's `ncclCommInitRank(comm, nranks, id, rank)` makes a
communicator from an id, embxfer makes its backends straight from a store, a rank and a
world size (`ProcessGroupGloo`, `ProcessGroupNCCL`), without `init_process_group` and
without registering anything in torch's global state; its data pairs (`pairs.py`) are
two-rank backends made this way. P2P goes straight to the backends
(`Backend.send([tensor], peer, tag)`), because `dist.isend` only knows groups registered
in the default world.

Stores: the rendezvous server (`_host_store`, listening on one address only), a client
that waits for it with a deadline (`_connect_store`), and torchrun's store for the
one-world mode (`_torchrun_store`).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from embxfer.control.deadlines import check_seconds as _check_seconds

NODE_ID_ENV = "EMBXFER_NODE_ID"
# P2P works may wait this long for their peer (NCCL's own default); set-up uses timeout_s.
DEFAULT_OP_TIMEOUT_S = 600.0
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


# --------------------------------------------------------------------------- hosts


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


