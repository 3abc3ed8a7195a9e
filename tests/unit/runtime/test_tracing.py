"""Trace context on the wire, a service's tracing from its settings, and where the
guardrail's evaluation spans hang."""

from __future__ import annotations

import re

import pydantic
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import get_current_span, use_span

from tickmesh.router.config import RouterSettings
from tickmesh.runtime.tracing import (
    Tracing,
    end_evaluation_span,
    evaluation_span,
    parent_of,
    set_parent,
)
from tickmesh.sdk.tracing import carrier_of, context_from, context_from_headers
from tickmesh.v1 import guardrail_pb2, header_pb2

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_a_span_travels_as_a_traceparent_and_comes_back_as_its_parent() -> None:
    provider, exporter = _memory()
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("sender") as sender:
        traceparent, tracestate = carrier_of(sender)
    # sampled, and (newer SDKs) the W3C "random trace id" flag
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[13]", traceparent), traceparent
    with tracer.start_as_current_span(
        "receiver", context=context_from(traceparent, tracestate)
    ) as receiver:
        pass
    sent = sender.get_span_context()
    assert receiver.get_span_context().trace_id == sent.trace_id
    [_, received] = exporter.get_finished_spans()
    assert received.parent is not None
    assert received.parent.span_id == sent.span_id


@pytest.mark.parametrize(
    "value", ["", "garbage", "00-zz-yy-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"]
)
def test_an_empty_or_malformed_traceparent_names_no_parent(value: str) -> None:
    assert context_from(value) is None


def test_nats_headers_carry_the_same_context() -> None:
    ctx = context_from_headers({"traceparent": TRACEPARENT, "Nats-Msg-Id": "x"})
    assert ctx is not None
    assert get_current_span(ctx).get_span_context().trace_id == int(TRACEPARENT[3:35], 16)
    assert context_from_headers(None) is None
    assert context_from_headers({"Nats-Msg-Id": "x"}) is None


def test_an_invalid_span_leaves_no_context_behind() -> None:
    header = header_pb2.EnvelopeHeader()
    set_parent(header, get_current_span())  # no span: tracing off
    assert not header.HasField("trace_context")
    assert carrier_of(get_current_span()) == ("", "")
    assert parent_of(header) is None


def test_tracing_off_costs_nothing_to_set_up() -> None:
    off = Tracing.off()
    assert not off.enabled
    assert off.tracer("tickmesh.router") is None
    assert off.server_interceptors() == []
    assert off.client_interceptors() == []
    assert not Tracing.from_settings("router", RouterSettings()).enabled


def test_a_service_names_itself_in_its_spans() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.for_service(
        "router", processors=[SimpleSpanProcessor(exporter)], instance="host:1"
    )
    tracer = tracing.tracer("tickmesh.router")
    assert tracer is not None
    with tracer.start_as_current_span("x"):
        pass
    [span] = exporter.get_finished_spans()
    assert span.resource.attributes["service.name"] == "tickmesh-router"
    assert span.resource.attributes["service.instance.id"] == "host:1"
    assert len(tracing.server_interceptors()) == 1
    assert tracing.client_interceptors()


def test_settings_choose_the_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKMESH_ROUTER_TRACE_EXPORTER", "console")
    assert Tracing.from_settings("router", RouterSettings()).enabled
    otlp = RouterSettings(trace_exporter="otlp", trace_endpoint="http://127.0.0.1:1")
    assert Tracing.from_settings("router", otlp).enabled
    with pytest.raises(pydantic.ValidationError, match="trace_exporter"):
        RouterSettings(trace_exporter="jaeger")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="trace_sample_ratio"):
        RouterSettings(trace_sample_ratio=1.5)


def test_an_untraced_lifetime_is_never_sampled_below_a_traced_parent() -> None:
    exporter = InMemorySpanExporter()
    never = Tracing.for_service(
        "router", processors=[SimpleSpanProcessor(exporter)], sample_ratio=0.0
    )
    tracer = never.tracer("t")
    assert tracer is not None
    with tracer.start_as_current_span("new lifetime") as root:
        assert not root.get_span_context().trace_flags.sampled
    # A parent that was sampled elsewhere keeps its children sampled (ParentBased).
    with tracer.start_as_current_span("step", context=context_from(TRACEPARENT)) as child:
        assert child.get_span_context().trace_flags.sampled
    assert [s.name for s in exporter.get_finished_spans()] == ["step"]


def _header_in(span_traceparent: str) -> header_pb2.EnvelopeHeader:
    header = header_pb2.EnvelopeHeader(tenant_id="t", lifetime_id="l", execution_id="e")
    header.trace_context.traceparent = span_traceparent
    return header


def test_a_guardrail_evaluation_hangs_under_the_routing_of_its_own_trace() -> None:
    provider, exporter = _memory()
    tracer = provider.get_tracer("tickmesh.guardrail")
    phase = guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT
    decision = guardrail_pb2.GuardrailDecision(action=guardrail_pb2.GUARDRAIL_ACTION_ALLOW)
    with tracer.start_as_current_span("step") as step:
        step_traceparent, _ = carrier_of(step)
    header = _header_in(step_traceparent)

    # routing: the current span belongs to the lifetime's trace -> it is the parent
    route = tracer.start_span("route", context=parent_of(header))
    with use_span(route, end_on_exit=True):
        span = evaluation_span(tracer, header, phase)
        assert span is not None
        end_evaluation_span(span, decision)
    # a call in another trace (a signal, an out-of-band Evaluate) -> the header's span
    with tracer.start_as_current_span("unrelated call"):
        span = evaluation_span(tracer, header, phase)
        assert span is not None
        end_evaluation_span(span, decision)

    spans = {
        s.name: s for s in exporter.get_finished_spans() if s.name != "tickmesh.guardrail.evaluate"
    }
    evaluations = [
        s for s in exporter.get_finished_spans() if s.name == "tickmesh.guardrail.evaluate"
    ]
    parents = [s.parent.span_id if s.parent else None for s in evaluations]
    assert parents == [spans["route"].context.span_id, spans["step"].context.span_id]
    assert evaluations[0].attributes is not None
    assert evaluations[0].attributes["tickmesh.guardrail.action"] == "GUARDRAIL_ACTION_ALLOW"
    assert evaluations[0].attributes["tickmesh.guardrail.phase"] == "GUARDRAIL_PHASE_POST_RESULT"


def test_an_untraced_step_gets_no_guardrail_span() -> None:
    provider, exporter = _memory()
    tracer = provider.get_tracer("tickmesh.guardrail")
    header = header_pb2.EnvelopeHeader(tenant_id="t")
    assert evaluation_span(tracer, header, guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH) is None
    assert exporter.get_finished_spans() == ()
