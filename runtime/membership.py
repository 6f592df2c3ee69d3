"""Who is in the job: engines, their incarnations and members, as every process sees them.

The design in one page (the host path, elastic engines, reuse and security of this round
all build on it):

**Engines are peers of a job.** A job is any number of encoder engines and language
engines, each with a *name* (`"vit-0"`, `"llm-a"`), a role and a TP size. The engines'
router picks the pair per request: the language side names the encoder engine at
`admit`, the encoder side (optionally) names the language engine at `submit`. An
encoder engine may feed several language engines and a language engine may take from
several encoder engines.

**Members and incarnations.** A *member* is one process of one start of an engine: its
id is a random 48-bit number drawn when it joins, never reused, and every record, ring,
link frame and data pair names members by id. An engine's start is an *incarnation*,
named by the member id of its TP rank 0. A restarted engine is a new incarnation with new
member ids, so nothing of the old one (a late record, a replayed RESUME, a pair) can be
taken for the new one: ids that died are forgotten, and what still carries them is
dropped.

**The rendezvous** is a key-value store that no engine hosts: `embxfer rendezvous`
(torch's TCPStore server in a process of its own, next to the router, under a
supervisor), or torchrun's store for the one-world mode. Engines join in any order, at
any time; while it is down, engines already joined go on moving data (rings, links and
data pairs do not go through it) and joins wait and retry. Keys, under
`embxfer/<namespace>/` (the namespace is a function of the job secret):

    log, log/<n>                     the event log: counter + signed JOIN / LEAVE / DEAD events
    engine/<name>                    signed pointer to the engine's current incarnation
    slot/<name>/<incarnation>/<tp>   signed claim of a TP slot (compare_set: one process each)
    error/<name>/<incarnation>       signed: a rank of that incarnation failed to start
    pair/<tag>/...                   torch's own keys of one data pair (gloo / NCCL bootstrap)

and `embxfer/epoch`, a token the rendezvous draws when it starts: a member that sees it
change (the rendezvous restarted, empty) publishes itself again.

**Every value is signed** with the job's rendezvous key (HMAC-SHA256 over the key's name,
the epoch and the JSON body; `secret.py`): a process without the secret cannot register a
member, claim a slot, post an error or an event, and the values tell it nothing that helps
it forge a record or receive data (no secret is ever stored). What an outsider that
reaches the rendezvous can still do is deny service: delete or overwrite keys, so joins
wait (see docs/reliability.md, "Security").

**Joining** (`join`): TP rank 0 draws its member id, which names the new incarnation,
points `engine/<name>` at it and claims slot 0; every other rank reads the pointer and
claims its slot of that incarnation (a slot already held means that incarnation is
complete or taken: it waits for a newer one). Each member then appends a JOIN event
(its ring name, link endpoint, node, pid, settings). `connect()` returns once its own
incarnation is complete and linked.

**Watching** (`LiveDirectory`): a daemon thread reads new log entries every
`POLL_INTERVAL_S` (one store round trip when nothing changed), verifies them and queues
the changes; the endpoint applies them in `progress()`, on its own thread. A member is
*linked* to a peer when each reads the other's control records (same node: each has
attached to the other's ring, which the ring's reader table shows; other nodes: the
signed link is connected). An engine incarnation is *usable* by a member when all its
TP slots have joined, every one of them is linked, and its settings agree.

**Leaving and dying**: `close(drain=True)` announces DRAINING (no new requests), finishes
what is in flight, then LEFT: peers drop the engine without failing anything. A member
that dies (its process gone, its heartbeats stale, its link silent) is found by each
peer's own liveness checks, not through the rendezvous; a survivor that finds it so also
posts a DEAD event, which tells members that join later not to wait for it. A death read
in the log is not posted again, and a joiner does not link a member whose DEAD or LEFT
is in the same read: each restart adds its own events to the log (its JOIN, at most one
DEAD a member that read the dead one's records), not one per death before it. A dead
member takes its engine incarnation with it: every peer fails exactly the requests bound
to that incarnation (`peer_dead`, naming the engine and the TP rank).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from .secret import JobSecret

log = logging.getLogger("embxfer")

# How often a member looks for changes at the rendezvous: one store round trip when
# nothing changed; a join is seen within this (the 2 s join budget has room).
POLL_INTERVAL_S = 0.25
EPOCH_CHECK_S = 1.0
MEMBER_ID_BITS = 48
MAX_NAME_CHARS = 64
# Entries of the log read per store request, and per read: a joiner catches up with a long
# job's history in one read (a log of 8000 entries took 8 s at one chunk a poll, ~3 store
# round trips an entry), and what an outsider writes still costs bounded work (a jump of
# the counter: its entries are missing, each costs LOG_GAP_GRACE_S; values that do not
# verify: the read stops after their chunk).
MAX_LOG_READ = 256
MAX_LOG_READ_PER_POLL = 64 * MAX_LOG_READ
# A log index that stays missing this long (a writer that died between add and set, or
# an outsider that bumped the counter) is skipped.
LOG_GAP_GRACE_S = 5.0
_VALUE_MAGIC = b"EXV1"
_MAC_BYTES = 32


class Role(str, Enum):
    ENCODER = "encoder"
    LANGUAGE = "language"


def new_member_id() -> int:
    return secrets.randbits(MEMBER_ID_BITS - 1) | (1 << (MEMBER_ID_BITS - 1))


def check_engine_name(name: object, what: str = "engine") -> str:
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise ValueError(f"{what}={name!r}: expected an engine name (str) or index (int)")
    if isinstance(name, int):
        raise ValueError(f"{what}={name!r}: an index needs the role to name the engine")
    if not 1 <= len(name) <= MAX_NAME_CHARS or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        raise ValueError(f"{what}={name!r}: expected 1-{MAX_NAME_CHARS} characters from [A-Za-z0-9._-]")
    return name


def engine_name(role: Role | str, engine: int | str) -> str:
    """An engine's name: a name as given, or the legacy index form (`encoder1`, `language0`)."""
    kind = type(engine)
    if kind is not str and kind is not int:  # a bool, or anything else: the checks say what is wrong
        return _engine_name(role, engine)
    known = _NAMES.get((role, engine, kind))  # asked for every request: remember the few good names
    if known is not None:
        return known
    name = _engine_name(role, engine)
    if len(_NAMES) < 1024:
        _NAMES[(role, engine, kind)] = name
    return name


_NAMES: dict[tuple, str] = {}


def _engine_name(role: Role | str, engine: int | str) -> str:
    role = Role(role)
    if isinstance(engine, bool):
        raise ValueError(f"engine={engine!r}: expected an engine name (str) or index (int)")
    if isinstance(engine, int):
        if engine < 0:
            raise ValueError(f"engine={engine}: expected an index >= 0")
        return f"{role.value}{engine}"
    return check_engine_name(engine)


@dataclass(frozen=True)
class MemberInfo:
    """One process of one incarnation of one engine, as it published itself."""

    member: int
    engine: str
    role: str
    incarnation: int
    tp_rank: int
    tp_size: int
    node: str
    host: str
    pid: int
    ring: str = ""
    link: str = ""
    settings: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        return f"{self.role} engine '{self.engine}' TP rank {self.tp_rank}"

    def where(self) -> str:
        return f"pid {self.pid} on {self.host}"

    def to_json(self) -> dict:
        body = asdict(self)
        body["settings"] = dict(self.settings)
        return body

    @classmethod
    def from_json(cls, body: dict) -> MemberInfo:
        body = dict(body)
        body["settings"] = tuple(sorted(dict(body.get("settings") or {}).items()))
        info = cls(**body)
        for name in ("member", "incarnation", "tp_rank", "tp_size", "pid"):
            if type(getattr(info, name)) is not int:
                raise ValueError(f"member.{name}: expected an integer")
        if not 0 <= info.tp_rank < info.tp_size or info.role not in ("encoder", "language"):
            raise ValueError(f"member: tp_rank {info.tp_rank} of {info.tp_size}, role {info.role!r}")
        check_engine_name(info.engine)
        return info


@dataclass
class EngineView:
    """One incarnation of an engine as this process knows it."""

    name: str
    role: Role
    tp_size: int
    incarnation: int
    members: list[int | None]
    state: str = "joining"  # joining -> usable -> draining -> left | dead
    why: str = ""  # for dead / left
    # It announced DRAINING while this process still joined it (a restart's first read can
    # hold both): it turns "draining", not "usable", once joined (`Endpoint._check_joining`),
    # so that what it took before draining still finishes.
    drains: bool = False
    settings: dict = field(default_factory=dict)

    @property
    def leader(self) -> int | None:
        return self.members[0]

    @property
    def complete(self) -> bool:
        return all(m is not None for m in self.members)

    @property
    def gone(self) -> bool:
        return self.state in ("left", "dead")

    def describe(self) -> str:
        return f"{self.role.value} engine '{self.name}'"


class Change(Enum):
    JOINED = "joined"  # a member joined (MemberInfo)
    DRAINING = "draining"  # a member's engine stops taking new requests
    LEFT = "left"  # a member left after draining
    DEAD = "dead"  # a survivor found a member dead


# --------------------------------------------------------------------------- signed values


class SignedStore:
    """The rendezvous store seen through the job's key: `put` signs, `get` verifies.

    `store` is a `torch.distributed.Store` (a TCPStore client); keys are under
    `embxfer/<namespace>/`. A value that fails verification reads as absent and is
    counted in `forged` (and logged once per key prefix and minute)."""

    def __init__(self, store: Any, secret: JobSecret, namespace: str | None = None) -> None:
        self.store = store
        self.secret = secret
        self.prefix = f"embxfer/{namespace or secret.namespace}/"
        self.forged = 0
        self._logged: dict[str, float] = {}
        self.epoch = self.read_epoch()

    def read_epoch(self) -> str:
        """The rendezvous's start token (drawn here if the rendezvous did not: torchrun's store)."""
        token = secrets.token_hex(8)
        held = self.store.compare_set("embxfer/epoch", "", token)
        return bytes(held).decode(errors="replace")

    def _mac(self, key: str, body: bytes) -> bytes:
        return self.secret.sign("rendezvous", key.encode(), self.epoch.encode(), body)

    def seal(self, key: str, value: dict) -> bytes:
        body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        return _VALUE_MAGIC + self._mac(key, body) + body

    def open(self, key: str, raw: bytes) -> dict | None:
        raw = bytes(raw)
        if len(raw) > 1 << 16 or not raw.startswith(_VALUE_MAGIC) or len(raw) < len(_VALUE_MAGIC) + _MAC_BYTES:
            return self._forged(key, "not a signed value")
        mac, body = raw[4:4 + _MAC_BYTES], raw[4 + _MAC_BYTES:]
        if not self.secret.verify("rendezvous", mac, key.encode(), self.epoch.encode(), body):
            return self._forged(key, "bad signature")
        try:
            value = json.loads(body)
        except ValueError:
            return self._forged(key, "not JSON")
        return value if isinstance(value, dict) else self._forged(key, "not an object")

    def _forged(self, key: str, why: str) -> None:
        self.forged += 1
        family = key.split("/", 1)[0]
        now = time.monotonic()
        if now - self._logged.get(family, -1e9) > 60.0:
            self._logged[family] = now
            log.warning("embxfer rendezvous: ignored the value of %r (%s; %d ignored so far): written by a "
                        "process without this job's secret, or by a job with another secret", key, why,
                        self.forged)
        return None

    def put(self, key: str, value: dict) -> None:
        self.store.set(self.prefix + key, self.seal(key, value))

    def claim(self, key: str, value: dict) -> dict | None:
        """compare_set: the value that holds the key now (ours if we got it). A forged
        holder is overwritten (an outsider cannot take a slot)."""
        mine = self.seal(key, value)
        held = bytes(self.store.compare_set(self.prefix + key, "", mine))
        if held == mine:
            return value
        opened = self.open(key, held)
        if opened is None:
            self.store.set(self.prefix + key, mine)
            return value
        return opened

    def get(self, key: str) -> dict | None:
        full = self.prefix + key
        if not self.store.check([full]):
            return None
        return self.open(key, self.store.get(full))

    def append(self, value: dict) -> int:
        index = int(self.store.add(self.prefix + "log", 1))
        self.put(f"log/{index}", value)
        return index

    def log_length(self) -> int:
        return int(self.store.add(self.prefix + "log", 0))


# --------------------------------------------------------------------------- directory


class Directory:
    """What the endpoint asks about the job: engines by name, members by id.

    Changes are applied by `apply()` on the endpoint's thread; `StaticDirectory` (one
    torchrun world, in-process tests) has them all from the start, `LiveDirectory` feeds
    them from the rendezvous."""

    def __init__(self, me: MemberInfo) -> None:
        self.me = me
        self.members: dict[int, MemberInfo] = {me.member: me}
        self.incarnations: dict[tuple[str, int], EngineView] = {}
        self.current: dict[str, EngineView] = {}  # name -> its newest incarnation
        self.gone_members: dict[int, str] = {}
        self._index_member(me)

    # -- queries
    def engine(self, name: str) -> EngineView | None:
        return self.current.get(name)

    def member(self, member: int) -> MemberInfo | None:
        return self.members.get(member)

    def view_of(self, member: int) -> EngineView | None:
        info = self.members.get(member)
        return None if info is None else self.incarnations.get((info.engine, info.incarnation))

    @property
    def my_engine(self) -> EngineView:
        return self.incarnations[(self.me.engine, self.me.incarnation)]

    def engines(self, role: Role | None = None) -> list[EngineView]:
        return [v for v in self.current.values() if role is None or v.role is role]

    def describe_member(self, member: int) -> str:
        info = self.members.get(member)
        return f"member {member:x}" if info is None else f"{info.describe()} ({info.where()})"

    # -- changes
    def _index_member(self, info: MemberInfo) -> EngineView:
        key = (info.engine, info.incarnation)
        view = self.incarnations.get(key)
        if view is None:
            view = EngineView(info.engine, Role(info.role), info.tp_size, info.incarnation, [None] * info.tp_size,
                              settings=dict(info.settings))
            self.incarnations[key] = view
            current = self.current.get(info.engine)
            if current is None or current.gone or info.incarnation == info.member and info.tp_rank == 0:
                self.current[info.engine] = view
        if info.tp_size == view.tp_size and view.members[info.tp_rank] is None:
            view.members[info.tp_rank] = info.member
        return view

    def add(self, info: MemberInfo) -> EngineView | None:
        """A member joined; the view of its incarnation (None: a duplicate or a conflict)."""
        if info.member in self.members or info.member in self.gone_members:
            return None
        self.members[info.member] = info
        return self._index_member(info)

    def mark(self, member: int, state: str, why: str = "") -> EngineView | None:
        """A member drains, left or died: so does its engine incarnation (an engine is
        only whole with all its TP ranks). Returns the view if its state changed."""
        view = self.view_of(member)
        if state in ("left", "dead"):
            self.gone_members.setdefault(member, why or state)
        if view is None or view.gone:
            return None
        if state == "draining" and view.state in ("draining", "joining"):
            if view.state == "draining" or view.drains:
                return None
            view.drains = True  # draining as soon as its join is complete
            return view
        view.state, view.why = state, why
        return view


class StaticDirectory(Directory):
    """Every member known and linked from the start (one torchrun world with a layout, or
    `LocalCluster`)."""

    def __init__(self, me: MemberInfo, everyone: Iterable[MemberInfo]) -> None:
        super().__init__(me)
        for info in everyone:
            if info.member != me.member:
                self.add(info)
        for view in self.incarnations.values():
            if view.complete:
                view.state = "usable"

    def poll(self) -> list[tuple[Change, MemberInfo | int, str]]:
        return []

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- live membership


class LiveDirectory(Directory):
    """The directory fed from the rendezvous by a watcher thread (see the module docstring)."""

    def __init__(self, store: SignedStore, me: MemberInfo, *, poll_interval_s: float = POLL_INTERVAL_S,
                 on_change: Callable[[], None] | None = None) -> None:
        super().__init__(me)
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.on_change = on_change
        self.reachable = True
        self._cursor = 0
        self._gap_since: dict[int, float] = {}
        self._queue: deque[tuple[Change, MemberInfo | int, str]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_epoch_check = time.monotonic()
        self._unreachable_logged = False
        self._own_events: list[dict] = []
        self._thread: threading.Thread | None = None
        self._read_lock = threading.Lock()  # the watcher and sync() both read the log
        # A plain connection to the rendezvous that carries nothing: it reads end-of-file
        # the moment the rendezvous goes away, so the store (whose client logs a C++
        # stack trace for every failed call) is not asked while it is down.
        self._canary: socket.socket | None = None
        self._address = (getattr(store.store, "host", None), getattr(store.store, "port", None))
        self._open_canary()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"embxfer-members-{self.me.member:x}", daemon=True)
        self._thread.start()

    def publish(self, event: dict, *, remember: bool = True) -> None:
        """Append an event of ours to the log (and re-publish it after a rendezvous restart)."""
        if remember:
            self._own_events.append(event)
        self._check_reachable()
        self.store.append(event)

    def _open_canary(self) -> bool:
        host, port = self._address
        if host is None or port is None:
            return True
        try:
            canary = socket.create_connection((host, port), timeout=0.5)
        except OSError:
            return False
        canary.setblocking(False)
        self._canary = canary
        return True

    def _check_reachable(self) -> None:
        """ConnectionError while the rendezvous is down (one syscall, no traffic)."""
        if self._address[0] is None:
            return
        if self._canary is None and not self._open_canary():
            raise ConnectionError(f"the rendezvous at {self._address[0]}:{self._address[1]} is down")
        try:
            closed = self._canary.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return
        except OSError:
            closed = True
        if closed:
            self._canary.close()
            self._canary = None
            raise ConnectionError(f"the rendezvous at {self._address[0]}:{self._address[1]} went away")

    def poll(self) -> list[tuple[Change, MemberInfo | int, str]]:
        """The changes the watcher found since the last call (endpoint thread)."""
        if not self._queue:
            return []
        with self._lock:
            changes = list(self._queue)
            self._queue.clear()
        return changes

    def refresh(self) -> None:
        """Ask the watcher to read the log now."""
        self._wake.set()

    def sync(self) -> None:
        """Read the log on the caller's thread, now (one or two store round trips): the
        changes are in the next `poll()`."""
        if not self.reachable:
            return
        self._check_reachable()
        self._read_log()

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                was_down = not self.reachable
                self._check_reachable()
                if was_down:
                    self._reconnect()
                self._read_log()
                now = time.monotonic()
                if now - self._last_epoch_check > EPOCH_CHECK_S:
                    self._last_epoch_check = now
                    self._check_epoch()
                    self._repair()
                if not self.reachable:
                    log.warning("embxfer: the rendezvous answers again")
                self.reachable, self._unreachable_logged, attempt = True, False, 0
                interval = self.poll_interval_s
            except Exception as exc:  # the rendezvous is down: joins wait, data goes on
                self.reachable = False
                if not self._unreachable_logged:
                    self._unreachable_logged = True
                    log.warning("embxfer: cannot reach the rendezvous (%s: %s); engines already joined keep "
                                "working, joins wait until it is back", type(exc).__name__, exc)
                attempt += 1
                interval = min(2.0, self.poll_interval_s * 2 ** min(attempt, 5))
            self._wake.wait(interval)
            self._wake.clear()

    def _reconnect(self) -> None:
        try:
            clone = self.store.store.clone()
        except Exception:
            return
        self.store.store = clone

    def _repair(self) -> None:
        """Put back what an outsider overwrote (a key that no longer verifies): TP rank 0
        its engine's pointer, every member its slot claim. A newer incarnation's signed
        pointer is left alone."""
        me = self.me
        if me.tp_rank == 0 and self.store.get(f"engine/{me.engine}") is None:
            self.store.put(f"engine/{me.engine}", {"incarnation": me.incarnation, "role": me.role,
                                                   "tp_size": me.tp_size})
        slot = f"slot/{me.engine}/{me.incarnation}/{me.tp_rank}"
        if self.store.get(slot) is None:
            self.store.put(slot, {"member": me.member})

    def _check_epoch(self) -> None:
        epoch = self.store.read_epoch()
        if epoch == self.store.epoch:
            return
        log.warning("embxfer: the rendezvous restarted (epoch %s -> %s): publishing this member again",
                    self.store.epoch, epoch)
        self.store.epoch = epoch
        self._cursor = 0
        self._gap_since.clear()
        me = self.me
        if me.tp_rank == 0:
            self.store.put(f"engine/{me.engine}", {"incarnation": me.incarnation, "role": me.role,
                                                   "tp_size": me.tp_size})
        self.store.claim(f"slot/{me.engine}/{me.incarnation}/{me.tp_rank}", {"member": me.member})
        for event in self._own_events:
            self.store.append(event)

    def _read_log(self) -> None:
        with self._read_lock:
            self._read_log_locked()

    def _read_log_locked(self) -> None:
        """Every entry written since the last read, up to MAX_LOG_READ_PER_POLL: chunks of
        MAX_LOG_READ whose entries are all there in two store requests (one `check`, one
        `multi_get`), a chunk with a missing entry one by one up to it (an entry written
        between the counter's `add` and its `set`: looked at again next time, skipped after
        LOG_GAP_GRACE_S)."""
        length = self.store.log_length()
        stop = min(length, self._cursor + MAX_LOG_READ_PER_POLL)
        changes: list[tuple[Change, MemberInfo | int, str]] = []
        while self._cursor < stop:
            end = min(stop, self._cursor + MAX_LOG_READ)
            keys = [f"log/{index}" for index in range(self._cursor + 1, end + 1)]
            full = [self.store.prefix + key for key in keys]
            store = self.store.store
            forged = self.store.forged
            if len(keys) > 1 and hasattr(store, "multi_get") and store.check(full):
                raws = store.multi_get(full)
                for key, raw in zip(keys, raws, strict=True):
                    self._take_event(self.store.open(key, raw), changes)
                self._cursor = end
            elif not self._read_one_by_one(keys, changes):
                break
            if self.store.forged != forged:
                break  # values an outsider wrote: one chunk of them a poll, as before
        if changes:
            with self._lock:
                self._queue.extend(changes)
            if self.on_change is not None:
                self.on_change()

    def _read_one_by_one(self, keys: list[str], changes: list) -> bool:
        """The entries `keys` (from the cursor on) one at a time; False at a missing entry
        still in its grace (the cursor stays before it)."""
        for key in keys:
            index = self._cursor + 1
            if not self.store.store.check([self.store.prefix + key]):
                since = self._gap_since.setdefault(index, time.monotonic())
                if time.monotonic() - since < LOG_GAP_GRACE_S:
                    return False  # written between add and set: look again next time
                self._gap_since.pop(index, None)
                self._cursor = index
                continue
            self._gap_since.pop(index, None)
            self._cursor = index
            self._take_event(self.store.open(key, self.store.store.get(self.store.prefix + key)), changes)
        return True

    @staticmethod
    def _take_event(event: dict | None, changes: list) -> None:
        if event is not None:
            change = _decode_event(event)
            if change is not None:
                changes.append(change)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self._canary is not None:
            self._canary.close()
            self._canary = None


def _decode_event(event: dict) -> tuple[Change, MemberInfo | int, str] | None:
    try:
        kind = Change(event["kind"])
        if kind is Change.JOINED:
            return kind, MemberInfo.from_json(event["member"]), ""
        member = event["member"]
        if type(member) is not int:
            return None
        return kind, member, str(event.get("why", ""))[:512]
    except (KeyError, TypeError, ValueError):
        log.warning("embxfer rendezvous: a signed event that does not parse: %.200r", event)
        return None


def join_event(me: MemberInfo) -> dict:
    return {"kind": Change.JOINED.value, "member": me.to_json()}


def state_event(change: Change, member: int, why: str = "") -> dict:
    return {"kind": change.value, "member": member, "why": why}


# --------------------------------------------------------------------------- joining


def claim_incarnation(store: SignedStore, engine: str, role: Role, tp_rank: int, tp_size: int, member: int,
                      deadline: float, what: str) -> int:
    """This member's engine incarnation: TP rank 0 makes one (its own id); every other rank
    claims its slot in the newest one with that slot free (see the module docstring)."""
    if tp_rank == 0:
        store.put(f"engine/{engine}", {"incarnation": member, "role": role.value, "tp_size": tp_size})
        store.claim(f"slot/{engine}/{member}/0", {"member": member})
        return member
    taken: set[int] = set()
    attempt = 0
    while True:
        pointer = store.get(f"engine/{engine}")
        if pointer is not None:
            incarnation = pointer.get("incarnation")
            if pointer.get("role") != role.value:
                raise ValueError(f"engine={engine!r}: {what} joins as {role.value}, but TP rank 0 of that engine "
                                 f"registered it as {pointer.get('role')}")
            if pointer.get("tp_size") != tp_size:
                raise ValueError(f"tp_size={tp_size}: {what}, but TP rank 0 of engine {engine!r} registered "
                                 f"tp_size={pointer.get('tp_size')}")
            if type(incarnation) is int and incarnation not in taken:
                error = store.get(f"error/{engine}/{incarnation}")
                if error is not None:
                    raise RuntimeError(f"engine {engine!r}: {error.get('by', 'a rank')} failed to start: "
                                       f"{error.get('message', '')}")
                held = store.claim(f"slot/{engine}/{incarnation}/{tp_rank}", {"member": member})
                if held is not None and held.get("member") == member:
                    return incarnation
                taken.add(incarnation)
        if time.monotonic() > deadline:
            if pointer is None:
                raise TimeoutError(f"{what}: TP rank 0 of engine {engine!r} never registered at the rendezvous")
            raise TimeoutError(f"{what}: TP rank {tp_rank} of the newest incarnation of engine {engine!r} is "
                               "held by another process and no newer incarnation came (restart the whole engine: "
                               "all its TP ranks)")
        time.sleep(min(0.05, 0.002 * 2 ** min(attempt, 5)))
        attempt += 1


def post_error(store: SignedStore, engine: str, incarnation: int, by: str, message: str) -> None:
    """Tell the other ranks of this incarnation that this rank cannot start (they fail at
    once instead of waiting for their deadline)."""
    try:
        store.put(f"error/{engine}/{incarnation}", {"by": by, "message": message[:1000]})
    except Exception:  # the failure itself matters more than telling others
        pass


def local_host() -> str:
    return socket.gethostname()


def this_pid() -> int:
    return os.getpid()
