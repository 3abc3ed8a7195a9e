"""A service's tracing: its own tracer provider, or none at all.

Each service holds a :class:`Tracing`. When tracing is off (the default) it has
no provider and every call site skips span work behind one ``enabled`` check, so
off costs nothing per step. When on, the service has its own
:class:`TracerProvider` whose resource names it (``service.name =
tickmesh-router`` …), so the four services in one embedded process still show as
four services, and spans leave through the exporter the settings name.

What a lifetime's trace looks like (every hop continues the context carried in
the envelope header, see :mod:`tickmesh.sdk.tracing`)::

    StartLifetime (gRPC server span, child of the caller's span if it sent one)
    └─ tickmesh.lifetime                       router: the lifetime starts
       ├─ tickmesh.step <kind> <handler>       executor pool: one per step attempt
       │  ├─ tickmesh.execute <kind> <handler> the executor running the handler
       │  ├─ tickmesh.state.append             state: the record made durable
       │  └─ tickmesh.router.route             router: the result applied
       │     └─ tickmesh.guardrail.evaluate    the guardrail engine, per decision
       └─ tickmesh.step …
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Literal

import grpc
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, Tracer, get_current_span

from tickmesh.sdk.tracing import (
    ATTR_ATTEMPT,
    ATTR_EXECUTION,
    ATTR_ITERATION,
    ATTR_LIFETIME,
    ATTR_NODE,
    ATTR_TENANT,
    carrier_of,
    context_from,
)
from tickmesh.v1 import guardrail_pb2, header_pb2

logger = logging.getLogger(__name__)

TraceExporter = Literal["none", "otlp", "console"]

SERVICE_NAME_PREFIX = "tickmesh-"

# The executor stream and blob downloads are long-lived calls, not steps: one span for a
# whole session would only hide the per-step spans the envelopes carry.
_UNTRACED_METHODS = ("Connect", "FetchBlob")


class Tracing:
    """One service's tracer provider (or none) and the interceptors that go with it."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def tracer(self, scope: str) -> Tracer | None:
        """A tracer for ``scope`` (e.g. ``tickmesh.router``), or None when tracing is off."""
        if self.provider is None:
            return None
        return self.provider.get_tracer(scope)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        untraced = filters.any_of(*(filters.method_name(m) for m in _UNTRACED_METHODS))
        # The instrumentation package has no type hints.
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=filters.negate(untraced)
        )
        return [interceptor]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider
        )
        return interceptors

    async def shutdown(self) -> None:
        """Flush what is buffered and stop exporting (on service stop).

        In a thread: the exporters' final flush blocks on the network (up to their
        timeout), which must not stall the event loop other services still run on."""
        if self.provider is not None:
            await asyncio.to_thread(self.provider.shutdown)

    @classmethod
    def off(cls) -> Tracing:
        return cls(None)

    @classmethod
    def for_service(
        cls,
        service: str,
        *,
        exporter: TraceExporter = "none",
        endpoint: str | None = None,
        sample_ratio: float = 1.0,
        instance: str = "",
        processors: Sequence[SpanProcessor] = (),
    ) -> Tracing:
        """The tracing a service's settings ask for.

        ``processors`` are added as they are (tests pass a simple processor over an
        in-memory exporter); with none and ``exporter="none"`` tracing is off.
        """
        span_exporter = _exporter(exporter, endpoint)
        if span_exporter is None and not processors:
            return cls.off()
        resource = Resource.create(
            {
                "service.name": SERVICE_NAME_PREFIX + service,
                "service.namespace": "tickmesh",
                **({"service.instance.id": instance} if instance else {}),
            }
        )
        provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio))
        )
        for processor in processors:
            provider.add_span_processor(processor)
        if span_exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(span_exporter))
        logger.info("tracing on: %s exporter for %s", exporter, service)
        return cls(provider)

    @classmethod
    def from_settings(cls, service: str, settings: Any) -> Tracing:
        """The tracing ``settings`` (a :class:`~tickmesh.runtime.settings.ServiceSettings`)
        ask for."""
        return cls.for_service(
            service,
            exporter=settings.trace_exporter,
            endpoint=settings.trace_endpoint,
            sample_ratio=settings.trace_sample_ratio,
            instance=settings.instance,
        )


def _exporter(kind: TraceExporter, endpoint: str | None) -> SpanExporter | None:
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    # Imported only when asked for: the OTLP exporter pulls in its own protobuf modules.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # endpoint None: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else localhost:4317.
    return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()


def parent_of(header: header_pb2.EnvelopeHeader) -> Context | None:
    """The span an envelope's header names as its parent, or None."""
    if not header.HasField("trace_context"):
        return None
    tc = header.trace_context
    return context_from(tc.traceparent, tc.tracestate)


def set_parent(header: header_pb2.EnvelopeHeader, span: Span) -> None:
    """Make ``span`` the parent of what ``header``'s envelope leads to."""
    traceparent, tracestate = carrier_of(span)
    if traceparent:
        header.trace_context.traceparent = traceparent
        header.trace_context.tracestate = tracestate


def evaluation_span(
    tracer: Tracer,
    header: header_pb2.EnvelopeHeader,
    phase: guardrail_pb2.GuardrailPhase.ValueType,
) -> Span | None:
    """A span for one guardrail evaluation of a traced lifetime's step, or None when the
    step's lifetime is not traced.

    Its parent is the span being worked in when that belongs to the lifetime's trace
    (routing a result), else the span the header names (a dispatch decided inside a
    pause/resume/signal call, or an out-of-band ``Evaluate`` call, each in its own trace).
    """
    named = parent_of(header)
    if named is None:
        return None
    current = get_current_span().get_span_context()
    lifetime_trace = get_current_span(named).get_span_context().trace_id
    parent = None if current.is_valid and current.trace_id == lifetime_trace else named
    return tracer.start_span(
        "tickmesh.guardrail.evaluate",
        context=parent,
        attributes={
            ATTR_TENANT: header.tenant_id,
            ATTR_LIFETIME: header.lifetime_id,
            ATTR_NODE: header.node.id,
            ATTR_EXECUTION: header.execution_id,
            ATTR_ATTEMPT: header.attempt,
            ATTR_ITERATION: header.iteration,
            "tickmesh.guardrail.phase": guardrail_pb2.GuardrailPhase.Name(phase),
        },
    )


def end_evaluation_span(span: Span, decision: guardrail_pb2.GuardrailDecision) -> None:
    span.set_attributes(
        {
            "tickmesh.guardrail.action": guardrail_pb2.GuardrailAction.Name(decision.action),
            "tickmesh.guardrail.policy": decision.policy_id,
            "tickmesh.guardrail.policy_version": decision.policy_version,
            "tickmesh.guardrail.violations": len(decision.violations),
        }
    )
    if decision.reason:
        span.set_attribute("tickmesh.guardrail.reason", decision.reason[:256])
    span.end()
