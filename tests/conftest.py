"""Shared pytest configuration: markers by directory."""

from __future__ import annotations

from pathlib import Path

import pytest

_MARKERS = {
    "integration": pytest.mark.integration,
    "e2e": pytest.mark.e2e,
    "chaos": pytest.mark.chaos,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for directory, marker in _MARKERS.items():
            if directory in parts:
                item.add_marker(marker)


pytest_plugins = ["tests.support.hangs"]
