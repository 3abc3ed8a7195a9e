"""State service settings (environment prefix TICKMESH_STATE_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tickmesh.runtime.settings import ServiceSettings

from .store import Synchronous


class StateSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TICKMESH_STATE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )
    config_section: ClassVar[str] = "state"

    store_url: str = "sqlite:///.tickmesh/state.db"
    """Where records live: ``sqlite:///path`` (embedded profile) or
    ``postgresql://user:password@host:port/database`` (cloud profile)."""
    migrate_on_start: bool = True
    """Apply pending schema migrations when the service starts; when False the service
    refuses to start on an old schema (run ``tickmesh migrate`` first)."""
    store_pool_min: int = Field(default=1, ge=1)
    """Fewest PostgreSQL connections kept open."""
    store_pool_max: int = Field(default=8, ge=1)
    """Most PostgreSQL connections open at once."""
    store_retry_s: float = Field(default=30.0, ge=0)
    """How long a PostgreSQL operation keeps retrying while the server is unreachable or
    restarting; past that a batch of records is tried again in place (kept in the
    stream's order) and a batch of events is handed back to JetStream and redelivered."""
    store_command_timeout_s: float = Field(default=30.0, gt=0)
    """Longest a PostgreSQL statement may take before its connection is dropped and the
    statement retried on another (a silently dropped link would otherwise hang a batch)."""
    blob_url: str = ".tickmesh/blobs"
    """Where payloads over the inline limit go: a folder (``file://`` URL or path) or
    ``s3://bucket/prefix?region=..&endpoint_url=..&sse=AES256``."""
    sqlite_synchronous: Synchronous = "FULL"
    """SQLite synchronous mode: FULL keeps every commit across power loss."""
    max_batch: int = Field(default=1024, ge=1)
    batch_linger_s: float = Field(default=0.2, ge=0)
    """How long a small batch of records or events waits for more before it is stored.
    The router does not wait for the store, so this costs no step any time; fewer, larger
    transactions (each an fsynced commit) leave more CPU to the steps. A read of the
    history in this service cuts the wait short (``BatchConsumer.hurrying``); a reader
    elsewhere that waits for the records on the bus (a router's usage counters in Redis)
    may wait up to this long more."""
    ack_wait_s: float = Field(default=30.0, gt=0)
