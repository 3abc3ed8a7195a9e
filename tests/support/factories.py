"""Fixed, fully populated messages for tests and golden vectors.

Every value is a constant so the serialized bytes never change; the golden
vectors under tests/vectors are these messages, serialized.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from tickmesh.sdk import BodyKind, execution_id
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    graph_pb2,
    guardrail_pb2,
    header_pb2,
    lifetime_pb2,
    payload_pb2,
    request_pb2,
    result_pb2,
    telemetry_pb2,
)

TENANT = "acme"
LIFETIME_ID = "019a0000-0000-7000-8000-000000000001"
GRAPH = header_pb2.GraphRef(id="coding_agent", version=3, digest="9f2c" + "0" * 60)
BASE_TIME = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def ts(offset_ms: int = 0) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(BASE_TIME + timedelta(milliseconds=offset_ms))
    return stamp


def dur(ms: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(ms)
    return d


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def json_payload(text: str) -> payload_pb2.Payload:
    import hashlib

    data = text.encode()
    return payload_pb2.Payload(
        content_type="application/json",
        inline=data,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def blob_payload() -> payload_pb2.Payload:
    digest = "ab" * 32
    return payload_pb2.Payload(
        content_type="application/octet-stream",
        blob=payload_pb2.BlobRef(
            uri=f"file:///var/lib/tickmesh/blobs/{TENANT}/{digest}",
            sha256=digest,
            size=5 * 1024 * 1024,
            content_type="application/octet-stream",
        ),
        size=5 * 1024 * 1024,
        sha256=digest,
    )


def telemetry() -> telemetry_pb2.Telemetry:
    return telemetry_pb2.Telemetry(
        input_tokens=1200,
        output_tokens=340,
        cost_micros=4_250,
        currency="USD",
        model_calls=2,
        tool_calls=1,
        queue_wait=dur(3),
        run_time=dur(1_500),
        model_usage=[
            telemetry_pb2.ModelUsage(
                model="fake-llm-large",
                input_tokens=1200,
                output_tokens=340,
                cost_micros=4_250,
                calls=2,
            )
        ],
        custom_metrics={"lines_changed": 42.0, "tests_passed_ratio": 0.75},
    )


def header(**overrides: Any) -> header_pb2.EnvelopeHeader:
    node = overrides.pop(
        "node",
        header_pb2.NodeRef(
            id="generate_code", kind=graph_pb2.NODE_KIND_TASK, handler="llm_codegen"
        ),
    )
    parents = overrides.pop("parents", ["0c1f" + "0" * 28])
    iteration = overrides.pop("iteration", 2)
    fields: dict[str, Any] = {
        "envelope_id": "019a0000-0000-7000-8000-0000000000aa",
        "tenant_id": TENANT,
        "lifetime_id": LIFETIME_ID,
        "execution_id": execution_id(TENANT, LIFETIME_ID, parents, node.id, iteration),
        "attempt": 1,
        "sequence": 7,
        "iteration": iteration,
        "node": node,
        "graph": GRAPH,
        "parent_execution_ids": sorted(parents),
        "edge": header_pb2.EdgeRef(id="plan->generate_code", kind=graph_pb2.EDGE_KIND_PARALLEL),
        "idempotency_key": "req:" + execution_id(TENANT, LIFETIME_ID, parents, node.id, iteration),
        "created_at": ts(0),
        "deadline": ts(60_000),
        "trace_context": header_pb2.TraceContext(
            traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            tracestate="tickmesh=1",
        ),
        "mode": header_pb2.EXECUTION_MODE_LIVE,
        "producer": header_pb2.Producer(service="router", version="0.1.0", instance="host-1:4242"),
        "labels": {"team": "platform", "env": "test"},
    }
    fields.update(overrides)
    return header_pb2.EnvelopeHeader(**fields)


PLAN_NODE = header_pb2.NodeRef(id="plan", kind=graph_pb2.NODE_KIND_PLAN, handler="coding_planner")


def task_result() -> result_pb2.TaskResult:
    return result_pb2.TaskResult(
        status=result_pb2.TASK_STATUS_SUCCEEDED,
        output=json_payload('{"files":{"main.py":"print(42)\\n"}}'),
        telemetry=telemetry(),
        tool_actions=[
            result_pb2.ToolAction(
                action_id="a1",
                tool="fs.write",
                input=json_payload('{"path":"main.py"}'),
                output=json_payload('{"ok":true}'),
                started_at=ts(100),
                duration=dur(4),
                side_effect=True,
            )
        ],
    )


def plan_result() -> result_pb2.PlanResult:
    return result_pb2.PlanResult(
        dispatch=result_pb2.DispatchDecision(
            steps=[
                result_pb2.NextStep(node_id="generate_code", input=json_payload('{"part":1}')),
                result_pb2.NextStep(node_id="generate_code", input=json_payload('{"part":2}')),
            ]
        ),
        rationale="two independent modules: generate them in parallel",
        telemetry=telemetry(),
    )


def executor_info() -> execution_pb2.ExecutorInfo:
    return execution_pb2.ExecutorInfo(
        executor_id="py-worker-1",
        runtime="python 3.11.7",
        sdk_version="0.1.0",
        code_digest="c0de" + "0" * 60,
    )


def task_execution() -> execution_pb2.TaskExecution:
    return execution_pb2.TaskExecution(
        header=header(),
        request_digest="be" * 32,
        result=task_result(),
        started_at=ts(5),
        finished_at=ts(1_505),
        executor=executor_info(),
    )


def make_envelope(kind: BodyKind) -> envelope_pb2.ExecutionEnvelope:
    """Return the golden envelope for one body kind."""
    env = envelope_pb2.ExecutionEnvelope()
    if kind == "task_request":
        env.header.CopyFrom(header())
        env.task_request.input.CopyFrom(json_payload('{"module":"parser","spec":"tokenize"}'))
        env.task_request.config.CopyFrom(struct({"temperature": 0.25, "model": "fake-llm-large"}))
    elif kind == "plan_request":
        env.header.CopyFrom(header(node=PLAN_NODE, iteration=3))
        env.plan_request.goal.CopyFrom(json_payload('{"task":"write a tokenizer"}'))
        env.plan_request.inputs.add(
            execution_id="11" * 16,
            node=header_pb2.NodeRef(
                id="generate_code", kind=graph_pb2.NODE_KIND_TASK, handler="llm_codegen"
            ),
            status=result_pb2.TASK_STATUS_SUCCEEDED,
            output=blob_payload(),
            telemetry=telemetry(),
        )
        env.plan_request.inputs.add(
            execution_id="22" * 16,
            node=header_pb2.NodeRef(
                id="generate_code", kind=graph_pb2.NODE_KIND_TASK, handler="llm_codegen"
            ),
            status=result_pb2.TASK_STATUS_REJECTED,
            error=result_pb2.ErrorInfo(
                type="guardrail.rejected",
                message="estimated cost over budget",
                retryable=False,
                details=struct({"rule": "expensive-step", "observed": 2.5, "limit": 2}),
            ),
            guardrail=guardrail_pb2.GuardrailDecision(
                action=guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION,
                policy_id="default",
                policy_version=3,
                phase=guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH,
                violations=[
                    guardrail_pb2.Violation(
                        rule_id="expensive-step",
                        scope=guardrail_pb2.GUARDRAIL_SCOPE_EXECUTION,
                        metric="estimate.cost_usd",
                        observed=2.5,
                        limit=2.0,
                        message="estimate.cost_usd 2.5 > 2",
                        action=guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION,
                    )
                ],
            ),
        )
        env.plan_request.signal.CopyFrom(
            request_pb2.SignalDelivery(
                name="approval", payload=json_payload('{"approved":true}'), approver="ana"
            )
        )
    elif kind == "task_execution":
        env.header.CopyFrom(
            header(
                producer=header_pb2.Producer(
                    service="executor-pool", version="0.1.0", instance="host-1:4243"
                )
            )
        )
        env.task_execution.CopyFrom(task_execution())
    elif kind == "plan_execution":
        env.header.CopyFrom(header(node=PLAN_NODE, iteration=3))
        env.plan_execution.CopyFrom(
            execution_pb2.PlanExecution(
                header=header(node=PLAN_NODE, iteration=3),
                request_digest="ce" * 32,
                result=plan_result(),
                started_at=ts(10),
                finished_at=ts(30),
                executor=executor_info(),
            )
        )
    elif kind == "lifetime_event":
        env.header.CopyFrom(header(sequence=12))
        env.lifetime_event.CopyFrom(
            lifetime_pb2.LifetimeEvent(
                sequence=12,
                kind=lifetime_pb2.LIFETIME_EVENT_KIND_GUARDRAIL,
                at=ts(2_000),
                state=lifetime_pb2.LIFETIME_STATE_PAUSED,
                execution_id=header().execution_id,
                node=header().node,
                attempt=1,
                guardrail=guardrail_pb2.GuardrailDecision(
                    action=guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME,
                    policy_id="default",
                    policy_version=3,
                    phase=guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT,
                    violations=[
                        guardrail_pb2.Violation(
                            rule_id="daily-tenant-spend",
                            scope=guardrail_pb2.GUARDRAIL_SCOPE_TENANT,
                            metric="sum(cost_usd)",
                            observed=50.5,
                            limit=50.0,
                            message="sum(cost_usd) 50.5 > 50 over 24h",
                            action=guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME,
                        )
                    ],
                ),
                message="paused by guardrail daily-tenant-spend",
                telemetry=telemetry(),
            )
        )
    elif kind == "lifetime_events":
        env.header.CopyFrom(header(sequence=7))
        finished = env.lifetime_events.events.add(
            sequence=7,
            kind=lifetime_pb2.LIFETIME_EVENT_KIND_STEP_FINISHED,
            at=ts(1_520),
            state=lifetime_pb2.LIFETIME_STATE_RUNNING,
            execution_id=header().execution_id,
            node=header().node,
            attempt=1,
            message="finished search: succeeded",
            telemetry=telemetry(),
        )
        env.lifetime_events.events.add(
            sequence=8,
            kind=lifetime_pb2.LIFETIME_EVENT_KIND_STEP_DISPATCHED,
            at=finished.at,
            state=lifetime_pb2.LIFETIME_STATE_RUNNING,
            execution_id="33" * 16,
            node=PLAN_NODE,
            attempt=1,
            message="dispatched decide (iteration 3)",
        )
    elif kind == "lifetime_event_batch":
        # A router's batch: the events of two decisions, each as it is published alone.
        env.header.CopyFrom(header_pb2.EnvelopeHeader(tenant_id=header().tenant_id))
        env.header.producer.CopyFrom(header().producer)
        env.lifetime_event_batch.decisions.add().CopyFrom(make_envelope("lifetime_events"))
        env.lifetime_event_batch.decisions.add().CopyFrom(make_envelope("lifetime_event"))
    elif kind == "signal":
        env.header.CopyFrom(header(node=PLAN_NODE, iteration=3))
        env.signal.CopyFrom(
            lifetime_pb2.Signal(
                signal_id="sig-0001",
                name="approval",
                payload=json_payload('{"approved":true,"comment":"ship it"}'),
                approver="ana@acme.example",
                confirmation_token="tok-123",
                sent_at=ts(3_000),
            )
        )
    elif kind == "execution_ref":
        env.header.CopyFrom(
            header(
                producer=header_pb2.Producer(
                    service="state", version="0.1.0", instance="host-1:4244"
                )
            )
        )
        env.execution_ref.store_sequence = 1234
        env.execution_ref.persisted_at.CopyFrom(ts(1_510))
        env.execution_ref.task_execution.CopyFrom(task_execution())
    else:  # pragma: no cover - exhaustive over BodyKind
        raise ValueError(kind)
    return env
