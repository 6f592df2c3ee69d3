"""A Ctrl-C (or SIGTERM) that lands while an engine loop is parked in `ShmBus.wait` is not
lost: posix_ipc would turn the handler's exception into a SignalError inside its
semaphore wait; the bus parks with the signals blocked, so the handler runs, and raises,
when the park ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from embxfer.control.hygiene import remove_segments

CHILD = textwrap.dedent("""
    import os, sys
    from embxfer.control import records as rec
    from embxfer.runtime.bus import ShmBus

    prefix = sys.argv[1]
    names = {}

    def exchange(data):
        names.setdefault(len(names), data)
        return {0: names[0], 1: names[0]}

    # A bus whose one peer is a ring of this very process: nothing is ever published, so
    # every wait parks on the doorbell until its timeout.
    bus = ShmBus.create(1, [0], exchange, slots=8, slot_bytes=4096, peer_timeout=30.0,
                        heartbeat_interval=0.5, limits=rec.NO_LIMITS, prefix=prefix)
    print("parked", flush=True)
    try:
        while True:
            bus.wait(0.2)
    finally:
        bus.close()
""")


@pytest.mark.parametrize("signum, expected", [(signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, "terminated")])
def test_a_signal_during_a_park_reaches_the_engine(signum, expected):
    prefix = f"embxsig{os.getpid() % 100000}"
    code = CHILD
    if signum == signal.SIGTERM:
        code = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit('terminated'))\n" + code
    child = subprocess.Popen([sys.executable, "-c", code, prefix], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "parked"
        time.sleep(0.5)  # well inside a park
        sent = time.monotonic()
        child.send_signal(signum)
        _, err = child.communicate(timeout=5)
        assert time.monotonic() - sent < 2.0
        assert expected in err, err[-500:]
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            remove_segments(stale_only=True, prefix=prefix)
    leftovers = [n for n in os.listdir("/dev/shm") if n.removeprefix("sem.").startswith(prefix)]
    assert leftovers == []
