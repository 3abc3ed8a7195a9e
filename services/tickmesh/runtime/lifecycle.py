"""Running a service process: logging, its NATS connection, uvloop, and a clean
stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, TypeVar

from nats.aio.client import Client as NatsClient
from pydantic import ValidationError as SettingsError

from tickmesh.sdk.errors import ConfigError, TickmeshError

from . import logging as tm_logging
from . import nats as tm_nats
from .settings import ServiceSettings
from .tenant_links import SERVICE, TenantLinks, inbox_prefix, seed_file

logger = logging.getLogger(__name__)
_S = TypeVar("_S", bound=ServiceSettings)


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def version() -> str:
    """The installed tickmesh version (producers stamp it on every envelope)."""
    try:
        return metadata.version("tickmesh")
    except metadata.PackageNotFoundError:
        return "0"


GC_YOUNG_THRESHOLD = 50_000
"""Allocations between two collections of the youngest generation (CPython's default is
700). A service allocates a few hundred short-lived objects per step, nearly none of them
in cycles; collecting less often saved a few percent of the router's CPU at 1,000
concurrent lifetimes (docs/configuration.md)."""


def tune_gc() -> None:
    """Collect cycles less often, and never scan what was loaded before serving (the
    modules, the generated protobuf classes): they live as long as the process."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def run(main: Coroutine[Any, Any, None]) -> None:
    tune_gc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(main)
    else:
        uvloop.run(main)


def nats_tls(settings: ServiceSettings) -> ssl.SSLContext | None:
    """The TLS context ``settings`` ask for, or None for a plain connection.

    Raises:
        ConfigError: a certificate or key file cannot be loaded.
    """
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    if bool(settings.nats_tls_cert) != bool(settings.nats_tls_key):
        raise ConfigError("nats_tls_cert and nats_tls_key must be given together")
    # ssl's errors don't name the file, so each load names its own.
    try:
        context = ssl.create_default_context(cafile=settings.nats_tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the NATS TLS CA {settings.nats_tls_ca}: {exc}") from exc
    if settings.nats_tls_cert and settings.nats_tls_key:
        try:
            context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the NATS TLS client certificate {settings.nats_tls_cert} "
                f"with key {settings.nats_tls_key}: {exc}"
            ) from exc
    return context


def _existing_file(setting: str, path: str | None) -> str | None:
    """``path`` when it names a file; a missing one is a setting's fault, not the network's.

    Raises:
        ConfigError: No file at ``path``.
    """
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{setting}={path}: no such file")
    return path


async def connect_nats(settings: ServiceSettings, name: str) -> NatsClient:
    """Connect a service to NATS with every credential ``settings`` carry.

    Raises:
        TransportError: NATS did not answer within ``nats_connect_timeout_s``.
        ConfigError: the TLS files cannot be loaded, or a credentials file is missing.
    """
    return await tm_nats.connect(
        settings.nats_servers,
        name=f"{name} {settings.instance}",
        user=settings.nats_user,
        password=settings.nats_password,
        token=settings.nats_token,
        user_credentials=_existing_file("nats_credentials", settings.nats_credentials),
        nkeys_seed=_existing_file("nats_nkey_seed", settings.nats_nkey_seed),
        tls=nats_tls(settings),
        first_connect_within=settings.nats_connect_timeout_s,
    )


async def connect_tenant_nats(
    settings: ServiceSettings, name: str, tenant: str, role: str
) -> NatsClient:
    """Connect to NATS as ``tenant``'s ``role`` user, with its seed from
    ``settings.nats_tenant_dir`` (and the TLS ``settings`` carry).

    Raises:
        ConfigError: No tenant directory, no seed file for the tenant, or bad TLS files.
        TransportError: NATS did not answer within ``nats_connect_timeout_s``.
    """
    if settings.nats_tenant_dir is None:
        raise ConfigError("per-tenant connections need nats_tenant_dir")
    seed = seed_file(settings.nats_tenant_dir, tenant, role)
    servers = settings.nats_servers
    return await tm_nats.connect(
        servers,
        name=f"{name} {settings.instance} {tenant}",
        nkeys_seed=seed,
        tls=nats_tls(settings),
        first_connect_within=settings.nats_connect_timeout_s,
        inbox_prefix=inbox_prefix(role),
    )


async def open_tenant_links(
    settings: ServiceSettings, name: str, role: str = SERVICE
) -> TenantLinks:
    """The links a service reaches its tenants through: with ``nats_tenant_dir``, one
    connection per tenant as its ``role`` user (opened on first use); otherwise one
    shared connection with the shared credentials, opened here. The caller closes them.

    Raises:
        ConfigError: A credentials or TLS file is missing.
        TransportError: The shared connection could not be made.
    """
    if settings.nats_tenant_dir is not None:
        nats_tls(settings)  # a bad TLS file is a setting's fault: say so before serving

        async def connect(tenant: str) -> NatsClient:
            return await connect_tenant_nats(settings, name, tenant, role)

        return TenantLinks.per_tenant(connect)
    return TenantLinks.shared(await connect_nats(settings, name), owned=True)


def run_service(
    name: str,
    settings_factory: Callable[[], _S],
    serve: Callable[[_S], Coroutine[Any, Any, None]],
) -> int:
    """``python -m tickmesh.<service>``: read settings, serve, and turn a bad setting or
    an unreachable dependency into one clear line on stderr and exit status 1."""
    try:
        settings = settings_factory()
        run(serve(settings))
    except SettingsError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        sys.stderr.write(f"tickmesh {name}: invalid settings: {problems}\n")
        return 1
    except TickmeshError as exc:
        sys.stderr.write(f"tickmesh {name}: {exc}\n")
        return 1
    return 0


async def serve_until_stopped(
    settings: ServiceSettings,
    name: str,
    build: Callable[[TenantLinks], Awaitable[Service]],
    *,
    role: str = SERVICE,
) -> None:
    """Configure logs, open the tenants' NATS links (see :func:`open_tenant_links`;
    ``role`` is the tenant user the service logs in as), build and start the service,
    and on SIGTERM or SIGINT stop it (in-flight work gets ``shutdown_grace_s``) and
    drain the connections.

    SIGTERM is taken before the service is built: one that arrives while it starts (a
    rolling update, an orchestrator that gave up waiting) stops it as soon as it has
    started, rather than killing the process half-way with its connections open. SIGINT
    is taken once it has started, so Ctrl-C still interrupts a start that hangs."""
    tm_logging.configure(settings.log_level, json_output=settings.log_json, service=name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    links = await open_tenant_links(settings, name, role)
    try:
        service = await build(links)
        await service.start()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        logger.info("%s stopping", name)
        await service.stop()
    finally:
        await links.close()
