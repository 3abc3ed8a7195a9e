"""A watch replays a lifetime's whole history even when the event stream no longer holds
all of it (the stream keeps events for its max age, 7 days): the part it lacks is read from
the state service's stored events, then the watch follows the stream. Against a real
nats-server and an embedded mesh; the stream's aging is played by purging the lifetime's
subject, which drops its events as max age does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.test_router_service import IDLE, RELAY, relay_finish, relay_work
from tests.support.service_harness import MeshHarness, eventually, expect_status, open_mesh
from tickmesh.router import watch as watch_module
from tickmesh.router.replay import StateRpcHistorySource
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.v1 import lifetime_pb2, router_service_pb2, state_service_pb2

RS = router_service_pb2
SS = state_service_pb2
LS = lifetime_pb2


@pytest.fixture
async def harness(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[MeshHarness]:
    async with open_mesh(nats_server.url, tmp_path) as mesh:
        yield mesh


async def stored(harness: MeshHarness, lifetime_id: str) -> list[lifetime_pb2.LifetimeEvent]:
    response = await harness.state.ListLifetimeEvents(
        SS.ListLifetimeEventsRequest(lifetime_id=lifetime_id), metadata=harness.md
    )
    return list(response.events)


async def last_sequence(harness: MeshHarness, lifetime_id: str) -> int:
    return (await harness.lifetime(lifetime_id)).last_sequence


async def age_out(harness: MeshHarness, lifetime_id: str, *, keep: int = 0) -> int:
    """Drop the lifetime's events from the stream (all but the last ``keep`` messages)
    once the state service has stored them all; returns the last event's sequence."""
    last = await last_sequence(harness, lifetime_id)

    async def all_stored() -> bool:
        return [e.sequence for e in await stored(harness, lifetime_id)] == list(range(1, last + 1))

    await eventually(all_stored, what=f"{lifetime_id}'s {last} events stored")
    subject = harness.names.evt(lifetime_id)
    before = (await harness.js.stream_info(harness.names.evt_stream)).state.messages
    await harness.js.purge_stream(harness.names.evt_stream, subject=subject, keep=keep or None)
    after = (await harness.js.stream_info(harness.names.evt_stream)).state.messages
    assert after < before, "nothing was purged"
    return last


async def relay(harness: MeshHarness, n: int) -> lifetime_pb2.AgentLifetime:
    """A relay lifetime (a task, then a plan that completes) on a worker that serves it."""
    await harness.start_worker([relay_work, relay_finish])
    await harness.register(RELAY)
    return await harness.start("relay", {"n": n})


def sequences(events: list[lifetime_pb2.LifetimeEvent]) -> list[int]:
    return [e.sequence for e in events if e.sequence]


async def test_a_finished_lifetime_whose_events_aged_out_is_watched_from_the_state(
    harness: MeshHarness,
) -> None:
    done = await relay(harness, 1)
    await harness.until_completed(done.lifetime_id)
    last = await age_out(harness, done.lifetime_id)

    events = await harness.events(done.lifetime_id)

    assert sequences(events) == list(range(1, last + 1))
    assert events[0].kind == LS.LIFETIME_EVENT_KIND_STARTED
    assert events[-1].state == LS.LIFETIME_STATE_COMPLETED
    # Resumed part way, it replays only the rest.
    assert sequences(await harness.events(done.lifetime_id, after_sequence=2)) == list(
        range(3, last + 1)
    )


async def test_a_running_lifetime_replays_its_aged_out_start_then_follows_the_stream(
    harness: MeshHarness,
) -> None:
    await harness.register(IDLE)
    idle = await harness.start("idle")  # waits on a task nobody serves
    early = await age_out(harness, idle.lifetime_id)

    # The watch ends 2 s after the abort (steps in flight may still report): room for that.
    watching = asyncio.create_task(harness.events(idle.lifetime_id, within=10.0))
    await asyncio.sleep(0.3)  # the watch has replayed the stored part and follows the stream
    await harness.router.AbortLifetime(
        RS.AbortLifetimeRequest(lifetime_id=idle.lifetime_id, reason="enough"),
        metadata=harness.md,
    )
    events = await watching

    last = await last_sequence(harness, idle.lifetime_id)
    assert last > early
    assert sequences(events) == list(range(1, last + 1)), "a gap or a repeat in the history"
    assert events[0].kind == LS.LIFETIME_EVENT_KIND_STARTED
    assert any(e.state == LS.LIFETIME_STATE_ABORTED for e in events[early:])


async def test_events_dropped_between_the_look_up_and_the_delivery_are_read_from_the_state(
    harness: MeshHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = await relay(harness, 5)
    await harness.until_completed(done.lifetime_id)
    last = await age_out(harness, done.lifetime_id, keep=1)

    async def stale(*args: object) -> int:
        return 1  # what the stream held when the router looked, before it dropped them

    monkeypatch.setattr(watch_module, "oldest_streamed", stale)
    events = await harness.events(done.lifetime_id)

    assert sequences(events) == list(range(1, last + 1)), "a gap in the history"
    assert events[-1].state == LS.LIFETIME_STATE_COMPLETED


@contextlib.contextmanager
def state_reads(harness: MeshHarness) -> Iterator[list[str]]:
    """The lifetimes whose events the router reads from the state service meanwhile."""
    router = harness.mesh.router
    assert router is not None
    history = router.history_source
    assert history is not None
    original = history.events
    read: list[str] = []

    async def counted(
        tenant: str, lifetime_id: str, *, after_sequence: int, limit: int
    ) -> list[lifetime_pb2.LifetimeEvent]:
        read.append(lifetime_id)
        return await original(tenant, lifetime_id, after_sequence=after_sequence, limit=limit)

    history.events = counted  # type: ignore[method-assign]
    try:
        yield read
    finally:
        history.events = original  # type: ignore[method-assign]


async def test_a_watch_whose_history_the_stream_holds_reads_nothing_from_the_state(
    harness: MeshHarness,
) -> None:
    done = await relay(harness, 2)
    with state_reads(harness) as read:
        events = await harness.events(done.lifetime_id)

    assert events[-1].state == LS.LIFETIME_STATE_COMPLETED
    assert sequences(events) == list(range(1, events[-1].sequence + 1))
    assert read == []


async def test_a_forks_history_starts_after_its_fork_point_and_is_not_looked_for_before(
    harness: MeshHarness,
) -> None:
    done = await relay(harness, 4)
    origin = await harness.events(done.lifetime_id)
    finished = [e for e in origin if e.kind == LS.LIFETIME_EVENT_KIND_STEP_FINISHED]
    forked = await harness.router.ForkLifetime(
        RS.ForkLifetimeRequest(lifetime_id=done.lifetime_id, execution_id=finished[0].execution_id),
        metadata=harness.md,
    )
    fork = forked.lifetime
    assert fork.fork_origin.sequence > 1

    with state_reads(harness) as read:
        events = await harness.events(fork.lifetime_id)

    # A fork's events go on from the origin's sequence at the fork point.
    assert sequences(events)[0] == fork.fork_origin.sequence + 1
    assert events[0].kind == LS.LIFETIME_EVENT_KIND_STARTED
    assert events[-1].state == LS.LIFETIME_STATE_COMPLETED
    assert read == [], "the stream held the fork's whole history"


async def test_the_state_service_lists_a_lifetimes_events_a_page_at_a_time(
    harness: MeshHarness,
) -> None:
    done = await relay(harness, 3)

    async def finished() -> bool:
        events = await stored(harness, done.lifetime_id)
        return bool(events) and events[-1].state == LS.LIFETIME_STATE_COMPLETED

    await eventually(finished, what="the relay's events stored")
    every = await stored(harness, done.lifetime_id)
    assert sequences(every) == list(range(1, len(every) + 1))

    page = await harness.state.ListLifetimeEvents(
        SS.ListLifetimeEventsRequest(lifetime_id=done.lifetime_id, after_sequence=1, page_size=2),
        metadata=harness.md,
    )
    assert sequences(list(page.events)) == [2, 3]
    none = await harness.state.ListLifetimeEvents(
        SS.ListLifetimeEventsRequest(lifetime_id="01900000-0000-7000-8000-000000000000"),
        metadata=harness.md,
    )
    assert list(none.events) == []
    await expect_status(
        harness.state.ListLifetimeEvents(SS.ListLifetimeEventsRequest(), metadata=harness.md),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    # What a router in its own process reads: the same, through the RPC.
    remote = StateRpcHistorySource(harness.mesh.state_target)
    try:
        got = await remote.events(harness.tenant, done.lifetime_id, after_sequence=0, limit=1000)
    finally:
        await remote.close()
    assert got == every
