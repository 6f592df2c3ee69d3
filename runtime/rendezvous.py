"""`embxfer rendezvous`: the job's meeting point, a process of its own that no engine hosts.

It is torch's TCPStore server, listening on one address (never every interface by
default), plus a start token (`embxfer/epoch`) so that members notice when it restarted
empty and publish themselves again. It holds no secret and trusts no one: every value the
engines publish in it is signed by them and checked by their readers (`membership.py`),
so what reaches it from the network can at worst delete or overwrite keys (joins wait).

Run it next to the router, under the supervisor that runs the router (systemd, a
Kubernetes Deployment with one replica and a Service in front), with a restart policy:

    embxfer rendezvous --host 10.0.0.1 --port 29600

While it is down, engines that have joined keep moving data and detecting each other's
failures (rings, links and data pairs do not go through it); a new engine, or a new data
pair between engines that never worked together, waits until it is back.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

log = logging.getLogger("embxfer")

EPOCH_KEY = "embxfer/epoch"


class RendezvousServer:
    """A TCPStore server on `host:port` (port 0: a free one), with its epoch drawn."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        from .groups import _host_store

        if port == 0:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.host, self.port = host, port
        self.address = f"tcp://{f'[{host}]' if ':' in host else host}:{port}"
        self.store: Any = _host_store(host, port, 30.0, self.address)
        self.epoch = secrets.token_hex(8)
        self.store.set(EPOCH_KEY, self.epoch)

    def client(self) -> Any:
        return dist.TCPStore(self.host, self.port, None, False, timedelta(seconds=30), wait_for_workers=False)

    def close(self) -> None:
        self.store = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embxfer rendezvous", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; the address the engines reach it on)")
    parser.add_argument("--port", type=int, default=29600, help="port (default 29600; 0: any free port)")
    parser.add_argument("--ready-file", default=None, metavar="PATH",
                        help="write tcp://HOST:PORT to PATH once listening (scripts, tests)")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        print(f"embxfer rendezvous: --port={args.port}: expected 0..65535", file=sys.stderr)
        return 2
    try:
        server = RendezvousServer(args.host, args.port)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"embxfer rendezvous: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"embxfer rendezvous: listening on {server.address} (epoch {server.epoch})", flush=True)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(server.address)
    while not stop.wait(1.0):
        pass
    server.close()
    time.sleep(0.05)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
