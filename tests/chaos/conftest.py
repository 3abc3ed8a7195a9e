"""The chaos suite: real processes, injected faults, an auditor (RELIABILITY.md §4)."""

from __future__ import annotations

import pytest

from tests.chaos import report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    recorded = report.rows()
    if recorded:
        terminalreporter.section("chaos summary")
        terminalreporter.write_line(report.table(recorded))
