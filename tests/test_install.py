"""The installed package: one `embxfer` namespace, its public face, and the `embxfer` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would put the repository on the import path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("EMBXFER_")}
    env.update(extra)
    return env


def run_python(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def test_subpackages_import():
    import embxfer
    import embxfer.control
    import embxfer.kernels
    import embxfer.runtime

    assert embxfer.kernels.__name__ == "embxfer.kernels"
    assert embxfer.control.__name__ == "embxfer.control"
    assert embxfer.runtime.__name__ == "embxfer.runtime"


def test_public_api_exported():
    import embxfer
    from embxfer.runtime.allocator import BlockAllocator
    from embxfer.runtime.payload import Payload
    from embxfer.runtime.pool import BlockPool

    assert embxfer.Payload is Payload
    assert embxfer.BlockPool is BlockPool
    assert embxfer.BlockAllocator is BlockAllocator
    assert isinstance(embxfer.__version__, str) and embxfer.__version__
    for name in embxfer.__all__:
        assert hasattr(embxfer, name), name


def test_no_top_level_rooms_outside_the_repository(tmp_path):
    script = (
        "import importlib.util, embxfer, embxfer.kernels, embxfer.control, embxfer.runtime\n"
        "for name in ('kernels', 'control', 'runtime'):\n"
        "    print(name, importlib.util.find_spec(name))\n"
        "print('package', embxfer.__file__)\n"
        "import os, site\n"
        "for d in site.getsitepackages() + [site.getusersitepackages()]:\n"
        "    for name in ('kernels', 'control', 'runtime'):\n"
        "        for entry in (name, name + '.py'):\n"
        "            if os.path.exists(os.path.join(d, entry)):\n"
        "                print('installed', os.path.join(d, entry))\n"
    )
    result = run_python(["-c", script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["kernels None", "control None", "runtime None"], result.stdout
    assert lines[3].startswith("package ")
    assert not [line for line in lines if line.startswith("installed")], result.stdout


def test_embxfer_info_prints_versions(tmp_path):
    import torch

    result = run_python(["-m", "embxfer", "info"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch" in out and torch.__version__ in out
    assert "triton" in out
    try:
        import triton
    except ImportError:
        assert "not installed" in out
    else:
        assert triton.__version__ in out
    assert "block_size" in out and "128" in out
    assert "Traceback" not in result.stderr


def test_embxfer_info_shows_env_overrides(tmp_path):
    result = run_python(["-m", "embxfer", "info"], cwd=tmp_path, EMBXFER_BLOCK_SIZE="64")
    assert result.returncode == 0, result.stderr
    assert any(line.split() == ["block_size", "=", "64"] for line in result.stdout.splitlines()), result.stdout


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["bogus"], {}, "bogus"),
        (["info", "--bad-flag"], {}, "--bad-flag"),
        ([], {}, "COMMAND"),
        (["info"], {"EMBXFER_BLOCK_SIZE": "0"}, "block_size"),
        (["info"], {"EMBXFER_BLOCK_SIZE": "lots"}, "block_size"),
    ],
    ids=["unknown-command", "bad-flag", "no-command", "block-size-zero", "block-size-text"],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, args, env, words):
    result = run_python(["-m", "embxfer", *args], cwd=tmp_path, **env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
