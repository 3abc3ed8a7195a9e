"""Guardrail evaluation cost: the in-process engine and the batched Evaluate RPC.

DESIGN.md §8: ≤ 50 µs per step in process with 20 rules.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from tickmesh.runtime.policy import EvaluationContext, PolicyEngine, Usage, validate_policy
from tickmesh.v1 import graph_pb2, guardrail_pb2, header_pb2, telemetry_pb2
from tickmesh.v1 import guardrail_service_pb2 as gpb
from tickmesh.v1 import guardrail_service_pb2_grpc as gpb_grpc

from .stats import summarize

POLICY_ID = "bench20"
TENANT_METADATA_KEY = "x-tickmesh-tenant"

# Twenty rules that never fire on the benchmark's no-op steps, over every scope but tenant
# (the RPC has no tenant counters), in the default phase (post_result), so that one
# post_result evaluation runs all twenty.
_RULES: tuple[tuple[str, str], ...] = (
    ("lifetime", "sum(tokens) > 1000000000"),
    ("lifetime", "sum(cost_usd) > 100000"),
    ("lifetime", "iterations > 100000"),
    ("lifetime", "executions > 10000000"),
    ("lifetime", "wall_time_s > 864000"),
    ("lifetime", "count() > 10000000"),
    ("lifetime", "max(cost_usd) > 10000"),
    ("lifetime", "sum(model_calls) > 1000000"),
    ("lifetime", "sum(tool_calls) > 1000000"),
    ("lifetime", "fanout > 10000"),
    ("execution", "tokens > 10000000"),
    ("execution", "cost_usd > 1000"),
    ("execution", 'node.handler == "bench_never" and tokens > 0'),
    ("execution", 'labels.team == "blocked"'),
    ("execution", "attempt > 100"),
    ("execution", "model_calls > 100000"),
    ("execution", "tool_calls > 100000"),
    ("execution", 'node.kind == "task" and cost_usd > 500'),
    ("execution", "input_tokens + output_tokens > 20000000"),
    ("execution", "depth > 100000"),
)


def policy_source(rules: int = 20) -> str:
    lines = [f"policy: {POLICY_ID}", "rules:"]
    for i in range(rules):
        scope, when = _RULES[i % len(_RULES)]
        lines += [
            f"  - id: r{i:02d}",
            f"    scope: {scope}",
            f"    when: {when}",
            f"    action: {'abort_lifetime' if scope == 'lifetime' else 'reject_execution'}",
        ]
    return "\n".join(lines) + "\n"


def _header(tenant: str, lifetime_id: str = "") -> header_pb2.EnvelopeHeader:
    h = header_pb2.EnvelopeHeader(
        tenant_id=tenant, lifetime_id=lifetime_id, attempt=1, iteration=3, labels={"team": "b"}
    )
    h.node.id = "noop"
    h.node.handler = "bench_noop"
    h.node.kind = graph_pb2.NODE_KIND_TASK
    h.graph.id = "bench_chain"
    h.graph.version = 1
    return h


def in_process(rules: int = 20, iterations: int = 20_000) -> dict[str, Any]:
    """Time PolicyEngine.evaluate on a snapshot of one policy with ``rules`` post_result rules."""
    source = policy_source(rules)
    issues = validate_policy(source)
    if issues:
        raise RuntimeError(f"benchmark policy is invalid: {issues}")
    tenant = "default"
    policy = guardrail_pb2.Policy(
        tenant_id=tenant,
        policy_id=POLICY_ID,
        version=1,
        source=source,
        digest=hashlib.sha256(source.encode()).hexdigest(),
    )
    now = datetime.now(UTC)
    snapshot = guardrail_pb2.PolicySnapshot(tenant_id=tenant, revision=1, policies=[policy])
    snapshot.issued_at.FromDatetime(now)
    snapshot.lease.FromTimedelta(timedelta(hours=1))
    ctx = EvaluationContext(
        phase=guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT,
        header=_header(tenant),
        execution=Usage(executions=1, input_tokens=120, output_tokens=40, cost_micros=900),
        lifetime=Usage(
            executions=7, input_tokens=800, output_tokens=300, cost_micros=9000, iterations=4
        ),
        tenant_usage=lambda _window: Usage(),
    )
    engine = PolicyEngine()
    decision = engine.evaluate(snapshot, ctx, now=now)
    if decision.action != guardrail_pb2.GUARDRAIL_ACTION_ALLOW or decision.violations:
        raise RuntimeError(f"benchmark policy should allow: {decision}")
    for _ in range(2000):  # warm up
        engine.evaluate(snapshot, ctx, now=now)
    samples = []
    clock = time.perf_counter_ns
    evaluate = engine.evaluate
    for _ in range(iterations):
        # `now` is taken per call, as the router does.
        t0 = clock()
        evaluate(snapshot, ctx, now=datetime.now(UTC))
        samples.append((clock() - t0) / 1000.0)
    return {"rules": rules, "iterations": iterations, "us": summarize(samples)}


async def put_policy(target: str, tenant: str, rules: int = 20) -> None:
    """Install the benchmark policy through the guardrail service (routers enforce it)."""
    metadata = ((TENANT_METADATA_KEY, tenant),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gpb_grpc.GuardrailServiceStub(channel)
        await stub.PutPolicy(
            gpb.PutPolicyRequest(source=policy_source(rules)), metadata=metadata, timeout=30
        )


async def over_rpc(
    target: str,
    tenant: str,
    *,
    batch: int = 100,
    calls: int = 50,
    lifetime_id: str = "",
) -> dict[str, Any]:
    """Time the batched Evaluate RPC (the policy must already be installed).

    With ``lifetime_id`` set each item also reads that lifetime's usage (a KV read in the
    guardrail service), as a real caller's items would.
    """
    metadata = ((TENANT_METADATA_KEY, tenant),)
    telemetry = telemetry_pb2.Telemetry(input_tokens=120, output_tokens=40, cost_micros=900)
    items = [
        gpb.EvaluationItem(
            header=_header(tenant, lifetime_id),
            phase=guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT,
            telemetry=telemetry,
        )
        for _ in range(batch)
    ]
    request = gpb.EvaluateRequest(items=items)
    per_call_ms: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gpb_grpc.GuardrailServiceStub(channel)
        for i in range(calls + 5):
            t0 = time.perf_counter()
            response = await stub.Evaluate(request, metadata=metadata, timeout=60)
            elapsed = time.perf_counter() - t0
            if len(response.decisions) != batch:
                raise RuntimeError("Evaluate returned the wrong number of decisions")
            bad = [
                d for d in response.decisions if d.action != guardrail_pb2.GUARDRAIL_ACTION_ALLOW
            ]
            if bad:
                raise RuntimeError(f"benchmark policy should allow: {bad[0]}")
            if i >= 5:  # the first calls warm up the channel and the policy cache
                per_call_ms.append(elapsed * 1000.0)
    per_item_us = [ms * 1000.0 / batch for ms in per_call_ms]
    return {
        "batch": batch,
        "calls": calls,
        "with_lifetime_usage": bool(lifetime_id),
        "call_ms": summarize(per_call_ms),
        "us_per_item": summarize(per_item_us),
    }
