"""docs/examples/engine_loop.py runs as documented: exit 0 and the outcomes it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "engine_loop.py"


def test_engine_loop_example_runs() -> None:
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in (
        "request 1: SUCCESS, embeddings (700, 256) torch.bfloat16, bit-exact on 2 language ranks: True",
        "request 2: SUCCESS, embeddings (5000, 256) torch.bfloat16, bit-exact on 2 language ranks: True",
        "request 3: FAILED (user: client disconnected)",
        "request 4: rejected by submit: payload.embeddings: D=128, expected 256",
        "blocks in use: {0: 0, 1: 0, 2: 0}",
        "engine loop example: ok",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
