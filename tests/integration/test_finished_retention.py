"""Finished lifetimes expire from the router's KV bucket (``finished_retention_s``), with
the start requests that created them, against a real nats-server: the bucket holds the
lifetimes running and lately finished, not every lifetime ever run. GetLifetime then
answers from the state service's record; a start request whose own expiry failed still
does not run its lifetime again."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from tests.integration.test_router_service import IDLE, RELAY, relay_finish, relay_work
from tests.support.nats_server import RouterBucket, new_tenant, router_bucket
from tests.support.ports import free_port
from tests.support.service_harness import (
    MeshHarness,
    eventually,
    expect_status,
    json_payload,
    open_mesh,
)
from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.router.core import Producer
from tickmesh.router.processor import Processor, Tenant
from tickmesh.router.replay import StateRpcHistorySource
from tickmesh.router.servicer import RouterServicer
from tickmesh.router.store import RouterStore, claim_of, lifetime_key, request_key
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.auth import TENANT_METADATA_KEY
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.kv import CasWriter
from tickmesh.runtime.streams import allows_msg_ttl, bucket_stream, ensure_tenant
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import TransportError
from tickmesh.v1 import lifetime_pb2, router_service_pb2

RS = router_service_pb2
LS = lifetime_pb2
TTL_S = 1
EXPIRED_WITHIN_S = 10.0
"""nats-server removes expired messages on a timer: allow it a few rounds past the TTL."""


@pytest.fixture
async def bucket(nats_server: EmbeddedNats) -> AsyncIterator[RouterBucket]:
    async with router_bucket(nats_server.url, "ret") as made:
        yield made


def lifetime(lifetime_id: str, *, request: str = "", fork: bool = False) -> rs.RouterLifetime:
    state = rs.RouterLifetime()
    state.lifetime.lifetime_id = lifetime_id
    state.lifetime.state = LS.LIFETIME_STATE_RUNNING
    state.lifetime.client_request_id = request
    if fork:
        state.lifetime.fork_origin.lifetime_id = "origin"
    return state


def finish(state: rs.RouterLifetime) -> rs.RouterLifetime:
    done = rs.RouterLifetime()
    done.CopyFrom(state)
    done.lifetime.state = LS.LIFETIME_STATE_COMPLETED
    return done


async def holds(kv: KeyValue, key: str) -> bool:
    try:
        await kv.get(key)
    except KeyNotFoundError:
        return False
    return True


async def gone(kv: KeyValue, *keys: str) -> None:
    async def probe() -> bool:
        return not [k for k in keys if await holds(kv, k)]

    await eventually(probe, within=EXPIRED_WITHIN_S, what=f"{keys} expired")


async def test_a_finished_lifetime_and_its_start_request_expire_a_running_one_stays(
    bucket: RouterBucket,
) -> None:
    store = RouterStore(bucket.kv, writer=CasWriter(bucket.kv), finished_ttl_s=TTL_S)
    running = lifetime("run-1", request="order-1")
    ending = lifetime("end-1", request="order-2")
    forked = lifetime("fork-1", request="order-3", fork=True)
    batched = lifetime("end-2")
    revision = {}
    for state in (running, ending, forked, batched):
        lifetime_id = state.lifetime.lifetime_id
        if claim_of(state.lifetime):
            await store.claim_request(claim_of(state.lifetime), lifetime_id)
        revision[lifetime_id] = await store.create(state)
    # A fork claims its request as "fork:" + the request id.
    assert claim_of(forked.lifetime) == "fork:order-3"
    assert claim_of(batched.lifetime) == ""

    written_at = time.monotonic()
    await store.update(finish(ending), revision["end-1"])
    outcomes = await store.update_many(
        [(finish(forked), revision["fork-1"]), (finish(batched), revision["end-2"])]
    )
    assert all(isinstance(o, int) for o in outcomes), outcomes
    await store.update(running, revision["run-1"])  # written again, still running

    await gone(
        bucket.kv,
        lifetime_key("end-1"),
        request_key("order-2"),
        lifetime_key("fork-1"),
        request_key("fork:order-3"),
        lifetime_key("end-2"),
    )
    assert time.monotonic() - written_at >= TTL_S * 0.9
    assert await holds(bucket.kv, lifetime_key("run-1"))
    assert await holds(bucket.kv, request_key("order-1"))
    assert await store.load("end-1", fresh=True) is None
    assert await store.lifetime_ids() == ["run-1"]


async def test_without_retention_finished_lifetimes_stay(bucket: RouterBucket) -> None:
    store = RouterStore(bucket.kv, writer=CasWriter(bucket.kv))
    state = lifetime("kept", request="order-9")
    await store.claim_request("order-9", "kept")
    revision = await store.create(state)
    await store.update(finish(state), revision)
    await asyncio.sleep(TTL_S + 1.5)  # past the TTL a retention of TTL_S would have set
    assert await holds(bucket.kv, lifetime_key("kept"))
    assert await holds(bucket.kv, request_key("order-9"))


def test_retention_needs_a_cas_writer() -> None:
    with pytest.raises(ValueError, match="CasWriter"):
        RouterStore(object(), finished_ttl_s=60)  # type: ignore[arg-type]


async def test_ensure_tenant_lets_a_bucket_made_without_ttls_take_them(
    nats_server: EmbeddedNats,
) -> None:
    nc = await tm_nats.connect(nats_server.url, name="retention-test")
    js = tm_nats.jetstream(nc)
    try:
        names = TenantNames(new_tenant("old"))
        # The router bucket as a KV client that did not allow per-message TTLs made it.
        await js.add_stream(
            StreamConfig(
                name=bucket_stream(names.router_bucket),
                subjects=[f"$KV.{names.router_bucket}.>"],
                max_msgs_per_subject=1,
                storage=StorageType.FILE,
                discard=DiscardPolicy.NEW,
                allow_rollup_hdrs=True,
                deny_delete=True,
                allow_direct=True,
            )
        )
        kv = await js.key_value(names.router_bucket)
        await kv.put("lt.before", b"kept")
        assert not await allows_msg_ttl(js, names.router_bucket)

        await ensure_tenant(js, names.tenant)

        assert await allows_msg_ttl(js, names.router_bucket)
        assert (await kv.get("lt.before")).value == b"kept"
        store = RouterStore(kv, writer=CasWriter(kv), finished_ttl_s=TTL_S)
        state = lifetime("after")
        await store.update(finish(state), await store.create(state))
        await gone(kv, lifetime_key("after"))
        assert await holds(kv, "lt.before")
    finally:
        await nc.close()


# --- through the router, on an embedded mesh --------------------------------------------


@pytest.fixture
async def harness(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MeshHarness]:
    monkeypatch.setenv("TICKMESH_ROUTER_FINISHED_RETENTION_S", str(TTL_S))
    monkeypatch.setenv("TICKMESH_ROUTER_LIFETIME_CACHE_SIZE", "777")
    async with open_mesh(nats_server.url, tmp_path) as mesh:
        yield mesh


async def test_an_expired_lifetime_is_read_from_the_state_service_and_its_request_is_free(
    harness: MeshHarness,
) -> None:
    router = harness.mesh.router
    assert router is not None
    store = router.processor.tenants[harness.tenant].store
    assert store.cache_size == 777  # lifetime_cache_size reaches the store
    await harness.start_worker([relay_work, relay_finish])
    await harness.register(RELAY)
    await harness.register(IDLE)
    kv = await harness.js.key_value(harness.names.router_bucket)
    idle = await harness.router.StartLifetime(
        RS.StartLifetimeRequest(graph_id="idle"), metadata=harness.md
    )
    request = RS.StartLifetimeRequest(
        graph_id="relay", input=json_payload({"n": 1}), client_request_id="order-77"
    )
    first = await harness.router.StartLifetime(request, metadata=harness.md)
    done_id = first.lifetime.lifetime_id
    await harness.until_completed(done_id)

    await gone(kv, lifetime_key(done_id), request_key("order-77"))

    got = await harness.router.GetLifetime(
        RS.GetLifetimeRequest(lifetime_id=done_id), metadata=harness.md
    )
    assert got.lifetime.state == LS.LIFETIME_STATE_COMPLETED
    assert got.lifetime.execution_count == 2
    # Listed from the state service's rows, which keep it.
    listed = await harness.router.ListLifetimes(RS.ListLifetimesRequest(), metadata=harness.md)
    assert [v.lifetime_id for v in listed.lifetimes] == [done_id, idle.lifetime.lifetime_id]
    assert listed.lifetimes[0].state == LS.LIFETIME_STATE_COMPLETED
    # Watched, it replays the history the state service stored, and ends.
    watched = [
        r.event
        async for r in harness.router.WatchLifetime(
            RS.WatchLifetimeRequest(lifetime_id=done_id), metadata=harness.md
        )
    ]
    assert [e.sequence for e in watched] == list(range(1, got.lifetime.last_sequence + 1))
    assert watched[-1].state == LS.LIFETIME_STATE_COMPLETED
    # Its input is on its STARTED event, so the record has it...
    assert got.lifetime.input == request.input
    assert watched[0].input == request.input
    # ... and replay and fork re-drive it from the state service's history.
    replayed = await harness.router.ReplayLifetime(
        RS.ReplayLifetimeRequest(lifetime_id=done_id), metadata=harness.md
    )
    assert replayed.reproduced, replayed.divergences
    assert replayed.decisions_checked >= 3
    work = next(e for e in watched if e.kind == LS.LIFETIME_EVENT_KIND_STEP_FINISHED)
    forked = await harness.router.ForkLifetime(
        RS.ForkLifetimeRequest(
            lifetime_id=done_id,
            execution_id=work.execution_id,
            replacement_output=json_payload({"n": 2}),
        ),
        metadata=harness.md,
    )
    assert forked.lifetime.fork_origin.lifetime_id == done_id
    fork_id = forked.lifetime.lifetime_id
    await harness.until_completed(fork_id)
    finished = await harness.lifetime(fork_id)
    assert json.loads(finished.output.inline) == {"echo": {"n": 2}}
    # The fork expires in turn: its replay re-forks the origin from the store, with the
    # replacement its STARTED event carries, then follows the fork's own records.
    await gone(kv, lifetime_key(fork_id))
    fork_replayed = await harness.router.ReplayLifetime(
        RS.ReplayLifetimeRequest(lifetime_id=fork_id), metadata=harness.md
    )
    assert fork_replayed.reproduced, fork_replayed.divergences
    past_the_end = harness.router.WatchLifetime(
        RS.WatchLifetimeRequest(lifetime_id=done_id, after_sequence=2**64 - 1),
        metadata=harness.md,
    )
    assert [r async for r in past_the_end] == []
    await expect_status(
        harness.router.WatchLifetime(
            RS.WatchLifetimeRequest(lifetime_id="01900000-0000-7000-8000-000000000000"),
            metadata=harness.md,
        ).read(),
        grpc.StatusCode.NOT_FOUND,
    )
    # The waiting lifetime outlived the TTL.
    assert await holds(kv, lifetime_key(idle.lifetime.lifetime_id))

    # The request expired with its lifetime: the same id starts a new one.
    again = await harness.router.StartLifetime(request, metadata=harness.md)
    assert again.created
    assert again.lifetime.lifetime_id != done_id


async def test_a_start_request_that_outlived_its_lifetime_does_not_run_it_again(
    harness: MeshHarness,
) -> None:
    await harness.start_worker([relay_work, relay_finish])
    await harness.register(RELAY)
    kv = await harness.js.key_value(harness.names.router_bucket)
    request = RS.StartLifetimeRequest(graph_id="relay", client_request_id="order-88")
    first = await harness.router.StartLifetime(request, metadata=harness.md)
    done_id = first.lifetime.lifetime_id
    await harness.until_completed(done_id)
    await gone(kv, lifetime_key(done_id), request_key("order-88"))
    # As if the request's own expiry had failed: it still names the lifetime.
    await kv.put(request_key("order-88"), done_id.encode())

    again = await harness.router.StartLifetime(request, metadata=harness.md)

    assert not again.created
    assert again.lifetime.lifetime_id == done_id
    assert again.lifetime.state == LS.LIFETIME_STATE_COMPLETED
    assert not await holds(kv, lifetime_key(done_id))  # not created again


async def test_an_unreachable_state_service_is_unavailable_not_not_found() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    history = StateRpcHistorySource(target, timeout_s=2.0)
    try:
        with pytest.raises(TransportError, match=target):
            await history.lifetime("default", "01900000-0000-7000-8000-000000000000")
    finally:
        await history.close()


@dataclass
class Context:
    """What the router's servicer reads of a call: the tenant in its metadata."""

    tenant: str

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [(TENANT_METADATA_KEY, self.tenant)]


async def test_a_router_without_a_state_service_lists_what_its_bucket_holds(
    bucket: RouterBucket,
) -> None:
    store = RouterStore(bucket.kv, writer=CasWriter(bucket.kv), finished_ttl_s=TTL_S)
    processor = Processor(Producer("router", "test", ""))
    processor.tenants[bucket.names.tenant] = Tenant(
        names=bucket.names,
        store=store,
        link=None,  # type: ignore[arg-type]
    )
    servicer = RouterServicer(processor, tenants=[bucket.names.tenant], inline_limit=1024)
    running, ending = (
        lifetime("019a0000-0000-7000-8000-000000000001"),
        lifetime("019a0000-0000-7000-8000-000000000002"),
    )
    await store.create(running)
    await store.update(finish(ending), await store.create(ending))
    context = Context(bucket.names.tenant)

    async def listed() -> list[str]:
        page = await servicer.ListLifetimes(RS.ListLifetimesRequest(), context)  # type: ignore[arg-type]
        return [v.lifetime_id for v in page.lifetimes]

    assert await listed() == [ending.lifetime.lifetime_id, running.lifetime.lifetime_id]
    await gone(bucket.kv, lifetime_key(ending.lifetime.lifetime_id))
    assert await listed() == [running.lifetime.lifetime_id]
