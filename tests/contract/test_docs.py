"""The configuration reference keeps up with the settings."""

from __future__ import annotations

from pathlib import Path

from tickmesh.cli.config import SETTINGS

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_of_every_service_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(
        f"{service}.{name}"
        for service, settings in SETTINGS.items()
        for name in settings.model_fields
        if f"`{name}`" not in doc
    )
    assert not missing, f"docs/configuration.md does not describe {missing}"
