"""Nothing from outside is trusted: no pickle, eval or exec anywhere in the package, no
torch.distributed *_object collectives (they pickle), shared memory private to the user."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ["embxfer", "kernels", "control", "runtime"]
FORBIDDEN = re.compile(
    r"^\s*(import|from)\s+(pickle|cPickle|_pickle|marshal|shelve)\b|\bpickle\.|\beval\(|\bexec\(|\w_object\("
)


@pytest.mark.parametrize("folder", PACKAGE_DIRS)
def test_no_pickle_eval_or_object_collectives(folder):
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if FORBIDDEN.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_rings_and_doorbells_of_a_bus_are_mode_0600(tmp_path):
    from embxfer.control.ring import Doorbell, RingWriter

    writer = RingWriter.create(slots=4, slot_bytes=256, max_readers=1, prefix="embxferSEC")
    doorbell = Doorbell.create("embxferSEC")
    try:
        for name in (writer.name, doorbell.name):
            entry = name.lstrip("/")
            path = Path("/dev/shm") / (entry if entry == writer.name.lstrip("/") else f"sem.{entry}")
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        doorbell.close()
        writer.close()
