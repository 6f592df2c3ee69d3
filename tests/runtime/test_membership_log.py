"""The rendezvous's event log as a member reads it (`LiveDirectory._read_log`): a long job's
history in one read, a missing entry held until its grace ends, values that do not verify
dropped and counted, at most one chunk of them a read."""

from __future__ import annotations

import os
import secrets

import pytest

from embxfer.runtime import membership
from embxfer.runtime.membership import (
    Change,
    LiveDirectory,
    MemberInfo,
    SignedStore,
    new_member_id,
    state_event,
)
from embxfer.runtime.rendezvous import RendezvousServer
from embxfer.runtime.secret import load_secret


@pytest.fixture
def store():
    server = RendezvousServer("127.0.0.1", 0)
    try:
        yield SignedStore(server.client(), load_secret({"EMBXFER_SECRET": secrets.token_hex(32)}))
    finally:
        server.close()


def reader(store: SignedStore) -> LiveDirectory:
    me = MemberInfo(member=new_member_id(), engine="llm-a", role="language", incarnation=1, tp_rank=0, tp_size=1,
                    node="n", host="h", pid=os.getpid())
    return LiveDirectory(store, me)  # the watcher thread is not started: reads are the test's


def history(store: SignedStore, count: int) -> list[int]:
    """`count` LEFT events of members that came and went, as a long job's log holds them."""
    members = [new_member_id() for _ in range(count)]
    for member in members:
        store.append(state_event(Change.LEFT, member, "history"))
    return members


def test_a_joiner_reads_a_long_history_in_one_read(store):
    """1000 entries: all of them in the first read (it read 256 a poll, so a new engine
    waited ~1 s per 1000 entries of history before it saw the engines that joined after)."""
    members = history(store, 1000)
    directory = reader(store)
    try:
        directory.sync()
        assert [subject for _, subject, _ in directory.poll()] == members
        assert directory._cursor == 1000
    finally:
        directory.close()


def test_a_missing_entry_holds_the_read_until_its_grace_ends(store, monkeypatch):
    """An index counted but not written yet (a writer between `add` and `set`, or one that
    died there): the entries before it are read, the read waits there, and skips it once
    LOG_GAP_GRACE_S has passed."""
    before = history(store, 10)
    store.store.add(store.prefix + "log", 1)  # index 11, never written
    after = history(store, 5)
    directory = reader(store)
    try:
        directory.sync()
        assert [subject for _, subject, _ in directory.poll()] == before
        directory.sync()
        assert directory.poll() == [] and directory._cursor == 10
        monkeypatch.setattr(membership, "LOG_GAP_GRACE_S", 0.0)
        directory.sync()
        assert [subject for _, subject, _ in directory.poll()] == after
        assert directory._cursor == 16
    finally:
        directory.close()


def test_values_that_do_not_verify_are_dropped_and_stop_the_read_after_their_chunk(store):
    """Entry 10 written by a process without the secret: dropped and counted; the read
    stops after its chunk (an outsider's values cost one chunk of checks a read), and the
    next read goes on from there."""
    first = history(store, 9)
    index = int(store.store.add(store.prefix + "log", 1))
    store.store.set(store.prefix + f"log/{index}", b'{"kind": "dead", "member": 5}')
    rest = history(store, 2 * membership.MAX_LOG_READ)
    directory = reader(store)
    try:
        directory.sync()
        chunk = membership.MAX_LOG_READ
        assert [subject for _, subject, _ in directory.poll()] == first + rest[: chunk - 10]
        assert store.forged == 1 and directory._cursor == chunk
        directory.sync()
        assert [subject for _, subject, _ in directory.poll()] == rest[chunk - 10 :]
    finally:
        directory.close()
