"""The bench's load generator learns that lifetimes ended from their events on a real
nats-server, taking each message straight from the client's read loop."""

from __future__ import annotations

import nats

from bench.load import EndWatcher
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.subjects import TenantNames
from tickmesh.v1 import envelope_pb2, lifetime_pb2

NAMES = TenantNames("acme")


def events(lifetime_id: str, *states: lifetime_pb2.LifetimeState.ValueType) -> bytes:
    envelope = envelope_pb2.ExecutionEnvelope()
    envelope.header.tenant_id = "acme"
    envelope.header.lifetime_id = lifetime_id
    for sequence, state in enumerate(states, start=1):
        event = envelope.lifetime_events.events.add(sequence=sequence, state=state)
        if state == lifetime_pb2.LIFETIME_STATE_FAILED:
            event.error.message = "the plan gave up"
    return envelope.SerializeToString()


async def test_ends_are_seen_inline_whether_waited_for_before_or_after(
    nats_server: EmbeddedNats,
) -> None:
    nc = await tm_nats.connect(nats_server.url, name="bench-end-watcher-test")
    watcher = EndWatcher()
    try:
        assert await watcher.subscribe(nc, NAMES.evt_all)
        await nc.flush()
        running = lifetime_pb2.LIFETIME_STATE_RUNNING
        # Ended before anyone waits: kept until asked.
        await nc.publish(
            NAMES.evt("lt-early"), events("lt-early", running, lifetime_pb2.LIFETIME_STATE_FAILED)
        )
        await nc.publish(NAMES.evt("lt-late"), events("lt-late", running))
        await nc.flush()
        assert await watcher.wait("lt-early", 5.0) == "failed"
        assert watcher.error_of("lt-early") == "the plan gave up"

        # Waited for, then ended.
        waiting = watcher.wait("lt-late", 5.0)
        await nc.publish(
            NAMES.evt("lt-late"), events("lt-late", lifetime_pb2.LIFETIME_STATE_COMPLETED)
        )
        assert await waiting == "completed"
        assert watcher.events == 4
        assert await watcher.wait("lt-never", 0.2) == "timeout"
    finally:
        await nc.close()


async def test_a_plain_client_is_served_by_the_callback(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url, name="bench-end-watcher-plain")
    watcher = EndWatcher()
    try:
        assert not await watcher.subscribe(nc, NAMES.evt_all)
        await nc.flush()
        await nc.publish(NAMES.evt("lt-1"), events("lt-1", lifetime_pb2.LIFETIME_STATE_ABORTED))
        assert await watcher.wait("lt-1", 5.0) == "aborted"
    finally:
        await nc.close()
