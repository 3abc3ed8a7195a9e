"""Applies decisions to lifetimes durably: read, decide, compare-and-set, publish.

The order is what makes the step loop safe with any number of router replicas:

1. load the lifetime (cached, with its KV revision) and decide (``core``);
2. write the new state **with the messages to publish in its outbox** by
   compare-and-set — a replica that lost the race reloads and decides again,
   so no decision is taken twice from the same state;
3. publish the messages (deterministic ``Nats-Msg-Id``s, so publishing twice is
   harmless), and only then ack the inputs.

If a replica dies between 2 and 3, the input is redelivered; its execution is
no longer in flight, so the decision is not taken again — the outbox entry
recorded for that input is published instead. Entries are dropped on the next
write once their messages are known to be out.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from opentelemetry.trace import Link, Span, Tracer, get_current_span, use_span

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.runtime.nats import Outgoing, publish_batch
from tickmesh.runtime.subjects import (
    HDR_EXECUTION,
    HDR_LIFETIME,
    HDR_MSG_ID,
    HDR_TENANT,
    HDR_TRACEPARENT,
    HDR_TYPE,
    TenantNames,
)
from tickmesh.runtime.tenant_links import TenantLink
from tickmesh.runtime.timestamps import epoch_ns, timestamp_ns
from tickmesh.sdk import NotFoundError, decode_envelope, encode_envelope
from tickmesh.sdk.tracing import (
    ATTR_GRAPH,
    ATTR_LIFETIME,
    ATTR_TENANT,
    carrier_of,
    context_from,
)
from tickmesh.v1 import envelope_pb2, lifetime_pb2

from . import core
from .store import ConflictError, RouterStore

logger = logging.getLogger(__name__)

MAX_CAS_RETRIES = 16


@dataclass
class Tenant:
    """What the router holds for one tenant."""

    names: TenantNames
    store: RouterStore
    link: TenantLink
    """The tenant's NATS connection: its steps, refs and cancels go out through it."""
    guard: core.Guard = core.allow_all
    published: dict[str, set[str]] = field(default_factory=dict)
    """lifetime id -> outbox keys this replica has published (dropped on the next write)."""


Mutation = Callable[[core.Lifetime], bool]
"""Changes a lifetime; returns False when there is nothing to record."""


@dataclass
class Applied:
    lifetime: core.Lifetime
    changed: bool


class Processor:
    def __init__(
        self,
        producer: core.Producer,
        *,
        outbox_retention: timedelta = timedelta(hours=1),
        tracer: Tracer | None = None,
    ) -> None:
        self._producer = producer
        self._retention = outbox_retention
        self.tracer = tracer
        """Starts the lifetime spans (None: tracing off)."""
        self.tenants: dict[str, Tenant] = {}

    def tenant(self, tenant_id: str) -> Tenant:
        try:
            return self.tenants[tenant_id]
        except KeyError:
            raise NotFoundError(f"unknown tenant {tenant_id!r}") from None

    async def create(self, tenant: Tenant, state: rs.RouterLifetime) -> core.Lifetime:
        """Store a new lifetime and publish its first step."""
        graph = await tenant.store.get_graph(state.lifetime.graph.id, state.lifetime.graph.version)
        span = self.lifetime_span(state)
        with use_span(span, end_on_exit=True) if span is not None else contextlib.nullcontext():
            lt = core.Lifetime(state, graph, self._producer, _now(), tenant.guard)
            core.start(lt)
            key = "start"
            self._add_outbox(lt, key)
            await tenant.store.create(lt.state)
            await self._publish(tenant, lt)
            self._published(tenant, lt, key)
            return lt

    def lifetime_span(
        self, state: rs.RouterLifetime, *, origin: rs.RouterLifetime | None = None
    ) -> Span | None:
        """Start the span a new lifetime's trace hangs from (a child of the current span,
        e.g. the StartLifetime call's) and record it in ``state``; None when tracing is off.

        A fork's span links to the trace of the lifetime it was forked from.
        """
        if self.tracer is None:
            return None
        view = state.lifetime
        links = []
        if origin is not None and origin.HasField("trace_context"):
            origin_ctx = context_from(
                origin.trace_context.traceparent, origin.trace_context.tracestate
            )
            if origin_ctx is not None:
                links.append(Link(get_current_span(origin_ctx).get_span_context()))
        span = self.tracer.start_span(
            "tickmesh.lifetime",
            attributes={
                ATTR_TENANT: view.tenant_id,
                ATTR_LIFETIME: view.lifetime_id,
                ATTR_GRAPH: f"{view.graph.id}@{view.graph.version}",
            },
            links=links,
        )
        traceparent, tracestate = carrier_of(span)
        if traceparent:
            state.trace_context.traceparent = traceparent
            state.trace_context.tracestate = tracestate
        else:
            state.ClearField("trace_context")
        return span

    async def apply(
        self, tenant: Tenant, lifetime_id: str, mutate: Mutation, keys: Sequence[str]
    ) -> Applied:
        """Run ``mutate`` on the lifetime and make its outcome durable, then publish.

        ``keys`` name the inputs being applied (e.g. one per ref); an input whose
        key already has an outbox entry is republished rather than decided again.
        """
        for attempt in range(MAX_CAS_RETRIES):
            loaded = await tenant.store.load(lifetime_id, fresh=attempt > 0)
            if loaded is None:
                raise NotFoundError(f"no lifetime {lifetime_id!r}")
            state = loaded.state
            graph = await tenant.store.get_graph(
                state.lifetime.graph.id, state.lifetime.graph.version
            )
            lt = core.Lifetime(state, graph, self._producer, _now(), tenant.guard)
            pending = self._pending_for(state, keys)
            pruned = self._prune(tenant, lifetime_id, state, lt.now)
            changed = mutate(lt)
            if changed:
                self._add_outbox(lt, ",".join(keys))
            if changed or pruned:
                try:
                    await tenant.store.update(lt.state, loaded.revision)
                except ConflictError:
                    continue
            if pending:
                # Redelivered input whose decision was recorded but maybe never published.
                lt.out[:0] = pending
            await self._publish(tenant, lt)
            if changed:
                self._published(tenant, lt, ",".join(keys))
            return Applied(lt, changed)
        raise ConflictError(f"lifetime {lifetime_id}: too much contention")

    @staticmethod
    def _published(tenant: Tenant, lt: core.Lifetime, key: str) -> None:
        """Remember that ``key``'s outbox entry is out, so the lifetime's next write drops
        it. A finished lifetime is never written again: nothing to remember (remembering
        would keep one entry per lifetime ever run, for as long as the process lives)."""
        lifetime_id = lt.view.lifetime_id
        if lt.terminal:
            tenant.published.pop(lifetime_id, None)
        else:
            tenant.published.setdefault(lifetime_id, set()).add(key)

    def _add_outbox(self, lt: core.Lifetime, key: str) -> None:
        if not lt.out and not lt.cancels:
            return
        entry = lt.state.outbox.add(key=key, messages=lt.out)
        entry.created_at.CopyFrom(lt.timestamp())

    @staticmethod
    def _pending_for(state: rs.RouterLifetime, keys: Sequence[str]) -> list[rs.OutMessage]:
        wanted = set(keys)
        messages: list[rs.OutMessage] = []
        for entry in state.outbox:
            if wanted & set(entry.key.split(",")):
                messages.extend(entry.messages)
        return messages

    def _prune(
        self, tenant: Tenant, lifetime_id: str, state: rs.RouterLifetime, now: datetime
    ) -> bool:
        mine = tenant.published.pop(lifetime_id, set())
        if not state.outbox:
            return False
        # In nanoseconds (Timestamp.ToDatetime per entry costs more than the rest of it).
        cutoff = epoch_ns(now - self._retention)
        keep = [
            e for e in state.outbox if e.key not in mine and timestamp_ns(e.created_at) > cutoff
        ]
        if len(keep) == len(state.outbox):
            return False
        del state.outbox[:]
        state.outbox.extend(keep)
        return True

    async def _publish(self, tenant: Tenant, lt: core.Lifetime) -> None:
        traced = lt.state.trace_context.traceparent
        tenant_id = tenant.names.tenant
        lifetime_id = lt.view.lifetime_id
        outgoing = []
        for m in lt.out:
            headers = {
                HDR_MSG_ID: m.msg_id,
                HDR_TYPE: m.type,
                HDR_TENANT: tenant_id,
                HDR_LIFETIME: lifetime_id,
            }
            if m.execution_id:
                headers[HDR_EXECUTION] = m.execution_id
            if traced:
                headers[HDR_TRACEPARENT] = traced
            outgoing.append(Outgoing(subject=m.subject, data=m.data, headers=headers))
        await publish_batch(tenant.link.js, outgoing)
        if lt.cancels:
            await self._cancel(tenant, lt)

    async def _cancel(self, tenant: Tenant, lt: core.Lifetime) -> None:
        """Ask executor pools (core NATS, best effort) to stop the lifetime's work."""
        header = lt.base_header()
        event = lifetime_pb2.LifetimeEvent(
            kind=lifetime_pb2.LIFETIME_EVENT_KIND_STATE_CHANGED,
            state=lt.view.state,
            message="cancel in-flight work",
        )
        envelope = envelope_pb2.ExecutionEnvelope(header=header, lifetime_event=event)
        await tenant.link.nc.publish(
            tenant.names.cancel,
            encode_envelope(envelope),
            headers={HDR_TYPE: "lifetime_event", HDR_LIFETIME: lt.view.lifetime_id},
        )


def retrace(lt: core.Lifetime) -> None:
    """Point the already-encoded messages of ``lt.out`` at the lifetime's current trace
    context (a fork's first messages are built before its own span exists)."""
    lt.identity_changed()
    for message in lt.out:
        envelope = decode_envelope(message.data)
        if lt.state.HasField("trace_context"):
            envelope.header.trace_context.CopyFrom(lt.state.trace_context)
        else:
            envelope.header.ClearField("trace_context")
        message.data = encode_envelope(envelope)


def _now() -> datetime:
    return datetime.now(UTC)
