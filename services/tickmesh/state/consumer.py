"""Consumes execution records and lifetime events in batches.

Records: one store transaction per batch, then the acks. The router reads the same
records from the record stream, so none of them needs a ref; records appended
through the API (``append_and_publish``) get one ref each (also when already
stored), and are acked to the caller only after the refs' PubAcks.
Events: folded into lifetime rows and the event history.
Anything unreadable is dead-lettered with its reason and an error event; it
never stops the batch around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from opentelemetry.trace import Span, SpanKind, Tracer

from tickmesh.runtime.consumer import BatchConsumer, durable_config, message_type, term
from tickmesh.runtime.counters import UsageCounter, counted_from_envelope
from tickmesh.runtime.crash import crash_point
from tickmesh.runtime.logging import log_context
from tickmesh.runtime.metrics import Metrics
from tickmesh.runtime.nats import Outgoing, ack_all, publish_batch, publish_live
from tickmesh.runtime.records import STORED_WAIT_S, consumer_caught_up, records_stored
from tickmesh.runtime.subjects import (
    HDR_EXECUTION,
    HDR_LIFETIME,
    HDR_MSG_ID,
    HDR_REASON,
    HDR_TENANT,
    HDR_TRACEPARENT,
    HDR_TYPE,
    TenantNames,
)
from tickmesh.runtime.tracing import parent_of
from tickmesh.sdk import (
    ValidationError,
    decisions_of,
    decode_envelope,
    encode_envelope,
    events_of,
)
from tickmesh.sdk.tracing import (
    ATTR_ATTEMPT,
    ATTR_EXECUTION,
    ATTR_LIFETIME,
    ATTR_NODE,
    ATTR_TENANT,
)
from tickmesh.v1 import envelope_pb2, header_pb2

from . import core
from .store import StateStore, StoredExecution

logger = logging.getLogger(__name__)

DRAIN_BATCH = 256
"""Events an earlier version left unbatched, stored this many messages a transaction."""
DRAIN_WAIT_S = 5.0
"""Longest wait for the next of them (they are all in the stream already)."""
STORE_RETRY_S = 0.2
"""First wait before a batch the store refused is tried again (doubling, up to the max)."""
STORE_RETRY_MAX_S = 5.0


class RecordConsumer:
    """Appends execution records (and publishes refs for those appended through the
    API) for one tenant."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        store: StateStore,
        names: TenantNames,
        producer: header_pb2.Producer,
        *,
        max_batch: int,
        ack_wait_s: float,
        linger_s: float = 0.0,
        usage_counter: UsageCounter | None = None,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._tracer = tracer
        self._store = store
        self._usage_counter = usage_counter
        self._metrics = metrics
        self.names = names
        self._producer = producer
        self.rejected = 0
        self._records = BatchConsumer(
            nc,
            js,
            stream=names.exec_stream,
            config=durable_config(names.state_consumer, names.exec_all, ack_wait_s=ack_wait_s),
            handler=self._handle_records,
            max_batch=max_batch,
            name=f"state:{names.tenant}",
            linger_s=linger_s,
        )
        self._draining: asyncio.Task[None] | None = None
        self.events_consumer = f"{names.state_consumer}_events"
        self._events = BatchConsumer(
            nc,
            js,
            stream=names.evt_stream,
            config=durable_config(self.events_consumer, names.evb, ack_wait_s=ack_wait_s),
            handler=self._handle_events,
            max_batch=max_batch,
            name=f"state-events:{names.tenant}",
            linger_s=linger_s,
        )

    async def start(self) -> None:
        await self._records.start()
        await self._events.start()
        self._draining = asyncio.create_task(
            self._drain_quietly(), name=f"state-events-drain:{self.names.tenant}"
        )

    async def stop(self) -> None:
        if self._draining is not None:
            self._draining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._draining
            self._draining = None
        await self._records.stop()
        await self._events.stop()

    async def drain_unbatched_events(self) -> int:
        """Store the events an earlier version left on the lifetimes' own subjects of the
        events stream, then purge them from it; returns how many messages it read.

        That version kept one message per decision on ``tm.<tenant>.evt.<lifetime>``. Once
        the stream keeps the batch subject only (``streams._batch_events``), no consumer
        reads those, so the ones the state service had not stored when the services were
        upgraded (whichever started first) would stay unstored until they aged out. The
        store keeps each event once (by lifetime and sequence): reading one again is
        harmless, and the purge makes the next start read nothing."""
        names = self.names
        sub = await self._js.subscribe(
            names.evt_all,
            stream=names.evt_stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            pending_msgs_limit=DRAIN_BATCH * 4,
        )
        read = 0
        try:
            # The server pushes from the moment the consumer exists: by the time it answers
            # this, some (or all) may be delivered already, so count those too.
            info = await sub.consumer_info()
            delivered = info.delivered.consumer_seq if info.delivered is not None else 0
            pending = (info.num_pending or 0) + (delivered or 0)
            while pending:
                chunk: list[Msg] = []
                while pending and len(chunk) < DRAIN_BATCH:
                    msg = await sub.next_msg(timeout=DRAIN_WAIT_S)
                    chunk.append(msg)
                    pending = msg.metadata.num_pending
                read += len(chunk)
                await self._store_events(chunk)
        finally:
            await sub.unsubscribe()
        if not read:
            return 0
        try:
            await self._js.purge_stream(names.evt_stream, subject=names.evt_all)
        except Exception as exc:
            # A tenant account's service user may not purge streams: they stay until their
            # max age, and each start reads them again (stored once all the same).
            logger.warning(
                "stored the %d event messages an earlier version left on %s; purging them "
                "was refused (%s), so they stay until their max age: an operator may run "
                "`nats stream purge %s --subject '%s'`",
                read,
                names.evt_all,
                exc,
                names.evt_stream,
                names.evt_all,
            )
            return read
        logger.info(
            "stored the %d event messages an earlier version left on %s, and purged them",
            read,
            names.evt_all,
        )
        return read

    async def _drain_quietly(self) -> None:
        try:
            await self.drain_unbatched_events()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next start tries again; nothing is lost meanwhile
            logger.warning("events left by an earlier version not stored yet: %s", exc)

    async def caught_up(self, *, within_s: float = STORED_WAIT_S) -> bool:
        """Wait until every record the record stream held when this was called is stored
        (or dead-lettered); False if that took longer than ``within_s``.

        The router decides on a record as soon as it is on the bus, so a caller may see
        a step's effect (an event, the lifetime's state) a moment before the record is
        stored. Reads of the history wait here first: whatever a caller saw before its
        read is in what the read returns."""
        with self._records.hurrying():
            return await records_stored(self._js, self.names, within_s=within_s)

    async def events_stored(self, *, within_s: float = STORED_WAIT_S) -> bool:
        """Wait until every lifetime event the event stream held when this was called is
        stored and folded into its lifetime's row; False if that took longer than
        ``within_s``. A caller that watched a lifetime reach a state then reads a row
        that has reached it too."""
        with self._events.hurrying():
            return await consumer_caught_up(
                self._js,
                self.names.evt_stream,
                self.events_consumer,
                within_s=within_s,
                what="lifetime events",
            )

    def consumers(self) -> list[tuple[str, str, str]]:
        """(tenant, stream, durable) of the two durable consumers this reads."""
        names = self.names
        return [
            (names.tenant, names.exec_stream, names.state_consumer),
            (names.tenant, names.evt_stream, self.events_consumer),
        ]

    async def _handle_records(self, batch: list[Msg]) -> None:
        if self._metrics is not None:
            self._metrics.count_redeliveries(self.names.tenant, self.names.state_consumer, batch)
        with log_context(tenant=self.names.tenant):
            await self._append_batch(batch)

    async def _append_batch(self, batch: list[Msg]) -> None:
        good: list[tuple[Msg, envelope_pb2.ExecutionEnvelope]] = []
        bad: list[tuple[Msg, str]] = []
        for msg in batch:
            try:
                envelope = decode_envelope(msg.data, expected_kind=message_type(msg))
                core.check_record(msg.subject, envelope)
            except ValidationError as exc:
                bad.append((msg, str(exc)))
                continue
            good.append((msg, envelope))
        if bad:
            await self.dead_letter(bad, kind="exec")
        if not good:
            return
        await self._store_in_order(good)
        crash_point("before_ack")
        await ack_all([msg for msg, _ in good])

    async def _store_in_order(self, good: list[tuple[Msg, envelope_pb2.ExecutionEnvelope]]) -> None:
        """Store a batch, retrying it in place until the store takes it.

        Records are stored in the stream's order, the order the router applied them in
        (replay follows the store's order). Handing a failed batch back to be redelivered
        later would let the records behind it be stored first: a step's record could
        then precede the record of the step that led to it. So a failing store holds
        this tenant's records back, kept leased, while the router goes on deciding."""
        records = [(msg.data, env) for msg, env in good]
        failures = 0
        while True:
            try:
                await self._append(records, publish_refs=False)
                return
            except Exception as exc:
                failures += 1
                delay = min(STORE_RETRY_MAX_S, STORE_RETRY_S * 2 ** (failures - 1))
                logger.warning(
                    "storing %d record(s) of tenant %s failed (try %d); again in %.1f s: %s",
                    len(records),
                    self.names.tenant,
                    failures,
                    delay,
                    exc,
                )
            await asyncio.sleep(delay)
            for msg, _ in good:
                # Still ours: JetStream must not hand them out again meanwhile.
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def append_and_publish(
        self, records: list[tuple[bytes, envelope_pb2.ExecutionEnvelope]]
    ) -> list[tuple[envelope_pb2.ExecutionEnvelope, int, bool]]:
        """Store records (one transaction) and publish their refs; return (record, seq, dup)."""
        return await self._append(records, publish_refs=True)

    async def _append(
        self, records: list[tuple[bytes, envelope_pb2.ExecutionEnvelope]], *, publish_refs: bool
    ) -> list[tuple[envelope_pb2.ExecutionEnvelope, int, bool]]:
        spans = self._append_spans(records) if self._tracer is not None else []
        try:
            return await self._append_and_publish(records, spans, publish_refs=publish_refs)
        except Exception as exc:
            for span in spans:
                if span is not None:
                    span.record_exception(exc)
            raise
        finally:
            for span in spans:
                if span is not None:
                    span.end()

    def _append_spans(
        self, records: list[tuple[bytes, envelope_pb2.ExecutionEnvelope]]
    ) -> list[Span | None]:
        """One span per traced record, under its step's span: from the batch's start until
        it is stored (and its ref published, for a record appended through the API)."""
        assert self._tracer is not None
        spans: list[Span | None] = []
        for _, env in records:
            header = env.header
            parent = parent_of(header)
            spans.append(
                None
                if parent is None
                else self._tracer.start_span(
                    "tickmesh.state.append",
                    context=parent,
                    kind=SpanKind.CONSUMER,
                    attributes={
                        ATTR_TENANT: header.tenant_id,
                        ATTR_LIFETIME: header.lifetime_id,
                        ATTR_NODE: header.node.id,
                        ATTR_EXECUTION: header.execution_id,
                        ATTR_ATTEMPT: header.attempt,
                        "tickmesh.batch_size": len(records),
                    },
                )
            )
        return spans

    async def _append_and_publish(
        self,
        records: list[tuple[bytes, envelope_pb2.ExecutionEnvelope]],
        spans: list[Span | None],
        *,
        publish_refs: bool,
    ) -> list[tuple[envelope_pb2.ExecutionEnvelope, int, bool]]:
        stored = await self._store.append_executions(self.names.tenant, records)
        crash_point("after_store_commit")
        for row, span in zip(stored, spans, strict=False):
            if span is not None:
                span.set_attribute("tickmesh.duplicate", row.duplicate)
                span.set_attribute("tickmesh.store_sequence", row.store_sequence)
        if self._metrics is not None:
            # Counted once, at the commit: a redelivered record comes back as a duplicate.
            for row, (_, env) in zip(stored, records, strict=True):
                if not row.duplicate:
                    self._metrics.record_stored(self.names.tenant, env)
        if publish_refs:
            await self._publish_refs(stored, records)
        if self._usage_counter is not None:
            # After the commit (and the refs), never holding up the next step: the router
            # decides without waiting for the counters. Before the acks, so a failure
            # here redelivers the batch. Duplicates are passed too: the counter's own
            # per-execution marker makes recording them again a no-op, which is what
            # heals a crash between the store commit and this call.
            await self._usage_counter.record(
                self.names.tenant,
                [
                    counted_from_envelope(env, row.persisted_at)
                    for row, (_, env) in zip(stored, records, strict=True)
                ],
            )
        return [
            (env, row.store_sequence, row.duplicate)
            for row, (_, env) in zip(stored, records, strict=True)
        ]

    async def _publish_refs(
        self,
        stored: list[StoredExecution],
        records: list[tuple[bytes, envelope_pb2.ExecutionEnvelope]],
    ) -> None:
        refs = []
        for row, (_, env) in zip(stored, records, strict=True):
            ref = core.ref_envelope(row, env, self._producer)
            refs.append(
                Outgoing(
                    self.names.ref(env.header.lifetime_id),
                    encode_envelope(ref),
                    {
                        HDR_MSG_ID: core.ref_message_id(row.execution_id, row.attempt),
                        HDR_TYPE: "execution_ref",
                        HDR_TENANT: self.names.tenant,
                        HDR_LIFETIME: env.header.lifetime_id,
                        HDR_EXECUTION: row.execution_id,
                        **(
                            {HDR_TRACEPARENT: env.header.trace_context.traceparent}
                            if env.header.trace_context.traceparent
                            else {}
                        ),
                    },
                )
            )
        await publish_batch(self._js, refs)
        crash_point("after_republish")

    async def _handle_events(self, batch: list[Msg]) -> None:
        """One transaction per batch: events stored, lifetime rows folded, then acks.

        A message is a router batch (``lifetime_event_batch``: the events of each decision
        it routed) or one decision's events; a batch is refused whole if any part of it
        is unreadable (it was written by one router at once)."""
        if self._metrics is not None:
            self._metrics.count_redeliveries(self.names.tenant, self.events_consumer, batch)
        await ack_all(await self._store_events(batch, refuse=term))

    async def _store_events(
        self,
        batch: list[Msg],
        *,
        refuse: Callable[[Msg, str], Awaitable[None]] | None = None,
    ) -> list[Msg]:
        """Store the events of ``batch`` in one transaction; returns the messages stored
        (the others unreadable: logged, and handed to ``refuse`` with the reason)."""
        good: list[Msg] = []
        routed: list[envelope_pb2.ExecutionEnvelope] = []
        for msg in batch:
            try:
                envelope = decode_envelope(msg.data, expected_kind=message_type(msg))
                decisions = decisions_of(envelope)
                if not decisions:
                    raise ValidationError(
                        "expected a lifetime_event, lifetime_events or lifetime_event_batch body"
                    )
                if envelope.header.tenant_id != self.names.tenant:
                    raise ValidationError(
                        f"event claims tenant {envelope.header.tenant_id!r} on a subject "
                        f"of tenant {self.names.tenant!r}"
                    )
                for decision in decisions:
                    core.check_events(decision)
            except ValidationError as exc:
                logger.error("unreadable event on %s: %s", msg.subject, exc)
                if refuse is not None:
                    await refuse(msg, str(exc))
                continue
            good.append(msg)
            for decision in decisions:
                if all(event.sequence > 0 for event in events_of(decision)):
                    routed.append(decision)  # a decision's events go to the store as they came
                else:
                    # Out-of-band events (sequence 0) are for watchers only.
                    routed.extend(
                        one for one in _one_per_event(decision) if one.lifetime_event.sequence > 0
                    )
        if routed:
            await self._store.apply_events(self.names.tenant, routed, core.fold_events)
        return good

    async def dead_letter(self, bad: list[tuple[Msg, str]], *, kind: str) -> None:
        """Copy each message to the dead-letter stream with its reason, emit an
        error event for its lifetime, and terminate it."""
        self.rejected += len(bad)
        out: list[Outgoing] = []
        live: list[Outgoing] = []
        for msg, reason in bad:
            headers = dict(msg.headers or {})
            headers.pop(HDR_MSG_ID, None)
            headers[HDR_REASON] = reason[:512]
            out.append(Outgoing(self.names.dlq(kind), msg.data, headers))
            lifetime = core.message_token(headers.get(HDR_LIFETIME, ""))
            event = core.error_event(
                self.names, lifetime, f"dead-lettered a {kind} message: {reason}", self._producer
            )
            live.append(
                Outgoing(
                    self.names.evt(lifetime),
                    encode_envelope(event),
                    {HDR_TYPE: "lifetime_event", HDR_TENANT: self.names.tenant},
                )
            )
        await publish_batch(self._js, out)
        # The error events are out of band (sequence 0): for whoever watches, not stored.
        await publish_live(self._nc, live)
        if self._metrics is not None:
            self._metrics.dead_lettered(self.names.tenant, kind, len(bad))
        for msg, reason in bad:
            logger.error(
                "dead-lettered %s message on %s at %s: %s",
                kind,
                msg.subject,
                datetime.now(UTC).isoformat(),
                reason,
            )
            await term(msg, reason)


def _one_per_event(
    envelope: envelope_pb2.ExecutionEnvelope,
) -> list[envelope_pb2.ExecutionEnvelope]:
    """The envelope as the store takes events: one ``lifetime_event`` each (a decision's
    ``lifetime_events`` split, each with the batch's header and its own sequence)."""
    if envelope.HasField("lifetime_event"):
        return [envelope]
    split = []
    for event in envelope.lifetime_events.events:
        one = envelope_pb2.ExecutionEnvelope(header=envelope.header, lifetime_event=event)
        one.header.sequence = event.sequence
        split.append(one)
    return split
