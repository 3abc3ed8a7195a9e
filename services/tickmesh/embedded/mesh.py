"""Starts and stops the four services and their broker together.

Each service gets its own NATS connection and gRPC server on a free loopback
port, exactly as separate processes would; only the process is shared.

With a tenant directory (``MeshConfig.tenant_dir``), tenants are NATS accounts: the
embedded nats-server includes the directory's rendered ``accounts.conf``, and every
service holds one connection per tenant, logged in as that tenant's user, serving the
enabled tenants of the directory's registry as it changes (``tickmesh tenant create
--nats-url <the mesh's NATS>`` while the mesh runs, and the tenant is served).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from nats.aio.client import Client as NatsClient
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from tickmesh.executor_pool import server as pool_server
from tickmesh.executor_pool.config import ExecutorPoolSettings
from tickmesh.guardrail import server as guardrail_server
from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.router import server as router_server
from tickmesh.router.config import RouterSettings
from tickmesh.router.replay import StoreHistorySource
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.adapters import open_blob_store, open_usage_counter
from tickmesh.runtime.blobs import BlobStore
from tickmesh.runtime.counters import UsageCounter
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.lifecycle import open_tenant_links
from tickmesh.runtime.metrics import Metrics
from tickmesh.runtime.policy.sources import StoreUsageSource, UsageSource
from tickmesh.runtime.settings import ServiceSettings
from tickmesh.runtime.tenancy import TenantDirectory, commit
from tickmesh.runtime.tenant_links import EXECUTOR, SERVICE, TenantLinks
from tickmesh.runtime.tracing import TraceExporter, Tracing
from tickmesh.state import server as state_server
from tickmesh.state.config import StateSettings
from tickmesh.state.store import Synchronous

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeshConfig:
    data_dir: Path | None = None
    """Where NATS, SQLite and blobs keep their data; a temporary folder when None."""
    tenants: tuple[str, ...] = ("default",)
    """The tenants served; ignored with ``tenant_dir`` (its registry decides)."""
    tenant_dir: Path | None = None
    """A tenant directory (``tickmesh tenant --dir``): tenants are NATS accounts, the
    embedded nats-server includes the directory's ``accounts.conf`` (rendered here,
    with a new registry, if the directory has none), and each service connects once per
    tenant as its users and serves the registry's enabled tenants, reading it again
    every ``tenant_refresh_s``. None: one connection per service, no accounts."""
    tenant_refresh_s: float = 2.0
    """With ``tenant_dir``: how often the services read the tenant registry again."""
    nats_url: str | None = None
    """Use this NATS instead of starting one."""
    host: str = "127.0.0.1"
    router_port: int = 0
    pool_port: int = 0
    sync_always: bool = False
    """fsync every JetStream write (survives power loss; slower)."""
    sqlite_synchronous: Synchronous = "FULL"
    ack_wait_s: float = 30.0
    """JetStream ack wait of the pool's work consumers."""
    guardrail_lease_s: float | None = None
    """How long routers may enforce a policy snapshot without hearing from the guardrail
    service; None keeps the guardrail service's default."""
    store_url: str | None = None
    """The state store: None keeps SQLite in ``data_dir``; ``postgresql://...`` is the
    cloud profile's store."""
    blob_url: str | None = None
    """The blob store: None keeps a folder in ``data_dir``; ``s3://bucket/prefix?...``."""
    usage_counter_url: str | None = None
    """Tenant usage counters: None reads the state store in process; ``redis://...``."""
    store_retry_s: float = 30.0
    """How long the PostgreSQL store retries through an outage before a batch is
    handed back to JetStream for redelivery."""
    metrics_listen: str | None = None
    """host:port of one Prometheus endpoint for all four services (port 0: a free one;
    ``Mesh.metrics.url`` tells which); None counts nothing."""
    trace_exporter: TraceExporter = "none"
    """Where the services' spans go (``otlp``, ``console``); ``none``: tracing off."""
    trace_endpoint: str | None = None
    """The OTLP collector; None: ``OTEL_EXPORTER_OTLP_ENDPOINT``, else localhost:4317."""
    trace_processors: tuple[SpanProcessor, ...] = ()
    """Span processors every service's tracer provider gets too (e.g. one over an
    in-memory exporter); any turns tracing on. Shut down when the mesh stops."""

    @property
    def profile(self) -> str:
        """``cloud`` when any store is external, else ``embedded``."""
        external = (self.store_url, self.blob_url, self.usage_counter_url)
        return "cloud" if any(external) else "embedded"


@dataclass
class Mesh:
    """The embedded mesh.

    Example:
        async with Mesh(MeshConfig()) as mesh:
            print(mesh.router_target)
    """

    config: MeshConfig = field(default_factory=MeshConfig)
    nats: EmbeddedNats | None = None
    nats_url: str = ""
    router: router_server.RouterService | None = None
    state: state_server.StateService | None = None
    guardrail: guardrail_server.GuardrailService | None = None
    pool: pool_server.ExecutorPoolService | None = None
    metrics: Metrics | None = None
    """The services' shared metrics, served on ``config.metrics_listen`` (None when unset)."""
    data_dir: Path = Path()
    _connections: list[NatsClient] = field(default_factory=list)
    _links: list[TenantLinks] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _resources: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    """Stores and clients the mesh opened; closed after the services stopped."""

    @property
    def router_target(self) -> str:
        assert self.router is not None
        return self.router.target

    @property
    def pool_target(self) -> str:
        assert self.pool is not None
        return self.pool.target

    @property
    def state_target(self) -> str:
        assert self.state is not None
        return self.state.target

    @property
    def guardrail_target(self) -> str:
        assert self.guardrail is not None
        return self.guardrail.target

    async def start(self) -> Mesh:
        cfg = self.config
        if cfg.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tickmesh-")
            self.data_dir = Path(self._tmp.name)
        else:
            self.data_dir = cfg.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        include = None
        if cfg.tenant_dir is not None:
            include = _prepare_tenant_dir(TenantDirectory(cfg.tenant_dir))
        if cfg.nats_url:
            self.nats_url = cfg.nats_url
        else:
            self.nats = EmbeddedNats(
                data_dir=self.data_dir / "nats",
                host=cfg.host,
                sync_always=cfg.sync_always,
                include=include,
            ).start()
            self.nats_url = self.nats.url
        try:
            await self._start_services()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _connect(self, name: str) -> NatsClient:
        nc = await tm_nats.connect(self.nats_url, name=name)
        self._connections.append(nc)
        return nc

    async def _tenant_links(self, settings: ServiceSettings, name: str, role: str) -> TenantLinks:
        """A connection per tenant (opened as tenants are served), closed by :meth:`stop`."""
        links = await open_tenant_links(settings, name, role)
        self._links.append(links)
        return links

    async def _start_services(self) -> None:
        cfg = self.config
        url = self.nats_url
        per_tenant = cfg.tenant_dir is not None
        # With a tenant directory the services serve what its registry lists: `tenants`
        # stays unset, so that it asks for no tenant of its own.
        shared: dict[str, Any] = (
            {"nats_tenant_dir": str(cfg.tenant_dir), "tenant_refresh_s": cfg.tenant_refresh_s}
            if per_tenant
            else {"tenants": list(cfg.tenants)}
        )
        listen = f"{cfg.host}:0"
        blob_url = cfg.blob_url or str(self.data_dir / "blobs")
        if cfg.metrics_listen is not None:
            # One registry and endpoint for the process: the services share it.
            self.metrics = Metrics()
            await self.metrics.start(cfg.metrics_listen)
        metrics = self.metrics

        state_settings = StateSettings(
            nats_url=url,
            **shared,
            log_json=False,
            grpc_listen=listen,
            store_url=cfg.store_url or f"sqlite:///{self.data_dir / 'state.db'}",
            blob_url=blob_url,
            sqlite_synchronous=cfg.sqlite_synchronous,
            usage_counter_url=cfg.usage_counter_url,
            store_retry_s=cfg.store_retry_s,
        )
        store = await state_server.open_settings_store(state_settings)
        self._resources.push_async_callback(store.close)

        async def usage_counter(url: str) -> UsageCounter:
            # Each service gets its own client, as separate processes would.
            counter = await open_usage_counter(url)
            self._resources.push_async_callback(counter.close)
            return counter

        async def records_stored(tenant: str) -> bool:
            # Readers of the store in this process wait as StateService reads do. The
            # state service is built after them: it is looked up when asked.
            assert self.state is not None
            return await self.state.consumer(tenant).caught_up()

        async def events_stored(tenant: str) -> bool:
            assert self.state is not None
            return await self.state.consumer(tenant).events_stored()

        async def usage_source() -> UsageSource:
            if cfg.usage_counter_url is None:
                return StoreUsageSource(store, caught_up=records_stored)
            return await usage_counter(cfg.usage_counter_url)

        async def blob_store() -> BlobStore:
            blobs = await open_blob_store(blob_url)
            self._resources.push_async_callback(blobs.close)
            return blobs

        guardrail_settings = GuardrailSettings(
            nats_url=url,
            **shared,
            log_json=False,
            grpc_listen=listen,
        )
        if cfg.guardrail_lease_s is not None:
            guardrail_settings = guardrail_settings.model_copy(
                update={"snapshot_lease_s": cfg.guardrail_lease_s}
            )
        nc, links = await self._nats(guardrail_settings, "guardrail", SERVICE)
        self.guardrail = await guardrail_server.build(
            guardrail_settings,
            nc=nc,
            links=links,
            usage_source=await usage_source(),
            metrics=metrics,
            tracing=self._tracing("guardrail"),
        )
        await self.guardrail.start()

        nc, links = await self._nats(state_settings, "state", SERVICE)
        self.state = await state_server.build(
            state_settings,
            nc=nc,
            links=links,
            store=store,
            blobs=await blob_store(),
            usage_counter=(
                await usage_counter(cfg.usage_counter_url) if cfg.usage_counter_url else None
            ),
            metrics=metrics,
            tracing=self._tracing("state"),
        )
        await self.state.start()

        router_settings = RouterSettings(
            nats_url=url,
            **shared,
            log_json=False,
            grpc_listen=f"{cfg.host}:{cfg.router_port}",
        )
        # The router reads tenant usage windows straight from the store it shares the process with.
        nc, links = await self._nats(router_settings, "router", SERVICE)
        self.router = await router_server.build(
            router_settings,
            nc=nc,
            links=links,
            usage_source=await usage_source(),
            history_source=StoreHistorySource(
                store, caught_up=records_stored, events_caught_up=events_stored
            ),
            metrics=metrics,
            tracing=self._tracing("router"),
        )
        await self.router.start()

        pool_settings = ExecutorPoolSettings(
            nats_url=url,
            **shared,
            log_json=False,
            grpc_listen=f"{cfg.host}:{cfg.pool_port}",
            blob_url=blob_url,
            ack_wait_s=cfg.ack_wait_s,
        )
        nc, links = await self._nats(pool_settings, "executor-pool", EXECUTOR)
        self.pool = await pool_server.build(
            pool_settings,
            nc=nc,
            links=links,
            blobs=await blob_store(),
            metrics=metrics,
            tracing=self._tracing("executor-pool"),
        )
        await self.pool.start()
        logger.info(
            "mesh up (%s profile): nats %s, router %s, executor pool %s, state %s, guardrail %s",
            cfg.profile,
            self.nats_url,
            self.router.target,
            self.pool.target,
            self.state.target,
            self.guardrail.target,
        )

    async def _nats(
        self, settings: ServiceSettings, name: str, role: str
    ) -> tuple[NatsClient | None, TenantLinks | None]:
        """A service's NATS: one connection, or with a tenant directory its tenants' links."""
        if self.config.tenant_dir is not None:
            return None, await self._tenant_links(settings, name, role)
        return await self._connect(name), None

    def _tracing(self, service: str) -> Tracing:
        cfg = self.config
        return Tracing.for_service(
            service,
            exporter=cfg.trace_exporter,
            endpoint=cfg.trace_endpoint,
            # Shared by the four providers: each service's stop must not shut them down.
            processors=[_Shared(p) for p in cfg.trace_processors],
        )

    async def stop(self) -> None:
        for service in (self.pool, self.router, self.state, self.guardrail):
            if service is not None:
                with contextlib.suppress(Exception):
                    await service.stop()
        for processor in self.config.trace_processors:
            processor.shutdown()
        for nc in self._connections:
            with contextlib.suppress(Exception):
                await nc.close()
        self._connections.clear()
        for links in self._links:
            with contextlib.suppress(Exception):
                await links.close()
        self._links.clear()
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                await self.metrics.stop()
            self.metrics = None
        with contextlib.suppress(Exception):
            await self._resources.aclose()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> Mesh:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _prepare_tenant_dir(directory: TenantDirectory) -> Path:
    """Make sure ``directory`` has a registry and a rendered ``accounts.conf`` (a new,
    empty registry with its system account if it has none); returns that file."""
    with directory.locked():
        if not (directory.exists() and directory.accounts_path.is_file()):
            commit(directory, directory.load_or_init())
    return directory.accounts_path


class _Shared(SpanProcessor):
    """A span processor several tracer providers feed; shut down by its owner only."""

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        self._inner.on_end(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
