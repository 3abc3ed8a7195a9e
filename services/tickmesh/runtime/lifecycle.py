"""Running a service process: logging, its NATS connection, uvloop, and a clean
stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from importlib import metadata
from typing import Any, Protocol

from nats.aio.client import Client as NatsClient

from . import logging as tm_logging
from . import nats as tm_nats
from .settings import ServiceSettings

logger = logging.getLogger(__name__)


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def version() -> str:
    """The installed tickmesh version (producers stamp it on every envelope)."""
    try:
        return metadata.version("tickmesh")
    except metadata.PackageNotFoundError:
        return "0"


def run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(main)
    else:
        uvloop.run(main)


async def serve_until_stopped(
    settings: ServiceSettings,
    name: str,
    build: Callable[[NatsClient], Awaitable[Service]],
) -> None:
    """Configure logs, connect to NATS, build and start the service, and on SIGTERM or
    SIGINT stop it (in-flight work gets ``shutdown_grace_s``) and drain the connection."""
    tm_logging.configure(settings.log_level, json_output=settings.log_json, service=name)
    nc = await tm_nats.connect(
        settings.nats_servers,
        name=f"{name} {settings.instance}",
        user=settings.nats_user,
        password=settings.nats_password,
        user_credentials=settings.nats_credentials,
    )
    try:
        service = await build(nc)
        await service.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("%s stopping", name)
        await service.stop()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
