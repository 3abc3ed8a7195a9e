"""The chaos suite's summary table: one row per fault a test injected.

Every test of ``tests/chaos`` records what it did and what the auditor found with
:func:`record`; the session prints the table at the end (``make chaos`` and the ★ subset
in ``make test``) and writes it to ``.build/chaos/summary.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

SUMMARY = Path(__file__).resolve().parents[2] / ".build" / "chaos" / "summary.json"


@dataclass(frozen=True, slots=True)
class Row:
    test: str
    """Which test (RELIABILITY.md §4.2 number and a short name, e.g. "1 state SIGKILL")."""
    fault: str
    """What was done to the system, e.g. "SIGKILL state x3 (seed 7)"."""
    attempted: int
    """Envelopes (or steps) the test tried to get through."""
    acked: int
    """Of those, how many the system acknowledged as accepted."""
    persisted: int
    """How many the store holds at the end."""
    lost: int
    """Acknowledged but not persisted (must be 0)."""
    duplicated: int
    """Persisted more than once (must be 0)."""
    recovery_s: float = math.nan
    """From the fault's end to the system being caught up; NaN when not measured."""
    peak_rss_mib: float = math.nan
    """Peak resident memory of the services under test; NaN when not measured."""


_rows: list[Row] = []


def record(row: Row) -> None:
    """Add ``row`` to the session's table (and to ``.build/chaos/summary.json``)."""
    _rows.append(row)
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps([asdict(r) for r in _rows], indent=2))


def rows() -> list[Row]:
    return list(_rows)


def table(recorded: list[Row]) -> str:
    """The rows as a fixed-width table."""
    headers = (
        "test",
        "fault",
        "attempted",
        "acked",
        "persisted",
        "lost",
        "dup",
        "recovery s",
        "peak RSS MiB",
    )
    body = [
        (
            r.test,
            r.fault,
            str(r.attempted),
            str(r.acked),
            str(r.persisted),
            str(r.lost),
            str(r.duplicated),
            "-" if math.isnan(r.recovery_s) else f"{r.recovery_s:.2f}",
            "-" if math.isnan(r.peak_rss_mib) else f"{r.peak_rss_mib:.0f}",
        )
        for r in recorded
    ]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)
