"""Assembles the state service: store, blobs, per-tenant consumers, gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from nats.aio.client import Client as NatsClient

from tickmesh.runtime.adapters import open_blob_store, open_usage_counter
from tickmesh.runtime.blobs import BlobStore
from tickmesh.runtime.counters import UsageCounter
from tickmesh.runtime.grpc_security import ServerSecurity
from tickmesh.runtime.grpc_server import GrpcServer, create_server
from tickmesh.runtime.lifecycle import serve_until_stopped, version
from tickmesh.runtime.metrics import Metrics
from tickmesh.runtime.streams import account_storage, ensure_tenant, fit_event_stream
from tickmesh.runtime.subjects import TenantNames
from tickmesh.runtime.tenancy.registry import format_size
from tickmesh.runtime.tenant_links import SERVICE, TenantLinks
from tickmesh.runtime.tenant_watch import TenantWatcher, serve_tenants
from tickmesh.runtime.tracing import Tracing
from tickmesh.sdk import ConfigError, NotFoundError
from tickmesh.v1 import header_pb2, state_service_pb2_grpc

from .config import StateSettings
from .consumer import RecordConsumer
from .servicer import StateServicer
from .store import SQLiteStateStore, StateStore, Synchronous

logger = logging.getLogger(__name__)
SERVICE_NAME = "tickmesh.v1.StateService"


@dataclass
class StateService:
    settings: StateSettings
    links: TenantLinks
    """Each tenant's NATS connection (one shared by all, or one per tenant)."""
    store: StateStore
    blobs: BlobStore
    grpc: GrpcServer
    usage_counter: UsageCounter | None = None
    consumers: dict[str, RecordConsumer] = field(default_factory=dict)
    metrics: Metrics | None = None
    """Where the service counts; None counts nothing."""
    serve_metrics: bool = False
    """Whether this service serves ``metrics`` itself (on ``settings.metrics_listen``)
    rather than the process that passed them in."""
    tracing: Tracing = field(default_factory=Tracing.off)
    tenant_watcher: TenantWatcher | None = None
    """Keeps the served tenants in step with the tenant registry (``nats_tenant_dir``)."""
    awaiting_storage: dict[str, int] = field(default_factory=dict)
    """Tenant -> the storage the registry gives it and the servers do not apply yet (said
    once, in a warning, until they do)."""
    _health_updates: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def target(self) -> str:
        return self.grpc.target

    @property
    def served_tenants(self) -> Collection[str]:
        """The tenants served now (the servicer checks callers against this view)."""
        return self.consumers.keys()

    def consumer(self, tenant: str) -> RecordConsumer:
        try:
            return self.consumers[tenant]
        except KeyError:
            raise NotFoundError(f"unknown tenant {tenant!r}") from None

    async def start(self) -> None:
        if self.metrics is not None:
            self.metrics.service_started("state", version())
            if self.serve_metrics and self.settings.metrics_listen:
                await self.metrics.start(self.settings.metrics_listen)
        self.tenant_watcher = await serve_tenants(self.settings, self, name="state", role=SERVICE)
        await self.grpc.server.start()
        await self.grpc.set_serving(SERVICE_NAME, True)
        watch = getattr(self.store, "watch_reachability", None)
        if watch is not None:
            # While the database is unreachable, records wait in the stream: say so in the
            # health status (NOT_SERVING), so orchestrators and operators see it.
            watch(self._store_reachability)
        logger.info("state serving on %s", self.target)

    def _store_reachability(self, reachable: bool) -> None:
        task = asyncio.get_running_loop().create_task(
            self.grpc.set_serving(SERVICE_NAME, reachable), name="state:health"
        )
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def add_tenant(self, tenant: str) -> None:
        if tenant in self.consumers:
            return
        link = await self.links.get(tenant)
        names = await ensure_tenant(link.js, tenant, replicas=self.settings.nats_replicas)
        producer = header_pb2.Producer(
            service="state", version=version(), instance=self.settings.instance
        )
        consumer = RecordConsumer(
            link.nc,
            link.js,
            self.store,
            names,
            producer,
            max_batch=self.settings.max_batch,
            ack_wait_s=self.settings.ack_wait_s,
            linger_s=self.settings.batch_linger_s,
            usage_counter=self.usage_counter,
            metrics=self.metrics,
            tracer=self.tracing.tracer("tickmesh.state"),
        )
        self.consumers[tenant] = consumer
        await consumer.start()
        if self.metrics is not None:
            self.metrics.consumers_changed()

    async def follow_storage(self, tenant: str, storage: int) -> bool:
        """Fit ``tenant``'s event stream's byte limit to the ``storage`` the registry gives
        it, once the server applies it (:class:`~tickmesh.runtime.tenant_watch.FollowsStorage`):
        after ``tickmesh tenant limits`` and a reload, with no restart."""
        link = self.links.cached(tenant)
        if link is None:
            return False
        applied = await account_storage(link.js)
        if applied != storage:
            # Not reloaded yet: asked again at every refresh, said once per storage.
            if self.awaiting_storage.get(tenant) != storage:
                self.awaiting_storage[tenant] = storage
                logger.warning(
                    "tenant %s: the registry gives it %s of JetStream storage, the NATS "
                    "servers still apply %s; its event stream keeps its byte limit until "
                    "they reload their configuration (nats-server --signal reload)",
                    tenant,
                    format_size(storage),
                    "no limit" if applied is None else format_size(applied),
                )
            return False
        if self.awaiting_storage.pop(tenant, None) is not None:
            logger.info(
                "tenant %s: the NATS servers apply its storage of %s", tenant, format_size(storage)
            )
        await fit_event_stream(link.js, TenantNames(tenant), storage=applied)
        return True

    async def remove_tenant(self, tenant: str) -> None:
        """Stop serving ``tenant``: its calls are refused, its record consumers stop and
        its link closes. What the store holds of it stays."""
        self.awaiting_storage.pop(tenant, None)
        consumer = self.consumers.pop(tenant, None)
        if consumer is not None:
            await consumer.stop()
        await self.links.drop(tenant)
        if self.metrics is not None:
            self.metrics.consumers_changed()

    async def stop(self) -> None:
        await self.grpc.set_serving(SERVICE_NAME, False)
        if self.tenant_watcher is not None:
            await self.tenant_watcher.stop()
        for consumer in self.consumers.values():
            await consumer.stop()
        await self.grpc.stop(self.settings.shutdown_grace_s)
        if self.metrics is not None and self.serve_metrics:
            await self.metrics.stop()
        await self.tracing.shutdown()
        await self.store.close()
        await self.blobs.close()
        if self.usage_counter is not None:
            await self.usage_counter.close()


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


async def open_store(
    url: str,
    *,
    migrate: bool = True,
    sqlite_synchronous: Synchronous = "FULL",
    pool_min: int = 1,
    pool_max: int = 8,
    retry_for_s: float = 30.0,
    command_timeout_s: float | None = 30.0,
) -> StateStore:
    """The state store ``url`` names: ``sqlite:///path`` or ``postgresql://...``.

    Raises:
        ConfigError: the URL is of neither kind, the database cannot be reached, or
            its schema is behind (with ``migrate=False``) or ahead of this version.
    """
    if url.startswith("sqlite:///"):
        if not migrate:
            logger.info("sqlite stores always migrate on open")
        return await SQLiteStateStore.open(
            url.removeprefix("sqlite:///"), synchronous=sqlite_synchronous
        )
    if url.startswith(POSTGRES_SCHEMES):
        try:
            from .postgres import PostgresStateStore
        except ImportError as exc:
            raise ConfigError(
                f"PostgreSQL needs the cloud extra (pip install 'tickmesh[cloud]'): {exc}"
            ) from exc
        return await PostgresStateStore.open(
            url,
            migrate=migrate,
            min_size=pool_min,
            max_size=pool_max,
            retry_for_s=retry_for_s,
            command_timeout_s=command_timeout_s,
        )
    raise ConfigError(
        f"unsupported store_url {url!r}: expected sqlite:///<path> or postgresql://..."
    )


async def open_settings_store(settings: StateSettings) -> StateStore:
    return await open_store(
        settings.store_url,
        migrate=settings.migrate_on_start,
        sqlite_synchronous=settings.sqlite_synchronous,
        pool_min=settings.store_pool_min,
        pool_max=settings.store_pool_max,
        retry_for_s=settings.store_retry_s,
        command_timeout_s=settings.store_command_timeout_s,
    )


async def build(
    settings: StateSettings,
    *,
    nc: NatsClient | None = None,
    links: TenantLinks | None = None,
    store: StateStore,
    blobs: BlobStore,
    usage_counter: UsageCounter | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> StateService:
    """Assemble the state service; ``usage_counter`` (if any) is fed every stored record.

    ``links`` are the tenants' NATS connections (the caller closes them); ``nc`` instead
    serves every tenant through one connection.

    ``metrics``: where to count, served by the caller; None makes the service its own when
    ``settings.metrics_listen`` is set (and counts nothing otherwise).
    ``tracing``: where spans go; None: as ``settings`` say (``trace_exporter``).
    """
    if tracing is None:
        tracing = Tracing.from_settings("state", settings)
    if links is None:
        if nc is None:
            raise TypeError("build() needs nc or links")
        links = TenantLinks.shared(nc)
    grpc_server = await create_server(
        settings.grpc_listen,
        max_message_bytes=settings.max_message_bytes,
        interceptors=tracing.server_interceptors(),
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        security=ServerSecurity.from_settings(settings),
    )
    serve_metrics = metrics is None and settings.metrics_listen is not None
    if serve_metrics:
        metrics = Metrics()
    service = StateService(
        settings,
        links,
        store,
        blobs,
        grpc_server,
        usage_counter,
        metrics=metrics,
        serve_metrics=serve_metrics,
        tracing=tracing,
    )
    if metrics is not None:
        metrics.watch_consumers(
            links.js_of,
            lambda: [c for consumer in service.consumers.values() for c in consumer.consumers()],
        )
    servicer = StateServicer(
        store,
        blobs,
        service.consumer,
        # Live: tenants added or removed while serving are seen by the next call.
        tenants=service.served_tenants,
    )
    state_service_pb2_grpc.add_StateServiceServicer_to_server(servicer, grpc_server.server)
    return service


async def serve(settings: StateSettings) -> None:
    async def make(links: TenantLinks) -> StateService:
        # Every adapter is opened (and checked) before anything serves: a wrong DSN,
        # bucket or Redis URL stops the start here with its own message.
        async with contextlib.AsyncExitStack() as opened:
            store = await open_settings_store(settings)
            opened.push_async_callback(store.close)
            blobs = await open_blob_store(
                settings.blob_url,
                access_key_id=settings.s3_access_key_id,
                secret_access_key=settings.s3_secret_access_key,
            )
            opened.push_async_callback(blobs.close)
            counter = None
            if settings.usage_counter_url:
                counter = await open_usage_counter(settings.usage_counter_url)
                opened.push_async_callback(counter.close)
            service = await build(
                settings, links=links, store=store, blobs=blobs, usage_counter=counter
            )
            opened.pop_all()
        return service

    await serve_until_stopped(settings, "state", make, role=SERVICE)
