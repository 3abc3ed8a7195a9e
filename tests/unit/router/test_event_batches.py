"""How the router groups a round's lifetime events into stored batches (Processor._route):
every decision's events once, in order, in messages that fit the server's max_payload, and
each decision's events again for watchers on its lifetime's live subject."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.router import core
from tickmesh.router.processor import BATCH_HEADROOM_BYTES, Processor, Tenant, _fitting
from tickmesh.runtime.subjects import HDR_LIFETIME, HDR_MSG_ID, HDR_TYPE, TenantNames
from tickmesh.sdk import decisions_of, decode_envelope, encode_envelope, events_of
from tickmesh.v1 import envelope_pb2

NAMES = TenantNames("acme")
PRODUCER = core.Producer("router", "test", "unit")


def events_message(lifetime_id: str, first: int, size: int) -> rs.OutMessage:
    """One decision's events message of about ``size`` bytes, as core seals it."""
    envelope = envelope_pb2.ExecutionEnvelope()
    envelope.header.tenant_id = NAMES.tenant
    envelope.header.lifetime_id = lifetime_id
    envelope.header.sequence = first
    for sequence in (first, first + 1):
        envelope.lifetime_events.events.add(sequence=sequence, message="x" * (size // 2))
    return rs.OutMessage(
        subject=NAMES.evt(lifetime_id),
        msg_id=f"evt:{lifetime_id}:{first}-{first + 1}",
        type="lifetime_events",
        data=encode_envelope(envelope),
    )


def decided(lifetime_id: str, *messages: rs.OutMessage) -> core.Lifetime:
    """What _route reads of a decided lifetime: its id, its trace and its messages."""
    state = rs.RouterLifetime()
    state.lifetime.lifetime_id = lifetime_id
    return cast(
        core.Lifetime, SimpleNamespace(state=state, view=state.lifetime, out=list(messages))
    )


def tenant(max_payload: int) -> Tenant:
    link: Any = SimpleNamespace(nc=SimpleNamespace(max_payload=max_payload))
    return Tenant(names=NAMES, store=cast(Any, None), link=link)


def test_parts_fit_the_limit_keep_order_and_a_lone_large_item_stands_alone() -> None:
    items = [(n, events_message(f"l{n}", 1, size)) for n, size in enumerate([100, 300, 50, 900])]
    costs = [len(m.data) + 6 for _, m in items]
    limit = costs[0] + costs[1] + 10
    parts = _fitting(items, limit)
    assert [[n for n, _ in part] for part in parts] == [[0, 1], [2], [3]]
    assert all(sum(len(m.data) + 6 for _, m in part) <= limit for part in parts[:2])
    assert _fitting([], limit) == []


def test_a_round_is_one_batch_its_requests_stay_apart_and_each_decision_goes_live() -> None:
    request = rs.OutMessage(
        subject=NAMES.work("task", "h"), msg_id="req:1", type="task_request", data=b"r"
    )
    lifetimes = [
        decided("a", events_message("a", 1, 200), request),
        decided("b", events_message("b", 5, 200)),
        decided("c"),  # nothing decided to publish
    ]
    routed = Processor(PRODUCER)._route(tenant(1 << 20), lifetimes)

    assert [o.subject for o in routed.stored] == [request.subject, NAMES.evb]
    assert routed.needs == [[0, 1], [1], []]
    batch = decode_envelope(routed.stored[1].data, expected_kind="lifetime_event_batch")
    assert [d.header.lifetime_id for d in decisions_of(batch)] == ["a", "b"]
    assert [e.sequence for d in decisions_of(batch) for e in events_of(d)] == [1, 2, 5, 6]
    assert routed.stored[1].headers[HDR_TYPE] == "lifetime_event_batch"
    assert routed.stored[1].headers[HDR_MSG_ID].startswith("evb:")
    # Watchers' copies: each decision's own message on its own subject, with its headers.
    assert [[(o.subject, o.headers[HDR_LIFETIME]) for o in live] for live in routed.live] == [
        [(NAMES.evt("a"), "a")],
        [(NAMES.evt("b"), "b")],
        [],
    ]
    assert routed.live[0][0].data == lifetimes[0].out[0].data


def test_a_round_larger_than_one_message_is_split_and_loses_nothing() -> None:
    max_payload = 64 * 1024
    lifetimes = [decided(f"l{n}", events_message(f"l{n}", 1, 3_000)) for n in range(60)]
    routed = Processor(PRODUCER)._route(tenant(max_payload + BATCH_HEADROOM_BYTES), lifetimes)

    assert len(routed.stored) > 1
    assert all(len(o.data) <= max_payload + BATCH_HEADROOM_BYTES for o in routed.stored)
    carried = [
        d.header.lifetime_id
        for o in routed.stored
        for d in decisions_of(decode_envelope(o.data, expected_kind="lifetime_event_batch"))
    ]
    assert carried == [f"l{n}" for n in range(60)]
    for n, needs in enumerate(routed.needs):
        (index,) = needs
        batch = decode_envelope(routed.stored[index].data)
        assert f"l{n}" in {d.header.lifetime_id for d in decisions_of(batch)}
    # The same decisions make the same batch ids (a batch published again is a duplicate).
    again = Processor(PRODUCER)._route(tenant(max_payload + BATCH_HEADROOM_BYTES), lifetimes)
    assert [o.headers[HDR_MSG_ID] for o in again.stored] == [
        o.headers[HDR_MSG_ID] for o in routed.stored
    ]
