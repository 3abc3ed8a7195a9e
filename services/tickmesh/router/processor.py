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

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from nats.js.api import PubAck
from opentelemetry.trace import Link, Span, Tracer, get_current_span, use_span

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.runtime.errors import StatusError
from tickmesh.runtime.nats import (
    Outgoing,
    PublishError,
    publish_batch,
    publish_each,
    publish_live,
)
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
from tickmesh.sdk import (
    EVENT_KINDS,
    NotFoundError,
    decode_envelope,
    encode_envelope,
    encode_event_batch,
)
from tickmesh.sdk.errors import StatusCode
from tickmesh.sdk.timestamps import epoch_ns, timestamp_ns
from tickmesh.sdk.tracing import (
    ATTR_GRAPH,
    ATTR_LIFETIME,
    ATTR_TENANT,
    carrier_of,
    context_from,
)
from tickmesh.v1 import envelope_pb2, guardrail_pb2, header_pb2, lifetime_pb2, telemetry_pb2

from . import core
from .store import ConflictError, RouterStore, StateTooLargeError

logger = logging.getLogger(__name__)

MAX_CAS_RETRIES = 16
BATCH_HEADROOM_BYTES = 8 * 1024
"""Room left in a batch of events for its headers and envelope (less than the lifetime
state's, so that one decision's events always fit)."""
BATCH_ENTRY_OVERHEAD = 6
"""A decision's bytes in a batch beyond its events message: a tag and a length."""


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


@dataclass(frozen=True, slots=True)
class Job:
    """Inputs to apply to one lifetime (see :meth:`Processor.apply`)."""

    lifetime_id: str
    mutate: Mutation
    keys: Sequence[str]
    one_by_one: Callable[[], Sequence[Mutation]] | None = None
    """Makes the same inputs as ``mutate``, a mutation each, in order: when deciding on
    them together raises, the lifetime takes those before the one that raises, then fails
    (as replay, which applies one record at a time, does). Called only then."""


@dataclass(slots=True)
class _Staged:
    """A decision taken and not yet durable: what to write and publish."""

    job: Job
    lt: core.Lifetime
    revision: int
    """The lifetime's revision the decision was taken on (the compare-and-set's)."""
    changed: bool
    write: bool
    pending: list[rs.OutMessage]
    """Messages recorded for these inputs before (a redelivery) and maybe never out."""

    def queue_pending(self) -> None:
        # Ahead of the new messages, as they were decided first.
        if self.pending:
            self.lt.out[:0] = self.pending


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
        job = Job(lifetime_id, mutate, keys)
        fresh = False
        for _ in range(MAX_CAS_RETRIES):
            try:
                staged = await self._stage(tenant, job, fresh=fresh)
            except _MutationError as raised:
                if not fresh:
                    # Decided on the cached state, which another replica may have moved
                    # on: the refusal stands only if the stored state refuses it too.
                    fresh = True
                    continue
                raise raised.cause from raised.cause.__cause__
            fresh = True
            if staged.write:
                try:
                    await tenant.store.update(staged.lt.state, staged.revision)
                except ConflictError:
                    continue
            staged.queue_pending()
            await self._publish(tenant, staged.lt)
            return self._settled(tenant, staged)
        raise ContentionError(lifetime_id)

    async def apply_batch(self, tenant: Tenant, jobs: Sequence[Job]) -> list[Applied | Exception]:
        """:meth:`apply` for jobs on different lifetimes, with one round of
        compare-and-set writes and one round of publishes for all of them: for each
        job, what it applied or why it did not (each job stands alone, so one failure
        leaves the others applied). A job whose write lost a race is applied again on
        its own, from the lifetime's stored state.
        """
        results: list[Applied | Exception | None] = [None] * len(jobs)
        # Lifetimes not in the cache (e.g. after a restart) are read concurrently, not
        # one after another while deciding; a failed read fails its job below.
        await asyncio.gather(
            *(
                tenant.store.load(job.lifetime_id)
                for job in jobs
                if not tenant.store.is_cached(job.lifetime_id)
            ),
            return_exceptions=True,
        )
        staged: list[tuple[int, _Staged]] = []
        undecidable: list[tuple[int, Exception]] = []
        for i, job in enumerate(jobs):
            try:
                staged.append((i, await self._stage(tenant, job, fresh=False)))
            except _MutationError as raised:
                # Deciding on records reads and writes nothing: what raised will raise again.
                undecidable.append((i, raised.cause))
            except Exception as exc:
                results[i] = exc

        writing = [(i, s) for i, s in staged if s.write]
        written = await tenant.store.update_many([(s.lt.state, s.revision) for _, s in writing])
        lost_race: list[int] = []
        oversized: list[tuple[int, StateTooLargeError]] = []
        for (i, _), outcome in zip(writing, written, strict=True):
            if isinstance(outcome, ConflictError):
                lost_race.append(i)
            elif isinstance(outcome, StateTooLargeError):
                oversized.append((i, outcome))
            elif isinstance(outcome, Exception):
                results[i] = outcome

        apart = set(lost_race) | {i for i, _ in oversized}  # applied again, on their own
        ready = [(i, s) for i, s in staged if results[i] is None and i not in apart]
        for _, s in ready:
            s.queue_pending()
        routed = self._route(tenant, [s.lt for _, s in ready])
        outgoing = routed.stored
        try:
            answers: list[PubAck | BaseException] = await publish_each(tenant.link.js, outgoing)
        except Exception as exc:  # not sent at all (e.g. the connection is closed)
            answers = [exc] * len(outgoing)
        out: list[int] = []
        for n, (i, _) in enumerate(ready):
            failures = [
                (outgoing[k], answer)
                for k in routed.needs[n]
                if isinstance(answer := answers[k], BaseException)
            ]
            if failures:
                results[i] = PublishError(failures)
                continue
            out.append(n)
        await self._publish_live(tenant, [m for n in out for m in routed.live[n]])
        for n in out:
            i, s = ready[n]
            try:
                if s.lt.cancels:
                    await self._cancel(tenant, s.lt)
            except Exception as exc:
                results[i] = exc
                continue
            results[i] = self._settled(tenant, s)

        # A decision that cannot be taken (the decision raised: the same state and input
        # raise again) or whose state cannot be written would be redelivered and tried
        # again for ever: the lifetime fails instead, from its state before the decision
        # (before the input that raised, when several were decided together).
        cannot: list[tuple[int, Mutation, str]] = []
        for i, too in oversized:
            why = f"a decision was refused: {too}"
            cannot.append((i, _fail_with("StateTooLarge", why), why))
        for i, cause in undecidable:
            logger.error(
                "lifetime %s: deciding on its input raised; the lifetime fails",
                jobs[i].lifetime_id,
                exc_info=cause,
            )
            split = jobs[i].one_by_one
            cannot.append((i, _undecidable(cause, split() if split else ()), repr(cause)))
        if cannot:
            failing_now = await asyncio.gather(
                *(
                    self.apply(tenant, jobs[i].lifetime_id, failing, jobs[i].keys)
                    for i, failing, _ in cannot
                ),
                return_exceptions=True,
            )
            for (i, _, why), failing in zip(cannot, failing_now, strict=True):
                if not isinstance(failing, Applied | Exception):
                    raise failing
                logger.warning("lifetime %s fails: %s", jobs[i].lifetime_id, why)
                results[i] = failing

        if lost_race:
            retried = await asyncio.gather(
                *(
                    self.apply(tenant, jobs[i].lifetime_id, jobs[i].mutate, jobs[i].keys)
                    for i in lost_race
                ),
                return_exceptions=True,
            )
            for i, again in zip(lost_race, retried, strict=True):
                if not isinstance(again, Applied | Exception):
                    raise again
                results[i] = again
        return [r if r is not None else RuntimeError("job not applied") for r in results]

    async def _stage(self, tenant: Tenant, job: Job, *, fresh: bool) -> _Staged:
        """Load the lifetime and decide: what is to be written and published."""
        loaded = await tenant.store.load(job.lifetime_id, fresh=fresh)
        if loaded is None:
            raise NotFoundError(f"no lifetime {job.lifetime_id!r}")
        state = loaded.state
        graph = await tenant.store.get_graph(state.lifetime.graph.id, state.lifetime.graph.version)
        lt = core.Lifetime(state, graph, self._producer, _now(), tenant.guard)
        pending = self._pending_for(state, job.keys)
        pruned = self._prune(tenant, job.lifetime_id, state, lt.now)
        try:
            changed = job.mutate(lt)
        except Exception as exc:
            raise _MutationError(exc) from exc
        if changed:
            self._add_outbox(lt, ",".join(job.keys))
        return _Staged(job, lt, loaded.revision, changed, changed or pruned, pending)

    def _settled(self, tenant: Tenant, staged: _Staged) -> Applied:
        if staged.changed or staged.write:
            self._published(tenant, staged.lt, ",".join(staged.job.keys) if staged.changed else "")
        return Applied(staged.lt, staged.changed)

    @staticmethod
    def _published(tenant: Tenant, lt: core.Lifetime, key: str) -> None:
        """Remember that ``key``'s outbox entry is out (``lt``'s state is written and its
        messages published), so the lifetime's next write drops it; forget what that write
        dropped already. A finished lifetime is never written again: nothing to remember
        (remembering would keep one entry per lifetime ever run, for as long as the process
        lives)."""
        lifetime_id = lt.view.lifetime_id
        if lt.terminal:
            tenant.published.pop(lifetime_id, None)
            return
        # Forgotten only once a write dropped them: a decision refused, or a write lost,
        # in between must not leave their entries in the state for the whole retention.
        remembered = tenant.published.get(lifetime_id)
        if remembered:
            remembered.intersection_update(entry.key for entry in lt.state.outbox)
        if key:
            tenant.published.setdefault(lifetime_id, set()).add(key)
        elif remembered is not None and not remembered:
            del tenant.published[lifetime_id]

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
        mine = tenant.published.get(lifetime_id, ())
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
        routed = self._route(tenant, [lt])
        await publish_batch(tenant.link.js, routed.stored)
        await self._publish_live(tenant, routed.live[0])
        if lt.cancels:
            await self._cancel(tenant, lt)

    def _route(self, tenant: Tenant, decided: Sequence[core.Lifetime]) -> _Routed:
        """What the decisions publish: their requests and records as they are; their
        events, for the state service, in as few batch messages as fit (one per call,
        mostly), and each decision's events again on its lifetime's live subject."""
        names = tenant.names
        tenant_id = names.tenant
        routed = _Routed()
        events: list[tuple[int, rs.OutMessage]] = []
        for n, lt in enumerate(decided):
            traced = lt.state.trace_context.traceparent
            lifetime_id = lt.view.lifetime_id
            needs: list[int] = []
            live: list[Outgoing] = []
            for m in lt.out:
                headers = {
                    HDR_MSG_ID: m.msg_id,
                    HDR_TYPE: m.type,
                    HDR_TENANT: tenant_id,
                    HDR_LIFETIME: lifetime_id,
                }
                if m.type in EVENT_KINDS:
                    events.append((n, m))
                    live.append(Outgoing(m.subject, m.data, headers))
                    continue
                if m.execution_id:
                    headers[HDR_EXECUTION] = m.execution_id
                if traced:
                    headers[HDR_TRACEPARENT] = traced
                needs.append(len(routed.stored))
                routed.stored.append(Outgoing(m.subject, m.data, headers))
            routed.needs.append(needs)
            routed.live.append(live)
        limit = tenant.link.nc.max_payload - BATCH_HEADROOM_BYTES
        for part in _fitting(events, limit):
            index = len(routed.stored)
            routed.stored.append(self._event_batch(names, [m for _, m in part]))
            for n in {n for n, _ in part}:
                routed.needs[n].append(index)
        return routed

    def _event_batch(self, names: TenantNames, messages: Sequence[rs.OutMessage]) -> Outgoing:
        """One message holding the events messages of several decisions (its id is made
        of theirs, so publishing the same batch again is a duplicate; a decision's events
        republished in another batch are stored once by the state service, which keys
        them by lifetime and sequence)."""
        digest = hashlib.blake2b("\n".join(m.msg_id for m in messages).encode(), digest_size=16)
        header = header_pb2.EnvelopeHeader(tenant_id=names.tenant, producer=self._producer.proto())
        return Outgoing(
            names.evb,
            encode_event_batch(header, [m.data for m in messages]),
            {
                HDR_MSG_ID: f"evb:{digest.hexdigest()}",
                HDR_TYPE: "lifetime_event_batch",
                HDR_TENANT: names.tenant,
            },
        )

    @staticmethod
    async def _publish_live(tenant: Tenant, live: Sequence[Outgoing]) -> None:
        """Watchers' copy of the events: best effort (a watch that misses one reads it
        from the state service's store), so a failure here fails nothing."""
        try:
            await publish_live(tenant.link.nc, live)
        except Exception as exc:
            logger.warning("lifetime events not published live: %s", exc)

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


@dataclass(slots=True)
class _Routed:
    """What a round of decisions publishes (see :meth:`Processor._route`)."""

    stored: list[Outgoing] = field(default_factory=list)
    """To JetStream, each answered by a PubAck."""
    needs: list[list[int]] = field(default_factory=list)
    """For each decision, which of ``stored`` carry its messages."""
    live: list[list[Outgoing]] = field(default_factory=list)
    """For each decision, its events on its lifetime's live subject (core NATS)."""


def _fitting(
    events: Sequence[tuple[int, rs.OutMessage]], limit: int
) -> list[list[tuple[int, rs.OutMessage]]]:
    """``events`` in parts of at most ``limit`` bytes (each decision's events message
    fits in one part on its own: the lifetime's state, which holds it in its outbox, is
    written in one message with more headroom than a batch's)."""
    parts: list[list[tuple[int, rs.OutMessage]]] = []
    size = 0
    for item in events:
        cost = len(item[1].data) + BATCH_ENTRY_OVERHEAD
        if not parts or size + cost > limit:
            parts.append([item])
            size = cost
        else:
            parts[-1].append(item)
            size += cost
    return parts


class ContentionError(ConflictError, StatusError):
    """A lifetime's write lost every compare-and-set it tried to concurrent writers: the
    caller of an RPC is answered ABORTED, the status a caller retries the call on."""

    def __init__(self, lifetime_id: str) -> None:
        super().__init__(
            StatusCode.ABORTED,
            f"lifetime {lifetime_id}: concurrent writes won every compare-and-set: retry the call",
        )


class _MutationError(Exception):
    """A mutation raised (``cause``), as opposed to the reads and writes around it."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _undecidable(cause: Exception, one_by_one: Sequence[Mutation] = ()) -> Mutation:
    """Fail the lifetime at the first input whose decision raises, the inputs before it
    applied (each tried first on a copy of the state, as a decision that raises leaves
    the state it ran on half changed); at once, with ``cause``, without ``one_by_one``."""

    def fail(lt: core.Lifetime) -> bool:
        if lt.terminal:
            return False
        failure = cause
        guard = lt.guard
        for step in one_by_one:
            trial = rs.RouterLifetime()
            trial.CopyFrom(lt.state)
            decided: list[guardrail_pb2.GuardrailDecision] = []
            try:
                step(
                    core.Lifetime(trial, lt.graph, lt.producer, lt.now, _recording(guard, decided))
                )
            except Exception as raised:
                failure = raised
                break
            # The same step on the same state asks the same evaluations: each is taken from
            # the trial, so it is counted (metrics) and traced (spans) once.
            lt.guard = _replaying(guard, decided)
            try:
                step(lt)
            finally:
                lt.guard = guard
            if lt.terminal:
                return True
        core.fail_undecidable(lt, failure)
        return True

    return fail


def _recording(guard: core.Guard, decided: list[guardrail_pb2.GuardrailDecision]) -> core.Guard:
    """``guard``, keeping each decision it makes in ``decided``."""

    def record(
        lt: core.Lifetime,
        phase: guardrail_pb2.GuardrailPhase.ValueType,
        header: header_pb2.EnvelopeHeader,
        telemetry: telemetry_pb2.Telemetry,
    ) -> guardrail_pb2.GuardrailDecision:
        decision = guard(lt, phase, header, telemetry)
        decided.append(decision)
        return decision

    return record


def _replaying(guard: core.Guard, decided: list[guardrail_pb2.GuardrailDecision]) -> core.Guard:
    """The decisions ``decided`` in order, then ``guard`` itself (never reached when the
    step asks what it asked before)."""
    replayed = iter(decided)

    def replay(
        lt: core.Lifetime,
        phase: guardrail_pb2.GuardrailPhase.ValueType,
        header: header_pb2.EnvelopeHeader,
        telemetry: telemetry_pb2.Telemetry,
    ) -> guardrail_pb2.GuardrailDecision:
        decision = next(replayed, None)
        return decision if decision is not None else guard(lt, phase, header, telemetry)

    return replay


def _fail_with(error_type: str, message: str) -> Mutation:
    def fail(lt: core.Lifetime) -> bool:
        if lt.terminal:
            return False
        lt.fail(message, error_type=error_type)
        return True

    return fail


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
