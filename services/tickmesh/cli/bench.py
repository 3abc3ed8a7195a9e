"""`tickmesh bench`: the benchmark of a source checkout, from any directory.

tickmesh bench [OPTIONS]           the mesh benchmark (``python -m bench``; the first half of
                                   ``make bench``): both profiles, M = 1, 100 and 1,000
tickmesh bench parked [OPTIONS]    10,000 lifetimes parked at once (``python -m bench.parked``)

Options go to the benchmark as they are (``tickmesh bench --help`` lists them). The benchmark
lives in the repository's ``bench/`` beside ``services/``: it starts the services from the
checkout, can start throwaway PostgreSQL, Redis and S3 servers through the test harnesses,
and writes its results to ``bench/results/``. So it runs where tickmesh is installed from a
checkout (``make install`` installs it editable); an installation from a wheel says so and
exits with 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

PARKED = "parked"
PROG_OPTION = "--prog"
"""The benchmark's first option, naming the command its usage lines show
(bench/invocation.py)."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """List ``bench`` in ``tickmesh --help`` (its arguments are the benchmark's own, so
    :func:`run` takes them before the CLI's parser sees them)."""
    sub.add_parser(
        "bench",
        help="run the benchmark of a source checkout (options: tickmesh bench --help; "
        "'tickmesh bench parked' for parked lifetimes)",
        add_help=False,
    )


def checkout(package_dir: Path | None = None) -> Path | None:
    """The repository this tickmesh runs from, if it runs from a checkout with the
    benchmark (``services/tickmesh`` installed editable), else None. ``package_dir``:
    where the services' ``tickmesh`` package is (default: this module's)."""
    services = (package_dir or Path(__file__).resolve().parents[1]).parent
    root = services.parent
    if services.name != "services" or not (root / "bench" / "__main__.py").is_file():
        return None
    return root


def run(argv: Sequence[str], err: TextIO, *, package_dir: Path | None = None) -> int:
    """Run the benchmark with ``argv`` (after ``bench``) and return its exit code."""
    root = checkout(package_dir)
    if root is None:
        err.write(
            "tickmesh: the benchmark runs from a source checkout (bench/ beside services/), "
            "and this tickmesh is not installed from one: clone the repository, run "
            "`make install`, then `tickmesh bench` (or `make bench`)\n"
        )
        return 2
    module, prog, rest = "bench", "tickmesh bench", list(argv)
    if rest and rest[0] == PARKED:
        module, prog, rest = "bench.parked", f"tickmesh bench {PARKED}", rest[1:]
    # The benchmark imports its modules and starts its processes from the checkout's root;
    # its usage lines name the command typed here, not the module run.
    return subprocess.call([sys.executable, "-m", module, PROG_OPTION, prog, *rest], cwd=root)
