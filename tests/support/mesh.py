"""The whole mesh in the test's process, on the session's nats-server.

``start_mesh`` is a fixture factory: each call starts an embedded
:class:`~tickmesh.embedded.Mesh` (router, guardrail, state, executor pool) for
fresh tenants, a ``Client`` per tenant and a plain NATS connection for reading
and writing the tenant's streams directly; everything is stopped at teardown,
workers first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NoKeysError

from tests.support.audit import AuditReport, audit, list_executions
from tests.support.nats_server import new_tenant
from tests.support.s3_server import S3Bucket
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.subjects import HDR_TYPE, TenantNames
from tickmesh.sdk import (
    BodyKind,
    Client,
    LifetimeHandle,
    Plan,
    Task,
    Worker,
    decisions_of,
    decode_envelope,
)
from tickmesh.v1 import envelope_pb2, execution_pb2, graph_pb2

Handler = Task[Any, Any] | Plan[Any]

WORKER_CONNECT_S = 5.0


@dataclass
class MeshHarness:
    """A running mesh, the tenants it serves, and helpers to drive and inspect it."""

    mesh: Mesh
    tenants: tuple[str, ...]
    nc: NatsClient
    js: JetStreamContext
    clients: dict[str, Client]
    workers: list[Worker] = field(default_factory=list)

    @property
    def tenant(self) -> str:
        """The first (usually only) tenant."""
        return self.tenants[0]

    @property
    def client(self) -> Client:
        return self.clients[self.tenant]

    @property
    def names(self) -> TenantNames:
        return TenantNames(self.tenant)

    async def worker(
        self, handlers: Sequence[Handler], *, tenant: str | None = None, **kwargs: Any
    ) -> Worker:
        """Start a Worker serving ``handlers`` and wait until the pool welcomed it."""
        worker = Worker(
            self.mesh.pool_target, tenant=tenant or self.tenant, tasks=list(handlers), **kwargs
        )
        self.workers.append(worker)
        await worker.__aenter__()
        async with asyncio.timeout(WORKER_CONNECT_S):
            await worker.wait_connected()
        return worker

    async def register(
        self, graph: graph_pb2.AgentGraph | str, *, tenant: str | None = None
    ) -> graph_pb2.AgentGraph:
        return await self.clients[tenant or self.tenant].register_graph(graph)

    async def start(
        self, graph: graph_pb2.AgentGraph, input: Any = None, *, tenant: str | None = None
    ) -> LifetimeHandle:
        return await self.clients[tenant or self.tenant].start_lifetime(
            graph.id, input, version=graph.version
        )

    async def audit(
        self, lifetime_id: str, *, tenant: str | None = None, settle_s: float = 10.0
    ) -> AuditReport:
        return await audit(self.mesh, tenant or self.tenant, lifetime_id, settle_s=settle_s)

    async def stored(
        self, lifetime_id: str, *, tenant: str | None = None
    ) -> list[execution_pb2.ExecutionRef]:
        return await list_executions(self.mesh.state_target, tenant or self.tenant, lifetime_id)

    async def records_stored(self, *, tenant: str | None = None) -> None:
        """Wait until the state service has stored every record on the bus: the router
        decides on a record before the store has it, so a test reading the store
        directly (not through StateService, whose reads wait the same way) waits here."""
        assert self.mesh.state is not None
        caught_up = await self.mesh.state.consumer(tenant or self.tenant).caught_up()
        assert caught_up, "the state service did not store the records on the bus within 5 s"

    async def lifetime_ids(self, *, tenant: str | None = None) -> list[str]:
        """The ids of every lifetime the router stored (read from its KV bucket)."""
        kv = await self.js.key_value(TenantNames(tenant or self.tenant).router_bucket)
        try:
            keys = await kv.keys()
        except NoKeysError:
            return []
        return sorted(k.removeprefix("lt.") for k in keys if k.startswith("lt."))

    async def stream_messages(self, stream: str, subject: str) -> list[Msg]:
        """Every message a (limits-retention) stream holds on ``subject``, oldest first.

        Read with a throwaway consumer, so nothing is removed or acked.
        """
        info = await self.js.stream_info(stream)
        if not info.state.messages:
            return []
        sub = await self.js.pull_subscribe(
            subject,
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=30.0,
            ),
        )
        msgs: list[Msg] = []
        try:
            while True:
                consumer = await sub.consumer_info()
                if not consumer.num_pending:
                    break
                with contextlib.suppress(TimeoutError):
                    msgs.extend(await sub.fetch(min(consumer.num_pending, 256), timeout=1.0))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return msgs

    async def stored_decisions(self, lifetime_id: str) -> list[envelope_pb2.ExecutionEnvelope]:
        """The events envelopes of ``lifetime_id`` the events stream holds (the router's
        batches, opened), oldest first: one per decision that recorded events, as it
        was published (a decision published again is there again)."""
        found = []
        for msg in await self.stream_messages(self.names.evt_stream, self.names.evb):
            kind = (msg.headers or {}).get(HDR_TYPE, "")
            envelope = decode_envelope(msg.data, expected_kind=cast(BodyKind, kind))
            found += [d for d in decisions_of(envelope) if d.header.lifetime_id == lifetime_id]
        return found

    async def stream_last_seq(self, stream: str) -> int:
        """How many messages a stream ever stored (work queues forget acked ones)."""
        info = await self.js.stream_info(stream)
        return int(info.state.last_seq)

    async def wait_stream_empty(self, stream: str, within: float = 5.0) -> None:
        """Wait until a work-queue stream has no message left (all acked)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        while True:
            info = await self.js.stream_info(stream)
            if not info.state.messages:
                return
            if loop.time() >= until:
                raise AssertionError(f"{stream} still holds {info.state.messages} message(s)")
            await asyncio.sleep(0.05)


MeshFactory = Callable[..., Awaitable[MeshHarness]]


PROFILES = ("embedded", "cloud")


@pytest.fixture(params=PROFILES)
def mesh_profile(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The MeshConfig stores of one profile; every test that starts a mesh runs in both.

    ``embedded``: SQLite, a blob folder and in-process usage counters, all in the
    test's folder. ``cloud``: a fresh PostgreSQL database, a fresh S3 bucket (moto's
    HTTP server) and a Redis database of the test's own. The cloud servers are only
    requested here, so an embedded-only run never starts them.
    """
    if request.param == "embedded":
        return {}
    return cloud_profile(
        request.getfixturevalue("postgres_dsn"),
        request.getfixturevalue("s3_bucket"),
        request.getfixturevalue("redis_url"),
        monkeypatch,
    )


def cloud_profile(
    store_url: str | None, bucket: S3Bucket, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """MeshConfig settings for PostgreSQL at ``store_url`` (None: the caller gives it),
    S3 ``bucket`` and Redis at ``redis_url``."""
    endpoint = bucket.endpoint
    # The services take S3 credentials from the standard AWS chain, as in a deployment.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", endpoint.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", endpoint.secret_access_key)
    query = urlencode({"endpoint_url": endpoint.endpoint_url, "region": endpoint.region})
    settings = {"blob_url": f"s3://{bucket.name}/e2e?{query}", "usage_counter_url": redis_url}
    if store_url is not None:
        settings["store_url"] = store_url
    return settings


@pytest.fixture
async def start_mesh(
    nats_server: EmbeddedNats, tmp_path: Path, mesh_profile: dict[str, str]
) -> AsyncIterator[MeshFactory]:
    """``await start_mesh(tenants=2)`` -> a MeshHarness on fresh tenants, in each profile."""
    harnesses: list[MeshHarness] = []
    stack = contextlib.AsyncExitStack()

    async def factory(*, tenants: int = 1, **config: Any) -> MeshHarness:
        ids = tuple(new_tenant("e2e") for _ in range(tenants))
        data_dir = tmp_path / f"mesh{len(harnesses)}"
        settings = {**mesh_profile, **config}
        mesh = Mesh(
            MeshConfig(nats_url=nats_server.url, tenants=ids, data_dir=data_dir, **settings)
        )
        await mesh.start()
        stack.push_async_callback(mesh.stop)
        nc = await tm_nats.connect(nats_server.url, name="e2e-test")
        stack.push_async_callback(nc.close)
        clients: dict[str, Client] = {}
        for tenant in ids:
            clients[tenant] = await Client.connect(mesh.router_target, tenant=tenant)
            stack.push_async_callback(clients[tenant].close)
        harness = MeshHarness(mesh, ids, nc, tm_nats.jetstream(nc), clients)
        harnesses.append(harness)
        return harness

    try:
        yield factory
    finally:
        # Workers go first, while the pool still runs (they drain cleanly).
        for harness in harnesses:
            for worker in harness.workers:
                await worker.shutdown(grace=1.0)
        await stack.aclose()


__all__ = ["MeshFactory", "MeshHarness", "start_mesh"]
