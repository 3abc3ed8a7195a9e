"""Router settings (environment prefix TICKMESH_ROUTER_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tickmesh.runtime.settings import ServiceSettings
from tickmesh.runtime.streams import EVENT_MAX_AGE_S


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TICKMESH_ROUTER_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )
    config_section: ClassVar[str] = "router"

    max_batch: int = Field(default=512, ge=1)
    """Most refs taken from the bus in one batch."""
    ack_wait_s: float = Field(default=30.0, gt=0)
    """How long a ref may be held before JetStream redelivers it."""
    lifetime_cache_size: int = Field(default=20_000, ge=1)
    """Lifetimes kept in memory per tenant (their state lives in the KV bucket)."""
    finished_retention_s: float = Field(default=EVENT_MAX_AGE_S, ge=0)
    """How long a finished lifetime stays in the router's KV bucket after its last write
    (rounded up to whole seconds), with the start request that created it; its record
    stays in the state service. Once it is gone, GetLifetime answers from the state
    service, and watch, fork and replay no longer see it. The default
    matches how long the event stream keeps events; 0 keeps finished lifetimes for ever."""
    outbox_retention_s: float = Field(default=3600.0, gt=0)
    """Outbox entries older than this are dropped even if their publisher never confirmed."""
    state_target: str | None = None
    """host:port of the state service whose GetCounters feeds tenant-scope guardrail windows
    (TICKMESH_ROUTER_STATE_TARGET). Unset: tenant usage is counted in this process only and
    starts from zero on every restart."""
    tenant_usage_refresh_s: float = Field(default=0.2, gt=0)
    """How often tenant usage is read again from the state service."""
    tenant_usage_max_staleness_s: float = Field(default=30.0, gt=0)
    """Tenant-scope rules reject (fail closed) when the state service has not answered for
    this long."""
