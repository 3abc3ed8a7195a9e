"""Settings of the executor pool (environment prefix ``TICKMESH_EXECUTOR_POOL_``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tickmesh.runtime.settings import ServiceSettings

DEFAULT_INLINE_LIMIT = 256 * 1024


class ExecutorPoolSettings(ServiceSettings):
    """What the executor pool reads from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="TICKMESH_EXECUTOR_POOL_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )
    config_section: ClassVar[str] = "executor_pool"

    blob_url: str = ".tickmesh/blobs"
    """Where payloads over the inline limit go: a folder (``file://`` URL or path) or
    ``s3://bucket/prefix?region=..&endpoint_url=..&sse=AES256``."""
    inline_limit: int = Field(default=DEFAULT_INLINE_LIMIT, ge=1)
    """Payloads larger than this many bytes are offloaded to the blob store."""
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    """How often executors are asked to heartbeat in-flight work; one that lets its work's
    ack wait run out without heartbeating it is ended as unresponsive."""
    ack_wait_s: float = Field(default=30.0, gt=0)
    """JetStream ack wait of the work consumers; heartbeats extend it."""
    max_batch: int = Field(default=256, ge=1)
    """Most messages taken from a consumer in one batch."""
    max_ack_pending: int = Field(default=20_000, ge=1)
    """JetStream max_ack_pending of each work consumer (above any executor capacity)."""
    reject_delay_s: float = Field(default=0.5, ge=0)
    """Redelivery delay of work an executor rejected (another executor may take it)."""
