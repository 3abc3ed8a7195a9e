"""The step loop's decisions, as pure functions over one lifetime's state.

Every function here takes a :class:`Lifetime` (the stored RouterLifetime plus
its graph) and records what to publish in ``lifetime.out``; it never touches
the network. The caller persists the state by compare-and-set and only then
publishes the messages, so a decision is never taken twice from stale state.
Routing uses no randomness: replaying the same records through the same graph
version reproduces the same decisions and execution ids.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, lru_cache

from google.protobuf import timestamp_pb2

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.runtime import steps
from tickmesh.runtime.blobs import DEFAULT_INLINE_LIMIT, MIN_OFFLOAD_BYTES
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import check_envelope_size, encode_envelope, execution_id
from tickmesh.sdk.ids import uuid7
from tickmesh.sdk.timestamps import timestamp_ns, timestamp_of
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

DEFAULT_MAX_ITERATIONS = 100
MAX_WAIT_S = 100 * 366 * 86_400
"""The longest timeout a plan may wait for a signal: about a century (a timestamp holds
years up to 9999; a deadline past that cannot even be written down)."""
MAX_STEP_S = MAX_WAIT_S
"""The longest a step may take, every attempt and backoff included (graph validation
refuses a node that could take longer): its deadline is a timestamp too."""
START_GROUP = "start"
MAX_SIGNAL_IDS = 256
"""The signal ids a lifetime remembers, for deduplication: a SignalLifetime call retried
with the same id is ignored unless 256 other signals came in between."""

LS = lifetime_pb2
TERMINAL = frozenset(
    {LS.LIFETIME_STATE_COMPLETED, LS.LIFETIME_STATE_FAILED, LS.LIFETIME_STATE_ABORTED}
)
ALLOWING = frozenset({guardrail_pb2.GUARDRAIL_ACTION_ALLOW})

Guard = Callable[
    [
        "Lifetime",
        "guardrail_pb2.GuardrailPhase.ValueType",
        header_pb2.EnvelopeHeader,
        telemetry_pb2.Telemetry,
    ],
    guardrail_pb2.GuardrailDecision,
]
"""(lifetime, phase, header, telemetry of this execution or its estimate) -> decision."""


def allow_all(
    lifetime: Lifetime,
    phase: guardrail_pb2.GuardrailPhase.ValueType,
    header: header_pb2.EnvelopeHeader,
    usage: telemetry_pb2.Telemetry,
) -> guardrail_pb2.GuardrailDecision:
    return guardrail_pb2.GuardrailDecision(action=guardrail_pb2.GUARDRAIL_ACTION_ALLOW, phase=phase)


@dataclass(frozen=True, slots=True)
class Producer:
    service: str
    version: str
    instance: str

    def proto(self) -> header_pb2.Producer:
        return header_pb2.Producer(
            service=self.service, version=self.version, instance=self.instance
        )


@lru_cache(maxsize=1024)
def _tenant_names(tenant_id: str) -> TenantNames:
    """A tenant's names, checked and built once per tenant rather than per decision."""
    return TenantNames(tenant_id)


@cache
def _producer_proto(producer: Producer) -> header_pb2.Producer:
    """The producer's proto, built once (headers copy it, never change it)."""
    return producer.proto()


_OPEN_EVENTS = rs.OutMessage()
"""Holds the place of a decision's events message until it is sealed (see Lifetime.out)."""


class RoutingError(Exception):
    """A plan's decision does not fit the graph (the lifetime fails with this message)."""


@dataclass(frozen=True, slots=True)
class GraphIndex:
    """What decisions look up in a graph, read from it once rather than on every step."""

    nodes: dict[str, graph_pb2.Node]
    plans: dict[str, graph_pb2.Node | None]
    """node id -> the plan its results go to (see :func:`downstream_plan`)."""
    deadlines_ns: dict[str, int]
    """node id -> how long after its dispatch a step of it may still finish."""


_INDEXES: dict[int, tuple[graph_pb2.AgentGraph, GraphIndex]] = {}
_MAX_INDEXES = 1024


def index_of(graph: graph_pb2.AgentGraph) -> GraphIndex:
    """The graph's index, built once per graph object (a graph version is immutable; the
    router holds each one it routes on). Keyed by identity, with the graph kept in the
    entry so its id cannot be reused while the entry lives."""
    entry = _INDEXES.get(id(graph))
    if entry is not None and entry[0] is graph:
        return entry[1]
    nodes = {n.id: n for n in graph.nodes}
    plans: dict[str, graph_pb2.Node | None] = {}
    for edge in graph.edges:
        if edge.kind != graph_pb2.EDGE_KIND_FINAL and edge.from_node_id not in plans:
            plans[edge.from_node_id] = nodes.get(edge.to_node_id)
    index = GraphIndex(
        nodes=nodes,
        plans=plans,
        deadlines_ns={node.id: _deadline_ns(node) for node in graph.nodes},
    )
    if len(_INDEXES) >= _MAX_INDEXES:
        _INDEXES.clear()
    _INDEXES[id(graph)] = (graph, index)
    return index


@dataclass
class Lifetime:
    """One lifetime being decided on: its stored state, its graph, and what to publish."""

    state: rs.RouterLifetime
    graph: graph_pb2.AgentGraph
    producer: Producer
    now: datetime
    guard: Guard = allow_all
    emitted: list[rs.OutMessage] = field(default_factory=list)
    """What the decision publishes so far; its events message may still be open (read
    ``out``)."""
    cancels: list[str] = field(default_factory=list)
    """Execution ids whose in-flight work must be cancelled (published on core NATS)."""
    quiet: bool = False
    """Re-driving recorded history (replay, fork): events are counted but not encoded, and
    requests are kept as envelopes in ``requests`` instead of encoded messages."""
    requests: list[envelope_pb2.ExecutionEnvelope] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.index = index_of(self.graph)
        self.nodes = self.index.nodes
        self.names = _tenant_names(self.state.lifetime.tenant_id)
        self._now_ts = timestamp_of(self.now)
        self.now_ns = timestamp_ns(self._now_ts)
        """``now`` in nanoseconds since the epoch."""
        self._header: header_pb2.EnvelopeHeader | None = None
        """What every header of this decision shares (see ``base_header``)."""
        self._events: envelope_pb2.ExecutionEnvelope | None = None
        """The decision's events message while it is open (see ``out``)."""
        self._events_at = 0

    @property
    def view(self) -> lifetime_pb2.AgentLifetime:
        return self.state.lifetime

    @property
    def terminal(self) -> bool:
        return self.view.state in TERMINAL

    def timestamp(self) -> timestamp_pb2.Timestamp:
        return timestamp_pb2.Timestamp(seconds=self._now_ts.seconds, nanos=self._now_ts.nanos)

    # --- events ----------------------------------------------------------
    def event(
        self, kind: lifetime_pb2.LifetimeEventKind.ValueType, **fields: object
    ) -> lifetime_pb2.LifetimeEvent:
        view = self.state.lifetime
        view.last_sequence += 1
        view.updated_at.CopyFrom(self._now_ts)
        if self.quiet:
            return lifetime_pb2.LifetimeEvent(
                sequence=view.last_sequence, kind=kind, at=self._now_ts, state=view.state
            )
        # One message per decision: its events go into one envelope (built in place), which
        # takes the place in `emitted` where the first of them happened (see `out`).
        batch = self._events
        if batch is None:
            batch = self._events = envelope_pb2.ExecutionEnvelope()
            self._events_at = len(self.emitted)
            self.emitted.append(_OPEN_EVENTS)
        # One call that sets (and copies) every field in C, rather than one per field.
        return batch.lifetime_events.events.add(
            sequence=view.last_sequence,
            kind=kind,
            at=self._now_ts,
            state=view.state,
            **{name: value for name, value in fields.items() if value is not None},
        )

    @property
    def out(self) -> list[rs.OutMessage]:
        """The messages the decision publishes, in the order they were decided; its events
        are one message, where the first of them happened."""
        if self._events is not None:
            self._seal_events()
        return self.emitted

    def _seal_events(self) -> None:
        envelope = self._events
        assert envelope is not None
        self._events = None
        events = envelope.lifetime_events.events
        first = events[0]
        header = envelope.header
        self.fill_header(header)
        header.sequence = first.sequence
        lifetime_id = self.view.lifetime_id
        if len(events) == 1:
            # One event travels as it always has (a lifetime_event body, its own id).
            single = lifetime_pb2.LifetimeEvent()
            single.CopyFrom(first)
            envelope.lifetime_event.CopyFrom(single)
            header.execution_id = single.execution_id
            if single.HasField("node"):
                header.node.CopyFrom(single.node)
            msg_id, kind = f"evt:{lifetime_id}:{single.sequence}", "lifetime_event"
        else:
            last = events[-1].sequence
            msg_id, kind = f"evt:{lifetime_id}:{first.sequence}-{last}", "lifetime_events"
        self.emitted[self._events_at] = rs.OutMessage(
            subject=self.names.evt(lifetime_id),
            msg_id=msg_id,
            type=kind,
            data=encode_envelope(envelope),
        )

    def set_state(
        self,
        state: lifetime_pb2.LifetimeState.ValueType,
        *,
        message: str = "",
        error: result_pb2.ErrorInfo | None = None,
        output: payload_pb2.Payload | None = None,
    ) -> None:
        if self.view.state == state:
            return
        self.view.state = state
        if error is not None:
            self.view.error.CopyFrom(error)
        if output is not None:
            self.view.output.CopyFrom(output)
        if state in TERMINAL:
            self.view.finished_at.CopyFrom(self.timestamp())
            for held in self.state.held:  # decided while paused, never published
                self.state.in_flight.pop(held.execution_id, None)
            self.state.ClearField("held")
            self.state.ClearField("wait")
            self.view.waiting_signal = ""
            self.cancels.extend(sorted(self.state.in_flight))
        self.event(
            LS.LIFETIME_EVENT_KIND_STATE_CHANGED,
            message=message or LS.LifetimeState.Name(state),
            error=error,
            output=output,
        )

    def fail(self, message: str, error_type: str = "LifetimeFailed") -> None:
        self.set_state(
            LS.LIFETIME_STATE_FAILED,
            message=message,
            error=result_pb2.ErrorInfo(type=error_type, message=message),
        )

    # --- headers ---------------------------------------------------------
    def base_header(self) -> header_pb2.EnvelopeHeader:
        header = header_pb2.EnvelopeHeader()
        self.fill_header(header)
        return header

    def fill_header(self, header: header_pb2.EnvelopeHeader) -> None:
        """Make ``header`` (empty) this lifetime's base header, with a new envelope id."""
        shared = self._header
        if shared is None:
            shared = self._header = self._shared_header()
        header.CopyFrom(shared)
        header.envelope_id = uuid7()

    def identity_changed(self) -> None:
        """Call after changing what headers carry (the trace context, the lifetime's
        identity): the next header is built from the state again."""
        self._header = None

    def _shared_header(self) -> header_pb2.EnvelopeHeader:
        # Built once per decision and copied into each header: the fields come from the
        # lifetime's identity and the decision's clock, which a decision does not change
        # (see identity_changed).
        view = self.state.lifetime
        return header_pb2.EnvelopeHeader(
            # The lifetime's span: each step's spans join its trace (unset: tracing off).
            trace_context=(
                self.state.trace_context if self.state.HasField("trace_context") else None
            ),
            tenant_id=view.tenant_id,
            lifetime_id=view.lifetime_id,
            graph=view.graph,
            created_at=self._now_ts,
            mode=view.mode or header_pb2.EXECUTION_MODE_LIVE,
            fork_origin=view.fork_origin if view.HasField("fork_origin") else None,
            producer=_producer_proto(self.producer),
            # A protobuf map is copied through the Mapping ABC, even when empty.
            labels=view.labels if view.labels else None,
        )


# --- starting ---------------------------------------------------------------


def new_lifetime(
    *,
    tenant_id: str,
    lifetime_id: str,
    graph: graph_pb2.AgentGraph,
    input_payload: payload_pb2.Payload,
    client_request_id: str,
    labels: dict[str, str],
) -> rs.RouterLifetime:
    state = rs.RouterLifetime()
    view = state.lifetime
    view.lifetime_id = lifetime_id
    view.tenant_id = tenant_id
    view.graph.CopyFrom(
        header_pb2.GraphRef(id=graph.id, version=graph.version, digest=graph.digest)
    )
    view.state = LS.LIFETIME_STATE_RUNNING
    view.input.CopyFrom(input_payload)
    view.client_request_id = client_request_id
    view.mode = header_pb2.EXECUTION_MODE_LIVE
    view.labels.update(labels)
    return state


def start(lt: Lifetime) -> None:
    """Record STARTED and dispatch the entry node."""
    lt.view.created_at.CopyFrom(lt.timestamp())
    lt.event(
        LS.LIFETIME_EVENT_KIND_STARTED,
        message=f"started graph {lt.graph.id} v{lt.graph.version}",
        input=lt.view.input,
    )
    entry = lt.nodes[lt.graph.entry_node_id]
    if entry.kind == graph_pb2.NODE_KIND_PLAN:
        dispatch_plan(lt, entry, inputs=[], parents=[], edge=None)
    else:
        dispatch_task(lt, entry, lt.view.input, parents=[], group=START_GROUP, edge=None)


# --- dispatching ------------------------------------------------------------


def _next_iteration(lt: Lifetime, node: graph_pb2.Node) -> int | None:
    iteration = lt.state.iterations.get(node.id, 0) + 1
    cap = lt.graph.max_iterations or DEFAULT_MAX_ITERATIONS
    if iteration > cap:
        lt.fail(
            f"node {node.id!r} would run {iteration} times, over the graph's max_iterations {cap}",
            "MaxIterationsExceeded",
        )
        return None
    return iteration


def _fill_request_header(
    lt: Lifetime,
    header: header_pb2.EnvelopeHeader,
    node: graph_pb2.Node,
    iteration: int,
    parents: Iterable[str],
    edge: graph_pb2.Edge | None,
) -> None:
    parents = sorted(parents)
    lt.fill_header(header)
    exec_id = execution_id(lt.view.tenant_id, lt.view.lifetime_id, parents, node.id, iteration)
    header.execution_id = exec_id
    header.attempt = 1
    header.iteration = iteration
    target = header.node
    target.id = node.id
    target.kind = node.kind
    target.handler = node.handler
    header.parent_execution_ids.extend(parents)
    if edge is not None:
        header.edge.id = edge.id
        header.edge.kind = edge.kind
    header.idempotency_key = f"req:{exec_id}"
    deadline_ns = lt.index.deadlines_ns.get(node.id)
    if deadline_ns is None:  # pragma: no cover - every node of the graph is indexed
        deadline_ns = _deadline_ns(node)
    header.deadline.FromNanoseconds(lt.now_ns + deadline_ns)


def _deadline_ns(node: graph_pb2.Node) -> int:
    """How long after its dispatch a step of ``node`` may still finish: every attempt's
    timeout plus the backoff between attempts."""
    timeout = node.timeout.ToTimedelta().total_seconds() if node.HasField("timeout") else 0.0
    attempts = steps.max_attempts(node.retry)
    deadline_ns = int(steps.timeout_seconds(timeout) * attempts * 1e9) + int(
        steps.total_backoff_seconds(node.retry, attempts) * 1e9
    )
    # A graph registered before validation bounded it could hold more: no timestamp
    # holds a deadline past the year 9999.
    return min(deadline_ns, MAX_STEP_S * 10**9)


def output_share(width: int) -> int:
    """The ``output_inline_limit`` of each of ``width`` tasks dispatched together (0 for
    one task: the pool's own limit).

    Their outputs wait in the lifetime's state for the join and travel together in the
    plan's request, so they share one inline budget, the pool's default inline limit:
    a larger output goes to the blob store and the plan reads it by reference. Never
    below ``MIN_OFFLOAD_BYTES``, where a reference would save nothing."""
    if width <= 1:
        return 0
    return max(MIN_OFFLOAD_BYTES, DEFAULT_INLINE_LIMIT // width)


def output_shares(lt: Lifetime, tasks: Sequence[graph_pb2.Node]) -> list[int]:
    """The ``output_share`` of each of ``tasks``, dispatched together: the width is that of
    the join each one reports to (its downstream plan), not the whole decision's."""
    if len(tasks) == 1:
        return [0]  # (most decisions: a task alone in its join)
    joins = [lt.index.plans.get(task.id) for task in tasks]
    widths = Counter(plan.id if plan is not None else "" for plan in joins)
    return [output_share(widths[plan.id if plan is not None else ""]) for plan in joins]


def dispatch_task(
    lt: Lifetime,
    node: graph_pb2.Node,
    input_payload: payload_pb2.Payload,
    *,
    parents: list[str],
    group: str,
    edge: graph_pb2.Edge | None,
    output_limit: int = 0,
) -> str | None:
    iteration = _next_iteration(lt, node)
    if iteration is None:
        return None
    # Built in place: constructing the parts first and then the envelope copies each.
    envelope = envelope_pb2.ExecutionEnvelope()
    header = envelope.header
    _fill_request_header(lt, header, node, iteration, parents, edge)
    if output_limit:
        header.output_inline_limit = output_limit
    request = envelope.task_request
    request.input.CopyFrom(input_payload)
    request.config.CopyFrom(node.config)
    request.retry.CopyFrom(node.retry)
    if node.HasField("timeout"):
        request.timeout.CopyFrom(node.timeout)
    _record_dispatch(lt, node, header, group)
    _register_join(lt, node, header.execution_id, group)
    _guarded_publish(lt, node, envelope, "task")
    return header.execution_id


def dispatch_plan(
    lt: Lifetime,
    node: graph_pb2.Node,
    *,
    inputs: list[request_pb2.PlanInput],
    parents: list[str],
    edge: graph_pb2.Edge | None,
    signal: request_pb2.SignalDelivery | None = None,
) -> str | None:
    iteration = _next_iteration(lt, node)
    if iteration is None:
        return None
    envelope = envelope_pb2.ExecutionEnvelope()
    header = envelope.header
    _fill_request_header(lt, header, node, iteration, parents, edge)
    request = envelope.plan_request
    request.goal.CopyFrom(lt.view.input)
    request.inputs.extend(sorted(inputs, key=lambda i: i.execution_id))
    request.config.CopyFrom(node.config)
    request.retry.CopyFrom(node.retry)
    if signal is not None:
        request.signal.CopyFrom(signal)
    if node.HasField("timeout"):
        request.timeout.CopyFrom(node.timeout)
    _record_dispatch(lt, node, header, group=header.execution_id)
    lt.state.in_flight[header.execution_id].plan_inputs.extend(request.inputs)
    _guarded_publish(lt, node, envelope, "plan")
    return header.execution_id


def _record_dispatch(
    lt: Lifetime, node: graph_pb2.Node, header: header_pb2.EnvelopeHeader, group: str
) -> None:
    lt.state.iterations[node.id] = header.iteration
    flight = lt.state.in_flight[header.execution_id]
    flight.node_id = node.id
    flight.group = group
    flight.dispatched_at.CopyFrom(lt.timestamp())


def _register_join(lt: Lifetime, node: graph_pb2.Node, exec_id: str, group: str) -> None:
    target = downstream_plan(lt, node)
    if target is None:
        return
    join = lt.state.joins[f"{group}/{target.id}"]
    join.plan_node_id = target.id
    join.expected.append(exec_id)


def downstream_plan(lt: Lifetime, task: graph_pb2.Node) -> graph_pb2.Node | None:
    """The plan ``task``'s results go to: the target of its first non-final edge."""
    return lt.index.plans.get(task.id)


def _guarded_publish(
    lt: Lifetime, node: graph_pb2.Node, envelope: envelope_pb2.ExecutionEnvelope, kind: str
) -> None:
    header = envelope.header
    decision = lt.guard(
        lt, guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH, header, telemetry_pb2.Telemetry()
    )
    if lt.quiet:
        # Not encoded, but refused as encoding would refuse it live: a request too large
        # for one message fails the decision the same way (the re-drive of replay and fork
        # must fail where the router failed). Its parts come from checked records and
        # graphs; its size is what they can add up to.
        check_envelope_size(envelope.ByteSize())
    message = rs.OutMessage(
        subject=lt.names.work("task" if kind == "task" else "plan", node.handler),
        msg_id=header.idempotency_key,
        type=f"{kind}_request",
        data=b"" if lt.quiet else encode_envelope(envelope),
        execution_id=header.execution_id,
    )
    if lt.quiet:
        lt.requests.append(envelope)
    rejecting = decision.action not in _PROCEEDING
    if rejecting:
        _dispatched_event(lt, header)  # decided, then refused: both are in the history
    proceed = _act_on(lt, decision, header)
    if lt.terminal:
        # Aborted by this very decision: the step never leaves.
        _forget(lt, header.execution_id)
        return
    if not proceed:
        # REJECT_EXECUTION, or an action this router does not know (fail closed): the step
        # is recorded as rejected through the store, like any finished step.
        _publish_rejection(lt, envelope, decision)
        return
    if lt.view.state == LS.LIFETIME_STATE_PAUSED:
        lt.state.held.append(message)  # STEP_DISPATCHED is recorded when it is released
        return
    _dispatched_event(lt, header)
    lt.emitted.append(message)


_PROCEEDING = frozenset(
    {
        guardrail_pb2.GUARDRAIL_ACTION_ALLOW,
        guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME,
        guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME,
    }
)
"""Actions after which the step is published, held or dropped rather than rejected."""


def _dispatched_event(lt: Lifetime, header: header_pb2.EnvelopeHeader) -> None:
    lt.event(
        LS.LIFETIME_EVENT_KIND_STEP_DISPATCHED,
        execution_id=header.execution_id,
        node=header.node,
        attempt=header.attempt,
        message=f"dispatched {header.node.id} (iteration {header.iteration})",
    )


def _forget(lt: Lifetime, execution_id: str) -> None:
    """Drop a step that was decided but never published."""
    lt.state.in_flight.pop(execution_id, None)
    if execution_id in lt.cancels:
        lt.cancels.remove(execution_id)


_STRICTNESS: dict[int, int] = {
    guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION: 1,
    guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME: 2,
    guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME: 3,
}
_REJECT: int = guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
_WOULD: dict[int, str] = {
    guardrail_pb2.GUARDRAIL_ACTION_UNSPECIFIED: "rejected the step",
    guardrail_pb2.GUARDRAIL_ACTION_ALLOW: "rejected the step",
    guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION: "rejected the step",
    guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME: "paused the lifetime",
    guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME: "aborted the lifetime",
}


def _act_on(
    lt: Lifetime, decision: guardrail_pb2.GuardrailDecision, header: header_pb2.EnvelopeHeader
) -> bool:
    """Record a non-ALLOW decision; return whether the step may proceed."""
    action = decision.action
    if action == guardrail_pb2.GUARDRAIL_ACTION_ALLOW:
        if decision.dry_run and (decision.violations or decision.reason):
            # A dry-run policy objected: record what it would have done, enforce nothing.
            would = max(
                (v.action for v in decision.violations),
                key=lambda a: _STRICTNESS.get(a, 0),
                default=guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION,
            )
            rules = ", ".join(v.rule_id for v in decision.violations) or decision.reason
            lt.event(
                LS.LIFETIME_EVENT_KIND_GUARDRAIL,
                execution_id=header.execution_id,
                node=header.node,
                guardrail=decision,
                message=f"dry run: would have {_WOULD.get(would, _WOULD[_REJECT])}: {rules}",
            )
        return True
    rules = ", ".join(v.rule_id for v in decision.violations) or decision.reason
    lt.event(
        LS.LIFETIME_EVENT_KIND_GUARDRAIL,
        execution_id=header.execution_id,
        node=header.node,
        guardrail=decision,
        message=f"{guardrail_pb2.GuardrailAction.Name(action)}: {rules}",
    )
    if action == guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME:
        lt.set_state(LS.LIFETIME_STATE_PAUSED, message=f"paused by guardrail: {rules}")
        return True  # the step is held until resume
    if action == guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME:
        lt.set_state(
            LS.LIFETIME_STATE_ABORTED,
            message=f"aborted by guardrail: {rules}",
            error=result_pb2.ErrorInfo(
                type="guardrail.aborted", message=f"aborted by guardrail: {rules}"
            ),
        )
        return False
    return False  # REJECT_EXECUTION, or an unknown action: fail closed


def _publish_rejection(
    lt: Lifetime, request: envelope_pb2.ExecutionEnvelope, decision: guardrail_pb2.GuardrailDecision
) -> None:
    """A rejected step is recorded like any other: its record goes through the store."""
    header = request.header
    reason = ", ".join(v.message or v.rule_id for v in decision.violations) or decision.reason
    error = result_pb2.ErrorInfo(type="guardrail.rejected", message=reason, retryable=False)
    digest = hashlib.sha256(
        request.task_request.SerializeToString(deterministic=True)
        if request.HasField("task_request")
        else request.plan_request.SerializeToString(deterministic=True)
    ).hexdigest()
    record = envelope_pb2.ExecutionEnvelope(header=lt.base_header())
    record.header.CopyFrom(header)
    record.header.envelope_id = uuid7()
    if request.HasField("task_request"):
        record.task_execution.CopyFrom(
            execution_pb2.TaskExecution(
                header=header,
                request_digest=digest,
                result=result_pb2.TaskResult(status=result_pb2.TASK_STATUS_REJECTED, error=error),
                started_at=lt.timestamp(),
                finished_at=lt.timestamp(),
            )
        )
        kind = "task_execution"
    else:
        record.plan_execution.CopyFrom(
            execution_pb2.PlanExecution(
                header=header,
                request_digest=digest,
                result=result_pb2.PlanResult(
                    fail=result_pb2.FailDecision(error=error), rationale="rejected by guardrail"
                ),
                started_at=lt.timestamp(),
                finished_at=lt.timestamp(),
            )
        )
        kind = "plan_execution"
    lt.emitted.append(
        rs.OutMessage(
            subject=lt.names.exec(lt.view.lifetime_id),
            msg_id=f"exec:{header.execution_id}:{header.attempt}",
            type=kind,
            data=encode_envelope(record),
            execution_id=header.execution_id,
        )
    )


# --- results ----------------------------------------------------------------


Recorded = execution_pb2.ExecutionRef | envelope_pb2.ExecutionEnvelope
"""A durable execution record as the router reads it: a ref the state service published
for a record appended through its API, or the record's own envelope, read from the
record stream (both carry it as ``task_execution`` or ``plan_execution``)."""


def record_kind(recorded: Recorded) -> str | None:
    """``task_execution``, ``plan_execution``, or None when it carries no record."""
    if isinstance(recorded, execution_pb2.ExecutionRef):
        return recorded.WhichOneof("record")
    kind = recorded.WhichOneof("body")
    return kind if kind in ("task_execution", "plan_execution") else None


def on_execution(lt: Lifetime, ref: Recorded) -> bool:
    """Apply one durable execution record. Returns False when it changes nothing
    (a duplicate, a non-final attempt, or a record for a step not in flight)."""
    kind = record_kind(ref)
    if kind == "task_execution":
        header = ref.task_execution.header
    elif kind == "plan_execution":
        header = ref.plan_execution.header
    else:
        return False
    exec_id = header.execution_id
    flight = lt.state.in_flight.get(exec_id)
    if flight is None:
        return False
    node = lt.nodes.get(flight.node_id)
    if node is None:  # pragma: no cover - the graph is immutable
        return False
    # What went wrong, for a step that failed: the event's error (None when it did not).
    error: result_pb2.ErrorInfo | None = None
    if kind == "task_execution":
        result = ref.task_execution.result
        if not steps.task_attempt_is_final(node.retry, header.attempt, result):
            return False
        telemetry = result.telemetry
        if result.status != result_pb2.TASK_STATUS_SUCCEEDED and result.HasField("error"):
            error = result.error
    else:
        plan_result = ref.plan_execution.result
        if not steps.plan_attempt_is_final(node.retry, header.attempt, plan_result):
            return False
        telemetry = plan_result.telemetry
        if plan_result.HasField("error"):
            error = plan_result.error
    group = flight.group
    plan_inputs = list(flight.plan_inputs)
    del lt.state.in_flight[exec_id]
    _add_usage(lt.view, telemetry)
    lt.event(
        LS.LIFETIME_EVENT_KIND_STEP_FINISHED,
        execution_id=exec_id,
        node=header.node,
        attempt=header.attempt,
        telemetry=telemetry,
        message=_finished_message(ref),
        error=error,
    )
    if lt.terminal:
        return True
    if _refused_before_dispatch(ref):
        # The router's own rejection record, back from the store: the guard decided on
        # this step already. Judging it again would add a second decision (and fail a
        # refused plan as if it had run); it finishes like any rejected step.
        proceed = True
    else:
        decision = lt.guard(lt, guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT, header, telemetry)
        # No STEP_DISPATCHED here, refused or not: the step's dispatch is in the history
        # already, and a second one reads as a double dispatch.
        proceed = _act_on(lt, decision, header)
        if lt.terminal:
            return True
    if kind == "task_execution":
        rejected = None if proceed else decision
        _task_finished(lt, node, ref.task_execution, group, rejected)
    else:
        if not proceed:
            lt.fail(f"plan {node.id} rejected by guardrail after it decided", "guardrail.rejected")
            return True
        _plan_decided(lt, node, ref.plan_execution, plan_inputs)
    return True


def _refused_before_dispatch(ref: Recorded) -> bool:
    """Whether ``ref`` is a record :func:`_publish_rejection` wrote (no handler ran).

    Such a record names no executor; the executor pool names the executor session in
    every record it writes, so an executor cannot pass its result off as one of these
    (and skip the post-result check) by reporting the same error type."""
    if ref.HasField("task_execution"):
        record = ref.task_execution
        return (
            not record.executor.executor_id
            and record.result.status == result_pb2.TASK_STATUS_REJECTED
            and record.result.error.type == "guardrail.rejected"
        )
    plan = ref.plan_execution
    return (
        not plan.executor.executor_id
        and plan.result.WhichOneof("decision") == "fail"
        and plan.result.fail.error.type == "guardrail.rejected"
        and plan.result.rationale == "rejected by guardrail"
    )


def _finished_message(ref: Recorded) -> str:
    if ref.HasField("task_execution"):
        status = result_pb2.TaskStatus.Name(ref.task_execution.result.status)
        return f"{ref.task_execution.header.node.id}: {status.removeprefix('TASK_STATUS_').lower()}"
    decision = ref.plan_execution.result.WhichOneof("decision") or "error"
    return f"{ref.plan_execution.header.node.id}: {decision}"


def _add_usage(view: lifetime_pb2.AgentLifetime, telemetry: telemetry_pb2.Telemetry) -> None:
    totals = view.totals
    totals.input_tokens += telemetry.input_tokens
    totals.output_tokens += telemetry.output_tokens
    totals.cost_micros += telemetry.cost_micros
    totals.model_calls += telemetry.model_calls
    totals.tool_calls += telemetry.tool_calls
    for name, value in telemetry.custom_metrics.items():
        totals.custom_metrics[name] += value
    view.execution_count += 1


def _task_finished(
    lt: Lifetime,
    node: graph_pb2.Node,
    record: execution_pb2.TaskExecution,
    group: str,
    rejected: guardrail_pb2.GuardrailDecision | None,
) -> None:
    target = downstream_plan(lt, node)
    if target is None:
        lt.fail(f"task {node.id} has no plan to report to")
        return
    key = f"{group}/{target.id}"
    join = lt.state.joins[key]
    join.plan_node_id = target.id
    result = record.result
    item = join.finished.add(
        execution_id=record.header.execution_id,
        node=record.header.node,
        status=result.status,
        telemetry=result.telemetry,
    )
    if rejected is not None:
        item.status = result_pb2.TASK_STATUS_REJECTED
        item.guardrail.CopyFrom(rejected)
        item.error.CopyFrom(
            result_pb2.ErrorInfo(
                type="guardrail.rejected",
                message=rejected.reason or ", ".join(v.rule_id for v in rejected.violations),
            )
        )
    elif result.status == result_pb2.TASK_STATUS_SUCCEEDED:
        item.output.CopyFrom(result.output)
    else:
        item.error.CopyFrom(result.error)
        if result.status == result_pb2.TASK_STATUS_REJECTED:
            item.guardrail.action = guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    if not join.fired and _join_satisfied(target.join, len(join.expected), len(join.finished)):
        join.fired = True
        inputs = list(join.finished)
        parents = [i.execution_id for i in inputs]
        edge = _edge(lt, node.id, target.id)
        dispatch_plan(lt, target, inputs=inputs, parents=parents, edge=edge)
    if join.fired and len(join.finished) >= len(join.expected):
        del lt.state.joins[key]


def _join_satisfied(policy: graph_pb2.JoinPolicy, expected: int, finished: int) -> bool:
    if policy.mode == graph_pb2.JOIN_MODE_ANY:
        return finished >= 1
    if policy.mode == graph_pb2.JOIN_MODE_QUORUM:
        return finished >= min(max(policy.quorum, 1), expected)
    return finished >= expected


def _edge(lt: Lifetime, from_id: str, to_id: str) -> graph_pb2.Edge | None:
    for edge in lt.graph.edges:
        if edge.from_node_id == from_id and edge.to_node_id == to_id:
            return edge
    return None


def _plan_decided(
    lt: Lifetime,
    node: graph_pb2.Node,
    record: execution_pb2.PlanExecution,
    inputs: list[request_pb2.PlanInput],
) -> None:
    result = record.result
    decision = result.WhichOneof("decision")
    exec_id = record.header.execution_id
    if decision is None:
        error = result.error
        lt.fail(f"plan {node.id} failed: {error.message or error.type}", error.type or "PlanFailed")
        return
    if decision == "complete":
        if not any(
            e.from_node_id == node.id and e.kind == graph_pb2.EDGE_KIND_FINAL
            for e in lt.graph.edges
        ):
            lt.fail(f"plan {node.id} decided to complete but has no FINAL edge", "RoutingError")
            return
        lt.set_state(
            LS.LIFETIME_STATE_COMPLETED,
            message=result.rationale or "completed",
            output=result.complete.output,
        )
        return
    if decision == "fail":
        error = result.fail.error
        lt.set_state(
            LS.LIFETIME_STATE_FAILED,
            message=f"plan {node.id} decided to fail: {error.message}",
            error=error,
        )
        return
    if decision == "wait":
        wait = result.wait
        if not wait.signal_name:
            # SignalLifetime requires a name: nothing could ever end such a wait.
            lt.fail(f"plan {node.id} asked to wait without a signal name", "RoutingError")
            return
        if wait.HasField("timeout") and not 0 < wait.timeout.ToNanoseconds() <= MAX_WAIT_S * 10**9:
            lt.fail(
                f"plan {node.id} asked to wait for {wait.signal_name!r} with a timeout of "
                f"{wait.timeout.ToNanoseconds() / 1e9:g} s: expected more than 0 s and at "
                f"most {MAX_WAIT_S:,} s (about a century)",
                "RoutingError",
            )
            return
        lt.state.wait.CopyFrom(
            rs.WaitState(
                signal_name=wait.signal_name,
                plan_node_id=node.id,
                plan_execution_id=exec_id,
                decision=wait,
                inputs=inputs,
            )
        )
        if wait.HasField("timeout"):
            deadline = timestamp_pb2.Timestamp()
            deadline.FromNanoseconds(lt.timestamp().ToNanoseconds() + wait.timeout.ToNanoseconds())
            lt.state.wait.deadline.CopyFrom(deadline)
        lt.view.waiting_signal = wait.signal_name
        lt.set_state(LS.LIFETIME_STATE_WAITING, message=f"waiting for signal {wait.signal_name!r}")
        return
    steps_ = list(result.dispatch.steps)
    if not steps_:
        lt.fail(f"plan {node.id} dispatched no steps", "RoutingError")
        return
    targets: list[tuple[graph_pb2.Node, graph_pb2.Edge, result_pb2.NextStep]] = []
    for step in steps_:
        edge = _edge(lt, node.id, step.node_id)
        target = lt.nodes.get(step.node_id)
        if edge is None or target is None or edge.kind == graph_pb2.EDGE_KIND_FINAL:
            lt.fail(
                f"plan {node.id} dispatched {step.node_id!r}, "
                f"which no edge from {node.id} leads to",
                "RoutingError",
            )
            return
        targets.append((target, edge, step))
    if len(targets) > 1 and not _iterations_allow(lt, targets):
        return
    shares = output_shares(lt, [target for target, _, _ in targets])
    for (target, edge, step), share in zip(targets, shares, strict=True):
        if (
            dispatch_task(
                lt,
                target,
                step.input,
                parents=[exec_id],
                group=exec_id,
                edge=edge,
                output_limit=share,
            )
            is None
        ):
            return


def _iterations_allow(
    lt: Lifetime, targets: Sequence[tuple[graph_pb2.Node, graph_pb2.Edge, result_pb2.NextStep]]
) -> bool:
    """Whether every step of one decision stays within max_iterations; if not, fail the
    lifetime before any is dispatched: steps dispatched first would still be published
    and run for a lifetime the same decision failed."""
    cap = lt.graph.max_iterations or DEFAULT_MAX_ITERATIONS
    for node_id, count in Counter(target.id for target, _, _ in targets).items():
        runs = lt.state.iterations.get(node_id, 0) + count
        if runs > cap:
            lt.fail(
                f"node {node_id!r} would run {runs} times, over the graph's max_iterations {cap}",
                "MaxIterationsExceeded",
            )
            return False
    return True


# --- control ----------------------------------------------------------------


def pause(lt: Lifetime, reason: str) -> None:
    if lt.terminal or lt.view.state == LS.LIFETIME_STATE_PAUSED:
        return
    lt.set_state(LS.LIFETIME_STATE_PAUSED, message=f"paused: {reason}" if reason else "paused")


def resume(lt: Lifetime, reason: str) -> None:
    if lt.view.state != LS.LIFETIME_STATE_PAUSED:
        return
    state = LS.LIFETIME_STATE_WAITING if lt.state.HasField("wait") else LS.LIFETIME_STATE_RUNNING
    held = list(lt.state.held)
    lt.state.ClearField("held")
    lt.set_state(state, message=f"resumed: {reason}" if reason else "resumed")
    for message in held:
        _dispatched_event(lt, envelope_pb2.ExecutionEnvelope.FromString(message.data).header)
    lt.emitted.extend(held)


DECISION_ERROR = "DecisionError"


def fail_undecidable(lt: Lifetime, cause: Exception) -> None:
    """Fail the lifetime because deciding on an input raised ``cause`` (``lt`` holds its
    state from before that decision): deciding is pure, so the same state and input would
    raise again on every redelivery (the router, and replay where the router did)."""
    lt.fail(f"the router could not decide on a step: {cause!r}", DECISION_ERROR)


def abort(lt: Lifetime, reason: str) -> None:
    if lt.terminal:
        return
    message = f"aborted: {reason}" if reason else "aborted"
    lt.set_state(
        LS.LIFETIME_STATE_ABORTED,
        message=message,
        error=result_pb2.ErrorInfo(type="aborted", message=message),
    )


def signal(lt: Lifetime, sig: lifetime_pb2.Signal) -> None:
    """Deliver a signal to a waiting lifetime.

    Raises:
        RoutingError: The lifetime is not waiting for a signal of that name.
    """
    if sig.signal_id and sig.signal_id in lt.state.signal_ids:
        return
    if lt.view.state != LS.LIFETIME_STATE_WAITING or not lt.state.HasField("wait"):
        raise RoutingError(
            f"lifetime {lt.view.lifetime_id} is {LS.LifetimeState.Name(lt.view.state)}, "
            "not waiting for a signal"
        )
    wait = lt.state.wait
    if wait.signal_name != sig.name:
        raise RoutingError(
            f"lifetime {lt.view.lifetime_id} waits for signal {wait.signal_name!r}, "
            f"not {sig.name!r}"
        )
    if sig.signal_id:
        ids = lt.state.signal_ids
        ids.append(sig.signal_id)
        if len(ids) > MAX_SIGNAL_IDS:
            del ids[: len(ids) - MAX_SIGNAL_IDS]
    # The wake is recorded in the event only (the state keeps a count): a lifetime woken
    # by thousands of signals must not carry their payloads in its state.
    lt.state.wake_count += 1
    lt.event(
        LS.LIFETIME_EVENT_KIND_SIGNAL_RECEIVED,
        execution_id=wait.plan_execution_id,
        signal=sig,
        message=f"signal {sig.name!r}",
    )
    _wake(
        lt,
        request_pb2.SignalDelivery(
            name=sig.name, payload=sig.payload, approver=sig.approver, timed_out=False
        ),
    )


def wait_timed_out(lt: Lifetime) -> None:
    """Apply a wait's timeout action (called when its deadline has passed)."""
    if lt.view.state != LS.LIFETIME_STATE_WAITING or not lt.state.HasField("wait"):
        return
    decision = lt.state.wait.decision
    lt.state.wake_count += 1
    lt.event(
        LS.LIFETIME_EVENT_KIND_WAIT_TIMED_OUT,
        execution_id=lt.state.wait.plan_execution_id,
        message=f"no signal {decision.signal_name!r} before the timeout",
    )
    if decision.on_timeout == result_pb2.WAIT_TIMEOUT_ACTION_SIGNAL:
        _wake(
            lt,
            request_pb2.SignalDelivery(
                name=decision.signal_name, payload=decision.default_payload, timed_out=True
            ),
        )
    elif decision.on_timeout == result_pb2.WAIT_TIMEOUT_ACTION_ABORT:
        abort(lt, f"no signal {decision.signal_name!r} before the timeout")
    else:
        lt.fail(f"no signal {decision.signal_name!r} before the timeout", "WaitTimeout")


def wait_deadline(state: rs.RouterLifetime) -> datetime | None:
    """When a waiting lifetime's wait times out (None: not waiting, or no timeout)."""
    if state.lifetime.state != LS.LIFETIME_STATE_WAITING or not state.HasField("wait"):
        return None
    if not state.wait.HasField("deadline"):
        return None
    return state.wait.deadline.ToDatetime(tzinfo=UTC)


def redispatch(lt: Lifetime, envelope: envelope_pb2.ExecutionEnvelope) -> None:
    """Publish an already decided request (its step is in flight) through the pre-dispatch
    guard, as the dispatch functions do (fork uses it for the steps open at the fork point)."""
    node = lt.nodes[envelope.header.node.id]
    kind = "task" if envelope.HasField("task_request") else "plan"
    _guarded_publish(lt, node, envelope, kind)


def _wake(lt: Lifetime, delivery: request_pb2.SignalDelivery) -> None:
    wait = rs.WaitState()
    wait.CopyFrom(lt.state.wait)
    lt.state.ClearField("wait")
    lt.view.waiting_signal = ""
    lt.set_state(LS.LIFETIME_STATE_RUNNING, message=f"woken by signal {delivery.name!r}")
    plan = lt.nodes[wait.plan_node_id]
    dispatch_plan(
        lt,
        plan,
        inputs=list(wait.inputs),
        parents=[wait.plan_execution_id],
        edge=None,
        signal=delivery,
    )
