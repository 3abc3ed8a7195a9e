"""A watch serves a lifetime's history from the state service's store and its new events
live from core NATS: each event once, in order, whether it starts mid-lifetime, after the
end, part way or on a fork. Live messages that run ahead of the store wait for it, and
events whose live message was lost are read from the store. Against a real nats-server:
an embedded mesh, or ``follow`` itself with a store the test fills as it goes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from tests.integration.test_router_service import IDLE, RELAY, relay_finish, relay_work
from tests.support.service_harness import MeshHarness, eventually, expect_status, open_mesh
from tickmesh.router import watch
from tickmesh.router.replay import HistorySource, StateRpcHistorySource
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.errors import StatusError
from tickmesh.runtime.subjects import HDR_TYPE, TenantNames
from tickmesh.sdk.errors import StatusCode
from tickmesh.v1 import envelope_pb2, lifetime_pb2, router_service_pb2, state_service_pb2

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


async def all_stored(harness: MeshHarness, lifetime_id: str) -> list[lifetime_pb2.LifetimeEvent]:
    """The lifetime's stored events, once the store holds up to its last sequence."""
    last = (await harness.lifetime(lifetime_id)).last_sequence

    async def whole() -> list[lifetime_pb2.LifetimeEvent]:
        events = await stored(harness, lifetime_id)
        return events if events and events[-1].sequence == last else []

    return await eventually(whole, what=f"{lifetime_id}'s events stored up to {last}")


async def relay(harness: MeshHarness, n: int) -> lifetime_pb2.AgentLifetime:
    """A relay lifetime (a task, then a plan that completes) on a worker that serves it."""
    await harness.start_worker([relay_work, relay_finish])
    await harness.register(RELAY)
    return await harness.start("relay", {"n": n})


def sequences(events: list[lifetime_pb2.LifetimeEvent]) -> list[int]:
    return [e.sequence for e in events if e.sequence]


async def test_a_finished_lifetime_is_watched_from_the_store_whole_or_part_way(
    harness: MeshHarness,
) -> None:
    done = await relay(harness, 1)
    await harness.until_completed(done.lifetime_id)
    history = await all_stored(harness, done.lifetime_id)

    events = await harness.events(done.lifetime_id)

    assert events == history
    assert sequences(events) == list(range(1, len(events) + 1)), "a gap or a repeat"
    assert events[0].kind == LS.LIFETIME_EVENT_KIND_STARTED
    assert events[-1].state == LS.LIFETIME_STATE_COMPLETED
    # Resumed part way, it serves only the rest.
    assert await harness.events(done.lifetime_id, after_sequence=2) == history[2:]


async def test_a_watch_started_mid_lifetime_serves_the_past_then_follows_live(
    harness: MeshHarness,
) -> None:
    await harness.register(IDLE)
    idle = await harness.start("idle")  # waits on a task nobody serves
    early = (await harness.lifetime(idle.lifetime_id)).last_sequence

    # The watch ends 2 s after the abort (steps in flight may still report): room for that.
    watching = asyncio.create_task(harness.events(idle.lifetime_id, within=10.0))
    await asyncio.sleep(0.3)  # the watch has served the stored part and follows live
    await harness.router.AbortLifetime(
        RS.AbortLifetimeRequest(lifetime_id=idle.lifetime_id, reason="enough"),
        metadata=harness.md,
    )
    events = await watching

    history = await all_stored(harness, idle.lifetime_id)
    assert history[-1].sequence > early
    assert events == history
    assert sequences(events) == list(range(1, len(events) + 1)), "a gap or a repeat"
    assert any(e.state == LS.LIFETIME_STATE_ABORTED for e in events[early:])


async def test_a_forks_history_starts_after_its_fork_point(harness: MeshHarness) -> None:
    done = await relay(harness, 4)
    origin = await harness.events(done.lifetime_id)
    finished = [e for e in origin if e.kind == LS.LIFETIME_EVENT_KIND_STEP_FINISHED]
    forked = await harness.router.ForkLifetime(
        RS.ForkLifetimeRequest(lifetime_id=done.lifetime_id, execution_id=finished[0].execution_id),
        metadata=harness.md,
    )
    fork = forked.lifetime
    assert fork.fork_origin.sequence > 1

    events = await harness.events(fork.lifetime_id)

    # A fork's events go on from the origin's sequence at the fork point.
    first = fork.fork_origin.sequence + 1
    assert sequences(events) == list(range(first, first + len(events)))
    assert events[0].kind == LS.LIFETIME_EVENT_KIND_STARTED
    assert events[-1].state == LS.LIFETIME_STATE_COMPLETED
    assert events == await all_stored(harness, fork.lifetime_id)


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


# --- follow, against a store the test fills ----------------------------------------------

NAMES = TenantNames("acme")
LIFETIME = "01900000-0000-7000-8000-00000000000a"
SUBJECT = NAMES.evt(LIFETIME)


def event(sequence: int, *, ended: bool = False) -> lifetime_pb2.LifetimeEvent:
    if ended:
        return LS.LifetimeEvent(
            sequence=sequence,
            kind=LS.LIFETIME_EVENT_KIND_STATE_CHANGED,
            state=LS.LIFETIME_STATE_COMPLETED,
        )
    return LS.LifetimeEvent(sequence=sequence, kind=LS.LIFETIME_EVENT_KIND_STEP_FINISHED)


async def publish_live(nc: NatsClient, *events: lifetime_pb2.LifetimeEvent) -> None:
    """One decision's events, as the router publishes them on the lifetime's subject."""
    envelope = envelope_pb2.ExecutionEnvelope()
    envelope.header.tenant_id = NAMES.tenant
    envelope.header.lifetime_id = LIFETIME
    envelope.lifetime_events.events.extend(events)
    await nc.publish(SUBJECT, envelope.SerializeToString(), headers={HDR_TYPE: "lifetime_events"})
    await nc.flush()


class Store:
    """The state service's store of one lifetime's events: it holds ``events`` up to
    ``held`` (which the test raises, as the state service stores behind the router)."""

    def __init__(self, events: list[lifetime_pb2.LifetimeEvent], held: int) -> None:
        self.all = events
        self.held = held
        self.reads = 0

    async def events(
        self, tenant: str, lifetime_id: str, *, after_sequence: int, limit: int
    ) -> list[lifetime_pb2.LifetimeEvent]:
        assert (tenant, lifetime_id) == (NAMES.tenant, LIFETIME)
        self.reads += 1
        return [e for e in self.all if after_sequence < e.sequence <= self.held][:limit]


class Watch:
    """``follow`` run in the background; what it served so far in ``served``."""

    def __init__(
        self,
        nc: NatsClient,
        store: Store | None,
        *,
        last_sequence: int,
        last: int,
        position: Callable[[], Awaitable[tuple[int, bool]]] | None = None,
    ) -> None:
        self.served: list[int] = []
        self.completes = 0

        async def complete(sequence: int) -> bool:
            self.completes += 1
            return sequence >= last

        watched = watch.Watched(
            tenant=NAMES.tenant,
            lifetime_id=LIFETIME,
            subject=SUBJECT,
            last_sequence=last_sequence,
            before_first=0,
        )
        self.following = watch.follow(
            nc,
            watched,
            after_sequence=0,
            history=cast("HistorySource | None", store),
            complete=complete,
            position=position,
        )
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with contextlib.aclosing(self.following) as events:
            async for served in events:
                self.served.append(served.sequence)

    async def until_served(self, *sequences: int) -> None:
        async def served() -> bool:
            return self.served[: len(sequences)] == list(sequences)

        await eventually(served, within=5.0, what=f"{sequences} served; got {self.served}")

    async def ended(self) -> list[int]:
        async with asyncio.timeout(5.0):
            await self.task
        return self.served


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await tm_nats.connect(nats_server.url, name="watch-history-test")
    try:
        yield client
    finally:
        await client.close()


async def test_live_events_ahead_of_the_store_wait_for_the_events_before_them(
    nc: NatsClient,
) -> None:
    store = Store([event(n) for n in range(1, 7)], held=2)
    w = Watch(nc, store, last_sequence=2, last=7)
    await w.until_served(1, 2)

    await publish_live(nc, event(5), event(6))  # 3 and 4 are not stored yet
    await asyncio.sleep(0.3)
    assert w.served == [1, 2], "live events were served before the ones they follow"
    assert not w.task.done()

    store.held = 6
    await w.until_served(1, 2, 3, 4, 5, 6)
    # The end comes live only (the store has not got it): served, and the watch ends.
    await publish_live(nc, event(7, ended=True))
    assert await w.ended() == [1, 2, 3, 4, 5, 6, 7]


async def test_an_event_that_happens_while_the_store_is_read_comes_live(
    nc: NatsClient,
) -> None:
    """Subscribed before the store is read: an event published meanwhile is not missed."""

    class Racing(Store):
        async def events(
            self, tenant: str, lifetime_id: str, *, after_sequence: int, limit: int
        ) -> list[lifetime_pb2.LifetimeEvent]:
            if self.reads == 0:
                await publish_live(nc, event(3, ended=True))
            return await super().events(
                tenant, lifetime_id, after_sequence=after_sequence, limit=limit
            )

    store = Racing([event(1), event(2)], held=2)
    w = Watch(nc, store, last_sequence=2, last=3)
    assert await w.ended() == [1, 2, 3]


async def test_an_event_whose_live_message_was_lost_is_read_from_the_store(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "QUIET_S", 0.2)
    store = Store([event(1), event(2), event(3)], held=2)
    w = Watch(nc, store, last_sequence=2, last=4)
    await w.until_served(1, 2)

    store.held = 3  # stored, but its live message never came
    await w.until_served(1, 2, 3)
    await publish_live(nc, event(4, ended=True))
    assert await w.ended() == [1, 2, 3, 4]


async def test_a_quiet_spell_reads_the_store_only_when_the_router_is_ahead(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch of a lifetime that decides nothing (parked, waiting for a signal) reads the
    router's position each quiet spell, not the store; once the router is ahead of what
    was served (a live message was lost), the store is read up to there."""
    monkeypatch.setattr(watch, "QUIET_S", 0.05)
    store = Store([event(1), event(2), event(3), event(4, ended=True)], held=2)
    router = {"last": 2, "reads": 0}

    async def position() -> tuple[int, bool]:
        router["reads"] += 1
        return router["last"], router["last"] >= 4

    w = Watch(nc, store, last_sequence=2, last=4, position=position)
    await w.until_served(1, 2)
    reads = store.reads
    await eventually(lambda: _at_least(router, "reads", 6), within=5.0, what="quiet spells checked")
    assert store.reads == reads, "a quiet spell with nothing new read the store"

    router["last"] = 3  # decided; its live message lost, and not stored yet
    await asyncio.sleep(0.2)
    assert w.served == [1, 2]  # waiting for the store to hold it
    store.held = 3
    await w.until_served(1, 2, 3)
    router["last"], store.held = 4, 4  # the end, lost live too
    assert await w.ended() == [1, 2, 3, 4]


async def _at_least(counts: dict[str, int], key: str, n: int) -> bool:
    return counts[key] >= n


async def test_a_lost_terminal_event_still_ends_the_watch(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "QUIET_S", 0.2)
    store = Store([event(1), event(2), event(3, ended=True)], held=2)
    w = Watch(nc, store, last_sequence=2, last=3)
    await w.until_served(1, 2)
    assert w.completes == 0

    store.held = 3
    assert await w.ended() == [1, 2, 3]
    assert w.completes == 1


async def test_a_lifetime_that_ended_before_the_subscription_is_read_from_the_store_at_once(
    nc: NatsClient,
) -> None:
    """The router's state is read again once subscribed: what happened between the first
    read and the subscription (here, the end) comes from the store, with no quiet spell."""
    store = Store([event(1), event(2), event(3), event(4, ended=True)], held=4)

    async def position() -> tuple[int, bool]:
        return 4, True

    w = Watch(nc, store, last_sequence=2, last=4, position=position)
    async with asyncio.timeout(1.0):  # well inside QUIET_S
        assert await w.ended() == [1, 2, 3, 4]


async def test_a_store_that_never_catches_up_ends_the_watch_unavailable(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "STORE_WAIT_MAX_S", 0.3)
    store = Store([event(1), event(2), event(3)], held=1)
    w = Watch(nc, store, last_sequence=3, last=4)
    with pytest.raises(StatusError) as raised:
        await w.ended()
    assert raised.value.status == StatusCode.UNAVAILABLE
    assert "events 2 to 3" in raised.value.detail
    assert w.served == [1]


async def test_without_a_store_only_live_events_are_served(nc: NatsClient) -> None:
    past = Watch(nc, None, last_sequence=2, last=3)
    with pytest.raises(StatusError) as raised:
        await past.ended()
    assert raised.value.status == StatusCode.FAILED_PRECONDITION
    assert "TICKMESH_ROUTER_STATE_TARGET" in raised.value.detail

    # From the last sequence on, live events are served (a gap cannot be filled).
    live = Watch(nc, None, last_sequence=0, last=3)
    await asyncio.sleep(0.2)  # subscribed
    await publish_live(nc, event(2), event(3, ended=True))
    assert await live.ended() == [2, 3]
