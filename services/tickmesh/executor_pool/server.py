"""Wiring of the executor pool: ``build`` from ready-made dependencies, ``serve`` for real."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tickmesh.runtime.adapters import open_blob_store
from tickmesh.runtime.blobs import BlobStore
from tickmesh.runtime.grpc_security import ServerSecurity
from tickmesh.runtime.grpc_server import GrpcServer, create_server
from tickmesh.runtime.lifecycle import serve_until_stopped, version
from tickmesh.runtime.metrics import Metrics
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.runtime.tenant_links import EXECUTOR, TenantLinks
from tickmesh.runtime.tenant_watch import TenantWatcher, serve_tenants
from tickmesh.runtime.tracing import Tracing
from tickmesh.v1 import executor_pool_service_pb2, executor_pool_service_pb2_grpc

from .config import ExecutorPoolSettings
from .pool import ExecutorPool
from .servicer import ExecutorPoolServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = executor_pool_service_pb2.DESCRIPTOR.services_by_name[
    "ExecutorPoolService"
].full_name


class ExecutorPoolService:
    """The pool, its servicer and its gRPC server, started and stopped together."""

    def __init__(
        self,
        settings: ExecutorPoolSettings,
        pool: ExecutorPool,
        *,
        metrics: Metrics | None = None,
        serve_metrics: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing.off()
        self.pool = pool
        self.metrics = metrics
        """Where the pool counts; None counts nothing."""
        self.serve_metrics = serve_metrics
        """Whether this service serves ``metrics`` itself (on ``settings.metrics_listen``)
        rather than the process that passed them in."""
        self.servicer = ExecutorPoolServicer(pool, pool.served_tenants)
        self._grpc: GrpcServer | None = None
        self.tenant_watcher: TenantWatcher | None = None
        """Keeps the served tenants in step with the tenant registry (``nats_tenant_dir``)."""

    @property
    def served_tenants(self) -> Collection[str]:
        """The tenants served now (the servicer checks callers against this view)."""
        return self.pool.served_tenants

    async def add_tenant(self, tenant: str) -> None:
        await self.pool.add_tenant(tenant)

    async def remove_tenant(self, tenant: str) -> None:
        await self.pool.remove_tenant(tenant)

    @property
    def target(self) -> str:
        """``host:port`` executors connect to (after start)."""
        assert self._grpc is not None, "start() first"
        return self._grpc.target

    async def start(self) -> None:
        if self.metrics is not None:
            self.metrics.service_started("executor-pool", version())
            if self.serve_metrics and self.settings.metrics_listen:
                await self.metrics.start(self.settings.metrics_listen)
        await self.pool.start()
        self.tenant_watcher = await serve_tenants(
            self.settings, self, name="executor-pool", role=EXECUTOR
        )
        server = await create_server(
            self.settings.grpc_listen,
            max_message_bytes=self.settings.max_message_bytes,
            interceptors=self.tracing.server_interceptors(),
            maximum_concurrent_rpcs=self.settings.grpc_max_concurrent_rpcs,
            security=ServerSecurity.from_settings(self.settings),
        )
        executor_pool_service_pb2_grpc.add_ExecutorPoolServiceServicer_to_server(
            self.servicer, server.server
        )
        await server.server.start()
        await server.set_serving(SERVICE_NAME, True)
        self._grpc = server
        logger.info("executor pool listening on %s", server.target)

    async def stop(self, grace: float | None = None) -> None:
        """Drain executors (up to ``grace`` seconds), then stop the gRPC server."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        server, self._grpc = self._grpc, None
        if server is not None:
            await server.set_serving(SERVICE_NAME, False)
        if self.tenant_watcher is not None:
            await self.tenant_watcher.stop()
        await self.pool.stop(grace)
        if server is not None:
            await server.stop(1.0)
        if self.metrics is not None and self.serve_metrics:
            await self.metrics.stop()
        await self.tracing.shutdown()


async def build(
    settings: ExecutorPoolSettings,
    *,
    nc: NatsClient | None = None,
    js: JetStreamContext | None = None,
    links: TenantLinks | None = None,
    blobs: BlobStore,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> ExecutorPoolService:
    """Assemble the service from ready-made dependencies (tests pass their own).

    ``links`` are the tenants' NATS connections, as their executor users (the caller
    closes them); ``nc`` (with ``js``, by default a context of ``nc``'s) instead serves
    every tenant through one connection.

    ``metrics``: where to count, served by the caller; None makes the pool its own when
    ``settings.metrics_listen`` is set (and counts nothing otherwise).
    ``tracing``: where spans go; None: as ``settings`` say (``trace_exporter``).
    """
    if tracing is None:
        tracing = Tracing.from_settings("executor-pool", settings)
    serve_metrics = metrics is None and settings.metrics_listen is not None
    if serve_metrics:
        metrics = Metrics()
    if links is None:
        if nc is None:
            raise TypeError("build() needs nc or links")
        links = TenantLinks.shared(nc, js=js)
    pool = ExecutorPool(
        settings,
        links=links,
        blobs=blobs,
        version=version(),
        metrics=metrics,
        tracer=tracing.tracer("tickmesh.executor_pool"),
    )
    if metrics is not None:
        metrics.watch_consumers(links.js_of, pool.consumers)
    return ExecutorPoolService(
        settings, pool, metrics=metrics, serve_metrics=serve_metrics, tracing=tracing
    )


async def serve(settings: ExecutorPoolSettings) -> None:
    """Run the executor pool until SIGTERM or SIGINT, then drain and stop."""

    async with contextlib.AsyncExitStack() as resources:

        async def make(links: TenantLinks) -> ExecutorPoolService:
            blobs = await open_blob_store(
                settings.blob_url,
                access_key_id=settings.s3_access_key_id,
                secret_access_key=settings.s3_secret_access_key,
            )
            resources.push_async_callback(blobs.close)
            if not links.is_per_tenant:
                # One connection for all: it may create the streams. A tenant's executor
                # user may not; its streams come from `tickmesh tenant create` or the
                # service-user services.
                for tenant in settings.tenants:
                    link = await links.get(tenant)
                    await ensure_tenant(link.js, tenant, replicas=settings.nats_replicas)
            return await build(settings, links=links, blobs=blobs)

        await serve_until_stopped(settings, "executor-pool", make, role=EXECUTOR)
