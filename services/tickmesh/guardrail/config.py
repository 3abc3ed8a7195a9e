"""Guardrail settings (environment prefix TICKMESH_GUARDRAIL_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from tickmesh.runtime.settings import ServiceSettings


class GuardrailSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TICKMESH_GUARDRAIL_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    snapshot_lease_s: float = 30.0
    """How long routers may enforce a snapshot without hearing from this service."""
    refresh_fraction: float = 0.3
    state_target: str | None = None
    """host:port of a state service, for tenant-scope rules in Evaluate; without it those
    rules reject (fail closed)."""
    """Snapshots are re-issued every lease times this fraction, well before they expire."""
