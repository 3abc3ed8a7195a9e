"""Settings shared by every service, read once at start.

Each service subclasses :class:`ServiceSettings` with its own environment prefix
(``TICKMESH_ROUTER_``, ``TICKMESH_STATE_``, ...) and its own section of the
config file (see :mod:`tickmesh.runtime.config_file`). Precedence: values passed
in code, then the environment, then the config file, then the defaults.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from tickmesh.sdk.ids import TENANT_ID_PATTERN

from . import config_file

DEFAULT_DATA_DIR = Path(".tickmesh")
LOG_LEVELS = tuple(logging.getLevelNamesMapping())


def default_instance() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the shared values and the service's section of ``tickmesh.yaml``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole section at once

    def __call__(self) -> dict[str, Any]:
        path = config_file.config_path(os.environ.get(config_file.CONFIG_ENV))
        if path is None:
            return {}
        settings_cls = self.settings_cls
        assert issubclass(settings_cls, ServiceSettings)
        document = config_file.load(path)
        section = settings_cls.config_section
        config_file.check_fields(
            document,
            section,
            set(settings_cls.model_fields),
            set(ServiceSettings.model_fields),
        )
        return document.values_for(section)


class ServiceSettings(BaseSettings):
    """Fields every service has (the only ones allowed at the config file's top level)."""

    model_config = SettingsConfigDict(
        env_prefix="TICKMESH_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )
    config_section: ClassVar[str] = ""
    """The service's section of the config file."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL(s), comma-separated for a cluster (the client fails over and
    learns the cluster's other members from the servers it reaches)."""
    nats_user: str | None = None
    nats_password: str | None = None
    nats_credentials: str | None = None
    """Path to a NATS .creds file (JWT + NKey seed)."""
    nats_nkey_seed: str | None = None
    """Path to an NKey seed file (NKey authentication without a JWT)."""
    nats_token: str | None = None
    """A NATS authentication token."""
    nats_tenant_dir: str | None = None
    """A tenant directory (``tickmesh tenant``): when set, each tenant gets its own NATS
    connection, logged in with that tenant's NKey seed (``creds/<tenant>/service.nk``;
    the executor pool's ``executor.nk``), and the shared ``nats_*`` credentials are not
    used. Unset: one connection, with the shared credentials, for every tenant.

    With a tenant directory, its registry (``tenants.json``) says which tenants are
    served: every enabled one, read again every ``tenant_refresh_s``; ``tenants``, if
    given, only names tenants that must be provisioned there when the service starts."""
    tenant_refresh_s: float = Field(default=2.0, gt=0.0)
    """How often a service with ``nats_tenant_dir`` reads the tenant registry again: it
    starts serving tenants created (or enabled) since, and stops serving those disabled
    or deleted."""
    nats_tls_ca: str | None = None
    """CA bundle that signs the NATS servers' certificates (turns TLS on)."""
    nats_tls_cert: str | None = None
    """Client certificate for NATS mutual TLS (with ``nats_tls_key``)."""
    nats_tls_key: str | None = None
    nats_replicas: int = Field(default=1, ge=1, le=5)
    """JetStream replicas of each stream and KV bucket a service creates: 3 on a 3-node
    cluster, so that losing a server loses nothing and stalls nothing."""
    nats_connect_timeout_s: float = Field(default=10.0, gt=0.0)
    """How long the first connection may take before the service refuses to start."""
    s3_access_key_id: str | None = None
    """S3 credentials for an ``s3://`` blob URL; when unset, the standard AWS chain
    (environment, shared files, instance or task role) provides them."""
    s3_secret_access_key: str | None = None
    usage_counter_url: str | None = None
    """Where tenant usage counters live: ``redis://`` (shared by every router,
    guardrail and state replica), or unset to read the state store's counters."""
    grpc_listen: str = "127.0.0.1:0"
    """host:port the gRPC server binds; port 0 picks a free one."""
    grpc_tls_cert: str | None = None
    """PEM certificate (chain) of the gRPC server; with ``grpc_tls_key`` it serves TLS only."""
    grpc_tls_key: str | None = None
    grpc_tls_client_ca: str | None = None
    """CA whose client certificates the gRPC server requires (mutual TLS)."""
    grpc_api_keys_file: str | None = None
    """YAML of tenant -> SHA-256 hashes of its API keys (``*``: keys of tickmesh's own
    services); when set, every call needs ``authorization: Bearer <key>``."""
    grpc_client_api_key: str | None = None
    """The key this service sends when it calls another tickmesh service (the router and
    guardrail call the state service): one listed under ``*`` in that service's keys file."""
    grpc_client_tls_ca: str | None = None
    """CA bundle of the services this one calls (turns TLS on for those calls)."""
    grpc_client_tls_cert: str | None = None
    """Client certificate for those calls (mutual TLS), with ``grpc_client_tls_key``."""
    grpc_client_tls_key: str | None = None
    grpc_require_deadline: bool = False
    """Refuse unary calls that carry no deadline (INVALID_ARGUMENT). Off by default so
    that ad-hoc tools (grpcurl without -max-time) work; production deployments turn it
    on (the SDKs and the CLI always send one)."""
    grpc_max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    """Calls (streams included) served at once; more are refused with RESOURCE_EXHAUSTED.
    Unset: no limit."""
    metrics_listen: str | None = None
    """host:port of the Prometheus endpoint (``/metrics``); port 0 picks a free one;
    unset serves no metrics (and counts nothing)."""
    trace_exporter: Literal["none", "otlp", "console"] = "none"
    """Where spans go: ``otlp`` (OpenTelemetry protocol over gRPC), ``console`` (stdout,
    for a look) or ``none`` — tracing off, at no cost per step."""
    trace_endpoint: str | None = None
    """The OTLP collector (``http://host:4317``); unset: ``OTEL_EXPORTER_OTLP_ENDPOINT``,
    else ``localhost:4317``."""
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of new lifetimes traced; a step follows its lifetime's sampling decision."""
    # NoDecode: the environment value is split by the validator below (comma-separated or a
    # JSON list), not JSON-decoded by pydantic-settings first.
    tenants: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["default"])
    """Tenants this process serves (comma-separated or a JSON list in the environment).
    With ``nats_tenant_dir`` the registry decides instead (see there)."""
    log_level: str = "INFO"
    log_json: bool = True
    instance: str = Field(default_factory=default_instance)
    """Identifies this process in envelopes' producer field and in logs."""
    # gRPC reads a negative size as "no limit" and refuses one past a C int at start.
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1, le=2**31 - 1)
    """Largest gRPC message accepted or sent."""
    shutdown_grace_s: float = Field(default=5.0, ge=0.0)
    """How long in-flight calls and work may run on SIGTERM."""

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        # Checked here: logging refuses an unknown name only once the service is starting.
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if split_listen(value) is None:
            raise ValueError(f"expected host:port (port 0: a free one), got {value!r}")
        return value

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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            ConfigFileSource(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


def split_listen(listen: str) -> tuple[str, int] | None:
    """``host:port`` (or ``[v6]:port``) as (host, port); None when it is not of that form."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def child_environment(defaults: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, for a child process (an executor, the
    embedded nats-server); ``defaults`` apply only where the environment sets nothing."""
    env = dict(os.environ)
    for name, value in (defaults or {}).items():
        if not env.get(name):
            env[name] = value
    env.update(extra)
    return env


class ClientCredentials(BaseSettings):
    """What a command-line client sends to secured services, from ``TICKMESH_API_KEY``,
    ``TICKMESH_TLS_CA`` (turns TLS on), ``TICKMESH_TLS_CERT`` and ``TICKMESH_TLS_KEY``
    (mutual TLS)."""

    model_config = SettingsConfigDict(env_prefix="TICKMESH_", frozen=True, extra="ignore")

    api_key: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


class CrashSettings(BaseSettings):
    """Named crash points for fault tests (``TICKMESH_CRASH_AT=<name>[:n]``), read once by
    :mod:`tickmesh.runtime.crash`; unset in production."""

    model_config = SettingsConfigDict(env_prefix="TICKMESH_", frozen=True, extra="ignore")

    crash_at: str | None = None
    """``<name>`` or ``<name>:<n>``: exit with status 137 on the n-th hit (default 1)."""
