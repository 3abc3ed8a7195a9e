"""A lifetime state too large for one NATS message is never sent: its write is a
StateTooLargeError, the other writes of the same round go through, and the bucket keeps
the state as it was. Against a real nats-server, whose own refusal (nats-py's
MaxPayloadError, raised the same way on every try) is what this replaces."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.nats_server import RouterBucket, router_bucket
from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.router.store import DEFAULT_MAX_STATE_BYTES, RouterStore, StateTooLargeError
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.kv import CasWriter
from tickmesh.v1 import lifetime_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
async def bucket(nats_server: EmbeddedNats) -> AsyncIterator[RouterBucket]:
    async with router_bucket(nats_server.url, "size") as made:
        yield made


def lifetime(lifetime_id: str, *, in_flight: int = 0) -> rs.RouterLifetime:
    state = rs.RouterLifetime()
    state.lifetime.lifetime_id = lifetime_id
    state.lifetime.state = lifetime_pb2.LIFETIME_STATE_RUNNING
    for n in range(in_flight):
        state.in_flight[f"exec-{n:06d}"].node_id = "work"
    return state


async def test_a_state_over_the_message_limit_is_refused_and_the_rest_are_written(
    bucket: RouterBucket,
) -> None:
    limit = DEFAULT_MAX_STATE_BYTES  # the session server keeps the default max_payload
    store = RouterStore(bucket.kv, writer=CasWriter(bucket.kv), max_state_bytes=limit)
    small, large = lifetime("small"), lifetime("large")
    revisions = {s.lifetime.lifetime_id: await store.create(s) for s in (small, large)}

    grown = lifetime("large", in_flight=60_000)
    assert grown.ByteSize() > limit
    small.lifetime.last_sequence = 7
    outcomes = await store.update_many([(grown, revisions["large"]), (small, revisions["small"])])
    refused, written = outcomes
    assert isinstance(refused, StateTooLargeError)
    assert (refused.lifetime_id, refused.size, refused.limit) == ("large", grown.ByteSize(), limit)
    assert "60,000 executions in flight" in str(refused)
    assert isinstance(written, int)
    assert written > revisions["small"]

    kept = await store.load("large", fresh=True)
    assert kept is not None
    assert (len(kept.state.in_flight), kept.revision) == (0, revisions["large"])
    loaded = await store.load("small", fresh=True)
    assert loaded is not None
    assert loaded.state.lifetime.last_sequence == 7

    with pytest.raises(StateTooLargeError):
        await store.update(grown, revisions["large"])
    with pytest.raises(StateTooLargeError):
        await store.create(lifetime("born-large", in_flight=60_000))
    assert await store.load("born-large", fresh=True) is None
