"""Each tenant's NATS link: the connection a service reaches that tenant's subjects,
streams and buckets through.

With a tenant directory (``nats_tenant_dir``), every tenant gets its own connection,
logged in as that tenant's ``service`` or ``executor`` user, so the NATS account of
the tenant bounds everything the service does for it. Without one, every tenant
shares one connection (one set of credentials for all of them).

Connections are opened on first use and kept; they reconnect on their own (nats-py),
each independently of the others, so one tenant's outage leaves the rest connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tickmesh.sdk import ConfigError

from . import nats as tm_nats
from .tenancy.accounts import EXECUTOR_INBOX_PREFIX
from .tenancy.registry import EXECUTOR, ROLES, SERVICE, TenantDirectory

logger = logging.getLogger(__name__)

__all__ = [
    "EXECUTOR",
    "SERVICE",
    "Connector",
    "TenantLink",
    "TenantLinks",
    "inbox_prefix",
    "seed_file",
]

DROP_DRAIN_S = 5.0
"""How long :meth:`TenantLinks.drop` lets a tenant's connection drain before closing it."""

Connector = Callable[[str], Awaitable[NatsClient]]
"""Opens the connection of one tenant (by id)."""


@dataclass(frozen=True, slots=True)
class TenantLink:
    """One tenant's connection and its JetStream context."""

    tenant: str
    nc: NatsClient
    js: JetStreamContext


def seed_file(tenant_dir: str | Path, tenant: str, role: str) -> str:
    """The path of ``tenant``'s ``role`` user's NKey seed in a tenant directory.

    Raises:
        ConfigError: No seed file there (or ``role`` is no tenant role).
    """
    if role not in ROLES:
        raise ConfigError(f"unknown tenant user role {role!r}: expected one of {ROLES}")
    path = TenantDirectory(Path(tenant_dir)).seed_path(tenant, role)
    if not path.is_file():
        raise ConfigError(
            f"tenant {tenant!r}: no {role} NKey seed at {path} "
            "(create the tenant with `tickmesh tenant create`, or fix nats_tenant_dir)"
        )
    return str(path)


def inbox_prefix(role: str) -> str | None:
    """The reply-subject prefix ``role``'s user must use (None: nats-py's default)."""
    return EXECUTOR_INBOX_PREFIX if role == EXECUTOR else None


class TenantLinks:
    """The links of every tenant a service serves: one shared connection, or one
    connection per tenant opened by ``connect``."""

    def __init__(
        self,
        *,
        shared: NatsClient | None = None,
        shared_js: JetStreamContext | None = None,
        connect: Connector | None = None,
        owns_shared: bool = False,
    ) -> None:
        if (shared is None) == (connect is None):
            raise ValueError("give either a shared connection or a per-tenant connector")
        if shared_js is None and shared is not None:
            shared_js = tm_nats.jetstream(shared)
        self._shared = shared_js
        self._shared_nc = shared
        self._owns_shared = owns_shared
        self._connect = connect
        self._links: dict[str, TenantLink] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    @classmethod
    def shared(
        cls, nc: NatsClient, *, js: JetStreamContext | None = None, owned: bool = False
    ) -> TenantLinks:
        """Every tenant through ``nc`` (and ``js``, by default a context of ``nc``'s);
        :meth:`close` drains it only if ``owned``."""
        return cls(shared=nc, shared_js=js, owns_shared=owned)

    @classmethod
    def per_tenant(cls, connect: Connector) -> TenantLinks:
        """A connection per tenant, opened by ``connect`` on first use."""
        return cls(connect=connect)

    @property
    def is_per_tenant(self) -> bool:
        return self._connect is not None

    @property
    def shared_connection(self) -> NatsClient | None:
        """The connection every tenant shares; None with a connection per tenant."""
        return self._shared_nc

    async def get(self, tenant: str) -> TenantLink:
        """``tenant``'s link, connecting it the first time.

        Raises:
            ConfigError: The tenant's credentials are missing.
            TransportError: Its first connection could not be made.
        """
        if self._shared_nc is not None and self._shared is not None:
            link = self._links.get(tenant)
            if link is None:
                link = self._links[tenant] = TenantLink(tenant, self._shared_nc, self._shared)
            return link
        if self._closed:
            raise RuntimeError("tenant links are closed")
        link = self._links.get(tenant)
        if link is not None:
            return link
        # A lock per tenant: concurrent first uses share one connection, and a tenant
        # that is slow to connect holds up nobody else.
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            link = self._links.get(tenant)
            if link is None:
                assert self._connect is not None
                nc = await self._connect(tenant)
                link = self._links[tenant] = TenantLink(tenant, nc, tm_nats.jetstream(nc))
            return link

    def cached(self, tenant: str) -> TenantLink | None:
        """``tenant``'s link if it has been made (never connects)."""
        return self._links.get(tenant)

    def js_of(self, tenant: str) -> JetStreamContext | None:
        """``tenant``'s JetStream context if its link has been made."""
        link = self.cached(tenant)
        return None if link is None else link.js

    def connections(self) -> dict[str, NatsClient]:
        """Tenant -> its connection, for every link made so far."""
        return {tenant: link.nc for tenant, link in self._links.items()}

    async def drop(self, tenant: str) -> None:
        """Forget ``tenant``'s link and close its own connection (a shared one stays open).

        The connection is drained (up to ``DROP_DRAIN_S``), then closed: a tenant that
        was disabled is usually cut off by the server already, and its connection
        would otherwise keep trying to log in again.
        """
        link = self._links.pop(tenant, None)
        self._locks.pop(tenant, None)
        if link is None or self._connect is None:
            return
        try:
            async with asyncio.timeout(DROP_DRAIN_S):
                await link.nc.drain()
        except Exception as exc:  # closed already, cut off, or the server is gone
            logger.debug("draining the connection of %s: %s", tenant, exc)
        with contextlib.suppress(Exception):
            await link.nc.close()

    async def close(self) -> None:
        """Drain the connections this object opened (a shared one only if owned)."""
        self._closed = True
        if self._connect is None:
            if self._owns_shared and self._shared_nc is not None:
                with contextlib.suppress(Exception):
                    await self._shared_nc.drain()
            return
        links, self._links = list(self._links.values()), {}

        async def drain(link: TenantLink) -> None:
            try:
                await link.nc.drain()
            except Exception as exc:  # closed already, or the server is gone
                logger.debug("draining the connection of %s: %s", link.tenant, exc)

        # Concurrently: a tenant whose server is unreachable must not delay the others.
        await asyncio.gather(*(drain(link) for link in links))
