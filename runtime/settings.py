"""Every `EMBXFER_*` environment variable embxfer reads, and the parsers that read them.

Two kinds of variable:

- one per `Config` field: field `x` reads `EMBXFER_X` (`Config.env_values` parses them
  with `parse_int` / `parse_float` below);
- the runtime's own (`RUNTIME_VARIABLES`): where engines meet, which node a process is
  on, where its cross-node link listens and what peers dial, the job's secret.

`variables()` is the registry of both. Names starting with `EMBXFER_TEST_` belong to the
test suite and are never reported; any other `EMBXFER_*` name embxfer does not read is a
typo until proven otherwise, and `warn_unknown_variables` says so once per process,
naming the closest known variable (a letter short of `EMBXFER_PEER_TIMEOUT_S`: that one).

The parsers accept plain ASCII only: `int("1_0")` and `int("١٠")` are 10 to Python, but
a value that reads differently to a person and to the parser is refused. Every error
names the variable, the value as it was set, and what was expected.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import sys
import warnings
from collections.abc import Mapping
from dataclasses import fields

ENV_PREFIX = "EMBXFER_"
TEST_PREFIX = "EMBXFER_TEST_"

RENDEZVOUS = "EMBXFER_RENDEZVOUS"
NODE_ID = "EMBXFER_NODE_ID"
BIND_HOST = "EMBXFER_BIND_HOST"
LINK_PORT = "EMBXFER_LINK_PORT"
ADVERTISE_HOST = "EMBXFER_ADVERTISE_HOST"
SECRET = "EMBXFER_SECRET"
SECRET_FILE = "EMBXFER_SECRET_FILE"
ENGINE = "EMBXFER_ENGINE"
SPAWNED_CHILD = "EMBXFER_SPAWNED_CHILD"

RUNTIME_VARIABLES: dict[str, str] = {
    RENDEZVOUS: "tcp://host:port where separately launched engines meet",
    NODE_ID: "this process's node: ranks with one node id share shared-memory rings",
    BIND_HOST: "the address this node's cross-node link listens on (see bind_host)",
    LINK_PORT: "the first fixed port of this node's cross-node links (see link_port)",
    ADVERTISE_HOST: "the address peers dial for this node's links: NAT, wildcard binds (see advertise_host)",
    SECRET: "the job's secret for signing cross-node frames",
    SECRET_FILE: "a file holding the job's secret",
    ENGINE: "this process's engine index",
    SPAWNED_CHILD: "set by embxfer's launcher in the processes it starts (internal)",
}

_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Far beyond any count or size embxfer takes, and short of Python's limit on int(str).
_MAX_DIGITS = 30
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                        r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")
_WILDCARDS = ("*", "0.0.0.0", "::")


class UnknownVariableWarning(UserWarning):
    """An `EMBXFER_*` variable is set that embxfer does not read (a typo, most likely)."""


def variables() -> dict[str, str]:
    """Every `EMBXFER_*` variable embxfer reads -> what it sets, sorted by name."""
    from .config import Config

    known = {ENV_PREFIX + f.name.upper(): f"Config.{f.name}" for f in fields(Config)}
    known.update(RUNTIME_VARIABLES)
    return dict(sorted(known.items()))


def parse_int(variable: str, raw: str, *, owner: str = "") -> int:
    """`raw` as an int if it is a plain ASCII decimal integer (optional sign, surrounding
    whitespace); else ValueError `<owner>: <variable>='<raw>': expected a decimal integer`."""
    text = raw.strip()
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{_where(owner)}{variable}={raw!r}: expected a decimal integer")
    if len(text.lstrip("+-")) > _MAX_DIGITS:
        raise ValueError(f"{_where(owner)}{variable}={raw!r}: expected a decimal integer of at most "
                         f"{_MAX_DIGITS} digits")
    return int(text)


def parse_float(variable: str, raw: str, *, owner: str = "") -> float:
    """`raw` as a finite float if it is a plain ASCII decimal number (`0.5`, `5`, `5e-1`;
    optional sign, surrounding whitespace); `nan`, `inf`, `1_0.5`, hex and non-ASCII
    digits are refused with a ValueError naming the variable."""
    text = raw.strip()
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"{_where(owner)}{variable}={raw!r}: expected a decimal number (such as 0.5 or 5e-1)")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{_where(owner)}{variable}={raw!r}: expected a finite number")
    return value


def _where(owner: str) -> str:
    return f"{owner}: " if owner else ""


_warned: set[str] = set()


def warn_unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """The `EMBXFER_*` names set in `env` (default: the process environment) that embxfer
    does not read, `EMBXFER_TEST_*` aside; each is warned about (UnknownVariableWarning,
    naming the closest known variable) the first time this process sees it."""
    env = os.environ if env is None else env
    known = variables()
    unknown = sorted(name for name in env if name.upper().startswith(ENV_PREFIX) and name not in known
                     and not name.upper().startswith(TEST_PREFIX))
    for name in unknown:
        if name in _warned:
            continue
        _warned.add(name)
        if name.upper() in known:
            hint = f"did you mean {name.upper()}? (names are case-sensitive)"
        else:
            suffixes = {known_name[len(ENV_PREFIX):]: known_name for known_name in known}
            close = difflib.get_close_matches(name.upper()[len(ENV_PREFIX):], suffixes, n=1)
            hint = (f"did you mean {suffixes[close[0]]}?" if close
                    else "embxfer ignores it (embxfer.runtime.settings.variables() lists what it reads)")
        warnings.warn(f"{name} is set, but embxfer reads no such variable: {hint}", UnknownVariableWarning,
                      stacklevel=_first_caller_outside_embxfer())
    return unknown


def _first_caller_outside_embxfer() -> int:
    """The stacklevel that points a warning at the code that called into embxfer (the
    engine's `connect()`), not at the line inside embxfer that noticed."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "embxfer":
        level, frame = level + 1, frame.f_back
    return level


def link_port(env: Mapping[str, str] | None = None, *, ports: int = 1) -> int | None:
    """EMBXFER_LINK_PORT: the first of `ports` consecutive TCP ports this node's links use
    (a process takes base + its index on the node), so base .. base + ports - 1 must lie
    in 1..65535. None when unset or empty (any free port)."""
    if isinstance(ports, bool) or not isinstance(ports, int) or not 1 <= ports <= 65535:
        raise ValueError(f"link_port: ports={ports!r}: expected an integer in 1..65535")
    env = os.environ if env is None else env
    raw = env.get(LINK_PORT)
    if raw is None or not raw.strip():
        return None
    port = parse_int(LINK_PORT, raw)
    if not 1 <= port <= 65535 - (ports - 1):
        room = f" with room for {ports} processes on this node (base + 0 .. base + {ports - 1})" if ports > 1 else ""
        raise ValueError(f"{LINK_PORT}={raw!r}: expected a TCP port in 1..65535{room}")
    return port


def _host_variable(env: Mapping[str, str], name: str) -> tuple[str, str, ipaddress._BaseAddress | None] | None:
    """(raw value, host without IPv6 brackets, its ip_address or None for a name); None
    when the variable is unset or empty."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    host = raw.strip()
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        address = None
    return raw, literal, address


def advertise_host(env: Mapping[str, str] | None = None) -> str | None:
    """EMBXFER_ADVERTISE_HOST: the address peers dial (an IP address or a host name; it
    need not be this machine's, behind NAT it is not). None when unset or empty."""
    env = os.environ if env is None else env
    parsed = _host_variable(env, ADVERTISE_HOST)
    if parsed is None:
        return None
    raw, literal, address = parsed
    if literal in _WILDCARDS or (address is not None and address.is_unspecified):
        raise ValueError(f"{ADVERTISE_HOST}={raw!r}: peers cannot dial a wildcard address; expected the address "
                         "other nodes reach this node on")
    if address is None and not _HOST_NAME.fullmatch(literal):
        raise ValueError(f"{ADVERTISE_HOST}={raw!r}: expected an IP address or a host name")
    return literal


def bind_host(env: Mapping[str, str] | None = None) -> str | None:
    """EMBXFER_BIND_HOST: where this node's cross-node link listens. An IP address or a
    host name of this machine (checked by binding a UDP socket to it, port 0), or one of
    its interface names (`eth0`, which zmq binds as it is). A wildcard (`0.0.0.0`, `::`,
    `*`) only with EMBXFER_ADVERTISE_HOST set: peers cannot dial a wildcard. None when
    unset or empty. IPv6 brackets are taken off."""
    env = os.environ if env is None else env
    parsed = _host_variable(env, BIND_HOST)
    if parsed is None:
        return None
    raw, literal, address = parsed
    if literal in _WILDCARDS or (address is not None and address.is_unspecified):
        if advertise_host(env) is None:
            raise ValueError(f"{BIND_HOST}={raw!r} listens on every interface, and peers cannot dial a wildcard: "
                             f"expected the address other nodes reach this node on, or set {ADVERTISE_HOST} too")
        return literal
    if address is None and literal in _interface_names():
        return literal
    try:
        candidates = socket.getaddrinfo(literal, 0, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"{BIND_HOST}={raw!r}: expected an IP address, host name or interface name of this "
                         f"machine; the name does not resolve ({exc})") from None
    failures = []
    for family, kind, protocol, _, sockaddr in candidates:
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.bind(sockaddr)
            return literal
        except OSError as exc:
            failures.append(f"{sockaddr[0]}: {exc.strerror or exc}")
    raise ValueError(f"{BIND_HOST}={raw!r}: not an address of this machine (binding to it failed: "
                     f"{'; '.join(failures)}); expected the address of one of this node's interfaces")


def _interface_names() -> set[str]:
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:  # no interface list on this platform: names are then resolved as hosts
        return set()


__all__ = [
    "ADVERTISE_HOST",
    "BIND_HOST",
    "ENV_PREFIX",
    "LINK_PORT",
    "RUNTIME_VARIABLES",
    "TEST_PREFIX",
    "UnknownVariableWarning",
    "advertise_host",
    "bind_host",
    "link_port",
    "parse_float",
    "parse_int",
    "variables",
    "warn_unknown_variables",
]
