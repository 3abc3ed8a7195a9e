"""GuardrailService edge cases on a real grpc.aio server, nats-server and SQLite store:
inputs at the limits of what a valid policy or an ``Evaluate`` item may hold."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from tests.support.factories import make_envelope
from tests.support.nats_server import new_tenant
from tests.support.service_harness import Metadata, tenant_metadata
from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.guardrail.server import build
from tickmesh.internal.v1 import router_state_pb2
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.policy.sources import StoreUsageSource
from tickmesh.runtime.subjects import TenantNames
from tickmesh.state.store import SQLiteStateStore
from tickmesh.v1 import (
    graph_pb2,
    guardrail_pb2,
    guardrail_service_pb2,
    guardrail_service_pb2_grpc,
    header_pb2,
    telemetry_pb2,
)

GS = guardrail_service_pb2
G = guardrail_pb2


@dataclass
class Probe:
    tenant: str
    store: SQLiteStateStore
    stub: guardrail_service_pb2_grpc.GuardrailServiceAsyncStub

    @property
    def md(self) -> Metadata:
        return tenant_metadata(self.tenant)

    async def put(self, source: str) -> None:
        await self.stub.PutPolicy(GS.PutPolicyRequest(source=source), metadata=self.md)

    async def evaluate(self, *items: GS.EvaluationItem) -> list[G.GuardrailDecision]:
        response = await self.stub.Evaluate(GS.EvaluateRequest(items=items), metadata=self.md)
        return list(response.decisions)

    async def spend(self, cost_micros: int) -> None:
        env = make_envelope("task_execution")
        env.header.tenant_id = self.tenant
        env.task_execution.header.tenant_id = self.tenant
        env.task_execution.result.telemetry.cost_micros = cost_micros
        await self.store.append_executions(self.tenant, [(env.SerializeToString(), env)])


@pytest.fixture
async def probe(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Probe]:
    """The guardrail service with the embedded mesh's usage source (the SQLite store)."""
    tenant = new_tenant("gp")
    store = await SQLiteStateStore.open(tmp_path / "state.db")
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    settings = GuardrailSettings(
        nats_url=nats_server.url, tenants=[tenant], grpc_listen="127.0.0.1:0", log_json=False
    )
    service = await build(settings, nc=nc, usage_source=StoreUsageSource(store))
    await service.start()
    channel = grpc.aio.insecure_channel(service.target)
    try:
        yield Probe(tenant, store, guardrail_service_pb2_grpc.GuardrailServiceStub(channel))
    finally:
        await channel.close()
        await service.stop()
        await nc.close()
        await store.close()


def _header(tenant: str, *, iteration: int = 1) -> header_pb2.EnvelopeHeader:
    return header_pb2.EnvelopeHeader(
        tenant_id=tenant,
        lifetime_id="019a0000-0000-7000-8000-0000000000c2",
        execution_id="cd" * 16,
        attempt=1,
        iteration=iteration,
        node=header_pb2.NodeRef(id="work", kind=graph_pb2.NODE_KIND_TASK, handler="work"),
        graph=header_pb2.GraphRef(id="g", version=1),
    )


LONGEST_WINDOW = """\
policy: forever
rules:
  - id: spend-forever
    scope: tenant
    window: 999999999d
    when: sum(cost_usd) > 0.01
    action: pause_lifetime
"""


async def test_a_window_reaching_before_1970_reads_all_time_usage(probe: Probe) -> None:
    # The policy validates (9 digits, any unit); its window starts before year 1, which a
    # datetime cannot hold. The state service reads such a window as all time; so must this.
    await probe.put(LONGEST_WINDOW)
    item = GS.EvaluationItem(header=_header(probe.tenant), phase=G.GUARDRAIL_PHASE_POST_RESULT)
    [under] = await probe.evaluate(item)
    assert (under.action, under.reason) == (G.GUARDRAIL_ACTION_ALLOW, "")
    await probe.spend(20_000)
    [over] = await probe.evaluate(item)
    assert (over.action, over.reason) == (G.GUARDRAIL_ACTION_PAUSE_LIFETIME, "")
    assert over.violations[0].observed == pytest.approx(0.02)


ITERATION_CAP = """\
policy: iterations
rules:
  - id: step-iteration
    scope: execution
    when: iterations >= 3
    action: abort_lifetime
  - id: lifetime-iteration
    scope: lifetime
    phase: pre_dispatch
    when: iterations >= 3
    action: pause_lifetime
"""


async def test_evaluate_reads_the_step_iteration_as_the_router_does(probe: Probe) -> None:
    # The router counts the step's own iteration (header.iteration) in its execution's and
    # its lifetime's `iterations`; Evaluate must decide the same step the same way.
    await probe.put(ITERATION_CAP)
    post, pre = G.GUARDRAIL_PHASE_POST_RESULT, G.GUARDRAIL_PHASE_PRE_DISPATCH
    telemetry = telemetry_pb2.Telemetry(input_tokens=1)
    decisions = await probe.evaluate(
        GS.EvaluationItem(
            header=_header(probe.tenant, iteration=2), phase=post, telemetry=telemetry
        ),
        GS.EvaluationItem(
            header=_header(probe.tenant, iteration=3), phase=post, telemetry=telemetry
        ),
        GS.EvaluationItem(header=_header(probe.tenant, iteration=2), phase=pre),
        GS.EvaluationItem(header=_header(probe.tenant, iteration=3), phase=pre),
    )
    assert [d.action for d in decisions] == [
        G.GUARDRAIL_ACTION_ALLOW,
        G.GUARDRAIL_ACTION_ABORT_LIFETIME,
        G.GUARDRAIL_ACTION_ALLOW,
        G.GUARDRAIL_ACTION_PAUSE_LIFETIME,
    ]
    assert [v.observed for v in decisions[1].violations] == [3.0]
    assert [v.observed for v in decisions[3].violations] == [3.0]


LIFETIME_CAPS = """\
policy: lifetime-caps
rules:
  - id: files
    scope: lifetime
    phase: pre_dispatch
    when: custom.files >= 4
    action: pause_lifetime
  - id: age
    scope: lifetime
    phase: pre_dispatch
    when: wall_time_s >= 60
    action: pause_lifetime
  - id: in-flight
    scope: lifetime
    phase: pre_dispatch
    when: fanout >= 2
    action: pause_lifetime
  - id: calls
    scope: lifetime
    phase: pre_dispatch
    when: count() >= 2
    action: pause_lifetime
"""


async def test_evaluate_reads_the_lifetime_as_the_router_does(
    probe: Probe, nats_server: EmbeddedNats
) -> None:
    # The router's lifetime usage has the totals' custom metrics, the time since the start
    # and the steps in flight (tickmesh.router.guard.lifetime_usage); so must Evaluate's.
    header = _header(probe.tenant)
    state = router_state_pb2.RouterLifetime()
    state.lifetime.lifetime_id = header.lifetime_id
    state.lifetime.execution_count = 2
    state.lifetime.totals.custom_metrics["files"] = 4.0
    state.lifetime.created_at.FromDatetime(datetime.now(UTC) - timedelta(minutes=5))
    state.in_flight["a" * 32].node_id = "work"
    state.in_flight["b" * 32].node_id = "work"
    nc = await runtime_nats.connect(nats_server.url, name="router-state")
    try:
        kv = await runtime_nats.jetstream(nc).key_value(TenantNames(probe.tenant).router_bucket)
        await kv.put(f"lt.{header.lifetime_id}", state.SerializeToString())
    finally:
        await nc.close()
    await probe.put(LIFETIME_CAPS)

    [decision] = await probe.evaluate(
        GS.EvaluationItem(header=header, phase=G.GUARDRAIL_PHASE_PRE_DISPATCH)
    )
    assert decision.action == G.GUARDRAIL_ACTION_PAUSE_LIFETIME
    observed = {v.rule_id: v.observed for v in decision.violations}
    assert observed.keys() == {"files", "age", "in-flight", "calls"}
    assert (observed["files"], observed["in-flight"], observed["calls"]) == (4.0, 2.0, 2.0)
    assert observed["age"] >= 300


CAP = """\
policy: cap
rules:
  - id: big-step
    scope: execution
    when: sum(tokens) > {limit}
    action: pause_lifetime
"""


async def test_a_put_interrupted_between_its_two_writes_does_not_wedge_the_policy(
    probe: Probe, nats_server: EmbeddedNats
) -> None:
    # A put writes its version key, then moves `latest`; one that stopped in between (a
    # crash, or a lost reply) leaves the next version number taken with `latest` behind.
    first = await probe.stub.PutPolicy(
        GS.PutPolicyRequest(source=CAP.format(limit=100)), metadata=probe.md
    )
    orphan = G.Policy()
    orphan.CopyFrom(first.policy)
    orphan.version = 2
    orphan.source = CAP.format(limit=200)
    orphan.digest = hashlib.sha256(orphan.source.encode()).hexdigest()
    nc = await runtime_nats.connect(nats_server.url, name="interrupted-put")
    try:
        kv = await runtime_nats.jetstream(nc).key_value(TenantNames(probe.tenant).policy_bucket)
        await kv.create("policy.cap.00000002", orphan.SerializeToString())
    finally:
        await nc.close()

    third = await probe.stub.PutPolicy(
        GS.PutPolicyRequest(source=CAP.format(limit=300)), metadata=probe.md
    )
    assert (third.policy.version, third.created) == (3, True)
    newest = await probe.stub.GetPolicy(GS.GetPolicyRequest(policy_id="cap"), metadata=probe.md)
    assert (newest.policy.version, newest.policy.source) == (3, CAP.format(limit=300))
