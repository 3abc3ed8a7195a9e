"""GuardrailService over gRPC on a real grpc.aio server and a real nats-server.

Each test builds the guardrail service alone (``guardrail.server.build``) for a
fresh tenant; its policies and snapshots live in the tenant's policy KV bucket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from tests.support.factories import make_envelope
from tests.support.nats_server import new_tenant
from tests.support.service_harness import Metadata, expect_status, tenant_metadata
from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.guardrail.server import GuardrailService, build
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

BUDGET = """\
policy: budget
description: keep steps cheap
rules:
  - id: expensive-handler
    scope: execution
    phase: pre_dispatch
    when: node.handler == "expensive"
    action: reject_execution
  - id: big-step
    scope: execution
    when: sum(tokens) > 100
    action: pause_lifetime
"""

BUDGET_V2 = BUDGET.replace("sum(tokens) > 100", "sum(tokens) > 200")

LIMITS = """\
policy: limits
rules:
  - id: too-many-calls
    scope: execution
    when: tool_calls > 3
    action: abort_lifetime
"""

INVALID = """\
policy: broken
rules:
  - id: r1
    scope: lifetime
    when: sum(tokenz) > 5
    action: explode
"""


@dataclass
class GuardrailHarness:
    service: GuardrailService
    tenant: str
    nc: NatsClient
    stub: guardrail_service_pb2_grpc.GuardrailServiceAsyncStub

    @property
    def md(self) -> Metadata:
        return tenant_metadata(self.tenant)

    async def put(
        self, source: str, *, graph_id: str = "", dry_run: bool = False
    ) -> GS.PutPolicyResponse:
        return await self.stub.PutPolicy(
            GS.PutPolicyRequest(source=source, graph_id=graph_id, dry_run=dry_run),
            metadata=self.md,
        )


@pytest.fixture
async def guardrail(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[GuardrailHarness]:
    tenant = new_tenant("g")
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    settings = GuardrailSettings(
        nats_url=nats_server.url, tenants=[tenant], grpc_listen="127.0.0.1:0", log_json=False
    )
    service = await build(settings, nc=nc)
    await service.start()
    channel = grpc.aio.insecure_channel(service.target)
    try:
        yield GuardrailHarness(
            service, tenant, nc, guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        )
    finally:
        await channel.close()
        await service.stop()
        await nc.close()


def _header(tenant: str, handler: str) -> header_pb2.EnvelopeHeader:
    return header_pb2.EnvelopeHeader(
        tenant_id=tenant,
        lifetime_id="019a0000-0000-7000-8000-0000000000c1",
        execution_id="ab" * 16,
        attempt=1,
        node=header_pb2.NodeRef(id=handler, kind=graph_pb2.NODE_KIND_TASK, handler=handler),
        graph=header_pb2.GraphRef(id="g", version=1),
    )


# --- validation and storage -------------------------------------------------------------


async def test_validate_policy_reports_issues_with_line_and_column(
    guardrail: GuardrailHarness,
) -> None:
    bad = await guardrail.stub.ValidatePolicy(
        GS.ValidatePolicyRequest(source=INVALID), metadata=guardrail.md
    )
    assert not bad.valid
    located = [(i.line, i.column, i.field) for i in bad.issues]
    assert located == [(5, 15, "rules[0].when"), (6, 13, "rules[0].action")]
    assert "did you mean 'tokens'" in bad.issues[0].message
    assert "'explode'" in bad.issues[1].message

    good = await guardrail.stub.ValidatePolicy(
        GS.ValidatePolicyRequest(source=BUDGET), metadata=guardrail.md
    )
    assert good.valid
    assert not good.issues
    # Validating stores nothing.
    listed = await guardrail.stub.ListPolicies(GS.ListPoliciesRequest(), metadata=guardrail.md)
    assert not listed.policies

    details = await expect_status(guardrail.put(INVALID), grpc.StatusCode.INVALID_ARGUMENT)
    assert "rules[0].action" in details


async def test_guardrail_calls_need_tenant_credentials(guardrail: GuardrailHarness) -> None:
    await expect_status(
        guardrail.stub.ValidatePolicy(GS.ValidatePolicyRequest(source=BUDGET)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await expect_status(
        guardrail.stub.PutPolicy(
            GS.PutPolicyRequest(source=BUDGET), metadata=tenant_metadata(new_tenant("x"))
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_put_policy_versions_by_source(guardrail: GuardrailHarness) -> None:
    first = await guardrail.put(BUDGET)
    again = await guardrail.put(BUDGET)
    changed = await guardrail.put(BUDGET_V2)
    assert (first.policy.policy_id, first.policy.version, first.created) == ("budget", 1, True)
    assert (again.policy.version, again.created) == (1, False)
    assert again.policy == first.policy
    assert (changed.policy.version, changed.created) == (2, True)
    assert first.policy.tenant_id == guardrail.tenant
    assert first.policy.source == BUDGET
    assert first.policy.digest != changed.policy.digest
    assert first.policy.HasField("created_at")
    # Going back to the first source is a new version, not the old one.
    back = await guardrail.put(BUDGET)
    assert (back.policy.version, back.created) == (3, True)


async def test_get_policy_and_list_policies(guardrail: GuardrailHarness) -> None:
    await guardrail.put(BUDGET)
    await guardrail.put(BUDGET_V2)
    await guardrail.put(LIMITS)
    await guardrail.put(LIMITS.replace("policy: limits", "policy: alpha"))

    newest = await guardrail.stub.GetPolicy(
        GS.GetPolicyRequest(policy_id="budget"), metadata=guardrail.md
    )
    assert (newest.policy.version, newest.policy.source) == (2, BUDGET_V2)
    first = await guardrail.stub.GetPolicy(
        GS.GetPolicyRequest(policy_id="budget", version=1), metadata=guardrail.md
    )
    assert (first.policy.version, first.policy.source) == (1, BUDGET)
    await expect_status(
        guardrail.stub.GetPolicy(
            GS.GetPolicyRequest(policy_id="budget", version=3), metadata=guardrail.md
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    details = await expect_status(
        guardrail.stub.GetPolicy(GS.GetPolicyRequest(policy_id="ghost"), metadata=guardrail.md),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "ghost" in details
    for malformed in ("a.b.*", "x.>", "a b", ""):  # no policy has one; the bucket refuses it
        details = await expect_status(
            guardrail.stub.GetPolicy(
                GS.GetPolicyRequest(policy_id=malformed), metadata=guardrail.md
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert f"invalid policy id {malformed!r}" in details

    page = await guardrail.stub.ListPolicies(
        GS.ListPoliciesRequest(page_size=2), metadata=guardrail.md
    )
    assert [(p.policy_id, p.version) for p in page.policies] == [("alpha", 1), ("budget", 2)]
    assert page.next_page_token
    rest = await guardrail.stub.ListPolicies(
        GS.ListPoliciesRequest(page_size=2, page_token=page.next_page_token),
        metadata=guardrail.md,
    )
    assert [(p.policy_id, p.version) for p in rest.policies] == [("limits", 1)]
    assert rest.next_page_token == ""


# --- evaluation -------------------------------------------------------------------------


async def test_evaluate_decides_each_item_of_a_batch_in_order(
    guardrail: GuardrailHarness,
) -> None:
    await guardrail.put(BUDGET)
    await guardrail.put(LIMITS)
    pre, post = G.GUARDRAIL_PHASE_PRE_DISPATCH, G.GUARDRAIL_PHASE_POST_RESULT
    items = [
        GS.EvaluationItem(header=_header(guardrail.tenant, "expensive"), phase=pre),
        GS.EvaluationItem(header=_header(guardrail.tenant, "cheap"), phase=pre),
        GS.EvaluationItem(
            header=_header(guardrail.tenant, "cheap"),
            phase=post,
            telemetry=telemetry_pb2.Telemetry(input_tokens=90, output_tokens=20),
        ),
        GS.EvaluationItem(
            header=_header(guardrail.tenant, "cheap"),
            phase=post,
            telemetry=telemetry_pb2.Telemetry(input_tokens=90, output_tokens=5),
        ),
        GS.EvaluationItem(
            header=_header(guardrail.tenant, "cheap"),
            phase=post,
            telemetry=telemetry_pb2.Telemetry(input_tokens=500, tool_calls=4),
        ),
    ]
    response = await guardrail.stub.Evaluate(GS.EvaluateRequest(items=items), metadata=guardrail.md)

    decisions = list(response.decisions)
    assert [d.action for d in decisions] == [
        G.GUARDRAIL_ACTION_REJECT_EXECUTION,
        G.GUARDRAIL_ACTION_ALLOW,
        G.GUARDRAIL_ACTION_PAUSE_LIFETIME,
        G.GUARDRAIL_ACTION_ALLOW,
        G.GUARDRAIL_ACTION_ABORT_LIFETIME,
    ]
    assert [d.phase for d in decisions] == [pre, pre, post, post, post]
    assert [[v.rule_id for v in d.violations] for d in decisions] == [
        ["expensive-handler"],
        [],
        ["big-step"],
        [],
        ["big-step", "too-many-calls"],
    ]
    assert (decisions[0].policy_id, decisions[0].policy_version) == ("budget", 1)
    big = decisions[2].violations[0]
    assert (big.observed, big.limit) == (110.0, 100.0)
    assert (decisions[4].policy_id, decisions[4].policy_version) == ("limits", 1)

    empty = await guardrail.stub.Evaluate(GS.EvaluateRequest(), metadata=guardrail.md)
    assert not empty.decisions


# --- snapshots --------------------------------------------------------------------------


async def _next_snapshot(
    stream: grpc.aio.UnaryStreamCall[GS.WatchPoliciesRequest, GS.WatchPoliciesResponse],
    within: float = 2.0,
) -> G.PolicySnapshot:
    try:
        async with asyncio.timeout(within):
            response = await stream.read()
    except TimeoutError:
        pytest.fail(f"no snapshot on the WatchPolicies stream within {within}s")
    assert isinstance(response, GS.WatchPoliciesResponse), response
    return response.snapshot


async def test_watch_policies_sends_the_current_snapshot_then_every_change(
    guardrail: GuardrailHarness,
) -> None:
    await guardrail.put(BUDGET)
    stream = guardrail.stub.WatchPolicies(GS.WatchPoliciesRequest(), metadata=guardrail.md)
    try:
        current = await _next_snapshot(stream)
        assert current.tenant_id == guardrail.tenant
        assert [(p.policy_id, p.version) for p in current.policies] == [("budget", 1)]
        assert current.revision >= 1
        assert current.lease.seconds == 30
        kv = await runtime_nats.jetstream(guardrail.nc).key_value(
            TenantNames(guardrail.tenant).policy_bucket
        )
        stored = G.PolicySnapshot.FromString((await kv.get("snapshot")).value or b"")
        assert stored.revision == current.revision

        await guardrail.put(LIMITS)
        changed = await _next_snapshot(stream)
        assert changed.revision > current.revision
        assert [(p.policy_id, p.version) for p in changed.policies] == [
            ("budget", 1),
            ("limits", 1),
        ]
    finally:
        stream.cancel()


async def test_watch_policies_of_a_tenant_without_policies_sees_the_first_one(
    guardrail: GuardrailHarness,
) -> None:
    stream = guardrail.stub.WatchPolicies(GS.WatchPoliciesRequest(), metadata=guardrail.md)
    try:
        current = await _next_snapshot(stream)
        assert current.tenant_id == guardrail.tenant
        assert not current.policies

        await guardrail.put(BUDGET)
        changed = await _next_snapshot(stream)
        assert changed.revision > current.revision
        assert [(p.policy_id, p.version) for p in changed.policies] == [("budget", 1)]
    finally:
        stream.cancel()


TENANT_SPEND = """\
policy: spend
rules:
  - id: daily-spend
    scope: tenant
    window: 24h
    when: sum(cost_usd) > 0.01
    action: pause_lifetime
"""


async def _spent(store: SQLiteStateStore, tenant: str, cost_micros: int) -> None:
    env = make_envelope("task_execution")
    env.header.tenant_id = tenant
    env.task_execution.header.tenant_id = tenant
    env.task_execution.result.telemetry.cost_micros = cost_micros
    await store.append_executions(tenant, [(env.SerializeToString(), env)])


async def test_evaluate_reads_tenant_usage_from_its_source(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    tenant = new_tenant("g")
    store = await SQLiteStateStore.open(tmp_path / "state.db")
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    settings = GuardrailSettings(
        nats_url=nats_server.url, tenants=[tenant], grpc_listen="127.0.0.1:0", log_json=False
    )
    service = await build(settings, nc=nc, usage_source=StoreUsageSource(store))
    await service.start()
    channel = grpc.aio.insecure_channel(service.target)
    try:
        harness = GuardrailHarness(
            service, tenant, nc, guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        )
        await harness.put(TENANT_SPEND)
        item = GS.EvaluationItem(
            header=_header(tenant, "cheap"), phase=G.GUARDRAIL_PHASE_POST_RESULT
        )
        request = GS.EvaluateRequest(items=[item])
        under = await harness.stub.Evaluate(request, metadata=harness.md)
        assert under.decisions[0].action == G.GUARDRAIL_ACTION_ALLOW
        await _spent(store, tenant, 20_000)  # $0.02, over the $0.01 daily cap
        over = await harness.stub.Evaluate(request, metadata=harness.md)
        decision = over.decisions[0]
        assert decision.action == G.GUARDRAIL_ACTION_PAUSE_LIFETIME
        assert decision.violations[0].rule_id == "daily-spend"
        assert decision.violations[0].observed == pytest.approx(0.02)
    finally:
        await channel.close()
        await service.stop()
        await nc.close()
        await store.close()


async def test_evaluate_without_a_usage_source_rejects_tenant_rules(
    guardrail: GuardrailHarness,
) -> None:
    await guardrail.put(TENANT_SPEND)
    item = GS.EvaluationItem(
        header=_header(guardrail.tenant, "cheap"), phase=G.GUARDRAIL_PHASE_POST_RESULT
    )
    response = await guardrail.stub.Evaluate(
        GS.EvaluateRequest(items=[item]), metadata=guardrail.md
    )
    decision = response.decisions[0]
    assert decision.action == G.GUARDRAIL_ACTION_REJECT_EXECUTION
    assert "usage source" in decision.reason
