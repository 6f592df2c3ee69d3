"""Fixtures of the control-plane tests: a name prefix of their own, and a check that no
segment or semaphore with it is left in /dev/shm when the session ends."""

from __future__ import annotations

import os
import sys

import pytest

# The worker module is imported by plain name here, in the tests and in spawned children
# (which inherit sys.path), whether or not tests/ is a package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ringworkers import TEST_PREFIX, leftovers  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    stale = leftovers()
    if stale:  # a previous crashed run; its leftovers must not break this one
        from embxfer.control.hygiene import remove_segments

        remove_segments(prefix=TEST_PREFIX, stale_only=True)
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

    def start(target, *args, env: dict[str, str] | None = None):
        saved = {key: os.environ.get(key) for key in (env or {})}
        os.environ.update(env or {})
        try:
            process = context.Process(target=target, args=args, daemon=True)
            process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        started.append(process)
        return process

    start.context = context
    yield start
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(10)
