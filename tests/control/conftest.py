"""Fixtures of the control-plane tests: a name prefix of their own, and a check that no
segment or semaphore with it is left in /dev/shm when the session ends."""

from __future__ import annotations

import os
import sys

import pytest

# The worker module is imported by plain name here, in the tests and in spawned children
# (which inherit sys.path), whether or not tests/ is a package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ringworkers import BASE_PREFIX, SCAN_PREFIX, TEST_PREFIX, leftovers  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    from embxfer.control._process import process_alive
    from embxfer.control.hygiene import list_segments, remove_segments

    # What crashed earlier sessions left must not break this one; a session still running
    # (its pid is in the prefix) may be reading a dead writer's ring on purpose.
    for info in list_segments(BASE_PREFIX):
        session = info.name[len(BASE_PREFIX) :].split("-", 1)[0]
        if session.isdigit() and not process_alive(int(session)) and not info.alive:
            remove_segments([info.name], stale_only=True)
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

        remove_segments(prefix=SCAN_PREFIX, stale_only=True)
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
