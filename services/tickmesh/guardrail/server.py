"""Assembles the guardrail service: per-tenant policy stores, the snapshot
publisher that keeps every tenant's snapshot fresh, and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from types import MappingProxyType

from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyNotFoundError

from tickmesh.internal.v1 import router_state_pb2
from tickmesh.runtime.adapters import open_usage_counter
from tickmesh.runtime.grpc_security import ServerSecurity, client_security
from tickmesh.runtime.grpc_server import GrpcServer, create_server
from tickmesh.runtime.lifecycle import serve_until_stopped, version
from tickmesh.runtime.metrics import Metrics
from tickmesh.runtime.policy import Usage
from tickmesh.runtime.policy.sources import StateRpcUsageSource, UsageSource
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.runtime.subjects import TenantNames
from tickmesh.runtime.tenant_links import SERVICE, TenantLinks
from tickmesh.runtime.tenant_watch import TenantWatcher, serve_tenants
from tickmesh.runtime.tracing import Tracing
from tickmesh.v1 import guardrail_service_pb2_grpc

from .config import GuardrailSettings
from .servicer import GuardrailServicer
from .store import PolicyStore

logger = logging.getLogger(__name__)
SERVICE_NAME = "tickmesh.v1.GuardrailService"


@dataclass
class GuardrailService:
    settings: GuardrailSettings
    links: TenantLinks
    """Each tenant's NATS connection (one shared by all, or one per tenant)."""
    grpc: GrpcServer
    stores: dict[str, PolicyStore]
    servicer: GuardrailServicer | None = None
    metrics: Metrics | None = None
    """The registry this service's endpoint shows (decisions are counted by the routers,
    which enforce policies in process); None serves none."""
    serve_metrics: bool = False
    """Whether this service serves ``metrics`` itself (on ``settings.metrics_listen``)
    rather than the process that passed them in."""
    tracing: Tracing = field(default_factory=Tracing.off)
    tenant_watcher: TenantWatcher | None = None
    """Keeps the served tenants in step with the tenant registry (``nats_tenant_dir``)."""
    _refresher: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def target(self) -> str:
        return self.grpc.target

    @property
    def served_tenants(self) -> Collection[str]:
        """The tenants served now (the servicer checks callers against this view)."""
        return self.stores.keys()

    @property
    def nc(self) -> NatsClient | None:
        """The connection all tenants share; None with a connection per tenant."""
        return self.links.shared_connection

    async def start(self) -> None:
        if self.metrics is not None:
            self.metrics.service_started("guardrail", version())
            if self.serve_metrics and self.settings.metrics_listen:
                await self.metrics.start(self.settings.metrics_listen)
        self.tenant_watcher = await serve_tenants(
            self.settings, self, name="guardrail", role=SERVICE
        )
        self._refresher = asyncio.create_task(self._refresh(), name="guardrail-snapshots")
        await self.grpc.server.start()
        await self.grpc.set_serving(SERVICE_NAME, True)
        logger.info("guardrail serving on %s", self.target)

    async def add_tenant(self, tenant: str) -> None:
        if tenant in self.stores:
            return
        link = await self.links.get(tenant)
        names = await ensure_tenant(link.js, tenant, replicas=self.settings.nats_replicas)
        self.stores[tenant] = await PolicyStore.open(link.js, names)
        await self.publish(tenant)

    async def remove_tenant(self, tenant: str) -> None:
        """Stop serving ``tenant``: its calls are refused and its snapshot is no longer
        renewed (routers stop enforcing it when the lease runs out); its link closes."""
        self.stores.pop(tenant, None)
        if self.servicer is not None:
            await self.servicer.notify(tenant)
        await self.links.drop(tenant)

    async def publish(self, tenant: str) -> None:
        await self.stores[tenant].publish_snapshot(self.settings.snapshot_lease_s)
        if self.servicer is not None:
            await self.servicer.notify(tenant)

    async def _refresh(self) -> None:
        interval = self.settings.snapshot_lease_s * self.settings.refresh_fraction
        loop = asyncio.get_running_loop()
        began = loop.time()
        while True:
            # An interval after the previous round *began*: a round that waited out a lost
            # put (bounded by the interval) is followed by the next at once, not an interval
            # later (which let two lost puts in a row outlast the lease).
            await asyncio.sleep(max(0.0, began + interval - loop.time()))
            began = loop.time()
            # Concurrently: a tenant whose link is down (its put waits for a timeout)
            # must not let the other tenants' leases run out.
            await asyncio.gather(*(self._refresh_one(tenant) for tenant in list(self.stores)))

    async def _refresh_one(self, tenant: str) -> None:
        # A put sent into a dead link waits for its reply until the JetStream timeout (10 s):
        # bounded by the refresh interval, the next round starts on time once the link is back.
        interval = self.settings.snapshot_lease_s * self.settings.refresh_fraction
        try:
            async with asyncio.timeout(max(interval, 1.0)):
                await self.publish(tenant)
        except Exception as exc:  # the next round retries; routers still hold a lease
            logger.warning("cannot publish the snapshot of %s: %s", tenant, exc)

    async def lifetime_usage(self, tenant: str, lifetime_id: str) -> Usage:
        """What a lifetime has used so far, from the router's state of it."""
        link = await self.links.get(tenant)
        kv = await link.js.key_value(TenantNames(tenant).router_bucket)
        try:
            entry = await kv.get(f"lt.{lifetime_id}")
        except KeyNotFoundError:
            return Usage()
        if entry.value is None:
            return Usage()
        state = router_state_pb2.RouterLifetime.FromString(entry.value)
        view = state.lifetime
        elapsed = 0.0
        if view.HasField("created_at"):
            elapsed = max(0.0, time.time() - view.created_at.ToNanoseconds() / 1e9)
        # As the router's own lifetime usage (tickmesh.router.guard.lifetime_usage): the
        # totals with their custom metrics, time since the start and the steps in flight.
        # It keeps no per-execution maxima, so none are made up from the totals.
        return dataclasses.replace(
            Usage.of(view.totals),
            executions=int(view.execution_count),
            iterations=max(state.iterations.values(), default=0),
            wall_time_s=elapsed,
            fanout=len(state.in_flight),
            max_values=MappingProxyType({}),
        )

    async def stop(self) -> None:
        await self.grpc.set_serving(SERVICE_NAME, False)
        if self.tenant_watcher is not None:
            await self.tenant_watcher.stop()
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.grpc.stop(self.settings.shutdown_grace_s)
        if self.metrics is not None and self.serve_metrics:
            await self.metrics.stop()
        await self.tracing.shutdown()


async def build(
    settings: GuardrailSettings,
    *,
    nc: NatsClient | None = None,
    links: TenantLinks | None = None,
    usage_source: UsageSource | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> GuardrailService:
    """Assemble the guardrail service; ``links`` are the tenants' NATS connections (the
    caller closes them), or ``nc`` serves every tenant through one. ``metrics`` is
    served by the caller, and None makes the service its own when
    ``settings.metrics_listen`` is set. ``tracing``: where spans go; None: as
    ``settings`` say (``trace_exporter``)."""
    if tracing is None:
        tracing = Tracing.from_settings("guardrail", settings)
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
    service = GuardrailService(
        settings,
        links,
        grpc_server,
        {},
        metrics=metrics,
        serve_metrics=serve_metrics,
        tracing=tracing,
    )
    servicer = GuardrailServicer(
        service.stores,
        # Live: tenants added or removed while serving are seen by the next call.
        tenants=service.served_tenants,
        lease_s=settings.snapshot_lease_s,
        on_change=service.publish,
        lifetime_usage=service.lifetime_usage,
        usage_source=usage_source,
        tracer=tracing.tracer("tickmesh.guardrail"),
    )
    service.servicer = servicer
    guardrail_service_pb2_grpc.add_GuardrailServiceServicer_to_server(servicer, grpc_server.server)
    return service


async def serve(settings: GuardrailSettings) -> None:
    async with contextlib.AsyncExitStack() as resources:

        async def make(links: TenantLinks) -> GuardrailService:
            source: UsageSource | None = None
            if settings.usage_counter_url:
                source = await open_usage_counter(settings.usage_counter_url)
            elif settings.state_target:
                source = StateRpcUsageSource(
                    settings.state_target, security=client_security(settings)
                )
            if source is not None:
                resources.push_async_callback(source.close)
            return await build(settings, links=links, usage_source=source)

        await serve_until_stopped(settings, "guardrail", make, role=SERVICE)
