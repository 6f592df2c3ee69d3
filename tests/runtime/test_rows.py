"""`runtime/rows.py` (requests as rows) and bench/rows_probe.py's lanes on it, on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embxfer.control import records as rec
from embxfer.runtime import Config
from embxfer.runtime import rows as R
from embxfer.runtime.local import LocalCluster, random_payload

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import rows_probe  # noqa: E402 - bench/rows_probe.py


def test_add_sets_the_given_columns_and_zeroes_the_rest_of_a_reused_slot():
    rows = R.Rows(capacity=4)
    first = rows.add([10, 11], state=R.TRANSFERRING, total=[5, 6], sent=3)
    assert first.tolist() == [0, 1]
    assert rows.column("total")[first].tolist() == [5, 6] and rows.column("sent")[first].tolist() == [3, 3]
    rows.remove(first[:1])
    again = rows.add([12])
    assert again.tolist() == [0]  # the freed slot first (LIFO)
    assert rows.column("total")[0] == 0 and rows.column("sent")[0] == 0 and rows.column("state")[0] == 0
    assert rows.column("request_id")[0] == 12 and rows.slots([12, 11, 10]).tolist() == [0, 1, -1]
    assert rows.state_names(np.array([1])) == ["TRANSFERRING"]


def test_a_repeated_or_present_id_or_an_unknown_column_adds_nothing():
    rows = R.Rows(capacity=2)
    rows.add([1])
    with pytest.raises(ValueError, match=r"request_ids\[1\]=1: already in the table"):
        rows.add([2, 1])
    with pytest.raises(ValueError, match=r"request_ids\[1\]=3"):
        rows.add([3, 3])
    with pytest.raises(KeyError, match="no column 'colour'"):
        rows.add([4], colour=1)
    assert len(rows) == 1 and 2 not in rows and 3 not in rows and 4 not in rows
    with pytest.raises(KeyError, match="no column 'colour'"):
        rows.column("colour")


def test_remove_refuses_a_slot_not_in_use_or_named_twice_and_removes_nothing():
    rows = R.Rows(capacity=4)
    slots = rows.add([7, 8])
    with pytest.raises(ValueError, match="not distinct slots in use"):
        rows.remove(np.array([slots[0], slots[0]]))
    with pytest.raises(ValueError, match="not distinct slots in use"):
        rows.remove(np.array([3]))
    assert len(rows) == 2
    assert rows.remove_id(7) == slots[0] and rows.remove_id(7) == -1 and len(rows) == 1


def test_capacity_must_be_a_positive_integer():
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="capacity"):
            R.Rows(capacity=bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9)), max_size=40))
def test_the_table_agrees_with_a_dict_through_adds_removes_and_growth(ops):
    """Against a plain dict of id -> total: every id's slot holds its own values, slots
    are distinct, and the table grows from one slot as far as it must."""
    rows, model, next_id = R.Rows(capacity=1), {}, 0
    for add, count in ops:
        if add:
            ids = list(range(next_id, next_id + count))
            next_id += count
            rows.add(ids, total=[i * 3 for i in ids])
            model.update({i: i * 3 for i in ids})
        elif model:
            gone = sorted(model)[: count]
            rows.remove(rows.slots(gone))
            for i in gone:
                del model[i]
        slots = rows.slots(list(model))
        assert len(rows) == len(model) and (slots >= 0).all() and len(set(slots.tolist())) == len(model)
        assert rows.column("total")[slots].tolist() == list(model.values())
        assert rows.column("request_id")[slots].tolist() == list(model)
        assert rows.capacity >= len(model)


def test_a_transfer_read_by_column_is_the_record_transfer_encodes():
    """The probe's TRANSFER by column: the same bytes as records.Transfer, the same
    segments back, and a segment out of bounds refused as Transfer._parse refuses it."""
    segments = (rec.Segment(5, 0, 0, 7, 7, -3), rec.Segment(1 << 40, 2, 4, 3, 9, 1 << 50))
    record = rec.Transfer.trusted(src_rank=0, dst_rank=1, message=4, nbytes=999, segments=segments)
    columns = np.zeros(2, rows_probe.SEGMENT)
    for name in rows_probe.SEGMENT.names:
        columns[name] = [getattr(s, name) for s in segments]
    frame = rows_probe.transfer_bytes(0, 1, 4, 999, columns)
    assert frame == rec.encode(record)
    message, read = rows_probe.transfer_columns(frame, 64)
    assert message == 4 and [tuple(r) for r in read.tolist()] == [tuple(s) for s in segments]
    columns["start"][0] = 1  # tokens [1, 8) of 7
    with pytest.raises(rec.RecordError, match="out of bounds"):
        rows_probe.transfer_columns(rows_probe.transfer_bytes(0, 1, 4, 999, columns), 64)
    with pytest.raises(rec.RecordError, match="segments"):
        rows_probe.transfer_columns(frame, 1)


def test_the_probes_lanes_move_every_payload_bit_exact_and_leave_nothing_behind(monkeypatch):
    """bench/rows_probe.py's measure() asserts on its first batch that every payload came
    out bit for bit and that both tables and the block pool are empty again."""
    monkeypatch.setattr(rows_probe, "DIM", 16)
    for shape in (rows_probe.SHAPES["latency"], rows_probe.Shape(40, 24, 40, 64, 16)):  # 3 messages
        out = rows_probe.measure(rows_probe.torch.device("cpu"), shape, reps=1)
        assert out["encoder_us"] > 0 and out["language_us"] > 0
        assert out["wall_us"] >= out["encoder_us"] + out["language_us"]


def test_the_probe_writes_both_measurements_of_each_round(tmp_path):
    assert rows_probe.main(["--json", str(tmp_path / "rows-{device}.json"), "--reps", "2", "--rounds", "1",
                            "--dim", "16"]) == 0
    result = json.loads((tmp_path / "rows-cpu.json").read_text())
    assert result["dim"] == 16 and set(result["cases"]) == {"many_small", "latency"}
    for case in result["cases"].values():
        (only,) = case["rounds"]
        assert set(only) == {"rows", "lane", "objects"}
        assert all(only[side][key] > 0 for side in only for key in ("encoder_us", "language_us", "wall_us"))


def test_the_runtimes_phases_are_each_charged_once_and_put_back():
    """bench/rows_probe.py's RuntimePhases: every phase of the usual path is charged, the
    phases of a side add up to no more than its engine calls' total (a nested call charged
    twice would overflow it), and restore() leaves every method as it was."""
    cluster = LocalCluster(config=Config(block_size=16, default_alloc_tokens=64, language_pool_blocks=64), dim=16)
    spent = rows_probe.time_engine_calls(cluster)
    sender, leader = cluster.senders[0], cluster.leader
    before = {name: getattr(leader, name) for name in rows_probe.RuntimePhases.ENDPOINT["language"]}
    shared = [rows_probe.SendChannel._send_one, rows_probe.LoopbackHub._match,
              *(getattr(rows_probe.ops, name) for name in rows_probe.RuntimePhases.OPS)]
    phases = rows_probe.RuntimePhases(cluster)
    payloads = {rid: random_payload(10 + rid, 16, seed=rid) for rid in range(12)}
    taken = cluster.transfer(payloads)
    cluster.submit(99, payloads[0])
    cluster.admit(99)
    cluster.run_until(lambda: 99 in leader.finished())  # the single calls too
    phases.restore()
    assert all(copies[0].bit_equal(payloads[rid]) for rid, copies in taken.items())
    charged = phases.spent
    for key in ("language.admit_many", "language.admissions", "language.message", "language.landed",
                "language.take_many", "language.records", "language.bus", "language.unpack", "encoder.submit_many",
                "encoder.records", "encoder.release", "encoder.bus", "encoder.message", "encoder.pack", "wire"):
        assert charged[key] > 0, key
    for side in ("language", "encoder"):
        assert sum(v for k, v in charged.items() if k.startswith(side + ".")) <= spent[side]
    assert {name: getattr(leader, name) for name in before} == before
    assert [rows_probe.SendChannel._send_one, rows_probe.LoopbackHub._match,
            *(getattr(rows_probe.ops, name) for name in rows_probe.RuntimePhases.OPS)] == shared
    assert not {"drain", "flush", "publish"} & set(vars(sender.bus)) and not {"_on_record"} & set(vars(sender))
