"""State service settings (environment prefix TICKMESH_STATE_)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from tickmesh.runtime.settings import ServiceSettings

from .store import Synchronous


class StateSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TICKMESH_STATE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    store_url: str = "sqlite:///.tickmesh/state.db"
    """Where records live: sqlite:///path (embedded profile)."""
    blob_root: Path = Path(".tickmesh/blobs")
    """Local blob folder (embedded profile)."""
    sqlite_synchronous: Synchronous = "FULL"
    """SQLite synchronous mode: FULL keeps every commit across power loss."""
    max_batch: int = 512
    ack_wait_s: float = 30.0
