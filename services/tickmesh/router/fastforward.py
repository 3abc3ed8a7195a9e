"""Fast-forward: the state a redrive reaches over a recorded history, without building requests.

Re-driving a record through ``core`` (``replay.Redriver``) builds every request the
lifetime decides: headers, deadlines, request bodies, subjects. A fork needs those only
for the steps still open at the fork point, and a long history is mostly finished steps,
so :func:`fast_forward` follows the common records with the routing state alone —
iteration counters, steps in flight, joins, usage totals, the event count — in plain
Python, then writes that state into the ``Redriver`` and builds the requests of the open
steps with ``core``'s own dispatch functions, so they are the ones a redrive builds.

It follows what ``core.on_execution`` does with a record when the guard allows
everything (a redrive evaluates no guardrails), the lifetime is running, and the record
is a step's final attempt whose routing stays within two cases:

* a task finished: its result joins the group flowing into its downstream plan, and the
  plan is dispatched once the join policy is satisfied;
* a plan decided to dispatch tasks that its edges lead to.

A record that changes nothing in ``core`` (an attempt a retry follows, a step no longer
in flight) changes nothing here either. Every check ``core`` makes that could go another
way (the iteration cap, a missing or FINAL edge, any other plan decision: complete, fail,
wait) is made before the record changes anything, and such a record is handed to
``core``, which applies it to the state written so far; the fast-forward resumes after
it while the lifetime runs (a wait is woken as recorded first, as ``fork`` does). So
``core`` stays the one definition of routing: this module only skips work whose output
nobody reads, and the tests hold it to the state and requests of a full redrive after
every record (tests/unit/router/test_fastforward.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeAlias

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.runtime import steps
from tickmesh.sdk import execution_id
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    graph_pb2,
    guardrail_pb2,
    payload_pb2,
    request_pb2,
    result_pb2,
    telemetry_pb2,
)

from . import core
from .replay import Redriver, record_of

LS = core.LS

_Finished: TypeAlias = request_pb2.PlanInput | execution_pb2.TaskExecution
"""A result gathered by a join: a task's record, or a plan input already built by core."""


@dataclass(slots=True)
class _Step:
    """A dispatched step not finished yet."""

    node: graph_pb2.Node
    node_id: str
    group: str
    plan: bool
    """Dispatched by ``core.dispatch_plan`` (a fired join), else by ``core.dispatch_task``."""
    iteration: int = 0
    parents: list[str] = field(default_factory=list)
    edge: graph_pb2.Edge | None = None
    task_input: payload_pb2.Payload | None = None
    """A task's input (the dispatching plan's step input)."""
    output_limit: int = 0
    """A task's ``output_inline_limit`` (``core.output_shares``)."""
    inputs: list[_Finished] = field(default_factory=list)
    """A plan's inputs, as its join gathered them."""
    flight: rs.InFlight | None = None
    request: envelope_pb2.ExecutionEnvelope | None = None
    """For a step ``core`` dispatched before the fast-forward began: its state and request."""


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a task's result goes (``core.downstream_plan``), read from the graph once."""

    plan: graph_pb2.Node
    plan_id: str
    join: graph_pb2.JoinPolicy
    edge: graph_pb2.Edge | None


@dataclass(slots=True)
class _Join:
    plan_node_id: str
    expected: list[str] = field(default_factory=list)
    finished: list[_Finished] = field(default_factory=list)
    fired: bool = False


class _Forward:
    """The routing state of one lifetime, advanced record by record."""

    def __init__(self, r: Redriver, decided: set[str]) -> None:
        lt = r.lt
        state = lt.state
        self.lt = lt
        self.tenant = lt.view.tenant_id
        self.lifetime = lt.view.lifetime_id
        self.cap = lt.graph.max_iterations or core.DEFAULT_MAX_ITERATIONS
        self.edges: dict[tuple[str, str], graph_pb2.Edge | None] = {}
        self.routes: dict[str, _Route | None] = {}
        for node in lt.graph.nodes:
            plan = core.downstream_plan(lt, node)
            self.routes[node.id] = (
                None
                if plan is None
                else _Route(plan, plan.id, plan.join, self.edge(node.id, plan.id))
            )
        self.iterations = dict(state.iterations)
        self.open: dict[str, _Step] = {}
        self.decided = decided
        """Every step dispatched so far (shared by the rounds of one fast-forward)."""
        self.importable = True
        for exec_id, dispatched in r.dispatched.items():
            decided.add(exec_id)
            flight = state.in_flight.get(exec_id)
            if flight is None:
                continue
            flown = lt.nodes.get(flight.node_id)
            if flown is None:
                self.importable = False
                continue
            kept = rs.InFlight()
            kept.CopyFrom(flight)
            self.open[exec_id] = _Step(
                node=flown,
                node_id=flight.node_id,
                group=flight.group,
                plan=dispatched.envelope.HasField("plan_request"),
                flight=kept,
                request=dispatched.envelope,
            )
        if set(self.open) != set(state.in_flight):
            self.importable = False  # a step in flight with no request: leave it to core
        self.joins: dict[str, _Join] = {}
        for key, group in state.joins.items():
            finished: list[_Finished] = []
            for item in group.finished:
                kept_item = request_pb2.PlanInput()
                kept_item.CopyFrom(item)
                finished.append(kept_item)
            self.joins[key] = _Join(
                plan_node_id=group.plan_node_id,
                expected=list(group.expected),
                finished=finished,
                fired=group.fired,
            )
        totals = lt.view.totals
        self.input_tokens = totals.input_tokens
        self.output_tokens = totals.output_tokens
        self.cost_micros = totals.cost_micros
        self.model_calls = totals.model_calls
        self.tool_calls = totals.tool_calls
        self.custom_metrics = dict(totals.custom_metrics)
        self.executions = lt.view.execution_count
        self.events = 0

    def edge(self, from_id: str, to_id: str) -> graph_pb2.Edge | None:
        key = (from_id, to_id)
        if key not in self.edges:
            self.edges[key] = core._edge(self.lt, from_id, to_id)
        return self.edges[key]

    # --- records -------------------------------------------------------------------

    def run(self, records: Sequence[execution_pb2.ExecutionRef], start: int, stop_at: str) -> int:
        """Apply records from ``start`` until one this module does not follow; return
        how many it took."""
        if not self.importable:
            return 0
        for n in range(start, len(records)):
            if not self.apply(records[n], stop_at):
                return n - start
        return len(records) - start

    def apply(self, ref: execution_pb2.ExecutionRef, stop_at: str) -> bool:
        """Apply one record as ``core.on_execution`` would; False: hand over before it."""
        kind = ref.WhichOneof("record")
        if kind is None:
            return False
        task = kind == "task_execution"
        header = ref.task_execution.header if task else ref.plan_execution.header
        exec_id = header.execution_id
        if exec_id == stop_at or exec_id not in self.decided:
            return False
        step = self.open.get(exec_id)
        if step is None:
            return True  # not in flight (a later attempt): core changes nothing either
        retry = step.node.retry
        if task:
            record = ref.task_execution
            if not steps.task_attempt_is_final(retry, header.attempt, record.result):
                return True  # a retry follows: core changes nothing either
            return self._task_finished(exec_id, step, record)
        decision = ref.plan_execution
        if not steps.plan_attempt_is_final(retry, header.attempt, decision.result):
            return True
        return self._plan_decided(exec_id, step, decision)

    def _task_finished(
        self, exec_id: str, step: _Step, record: execution_pb2.TaskExecution
    ) -> bool:
        route = self.routes[step.node_id]
        if route is None:
            return False  # core fails the lifetime
        key = f"{step.group}/{route.plan_id}"
        join = self.joins.get(key)
        fires = (join is None or not join.fired) and core._join_satisfied(
            route.join,
            len(join.expected) if join is not None else 0,
            (len(join.finished) if join is not None else 0) + 1,
        )
        if fires and self.iterations.get(route.plan_id, 0) + 1 > self.cap:
            return False  # core fails the lifetime (max iterations)
        self._finish(exec_id, record.result.telemetry)
        if join is None:
            join = self.joins[key] = _Join(plan_node_id=route.plan_id)
        join.finished.append(record)
        if fires:
            join.fired = True
            inputs = list(join.finished)
            self._dispatch(
                route.plan,
                route.plan_id,
                plan=True,
                parents=[_input_id(i) for i in inputs],
                edge=route.edge,
                group="",
                inputs=inputs,
            )
        if join.fired and len(join.finished) >= len(join.expected):
            del self.joins[key]
        return True

    def _plan_decided(self, exec_id: str, step: _Step, record: execution_pb2.PlanExecution) -> bool:
        result = record.result
        if result.WhichOneof("decision") != "dispatch" or not result.dispatch.steps:
            return False  # complete, fail, wait, or an empty dispatch: core decides
        targets: list[tuple[graph_pb2.Node, str, graph_pb2.Edge, result_pb2.NextStep]] = []
        counts: dict[str, int] = {}
        for next_step in result.dispatch.steps:
            target_id = next_step.node_id
            edge = self.edge(step.node_id, target_id)
            target = self.lt.nodes.get(target_id)
            if edge is None or target is None or edge.kind == graph_pb2.EDGE_KIND_FINAL:
                return False  # core fails the lifetime (routing error)
            counts[target_id] = counts.get(target_id, 0) + 1
            if self.iterations.get(target_id, 0) + counts[target_id] > self.cap:
                return False
            targets.append((target, target_id, edge, next_step))
        self._finish(exec_id, result.telemetry)
        shares = core.output_shares(self.lt, [target for target, _, _, _ in targets])
        for (target, target_id, edge, next_step), share in zip(targets, shares, strict=True):
            self._dispatch(
                target,
                target_id,
                plan=False,
                parents=[exec_id],
                edge=edge,
                group=exec_id,
                task_input=next_step.input,
                output_limit=share,
            )
        return True

    def _finish(self, exec_id: str, telemetry: telemetry_pb2.Telemetry) -> None:
        del self.open[exec_id]
        self.input_tokens += telemetry.input_tokens
        self.output_tokens += telemetry.output_tokens
        self.cost_micros += telemetry.cost_micros
        self.model_calls += telemetry.model_calls
        self.tool_calls += telemetry.tool_calls
        for name, value in telemetry.custom_metrics.items():
            self.custom_metrics[name] = self.custom_metrics.get(name, 0.0) + value
        self.executions += 1
        self.events += 1  # STEP_FINISHED

    def _dispatch(
        self,
        node: graph_pb2.Node,
        node_id: str,
        *,
        plan: bool,
        parents: list[str],
        edge: graph_pb2.Edge | None,
        group: str,
        task_input: payload_pb2.Payload | None = None,
        output_limit: int = 0,
        inputs: list[_Finished] | None = None,
    ) -> None:
        iteration = self.iterations.get(node_id, 0) + 1
        parents = sorted(parents)
        exec_id = execution_id(self.tenant, self.lifetime, parents, node_id, iteration)
        self.iterations[node_id] = iteration
        if plan:
            group = exec_id
        self.open[exec_id] = _Step(
            node=node,
            node_id=node_id,
            group=group,
            plan=plan,
            iteration=iteration,
            parents=parents,
            edge=edge,
            task_input=task_input,
            output_limit=output_limit,
            inputs=inputs or [],
        )
        self.decided.add(exec_id)
        if not plan:
            route = self.routes[node_id]
            if route is not None:
                key = f"{group}/{route.plan_id}"
                join = self.joins.get(key)
                if join is None:
                    join = self.joins[key] = _Join(plan_node_id=route.plan_id)
                join.expected.append(exec_id)
        self.events += 1  # STEP_DISPATCHED

    # --- hand-over -------------------------------------------------------------------

    def write(self, r: Redriver) -> None:
        """Write the state into ``r.lt.state`` and give ``r`` the open steps' requests."""
        state = r.lt.state
        view = state.lifetime
        now = r.lt.timestamp()
        view.last_sequence += self.events
        if self.events:
            view.updated_at.CopyFrom(now)
        totals = view.totals
        totals.input_tokens = self.input_tokens
        totals.output_tokens = self.output_tokens
        totals.cost_micros = self.cost_micros
        totals.model_calls = self.model_calls
        totals.tool_calls = self.tool_calls
        for name, value in self.custom_metrics.items():
            totals.custom_metrics[name] = value
        view.execution_count = self.executions
        for node_id, iteration in self.iterations.items():
            state.iterations[node_id] = iteration
        state.ClearField("in_flight")
        for exec_id, step in self.open.items():
            flight = state.in_flight[exec_id]
            if step.flight is not None:
                flight.CopyFrom(step.flight)
                continue
            flight.node_id = step.node_id
            flight.group = step.group
            flight.dispatched_at.CopyFrom(now)
            if step.plan:
                flight.plan_inputs.extend(
                    sorted((_as_input(i) for i in step.inputs), key=lambda i: i.execution_id)
                )
        state.ClearField("joins")
        for key, join in self.joins.items():
            group = state.joins[key]
            group.plan_node_id = join.plan_node_id
            group.expected.extend(join.expected)
            group.finished.extend(_as_input(i) for i in join.finished)
            group.fired = join.fired
        requests = [
            step.request if step.request is not None else self._request(r, exec_id, step)
            for exec_id, step in self.open.items()
        ]
        r.adopt(requests, self.decided)

    def _request(self, r: Redriver, exec_id: str, step: _Step) -> envelope_pb2.ExecutionEnvelope:
        """The request ``core`` builds for ``step``: its own dispatch, run again on a copy of
        the lifetime whose counter for the node is one below the step's iteration."""
        state = rs.RouterLifetime()
        state.CopyFrom(r.lt.state)
        state.iterations[step.node_id] = step.iteration - 1
        scratch = core.Lifetime(
            state, r.lt.graph, r.lt.producer, r.lt.now, core.allow_all, quiet=True
        )
        if step.plan:
            core.dispatch_plan(
                scratch,
                step.node,
                inputs=[_as_input(i) for i in step.inputs],
                parents=step.parents,
                edge=step.edge,
            )
        else:
            core.dispatch_task(
                scratch,
                step.node,
                step.task_input if step.task_input is not None else payload_pb2.Payload(),
                parents=step.parents,
                group=step.group,
                edge=step.edge,
                output_limit=step.output_limit,
            )
        built = [e for e in scratch.requests if e.header.execution_id == exec_id]
        if len(built) != 1:
            raise RuntimeError(
                f"fast-forward: core does not dispatch {step.node_id} iteration "
                f"{step.iteration} as {exec_id}"
            )
        return built[0]


def _input_id(item: _Finished) -> str:
    if isinstance(item, request_pb2.PlanInput):
        return item.execution_id
    return item.header.execution_id


def _as_input(item: _Finished) -> request_pb2.PlanInput:
    """The plan input ``core`` gathers for a finished task (``core._task_finished``)."""
    if isinstance(item, request_pb2.PlanInput):
        return item
    result = item.result
    built = request_pb2.PlanInput(
        execution_id=item.header.execution_id,
        node=item.header.node,
        status=result.status,
        telemetry=result.telemetry,
    )
    if result.status == result_pb2.TASK_STATUS_SUCCEEDED:
        built.output.CopyFrom(result.output)
    else:
        built.error.CopyFrom(result.error)
        if result.status == result_pb2.TASK_STATUS_REJECTED:
            built.guardrail.action = guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    return built


def fast_forward(
    recorded: rs.RouterLifetime,
    graph: graph_pb2.AgentGraph,
    records: Sequence[execution_pb2.ExecutionRef],
    *,
    producer: core.Producer,
    now: datetime,
    stop_at: str = "",
) -> tuple[Redriver, int]:
    """Re-drive ``records`` (store order) up to a record of ``stop_at``.

    Records this module does not follow are applied by ``core`` on the way (with the
    recorded wake before them, as ``fork`` does), and the fast-forward goes on after them
    while the lifetime runs. Returns a ``Redriver`` holding the state a full redrive of the
    first ``n`` records holds, and ``n``: the records from there on (from a record of
    ``stop_at`` or of a step never dispatched, or all that follow once the lifetime has
    ended or waits with no recorded wake) are left to the caller.
    """
    r = Redriver(recorded, graph, producer, now)
    decided: set[str] = set()
    n = 0
    while n < len(records):
        if r.lt.view.state == LS.LIFETIME_STATE_WAITING:
            r.wake()
        if r.lt.view.state != LS.LIFETIME_STATE_RUNNING:
            break
        forward = _Forward(r, decided)
        taken = forward.run(records, n, stop_at)
        if taken:
            forward.write(r)
            n += taken
        if n == len(records):
            break
        ref = records[n]
        exec_id = record_of(ref).header.execution_id
        if exec_id == stop_at or not r.decided(exec_id):
            break
        r.feed(ref)  # a record core routes another way: a wait, the end, an error
        n += 1
    return r, n
