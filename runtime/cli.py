"""The `embxfer` command: `info`, `demo`, `ring ls|rm`.

Usage errors exit 2 with one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import fields

from .config import Config
from .demo import ArgumentParser, UsageError, add_demo_arguments

SHM_PREFIX_ENV = "EMBXFER_SHM_PREFIX"
PREFIX_HELP = ("name prefix (default: $EMBXFER_SHM_PREFIX, else embxfer; a run with --nodes N also uses "
               "<prefix>.n0 ... <prefix>.nN-1)")


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

    found = [f"cpu ({platform.machine()}, {os.cpu_count()} cores)"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            found.append(f"cuda:{index} {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    return found


def cmd_info(args: argparse.Namespace) -> int:
    from .demo import demo_configuration

    config = Config.from_env()
    print("embxfer info")
    for name, version in _versions().items():
        print(f"  {name:<8} {version}")
    print("devices")
    for device in _devices():
        print(f"  {device}")
    print("configuration (defaults < EMBXFER_* variables; what embxfer.connect() uses)")
    print(config.describe())
    demo, device_kind = demo_configuration()
    changed = [f.name for f in fields(Config) if getattr(demo, f.name) != getattr(config, f.name)]
    print(f"embxfer demo (no flags, on {device_kind}) runs with the above, except its own defaults where no "
          f"EMBXFER_* variable is set:" if changed else "embxfer demo (no flags) runs with the above")
    for name in changed:
        print(f"  {name} = {getattr(demo, name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="embxfer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser,
                                     metavar="COMMAND")
    info = commands.add_parser("info", help="versions, devices and the effective configuration")
    info.set_defaults(handler=cmd_info)
    demo = commands.add_parser("demo", help="stream synthetic payloads and verify them bit-exact (the main job)")
    add_demo_arguments(demo)
    demo.set_defaults(handler=cmd_demo)
    ring = commands.add_parser("ring", help="list or remove control-ring segments left in /dev/shm")
    ring_actions = ring.add_subparsers(dest="ring_action", required=True, parser_class=ArgumentParser,
                                           metavar="ACTION")
    ring_ls = ring_actions.add_parser("ls", help="ring segments and doorbells, with their creator and whether it runs")
    ring_ls.add_argument("--prefix", default=None, help=PREFIX_HELP)
    ring_rm = ring_actions.add_parser("rm", help="remove entries whose creator is gone (or the named ones)")
    ring_rm.add_argument("names", nargs="*", metavar="NAME", help="entries to remove, as `ring ls` shows them")
    ring_rm.add_argument("--prefix", default=None, help=PREFIX_HELP)
    ring_rm.add_argument("--force", action="store_true", help="also remove entries whose creator still runs")
    ring.set_defaults(handler=cmd_ring)
    rendezvous = commands.add_parser("rendezvous", help="run the job's rendezvous (a process no engine hosts)")
    from .rendezvous import add_arguments as add_rendezvous_arguments

    add_rendezvous_arguments(rendezvous)
    rendezvous.set_defaults(handler=cmd_rendezvous)
    return parser


def cmd_rendezvous(args: argparse.Namespace) -> int:
    from .rendezvous import run

    return run(args)


def cmd_ring(args: argparse.Namespace) -> int:
    from embxfer.control.hygiene import list_segments, remove_segments

    prefix = args.prefix or os.environ.get(SHM_PREFIX_ENV) or "embxfer"
    if args.ring_action == "ls":
        try:
            entries = list_segments(prefix)
        except ValueError as exc:
            raise UsageError(f"embxfer ring ls: {exc}") from None
        if not entries:
            print(f"no ring segments or doorbells with prefix {prefix!r} in /dev/shm")
            return 0
        print(f"{'NAME':<48} {'KIND':<8} {'BYTES':>10} {'CREATOR':>8}  STATE")
        for entry in entries:
            state = "alive" if entry.alive else "stale (creator gone)"
            print(f"{entry.name:<48} {entry.kind:<8} {entry.size:>10} {entry.creator_pid:>8}  {state}")
        return 0
    try:
        removed = remove_segments(args.names or None, stale_only=not args.force, prefix=prefix)
    except ValueError as exc:
        raise UsageError(f"embxfer ring rm: {exc}") from None
    for name in removed:
        print(f"removed {name}")
    for name in sorted({name.lstrip("/") for name in args.names} - set(removed)):
        print(f"kept {name}: its creator still runs (--force removes it anyway)")
    print(f"{len(removed)} removed")
    return 0


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
