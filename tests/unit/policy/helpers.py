"""Builders shared by the policy tests: headers, snapshots, contexts."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from tickmesh.runtime.policy import EvaluationContext, Usage
from tickmesh.v1 import graph_pb2, guardrail_pb2, header_pb2

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
PRE = guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH
POST = guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT
ALLOW = guardrail_pb2.GUARDRAIL_ACTION_ALLOW
REJECT = guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
PAUSE = guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME
ABORT = guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME

ISSUE_4_EXAMPLE = """\
policy: default
version: 3
rules:
  - id: lifetime-token-cap
    scope: lifetime            # execution | lifetime | tenant
    when: sum(tokens) > 10000  # also cost_usd, iterations, executions, wall_time_s, fanout, depth
    action: abort_lifetime     # reject_execution | pause_lifetime | abort_lifetime
  - id: daily-tenant-spend
    scope: tenant
    window: 24h
    when: sum(cost_usd) > 50
    action: pause_lifetime
  - id: expensive-step
    scope: execution
    phase: pre_dispatch        # pre_dispatch (budget reservation) | post_result
    when: node.handler == "llm_call" and estimate.cost_usd > 2
    action: reject_execution
"""


def header(
    *,
    tenant: str = "acme",
    node_id: str = "call",
    handler: str = "llm_call",
    kind: int = graph_pb2.NODE_KIND_TASK,
    graph_id: str = "support-bot",
    graph_version: int = 7,
    attempt: int = 1,
    labels: dict[str, str] | None = None,
) -> header_pb2.EnvelopeHeader:
    h = header_pb2.EnvelopeHeader(tenant_id=tenant, attempt=attempt, labels=labels or {})
    h.node.id = node_id
    h.node.handler = handler
    h.node.kind = kind  # type: ignore[assignment]
    h.graph.id = graph_id
    h.graph.version = graph_version
    return h


def policy(
    source: str,
    *,
    policy_id: str = "",
    version: int = 1,
    graph_id: str = "",
    dry_run: bool = False,
    tenant: str = "acme",
) -> guardrail_pb2.Policy:
    if not policy_id:
        policy_id = source.split("\n", 1)[0].removeprefix("policy:").strip()
    return guardrail_pb2.Policy(
        tenant_id=tenant,
        policy_id=policy_id,
        version=version,
        source=source,
        digest=hashlib.sha256(source.encode()).hexdigest(),
        graph_id=graph_id,
        dry_run=dry_run,
    )


def snapshot(
    *policies: guardrail_pb2.Policy,
    issued_at: datetime = NOW,
    lease: timedelta = timedelta(seconds=30),
    tenant: str = "acme",
) -> guardrail_pb2.PolicySnapshot:
    snap = guardrail_pb2.PolicySnapshot(tenant_id=tenant, revision=1, policies=policies)
    snap.issued_at.FromDatetime(issued_at)
    snap.lease.FromTimedelta(lease)
    return snap


def one_rule(
    when: str,
    *,
    scope: str = "lifetime",
    action: str = "abort_lifetime",
    phase: str = "post_result",
    policy_id: str = "p",
    extra: str = "",
) -> str:
    return (
        f"policy: {policy_id}\n"
        "rules:\n"
        "  - id: r\n"
        f"    scope: {scope}\n"
        f"    phase: {phase}\n"
        f"    when: {when}\n"
        f"    action: {action}\n"
        f"{extra}"
    )


def context(
    *,
    phase: int = POST,
    execution: Usage | None = None,
    estimate: Usage | None = None,
    lifetime: Usage | None = None,
    tenant_usage: Callable[[float | None], Usage] | None = None,
    **header_fields: object,
) -> EvaluationContext:
    return EvaluationContext(
        phase=phase,
        header=header(**header_fields),  # type: ignore[arg-type]
        execution=execution or Usage(),
        estimate=estimate or Usage(),
        lifetime=lifetime or Usage(),
        tenant_usage=tenant_usage or (lambda _window: Usage()),
    )
