"""The command a user typed to run the benchmark, for its usage lines."""

from __future__ import annotations

import sys

PROG_OPTION = "--prog"
"""Given first by ``tickmesh bench`` (``--prog 'tickmesh bench'``): the name the usage
lines show instead of the module's. Not listed in ``--help``."""


def invocation(argv: list[str] | None, default: str) -> tuple[str, list[str]]:
    """(the program name to show, the rest of ``argv``), ``argv`` defaulting to the
    process's arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == PROG_OPTION:
        return args[1], args[2:]
    return default, args
