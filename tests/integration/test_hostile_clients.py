"""A client of the router's gRPC API that does not play along — opens a watch and never
reads it, or goes away without cancelling — costs the router a bounded amount, and the
router's decisions go on meanwhile. Against an embedded mesh on a real nats-server; what
the router holds is counted in its own process (its NATS subscriptions, the live event
messages it keeps, its tasks)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tests.support.service_harness import MeshHarness, eventually, json_payload, open_mesh
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.sdk import Decision, PlanContext, PlanInputView, plan, wait_for
from tickmesh.v1 import lifetime_pb2, router_service_pb2, router_service_pb2_grpc

RS = router_service_pb2
LS = lifetime_pb2

WAITER = """\
graph: waiter
entry: hold
max_iterations: 100000
nodes:
  - {id: hold, kind: plan, handler: hold_on}
edges:
  - {from: hold, kind: final}
"""

SIGNAL_BYTES = 200_000
"""Each signal's payload: its SIGNAL_RECEIVED event carries it, so events add up fast."""
FLOOD_BYTES = 40 * 1024 * 1024
"""Events published while the watch is not read: ten times what the router may hold."""
HELD_MAX_BYTES = 4 * 1024 * 1024
"""What a watch nobody reads may keep in the router: the live buffer (1 MiB) with room."""


@plan
async def hold_on(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    return wait_for("go")


@pytest.fixture
async def harness(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[MeshHarness]:
    async with open_mesh(nats_server.url, tmp_path) as mesh:
        yield mesh


def event_subs(harness: MeshHarness, lifetime_id: str) -> list[Subscription]:
    """The router's subscriptions to the lifetime's events subject (one per open watch)."""
    assert harness.mesh.router is not None
    nc = harness.mesh.router.processor.tenants[harness.tenant].link.nc
    subject = harness.names.evt(lifetime_id)
    return [sub for sub in nc._subs.values() if sub.subject == subject]


def held_event_bytes(subject: str) -> int:
    """Bytes of the live event messages on ``subject`` anything in this process holds:
    the router's subscription queues and whatever a watch keeps aside (the test's own
    connection does not subscribe to it)."""
    gc.collect()
    return sum(len(o.data) for o in gc.get_objects() if isinstance(o, Msg) and o.subject == subject)


async def signal_when_waiting(harness: MeshHarness, lifetime_id: str, data: Any) -> None:
    """Signal ``go`` once the lifetime waits for it again (the plan is asked in between)."""

    async def waiting() -> bool:
        return (await harness.lifetime(lifetime_id)).state == LS.LIFETIME_STATE_WAITING

    await eventually(waiting, interval=0.002, what="the lifetime waiting again")
    await harness.router.SignalLifetime(
        RS.SignalLifetimeRequest(
            lifetime_id=lifetime_id,
            signal=LS.Signal(name="go", payload=json_payload(data)),
        ),
        metadata=harness.md,
    )


async def test_a_watch_nobody_reads_holds_a_bounded_share_of_a_busy_lifetimes_events(
    harness: MeshHarness,
) -> None:
    await harness.start_worker([hold_on])
    await harness.register(WAITER)
    lifetime = await harness.start("waiter")
    subject = harness.names.evt(lifetime.lifetime_id)
    channel = grpc.aio.insecure_channel(harness.mesh.router_target)
    harness.channels.append(channel)
    stalled = router_service_pb2_grpc.RouterServiceStub(channel).WatchLifetime(
        RS.WatchLifetimeRequest(lifetime_id=lifetime.lifetime_id), metadata=harness.md
    )
    try:
        await eventually(lambda: _true(event_subs(harness, lifetime.lifetime_id)))
        payload = "y" * SIGNAL_BYTES
        signals = FLOOD_BYTES // SIGNAL_BYTES
        for _ in range(signals):
            await signal_when_waiting(harness, lifetime.lifetime_id, payload)
        # Every signal was decided while the watch stalled (the router's decisions do not
        # wait for a watcher), and what the router keeps of them stays small.
        view = await harness.lifetime(lifetime.lifetime_id)
        assert view.state != LS.LIFETIME_STATE_FAILED, view.error.message
        held = held_event_bytes(subject)
        assert held <= HELD_MAX_BYTES, f"{held:,} bytes of live events held for one watch"

        # A reader that catches up still gets every event, once and in order: what the
        # router did not keep comes from the state service's store.
        await harness.router.AbortLifetime(
            RS.AbortLifetimeRequest(lifetime_id=lifetime.lifetime_id, reason="enough"),
            metadata=harness.md,
        )
        events = []
        async with asyncio.timeout(60):
            async for response in stalled:
                events.append(response.event)
    finally:
        stalled.cancel()
    numbered = [e.sequence for e in events if e.sequence]
    assert numbered == list(range(1, len(numbered) + 1)), "a gap or a repeat"
    received = [e for e in events if e.kind == LS.LIFETIME_EVENT_KIND_SIGNAL_RECEIVED]
    assert len(received) == signals
    assert events[-1].state == LS.LIFETIME_STATE_ABORTED
    await eventually(lambda: _true(not event_subs(harness, lifetime.lifetime_id)))


async def _true(value: object) -> bool:
    return bool(value)
