"""Router settings (environment prefix TICKMESH_ROUTER_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from tickmesh.runtime.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TICKMESH_ROUTER_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    max_batch: int = 512
    """Most refs taken from the bus in one batch."""
    ack_wait_s: float = 30.0
    """How long a ref may be held before JetStream redelivers it."""
    lifetime_cache_size: int = 20_000
    """Lifetimes kept in memory per tenant (their state lives in the KV bucket)."""
    outbox_retention_s: float = 3600.0
    """Outbox entries older than this are dropped even if their publisher never confirmed."""
