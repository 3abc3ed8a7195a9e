"""W3C trace context as tickmesh carries it, and the span attributes every hop sets.

A lifetime is one trace. Its context travels in each envelope header
(``trace_context.traceparent`` / ``tracestate``) and in the ``traceparent``
header of NATS messages, so every service, and every executor in any language,
can continue it. Executors written with this SDK need nothing more than a
tracer provider (see :class:`tickmesh.sdk.Worker`); executors in other languages
read the ``traceparent`` of the assignment's envelope header.

The propagator is W3C trace context itself, never the process's global one, so
what goes on the wire does not depend on how an application configured
OpenTelemetry.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.context import Context
from opentelemetry.trace import Span, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# Span attribute names, shared by every service and the SDK's executors. Low-cardinality
# values only go to metrics; spans may carry ids.
ATTR_TENANT = "tickmesh.tenant"
ATTR_LIFETIME = "tickmesh.lifetime_id"
ATTR_GRAPH = "tickmesh.graph"
ATTR_NODE = "tickmesh.node"
ATTR_HANDLER = "tickmesh.handler"
ATTR_KIND = "tickmesh.kind"
ATTR_EXECUTION = "tickmesh.execution_id"
ATTR_ATTEMPT = "tickmesh.attempt"
ATTR_ITERATION = "tickmesh.iteration"

_PROPAGATOR = TraceContextTextMapPropagator()


def context_from(traceparent: str, tracestate: str = "") -> Context | None:
    """The remote parent a ``traceparent`` names, or None when it names none (empty or
    malformed: a malformed context starts no trace rather than failing the step)."""
    if not traceparent:
        return None
    carrier = {TRACEPARENT: traceparent}
    if tracestate:
        carrier[TRACESTATE] = tracestate
    context = _PROPAGATOR.extract(carrier)
    return context if context else None


def context_from_headers(headers: Mapping[str, str] | None) -> Context | None:
    """The remote parent in NATS message headers, or None."""
    if not headers:
        return None
    return context_from(headers.get(TRACEPARENT, ""), headers.get(TRACESTATE, ""))


def carrier_of(span: Span) -> tuple[str, str]:
    """``(traceparent, tracestate)`` naming ``span`` as the parent; empty when the span
    is not a valid one (tracing off)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return "", ""
    traceparent = (
        f"00-{format_trace_id(ctx.trace_id)}-{format_span_id(ctx.span_id)}-{ctx.trace_flags:02x}"
    )
    return traceparent, ctx.trace_state.to_header() if ctx.trace_state else ""
