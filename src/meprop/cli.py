"""The ``meprop`` command line: one parser, with subcommands registered by their modules."""

from __future__ import annotations

import argparse
import sys

from . import __version__, demo

COMMANDS = [demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meprop", description="meProp, meSimp and meAct: minimal effort back propagation."
    )
    parser.add_argument("--version", action="version", version=f"meprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    args.func(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
