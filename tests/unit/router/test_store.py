"""RouterStore's per-replica cache against a KV that answers reads out of order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import pytest
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.router.store import ConflictError, RouterStore
from tickmesh.v1 import lifetime_pb2


@dataclass
class Entry:
    value: bytes | None
    revision: int | None


class SlowReadKV:
    """Writes apply at once; ``get`` returns what was stored when ``hold_reads`` was set,
    as a read that began before a concurrent write would."""

    def __init__(self) -> None:
        self.revision = 0
        self.value: bytes | None = None
        self.held: Entry | None = None

    def hold_reads(self) -> None:
        self.held = Entry(self.value, self.revision)

    async def create(self, key: str, value: bytes) -> int:
        return self._put(value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        assert last == self.revision
        return self._put(value)

    async def get(self, key: str) -> Entry:
        return self.held if self.held is not None else Entry(self.value, self.revision)

    def _put(self, value: bytes) -> int:
        self.revision += 1
        self.value = value
        return self.revision


def lifetime(state: int, step: str) -> rs.RouterLifetime:
    out = rs.RouterLifetime()
    out.lifetime.lifetime_id = "lt1"
    out.lifetime.state = cast(Any, state)
    out.lifetime.labels["step"] = step
    return out


async def test_a_read_that_began_before_a_write_does_not_put_the_older_state_back() -> None:
    kv = SlowReadKV()
    store = RouterStore(cast(KeyValue, kv))
    running = lifetime_pb2.LIFETIME_STATE_RUNNING
    first = await store.create(lifetime(running, "a"))
    kv.hold_reads()  # a rescan reads revision 1 ...
    second = await store.update(lifetime(running, "b"), first)  # ... while this writes 2
    stale = await store.load("lt1", fresh=True)
    assert stale is not None
    assert stale.revision == first

    cached = await store.load("lt1")

    assert cached is not None
    assert (cached.revision, cached.state.lifetime.labels["step"]) == (second, "b")


async def test_a_newer_revision_read_from_the_kv_replaces_the_cached_one() -> None:
    kv = SlowReadKV()
    store = RouterStore(cast(KeyValue, kv))
    running = lifetime_pb2.LIFETIME_STATE_RUNNING
    await store.create(lifetime(running, "a"))
    kv._put(lifetime(running, "by another replica").SerializeToString())

    fresh = await store.load("lt1", fresh=True)
    cached = await store.load("lt1")

    assert fresh is not None
    assert cached is not None
    assert cached.revision == fresh.revision == 2
    assert cached.state.lifetime.labels["step"] == "by another replica"


class RefusingWriter:
    """A compare-and-set writer that finds another revision each time (another replica)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, int]] = []

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.writes.append((key, last))
        raise KeyWrongLastSequenceError(description=f"wrong last sequence: {last + 1}")


async def test_a_refused_write_through_the_writer_is_a_conflict_and_drops_the_cached_state() -> (
    None
):
    kv = SlowReadKV()
    writer = RefusingWriter()
    store = RouterStore(cast(KeyValue, kv), writer=writer)
    running = lifetime_pb2.LIFETIME_STATE_RUNNING
    first = await store.create(lifetime(running, "a"))

    with pytest.raises(ConflictError):
        await store.update(lifetime(running, "b"), first)

    assert writer.writes == [("lt.lt1", first)]
    assert store.cached_lifetimes == 0  # the next load reads the KV


async def test_the_cache_shares_no_state_with_the_writer_or_the_loaders() -> None:
    """A decision changes the state it loaded before its write lands: neither that nor a
    change to the state after its write may reach what the next load returns."""
    kv = SlowReadKV()
    store = RouterStore(cast(KeyValue, kv))
    running = lifetime_pb2.LIFETIME_STATE_RUNNING
    written = lifetime(running, "a")
    revision = await store.create(written)
    written.lifetime.labels["step"] = "changed after the write"

    first = await store.load("lt1")
    assert first is not None
    first.state.lifetime.labels["step"] = "a decision not written"
    second = await store.load("lt1")

    assert second is not None
    assert second.state is not first.state
    assert (second.revision, second.state.lifetime.labels["step"]) == (revision, "a")
    assert kv.value == lifetime(running, "a").SerializeToString()
