"""RouterService over gRPC on a real embedded mesh, and its guardrail enforcement on the bus.

Every test gets its own tenant on the session nats-server and its own mesh
(router, guardrail, state, executor pool on loopback ports); workers are real
SDK Workers connected to the mesh's executor pool.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.support.nats_server import new_tenant
from tests.support.service_harness import (
    MeshHarness,
    eventually,
    expect_status,
    is_terminal,
    json_payload,
    kind_name,
    open_mesh,
    tenant_metadata,
)
from tickmesh.router import server as router_server
from tickmesh.router.config import RouterSettings
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.consumer import message_type
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import (
    ConfigError,
    Decision,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    decode_envelope,
    dispatch,
    events_of,
    load_graph_yaml,
    plan,
    step,
    task,
)
from tickmesh.v1 import (
    guardrail_pb2,
    guardrail_service_pb2,
    lifetime_pb2,
    payload_pb2,
    result_pb2,
    router_service_pb2,
    router_service_pb2_grpc,
    state_service_pb2,
)

LS = lifetime_pb2
RS = router_service_pb2

RELAY = """\
graph: relay
entry: work
nodes:
  - {id: work, kind: task, handler: relay_work}
  - {id: finish, kind: plan, handler: relay_finish}
edges:
  - {from: work, to: finish}
  - {from: finish, kind: final}
"""

# The same graph with a timeout on `work`: other content, so another digest.
RELAY_V2 = RELAY.replace("handler: relay_work}", "handler: relay_work, timeout: 5s}")

IDLE = """\
graph: idle
entry: wait
nodes:
  - {id: wait, kind: task, handler: nobody_serves_this}
  - {id: after, kind: plan, handler: nobody_plans_this}
edges:
  - {from: wait, to: after}
  - {from: after, kind: final}
"""

BAD_GRAPH = """\
graph: broken
nodes:
  - id: a
    kind: task
  - id: b
    kind: widget
edges:
  - {from: a, to: b}
"""


@task
async def relay_work(ctx: TaskContext, value: Any) -> Any:
    return value


@plan
async def relay_finish(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    return complete({"echo": inputs[-1].output}, rationale="relayed")


@pytest.fixture
async def harness(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[MeshHarness]:
    async with open_mesh(nats_server.url, tmp_path) as mesh:
        yield mesh


def _state(lifetime: lifetime_pb2.AgentLifetime) -> str:
    return LS.LifetimeState.Name(lifetime.state)


def _states_changed(events: list[lifetime_pb2.LifetimeEvent]) -> list[str]:
    return [
        LS.LifetimeState.Name(e.state)
        for e in events
        if e.kind == LS.LIFETIME_EVENT_KIND_STATE_CHANGED
    ]


# --- tenant credentials -----------------------------------------------------------------


async def test_router_refuses_calls_without_tenant_metadata(harness: MeshHarness) -> None:
    details = await expect_status(
        harness.router.ListGraphs(RS.ListGraphsRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
    assert "x-tickmesh-tenant" in details
    await expect_status(
        harness.router.GetLifetime(RS.GetLifetimeRequest(lifetime_id="x")),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_router_refuses_a_tenant_it_does_not_serve(harness: MeshHarness) -> None:
    stranger = new_tenant("other")
    details = await expect_status(
        harness.router.ListGraphs(RS.ListGraphsRequest(), metadata=tenant_metadata(stranger)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert stranger in details
    await expect_status(
        harness.router.RegisterGraph(
            RS.RegisterGraphRequest(yaml_source=RELAY), metadata=tenant_metadata(stranger)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_router_refuses_a_malformed_tenant_id(harness: MeshHarness) -> None:
    details = await expect_status(
        harness.router.ListGraphs(RS.ListGraphsRequest(), metadata=tenant_metadata("Not.A.Tenant")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "malformed tenant id 'Not.A.Tenant'" in details


# --- graphs -----------------------------------------------------------------------------


async def test_register_graph_rejects_invalid_yaml_naming_line_and_field(
    harness: MeshHarness,
) -> None:
    details = await expect_status(
        harness.router.RegisterGraph(
            RS.RegisterGraphRequest(yaml_source=BAD_GRAPH), metadata=harness.md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    # line 6, column 11 is the value `widget` of nodes[1].kind
    assert "request:6:11 nodes[1].kind:" in details
    assert "widget" in details
    await expect_status(
        harness.router.GetGraph(RS.GetGraphRequest(graph_id="broken"), metadata=harness.md),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_validate_graph_reports_issues_or_the_digest(harness: MeshHarness) -> None:
    bad = await harness.router.ValidateGraph(
        RS.ValidateGraphRequest(yaml_source=BAD_GRAPH), metadata=harness.md
    )
    assert not bad.valid
    assert bad.digest == ""
    [issue] = bad.issues
    assert (issue.source, issue.line, issue.column, issue.field) == (
        "request",
        6,
        11,
        "nodes[1].kind",
    )
    assert "widget" in issue.message

    good = await harness.router.ValidateGraph(
        RS.ValidateGraphRequest(yaml_source=RELAY), metadata=harness.md
    )
    assert good.valid
    assert not good.issues
    assert good.digest == load_graph_yaml(RELAY).digest
    # Validating stores nothing.
    listed = await harness.router.ListGraphs(RS.ListGraphsRequest(), metadata=harness.md)
    assert not listed.graphs


async def test_register_graph_versions_by_content(harness: MeshHarness) -> None:
    first = await harness.router.RegisterGraph(
        RS.RegisterGraphRequest(yaml_source=RELAY), metadata=harness.md
    )
    again = await harness.router.RegisterGraph(
        RS.RegisterGraphRequest(yaml_source=RELAY), metadata=harness.md
    )
    assert (first.graph.version, first.created) == (1, True)
    assert (again.graph.version, again.created) == (1, False)
    assert again.graph.digest == first.graph.digest

    changed = await harness.router.RegisterGraph(
        RS.RegisterGraphRequest(yaml_source=RELAY_V2), metadata=harness.md
    )
    assert (changed.graph.version, changed.created) == (2, True)
    assert changed.graph.digest != first.graph.digest


async def test_get_graph_returns_the_newest_for_version_zero(harness: MeshHarness) -> None:
    await harness.register(RELAY)
    v2 = await harness.register(RELAY_V2)
    assert v2.version == 2

    newest = await harness.router.GetGraph(
        RS.GetGraphRequest(graph_id="relay", version=0), metadata=harness.md
    )
    assert newest.graph == v2
    v1 = await harness.router.GetGraph(
        RS.GetGraphRequest(graph_id="relay", version=1), metadata=harness.md
    )
    assert v1.graph.version == 1
    assert v1.graph.digest == load_graph_yaml(RELAY).digest

    details = await expect_status(
        harness.router.GetGraph(RS.GetGraphRequest(graph_id="nope"), metadata=harness.md),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "nope" in details
    await expect_status(
        harness.router.GetGraph(
            RS.GetGraphRequest(graph_id="relay", version=3), metadata=harness.md
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_list_graphs_pages_through_the_newest_versions(harness: MeshHarness) -> None:
    for graph_id in ("gamma", "alpha", "beta"):
        await harness.register(RELAY.replace("graph: relay", f"graph: {graph_id}"))
    await harness.register(RELAY_V2.replace("graph: relay", "graph: beta"))

    first = await harness.router.ListGraphs(RS.ListGraphsRequest(page_size=2), metadata=harness.md)
    assert [(g.id, g.version) for g in first.graphs] == [("alpha", 1), ("beta", 2)]
    assert first.next_page_token
    second = await harness.router.ListGraphs(
        RS.ListGraphsRequest(page_size=2, page_token=first.next_page_token), metadata=harness.md
    )
    assert [(g.id, g.version) for g in second.graphs] == [("gamma", 1)]
    assert second.next_page_token == ""

    everything = await harness.router.ListGraphs(RS.ListGraphsRequest(), metadata=harness.md)
    assert [g.id for g in everything.graphs] == ["alpha", "beta", "gamma"]
    assert everything.next_page_token == ""


# --- starting and reading lifetimes -----------------------------------------------------


async def test_start_lifetime_is_idempotent_by_client_request_id(harness: MeshHarness) -> None:
    await harness.start_worker([relay_work, relay_finish])
    await harness.register(RELAY)
    request = RS.StartLifetimeRequest(
        graph_id="relay", input=json_payload({"n": 1}), client_request_id="order-42"
    )
    first = await harness.router.StartLifetime(request, metadata=harness.md)
    second = await harness.router.StartLifetime(request, metadata=harness.md)
    assert first.created
    assert not second.created
    assert second.lifetime.lifetime_id == first.lifetime.lifetime_id
    assert first.lifetime.client_request_id == "order-42"

    events = await harness.events(first.lifetime.lifetime_id)
    assert [kind_name(e) for e in events].count("started") == 1
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert _states_changed(events) == ["LIFETIME_STATE_COMPLETED"]
    # Another request id starts another lifetime.
    other = await harness.router.StartLifetime(
        RS.StartLifetimeRequest(graph_id="relay", client_request_id="order-43"),
        metadata=harness.md,
    )
    assert other.created
    assert other.lifetime.lifetime_id != first.lifetime.lifetime_id


async def test_start_lifetime_of_an_unknown_graph_is_not_found(harness: MeshHarness) -> None:
    details = await expect_status(
        harness.router.StartLifetime(
            RS.StartLifetimeRequest(graph_id="ghost"), metadata=harness.md
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "ghost" in details
    await harness.register(RELAY)
    await expect_status(
        harness.router.StartLifetime(
            RS.StartLifetimeRequest(graph_id="relay", graph_version=7), metadata=harness.md
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_start_lifetime_refuses_inline_input_over_256_kib(harness: MeshHarness) -> None:
    await harness.register(RELAY)
    big = payload_pb2.Payload(
        content_type="application/octet-stream", inline=b"x" * (256 * 1024 + 1)
    )
    details = await expect_status(
        harness.router.StartLifetime(
            RS.StartLifetimeRequest(graph_id="relay", input=big), metadata=harness.md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "PutBlob" in details
    assert str(256 * 1024 + 1) in details
    # Exactly at the limit is fine.
    at_limit = payload_pb2.Payload(
        content_type="application/octet-stream", inline=b"x" * 256 * 1024
    )
    started = await harness.router.StartLifetime(
        RS.StartLifetimeRequest(graph_id="relay", input=at_limit), metadata=harness.md
    )
    assert started.created


async def test_get_lifetime_of_an_unknown_id_is_not_found(harness: MeshHarness) -> None:
    details = await expect_status(
        harness.router.GetLifetime(
            RS.GetLifetimeRequest(lifetime_id="01900000-0000-7000-8000-000000000000"),
            metadata=harness.md,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "01900000-0000-7000-8000-000000000000" in details
    await expect_status(
        harness.router.PauseLifetime(
            RS.PauseLifetimeRequest(lifetime_id="nope"), metadata=harness.md
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_status(
        harness.router.WatchLifetime(
            RS.WatchLifetimeRequest(lifetime_id="nope"), metadata=harness.md
        ).read(),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_list_lifetimes_pages_newest_first_and_filters_by_state(
    harness: MeshHarness,
) -> None:
    await harness.register(IDLE)
    await harness.register(RELAY)
    ids = [(await harness.start("idle")).lifetime_id for _ in range(3)]
    relay = (await harness.start("relay")).lifetime_id  # nobody serves it either
    for lifetime_id in (ids[0], ids[2]):
        await harness.router.AbortLifetime(
            RS.AbortLifetimeRequest(lifetime_id=lifetime_id, reason="test"), metadata=harness.md
        )
    newest_first = [relay, *reversed(ids)]

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await harness.router.ListLifetimes(
            RS.ListLifetimesRequest(page_size=3, page_token=token), metadata=harness.md
        )
        pages += 1
        seen.extend(lt.lifetime_id for lt in page.lifetimes)
        token = page.next_page_token
        if not token:
            break
    assert seen == newest_first
    assert pages == 2

    aborted: list[str] = []
    token = ""
    while True:
        page = await harness.router.ListLifetimes(
            RS.ListLifetimesRequest(
                page_size=1, page_token=token, states=[LS.LIFETIME_STATE_ABORTED]
            ),
            metadata=harness.md,
        )
        assert all(lt.state == LS.LIFETIME_STATE_ABORTED for lt in page.lifetimes)
        aborted.extend(lt.lifetime_id for lt in page.lifetimes)
        token = page.next_page_token
        if not token:
            break
    assert aborted == [ids[2], ids[0]]

    running = await harness.router.ListLifetimes(
        RS.ListLifetimesRequest(states=[LS.LIFETIME_STATE_RUNNING], graph_id="idle"),
        metadata=harness.md,
    )
    assert [lt.lifetime_id for lt in running.lifetimes] == [ids[1]]
    assert running.next_page_token == ""


async def test_watch_lifetime_resumes_after_a_sequence_and_ends_after_the_terminal_event(
    harness: MeshHarness,
) -> None:
    await harness.start_worker([relay_work, relay_finish])
    await harness.register(RELAY)
    lifetime = await harness.start("relay", {"hi": 1})

    everything = await harness.events(lifetime.lifetime_id)
    assert [e.sequence for e in everything] == list(range(1, len(everything) + 1))
    assert [kind_name(e) for e in everything] == [
        "started",
        "step_dispatched",
        "step_finished",
        "step_dispatched",
        "step_finished",
        "state_changed",
    ]
    assert is_terminal(everything[-1])
    assert json.loads(everything[-1].output.inline) == {"echo": {"hi": 1}}

    resumed = await harness.events(lifetime.lifetime_id, after_sequence=3)
    assert resumed == everything[3:]
    last = await harness.events(lifetime.lifetime_id, after_sequence=len(everything) - 1)
    assert last == everything[-1:]


async def test_watch_lifetime_resumed_after_the_terminal_event_ends_at_once(
    harness: MeshHarness,
) -> None:
    """A watcher that saw the terminal event but not the end of the stream reconnects."""
    await harness.start_worker([relay_work, relay_finish])
    await harness.register(RELAY)
    lifetime = await harness.start("relay", {"hi": 1})
    everything = await harness.events(lifetime.lifetime_id)
    assert is_terminal(everything[-1])

    resumed = await harness.events(
        lifetime.lifetime_id, after_sequence=everything[-1].sequence, within=2.0
    )
    assert resumed == []


# --- steering ---------------------------------------------------------------------------


async def test_pause_resume_and_abort_are_idempotent(harness: MeshHarness) -> None:
    await harness.register(IDLE)
    lifetime = await harness.start("idle")
    lid = lifetime.lifetime_id

    paused = await harness.router.PauseLifetime(
        RS.PauseLifetimeRequest(lifetime_id=lid, reason="lunch"), metadata=harness.md
    )
    paused_again = await harness.router.PauseLifetime(
        RS.PauseLifetimeRequest(lifetime_id=lid, reason="lunch"), metadata=harness.md
    )
    assert _state(paused.lifetime) == _state(paused_again.lifetime) == "LIFETIME_STATE_PAUSED"
    assert paused_again.lifetime.last_sequence == paused.lifetime.last_sequence

    resumed = await harness.router.ResumeLifetime(
        RS.ResumeLifetimeRequest(lifetime_id=lid), metadata=harness.md
    )
    resumed_again = await harness.router.ResumeLifetime(
        RS.ResumeLifetimeRequest(lifetime_id=lid), metadata=harness.md
    )
    assert _state(resumed.lifetime) == _state(resumed_again.lifetime) == "LIFETIME_STATE_RUNNING"
    assert resumed.lifetime.last_sequence == paused.lifetime.last_sequence + 1
    assert resumed_again.lifetime.last_sequence == resumed.lifetime.last_sequence

    aborted = await harness.router.AbortLifetime(
        RS.AbortLifetimeRequest(lifetime_id=lid, reason="enough"), metadata=harness.md
    )
    aborted_again = await harness.router.AbortLifetime(
        RS.AbortLifetimeRequest(lifetime_id=lid, reason="enough"), metadata=harness.md
    )
    assert _state(aborted.lifetime) == _state(aborted_again.lifetime) == "LIFETIME_STATE_ABORTED"
    assert aborted_again.lifetime.last_sequence == aborted.lifetime.last_sequence
    assert aborted.lifetime.error.message == "aborted: enough"
    # Pausing or resuming an ended lifetime changes nothing either.
    after = await harness.router.PauseLifetime(
        RS.PauseLifetimeRequest(lifetime_id=lid), metadata=harness.md
    )
    assert after.lifetime.last_sequence == aborted.lifetime.last_sequence

    events = await harness.events(lid)
    assert _states_changed(events) == [
        "LIFETIME_STATE_PAUSED",
        "LIFETIME_STATE_RUNNING",
        "LIFETIME_STATE_ABORTED",
    ]
    assert events[-1].sequence == aborted.lifetime.last_sequence
    assert (await harness.lifetime(lid)).last_sequence == aborted.lifetime.last_sequence


async def test_signal_to_a_lifetime_that_is_not_waiting_fails_precondition(
    harness: MeshHarness,
) -> None:
    await harness.register(IDLE)
    lifetime = await harness.start("idle")
    signal = lifetime_pb2.Signal(signal_id="s1", name="approve", payload=json_payload(True))
    details = await expect_status(
        harness.router.SignalLifetime(
            RS.SignalLifetimeRequest(lifetime_id=lifetime.lifetime_id, signal=signal),
            metadata=harness.md,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "not waiting for a signal" in details
    assert (await harness.lifetime(lifetime.lifetime_id)).last_sequence == lifetime.last_sequence
    await expect_status(
        harness.router.SignalLifetime(
            RS.SignalLifetimeRequest(
                lifetime_id=lifetime.lifetime_id, signal=lifetime_pb2.Signal()
            ),
            metadata=harness.md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_fork_and_replay_of_an_unknown_lifetime_are_not_found(
    harness: MeshHarness,
) -> None:
    await expect_status(
        harness.router.ForkLifetime(
            RS.ForkLifetimeRequest(lifetime_id="x", execution_id="y"), metadata=harness.md
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_status(
        harness.router.ReplayLifetime(
            RS.ReplayLifetimeRequest(lifetime_id="x"), metadata=harness.md
        ),
        grpc.StatusCode.NOT_FOUND,
    )


# --- the server -------------------------------------------------------------------------


async def test_a_second_router_on_the_same_port_fails_to_bind(harness: MeshHarness) -> None:
    settings = RouterSettings(
        nats_url=harness.mesh.nats_url,
        tenants=[harness.tenant],
        grpc_listen=harness.mesh.router_target,
        log_json=False,
    )
    with pytest.raises(
        ConfigError, match=f"cannot bind gRPC server to {harness.mesh.router_target}"
    ):
        await router_server.build(settings, nc=harness.nc)
    # The first router still answers.
    listed = await harness.router.ListGraphs(RS.ListGraphsRequest(), metadata=harness.md)
    assert listed.next_page_token == ""


async def _health(target: str, service: str) -> int:
    """The standard health service's answer for ``service`` (its stub is untyped)."""
    async with grpc.aio.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response: health_pb2.HealthCheckResponse = await check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return response.status


async def test_health_reports_serving_after_start(harness: MeshHarness) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await _health(harness.mesh.router_target, "") == serving
    assert await _health(harness.mesh.router_target, "tickmesh.v1.RouterService") == serving
    assert await _health(harness.mesh.state_target, "tickmesh.v1.StateService") == serving
    assert await _health(harness.mesh.guardrail_target, "tickmesh.v1.GuardrailService") == serving
    await expect_status(
        _health(harness.mesh.router_target, "tickmesh.v1.NoSuchService"),
        grpc.StatusCode.NOT_FOUND,
    )


# --- guardrails enforced by the router ----------------------------------------------------

SPEND = """\
graph: spend
entry: spend
max_iterations: 10
nodes:
  - {id: spend, kind: task, handler: spend_tokens}
  - {id: again, kind: plan, handler: spend_again}
edges:
  - {from: spend, to: again}
  - {from: again, to: spend}
  - {from: again, kind: final}
"""

TOKEN_CAP = """\
policy: token-cap
rules:
  - id: lifetime-token-cap
    scope: lifetime
    when: sum(tokens) > 100
    action: abort_lifetime
"""

COSTLY = """\
graph: costly
entry: choose
nodes:
  - {id: choose, kind: plan, handler: costly_choose}
  - {id: expensive, kind: task, handler: expensive}
edges:
  - {from: choose, to: expensive}
  - {from: expensive, to: choose}
  - {from: choose, kind: final}
"""

NO_EXPENSIVE = """\
policy: no-expensive
rules:
  - id: block-expensive
    scope: execution
    phase: pre_dispatch
    when: node.handler == "expensive"
    action: reject_execution
"""


async def _put_policy(harness: MeshHarness, source: str) -> guardrail_pb2.Policy:
    response = await harness.guardrail.PutPolicy(
        guardrail_service_pb2.PutPolicyRequest(source=source), metadata=harness.md
    )
    return response.policy


async def _router_has_revision(harness: MeshHarness, revision: int) -> None:
    """Wait until the router's policy watcher holds a snapshot of at least ``revision``."""
    router = harness.mesh.router
    assert router is not None
    watcher = router.watchers[0]

    async def probe() -> bool:
        return watcher.snapshot is not None and watcher.snapshot.revision >= revision

    try:
        await eventually(probe, within=2.0)
    except pytest.fail.Exception:
        held = watcher.snapshot
        summary = (
            "none"
            if held is None
            else f"revision {held.revision} with policies {[p.policy_id for p in held.policies]}"
        )
        pytest.fail(
            f"the router never received a snapshot of revision {revision} (it holds: {summary})"
        )


async def test_guardrail_aborts_the_lifetime_at_the_task_that_crosses_the_token_cap(
    harness: MeshHarness,
) -> None:
    runs: list[int] = []

    @task
    async def spend_tokens(ctx: TaskContext, value: Any) -> int:
        runs.append(ctx.iteration)
        ctx.report(input_tokens=60)
        return len(runs)

    @plan
    async def spend_again(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return dispatch(step("spend", inputs[-1].output))

    policy = await _put_policy(harness, TOKEN_CAP)
    await _router_has_revision(harness, policy.version)
    await harness.start_worker([spend_tokens, spend_again])
    await harness.register(SPEND)
    lifetime = await harness.start("spend")

    events = await harness.events(lifetime.lifetime_id)
    assert len(runs) == 2
    [guard] = [e for e in events if e.kind == LS.LIFETIME_EVENT_KIND_GUARDRAIL]
    decision = guard.guardrail
    assert decision.action == guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME
    assert decision.phase == guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT
    assert (decision.policy_id, decision.policy_version) == ("token-cap", 1)
    [violation] = decision.violations
    assert violation.rule_id == "lifetime-token-cap"
    assert violation.scope == guardrail_pb2.GUARDRAIL_SCOPE_LIFETIME
    assert (violation.observed, violation.limit) == (120.0, 100.0)
    assert guard.node.id == "spend"
    finished = [e for e in events if e.kind == LS.LIFETIME_EVENT_KIND_STEP_FINISHED]
    assert [e.node.id for e in finished] == ["spend", "again", "spend"]
    assert guard.execution_id == finished[-1].execution_id
    assert _states_changed(events) == ["LIFETIME_STATE_ABORTED"]
    assert events[-1].sequence == guard.sequence + 1

    final = await harness.lifetime(lifetime.lifetime_id)
    assert _state(final) == "LIFETIME_STATE_ABORTED"
    assert final.error.type == "guardrail.aborted"
    assert "lifetime-token-cap" in final.error.message
    assert final.totals.input_tokens == 120
    assert final.execution_count == 3


async def test_a_pre_dispatch_rule_rejects_the_step_and_the_plan_sees_it(
    harness: MeshHarness,
) -> None:
    calls: list[str] = []

    @task
    async def expensive(ctx: TaskContext, value: Any) -> str:
        calls.append("ran")
        return "should not run"

    @plan
    async def costly_choose(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if not inputs:
            return dispatch(step("expensive", {"budget": "big"}))
        seen = inputs[-1]
        return complete({"status": seen.status, "error": seen.error_type})

    policy = await _put_policy(harness, NO_EXPENSIVE)
    await _router_has_revision(harness, policy.version)
    await harness.start_worker([expensive, costly_choose])
    await harness.register(COSTLY)
    lifetime = await harness.start("costly")

    events = await harness.events(lifetime.lifetime_id)
    assert calls == []
    assert _states_changed(events) == ["LIFETIME_STATE_COMPLETED"]
    assert json.loads(events[-1].output.inline) == {
        "status": "rejected",
        "error": "guardrail.rejected",
    }
    [guard] = [e for e in events if e.kind == LS.LIFETIME_EVENT_KIND_GUARDRAIL]
    assert guard.guardrail.action == guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    assert guard.guardrail.phase == guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH
    assert [v.rule_id for v in guard.guardrail.violations] == ["block-expensive"]
    assert guard.node.handler == "expensive"

    stored = await harness.state.GetExecution(
        state_service_pb2.GetExecutionRequest(execution_id=guard.execution_id),
        metadata=harness.md,
    )
    record = stored.execution.task_execution
    assert record.header.node.id == "expensive"
    assert record.result.status == result_pb2.TASK_STATUS_REJECTED
    assert record.result.error.type == "guardrail.rejected"
    assert not record.result.error.retryable


async def test_a_router_without_a_policy_snapshot_rejects_the_first_step(
    nats_server: EmbeddedNats,
) -> None:
    """Fail closed: a tenant whose policy bucket never got a snapshot (no guardrail ran)."""
    tenant = new_tenant()
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    settings = RouterSettings(
        nats_url=nats_server.url, tenants=[tenant], grpc_listen="127.0.0.1:0", log_json=False
    )
    service = await router_server.build(settings, nc=nc)
    await service.start()
    md = tenant_metadata(tenant)
    # This router has no state service to read a history from: its events are heard live.
    live = await nc.subscribe(TenantNames(tenant).evt_all)
    events: list[lifetime_pb2.LifetimeEvent] = []
    try:
        async with grpc.aio.insecure_channel(service.target) as channel:
            router = router_service_pb2_grpc.RouterServiceStub(channel)
            await router.RegisterGraph(RS.RegisterGraphRequest(yaml_source=IDLE), metadata=md)
            await router.StartLifetime(RS.StartLifetimeRequest(graph_id="idle"), metadata=md)
            async with asyncio.timeout(3):
                while not events or events[-1].kind != LS.LIFETIME_EVENT_KIND_GUARDRAIL:
                    msg = await live.next_msg(timeout=3)
                    events += events_of(decode_envelope(msg.data, expected_kind=message_type(msg)))
    finally:
        await live.unsubscribe()
        await service.stop()
        await nc.close()
    assert [kind_name(e) for e in events] == ["started", "step_dispatched", "guardrail"]
    guard = events[-1]
    assert guard.node.id == "wait"
    assert guard.execution_id == events[1].execution_id
    assert guard.guardrail.action == guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    assert guard.guardrail.reason == "snapshot_missing"


async def test_a_deleted_policy_snapshot_rejects_steps_as_snapshot_missing(
    harness: MeshHarness,
) -> None:
    """Fail closed: the guardrail service is gone and the snapshot key was deleted."""
    guardrail = harness.mesh.guardrail
    router = harness.mesh.router
    assert guardrail is not None
    assert router is not None
    await guardrail.stop()
    watcher = router.watchers[0]
    before = watcher.snapshot
    assert before is not None
    kv = await harness.js.key_value(harness.names.policy_bucket)
    await kv.delete("snapshot")

    async def changed() -> bool:
        return watcher.snapshot is not before

    await eventually(changed, within=2.0, what="the router noticing the deleted snapshot")
    await harness.register(IDLE)
    lifetime = await harness.start("idle")
    events = await harness.events_until(lifetime.lifetime_id, LS.LIFETIME_EVENT_KIND_GUARDRAIL)
    guard = events[-1]
    assert guard.node.id == "wait"
    assert guard.guardrail.action == guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    assert guard.guardrail.reason == "snapshot_missing"


DRIP = """\
graph: drip
entry: tick
max_iterations: 200
nodes:
  - {id: tick, kind: task, handler: drip_tick}
  - {id: loop, kind: plan, handler: drip_loop}
edges:
  - {from: tick, to: loop}
  - {from: loop, to: tick}
  - {from: loop, kind: final}
"""

NO_DRIP = """\
policy: no-drip
rules:
  - id: stop-ticking
    scope: execution
    phase: pre_dispatch
    when: node.handler == "drip_tick"
    action: reject_execution
"""


async def test_a_policy_put_mid_run_takes_effect_within_a_second(harness: MeshHarness) -> None:
    ticks: list[float] = []
    warmed_up = asyncio.Event()
    put_at: list[float] = []  # monotonic time of the PutPolicy call, once made

    @task
    async def drip_tick(ctx: TaskContext, value: Any) -> int:
        ticks.append(time.monotonic())
        if len(ticks) >= 3:
            warmed_up.set()
        await asyncio.sleep(0.01)
        return len(ticks)

    @plan
    async def drip_loop(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if inputs[-1].status == "rejected":
            return complete({"rejected": True})
        if put_at and time.monotonic() - put_at[0] > 1.5:
            return complete({"rejected": False})  # give up well after the promised second
        return dispatch(step("tick"))

    await harness.start_worker([drip_tick, drip_loop])
    await harness.register(DRIP)
    lifetime = await harness.start("drip")
    async with asyncio.timeout(3):
        await warmed_up.wait()

    put_wall = datetime.now(UTC)
    put_at.append(time.monotonic())
    await _put_policy(harness, NO_DRIP)
    events = await harness.events(lifetime.lifetime_id)

    assert _states_changed(events) == ["LIFETIME_STATE_COMPLETED"], events[-1].message
    guards = [e for e in events if e.kind == LS.LIFETIME_EVENT_KIND_GUARDRAIL]
    assert guards, f"the policy was still not enforced 1.5 s later ({len(ticks)} ticks ran)"
    [guard] = guards
    assert json.loads(events[-1].output.inline) == {"rejected": True}
    assert [v.rule_id for v in guard.guardrail.violations] == ["stop-ticking"]
    delay = (guard.at.ToDatetime(tzinfo=UTC) - put_wall).total_seconds()
    assert 0 <= delay < 1.0, delay
    # Every tick dispatched before the rejection ran; the rejected one did not.
    dispatched = [
        e
        for e in events
        if e.kind == LS.LIFETIME_EVENT_KIND_STEP_DISPATCHED and e.node.id == "tick"
    ]
    assert len(ticks) == len(dispatched) - 1 >= 3
