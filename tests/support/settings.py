"""A service's settings as a process with exactly a given environment would load them."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

from tickmesh.cli.config import SETTINGS
from tickmesh.runtime.settings import ServiceSettings


def load_settings(
    monkeypatch: pytest.MonkeyPatch, service: str, env: Mapping[str, str]
) -> ServiceSettings:
    """``service``'s settings with exactly ``env`` in the environment (no other
    ``TICKMESH_*`` variable of this process leaks in)."""
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("TICKMESH_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return SETTINGS[service]()
