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


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    root, script = os.path.abspath(sys.argv[1]), sys.argv[2]
    rooms = {"embxfer": "embxfer", "embxfer.kernels": "kernels", "embxfer.control": "control",
             "embxfer.runtime": "runtime"}

    class RoomFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            folder = rooms.get(name)
            if folder is None:
                return None
            folder = os.path.join(root, folder)
            return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])

    sys.meta_path.insert(0, RoomFinder)
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
