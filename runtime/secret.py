"""The job's secret: where it comes from, and the keys made from it.

A job is the set of engines that may exchange requests; what makes a process a member of
it is knowing the job's secret. The secret comes from the deployment, the same for every
engine, and never crosses a socket:

    EMBXFER_SECRET        the secret itself (at least 16 characters; e.g. 32 random bytes
                          in hex from the deployment's secret store)
    EMBXFER_SECRET_FILE   a file holding it (its first line); the file must be readable
                          by its owner only (mode 0600 or 0400), as ssh requires of keys

Without either, embxfer still runs (development, CI, `embxfer demo`, which makes one for
the processes it spawns), but anyone who can reach the rendezvous or a link port can join
or forge: the first `load_secret()` of a process says so once, at WARNING.

Nothing signs or encrypts with the secret itself: each use has its own key, derived with
HMAC-SHA256 under a label (`key(purpose)`), so a key learned from one use (say, the
link's) says nothing about another's (the rendezvous values'):

    "rendezvous"   signs every value an engine publishes at the rendezvous
    "link"         signs every frame of the cross-node control link
    "pair"         the handshake that opens each data pair (gloo/NCCL)
    "namespace"    names the job's keys at the rendezvous (several jobs can share one)
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("embxfer")

SECRET_ENV = "EMBXFER_SECRET"
SECRET_FILE_ENV = "EMBXFER_SECRET_FILE"
MIN_SECRET_CHARS = 16
MAX_SECRET_BYTES = 4096
# The key material of an unauthenticated job: public, so it only catches corruption.
_UNAUTHENTICATED = b"embxfer-unauthenticated-job"
_warned = False


@dataclass(frozen=True)
class JobSecret:
    """The job's secret (`authenticated`: it came from the deployment) and its keys."""

    material: bytes = field(repr=False)
    authenticated: bool
    source: str

    def key(self, purpose: str) -> bytes:
        """A 32-byte key for one use of the secret (see the module docstring)."""
        return hmac.new(self.material, b"embxfer/v1/" + purpose.encode(), hashlib.sha256).digest()

    def sign(self, purpose: str, *parts: bytes) -> bytes:
        """HMAC-SHA256 of `parts` (length-prefixed, so no two splits sign alike)."""
        mac = hmac.new(self.key(purpose), digestmod=hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(4, "little"))
            mac.update(part)
        return mac.digest()

    def verify(self, purpose: str, signature: bytes, *parts: bytes) -> bool:
        return hmac.compare_digest(self.sign(purpose, *parts), signature)

    @property
    def namespace(self) -> str:
        """The job's key prefix at the rendezvous (a function of the secret)."""
        return self.key("namespace")[:8].hex()


def load_secret(env: Mapping[str, str] | None = None, *, warn: bool = True) -> JobSecret:
    """The job's secret from `EMBXFER_SECRET` or `EMBXFER_SECRET_FILE` (not both), else the
    unauthenticated stand-in, said once per process. ValueError naming the variable for a
    secret that is too short, a file that cannot be read or that others can read."""
    global _warned
    env = os.environ if env is None else env
    value, path = env.get(SECRET_ENV), env.get(SECRET_FILE_ENV)
    if value and path:
        raise ValueError(f"{SECRET_ENV} and {SECRET_FILE_ENV} are both set: expected one of them")
    if path:
        return JobSecret(_read_secret_file(path), True, f"{SECRET_FILE_ENV}={path}")
    if value:
        return JobSecret(_check_secret(value.encode(), SECRET_ENV), True, SECRET_ENV)
    if warn and not _warned:
        _warned = True
        log.warning("embxfer: no %s or %s: this job is unauthenticated (anyone who reaches its rendezvous "
                    "or link ports can join it or forge its records); set one for anything but a test",
                    SECRET_ENV, SECRET_FILE_ENV)
    return JobSecret(_UNAUTHENTICATED, False, "none (unauthenticated)")


def _check_secret(raw: bytes, where: str) -> bytes:
    raw = raw.strip()
    if len(raw) < MIN_SECRET_CHARS:
        raise ValueError(f"{where}: {len(raw)} characters, expected at least {MIN_SECRET_CHARS} "
                         "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    if len(raw) > MAX_SECRET_BYTES:
        raise ValueError(f"{where}: {len(raw)} bytes, expected at most {MAX_SECRET_BYTES}")
    return raw


def _read_secret_file(path: str) -> bytes:
    where = f"{SECRET_FILE_ENV}={path!r}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ValueError(f"{where}: cannot open it ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{where}: expected a regular file")
        if info.st_mode & 0o077:
            raise ValueError(f"{where}: mode {stat.S_IMODE(info.st_mode):04o} lets others read it; expected 0600 "
                             f"or 0400 (chmod 600 {path})")
        if info.st_uid != os.geteuid():
            raise ValueError(f"{where}: owned by uid {info.st_uid}, expected this process's uid {os.geteuid()}")
        data = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    first = data.splitlines()[0] if data.strip() else b""
    return _check_secret(first, where)
