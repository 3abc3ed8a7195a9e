"""Deterministic replay: re-drive a recorded lifetime through ``core``.

A lifetime's decisions depend only on its graph version, its input, the stored
execution records (applied in store order) and a few control inputs: how each wait
ended, which its SIGNAL_RECEIVED and WAIT_TIMED_OUT events record (read from the store
into ``RouterLifetime.wakes`` by :func:`with_recorded_wakes`). Replay
starts a fresh state with the same lifetime id, feeds the recorded results back
in store order (no executor runs) and compares every decision it arrives at with
the recorded one:

* every dispatch — (node, handler, iteration, parents), which the execution id
  encodes, and the request body by its digest (a plan asked with other inputs,
  a task with another input or config);
* every plan decision — it must still fit the graph (edges, max_iterations);
* the steps open at the end and the terminal state and output.

By default replay evaluates no guardrails (they read tenant usage that has moved
on): a step rejected before dispatch is a stored record and replays as such; a
result rejected *after* it was recorded replays as accepted, so such lifetimes may
report a request-digest divergence at the plan that received it.

Given :class:`Guardrails` (a guard, e.g. the router's ``Gate`` for the tenant, and
the policy versions it enforces and those the lifetime ran under), replay evaluates
them as the router does, so that a policy change shows as the decisions it changes:
a step the guard now refuses before dispatch (or no longer refuses), a result it now
rejects, a lifetime it now pauses or aborts. Every divergence then names the policy
versions that changed (``ReplayReport.policy_changes``), as it names a changed graph
digest. The router keeps no record of the policy versions a lifetime ran under: the
caller says which they were.

Replay runs no handler, so a change of handler code cannot show as a decision. Given
the code digests the caller runs now (handler name -> digest), replay compares them
with the digest each executor recorded (``ExecutorInfo.code_digest``) and reports each
handler whose recorded code differs, at its first such execution.

:class:`Redriver` is shared with fork (``fork.py``), which replays up to one
execution and continues live from there. A fork is replayed from the state it was
created with (``fork.replay_fork`` rebuilds it from the origin's records), then
through its own records as here.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.runtime import steps
from tickmesh.runtime.errors import StatusError
from tickmesh.runtime.records import require_records_stored
from tickmesh.sdk import ChannelSecurity, TransportError
from tickmesh.sdk._transport import create_channel
from tickmesh.sdk.errors import StatusCode
from tickmesh.sdk.timestamps import set_timestamp
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    guardrail_pb2,
    header_pb2,
    lifetime_pb2,
    state_service_pb2,
    state_service_pb2_grpc,
)
from tickmesh.v1 import router_service_pb2 as pb

from . import core

LS = lifetime_pb2
TENANT_METADATA_KEY = "x-tickmesh-tenant"
MAX_DIVERGENCES = 20
"""Replay stops collecting after this many (later ones mostly follow from the first)."""
PAGE = 1000


# --- where recorded history comes from ---------------------------------------------


class HistorySource(Protocol):
    """A lifetime's stored execution records, in store order, and its record (the state
    service)."""

    async def executions(
        self, tenant: str, lifetime_id: str
    ) -> list[execution_pb2.ExecutionRef]: ...

    async def lifetime(
        self, tenant: str, lifetime_id: str
    ) -> lifetime_pb2.AgentLifetime | None: ...

    async def lifetimes(
        self, tenant: str, page: LifetimePage
    ) -> tuple[list[lifetime_pb2.AgentLifetime], str]:
        """A page of the tenant's lifetime records, newest first, and the next page's
        token ("" at the end)."""
        ...

    async def events(
        self, tenant: str, lifetime_id: str, *, after_sequence: int, limit: int
    ) -> list[lifetime_pb2.LifetimeEvent]:
        """Up to ``limit`` of a lifetime's stored events after ``after_sequence``, in
        sequence order (the history a watch replays before it follows the live events)."""
        ...

    async def close(self) -> None: ...


class StoredRecord(Protocol):
    """The part of the state store's ``StoredExecution`` a :class:`StoreHistorySource` reads."""

    store_sequence: int
    persisted_at: datetime
    envelope: bytes


class ExecutionStore(Protocol):
    """The part of the state service's ``StateStore`` a :class:`StoreHistorySource` reads."""

    async def list_executions(
        self, tenant: str, lifetime_id: str, *, after_sequence: int = 0, limit: int = 100
    ) -> Sequence[Any]: ...

    async def get_lifetime(
        self, tenant: str, lifetime_id: str
    ) -> lifetime_pb2.AgentLifetime | None: ...

    async def list_lifetimes(
        self,
        tenant: str,
        *,
        before: str = "",
        states: Collection[int] = (),
        graph_id: str = "",
        limit: int = 100,
    ) -> list[lifetime_pb2.AgentLifetime]: ...

    async def list_events(
        self, tenant: str, lifetime_id: str, *, after_sequence: int = 0, limit: int = 1000
    ) -> list[lifetime_pb2.LifetimeEvent]: ...


@dataclass(frozen=True)
class LifetimePage:
    """Which page of lifetime records to read (ListLifetimes' request)."""

    size: int
    token: str = ""
    states: Collection[int] = ()
    graph_id: str = ""


def ref_of(stored: StoredRecord) -> execution_pb2.ExecutionRef:
    envelope = envelope_pb2.ExecutionEnvelope.FromString(stored.envelope)
    ref = execution_pb2.ExecutionRef(store_sequence=stored.store_sequence)
    # Not Timestamp.FromDatetime: a fork reads every record of the history before it can
    # decide anything.
    set_timestamp(ref.persisted_at, stored.persisted_at)
    if envelope.HasField("task_execution"):
        ref.task_execution.CopyFrom(envelope.task_execution)
    else:
        ref.plan_execution.CopyFrom(envelope.plan_execution)
    return ref


class StoreHistorySource:
    """Reads the state store in the same process (the embedded mesh).

    With ``caught_up`` (the state service's wait for the records on the bus), a read
    first waits until every record on the bus is stored, as ``StateService`` reads do:
    the router decides on a record before the store has it, so a lifetime that has
    ended may still have its last records on the way to the store."""

    def __init__(
        self,
        store: ExecutionStore,
        *,
        caught_up: Callable[[str], Awaitable[bool]] | None = None,
        events_caught_up: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        """``events_caught_up`` (the state service's wait for the lifetime events on the
        bus) makes lifetime reads wait as ``StateService`` lifetime reads do."""
        self._store = store
        self._caught_up = caught_up
        self._events_caught_up = events_caught_up

    async def executions(self, tenant: str, lifetime_id: str) -> list[execution_pb2.ExecutionRef]:
        if self._caught_up is not None:
            await require_records_stored(self._caught_up, tenant)
        refs: list[execution_pb2.ExecutionRef] = []
        after = 0
        while True:
            rows = await self._store.list_executions(
                tenant, lifetime_id, after_sequence=after, limit=PAGE
            )
            refs.extend(ref_of(r) for r in rows)
            if len(rows) < PAGE:
                return refs
            after = rows[-1].store_sequence

    async def lifetime(self, tenant: str, lifetime_id: str) -> lifetime_pb2.AgentLifetime | None:
        await self._rows_caught_up(tenant)
        return await self._store.get_lifetime(tenant, lifetime_id)

    async def lifetimes(
        self, tenant: str, page: LifetimePage
    ) -> tuple[list[lifetime_pb2.AgentLifetime], str]:
        await self._rows_caught_up(tenant)
        rows = await self._store.list_lifetimes(
            tenant,
            before=page.token,
            states=page.states,
            graph_id=page.graph_id,
            limit=page.size + 1,
        )
        more = len(rows) > page.size
        rows = rows[: page.size]
        return rows, rows[-1].lifetime_id if more and rows else ""

    async def events(
        self, tenant: str, lifetime_id: str, *, after_sequence: int, limit: int
    ) -> list[lifetime_pb2.LifetimeEvent]:
        if self._events_caught_up is not None:
            await require_records_stored(self._events_caught_up, tenant, what="lifetime events")
        return await self._store.list_events(
            tenant, lifetime_id, after_sequence=after_sequence, limit=limit
        )

    async def _rows_caught_up(self, tenant: str) -> None:
        if self._caught_up is not None:
            await require_records_stored(self._caught_up, tenant)
        if self._events_caught_up is not None:
            await require_records_stored(self._events_caught_up, tenant, what="lifetime events")

    async def close(self) -> None:
        return None


class StateRpcHistorySource:
    """Reads a remote state service: ``ListExecutions``, ``GetLifetimeRecord``,
    ``ListLifetimeRecords`` and ``ListLifetimeEvents``. A state service that does not
    answer is a ``TransportError`` (UNAVAILABLE to the router's callers), not an internal
    error."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 30.0,
        channel: grpc.aio.Channel | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        self._target = target
        self._channel = channel or create_channel(target, security=security)
        self._stub = state_service_pb2_grpc.StateServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def executions(self, tenant: str, lifetime_id: str) -> list[execution_pb2.ExecutionRef]:
        refs: list[execution_pb2.ExecutionRef] = []
        token = ""
        while True:
            with self._answered(f"the executions of lifetime {lifetime_id}"):
                response: state_service_pb2.ListExecutionsResponse = (
                    await self._stub.ListExecutions(
                        state_service_pb2.ListExecutionsRequest(
                            lifetime_id=lifetime_id, page_size=PAGE, page_token=token
                        ),
                        metadata=((TENANT_METADATA_KEY, tenant),),
                        timeout=self._timeout_s,
                    )
                )
            refs.extend(response.executions)
            token = response.next_page_token
            if not token:
                return refs

    async def lifetime(self, tenant: str, lifetime_id: str) -> lifetime_pb2.AgentLifetime | None:
        try:
            with self._answered(f"lifetime {lifetime_id}"):
                response: state_service_pb2.GetLifetimeRecordResponse = (
                    await self._stub.GetLifetimeRecord(
                        state_service_pb2.GetLifetimeRecordRequest(lifetime_id=lifetime_id),
                        metadata=((TENANT_METADATA_KEY, tenant),),
                        timeout=self._timeout_s,
                    )
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return response.lifetime

    async def lifetimes(
        self, tenant: str, page: LifetimePage
    ) -> tuple[list[lifetime_pb2.AgentLifetime], str]:
        with self._answered("a page of lifetimes"):
            response: state_service_pb2.ListLifetimeRecordsResponse = (
                await self._stub.ListLifetimeRecords(
                    state_service_pb2.ListLifetimeRecordsRequest(
                        page_size=page.size,
                        page_token=page.token,
                        states=[LS.LifetimeState.ValueType(s) for s in page.states],
                        graph_id=page.graph_id,
                    ),
                    metadata=((TENANT_METADATA_KEY, tenant),),
                    timeout=self._timeout_s,
                )
            )
        return list(response.lifetimes), response.next_page_token

    async def events(
        self, tenant: str, lifetime_id: str, *, after_sequence: int, limit: int
    ) -> list[lifetime_pb2.LifetimeEvent]:
        with self._answered(f"the events of lifetime {lifetime_id}"):
            response: state_service_pb2.ListLifetimeEventsResponse = (
                await self._stub.ListLifetimeEvents(
                    state_service_pb2.ListLifetimeEventsRequest(
                        lifetime_id=lifetime_id, after_sequence=after_sequence, page_size=limit
                    ),
                    metadata=((TENANT_METADATA_KEY, tenant),),
                    timeout=self._timeout_s,
                )
            )
        return list(response.events)

    @contextlib.contextmanager
    def _answered(self, what: str) -> Iterator[None]:
        """Turn a state service that did not answer into a TransportError naming it."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TransportError(
                    f"the state service at {self._target} did not answer for {what}: "
                    f"{exc.code().name} {exc.details()}"
                ) from exc
            raise

    async def close(self) -> None:
        await self._channel.close()

    def __repr__(self) -> str:
        return f"StateRpcHistorySource({self._target!r})"


async def stored_events(
    history: HistorySource,
    tenant: str,
    lifetime_id: str,
    *,
    after_sequence: int,
    before_sequence: int | None = None,
) -> AsyncIterator[lifetime_pb2.LifetimeEvent]:
    """A lifetime's stored events after ``after_sequence`` (and before
    ``before_sequence``, if given), in order, a page at a time."""
    after = after_sequence
    while True:
        page = await history.events(tenant, lifetime_id, after_sequence=after, limit=PAGE)
        for event in page:
            if before_sequence is not None and event.sequence >= before_sequence:
                return
            yield event
            after = event.sequence
        if len(page) < PAGE:
            return


def wakes_of(events: Iterable[lifetime_pb2.LifetimeEvent]) -> list[rs.WakeRecord]:
    """How a lifetime's waits ended, from its SIGNAL_RECEIVED and WAIT_TIMED_OUT events,
    in order (only those naming the waiting plan's execution: a router that kept its
    wakes in the state wrote events without it)."""
    wakes: list[rs.WakeRecord] = []
    for event in events:
        if not event.execution_id:
            continue
        if event.kind == LS.LIFETIME_EVENT_KIND_SIGNAL_RECEIVED:
            wakes.append(rs.WakeRecord(plan_execution_id=event.execution_id, signal=event.signal))
        elif event.kind == LS.LIFETIME_EVENT_KIND_WAIT_TIMED_OUT:
            wakes.append(rs.WakeRecord(plan_execution_id=event.execution_id, timed_out=True))
    return wakes


async def with_recorded_wakes(
    history: HistorySource, tenant: str, state: rs.RouterLifetime
) -> rs.RouterLifetime:
    """``state`` with every wait's end in ``wakes``, for replay and fork: those recorded
    as events (``wake_count`` of them) are read from the lifetime's stored events.

    Raises:
        StatusError: UNAVAILABLE when the store holds fewer of them than the state
            counts (the state service is still storing the lifetime's events).
    """
    if not state.wake_count:
        return state
    lifetime_id = state.lifetime.lifetime_id
    found = wakes_of(
        [event async for event in stored_events(history, tenant, lifetime_id, after_sequence=0)]
    )
    if len(found) < state.wake_count:
        raise StatusError(
            StatusCode.UNAVAILABLE,
            f"the state service holds {len(found)} of the {state.wake_count} signals and "
            f"wait timeouts of lifetime {lifetime_id} (retry shortly)",
        )
    complete = rs.RouterLifetime()
    complete.CopyFrom(state)
    complete.wakes.extend(found)
    return complete


@dataclass(frozen=True, slots=True)
class RecordedAbort:
    """Where an aborted lifetime's abort, and the pause it may have been aborted in, fell
    among its records (:func:`received_after_abort`): replay applies both there."""

    late: frozenset[str] = frozenset()
    """Executions whose records came after the abort (the steps it cancelled)."""
    while_paused: frozenset[str] = frozenset()
    """Executions whose records came while the lifetime was paused, up to the abort: what
    they led to was decided and held, then dropped unpublished by the abort."""


NOT_ABORTED = RecordedAbort()


async def received_after_abort(
    history: HistorySource, tenant: str, state: rs.RouterLifetime
) -> RecordedAbort:
    """Which records an aborted lifetime received after its abort (the steps in flight
    then, cancelled by it), and which while it was paused before it: replay pauses before
    the first of the latter and aborts before the first of the former, as the router did.
    Empty for a lifetime not aborted.

    Raises:
        StatusError: UNAVAILABLE when the store does not hold the abort's event yet.
    """
    view = state.lifetime
    if view.state != LS.LIFETIME_STATE_ABORTED:
        return NOT_ABORTED
    after = view.fork_origin.sequence if view.HasField("fork_origin") else 0
    events = [
        e async for e in stored_events(history, tenant, view.lifetime_id, after_sequence=after)
    ]
    aborted_at: int | None = None
    paused_at: int | None = None  # the pause the abort came in, if it came in one
    for e in events:
        if e.kind != LS.LIFETIME_EVENT_KIND_STATE_CHANGED:
            continue
        if e.state == LS.LIFETIME_STATE_ABORTED:
            aborted_at = e.sequence
            break
        paused_at = e.sequence if e.state == LS.LIFETIME_STATE_PAUSED else None
    if aborted_at is None:
        raise StatusError(
            StatusCode.UNAVAILABLE,
            f"the state service does not hold the abort of lifetime {view.lifetime_id} yet "
            "(retry shortly)",
        )
    finished = [e for e in events if e.kind == LS.LIFETIME_EVENT_KIND_STEP_FINISHED]
    late = {e.execution_id for e in finished if e.sequence > aborted_at}
    paused: set[str] = set()
    if paused_at is not None:
        paused = {e.execution_id for e in finished if paused_at < e.sequence < aborted_at}
    # Still open in the state read: a record of it in the store came after the abort too.
    return RecordedAbort(
        late=frozenset(late | set(state.in_flight)), while_paused=frozenset(paused)
    )


async def recorded_from_history(
    history: HistorySource, tenant: str, lifetime_id: str
) -> rs.RouterLifetime | None:
    """What replay and fork read of a lifetime the router no longer holds (finished, then
    past ``finished_retention_s``), rebuilt from the state service: its record, its input
    (its STARTED event), how its waits ended and the steps it left open (its events).
    None when the state service has no record of it either.

    A fork's history starts after its fork point: its STARTED event carries what its
    replay re-forks it with (its input, its replacement output).

    Raises:
        StatusError: FAILED_PRECONDITION for a lifetime recorded without its input (it
            began under an earlier version).
    """
    view = await history.lifetime(tenant, lifetime_id)
    if view is None:
        return None
    after = view.fork_origin.sequence if view.HasField("fork_origin") else 0
    events = [e async for e in stored_events(history, tenant, lifetime_id, after_sequence=after)]
    started = next((e for e in events if e.kind == LS.LIFETIME_EVENT_KIND_STARTED), None)
    if started is None or not started.HasField("input"):
        raise StatusError(
            StatusCode.FAILED_PRECONDITION,
            f"lifetime {lifetime_id} is no longer held by the router, and its stored "
            "history has no input to re-drive it from (it began under an earlier version)",
        )
    state = rs.RouterLifetime()
    state.lifetime.CopyFrom(view)
    state.lifetime.input.CopyFrom(started.input)
    if started.HasField("replacement_output"):
        state.fork_replacement.CopyFrom(started.replacement_output)
    finished = {e.execution_id for e in events if e.kind == LS.LIFETIME_EVENT_KIND_STEP_FINISHED}
    for event in events:  # left open: dispatched, never finished
        dispatched = event.kind == LS.LIFETIME_EVENT_KIND_STEP_DISPATCHED
        if dispatched and event.execution_id not in finished:
            state.in_flight[event.execution_id].node_id = event.node.id
    state.wakes.extend(wakes_of(events))
    return state


# --- re-driving ------------------------------------------------------------------------


def record_of(
    ref: execution_pb2.ExecutionRef,
) -> execution_pb2.TaskExecution | execution_pb2.PlanExecution:
    return ref.task_execution if ref.HasField("task_execution") else ref.plan_execution


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One request the re-driven lifetime decided to publish."""

    execution_id: str
    node_id: str
    handler: str
    iteration: int
    parents: tuple[str, ...]
    digest: str
    envelope: envelope_pb2.ExecutionEnvelope
    refused: str = ""
    """Why the guard refused the step before dispatch (its rejection record's error);
    empty when it was published."""

    @classmethod
    def of(cls, envelope: envelope_pb2.ExecutionEnvelope, refused: str = "") -> Dispatch:
        header = envelope.header
        return cls(
            execution_id=header.execution_id,
            node_id=header.node.id,
            handler=header.node.handler,
            iteration=header.iteration,
            parents=tuple(header.parent_execution_ids),
            digest=request_digest(envelope),
            envelope=envelope,
            refused=refused,
        )

    def describe(self) -> str:
        return _describe(self.node_id, self.handler, self.iteration, self.parents)


def _describe(node: str, handler: str, iteration: int, parents: Sequence[str]) -> str:
    short = ",".join(p[:8] for p in parents) or "-"
    return f"dispatch {node} (handler {handler}, iteration {iteration}, parents {short})"


def request_digest(envelope: envelope_pb2.ExecutionEnvelope) -> str:
    """The digest executors record for a request body (``request_digest``)."""
    body = envelope.task_request if envelope.HasField("task_request") else envelope.plan_request
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()


class Redriver:
    """A fresh state for a recorded lifetime, driven by its records through ``core``.

    Nothing is published: requests the lifetime decides are collected in
    :attr:`dispatched` (in decision order), events are dropped. ``guard`` decides on
    each step as in the router (by default it allows everything).

    A fork first fast-forwards the state without core (``fastforward.py``), which
    keeps no requests of the steps that finished meanwhile; :meth:`adopt` takes
    over from there, and :meth:`decided` answers for those steps too.
    """

    def __init__(
        self,
        recorded: rs.RouterLifetime,
        graph: Any,
        producer: core.Producer,
        now: datetime,
        guard: core.Guard = core.allow_all,
    ) -> None:
        view = recorded.lifetime
        state = core.new_lifetime(
            tenant_id=view.tenant_id,
            lifetime_id=view.lifetime_id,
            graph=graph,
            input_payload=view.input,
            client_request_id=view.client_request_id,
            labels=dict(view.labels),
        )
        self._begin(core.Lifetime(state, graph, producer, now, guard, quiet=True), recorded.wakes)
        core.start(self.lt)
        self._collect()

    @classmethod
    def resuming(cls, lt: core.Lifetime, wakes: Iterable[rs.WakeRecord]) -> Redriver:
        """Go on from a lifetime built outside a redrive (a fork's first state); the
        requests it published quietly (``lt.quiet``) are the steps decided so far."""
        r = cls.__new__(cls)
        r._begin(lt, wakes)
        r._collect()
        return r

    def _begin(self, lt: core.Lifetime, wakes: Iterable[rs.WakeRecord]) -> None:
        self.lt = lt
        self.dispatched: dict[str, Dispatch] = {}
        self._decided_before: set[str] = set()
        self._wakes = {w.plan_execution_id: w for w in wakes}

    def decided(self, execution_id: str) -> bool:
        """Whether the re-driven lifetime has dispatched that step so far."""
        return execution_id in self.dispatched or execution_id in self._decided_before

    def adopt(
        self, requests: Sequence[envelope_pb2.ExecutionEnvelope], decided: Iterable[str]
    ) -> None:
        """Go on from a state advanced outside core (``lt.state`` already holds it).

        ``requests`` are the requests of the steps in flight there, in decision order;
        ``decided`` names every step dispatched so far, finished or not.
        """
        self.dispatched = {}
        for envelope in requests:
            self.dispatched.setdefault(envelope.header.execution_id, Dispatch.of(envelope))
        self._decided_before = set(decided)

    def _collect(self) -> None:
        refused = {m.execution_id: m for m in self.lt.out if m.type in _REJECTION_RECORDS}
        for envelope in self.lt.requests:
            execution = envelope.header.execution_id
            if execution not in self.dispatched:
                rejection = refused.get(execution)
                reason = "" if rejection is None else _rejection_reason(rejection)
                self.dispatched[execution] = Dispatch.of(envelope, reason)
        self.lt.requests.clear()
        self.lt.out.clear()
        self.lt.cancels.clear()

    def wake(self) -> bool:
        """If the lifetime waits and its recorded wait ended, end it the same way."""
        lt = self.lt
        if lt.view.state != LS.LIFETIME_STATE_WAITING or not lt.state.HasField("wait"):
            return False
        woke = self._wakes.get(lt.state.wait.plan_execution_id)
        if woke is None:
            return False
        if woke.timed_out:
            core.wait_timed_out(lt)
        else:
            core.signal(lt, woke.signal)
        self._collect()
        return True

    def pause(self) -> None:
        """Pause the lifetime (the steps it decides from now on are held, as they were)."""
        core.pause(self.lt, "")
        self._collect()

    def abort_as(self, recorded: lifetime_pb2.AgentLifetime) -> None:
        """Abort the lifetime with the recorded abort's message (``core.abort`` words it)."""
        message = recorded.error.message
        core.abort(self.lt, "" if message == "aborted" else message.removeprefix("aborted: "))
        self._collect()

    def ends_step(self, ref: execution_pb2.ExecutionRef) -> bool:
        """Whether feeding ``ref`` finishes a step in flight (a final attempt)."""
        header = record_of(ref).header
        flight = self.lt.state.in_flight.get(header.execution_id)
        if flight is None:
            return False
        retry = self.lt.nodes[flight.node_id].retry
        if ref.HasField("task_execution"):
            return steps.task_attempt_is_final(retry, header.attempt, ref.task_execution.result)
        return steps.plan_attempt_is_final(retry, header.attempt, ref.plan_execution.result)

    def feed(self, ref: execution_pb2.ExecutionRef) -> bool:
        """Apply one record; False when it changes nothing (not final, not in flight).

        A decision that raises fails the lifetime from its state before that decision, as
        the router does (``core.fail_undecidable``)."""
        lt = self.lt
        before = lt.state.SerializeToString()
        try:
            changed = core.on_execution(lt, ref)
        except Exception as cause:
            state = rs.RouterLifetime.FromString(before)
            self.lt = core.Lifetime(state, lt.graph, lt.producer, lt.now, lt.guard, quiet=True)
            core.fail_undecidable(self.lt, cause)
            changed = True
        self._collect()
        return changed


_REJECTION_RECORDS = frozenset({"task_execution", "plan_execution"})
"""``OutMessage.type`` of the record ``core`` writes for a step its guard refused."""


def _rejection_reason(message: rs.OutMessage) -> str:
    record = envelope_pb2.ExecutionEnvelope.FromString(message.data)
    if record.HasField("task_execution"):
        return _recorded_refusal(record.task_execution) or "rejected"
    return _recorded_refusal(record.plan_execution) or "rejected"


# --- replay -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Guardrails:
    """Guardrails for a replay to evaluate (by default it evaluates none)."""

    guard: core.Guard
    """Decides on each step, e.g. the router's ``Gate`` for the lifetime's tenant."""
    policies: Sequence[guardrail_pb2.Policy]
    """The policy versions ``guard`` enforces."""
    recorded: Sequence[guardrail_pb2.Policy]
    """The policy versions in force when the lifetime ran."""


def policy_changes(
    recorded: Sequence[guardrail_pb2.Policy], replayed: Sequence[guardrail_pb2.Policy]
) -> list[str]:
    """How the policies replayed against differ from the recorded ones, by policy id."""
    before = {p.policy_id: p for p in recorded}
    after = {p.policy_id: p for p in replayed}
    changes: list[str] = []
    for policy_id in sorted(before.keys() | after.keys()):
        old, new = before.get(policy_id), after.get(policy_id)
        if old is None and new is not None:
            changes.append(f"{policy_id} added: v{new.version} {new.digest[:12]}")
        elif new is None and old is not None:
            changes.append(f"{policy_id} removed: recorded v{old.version} {old.digest[:12]}")
        elif old is not None and new is not None and _policy_key(old) != _policy_key(new):
            changes.append(
                f"{policy_id}: recorded v{old.version} {old.digest[:12]}, "
                f"replayed v{new.version} {new.digest[:12]}"
            )
    return changes


def _policy_key(policy: guardrail_pb2.Policy) -> tuple[int, str, str, bool]:
    return policy.version, policy.digest, policy.graph_id, policy.dry_run


@dataclass
class ReplayReport:
    reproduced: bool
    decisions_checked: int
    divergences: list[pb.ReplayDivergence] = field(default_factory=list)
    graph: header_pb2.GraphRef = field(default_factory=header_pb2.GraphRef)
    policy_changes: list[str] = field(default_factory=list)
    """With :class:`Guardrails`: the policy versions that differ from the recorded ones
    (:func:`policy_changes`); every divergence message starts with them too."""
    dispatched: list[Dispatch] = field(default_factory=list)
    """Every step replay decided on, in decision order (refused ones included)."""

    def proto(self) -> pb.ReplayLifetimeResponse:
        return pb.ReplayLifetimeResponse(
            reproduced=self.reproduced,
            decisions_checked=self.decisions_checked,
            divergences=self.divergences,
            graph=self.graph,
        )


def replay(
    recorded: rs.RouterLifetime,
    graph: Any,
    records: Sequence[execution_pb2.ExecutionRef],
    *,
    producer: core.Producer,
    now: datetime | None = None,
    guardrails: Guardrails | None = None,
    code_digests: Mapping[str, str] | None = None,
    start: Redriver | None = None,
    after_abort: RecordedAbort = NOT_ABORTED,
) -> ReplayReport:
    """Re-drive ``recorded`` through ``graph`` with ``records`` (store order); compare.

    With ``guardrails``, steps are also decided by ``guardrails.guard``. With
    ``code_digests`` (handler name -> the code digest run now), recorded executions of
    those handlers are compared by code digest too (:func:`code_changes`). ``start``
    is where the re-drive begins when it is not a fresh lifetime (a fork's first state,
    see ``fork.replay_fork``). ``after_abort`` names the executions whose records came
    after the lifetime was aborted, or while it was paused before that
    (:func:`received_after_abort`)."""
    now = now or datetime.now(UTC)
    ref_graph = recorded.lifetime.graph
    note = ""
    if graph.digest != ref_graph.digest:
        note = (
            f"graph digest changed: recorded v{ref_graph.version} {ref_graph.digest[:12]}, "
            f"replayed v{graph.version} {graph.digest[:12]}; "
        )
    changes: list[str] = []
    if guardrails is not None:
        changes = policy_changes(guardrails.recorded, guardrails.policies)
        if changes:
            note += f"guardrail policy changed: {'; '.join(changes)}; "
    guard = core.allow_all if guardrails is None else guardrails.guard
    r = start if start is not None else Redriver(recorded, graph, producer, now, guard)
    divergences: list[pb.ReplayDivergence] = []
    checked = 0

    def diverge(
        execution_id: str, node: header_pb2.NodeRef, expected: str, actual: str, message: str
    ) -> None:
        if len(divergences) < MAX_DIVERGENCES:
            divergences.append(
                pb.ReplayDivergence(
                    sequence=r.lt.view.last_sequence,
                    execution_id=execution_id,
                    node=node,
                    expected=expected,
                    actual=actual,
                    message=note + message,
                )
            )

    changed_code = code_changes(records, code_digests or {})
    seen: set[str] = set()
    ended_early = False
    for position, ref in enumerate(records):
        record = record_of(ref)
        header = record.header
        exec_id = header.execution_id
        try:
            r.wake()
        except core.RoutingError as exc:
            diverge(exec_id, header.node, "the recorded signal wakes the lifetime", str(exc), "")
        code = changed_code.get(position)
        if code is not None:
            diverge(exec_id, header.node, code.recorded, code.current, code.message())
        if exec_id not in seen:
            seen.add(exec_id)
            expected = _describe(
                header.node.id, header.node.handler, header.iteration, header.parent_execution_ids
            )
            got = r.dispatched.get(exec_id)
            if got is None:
                diverge(
                    exec_id,
                    header.node,
                    expected,
                    _what_replay_did(r, seen),
                    "the recorded step was not dispatched by replay",
                )
                continue
            checked += 1
            if got.handler != header.node.handler:
                diverge(exec_id, header.node, expected, got.describe(), "the handler changed")
            elif record.request_digest and got.digest != record.request_digest:
                diverge(
                    exec_id,
                    header.node,
                    f"request {record.request_digest[:12]}",
                    f"request {got.digest[:12]}",
                    "the step would be asked with another request (input, inputs, config "
                    "or signal)",
                )
            elif guardrails is not None and bool(got.refused) != core._refused_before_dispatch(ref):
                if got.refused:
                    diverge(
                        exec_id,
                        header.node,
                        expected,
                        f"refused: {got.refused}",
                        "the guardrail now rejects the step before dispatch",
                    )
                else:
                    diverge(
                        exec_id,
                        header.node,
                        f"refused: {_recorded_refusal(record)}",
                        expected,
                        "the guardrail no longer rejects the step before dispatch",
                    )
        if (
            exec_id in after_abort.while_paused
            and not r.lt.terminal
            and r.lt.view.state != LS.LIFETIME_STATE_PAUSED
        ):
            r.pause()  # the record arrived while the lifetime was paused
        if exec_id in after_abort.late and not r.lt.terminal and r.ends_step(ref):
            r.abort_as(recorded.lifetime)  # the record arrived after the abort
        was_terminal = r.lt.terminal
        if not r.feed(ref):
            continue
        if ref.HasField("plan_execution") and not was_terminal:
            checked += 1  # the recorded plan decision, applied to this graph
        if r.lt.terminal and not was_terminal:
            checked += 1
            if not _same_end(r.lt.view, recorded.lifetime):
                ended_early = True
                decision = (
                    f"plan decision {ref.plan_execution.result.WhichOneof('decision')}"
                    if ref.HasField("plan_execution")
                    else f"result of {header.node.id}"
                )
                diverge(
                    exec_id,
                    header.node,
                    f"{decision} leads to {_state_text(recorded.lifetime)}",
                    _state_text(r.lt.view),
                    "the lifetime ends here in replay, not as recorded"
                    if r.lt.view.error.type not in ("RoutingError", "MaxIterationsExceeded")
                    else "the recorded decision does not fit the graph",
                )
    try:
        r.wake()
    except core.RoutingError as exc:
        diverge("", header_pb2.NodeRef(), "the recorded signal wakes the lifetime", str(exc), "")
    view = recorded.lifetime
    if view.state == LS.LIFETIME_STATE_ABORTED and not r.lt.terminal:
        r.abort_as(view)
    elif view.state == LS.LIFETIME_STATE_PAUSED:
        core.pause(r.lt, "")
    # Steps decided but never recorded must be the ones the recorded lifetime left open.
    still_open = set(recorded.in_flight) | {m.execution_id for m in recorded.held}
    for exec_id, got in r.dispatched.items():
        if exec_id in seen:
            continue
        if r.lt.terminal and exec_id not in r.lt.state.in_flight:
            # Decided and held, then dropped unpublished when the lifetime ended, as the
            # recorded lifetime's were (which its state no longer names).
            continue
        checked += 1
        if exec_id not in still_open:
            diverge(
                exec_id,
                got.envelope.header.node,
                "no such step",
                got.describe(),
                "replay dispatched a step the recorded lifetime never ran",
            )
    for exec_id in sorted(still_open - set(r.dispatched)):
        flight = recorded.in_flight.get(exec_id)
        diverge(
            exec_id,
            header_pb2.NodeRef(id=flight.node_id if flight else ""),
            f"dispatch {flight.node_id if flight else exec_id} (left open)",
            "not dispatched",
            "the recorded lifetime dispatched a step replay did not",
        )
    checked += 1
    if not ended_early and not _same_end(r.lt.view, view):
        diverge(
            "",
            header_pb2.NodeRef(),
            _state_text(view),
            _state_text(r.lt.view),
            "the lifetime ends differently",
        )
    return ReplayReport(
        reproduced=not divergences,
        decisions_checked=checked,
        divergences=divergences,
        graph=header_pb2.GraphRef(id=graph.id, version=graph.version, digest=graph.digest),
        policy_changes=changes,
        dispatched=list(r.dispatched.values()),
    )


@dataclass(frozen=True, slots=True)
class CodeChange:
    """A handler whose recorded code differs from the code the caller runs now."""

    handler: str
    recorded: str
    """The code digest recorded at the handler's first execution that differs."""
    current: str
    differing: int
    """How many of the handler's recorded executions ran other code than ``current``."""
    compared: int
    """How many of the handler's recorded executions carry a code digest."""

    def message(self) -> str:
        return (
            f"handler code changed: {self.handler} recorded {self.recorded[:12]}, "
            f"current {self.current[:12]} ({self.differing} of {self.compared} recorded "
            "executions)"
        )


def code_changes(
    records: Sequence[execution_pb2.ExecutionRef], current: Mapping[str, str]
) -> dict[int, CodeChange]:
    """The handlers of ``current`` whose recorded code differs, by the position in
    ``records`` of their first differing execution.

    Records without a code digest (the router's own rejection records, executors that
    report none) are not compared: they say nothing about the code.
    """
    first: dict[str, tuple[int, str]] = {}
    differing: dict[str, int] = {}
    compared: dict[str, int] = {}
    for position, ref in enumerate(records):
        record = record_of(ref)
        handler, digest = record.header.node.handler, record.executor.code_digest
        if handler not in current or not digest:
            continue
        compared[handler] = compared.get(handler, 0) + 1
        if digest != current[handler]:
            differing[handler] = differing.get(handler, 0) + 1
            first.setdefault(handler, (position, digest))
    return {
        position: CodeChange(
            handler, digest, current[handler], differing[handler], compared[handler]
        )
        for handler, (position, digest) in first.items()
    }


def _recorded_refusal(record: execution_pb2.TaskExecution | execution_pb2.PlanExecution) -> str:
    if isinstance(record, execution_pb2.TaskExecution):
        return record.result.error.message
    return record.result.fail.error.message


def _same_end(replayed: lifetime_pb2.AgentLifetime, recorded: lifetime_pb2.AgentLifetime) -> bool:
    if replayed.state != recorded.state or _error_of(replayed) != _error_of(recorded):
        return False
    return replayed.output.SerializeToString(
        deterministic=True
    ) == recorded.output.SerializeToString(deterministic=True)


def _error_of(view: lifetime_pb2.AgentLifetime) -> str:
    """How a lifetime's error is compared: by its message; a decision that raised, by the
    exception's type only (its message may hold what the clock changes: an envelope's
    size counts its timestamps' bytes)."""
    if view.error.type == core.DECISION_ERROR:
        return view.error.message.split("(", 1)[0]
    return view.error.message


def _state_text(view: lifetime_pb2.AgentLifetime) -> str:
    text = LS.LifetimeState.Name(view.state).removeprefix("LIFETIME_STATE_")
    if view.error.message:
        text += f": {view.error.message}"
    return text


def _what_replay_did(r: Redriver, seen: set[str]) -> str:
    if r.lt.terminal:
        return f"lifetime already {_state_text(r.lt.view)}"
    pending = [d.describe() for i, d in r.dispatched.items() if i not in seen]
    if pending:
        return "; ".join(pending[-3:])
    return f"lifetime {_state_text(r.lt.view)}, nothing dispatched"
