"""The router applies a consumer batch in phases (one round of compare-and-set writes,
one round of publishes) and each lifetime of it still stands alone: an unknown one,
one whose write lost a race and one whose publish JetStream refused change nothing
for the others. Against a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats
import pytest
from nats.js.api import DeliverPolicy

from tests.support.nats_server import new_tenant
from tests.unit.router.test_core import PRODUCER, hello_graph, payload
from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.router import core
from tickmesh.router.processor import Applied, Job, Mutation, Processor, Tenant
from tickmesh.router.store import RouterStore
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.kv import CasWriter
from tickmesh.runtime.nats import PublishError, jetstream
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.runtime.tenant_links import TenantLink
from tickmesh.sdk import NotFoundError, decisions_of, decode_envelope, events_of
from tickmesh.v1 import lifetime_pb2

LS = lifetime_pb2


@pytest.fixture
async def tenant(nats_server: EmbeddedNats) -> AsyncIterator[Tenant]:
    nc = await nats.connect(nats_server.url)
    js = jetstream(nc)
    names = await ensure_tenant(js, new_tenant("batch"))
    bucket = await js.key_value(names.router_bucket)
    store = RouterStore(bucket, writer=CasWriter(bucket))
    yield Tenant(names=names, store=store, link=TenantLink(names.tenant, nc, js))
    await nc.close()


async def started(processor: Processor, tenant: Tenant, lifetime_id: str) -> None:
    graph, _ = await tenant.store.put_graph(hello_graph())
    state = core.new_lifetime(
        tenant_id=tenant.names.tenant,
        lifetime_id=lifetime_id,
        graph=graph,
        input_payload=payload({"goal": lifetime_id}),
        client_request_id="",
        labels={},
    )
    await processor.create(tenant, state)


async def event_kinds(tenant: Tenant, lifetime_id: str) -> list[str]:
    """The kinds of a lifetime's events in the router's stored batches, in order."""
    sub = await tenant.link.js.subscribe(
        tenant.names.evb, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    kinds: list[str] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.3)
            except nats.errors.TimeoutError:
                return kinds
            for decision in decisions_of(decode_envelope(msg.data)):
                if decision.header.lifetime_id == lifetime_id:
                    kinds += [LS.LifetimeEventKind.Name(e.kind) for e in events_of(decision)]
    finally:
        await sub.unsubscribe()


async def test_a_batch_applies_each_lifetime_alone(tenant: Tenant) -> None:
    processor = Processor(PRODUCER)
    for lifetime_id in ("calm", "raced", "refused"):
        await started(processor, tenant, lifetime_id)

    # Another replica pauses "raced" behind this one's cache: its write will conflict.
    other = RouterStore(tenant.store._kv, writer=CasWriter(tenant.store._kv))
    behind = await other.load("raced")
    assert behind is not None
    graph = await other.get_graph("hello", 1)
    lt = core.Lifetime(behind.state, graph, PRODUCER, datetime.now(UTC), core.allow_all)
    core.pause(lt, "elsewhere")
    await other.update(lt.state, behind.revision)

    seen: dict[str, list[int]] = {"calm": [], "raced": [], "refused": []}

    def pausing(lifetime_id: str) -> Mutation:
        def mutate(lt: core.Lifetime) -> bool:
            before = lt.view.state
            seen[lifetime_id].append(before)
            core.pause(lt, "batch")
            if lifetime_id == "refused":
                # A message no stream listens on: JetStream answers no one (503).
                lt.out.append(
                    rs.OutMessage(subject="nowhere.at.all", msg_id="x", type="x", data=b"x")
                )
            return lt.view.state != before

        return mutate

    jobs = [Job(lid, pausing(lid), [f"k:{lid}"]) for lid in ("calm", "ghost", "raced", "refused")]
    results = await processor.apply_batch(tenant, jobs)

    calm, ghost, raced, refused = results
    assert isinstance(calm, Applied)
    assert calm.changed
    assert isinstance(ghost, NotFoundError)
    assert isinstance(refused, PublishError)
    assert [m.subject for m, _ in refused.failures] == ["nowhere.at.all"]
    # Decided on the stale cached state first, then again on the stored one, which the
    # other replica had paused already: nothing more to record.
    assert seen["raced"] == [LS.LIFETIME_STATE_RUNNING, LS.LIFETIME_STATE_PAUSED]
    assert isinstance(raced, Applied)
    assert not raced.changed

    fresh = RouterStore(tenant.store._kv)
    for lifetime_id in ("calm", "raced", "refused"):
        loaded = await fresh.load(lifetime_id)
        assert loaded is not None
        assert loaded.state.lifetime.state == LS.LIFETIME_STATE_PAUSED, lifetime_id
    # The calm lifetime's pause went out; the refused one's decision is durable (in
    # its outbox) and is published when its input comes again.
    assert (await event_kinds(tenant, "calm"))[-1] == "LIFETIME_EVENT_KIND_STATE_CHANGED"
    refused_state = (await fresh.load("refused")).state  # type: ignore[union-attr]
    assert [entry.key for entry in refused_state.outbox][-1] == "k:refused"


async def test_a_decision_that_raises_fails_its_lifetime_and_not_the_others(
    tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    """Deciding is pure: a decision that raised (on a plan result the router cannot take)
    raises again on every redelivery of its input. The lifetime fails instead, once,
    with the error named and its traceback logged; the batch's other lifetimes go on; an
    error said on purpose (an unknown lifetime) stays what it was."""
    processor = Processor(PRODUCER)
    for lifetime_id in ("calm", "broken"):
        await started(processor, tenant, lifetime_id)
    tries: list[str] = []

    def deciding(lifetime_id: str) -> Mutation:
        def mutate(lt: core.Lifetime) -> bool:
            tries.append(lifetime_id)
            if lifetime_id == "broken":
                core.pause(lt, "half way")  # a partial change, which must not be written
                raise ValueError("Timestamp is not valid")
            core.pause(lt, "batch")
            return True

        return mutate

    jobs = [Job(lid, deciding(lid), [f"k:{lid}"]) for lid in ("calm", "broken", "ghost")]
    calm, broken, ghost = await processor.apply_batch(tenant, jobs)

    assert isinstance(calm, Applied)
    assert isinstance(ghost, NotFoundError)
    assert isinstance(broken, Applied)
    assert broken.changed
    assert tries == ["calm", "broken"]  # decided once; the lifetime failed from its state
    fresh = RouterStore(tenant.store._kv)
    stored = await fresh.load("broken")
    assert stored is not None
    view = stored.state.lifetime
    assert view.state == LS.LIFETIME_STATE_FAILED
    assert view.error.type == "DecisionError"
    assert "ValueError('Timestamp is not valid')" in view.error.message
    kinds = await event_kinds(tenant, "broken")
    assert kinds[-1] == "LIFETIME_EVENT_KIND_STATE_CHANGED"  # the failure, last
    assert kinds.count("LIFETIME_EVENT_KIND_STATE_CHANGED") == 1  # and no pause before it
    assert [entry.key for entry in stored.state.outbox][-1] == "k:broken"
    logged = [r for r in caplog.records if "deciding on its input raised" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None

    # An input that raises again on the failed lifetime changes nothing more.
    [again] = await processor.apply_batch(tenant, [Job("broken", deciding("broken"), ["k:2"])])
    assert isinstance(again, Applied)
    assert not again.changed
    after = await RouterStore(tenant.store._kv).load("broken")
    assert after is not None
    assert after.revision == stored.revision


async def test_inputs_decided_together_fail_the_lifetime_at_the_one_that_raises(
    tenant: Tenant,
) -> None:
    """Two inputs of one lifetime in one batch, the second's decision raising: the lifetime
    takes the first, then fails at the second, as replay (one record at a time) does; the
    first is not lost with the second."""
    processor = Processor(PRODUCER)
    await started(processor, tenant, "pair")

    def pausing(lt: core.Lifetime) -> bool:
        core.pause(lt, "first input")
        return True

    def raising(lt: core.Lifetime) -> bool:
        core.resume(lt, "half way")  # a partial change, which must not be written
        raise ValueError("cannot travel")

    def together(lt: core.Lifetime) -> bool:
        return pausing(lt) | raising(lt)

    job = Job("pair", together, ["k:1", "k:2"], one_by_one=lambda: [pausing, raising])
    [applied] = await processor.apply_batch(tenant, [job])
    assert isinstance(applied, Applied)
    stored = await RouterStore(tenant.store._kv).load("pair")
    assert stored is not None
    view = stored.state.lifetime
    assert view.state == LS.LIFETIME_STATE_FAILED
    assert (
        view.error.message == "the router could not decide on a step: ValueError('cannot travel')"
    )
    kinds = await event_kinds(tenant, "pair")
    # The first input's pause, then the failure; the second's half-made resume nowhere.
    changes = [k for k in kinds if k == "LIFETIME_EVENT_KIND_STATE_CHANGED"]
    assert len(changes) == 2
    assert kinds[-1] == "LIFETIME_EVENT_KIND_STATE_CHANGED"


async def test_a_call_refused_by_a_stale_cached_state_is_decided_again_on_the_stored_one(
    tenant: Tenant,
) -> None:
    """Another replica moved the lifetime on (here: paused it) behind this one's cache. A
    call whose decision refuses the cached state (resume: "not paused") is decided again on
    the stored state before it is refused: the caller must not be told a state the
    lifetime has left (a signal refused as 'RUNNING' right after a watch said WAITING)."""
    processor = Processor(PRODUCER)
    await started(processor, tenant, "moved")
    other = RouterStore(tenant.store._kv, writer=CasWriter(tenant.store._kv))
    behind = await other.load("moved")
    assert behind is not None
    graph = await other.get_graph("hello", 1)
    lt = core.Lifetime(behind.state, graph, PRODUCER, datetime.now(UTC), core.allow_all)
    core.pause(lt, "elsewhere")
    await other.update(lt.state, behind.revision)

    seen: list[int] = []

    def resume(lt: core.Lifetime) -> bool:
        seen.append(lt.view.state)
        if lt.view.state != LS.LIFETIME_STATE_PAUSED:
            raise core.RoutingError(f"lifetime is {LS.LifetimeState.Name(lt.view.state)}")
        core.resume(lt, "here")
        return True

    applied = await processor.apply(tenant, "moved", resume, ["rpc:resume"])
    assert seen == [LS.LIFETIME_STATE_RUNNING, LS.LIFETIME_STATE_PAUSED]
    assert applied.lifetime.view.state == LS.LIFETIME_STATE_RUNNING

    # Refused on the stored state too: the caller hears why.
    with pytest.raises(core.RoutingError, match="RUNNING"):
        await processor.apply(tenant, "moved", resume, ["rpc:resume-again"])


async def test_outbox_entries_published_before_a_refused_call_are_still_dropped(
    tenant: Tenant,
) -> None:
    """What this replica has published is forgotten only once a write has dropped it: a
    call refused (or a write lost) in between used to forget it, and its outbox entry
    stayed in the lifetime's state for the whole outbox retention (an hour), so a lifetime
    taking signals while some were refused grew until its state no longer fit."""
    processor = Processor(PRODUCER)
    await started(processor, tenant, "busy")

    def pausing(lt: core.Lifetime) -> bool:
        core.pause(lt, "one")
        return True

    def refused(lt: core.Lifetime) -> bool:
        raise core.RoutingError("not now")

    def resuming(lt: core.Lifetime) -> bool:
        core.resume(lt, "two")
        return True

    await processor.apply(tenant, "busy", pausing, ["rpc:pause"])
    stored = await RouterStore(tenant.store._kv).load("busy")
    assert stored is not None
    assert "rpc:pause" in [entry.key for entry in stored.state.outbox]
    with pytest.raises(core.RoutingError):
        await processor.apply(tenant, "busy", refused, ["rpc:refused"])
    await processor.apply(tenant, "busy", resuming, ["rpc:resume"])
    stored = await RouterStore(tenant.store._kv).load("busy")
    assert stored is not None
    assert [entry.key for entry in stored.state.outbox] == ["rpc:resume"]
