"""Helpers for testing the gRPC services on real servers.

:func:`open_mesh` starts the embedded :class:`~tickmesh.embedded.Mesh` (all four
services, each on its own loopback gRPC port) against the session nats-server
on a fresh tenant, and hands back a :class:`MeshHarness` with typed stubs for
the router, state and guardrail services, a NATS connection of the test's own,
and helpers to run workers and read a lifetime's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tests.support.nats_server import new_tenant
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.auth import TENANT_METADATA_KEY
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import Plan, Task, Worker
from tickmesh.v1 import (
    graph_pb2,
    guardrail_service_pb2_grpc,
    lifetime_pb2,
    payload_pb2,
    router_service_pb2,
    router_service_pb2_grpc,
    state_service_pb2_grpc,
)

Handler = Task[Any, Any] | Plan[Any]
Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")

DEFAULT_WAIT_S = 4.0
"""How long a helper waits for the mesh before failing the test."""


def tenant_metadata(tenant: str) -> Metadata:
    """The call metadata that names ``tenant`` as the caller's tenant."""
    return ((TENANT_METADATA_KEY, tenant),)


async def expect_status(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    """Await ``call``, require it to fail with ``code``, and return the status details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    return info.value.details() or ""


def json_payload(value: Any) -> payload_pb2.Payload:
    """An inline JSON payload, as the SDK would encode it."""
    data = json.dumps(value).encode()
    return payload_pb2.Payload(
        content_type="application/json",
        inline=data,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def is_terminal(event: lifetime_pb2.LifetimeEvent) -> bool:
    return event.kind == lifetime_pb2.LIFETIME_EVENT_KIND_STATE_CHANGED and event.state in (
        lifetime_pb2.LIFETIME_STATE_COMPLETED,
        lifetime_pb2.LIFETIME_STATE_FAILED,
        lifetime_pb2.LIFETIME_STATE_ABORTED,
    )


def kind_name(event: lifetime_pb2.LifetimeEvent) -> str:
    """``started``, ``step_dispatched``, ``guardrail``, ... for readable assertions."""
    name = lifetime_pb2.LifetimeEventKind.Name(event.kind)
    return name.removeprefix("LIFETIME_EVENT_KIND_").lower()


@dataclass
class MeshHarness:
    """One embedded mesh on one fresh tenant, and typed clients for it."""

    mesh: Mesh
    tenant: str
    names: TenantNames
    nc: NatsClient
    js: JetStreamContext
    router: router_service_pb2_grpc.RouterServiceAsyncStub
    state: state_service_pb2_grpc.StateServiceAsyncStub
    guardrail: guardrail_service_pb2_grpc.GuardrailServiceAsyncStub
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    @property
    def md(self) -> Metadata:
        return tenant_metadata(self.tenant)

    async def start_worker(self, handlers: Sequence[Handler], **kwargs: Any) -> Worker:
        worker = Worker(self.mesh.pool_target, tenant=self.tenant, tasks=handlers, **kwargs)
        self.workers.append(worker)
        await worker.__aenter__()
        async with asyncio.timeout(DEFAULT_WAIT_S):
            await worker.wait_connected()
        return worker

    async def register(self, yaml_source: str) -> graph_pb2.AgentGraph:
        response = await self.router.RegisterGraph(
            router_service_pb2.RegisterGraphRequest(yaml_source=yaml_source), metadata=self.md
        )
        return response.graph

    async def start(
        self, graph_id: str, value: Any = None, **fields: Any
    ) -> lifetime_pb2.AgentLifetime:
        response = await self.router.StartLifetime(
            router_service_pb2.StartLifetimeRequest(
                graph_id=graph_id, input=json_payload(value), **fields
            ),
            metadata=self.md,
        )
        return response.lifetime

    async def lifetime(self, lifetime_id: str) -> lifetime_pb2.AgentLifetime:
        response = await self.router.GetLifetime(
            router_service_pb2.GetLifetimeRequest(lifetime_id=lifetime_id), metadata=self.md
        )
        return response.lifetime

    async def until_completed(self, lifetime_id: str) -> None:
        """Wait until GetLifetime says the lifetime completed."""

        async def completed() -> bool:
            lifetime = await self.lifetime(lifetime_id)
            return lifetime.state == lifetime_pb2.LIFETIME_STATE_COMPLETED

        await eventually(completed, what=f"{lifetime_id} completed")

    async def events(
        self, lifetime_id: str, *, after_sequence: int = 0, within: float = DEFAULT_WAIT_S
    ) -> list[lifetime_pb2.LifetimeEvent]:
        """Every event WatchLifetime sends until it ends the stream (after the terminal one)."""
        call = self.router.WatchLifetime(
            router_service_pb2.WatchLifetimeRequest(
                lifetime_id=lifetime_id, after_sequence=after_sequence
            ),
            metadata=self.md,
        )
        events: list[lifetime_pb2.LifetimeEvent] = []
        try:
            async with asyncio.timeout(within):
                async for response in call:
                    events.append(response.event)
        except TimeoutError:
            seen = [f"#{e.sequence} {kind_name(e)} {e.message}" for e in events]
            pytest.fail(f"lifetime {lifetime_id} did not end within {within}s; events: {seen}")
        finally:
            call.cancel()
        return events

    async def events_until(
        self,
        lifetime_id: str,
        kind: lifetime_pb2.LifetimeEventKind.ValueType,
        *,
        within: float = DEFAULT_WAIT_S,
    ) -> list[lifetime_pb2.LifetimeEvent]:
        """The events up to and including the first of ``kind`` (the lifetime may go on)."""
        call = self.router.WatchLifetime(
            router_service_pb2.WatchLifetimeRequest(lifetime_id=lifetime_id), metadata=self.md
        )
        events: list[lifetime_pb2.LifetimeEvent] = []
        try:
            async with asyncio.timeout(within):
                async for response in call:
                    events.append(response.event)
                    if response.event.kind == kind:
                        return events
        except TimeoutError:
            pass
        finally:
            call.cancel()
        seen = [f"#{e.sequence} {kind_name(e)} {e.message}" for e in events]
        name = lifetime_pb2.LifetimeEventKind.Name(kind)
        pytest.fail(f"no {name} event for lifetime {lifetime_id} within {within}s; got {seen}")

    async def close(self) -> None:
        for worker in self.workers:
            await worker.shutdown(grace=1.0)
        for channel in self.channels:
            await channel.close()
        await self.mesh.stop()
        await self.nc.close()


@contextlib.asynccontextmanager
async def open_mesh(
    nats_url: str, data_dir: Path, *, tenant: str | None = None
) -> AsyncIterator[MeshHarness]:
    """Start an embedded mesh on the session nats-server for one fresh tenant."""
    tenant = tenant or new_tenant()
    mesh = Mesh(
        MeshConfig(
            data_dir=data_dir,
            tenants=(tenant,),
            nats_url=nats_url,
            sqlite_synchronous="OFF",
        )
    )
    await mesh.start()
    nc = await runtime_nats.connect(nats_url, name=f"test:{tenant}")
    router_channel = grpc.aio.insecure_channel(mesh.router_target)
    state_channel = grpc.aio.insecure_channel(mesh.state_target)
    guardrail_channel = grpc.aio.insecure_channel(mesh.guardrail_target)
    harness = MeshHarness(
        mesh=mesh,
        tenant=tenant,
        names=TenantNames(tenant),
        nc=nc,
        js=runtime_nats.jetstream(nc),
        router=router_service_pb2_grpc.RouterServiceStub(router_channel),
        state=state_service_pb2_grpc.StateServiceStub(state_channel),
        guardrail=guardrail_service_pb2_grpc.GuardrailServiceStub(guardrail_channel),
        channels=[router_channel, state_channel, guardrail_channel],
    )
    try:
        yield harness
    finally:
        await harness.close()


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    within: float = DEFAULT_WAIT_S,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Call the async ``probe`` until it returns something truthy; return that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            pytest.fail(f"{what or 'condition'} not reached within {within}s (last: {value!r})")
        await asyncio.sleep(interval)
