"""The index of waiting lifetimes, against a real router KV bucket: every lifetime that
waits with a deadline is entered before its state is written, a rescan reads only the
index, and entries of lifetimes that stopped waiting are removed only when stale."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.nats_server import router_bucket
from tests.unit.router.test_timers import _live_wait
from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.router import core, timers
from tickmesh.router.store import RouterStore, Versioned
from tickmesh.router.timers import ObservedRouterStore, WaitTimers
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.kv import CasWriter
from tickmesh.v1 import lifetime_pb2, result_pb2

A = result_pb2


@dataclass
class Stores:
    observed: ObservedRouterStore
    plain: RouterStore
    """The same bucket written without the index (as a version before it did)."""


@pytest.fixture
async def stores(nats_server: EmbeddedNats) -> AsyncIterator[Stores]:
    async with router_bucket(nats_server.url, "wi") as made:
        yield Stores(
            ObservedRouterStore(made.kv, writer=CasWriter(made.kv)),
            RouterStore(made.kv, writer=CasWriter(made.kv)),
        )


def finished(lifetime_id: str) -> rs.RouterLifetime:
    state = rs.RouterLifetime()
    state.lifetime.lifetime_id = lifetime_id
    state.lifetime.state = lifetime_pb2.LIFETIME_STATE_COMPLETED
    return state


def no_longer_waiting(state: rs.RouterLifetime) -> rs.RouterLifetime:
    woken = rs.RouterLifetime()
    woken.CopyFrom(state)
    woken.lifetime.state = lifetime_pb2.LIFETIME_STATE_RUNNING
    woken.ClearField("wait")
    return woken


@dataclass
class Loads:
    """A store that counts its loads; every other call goes to ``store``."""

    store: RouterStore
    loaded: list[str] = field(default_factory=list)

    async def load(self, lifetime_id: str, *, fresh: bool = False) -> Versioned | None:
        self.loaded.append(lifetime_id)
        return await self.store.load(lifetime_id, fresh=fresh)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@dataclass
class OneTenant:
    """The processor's part the timers use: one tenant, whose store is ``store``."""

    store: Loads

    def tenant(self, tenant_id: str) -> OneTenant:
        return self


def timers_over(loads: Loads) -> WaitTimers:
    processor: Any = OneTenant(loads)
    return WaitTimers(processor, rescan_s=0)


async def test_a_state_that_waits_is_entered_in_the_index_before_it_is_written(
    stores: Stores,
) -> None:
    store = stores.observed
    state = _live_wait("l1", A.WAIT_TIMEOUT_ACTION_FAIL, 60)
    stored_at_entry: list[rs.RouterLifetime | None] = []
    enter = store.index_wait

    async def entering(lifetime_id: str) -> None:
        loaded = await stores.plain.load(lifetime_id, fresh=True)
        stored_at_entry.append(None if loaded is None else loaded.state)
        await enter(lifetime_id)

    store.index_wait = entering  # type: ignore[method-assign]
    revision = await store.create(no_longer_waiting(state))
    assert stored_at_entry == []  # not waiting: no entry
    [outcome] = await store.update_many([(state, revision)])
    assert isinstance(outcome, int)
    # Entered while the stored state did not wait yet, and in the index now.
    assert len(stored_at_entry) == 1
    assert stored_at_entry[0] is not None
    assert core.wait_deadline(stored_at_entry[0]) is None
    assert [e.lifetime_id for e in await store.wait_index()] == ["l1"]
    # Written again with the same deadline: not entered again.
    [again] = await store.update_many([(state, outcome)])
    assert isinstance(again, int)
    assert len(stored_at_entry) == 1


async def test_a_state_whose_entry_cannot_be_written_is_not_written(stores: Stores) -> None:
    store = stores.observed
    waits = _live_wait("l2", A.WAIT_TIMEOUT_ACTION_FAIL, 60)
    other = no_longer_waiting(_live_wait("l3", A.WAIT_TIMEOUT_ACTION_FAIL, 60))
    r2 = await store.create(no_longer_waiting(waits))
    r3 = await store.create(other)

    async def refused(lifetime_id: str) -> None:
        raise ConnectionError("no PubAck")

    store.index_wait = refused  # type: ignore[method-assign]
    outcomes = await store.update_many([(waits, r2), (other, r3)])
    assert isinstance(outcomes[0], ConnectionError)
    assert isinstance(outcomes[1], int)  # the other write stands alone
    stored = await stores.plain.load("l2", fresh=True)
    assert stored is not None
    assert core.wait_deadline(stored.state) is None


async def test_a_rescan_reads_only_the_lifetimes_in_the_index(stores: Stores) -> None:
    for i in range(20):
        await stores.observed.create(finished(f"done{i}"))
    await stores.observed.create(_live_wait("waits", A.WAIT_TIMEOUT_ACTION_FAIL, 60))
    loads = Loads(stores.observed)
    wait_timers = timers_over(loads)
    try:
        assert await wait_timers.scan_index("t") == 1
        assert loads.loaded == ["waits"]
        # The full scan reads them all, and finds the same one.
        loads.loaded.clear()
        assert await wait_timers.scan("t") == 1
        assert len(loads.loaded) == 21
    finally:
        await wait_timers.stop()


async def test_a_full_scan_enters_waits_written_without_an_entry(stores: Stores) -> None:
    await stores.plain.create(_live_wait("old", A.WAIT_TIMEOUT_ACTION_FAIL, 60))
    assert await stores.plain.wait_index() == []
    loads = Loads(stores.plain)
    wait_timers = timers_over(loads)
    try:
        assert await wait_timers.scan_index("t") == 0  # not in the index yet
        assert await wait_timers.scan("t") == 1
        assert [e.lifetime_id for e in await stores.plain.wait_index()] == ["old"]
        assert await wait_timers.scan_index("t") == 1
    finally:
        await wait_timers.stop()


async def test_an_entry_is_removed_once_stale_unless_entered_again(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = stores.observed
    waiting = _live_wait("w", A.WAIT_TIMEOUT_ACTION_FAIL, 60)
    revision = await store.create(waiting)
    await store.update(no_longer_waiting(waiting), revision)
    loads = Loads(store)
    wait_timers = timers_over(loads)
    try:
        # Fresh: kept, though the lifetime no longer waits.
        assert await wait_timers.scan_index("t") == 0
        assert [e.lifetime_id for e in await store.wait_index()] == ["w"]
        # Read, then entered again (a new wait) before the removal: the removal fails.
        [entry] = await store.wait_index()
        await store.index_wait("w")
        assert not await store.unindex_wait(entry)
        assert [e.lifetime_id for e in await store.wait_index()] == ["w"]
        # Stale: removed.
        monkeypatch.setattr(timers, "STALE_INDEX_S", 0.0)
        assert await wait_timers.scan_index("t") == 0
        assert await store.wait_index() == []
    finally:
        await wait_timers.stop()
