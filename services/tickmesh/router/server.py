"""Assembles the router: per-tenant stores and policy watchers, the ref
consumers, and the gRPC server."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import timedelta

from nats.aio.client import Client as NatsClient

from tickmesh.runtime.adapters import open_usage_counter
from tickmesh.runtime.blobs import DEFAULT_INLINE_LIMIT
from tickmesh.runtime.grpc_security import ServerSecurity, client_security
from tickmesh.runtime.grpc_server import GrpcServer, create_server
from tickmesh.runtime.kv import CasWriter
from tickmesh.runtime.lifecycle import serve_until_stopped, version
from tickmesh.runtime.metrics import Metrics
from tickmesh.runtime.policy import PolicyEngine
from tickmesh.runtime.policy.sources import (
    AfterRecordsStored,
    StateRpcUsageSource,
    UsageSource,
)
from tickmesh.runtime.records import records_stored
from tickmesh.runtime.streams import allows_msg_ttl, ensure_tenant
from tickmesh.runtime.subjects import TenantNames
from tickmesh.runtime.tenant_links import SERVICE, TenantLink, TenantLinks
from tickmesh.runtime.tenant_watch import TenantWatcher, serve_tenants
from tickmesh.runtime.tracing import Tracing
from tickmesh.v1 import router_service_pb2_grpc

from .config import RouterSettings
from .consumer import RecordConsumer
from .core import Producer
from .guard import Gate, SnapshotWatcher
from .processor import Processor, Tenant
from .replay import HistorySource, StateRpcHistorySource
from .servicer import RouterServicer
from .store import STATE_HEADROOM_BYTES
from .timers import ObservedRouterStore, WaitTimers
from .usage import TenantUsage

logger = logging.getLogger(__name__)
SERVICE_NAME = "tickmesh.v1.RouterService"


@dataclass
class RouterService:
    settings: RouterSettings
    links: TenantLinks
    """Each tenant's NATS connection (one shared by all, or one per tenant)."""
    processor: Processor
    grpc: GrpcServer
    usage_source: UsageSource | None = None
    """Where tenant usage comes from; None counts in process only."""
    history_source: HistorySource | None = None
    """Where fork and replay read recorded executions; None disables them."""
    timers: WaitTimers | None = None
    """Fires wait timeouts."""
    engine: PolicyEngine = field(default_factory=PolicyEngine)
    consumers: list[RecordConsumer] = field(default_factory=list)
    gates: dict[str, Gate] = field(default_factory=dict)
    metrics: Metrics | None = None
    """Where the router counts; None counts nothing."""
    serve_metrics: bool = False
    """Whether this service serves ``metrics`` itself (on ``settings.metrics_listen``)
    rather than the process that passed them in."""
    tracing: Tracing = field(default_factory=Tracing.off)
    tenant_watcher: TenantWatcher | None = None
    """Keeps the served tenants in step with the tenant registry (``nats_tenant_dir``)."""
    _consumer_of: dict[str, RecordConsumer] = field(default_factory=dict, init=False)

    @property
    def target(self) -> str:
        return self.grpc.target

    @property
    def served_tenants(self) -> Collection[str]:
        """The tenants served now (the servicer checks callers against this view)."""
        return self.processor.tenants.keys()

    @property
    def watchers(self) -> list[SnapshotWatcher]:
        """The policy snapshot watchers, one per tenant in the order they were added."""
        return [gate.watcher for gate in self.gates.values()]

    async def start(self) -> None:
        if self.metrics is not None:
            self.metrics.service_started("router", version())
            if self.serve_metrics and self.settings.metrics_listen:
                await self.metrics.start(self.settings.metrics_listen)
        self.tenant_watcher = await serve_tenants(self.settings, self, name="router", role=SERVICE)
        await self.grpc.server.start()
        await self.grpc.set_serving(SERVICE_NAME, True)
        logger.info("router serving on %s for tenants %s", self.target, sorted(self.served_tenants))

    async def add_tenant(self, tenant_id: str) -> None:
        if tenant_id in self.processor.tenants:
            return
        link = await self.links.get(tenant_id)
        names = await ensure_tenant(link.js, tenant_id, replicas=self.settings.nats_replicas)
        source = self.usage_source
        if source is not None and getattr(source, "counted", None) is not None:
            # Counters the state service records after each commit: read them once it
            # has stored what is on the bus (the router acts on records before that).
            js = link.js

            async def stored(tenant: str) -> bool:
                return await records_stored(js, names)

            source = AfterRecordsStored(source, stored)
        usage = TenantUsage(
            tenant_id,
            source,
            refresh_s=self.settings.tenant_usage_refresh_s,
            max_staleness_s=self.settings.tenant_usage_max_staleness_s,
        )
        await usage.start()
        try:
            gate = await Gate.open(
                link.js,
                names,
                self.engine,
                usage,
                metrics=self.metrics,
                tracer=self.tracing.tracer("tickmesh.guardrail"),
            )
        except BaseException:
            await usage.stop()  # remove_tenant cannot reach it: no gate holds it yet
            raise
        self.gates[tenant_id] = gate
        bucket = await link.js.key_value(names.router_bucket)
        store = ObservedRouterStore(
            bucket,
            writer=CasWriter(bucket),
            cache_size=self.settings.lifetime_cache_size,
            finished_ttl_s=await self._finished_ttl(link, names),
            max_state_bytes=link.nc.max_payload - STATE_HEADROOM_BYTES,
        )
        tenant = Tenant(names=names, store=store, link=link, guard=gate)
        self.processor.tenants[tenant_id] = tenant
        if self.timers is not None:
            store.observer = self.timers.observer(tenant_id)
            await self.timers.start(tenant_id)
        consumer = RecordConsumer(
            link.nc,
            link.js,
            self.processor,
            tenant,
            max_batch=self.settings.max_batch,
            ack_wait_s=self.settings.ack_wait_s,
            metrics=self.metrics,
        )
        self._consumer_of[tenant_id] = consumer
        self.consumers.append(consumer)
        await consumer.start()
        if self.metrics is not None:
            self.metrics.consumers_changed()

    async def _finished_ttl(self, link: TenantLink, names: TenantNames) -> int:
        """How long finished lifetimes of the tenant stay in its bucket, in whole seconds
        (0: for ever)."""
        retention = self.settings.finished_retention_s
        if not retention:
            return 0
        if not await allows_msg_ttl(link.js, names.router_bucket):
            logger.warning(
                "KV bucket %s takes no per-message TTLs: finished lifetimes of %s are kept "
                "for ever (finished_retention_s needs nats-server 2.11 or later)",
                names.router_bucket,
                names.tenant,
            )
            return 0
        return math.ceil(retention)

    async def remove_tenant(self, tenant_id: str) -> None:
        """Stop serving ``tenant_id``: its calls are refused from now on, its consumer,
        timers and policy watcher stop, and its link closes. Lifetimes stay where they
        are (the tenant's KV bucket and streams) for when it is served again."""
        self.processor.tenants.pop(tenant_id, None)
        if self.timers is not None:
            await self.timers.stop_tenant(tenant_id)
        consumer = self._consumer_of.pop(tenant_id, None)
        if consumer is not None:
            self.consumers.remove(consumer)
            await consumer.stop()
        gate = self.gates.pop(tenant_id, None)
        if gate is not None:
            await gate.stop()
        await self.links.drop(tenant_id)
        if self.metrics is not None:
            self.metrics.consumers_changed()

    async def stop(self) -> None:
        await self.grpc.set_serving(SERVICE_NAME, False)
        if self.tenant_watcher is not None:
            await self.tenant_watcher.stop()
        if self.timers is not None:
            await self.timers.stop()
        for consumer in self.consumers:
            await consumer.stop()
        for gate in self.gates.values():
            await gate.stop()
        await self.grpc.stop(self.settings.shutdown_grace_s)
        if self.usage_source is not None:
            await self.usage_source.close()
        if self.history_source is not None:
            await self.history_source.close()
        if self.metrics is not None and self.serve_metrics:
            await self.metrics.stop()
        await self.tracing.shutdown()


async def build(
    settings: RouterSettings,
    *,
    nc: NatsClient | None = None,
    links: TenantLinks | None = None,
    usage_source: UsageSource | None = None,
    history_source: HistorySource | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> RouterService:
    """Assemble the router.

    ``links`` are the tenants' NATS connections (the caller closes them); ``nc`` instead
    serves every tenant through one connection.
    ``usage_source`` feeds tenant-scope guardrail windows; by default it is the counters at
    ``settings.usage_counter_url``, else the state service at ``settings.state_target``, if
    set, else usage is counted in this process only.
    ``history_source`` is where ForkLifetime and ReplayLifetime read recorded executions;
    by default the state service at ``settings.state_target`` (unset: both are unavailable).
    ``metrics``: where to count, served by the caller; None makes the router its own when
    ``settings.metrics_listen`` is set (and counts nothing otherwise).
    ``tracing``: where spans go; None: as ``settings`` say (``trace_exporter``).
    """
    if tracing is None:
        tracing = Tracing.from_settings("router", settings)
    if links is None:
        if nc is None:
            raise TypeError("build() needs nc or links")
        links = TenantLinks.shared(nc)
    if usage_source is None and settings.usage_counter_url:
        usage_source = await open_usage_counter(settings.usage_counter_url)
    elif usage_source is None and settings.state_target:
        usage_source = StateRpcUsageSource(
            settings.state_target, security=client_security(settings)
        )
    if history_source is None and settings.state_target:
        history_source = StateRpcHistorySource(
            settings.state_target, security=client_security(settings)
        )
    producer = Producer("router", version(), settings.instance)
    processor = Processor(
        producer,
        outbox_retention=timedelta(seconds=settings.outbox_retention_s),
        tracer=tracing.tracer("tickmesh.router"),
    )
    grpc_server = await create_server(
        settings.grpc_listen,
        max_message_bytes=settings.max_message_bytes,
        interceptors=tracing.server_interceptors(),
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        security=ServerSecurity.from_settings(settings),
    )
    servicer = RouterServicer(
        processor,
        # Live: tenants added or removed while serving are seen by the next call.
        tenants=processor.tenants.keys(),
        inline_limit=DEFAULT_INLINE_LIMIT,
        history=history_source,
        producer=producer,
    )
    router_service_pb2_grpc.add_RouterServiceServicer_to_server(servicer, grpc_server.server)
    serve_metrics = metrics is None and settings.metrics_listen is not None
    if serve_metrics:
        metrics = Metrics()
    if metrics is not None:
        metrics.watch_consumers(
            links.js_of,
            lambda: [
                consumer
                for tenant_id, tenant in processor.tenants.items()
                for consumer in (
                    (tenant_id, tenant.names.exec_stream, tenant.names.router_record_consumer),
                    (tenant_id, tenant.names.ref_stream, tenant.names.router_consumer),
                )
            ],
        )
    return RouterService(
        settings,
        links,
        processor,
        grpc_server,
        usage_source=usage_source,
        history_source=history_source,
        timers=WaitTimers(processor),
        metrics=metrics,
        serve_metrics=serve_metrics,
        tracing=tracing,
    )


async def serve(settings: RouterSettings) -> None:
    async def make(links: TenantLinks) -> RouterService:
        return await build(settings, links=links)

    await serve_until_stopped(settings, "router", make, role=SERVICE)
