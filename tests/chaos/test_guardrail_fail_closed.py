"""8 ★ Guardrail failure: the router fails closed (RELIABILITY.md §4.2).

Routers do not call the guardrail service per step: they evaluate, in process, the
policy snapshot it publishes to the tenant's KV bucket under a lease. What a guardrail
failure means for dispatch is therefore "no fresh snapshot". tests/e2e/test_guardrails.py
already covers the service *stopped* (the last snapshot enforced until its lease ends,
then ``snapshot_expired``). Added here:

- the service alive but **partitioned** from NATS (its connection blackholed by the fault
  proxy): steps past the lease are refused with ``snapshot_expired`` and never reach an
  executor; once the partition heals, a fresh snapshot arrives and new steps dispatch,
  each exactly once (audited);
- a policy the engine **cannot evaluate** (a rule dividing by zero at run time): the step
  is rejected with ``evaluation_error: … division by zero``, never allowed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tests.chaos import report
from tests.chaos.proxy import FaultProxy
from tests.support.audit import record_of, task_status
from tests.support.mesh import MeshHarness, start_mesh
from tests.support.nats_server import nats_server
from tickmesh.guardrail import server as guardrail_server
from tickmesh.router.guard import Gate
from tickmesh.runtime import nats as tm_nats
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    LifetimeFailedError,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    dispatch,
    plan,
    step,
    task,
)
from tickmesh.v1 import guardrail_pb2, guardrail_service_pb2, guardrail_service_pb2_grpc

__all__ = ["nats_server", "start_mesh"]  # fixtures used by these tests

LEASE_S = 1.5
WAIT_S = 20.0

ALWAYS_ON = """\
policy: always-on
rules:
  - id: huge-step
    scope: execution
    phase: pre_dispatch
    when: estimate.cost_usd > 1000
    action: reject_execution
"""

UNEVALUABLE = """\
policy: unevaluable
rules:
  - id: cost-per-token
    scope: execution
    phase: pre_dispatch
    when: node.handler == "work" and estimate.cost_usd / estimate.tokens > 1
    action: reject_execution
"""


@pytest.fixture
def mesh_profile() -> dict[str, str]:
    """The embedded profile only: the fault is in the guardrail, not the stores."""
    return {}


async def until(check: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.01)


def gate(h: MeshHarness) -> Gate:
    assert h.mesh.router is not None
    return h.mesh.router.gates[h.tenant]


def fresh(h: MeshHarness) -> bool:
    snapshot = gate(h).snapshot
    if snapshot is None:
        return False
    expires = snapshot.issued_at.ToNanoseconds() + snapshot.lease.ToNanoseconds()
    return expires / 1e9 > time.time()


async def put_policy(h: MeshHarness, source: str) -> guardrail_pb2.Policy:
    """Store a policy and wait until the router enforces a snapshot holding it."""
    async with grpc.aio.insecure_channel(h.mesh.guardrail_target) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        response = await stub.PutPolicy(
            guardrail_service_pb2.PutPolicyRequest(source=source),
            metadata=(("x-tickmesh-tenant", h.tenant),),
        )
    policy: guardrail_pb2.Policy = response.policy

    def holds() -> bool:
        snapshot = gate(h).snapshot
        return snapshot is not None and any(
            (p.policy_id, p.version) == (policy.policy_id, policy.version)
            for p in snapshot.policies
        )

    await until(holds, within=5, what=f"the router enforcing {policy.policy_id}")
    return policy


ran: Counter[str] = Counter()
"""Handler runs, by execution id: an execution id run twice is a double dispatch."""


@plan(name="driver")
async def driver(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    if inputs:
        return complete([(i.node_id, i.status, i.error_type) for i in inputs])
    return dispatch(step("work", goal))


@task(name="work")
async def work(ctx: TaskContext, n: int) -> int:
    ran[ctx.execution_id] += 1
    return n


GRAPH = (
    GraphBuilder("fail-closed")
    .plan("driver")
    .task("work", config={"estimate": {"cost_usd": 2}})
    .edge("driver", "work")
    .edge("work", "driver")
    .final("driver")
    .build()
)


async def test_a_partitioned_guardrail_fails_closed_then_dispatches_exactly_once(
    start_mesh: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    h: MeshHarness = await start_mesh(guardrail_lease_s=LEASE_S)
    await h.worker([driver, work])
    graph = await h.register(GRAPH)
    await put_policy(h, ALWAYS_ON)

    # The guardrail service again, now with its NATS link through the fault proxy.
    old = h.mesh.guardrail
    assert old is not None
    await old.stop()
    host, port = h.mesh.nats_url.removeprefix("nats://").rsplit(":", 1)
    async with FaultProxy(host, int(port)) as proxy:
        nc = await tm_nats.connect(f"nats://127.0.0.1:{proxy.port}", name="guardrail-proxied")
        try:
            guardrail = await guardrail_server.build(old.settings, nc=nc)
            h.mesh.guardrail = guardrail
            await guardrail.start()
            ok = await h.start(graph, 1)
            assert await ok.result(within=WAIT_S) == [["work", "succeeded", ""]]

            proxy.set("blackhole")
            partitioned_at = time.monotonic()
            await until(lambda: not fresh(h), within=LEASE_S * 3, what="the lease ending")
            lease_ended_s = time.monotonic() - partitioned_at
            assert guardrail.grpc is not None  # alive, just cut off

            # Past the lease, the lifetime's first step is refused: nothing dispatched.
            before = sum(ran.values())
            refused = await h.start(graph, 2)
            with pytest.raises(LifetimeFailedError) as failed:
                await refused.result(within=WAIT_S)
            refusal = await h.audit(refused.id, settle_s=2.0)
            [event] = refusal.events_of("guardrail")
            assert event.raw.guardrail.action == guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
            assert event.raw.guardrail.reason == "snapshot_expired"
            # "Decided, then refused": the history holds the step once, and its record is
            # the router's rejection; no executor ran anything.
            [record] = refusal.records
            assert record.plan_execution.result.fail.error.type == "guardrail.rejected"
            assert refusal.dispatched == 1
            assert refusal.redispatched == []
            assert "snapshot_expired" in failed.value.detail
            assert sum(ran.values()) == before
            assert refusal.problems == []

            # The partition heals: a fresh snapshot, and steps flow again.
            proxy.reset_all()  # the held link is dead; the client reconnects through pass
            proxy.set("pass")
            healed_at = time.monotonic()
            await until(lambda: fresh(h), within=10, what="a fresh snapshot")
            snapshot_back_s = time.monotonic() - healed_at
            # A refresh round must not wait out a put stuck in the dead link (10 s).
            assert snapshot_back_s < 3.0
            after = [await h.start(graph, 10 + i) for i in range(3)]
            for i, handle in enumerate(after):
                assert await handle.result(within=WAIT_S) == [["work", "succeeded", ""]], i
            first_dispatch_s = time.monotonic() - healed_at
            audits = [await h.audit(handle.id, settle_s=2.0) for handle in after]
        finally:
            await nc.close()

    for audit in audits:
        assert audit.problems == [], audit.summary()
        assert audit.redispatched == []
        assert audit.duplicates == []
        assert audit.stored == audit.dispatched == 3  # driver, work, driver
        for ref in audit.of_node("work"):
            assert ran[record_of(ref).header.execution_id] == 1
    with capsys.disabled():
        print(  # noqa: T201 - the figures this test measures
            f"\n[8] guardrail partitioned: lease {LEASE_S} s ended {lease_ended_s:.2f} s after the"
            f" cut; refused with {event.raw.guardrail.reason!r} ({failed.value.state}); healed: "
            f"fresh snapshot in {snapshot_back_s:.2f} s, 3 lifetimes done in "
            f"{first_dispatch_s:.2f} s, every step run once"
        )
    report.record(
        report.Row(
            test="8 guardrail fail closed",
            fault=f"guardrail NATS link blackholed past its {LEASE_S:g} s lease",
            attempted=4,  # lifetimes started: 1 refused, 3 after healing
            acked=3,
            persisted=sum(a.stored for a in audits),
            lost=sum(len(a.lost) for a in audits),
            duplicated=sum(len(a.duplicates) + len(a.redispatched) for a in audits),
            recovery_s=snapshot_back_s,
        )
    )


async def test_a_policy_the_engine_cannot_evaluate_rejects_the_step(
    start_mesh: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    h: MeshHarness = await start_mesh()
    await h.worker([driver, work])
    graph = await h.register(GRAPH)
    await put_policy(h, UNEVALUABLE)
    before = sum(ran.values())

    handle = await h.start(graph, 1)
    outputs = await handle.result(within=WAIT_S)
    # The plan was told its step was rejected; the step never ran.
    assert outputs == [["work", "rejected", "guardrail.rejected"]]
    assert sum(ran.values()) == before
    audit = await h.audit(handle.id, settle_s=2.0)
    [event] = audit.events_of("guardrail")
    decision = event.raw.guardrail
    assert decision.action == guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    assert decision.reason.startswith(
        "evaluation_error: policy 'unevaluable' rule 'cost-per-token'"
    )
    assert "division by zero" in decision.reason
    [rejected] = audit.of_node("work")
    assert task_status(rejected) == "rejected"
    assert audit.problems == [], audit.summary()
    with capsys.disabled():
        print(f"\n[8] unevaluable policy: step rejected, reason {decision.reason!r}")  # noqa: T201
    report.record(
        report.Row(
            test="8 guardrail fail closed",
            fault="policy rule raises (division by zero)",
            attempted=1,
            acked=0,
            persisted=audit.stored,
            lost=len(audit.lost),
            duplicated=len(audit.duplicates),
        )
    )
