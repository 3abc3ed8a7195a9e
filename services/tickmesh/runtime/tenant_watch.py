"""Which tenants a service serves, and keeping that in step with the tenant registry.

Without a tenant directory, a service serves the tenants its settings list, all of
them from the start: one that cannot be served stops the start.

With one (``nats_tenant_dir``), the directory's registry (``tenants.json``, kept by
``tickmesh tenant``) is the source of truth: the service serves every enabled tenant
there, and a :class:`TenantWatcher` reads the registry again every
``tenant_refresh_s`` seconds. A tenant created or enabled since is served from then
on, with no restart; one disabled or deleted stops being served (its consumers stop,
its connection closes, its calls are refused as for any unknown tenant). A tenant that
cannot be served (its login fails, its account has no JetStream yet) is logged and
tried again at the next read; the others are served meanwhile. A host that keeps
something in step with a tenant's JetStream storage (:class:`FollowsStorage`: the state
service, the event stream's byte limit) hears of each served tenant's storage in the
registry, and again at each read until it says the server applies it (``tickmesh tenant
limits`` without ``--nats-url`` changes the registry before the servers are reloaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol, runtime_checkable

from tickmesh.sdk import ConfigError

from .settings import ServiceSettings
from .tenancy.registry import TenantDirectory
from .tenant_links import seed_file

logger = logging.getLogger(__name__)

__all__ = [
    "NEW_TENANT_SETTLE_S",
    "FollowsStorage",
    "TenantHost",
    "TenantWatcher",
    "serve_tenants",
]

NEW_TENANT_SETTLE_S = 2.0
"""How long a tenant new to the registry waits before a running service serves it.

``tickmesh tenant create --nats-url`` saves the registry, reloads NATS and then
creates the tenant's streams with ``deny_purge``; a service that created them first
(without it) would leave them purgeable, or make the command fail on the race.
Tenants already registered when a service starts are served at once."""


class TenantHost(Protocol):
    """A service whose set of tenants can change while it runs."""

    @property
    def served_tenants(self) -> Collection[str]:
        """The tenants served now (a live view: the gRPC tenant checks read it too)."""
        ...

    async def add_tenant(self, tenant: str) -> None:
        """Serve ``tenant`` (no-op if served)."""
        ...

    async def remove_tenant(self, tenant: str) -> None:
        """Stop serving ``tenant`` and close its link; safe on a half-added tenant."""
        ...


@runtime_checkable
class FollowsStorage(Protocol):
    """A host that keeps something of a tenant in step with its JetStream storage."""

    async def follow_storage(self, tenant: str, storage: int) -> bool:
        """The registry gives served ``tenant`` ``storage`` bytes: act on it. False while
        the server does not apply that yet (asked again at the next read)."""
        ...


class TenantWatcher:
    """Reads a tenant directory's registry every ``refresh_s`` and adds and removes
    tenants of ``host`` to match its enabled tenants."""

    def __init__(
        self,
        host: TenantHost,
        directory: Path,
        *,
        name: str,
        refresh_s: float,
        settle_s: float = NEW_TENANT_SETTLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host = host
        self._directory = TenantDirectory(directory)
        self._name = name
        self._refresh_s = refresh_s
        self._settle_s = settle_s
        self._clock = clock
        self._first_seen: dict[str, float] = {}
        self._failing: dict[str, str] = {}
        """Tenant -> why it could not be served at the last try."""
        self._registry_error: str | None = None
        self._followed: dict[str, int] = {}
        """Tenant -> the storage its host followed last (see :class:`FollowsStorage`)."""
        self._task: asyncio.Task[None] | None = None

    @property
    def failing(self) -> dict[str, str]:
        """Enabled tenants that could not be served at the last try, and why."""
        return dict(self._failing)

    async def sync(self, *, initial: bool = False) -> None:
        """Read the registry once and add and remove tenants to match it.

        ``initial``: the service is starting; every enabled tenant is served at once
        (no settling), and an unreadable registry is an error rather than a warning.

        Raises:
            ConfigError: ``initial`` and the registry cannot be read.
        """
        try:
            registry = await asyncio.to_thread(self._directory.load)
        except ConfigError as exc:
            if initial:
                raise
            # A registry being replaced is never half-written (writes are atomic); this
            # is a real problem, but serving what is served beats serving nothing.
            if str(exc) != self._registry_error:
                logger.error("%s keeps its tenants: %s", self._name, exc)
            self._registry_error = str(exc)
            return
        self._registry_error = None
        wanted = {tid for tid, tenant in registry.tenants.items() if not tenant.disabled}
        now = self._clock()
        # Registered before the service started: settled already (a retry is not delayed).
        seen = now - self._settle_s if initial else now
        self._first_seen = {t: self._first_seen.get(t, seen) for t in wanted}
        self._failing = {t: why for t, why in self._failing.items() if t in wanted}
        for tenant in [t for t in self._host.served_tenants if t not in wanted]:
            await self._remove(tenant)
        served = set(self._host.served_tenants)
        due = sorted(t for t in wanted - served if now - self._first_seen[t] >= self._settle_s)
        # Concurrently: a tenant whose login hangs until its timeout holds up no other.
        await asyncio.gather(*(self._add(tenant) for tenant in due))
        if isinstance(self._host, FollowsStorage):
            storage = {t: registry.tenants[t].limits.max_storage for t in wanted}
            self._followed = {t: s for t, s in self._followed.items() if t in wanted}
            changed = sorted(
                t
                for t in self._host.served_tenants
                if t in storage and self._followed.get(t) != storage[t]
            )
            await asyncio.gather(*(self._follow(self._host, t, storage[t]) for t in changed))

    async def _add(self, tenant: str) -> None:
        try:
            await self._host.add_tenant(tenant)
        except Exception as exc:
            why = str(exc) or type(exc).__name__
            if self._failing.get(tenant) != why:
                logger.warning(
                    "%s cannot serve tenant %s yet (tried again in %.1fs): %s",
                    self._name,
                    tenant,
                    self._refresh_s,
                    why,
                )
            self._failing[tenant] = why
            try:
                await self._host.remove_tenant(tenant)
            except Exception:
                logger.exception("%s: cleaning up after tenant %s failed", self._name, tenant)
            return
        self._failing.pop(tenant, None)
        logger.info("%s now serves tenant %s", self._name, tenant)

    async def _follow(self, host: FollowsStorage, tenant: str, storage: int) -> None:
        try:
            applied = await host.follow_storage(tenant, storage)
        except Exception as exc:  # the next read tries again
            logger.warning(
                "%s: following tenant %s's storage failed (tried again in %.1fs): %s",
                self._name,
                tenant,
                self._refresh_s,
                exc or type(exc).__name__,
            )
            return
        if applied:
            self._followed[tenant] = storage

    async def _remove(self, tenant: str) -> None:
        try:
            await self._host.remove_tenant(tenant)
        except Exception:
            logger.exception("%s: stopping tenant %s failed", self._name, tenant)
            return
        logger.info("%s no longer serves tenant %s (disabled or deleted)", self._name, tenant)

    def start(self) -> None:
        """Read the registry every ``refresh_s`` until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self._name}:tenant-watch")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.sync()
            except Exception:  # the next round tries again
                logger.exception("%s: reading the tenant registry failed", self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def serve_tenants(
    settings: ServiceSettings, host: TenantHost, *, name: str, role: str
) -> TenantWatcher | None:
    """Start serving ``host``'s tenants as ``settings`` say (see the module docstring);
    returns the watcher to stop with the service, None without a tenant directory.

    With a tenant directory, ``tenants`` given explicitly in ``settings`` must each have
    their ``role`` seed there: a tenant named in the configuration but never provisioned
    is the configuration's fault, and stops the start.

    Raises:
        ConfigError: A listed tenant has no seed, or the registry cannot be read.
        Exception: Without a tenant directory, whatever stopped a tenant from starting.
    """
    if settings.nats_tenant_dir is None:
        for tenant in settings.tenants:
            await host.add_tenant(tenant)
        return None
    directory = Path(settings.nats_tenant_dir)
    if "tenants" in settings.model_fields_set:
        for tenant in settings.tenants:
            seed_file(directory, tenant, role)
    watcher = TenantWatcher(host, directory, name=name, refresh_s=settings.tenant_refresh_s)
    await watcher.sync(initial=True)
    watcher.start()
    return watcher
