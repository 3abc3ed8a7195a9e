"""Settings shared by every service, read from the environment once at start.

Each service subclasses :class:`ServiceSettings` with its own prefix
(``TICKMESH_ROUTER_``, ``TICKMESH_STATE_``, ...); nested values use ``__``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tickmesh.sdk.ids import TENANT_ID_PATTERN

DEFAULT_DATA_DIR = Path(".tickmesh")


def default_instance() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ServiceSettings(BaseSettings):
    """Fields every service has."""

    model_config = SettingsConfigDict(
        env_prefix="TICKMESH_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL(s), comma-separated for a cluster."""
    nats_user: str | None = None
    nats_password: str | None = None
    nats_credentials: str | None = None
    """Path to a NATS .creds file (JWT + NKey seed)."""
    grpc_listen: str = "127.0.0.1:0"
    """host:port the gRPC server binds; port 0 picks a free one."""
    # NoDecode: the environment value is split by the validator below (comma-separated or a
    # JSON list), not JSON-decoded by pydantic-settings first.
    tenants: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["default"])
    """Tenants this process serves (comma-separated or a JSON list in the environment)."""
    log_level: str = "INFO"
    log_json: bool = True
    instance: str = Field(default_factory=default_instance)
    """Identifies this process in envelopes' producer field and in logs."""
    max_message_bytes: int = 8 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    shutdown_grace_s: float = 5.0
    """How long in-flight calls and work may run on SIGTERM."""

    @field_validator("tenants", mode="before")
    @classmethod
    def _split_tenants(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("tenants")
    @classmethod
    def _check_tenants(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if not TENANT_ID_PATTERN.fullmatch(t)]
        if bad:
            raise ValueError(f"invalid tenant ids {bad}: expected [a-z0-9][a-z0-9_]{{0,62}}")
        if not value:
            raise ValueError("at least one tenant is required")
        return value

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, for a child process (an executor)."""
    return {**os.environ, **extra}
