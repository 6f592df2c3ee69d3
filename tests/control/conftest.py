"""Fixtures of the control-plane tests: a name prefix of their own, and a check that no
segment or semaphore with it is left in /dev/shm when the session ends."""

from __future__ import annotations

import os
import re
import sys

import pytest

# The worker module is imported by plain name here, in the tests and in spawned children
# (which inherit sys.path), whether or not tests/ is a package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ringworkers import BASE_PREFIX, TEST_PREFIX, leftovers  # noqa: E402

_SESSION_PREFIX = re.compile(rf"^(?:sem\.)?({BASE_PREFIX}(\d+))-")


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    from embxfer.control._process import process_alive
    from embxfer.control.hygiene import remove_segments

    # What crashed earlier sessions left must not break this one; a session still running
    # (its pid is in the prefix) may be reading a dead writer's ring on purpose.
    sessions = {match[1]: int(match[2]) for match in map(_SESSION_PREFIX.match, os.listdir("/dev/shm")) if match}
    for session_prefix, session_pid in sessions.items():
        if session_prefix != TEST_PREFIX and not process_alive(session_pid):
            remove_segments(prefix=session_prefix, stale_only=True)
    yield
    left = leftovers()
    assert not left, f"/dev/shm entries left behind: {left}"


@pytest.fixture(autouse=True)
def no_leak_from_this_test():
    before = set(leftovers())
    yield
    leaked = sorted(set(leftovers()) - before)
    if leaked:
        from embxfer.control.hygiene import remove_segments

        remove_segments(prefix=TEST_PREFIX, stale_only=True)
        pytest.fail(f"this test left /dev/shm entries behind: {leaked}")


@pytest.fixture
def prefix() -> str:
    return TEST_PREFIX


@pytest.fixture
def spawn():
    """Start worker processes (spawn context); each is killed and joined afterwards."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    started = []

    def start(target, *args):
        process = context.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    start.context = context
    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(10)
