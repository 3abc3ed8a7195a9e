"""WatchPolicies at the edges of its timing, on a real grpc.aio server and nats-server: a change
published while the stream is reading the store, and renewals while the service's own refresher
republishes the snapshot more often than the stream renews it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from tests.support.nats_server import new_tenant
from tests.support.service_harness import tenant_metadata
from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.guardrail.server import GuardrailService, build
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.v1 import guardrail_pb2, guardrail_service_pb2, guardrail_service_pb2_grpc

GS = guardrail_service_pb2

BUDGET = """\
policy: budget
rules:
  - id: big-step
    scope: execution
    when: sum(tokens) > 100
    action: pause_lifetime
"""

LIMITS = """\
policy: limits
rules:
  - id: too-many-calls
    scope: execution
    when: tool_calls > 3
    action: abort_lifetime
"""

# Generous: a hang guard, far above the few milliseconds each expected message takes; the
# messages these tests wait for would otherwise come only after a refresh or never.
HANG_GUARD_S = 20.0

Stream = grpc.aio.UnaryStreamCall[GS.WatchPoliciesRequest, GS.WatchPoliciesResponse]


@asynccontextmanager
async def serving(
    nats_server: EmbeddedNats, *, lease_s: float, refresh_fraction: float
) -> AsyncIterator[
    tuple[GuardrailService, str, guardrail_service_pb2_grpc.GuardrailServiceAsyncStub]
]:
    tenant = new_tenant("w")
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    settings = GuardrailSettings(
        nats_url=nats_server.url,
        tenants=[tenant],
        grpc_listen="127.0.0.1:0",
        log_json=False,
        snapshot_lease_s=lease_s,
        refresh_fraction=refresh_fraction,
    )
    service = await build(settings, nc=nc)
    await service.start()
    channel = grpc.aio.insecure_channel(service.target)
    try:
        stub: guardrail_service_pb2_grpc.GuardrailServiceAsyncStub = (
            guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        )
        yield service, tenant, stub
    finally:
        await channel.close()
        await service.stop()
        await nc.close()


async def _next(stream: Stream) -> guardrail_pb2.PolicySnapshot:
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            response = await stream.read()
    except TimeoutError:
        pytest.fail("no snapshot on the WatchPolicies stream")
    assert isinstance(response, GS.WatchPoliciesResponse), response
    return response.snapshot


def _ids(snapshot: guardrail_pb2.PolicySnapshot) -> list[tuple[str, int]]:
    return [(p.policy_id, p.version) for p in snapshot.policies]


async def test_a_change_published_while_the_stream_reads_the_store_is_sent(
    nats_server: EmbeddedNats,
) -> None:
    # No renewal and no refresh for an hour: only the change itself can wake the stream.
    async with serving(nats_server, lease_s=3600.0, refresh_fraction=0.3) as (svc, tenant, stub):
        md = tenant_metadata(tenant)
        await stub.PutPolicy(GS.PutPolicyRequest(source=BUDGET), metadata=md)
        store = svc.stores[tenant]
        publish = store.publish_snapshot
        changed = asyncio.Event()

        async def publish_then_change(lease_s: float) -> guardrail_pb2.PolicySnapshot:
            snapshot = await publish(lease_s)
            if not changed.is_set():
                changed.set()
                # What PutPolicy does, landing after the stream read the store and before it
                # waits for the next change.
                await store.put("limits", LIMITS, graph_id="", dry_run=False)
                await svc.publish(tenant)
            return snapshot

        setattr(store, "publish_snapshot", publish_then_change)  # noqa: B010
        stream = stub.WatchPolicies(GS.WatchPoliciesRequest(), metadata=md)
        try:
            first = await _next(stream)
            assert changed.is_set()
            assert _ids(first) == [("budget", 1)]
            second = await _next(stream)
            assert second.revision > first.revision
            assert _ids(second) == [("budget", 1), ("limits", 1)]
        finally:
            stream.cancel()


async def test_renewals_reach_the_stream_while_the_refresher_republishes_more_often(
    nats_server: EmbeddedNats,
) -> None:
    # The refresher republishes (and wakes the stream) every 0.15 s, more often than the
    # stream's own renewal period (lease / 3 = 0.5 s).
    async with serving(nats_server, lease_s=1.5, refresh_fraction=0.1) as (_svc, tenant, stub):
        md = tenant_metadata(tenant)
        await stub.PutPolicy(GS.PutPolicyRequest(source=BUDGET), metadata=md)
        stream = stub.WatchPolicies(GS.WatchPoliciesRequest(), metadata=md)
        try:
            snapshots = [await _next(stream) for _ in range(4)]
        finally:
            stream.cancel()
        assert len({s.revision for s in snapshots}) == 1
        issued = [s.issued_at.ToNanoseconds() for s in snapshots]
        assert issued == sorted(set(issued))
