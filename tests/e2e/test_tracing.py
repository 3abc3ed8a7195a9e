"""One lifetime is one trace: every hop continues the context the envelopes carry."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from pathlib import Path

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import examples.coding_agent.handlers as coding
import examples.hello.handlers as hello
from tests.support.audit import record_of
from tests.support.mesh import Handler, MeshFactory
from tickmesh.runtime.auth import TENANT_METADATA_KEY
from tickmesh.sdk import Client, load_graph_file
from tickmesh.sdk.tracing import ATTR_EXECUTION, ATTR_LIFETIME, ATTR_NODE
from tickmesh.v1 import guardrail_pb2, guardrail_service_pb2, guardrail_service_pb2_grpc

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CODING_AGENT: list[Handler] = [
    coding.parse_request,
    coding.coding_planner,
    coding.llm_codegen,
    coding.assembler,
    coding.validate_code,
    coding.reviewer,
]


def _provider(name: str, processor: SimpleSpanProcessor) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(processor)
    return provider


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def _scope(span: ReadableSpan) -> str:
    return span.instrumentation_scope.name if span.instrumentation_scope else ""


def _tree(spans: list[ReadableSpan], root: int) -> str:
    """The trace as an indented outline (printed with -s; a failing test shows it)."""
    children: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        if span.parent is not None:
            children[span.parent.span_id].append(span)
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    lines: list[str] = []

    def walk(span_id: int, depth: int) -> None:
        span = by_id[span_id]
        ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        lines.append(f"{'  ' * depth}{span.name} [{_service(span)}] {ms:.1f} ms")
        for child in sorted(children[span_id], key=lambda c: c.start_time or 0):
            assert child.context is not None
            walk(child.context.span_id, depth + 1)

    walk(root, 0)
    return "\n".join(lines)


async def _spans_until(
    exporter: InMemorySpanExporter, ready: int, within: float = 10.0
) -> list[ReadableSpan]:
    """The finished spans once ``ready`` route spans have ended (the last ones end just
    after the lifetime's result is visible)."""
    async with asyncio.timeout(within):
        while True:
            spans = list(exporter.get_finished_spans())
            if sum(s.name == "tickmesh.router.route" for s in spans) >= ready:
                return spans
            await asyncio.sleep(0.05)


async def test_a_coding_agent_lifetime_is_one_trace_across_every_service(
    start_mesh: MeshFactory,
) -> None:
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    h = await start_mesh(trace_processors=(processor,))
    await h.worker(CODING_AGENT, tracer_provider=_provider("coding-agent-executor", processor))
    graph = await h.register(load_graph_file(EXAMPLES / "coding_agent" / "graph.yaml"))
    client_provider = _provider("test-client", processor)
    client = await Client.connect(
        h.mesh.router_target, tenant=h.tenant, tracer_provider=client_provider
    )
    try:
        with client_provider.get_tracer("test").start_as_current_span("test: run") as root:
            handle = await client.start_lifetime(
                graph.id,
                {"task": "add numbers", "modules": ["parser", "lexer"]},
                version=graph.version,
            )
        await handle.result(within=15)
    finally:
        await client.close()
    report = await h.audit(handle.id)
    assert report.state == "completed"
    executions = {record_of(r).header.execution_id for r in report.records}
    assert len(executions) == report.stored == 12
    # An out-of-band caller (here: the test) asks the guardrail service about the last
    # step with that step's header: the service continues the step's trace.
    last = record_of(report.records[-1])
    async with grpc.aio.insecure_channel(h.mesh.guardrail_target) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        answer = await stub.Evaluate(
            guardrail_service_pb2.EvaluateRequest(
                items=[
                    guardrail_service_pb2.EvaluationItem(
                        header=last.header,
                        phase=guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT,
                        telemetry=last.result.telemetry,
                    )
                ]
            ),
            metadata=((TENANT_METADATA_KEY, h.tenant),),
            timeout=5,
        )
    assert answer.decisions[0].action == guardrail_pb2.GUARDRAIL_ACTION_ALLOW

    spans = await _spans_until(exporter, ready=report.stored)
    trace_id = root.get_span_context().trace_id
    ours = [s for s in spans if s.context is not None and s.context.trace_id == trace_id]
    # Nothing about this lifetime escaped into another trace.
    strays = [
        s
        for s in spans
        if s.attributes
        and s.attributes.get(ATTR_LIFETIME) == handle.id
        and s.context is not None
        and s.context.trace_id != trace_id
    ]
    assert strays == []
    by_id = {s.context.span_id: s for s in ours if s.context is not None}

    def parent(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None, f"{span.name} has no parent"
        assert span.parent.span_id in by_id, f"{span.name}'s parent is not in the trace"
        return by_id[span.parent.span_id]

    services = {_service(s) for s in ours}
    assert {
        "test-client",
        "tickmesh-router",
        "tickmesh-guardrail",
        "tickmesh-executor-pool",
        "tickmesh-state",
        "coding-agent-executor",
    } <= services
    assert "tickmesh.guardrail" in {_scope(s) for s in ours}

    outline = _tree(ours, root.get_span_context().span_id)  # shown when an assertion fails

    # client call -> router's gRPC server span -> the lifetime's span
    [lifetime] = [s for s in ours if s.name == "tickmesh.lifetime"]
    assert _service(lifetime) == "tickmesh-router"
    assert (lifetime.attributes or {}).get(ATTR_LIFETIME) == handle.id
    server = parent(lifetime)
    assert (server.kind, server.name) == (
        SpanKind.SERVER,
        "/tickmesh.v1.RouterService/StartLifetime",
    ), outline
    client_call = parent(server)
    assert (client_call.kind, _service(client_call)) == (SpanKind.CLIENT, "test-client")
    assert parent(client_call) is by_id[root.get_span_context().span_id]

    # one step span per stored execution, each directly under the lifetime's span
    steps = [s for s in ours if s.name.startswith("tickmesh.step ")]
    assert all(_service(s) == "tickmesh-executor-pool" for s in steps)
    assert all(parent(s) is lifetime for s in steps)
    assert {str((s.attributes or {})[ATTR_EXECUTION]) for s in steps} == executions
    assert Counter(str((s.attributes or {})[ATTR_NODE]) for s in steps) == report.by_node

    # under each step: the executor's work, the state's append, the router's routing
    children: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in ours:
        if span.parent is not None:
            children[span.parent.span_id].append(span)
    for step in steps:
        assert step.context is not None
        below = sorted(
            (c.name, _service(c))
            for c in children[step.context.span_id]
            if _service(c) != "tickmesh-guardrail"  # the out-of-band question, checked below
        )
        attrs = step.attributes or {}
        kind, handler = step.name.split()[1:]
        assert below == [
            (f"tickmesh.execute {kind} {handler}", "coding-agent-executor"),
            ("tickmesh.router.route", "tickmesh-router"),
            ("tickmesh.state.append", "tickmesh-state"),
        ], f"under step {attrs.get(ATTR_NODE)}:\n{outline}"

    # every guardrail decision sits under the routing it belongs to (or, for the entry
    # step, under the lifetime's start)
    evaluations = [
        s
        for s in ours
        if s.name == "tickmesh.guardrail.evaluate" and _service(s) == "tickmesh-router"
    ]
    assert {parent(s).name for s in evaluations} <= {"tickmesh.router.route", "tickmesh.lifetime"}
    post_result = [
        s
        for s in evaluations
        if (s.attributes or {}).get("tickmesh.guardrail.phase") == "GUARDRAIL_PHASE_POST_RESULT"
    ]
    assert len(post_result) == report.stored
    assert all(
        (s.attributes or {}).get("tickmesh.guardrail.action") == "GUARDRAIL_ACTION_ALLOW"
        for s in evaluations
    )
    # the guardrail service's evaluation hangs under the step it was asked about
    [asked] = [s for s in ours if _service(s) == "tickmesh-guardrail"]
    assert asked.name == "tickmesh.guardrail.evaluate"
    last_step = next(
        s for s in steps if (s.attributes or {})[ATTR_EXECUTION] == last.header.execution_id
    )
    assert parent(asked) is last_step


async def test_a_fork_is_a_new_trace_linked_to_its_origin(start_mesh: MeshFactory) -> None:
    exporter = InMemorySpanExporter()
    h = await start_mesh(trace_processors=(SimpleSpanProcessor(exporter),))
    await h.worker([hello.greet, hello.decide, hello.shout])
    graph = await h.register(load_graph_file(EXAMPLES / "hello" / "graph.yaml"))
    origin = await h.start(graph, {"name": "ada"})
    await origin.result(within=10)
    report = await h.audit(origin.id)
    # fork after "greet": decide, shout and decide run again in the fork
    greet = next(record_of(r) for r in report.records if record_of(r).header.node.id == "greet")
    fork = await origin.fork(greet.header.execution_id)
    assert await fork.result(within=10) == {"greeting": "HELLO, ADA!"}

    spans = await _spans_until(exporter, ready=report.stored + 3)
    lifetimes = {
        (s.attributes or {}).get(ATTR_LIFETIME): s for s in spans if s.name == "tickmesh.lifetime"
    }
    origin_span, fork_span = lifetimes[origin.id], lifetimes[fork.id]
    assert origin_span.context is not None
    assert fork_span.context is not None
    assert fork_span.context.trace_id != origin_span.context.trace_id
    assert [link.context.span_id for link in fork_span.links] == [origin_span.context.span_id]
    assert (fork_span.attributes or {}).get("tickmesh.fork_of") == origin.id
    fork_steps = [
        s
        for s in spans
        if s.name.startswith("tickmesh.step ")
        and (s.attributes or {}).get(ATTR_LIFETIME) == fork.id
    ]
    # only the steps after the fork point run, each in the fork's trace, under its span
    assert sorted(str((s.attributes or {})[ATTR_NODE]) for s in fork_steps) == [
        "decide",
        "decide",
        "shout",
    ]
    assert all(
        s.parent is not None and s.parent.span_id == fork_span.context.span_id for s in fork_steps
    )
