"""The `embxfer` command: `info`, `demo`, `ring ls|rm`.

Usage errors exit 2 with one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

from .config import Config


class UsageError(Exception):
    """Bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage block too
        raise UsageError(f"{self.prog}: {message}")


def _versions() -> dict[str, str]:
    import embxfer

    versions = {"embxfer": embxfer.__version__, "python": platform.python_version()}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        versions["torch"] = "not installed"
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    return versions


def _devices() -> list[str]:
    import torch

    found = [f"cpu ({platform.machine()}, {__import__('os').cpu_count()} cores)"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            found.append(f"cuda:{index} {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    return found


def cmd_info(args: argparse.Namespace) -> int:
    config = Config.from_env()
    print("embxfer info")
    for name, version in _versions().items():
        print(f"  {name:<8} {version}")
    print("devices")
    for device in _devices():
        print(f"  {device}")
    print("configuration (EMBXFER_* overrides applied)")
    print(config.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="embxfer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    info = commands.add_parser("info", help="versions, devices and the effective configuration")
    info.set_defaults(handler=cmd_info)
    from .demo import add_demo_arguments

    demo = commands.add_parser("demo", help="stream synthetic payloads and verify them bit-exact (the main job)")
    add_demo_arguments(demo)
    demo.set_defaults(handler=cmd_demo)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.raw_argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        raw = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(raw)
        args.raw_argv = raw[raw.index(args.command) + 1:]
        return args.handler(args)
    except UsageError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # configuration errors name the field already
        print(f"embxfer: error: {exc}", file=sys.stderr)
        return 2
