"""Guardrails end to end: policies applied over gRPC, enforced by the router on every step.

Each test runs a whole embedded mesh on the session's nats-server for a fresh tenant, with
fake LLM tasks that report tokens and cost the way real model calls would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tests.support.nats_server import new_tenant
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.guardrail import server as guardrail_server
from tickmesh.router.guard import Gate
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.policy.sources import StateRpcUsageSource
from tickmesh.runtime.subjects import HDR_LIFETIME, HDR_MSG_ID, HDR_TENANT, HDR_TYPE, TenantNames
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    LifetimeEvent,
    LifetimeFailedError,
    Plan,
    PlanContext,
    PlanInputView,
    Task,
    TaskContext,
    Worker,
    complete,
    dispatch,
    encode_envelope,
    plan,
    step,
    task,
)
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    graph_pb2,
    guardrail_pb2,
    guardrail_service_pb2,
    guardrail_service_pb2_grpc,
    result_pb2,
    state_service_pb2,
    state_service_pb2_grpc,
)

logger = logging.getLogger(__name__)
Handler = Task[Any, Any] | Plan[Any]
WAIT_S = 15.0
TOKENS_PER_CALL = 400  # 300 in + 100 out
MICROS_PER_CALL = 4_000  # $0.004


# --- harness ------------------------------------------------------------------------------


async def until(check: Callable[[], bool | Awaitable[bool]], *, within: float, what: str) -> None:
    """Poll ``check`` (sync or async) until it holds."""
    deadline = time.monotonic() + within
    while True:
        held = check()
        if not isinstance(held, bool):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.01)


@dataclass
class Guarded:
    """A mesh for one fresh tenant, with the stubs a guardrail test needs."""

    mesh: Mesh
    tenant: str
    client: Client
    nc: NatsClient
    js: JetStreamContext
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    @property
    def md(self) -> tuple[tuple[str, str]]:
        return (("x-tickmesh-tenant", self.tenant),)

    @property
    def names(self) -> TenantNames:
        return TenantNames(self.tenant)

    @property
    def gate(self) -> Gate:
        assert self.mesh.router is not None
        return self.mesh.router.gates[self.tenant]

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(target)
        self.channels.append(channel)
        return channel

    @property
    def guardrail(self) -> guardrail_service_pb2_grpc.GuardrailServiceAsyncStub:
        return guardrail_service_pb2_grpc.GuardrailServiceStub(
            self._channel(self.mesh.guardrail_target)
        )

    @property
    def state(self) -> state_service_pb2_grpc.StateServiceAsyncStub:
        return state_service_pb2_grpc.StateServiceStub(self._channel(self.mesh.state_target))

    async def worker(self, handlers: Sequence[Handler]) -> Worker:
        worker = Worker(self.mesh.pool_target, tenant=self.tenant, tasks=list(handlers))
        self.workers.append(worker)
        await worker.__aenter__()
        async with asyncio.timeout(5):
            await worker.wait_connected()
        return worker

    async def put_policy(
        self, source: str, *, dry_run: bool = False, graph_id: str = ""
    ) -> guardrail_pb2.Policy:
        """Store a policy and wait until the router enforces the snapshot holding it."""
        response = await self.guardrail.PutPolicy(
            guardrail_service_pb2.PutPolicyRequest(
                source=source, dry_run=dry_run, graph_id=graph_id
            ),
            metadata=self.md,
        )
        await self.router_holds(response.policy)
        return response.policy

    async def router_holds(self, policy: guardrail_pb2.Policy, within: float = 2.0) -> None:
        def holds() -> bool:
            snapshot = self.gate.snapshot
            return snapshot is not None and any(
                (p.policy_id, p.version) == (policy.policy_id, policy.version)
                for p in snapshot.policies
            )

        await until(holds, within=within, what=f"the router enforcing {policy.policy_id}")

    async def stored(self, lifetime_id: str) -> list[execution_pb2.ExecutionRef]:
        response = await self.state.ListExecutions(
            state_service_pb2.ListExecutionsRequest(lifetime_id=lifetime_id, page_size=1000),
            metadata=self.md,
        )
        return list(response.executions)

    async def counters(self, lifetime_id: str = "") -> state_service_pb2.GetCountersResponse:
        scope = (
            state_service_pb2.COUNTER_SCOPE_LIFETIME
            if lifetime_id
            else state_service_pb2.COUNTER_SCOPE_TENANT
        )
        response: state_service_pb2.GetCountersResponse = await self.state.GetCounters(
            state_service_pb2.GetCountersRequest(scope=scope, lifetime_id=lifetime_id),
            metadata=self.md,
        )
        return response

    async def events(self, lifetime_id: str) -> list[LifetimeEvent]:
        """Every event of a lifetime that has ended."""
        async with asyncio.timeout(WAIT_S):
            return [e async for e in self.client.watch(lifetime_id)]

    async def wait_event(
        self,
        lifetime_id: str,
        predicate: Callable[[LifetimeEvent], bool],
        *,
        after: int = 0,
        within: float = WAIT_S,
    ) -> LifetimeEvent:
        async with asyncio.timeout(within):
            events = self.client.watch(lifetime_id, after)
            try:
                async for event in events:
                    if predicate(event):
                        return event
            finally:
                await events.aclose()  # type: ignore[attr-defined]
        raise AssertionError(f"lifetime {lifetime_id} ended without the expected event")

    async def wait_drained(self, *streams: str) -> None:
        """Wait until the work-queue streams hold nothing (every message processed)."""
        for stream in streams:

            async def empty(stream: str = stream) -> bool:
                return not (await self.js.stream_info(stream)).state.messages

            await until(empty, within=WAIT_S, what=f"{stream} drained")


Factory = Callable[..., Awaitable[Guarded]]


@pytest.fixture
async def guarded(
    nats_server: EmbeddedNats, tmp_path: Path, mesh_profile: dict[str, str]
) -> AsyncIterator[Factory]:
    """``await guarded(**mesh_config)`` -> a running mesh for a fresh tenant, in each profile."""
    stack = contextlib.AsyncExitStack()
    made: list[Guarded] = []

    async def factory(**config: Any) -> Guarded:
        tenant = new_tenant("gr")
        mesh = Mesh(
            MeshConfig(
                nats_url=nats_server.url,
                tenants=(tenant,),
                data_dir=tmp_path / f"mesh{len(made)}",
                **{**mesh_profile, **config},
            )
        )
        await mesh.start()
        stack.push_async_callback(mesh.stop)
        nc = await tm_nats.connect(nats_server.url, name="guardrail-e2e")
        stack.push_async_callback(nc.close)
        client = await Client.connect(mesh.router_target, tenant=tenant)
        stack.push_async_callback(client.close)
        harness = Guarded(mesh, tenant, client, nc, tm_nats.jetstream(nc))
        made.append(harness)
        return harness

    try:
        yield factory
    finally:
        for harness in made:
            for worker in harness.workers:
                await worker.shutdown(grace=1.0)
            for channel in harness.channels:
                await channel.close()
        await stack.aclose()


# --- graphs and handlers --------------------------------------------------------------


def llm_loop_graph(graph_id: str, *, max_iterations: int = 50) -> graph_pb2.AgentGraph:
    """loop (plan) -> llm (task) -> loop ... until the plan completes."""
    return (
        GraphBuilder(graph_id, max_iterations=max_iterations)
        .plan("loop")
        .task("llm")
        .edge("loop", "llm")
        .edge("llm", "loop")
        .final("loop")
        .build()
    )


def fake_llm(ctx: TaskContext) -> None:
    """Account for one model call: 300 tokens in, 100 out, $0.004."""
    ctx.report(input_tokens=300, output_tokens=100, cost_micros=MICROS_PER_CALL, model="fake-llm")


@plan(name="loop")
async def loop(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    """Call the model ``goal["rounds"]`` times, one after the other."""
    done = ctx.iteration - 1
    if done >= goal["rounds"]:
        return complete({"rounds": done})
    return dispatch(step("llm", {"round": done + 1}))


def guardrail_events(events: Sequence[LifetimeEvent]) -> list[LifetimeEvent]:
    return [e for e in events if e.kind == "guardrail"]


def node_of(ref: execution_pb2.ExecutionRef) -> str:
    record = ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
    return record.header.node.id


def header_of(ref: execution_pb2.ExecutionRef) -> Any:
    record = ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
    return record.header


def telemetry_of(ref: execution_pb2.ExecutionRef) -> Any:
    record = ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
    return record.result.telemetry


def snapshot_expiry(snapshot: guardrail_pb2.PolicySnapshot) -> float:
    return (snapshot.issued_at.ToNanoseconds() + snapshot.lease.ToNanoseconds()) / 1e9


# --- policies -------------------------------------------------------------------------

TOKEN_CAP = """\
policy: token-cap
rules:
  - id: lifetime-token-cap
    scope: lifetime
    when: sum(tokens) > 1000
    action: abort_lifetime
"""

SPEND_CAP = """\
policy: spend
rules:
  - id: daily-tenant-spend
    scope: tenant
    window: 24h
    when: sum(cost_usd) > {limit}
    action: pause_lifetime
"""

NO_EXPENSIVE = """\
policy: no-expensive
rules:
  - id: expensive-step
    scope: execution
    phase: pre_dispatch
    when: node.handler == "expensive" and estimate.cost_usd > 1
    action: reject_execution
"""


# --- tests ----------------------------------------------------------------------------


async def test_a_lifetime_token_cap_aborts_at_exactly_the_step_that_crosses_it(
    guarded: Factory,
) -> None:
    g = await guarded()
    calls: list[int] = []

    @task(name="llm")
    async def llm(ctx: TaskContext, job: dict[str, int]) -> int:
        calls.append(job["round"])
        fake_llm(ctx)
        return job["round"]

    await g.worker([loop, llm])
    policy = await g.put_policy(TOKEN_CAP)
    graph = await g.client.register_graph(llm_loop_graph("token-cap"))

    handle = await g.client.start_lifetime(graph.id, {"rounds": 10}, version=graph.version)
    with pytest.raises(LifetimeFailedError) as ended:
        await handle.result(within=WAIT_S)

    assert ended.value.state == "ABORTED"
    info = await handle.describe()
    assert info.raw.error.type == "guardrail.aborted"
    assert info.input_tokens + info.output_tokens == 3 * TOKENS_PER_CALL
    stored = await g.stored(handle.id)
    tasks = [r for r in stored if node_of(r) == "llm"]
    assert len(tasks) == 3
    assert calls == [1, 2, 3]
    [event] = guardrail_events(await g.events(handle.id))
    decision = event.raw.guardrail
    assert decision.action == guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME
    assert decision.phase == guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT
    assert (decision.policy_id, decision.policy_version) == ("token-cap", policy.version)
    [violation] = decision.violations
    assert violation.rule_id == "lifetime-token-cap"
    assert violation.metric == "sum(tokens)"
    assert (violation.observed, violation.limit) == (1200, 1000)
    # The step that crossed the cap is the third model call.
    assert event.execution_id == tasks[2].task_execution.header.execution_id


async def test_a_tenant_daily_spend_cap_pauses_a_second_lifetime_until_resumed(
    guarded: Factory,
) -> None:
    g = await guarded()
    calls: list[str] = []

    @task(name="llm")
    async def llm(ctx: TaskContext, job: dict[str, int]) -> int:
        calls.append(ctx.lifetime_id)
        fake_llm(ctx)
        return job["round"]

    await g.worker([loop, llm])
    graph = await g.client.register_graph(llm_loop_graph("spend"))

    # The first lifetime spends $0.012 while no cap is in force.
    first = await g.client.start_lifetime(graph.id, {"rounds": 3}, version=graph.version)
    assert await first.result(within=WAIT_S) == {"rounds": 3}
    await g.put_policy(SPEND_CAP.format(limit=0.01))

    # The second is paused at its first result: the tenant's day is already over budget.
    second = await g.client.start_lifetime(graph.id, {"rounds": 2}, version=graph.version)
    paused = await g.wait_event(second.id, lambda e: e.kind == "guardrail")
    decision = paused.raw.guardrail
    assert decision.action == guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME
    [violation] = decision.violations
    assert violation.rule_id == "daily-tenant-spend"
    assert violation.scope == guardrail_pb2.GUARDRAIL_SCOPE_TENANT
    assert violation.observed == pytest.approx(0.012)
    assert violation.limit == pytest.approx(0.01)
    await g.wait_event(second.id, lambda e: e.state == "paused", after=paused.sequence - 1)
    assert (await second.describe()).state == "paused"
    assert second.id not in calls

    # Resumed, it runs its next step, whose result pauses it again (the cap still holds).
    await second.resume("operator override")
    again = await g.wait_event(second.id, lambda e: e.kind == "guardrail", after=paused.sequence)
    assert again.raw.guardrail.action == guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME
    assert again.raw.guardrail.violations[0].observed == pytest.approx(0.016)
    assert calls.count(second.id) == 1
    await g.wait_event(second.id, lambda e: e.state == "paused", after=again.sequence - 1)

    # With the cap raised, resuming lets it finish.
    await g.put_policy(SPEND_CAP.format(limit=1))
    await second.resume("budget raised")
    assert await second.result(within=WAIT_S) == {"rounds": 2}
    assert calls.count(second.id) == 2
    assert (await g.counters()).totals.cost_micros == 5 * MICROS_PER_CALL


async def test_a_pre_dispatch_rule_rejects_the_step_and_the_plan_completes_without_it(
    guarded: Factory,
) -> None:
    g = await guarded()
    ran: list[str] = []
    seen: list[tuple[str, str, str]] = []

    @plan(name="fan")
    async def fan(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return dispatch(step("cheap", 1), step("expensive", 2))

    @task(name="cheap")
    async def cheap(ctx: TaskContext, value: int) -> int:
        ran.append("cheap")
        return value

    @task(name="expensive")
    async def expensive(ctx: TaskContext, value: int) -> int:
        ran.append("expensive")
        return value

    @plan(name="collect")
    async def collect(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        seen.extend((i.node_id, i.status, i.error_type) for i in inputs)
        return complete(sorted(i.output for i in inputs if i.succeeded))

    await g.worker([fan, cheap, expensive, collect])
    await g.put_policy(NO_EXPENSIVE)
    graph = await g.client.register_graph(
        GraphBuilder("fan-out")
        .plan("fan")
        .task("cheap", config={"estimate": {"cost_usd": 0.5}})
        .task("expensive", config={"estimate": {"cost_usd": 2}})
        .plan("collect", join="all")
        .edge("fan", "cheap", "parallel")
        .edge("fan", "expensive", "parallel")
        .edge("cheap", "collect", "join")
        .edge("expensive", "collect", "join")
        .final("collect")
        .build()
    )

    handle = await g.client.start_lifetime(graph.id, {}, version=graph.version)
    assert await handle.result(within=WAIT_S) == [1]

    assert ran == ["cheap"]
    assert sorted(seen) == [
        ("cheap", "succeeded", ""),
        ("expensive", "rejected", "guardrail.rejected"),
    ]
    [record] = [r for r in await g.stored(handle.id) if node_of(r) == "expensive"]
    assert record.task_execution.result.status == result_pb2.TASK_STATUS_REJECTED
    assert record.task_execution.result.error.type == "guardrail.rejected"
    [event] = guardrail_events(await g.events(handle.id))
    decision = event.raw.guardrail
    assert event.node_id == "expensive"
    assert decision.action == guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    assert decision.phase == guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH
    assert decision.violations[0].rule_id == "expensive-step"
    assert decision.violations[0].observed == 2


async def test_redelivered_executions_are_counted_once(guarded: Factory) -> None:
    g = await guarded()
    third_started = asyncio.Event()
    release = asyncio.Event()

    @task(name="llm")
    async def llm(ctx: TaskContext, job: dict[str, int]) -> int:
        if job["round"] == 3:
            third_started.set()
            await release.wait()
        fake_llm(ctx)
        return job["round"]

    await g.worker([loop, llm])
    # A tenant rule makes the router follow the tenant's usage over a window too.
    await g.put_policy(SPEND_CAP.format(limit=100))
    graph = await g.client.register_graph(llm_loop_graph("redelivery"))
    handle = await g.client.start_lifetime(graph.id, {"rounds": 4}, version=graph.version)
    async with asyncio.timeout(WAIT_S):
        await third_started.wait()

    # Mid-run, the first model call's record arrives again, and so does its ref, each
    # under a message id the streams have not seen (so deduplication cannot hide them).
    [first] = [r for r in await g.stored(handle.id) if node_of(r) == "llm"][:1]
    record = first.task_execution
    envelope = envelope_pb2.ExecutionEnvelope(header=record.header, task_execution=record)
    ref = envelope_pb2.ExecutionEnvelope(header=record.header, execution_ref=first)
    headers = {HDR_TENANT: g.tenant, HDR_LIFETIME: handle.id}
    await g.js.publish(
        g.names.exec(handle.id),
        encode_envelope(envelope),
        headers={**headers, HDR_TYPE: "task_execution", HDR_MSG_ID: "again:exec"},
    )
    await g.js.publish(
        g.names.ref(handle.id),
        encode_envelope(ref),
        headers={**headers, HDR_TYPE: "execution_ref", HDR_MSG_ID: "again:ref"},
    )
    await g.wait_drained(g.names.exec_stream, g.names.ref_stream)
    release.set()
    assert await handle.result(within=WAIT_S) == {"rounds": 4}

    stored = await g.stored(handle.id)
    distinct = {(h.execution_id, h.attempt) for h in (header_of(r) for r in stored)}
    assert len(distinct) == len(stored) == 9  # 5 plans, 4 model calls
    tokens = sum(telemetry_of(r).input_tokens + telemetry_of(r).output_tokens for r in stored)
    cost = sum(telemetry_of(r).cost_micros for r in stored)
    assert (tokens, cost) == (4 * TOKENS_PER_CALL, 4 * MICROS_PER_CALL)

    info = await handle.describe()
    assert info.execution_count == len(stored)
    assert info.input_tokens + info.output_tokens == tokens
    for counted in (await g.counters(handle.id), await g.counters()):
        assert counted.executions == len(stored)
        assert counted.totals.input_tokens + counted.totals.output_tokens == tokens
        assert counted.totals.cost_micros == cost
    # The router's own view of the tenant, all time and over the policy's day, and what a
    # router in another process would read over StateService.GetCounters.
    await g.gate.usage.refresh()
    remote = StateRpcUsageSource(g.mesh.state_target)
    try:
        fetched = await remote.fetch(g.tenant, [None, 86_400.0], datetime.now(UTC))
    finally:
        await remote.close()
    for window in (None, 86_400.0):
        for usage in (g.gate.usage.usage(window), fetched.usage[window]):
            assert (usage.executions, usage.input_tokens + usage.output_tokens) == (9, tokens)
            assert usage.cost_micros == cost


async def test_without_the_guardrail_service_routers_enforce_until_the_lease_ends_then_reject(
    guarded: Factory,
) -> None:
    lease_s = 2.0
    g = await guarded(guardrail_lease_s=lease_s)
    started: dict[int, asyncio.Event] = {1: asyncio.Event(), 3: asyncio.Event()}
    release: dict[int, asyncio.Event] = {1: asyncio.Event(), 3: asyncio.Event()}
    decided: list[tuple[int, list[tuple[str, str]]]] = []

    @plan(name="driver")
    async def driver(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        decided.append((ctx.iteration, [(i.node_id, i.status) for i in inputs]))
        if goal.get("quick"):
            return complete("quick") if inputs else dispatch(step("work", 0))
        if ctx.iteration == 2:
            return dispatch(step("expensive", 2))
        if ctx.iteration == 3:
            return dispatch(step("work", 3))
        return dispatch(step("work", 1))

    @task(name="work")
    async def work(ctx: TaskContext, n: int) -> int:
        if n in started:
            started[n].set()
            await release[n].wait()
        return n

    @task(name="expensive")
    async def expensive(ctx: TaskContext, n: int) -> int:
        return n

    await g.worker([driver, work, expensive])
    await g.put_policy(NO_EXPENSIVE)
    graph = await g.client.register_graph(
        GraphBuilder("lease", max_iterations=10)
        .plan("driver")
        .task("work")
        .task("expensive", config={"estimate": {"cost_usd": 5}})
        .edge("driver", "work")
        .edge("driver", "expensive")
        .edge("work", "driver")
        .edge("expensive", "driver")
        .final("driver")
        .build()
    )
    handle = await g.client.start_lifetime(graph.id, {}, version=graph.version)
    async with asyncio.timeout(WAIT_S):
        await started[1].wait()

    guardrail = g.mesh.guardrail
    assert guardrail is not None
    await guardrail.stop()
    held = g.gate.snapshot
    assert held is not None
    expires = snapshot_expiry(held)
    assert expires - time.time() > 0.5

    # Within the lease the last snapshot still decides: its rule rejects the expensive step.
    release[1].set()
    async with asyncio.timeout(WAIT_S):
        await started[3].wait()
    assert time.time() < expires
    rejected = await g.wait_event(handle.id, lambda e: e.kind == "guardrail")
    assert rejected.node_id == "expensive"
    assert rejected.raw.guardrail.reason == ""
    assert rejected.raw.guardrail.violations[0].rule_id == "expensive-step"
    assert decided[-1] == (3, [("expensive", "rejected")])

    # Past the lease, the next step is refused: fail closed.
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.2)
    release[3].set()
    refused = await g.wait_event(
        handle.id, lambda e: e.kind == "guardrail", after=rejected.sequence
    )
    assert refused.node_id == "work"
    assert refused.raw.guardrail.action == guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    assert refused.raw.guardrail.reason == "snapshot_expired"
    with pytest.raises(LifetimeFailedError):
        await handle.result(within=WAIT_S)

    # The service comes back: a fresh snapshot reaches the router and lifetimes run again.
    restarted = await guardrail_server.build(guardrail.settings, nc=guardrail.nc)
    g.mesh.guardrail = restarted
    await restarted.start()
    await until(
        lambda: (s := g.gate.snapshot) is not None and snapshot_expiry(s) > time.time(),
        within=5,
        what="a fresh snapshot",
    )
    quick = await g.client.start_lifetime(graph.id, {"quick": True}, version=graph.version)
    assert await quick.result(within=WAIT_S) == "quick"


async def test_a_policy_applied_mid_run_takes_effect_within_a_second(guarded: Factory) -> None:
    g = await guarded()
    ticks: list[int] = []

    @task(name="llm")
    async def llm(ctx: TaskContext, job: dict[str, int]) -> int:
        ticks.append(job["round"])
        await asyncio.sleep(0.01)
        fake_llm(ctx)
        return job["round"]

    await g.worker([loop, llm])
    await g.put_policy(SPEND_CAP.format(limit=100))  # in force, and not in the way
    graph = await g.client.register_graph(llm_loop_graph("hot-reload", max_iterations=1000))
    handle = await g.client.start_lifetime(graph.id, {"rounds": 900}, version=graph.version)
    await until(lambda: len(ticks) >= 5, within=WAIT_S, what="five model calls")

    applied = time.time()
    response = await g.guardrail.PutPolicy(
        guardrail_service_pb2.PutPolicyRequest(source=TOKEN_CAP), metadata=g.md
    )
    assert response.created
    event = await g.wait_event(handle.id, lambda e: e.kind == "guardrail")
    enforced = event.at.timestamp() - applied
    received = g.gate.watcher.received_at
    assert received is not None
    logger.info(
        "PutPolicy -> router snapshot %.3fs, -> first enforced decision %.3fs",
        received.timestamp() - applied,
        enforced,
    )
    assert event.raw.guardrail.action == guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME
    assert event.raw.guardrail.policy_id == "token-cap"
    assert enforced < 1.0
    # The cap was long exceeded: the first step after the reload ends the lifetime.
    assert event.raw.guardrail.violations[0].observed > 1000
    with pytest.raises(LifetimeFailedError):
        await handle.result(within=WAIT_S)
    assert len(ticks) < 900


@pytest.mark.parametrize("how", ["yaml", "request"])
async def test_a_dry_run_policy_records_what_it_would_do_and_the_lifetime_completes(
    guarded: Factory, how: str
) -> None:
    g = await guarded()

    @task(name="llm")
    async def llm(ctx: TaskContext, job: dict[str, int]) -> int:
        fake_llm(ctx)
        return job["round"]

    await g.worker([loop, llm])
    source = TOKEN_CAP.replace("policy: token-cap\n", "policy: token-cap\ndry_run: true\n")
    if how == "yaml":
        policy = await g.put_policy(source)
    else:
        policy = await g.put_policy(TOKEN_CAP, dry_run=True)
    assert policy.dry_run  # the stored version says so, however it was asked for
    graph = await g.client.register_graph(llm_loop_graph("dry-run"))

    handle = await g.client.start_lifetime(graph.id, {"rounds": 4}, version=graph.version)
    assert await handle.result(within=WAIT_S) == {"rounds": 4}

    events = guardrail_events(await g.events(handle.id))
    assert events, "the dry run recorded nothing"
    first = events[0]
    decision = first.raw.guardrail
    assert decision.dry_run
    assert decision.action == guardrail_pb2.GUARDRAIL_ACTION_ALLOW
    assert first.message == "dry run: would have aborted the lifetime: lifetime-token-cap"
    assert decision.violations[0].observed == 1200
    assert decision.violations[0].message.startswith("dry run: ")
    assert all(e.raw.guardrail.dry_run for e in events)
    info = await handle.describe()
    assert info.state == "completed"
    assert info.input_tokens + info.output_tokens == 4 * TOKENS_PER_CALL
