"""Entry point of the `tickmesh` command: parses arguments and dispatches."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tickmesh", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def _version() -> str:
    try:
        return f"tickmesh {metadata.version('tickmesh')}"
    except metadata.PackageNotFoundError:
        return "tickmesh (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
