"""Records between nodes over zmq: loopback by default, validated on receipt, timeouts."""

from __future__ import annotations

import pytest

from embxfer.control.records import (
    Abort,
    AbortReason,
    Decision,
    DecisionAction,
    Segment,
    Transfer,
    encode,
)
from embxfer.control.remote import RecordReceiver, RecordSender

pytestmark = pytest.mark.timeout(30)


def test_records_cross_over_loopback_and_malformed_ones_are_dropped():
    with RecordReceiver() as receiver, RecordSender(receiver.endpoint) as sender:
        assert receiver.endpoint.startswith("tcp://127.0.0.1:")
        records = [
            Transfer(0, 3, 0, 1024, (Segment(1, 0, 0, 8192, 9168, -4),)),
            Decision(1, 1, DecisionAction.RESUME, 8192, 9168, 1024, tuple(range(64, 72)), 3, -4),
            Abort(2, AbortReason.TIMEOUT, "no progress for 120 s", 3, 0),
        ]
        sender.send(records[0], timeout=5)
        sender.send_bytes(b"garbage", timeout=5)
        sender.send_bytes(encode(records[1])[:-1], timeout=5)
        sender.send(records[1], timeout=5)
        sender.send(records[2], timeout=5)
        assert [receiver.recv(timeout=5) for _ in records] == records
        assert receiver.recv(timeout=0.05) is None
        stats = receiver.stats
        assert (stats.received, stats.rejected) == (3, 2)
        assert "body bytes" in stats.last_error


def test_oversized_messages_never_reach_python():
    with RecordReceiver(max_record_bytes=256) as receiver:
        with RecordSender(receiver.endpoint) as sender:
            sender.send_bytes(bytes(1000), timeout=5)
        assert receiver.recv(timeout=0.3) is None
        with RecordSender(receiver.endpoint) as sender:
            record = Transfer(0, 1, 0, 16, (Segment(1, 0, 0, 10, 10, 0),))
            sender.send(record, timeout=5)
            assert receiver.recv(timeout=5) == record


def test_send_times_out_without_a_peer_and_close_is_idempotent(tmp_path):
    # An ipc endpoint nobody binds: a closed TCP port can be taken again meanwhile, and a
    # loopback connect to a port in the ephemeral range can even connect to itself.
    sender = RecordSender(f"ipc://{tmp_path}/nobody-listens", high_water_mark=1)
    with pytest.raises(TimeoutError, match="accepted nothing"):
        sender.send(Transfer(0, 1, 0, 16, (Segment(1, 0, 0, 10, 10, 0),)), timeout=0.1)
    sender.close()
    sender.close()


def test_bad_bind_address_is_a_clear_error():
    with pytest.raises(OSError, match="cannot bind"):
        RecordReceiver(host="203.0.113.1")
