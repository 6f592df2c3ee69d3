"""Run a script of one checkout with the embxfer package mapped onto that checkout's
folders, as pyproject.toml maps them (embxfer=embxfer/, embxfer.kernels=kernels/,
embxfer.control=control/, embxfer.runtime=runtime/), whatever is installed:

    python3 bench/rooms.py ROOT SCRIPT [ARGS...]

For single-process benchmarks on a machine where the package is not installed, and for
before/after runs in one call (ROOT = an export of the earlier commit).
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys

ROOMS = {"embxfer": "embxfer", "embxfer.kernels": "kernels", "embxfer.control": "control",
         "embxfer.runtime": "runtime"}


def install(root: str) -> None:
    """Put a finder first on sys.meta_path that maps the four package names onto `root`'s
    folders (also used by bench/gpu_check.sh's sitecustomize, for every python it starts)."""
    root = os.path.abspath(root)

    class RoomFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            folder = ROOMS.get(name)
            if folder is None:
                return None
            folder = os.path.join(root, folder)
            return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])

    sys.meta_path.insert(0, RoomFinder)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    root, script = sys.argv[1], sys.argv[2]
    install(root)
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
