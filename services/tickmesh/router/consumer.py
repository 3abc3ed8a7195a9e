"""Consumes durable execution records in batches and routes them.

The records come from two streams: the record stream itself, which the router reads
while the state service stores the same records (the record is durable on the bus when
it is read, so routing does not wait for the store's commit), and the ref stream, where
the state service publishes a ref for each record appended through its API. A record
carries the same key either way, so it is applied once.

Records of one lifetime are applied together in one compare-and-set. A batch is
routed in phases: every lifetime's decision, then one round of compare-and-set
writes for all of them, one round of publishes, one write of acks (per lifetime,
each of those would be a round trip and a flush of its own). A record or ref is acked
only after the decisions it led to are durable and published.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, use_span

from tickmesh.runtime.consumer import BatchConsumer, durable_config, message_type, term
from tickmesh.runtime.crash import crash_point
from tickmesh.runtime.logging import log_context
from tickmesh.runtime.metrics import Metrics
from tickmesh.runtime.nats import Outgoing, ack_all, publish_batch
from tickmesh.runtime.records import check_record
from tickmesh.runtime.subjects import HDR_REASON, tenant_of_subject
from tickmesh.runtime.tracing import parent_of
from tickmesh.sdk import NotFoundError, ValidationError, decode_envelope
from tickmesh.sdk.tracing import (
    ATTR_ATTEMPT,
    ATTR_EXECUTION,
    ATTR_ITERATION,
    ATTR_LIFETIME,
    ATTR_NODE,
    ATTR_TENANT,
)
from tickmesh.v1 import execution_pb2

from . import core
from .processor import Applied, Job, Mutation, Processor, Tenant

logger = logging.getLogger(__name__)

Item = tuple[Msg, core.Recorded, str]
"""A message, the record it carries, and the record's key (applied once per lifetime)."""


class RecordConsumer:
    """Routes one tenant's execution records: from the record stream, and as refs."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        processor: Processor,
        tenant: Tenant,
        *,
        max_batch: int,
        ack_wait_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._js = js
        self._processor = processor
        self._tenant = tenant
        self._metrics = metrics
        names = tenant.names
        self._consumer = BatchConsumer(
            nc,
            js,
            stream=names.ref_stream,
            config=durable_config(names.router_consumer, names.ref_all, ack_wait_s=ack_wait_s),
            handler=self._handle,
            max_batch=max_batch,
            name=f"router:{names.tenant}",
        )
        self._records = BatchConsumer(
            nc,
            js,
            stream=names.exec_stream,
            config=durable_config(
                names.router_record_consumer, names.exec_all, ack_wait_s=ack_wait_s
            ),
            handler=self._handle_records,
            max_batch=max_batch,
            name=f"router-records:{names.tenant}",
        )

    async def start(self) -> None:
        await self._records.start()
        await self._consumer.start()

    async def stop(self) -> None:
        await self._records.stop()
        await self._consumer.stop()

    async def _handle_records(self, batch: list[Msg]) -> None:
        names = self._tenant.names
        if self._metrics is not None:
            self._metrics.count_redeliveries(names.tenant, names.router_record_consumer, batch)
        by_lifetime: dict[str, list[Item]] = defaultdict(list)
        for msg in batch:
            try:
                envelope = decode_envelope(msg.data, expected_kind=message_type(msg))
                check_record(msg.subject, envelope)
            except ValidationError as exc:
                # The state service runs the same check on the same message and
                # dead-letters it (with an error event); here it is only dropped.
                logger.warning("record on %s not routed: %s", msg.subject, exc)
                await term(msg, str(exc))
                continue
            header = envelope.header
            key = f"ref:{header.execution_id}:{header.attempt}"
            by_lifetime[header.lifetime_id].append((msg, envelope, key))
        await self._route(by_lifetime)

    async def _handle(self, batch: list[Msg]) -> None:
        if self._metrics is not None:
            names = self._tenant.names
            self._metrics.count_redeliveries(names.tenant, names.router_consumer, batch)
        by_lifetime: dict[str, list[Item]] = defaultdict(list)
        rejects: list[tuple[Msg, str]] = []
        for msg in batch:
            try:
                envelope = decode_envelope(msg.data, expected_kind=message_type(msg))
                subject_tenant = tenant_of_subject(msg.subject)
                if envelope.header.tenant_id != subject_tenant:
                    raise ValidationError(
                        f"envelope claims tenant {envelope.header.tenant_id!r} "
                        f"on a subject of tenant {subject_tenant!r}"
                    )
                if not envelope.HasField("execution_ref"):
                    raise ValidationError("a ref must carry an execution_ref body")
            except ValidationError as exc:
                rejects.append((msg, str(exc)))
                continue
            ref = envelope.execution_ref
            record = ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
            key = f"ref:{record.header.execution_id}:{record.header.attempt}"
            by_lifetime[envelope.header.lifetime_id].append((msg, ref, key))
        if rejects:
            await self._dead_letter(rejects)
        await self._route(by_lifetime)

    async def _route(self, by_lifetime: dict[str, list[Item]]) -> None:
        """Decide for every lifetime of the batch, then write all their states in one
        round, publish all they decided in another, and ack in one write."""
        tenant_id = self._tenant.names.tenant
        jobs: list[Job] = []
        spans: list[list[Span | None]] = []
        for lifetime_id, items in by_lifetime.items():
            self._record_usage(items)
            item_spans = self._route_spans(items)
            spans.append(item_spans)
            jobs.append(
                Job(
                    lifetime_id,
                    _mutation(tenant_id, lifetime_id, items, item_spans),
                    [key for _, _, key in items],
                    # Several refs decided together fail at the one that raises (rare).
                    one_by_one=None
                    if len(items) == 1
                    else _one_by_one(tenant_id, lifetime_id, items),
                )
            )
        results = await self._processor.apply_batch(self._tenant, jobs)

        acks: list[Msg] = []
        for job, item_spans, result in zip(jobs, spans, results, strict=True):
            items = by_lifetime[job.lifetime_id]
            if isinstance(result, Applied):
                _end_spans(item_spans)
                self._count_steps(result, items)
                acks.extend(msg for msg, _, _ in items)
            elif isinstance(result, NotFoundError):
                _end_spans(item_spans, f"unknown lifetime: {result}")
                for msg, _, _ in items:
                    await term(msg, f"ref for an unknown lifetime: {result}")
                logger.error("refs for unknown lifetime %s dropped", job.lifetime_id)
            else:
                _end_spans(item_spans, f"routing failed, redelivered: {result}")
                with log_context(tenant=tenant_id, lifetime=job.lifetime_id):
                    logger.error(
                        "routing lifetime %s failed; its refs will be redelivered",
                        job.lifetime_id,
                        exc_info=result,
                    )
                for msg, _, _ in items:
                    await msg.nak(delay=0.2)
        crash_point("router_after_dispatch_before_ack")
        await ack_all(acks)

    def _record_usage(self, items: list[Item]) -> None:
        # Every record is durable: count it in the tenant's usage (once per key) before
        # deciding, so its own post-result rules see it. A record read from the record
        # stream has no commit time yet; it is counted now.
        record_usage = getattr(self._tenant.guard, "record_execution", None)
        if record_usage is None:
            return
        for _, ref, key in items:
            record = ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
            persisted = (
                ref.persisted_at.ToDatetime(tzinfo=UTC)
                if isinstance(ref, execution_pb2.ExecutionRef) and ref.HasField("persisted_at")
                else datetime.now(UTC)
            )
            record_usage(key, record.result.telemetry, persisted)

    def _count_steps(self, applied: Applied, items: list[Item]) -> None:
        if not applied.changed or self._metrics is None:
            return
        graph = applied.lifetime.view.graph.id
        for _, ref, _ in items:
            record = ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
            if record.HasField("finished_at"):
                self._metrics.step_applied(
                    self._tenant.names.tenant, graph, record.finished_at.ToNanoseconds()
                )

    def _route_spans(self, items: list[Item]) -> list[Span | None]:
        """One span per traced record, from its delivery until what it led to is published
        (empty when tracing is off)."""
        tracer = self._processor.tracer
        if tracer is None:
            return []
        spans: list[Span | None] = []
        for _, ref, _ in items:
            header = (
                ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
            ).header
            parent = parent_of(header)
            spans.append(
                None
                if parent is None
                else tracer.start_span(
                    "tickmesh.router.route",
                    context=parent,
                    kind=SpanKind.CONSUMER,
                    attributes={
                        ATTR_TENANT: header.tenant_id,
                        ATTR_LIFETIME: header.lifetime_id,
                        ATTR_NODE: header.node.id,
                        ATTR_EXECUTION: header.execution_id,
                        ATTR_ATTEMPT: header.attempt,
                        ATTR_ITERATION: header.iteration,
                    },
                )
            )
        return spans

    async def _dead_letter(self, rejects: list[tuple[Msg, str]]) -> None:
        names = self._tenant.names
        await publish_batch(
            self._js,
            [
                Outgoing(
                    names.dlq("ref"),
                    msg.data,
                    {**(msg.headers or {}), HDR_REASON: reason[:512]},
                )
                for msg, reason in rejects
            ],
        )
        if self._metrics is not None:
            self._metrics.dead_lettered(names.tenant, "ref", len(rejects))
        for msg, reason in rejects:
            logger.error("dead-lettered a ref on %s: %s", msg.subject, reason)
            await term(msg, reason)


def _end_spans(spans: list[Span | None], error: str = "") -> None:
    for span in spans:
        if span is None:
            continue
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


def _one_by_one(
    tenant_id: str, lifetime_id: str, items: list[Item]
) -> Callable[[], list[Mutation]]:
    """The lifetime's refs, a mutation each (made only if deciding on them together raised)."""
    return lambda: [_mutation(tenant_id, lifetime_id, [item], []) for item in items]


def _mutation(
    tenant_id: str,
    lifetime_id: str,
    items: list[Item],
    spans: list[Span | None],
) -> Mutation:
    """Apply the lifetime's refs in order (with the lifetime's log context, and each
    ref's span current while it is decided, so guardrail evaluations become its
    children)."""

    def mutate(lt: core.Lifetime) -> bool:
        changed = False
        with log_context(tenant=tenant_id, lifetime=lifetime_id):
            for i, (_, ref, _) in enumerate(items):
                span = spans[i] if spans else None
                if span is None:
                    applied = core.on_execution(lt, ref)
                else:
                    with use_span(span, end_on_exit=False):
                        applied = core.on_execution(lt, ref)
                changed = changed or applied
        return changed

    return mutate
