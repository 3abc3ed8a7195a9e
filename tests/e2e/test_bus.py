"""What arrives on the bus, end to end: headers, duplicates and poison messages."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import cast

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

import examples.hello.handlers as hello
from tests.support.audit import record_of
from tests.support.factories import make_envelope
from tests.support.mesh import MeshFactory, MeshHarness
from tests.support.service_harness import eventually
from tickmesh.runtime.subjects import (
    HDR_EXECUTION,
    HDR_LIFETIME,
    HDR_MSG_ID,
    HDR_REASON,
    HDR_TENANT,
    HDR_TYPE,
)
from tickmesh.sdk import (
    BodyKind,
    decode_envelope,
    encode_envelope,
    events_of,
    load_graph_file,
    uuid7,
)
from tickmesh.v1 import envelope_pb2, graph_pb2, lifetime_pb2

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello" / "graph.yaml"


async def _hello(h: MeshHarness) -> graph_pb2.AgentGraph:
    await h.worker([hello.greet, hello.decide, hello.shout])
    return await h.register(load_graph_file(HELLO))


async def _run_hello(h: MeshHarness, graph: graph_pb2.AgentGraph, name: str = "ada") -> str:
    handle = await h.start(graph, {"name": name})
    assert await handle.result(within=10) == {"greeting": f"HELLO, {name.upper()}!"}
    return handle.id


async def test_every_message_carries_its_key_fields_as_headers(start_mesh: MeshFactory) -> None:
    """DESIGN §6: tenant, lifetime, execution id, type and Nats-Msg-Id are NATS headers."""
    h = await start_mesh()
    graph = await _hello(h)
    seen: list[Msg] = []

    async def keep(msg: Msg) -> None:
        seen.append(msg)

    sub = await h.nc.subscribe(f"{h.names.root}.>", cb=keep)
    try:
        lifetime_id = await _run_hello(h, graph)
        await h.audit(lifetime_id)
        await h.nc.flush()
    finally:
        await sub.unsubscribe()

    kinds: set[str] = set()
    problems: list[str] = []
    for msg in seen:
        channel = msg.subject.split(".")[2]
        if channel == "ctl":
            continue
        headers = msg.headers or {}
        kind = headers.get(HDR_TYPE, "")
        kinds.add(f"{channel}:{kind}")
        envelope = decode_envelope(msg.data, expected_kind=cast(BodyKind, kind))
        header = envelope.header
        expected = {HDR_TENANT: header.tenant_id}
        if channel != "evb":  # a batch of events holds many lifetimes'
            expected[HDR_LIFETIME] = header.lifetime_id
        if channel in ("work", "exec", "ref"):
            expected[HDR_EXECUTION] = header.execution_id
        for name, value in expected.items():
            if headers.get(name) != value:
                problems.append(f"{msg.subject} ({kind}): {name}={headers.get(name)!r}")
        if not headers.get(HDR_MSG_ID):
            problems.append(f"{msg.subject} ({kind}): no {HDR_MSG_ID}")
    assert kinds == {
        "work:task_request",
        "work:plan_request",
        "exec:task_execution",
        "exec:plan_execution",
        # No refs: the router reads the records themselves (refs are only for records
        # appended through the state API).
        # Every decision of a run without pauses or signals records several events: live
        # on the lifetime's subject, and in a batch of the router's for the state service.
        "evt:lifetime_events",
        "evb:lifetime_event_batch",
    }
    assert not problems, "\n".join(sorted(set(problems)))


async def test_a_republished_execution_is_stored_once_and_changes_nothing(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    graph = await _hello(h)
    lifetime_id = await _run_hello(h, graph)
    before = await h.audit(lifetime_id)
    assert h.mesh.state is not None
    store = h.mesh.state.store
    rows = await store.list_executions(h.tenant, lifetime_id)
    greet = next(r for r in rows if r.node_id == "greet")
    info_before = await h.client.get_lifetime(lifetime_id)
    events_before = await h.stored_decisions(lifetime_id)

    refs: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await h.nc.subscribe(h.names.ref(lifetime_id), cb=refs.put)
    headers = {
        HDR_TYPE: "task_execution",
        HDR_TENANT: h.tenant,
        HDR_LIFETIME: lifetime_id,
        HDR_EXECUTION: greet.execution_id,
    }
    try:
        # A new message id, so JetStream's dedup window cannot catch it: the store must.
        ack = await h.js.publish(
            h.names.exec(lifetime_id),
            greet.envelope,
            headers={**headers, HDR_MSG_ID: f"replayed:{uuid7()}"},
        )
        assert not ack.duplicate
        # The original message id: JetStream drops it.
        ack = await h.js.publish(
            h.names.exec(lifetime_id),
            greet.envelope,
            headers={**headers, HDR_MSG_ID: f"exec:{greet.execution_id}"},
        )
        assert ack.duplicate
        # Both readers took the republished record: the store found it already stored, the
        # router found its step no longer in flight.
        await h.wait_stream_empty(h.names.exec_stream)
        await asyncio.sleep(0.2)
        assert refs.empty()  # a record from the bus gets no ref

        # The same record appended through the state API: stored already, so its ref is
        # published again, and the router must change nothing for it either.
        consumer = h.mesh.state.consumer(h.tenant)
        record = decode_envelope(greet.envelope, expected_kind="task_execution")
        [(_, sequence, duplicate)] = await consumer.append_and_publish([(greet.envelope, record)])
        assert (sequence, duplicate) == (greet.store_sequence, True)
        async with asyncio.timeout(5):
            republished = await refs.get()
        ref = decode_envelope(republished.data, expected_kind="execution_ref")
        assert record_of(ref.execution_ref).header.execution_id == greet.execution_id
        assert ref.execution_ref.store_sequence == greet.store_sequence
        await h.wait_stream_empty(h.names.ref_stream)
    finally:
        await sub.unsubscribe()
    await asyncio.sleep(0.3)

    after = await h.audit(lifetime_id)
    assert after.stored == before.stored
    assert len(await store.list_executions(h.tenant, lifetime_id)) == len(rows)
    info_after = await h.client.get_lifetime(lifetime_id)
    assert info_after.raw.last_sequence == info_before.raw.last_sequence
    assert info_after.execution_count == info_before.execution_count
    assert info_after.input_tokens == info_before.input_tokens
    events_after = await h.stored_decisions(lifetime_id)
    assert len(events_after) == len(events_before)
    _, executions = await store.counters(h.tenant, lifetime_id=lifetime_id)
    assert executions == len(rows)


async def test_poison_records_are_dead_lettered_and_the_mesh_keeps_going(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    graph = await _hello(h)
    lifetime_id = await _run_hello(h, graph)
    assert h.mesh.state is not None
    await h.records_stored()
    [stored, *_] = await h.mesh.state.store.list_executions(h.tenant, lifetime_id)
    target = str(uuid7())  # a lifetime nobody started

    wrong_kind = envelope_pb2.ExecutionEnvelope()
    wrong_kind.CopyFrom(decode_envelope(stored.envelope, expected_kind="task_execution"))
    wrong_kind.header.lifetime_id = target
    wrong_kind.task_execution.header.lifetime_id = target
    wrong_kind.lifetime_event.CopyFrom(lifetime_pb2.LifetimeEvent(sequence=1))
    # Well-formed records the store could not take (a NUL in a text column; a figure the
    # counters cannot add): refused before the store, or they would hold back every record
    # behind them, retried for ever.
    nul_node = decode_envelope(stored.envelope, expected_kind="task_execution")
    overflow = decode_envelope(stored.envelope, expected_kind="task_execution")
    for record in (nul_node, overflow):
        record.header.lifetime_id = record.task_execution.header.lifetime_id = target
    nul_node.header.node.id = "gr\x00eet"
    overflow.task_execution.result.telemetry.input_tokens = 2**63 - 1
    poison: list[tuple[str, bytes, dict[str, str]]] = [
        (
            "a record whose node id holds a NUL",
            encode_envelope(nul_node),
            {HDR_TYPE: "task_execution"},
        ),
        (
            "a record reporting 2**63 - 1 tokens",
            encode_envelope(overflow),
            {HDR_TYPE: "task_execution"},
        ),
        ("random bytes", random.Random(11).randbytes(200), {HDR_TYPE: "task_execution"}),
        (
            "an envelope whose body is not what its header says",
            encode_envelope(wrong_kind),
            {HDR_TYPE: "task_execution"},
        ),
        (
            "a well-formed envelope that is not an execution record",
            encode_envelope(wrong_kind),
            {HDR_TYPE: "lifetime_event"},
        ),
        ("a record without a type header", stored.envelope, {}),
    ]
    # The error events are out of band: live on the lifetimes' subjects, not stored.
    live: list[Msg] = []

    async def hear(msg: Msg) -> None:
        live.append(msg)

    listening = await h.nc.subscribe(h.names.evt_all, cb=hear)
    for n, (_, data, headers) in enumerate(poison):
        lifetime_header = {HDR_LIFETIME: target} if headers else {}
        await h.js.publish(
            h.names.exec(target),
            data,
            headers={**headers, **lifetime_header, HDR_MSG_ID: f"poison:{n}:{uuid7()}"},
        )
    await h.wait_stream_empty(h.names.exec_stream)

    letters = await h.stream_messages(h.names.dlq_stream, h.names.dlq("exec"))
    assert len(letters) == len(poison)
    reasons = [(m.headers or {}).get(HDR_REASON, "") for m in letters]
    assert all(reasons), reasons
    assert sorted(m.data for m in letters) == sorted(d for _, d, _ in poison)

    async def all_heard() -> bool:
        return len(live) >= len(poison)

    await eventually(all_heard, within=5, what="an error event per dead letter")
    await listening.unsubscribe()
    assert {m.subject for m in live} <= {h.names.evt(target), h.names.evt("_invalid")}
    errors = [decode_envelope(m.data, expected_kind="lifetime_event").lifetime_event for m in live]
    assert len(errors) == len(poison)
    assert {(e.kind, e.sequence) for e in errors} == {
        (lifetime_pb2.LIFETIME_EVENT_KIND_DEAD_LETTERED, 0)
    }
    assert h.mesh.state.consumer(h.tenant).rejected == len(poison)

    # Nothing was stored for them, and the mesh still runs lifetimes.
    assert await h.stored(target) == []
    assert await h.mesh.state.store.list_executions(h.tenant, target) == []
    before = await h.mesh.state.store.counters(h.tenant)
    second = await _run_hello(h, graph, "bob")
    report = await h.audit(second)
    _, executions = await h.mesh.state.store.counters(h.tenant)
    assert executions == before[1] + report.stored


async def test_a_record_the_state_service_refuses_is_never_routed(start_mesh: MeshFactory) -> None:
    """The router reads the records from the bus itself: it runs the state service's check
    on them, so a record the state service dead-letters cannot finish a step."""
    h = await start_mesh()
    graph = await h.register(load_graph_file(HELLO))
    handle = await h.start(graph, {"name": "ada"})  # no executor yet: greet stays in flight
    work_subject = h.names.work("task", "greet")
    async with asyncio.timeout(5):
        while True:
            try:
                request = await h.js.get_last_msg(h.names.work_stream, work_subject)
                break
            except NotFoundError:
                await asyncio.sleep(0.05)
    assert request.data is not None
    asked = decode_envelope(request.data, expected_kind="task_request")

    # A well-formed record of the step in flight, but its record header claims another
    # tenant: one the router would apply, were it not checked.
    forged = make_envelope("task_execution")
    forged.header.CopyFrom(asked.header)
    forged.task_execution.header.CopyFrom(asked.header)
    forged.task_execution.header.tenant_id = "intruder"
    await h.js.publish(
        h.names.exec(handle.id),
        encode_envelope(forged),
        headers={
            HDR_TYPE: "task_execution",
            HDR_TENANT: h.tenant,
            HDR_LIFETIME: handle.id,
            HDR_EXECUTION: asked.header.execution_id,
            HDR_MSG_ID: f"forged:{uuid7()}",
        },
    )
    # Both readers are done with it once the stream is empty.
    await h.wait_stream_empty(h.names.exec_stream)

    letters = await h.stream_messages(h.names.dlq_stream, h.names.dlq("exec"))
    assert len(letters) == 1
    assert "intruder" in (letters[0].headers or {}).get(HDR_REASON, "")
    finished = [
        event
        for decision in await h.stored_decisions(handle.id)
        for event in events_of(decision)
        if event.kind == lifetime_pb2.LIFETIME_EVENT_KIND_STEP_FINISHED
    ]
    assert finished == []

    # The step's own result still finishes it.
    await h.worker([hello.greet, hello.decide, hello.shout])
    assert await handle.result(within=10) == {"greeting": "HELLO, ADA!"}
    # (No audit: the dead letter left an out-of-band event on this lifetime.)
    stored = await h.stored(handle.id)
    assert [record_of(r).header.node.id for r in stored] == ["greet", "decide", "shout", "decide"]
    assert {record_of(r).header.tenant_id for r in stored} == {h.tenant}
