"""Guardrail settings (environment prefix TICKMESH_GUARDRAIL_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tickmesh.runtime.settings import ServiceSettings


class GuardrailSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TICKMESH_GUARDRAIL_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )
    config_section: ClassVar[str] = "guardrail"

    snapshot_lease_s: float = Field(default=30.0, gt=0)
    """How long routers may enforce a snapshot without hearing from this service."""
    refresh_fraction: float = Field(default=0.3, gt=0, lt=1)
    """Snapshots are re-issued every lease times this fraction, well before they expire."""
    state_target: str | None = None
    """host:port of a state service, for tenant-scope rules in Evaluate when no
    ``usage_counter_url`` is set; with neither, those rules reject (fail closed)."""
