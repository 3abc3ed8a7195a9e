"""Fork: a new lifetime that shares a recorded lifetime's history up to one execution.

The fork's state is the origin's state as it was right after the fork execution
was applied: the origin's records are re-driven through ``core`` in store order
(see ``replay.Redriver``; guardrails are not evaluated for recorded history) up to
and including that execution. The records before it are mostly finished steps, so
they are fast-forwarded (``fastforward.py``: the same state, without building the
requests of steps that finished) as far as that goes, and ``core`` takes the rest,
always including the fork execution. Then the state is re-keyed to the new lifetime:

* finished steps stay where they are — their records belong to the origin, the
  fork's later steps name them as parents, and nothing of them runs again;
* the steps open at the fork point (not finished yet there, plus the ones the fork
  execution itself led to) get the execution ids of the new lifetime
  (``execution_id`` hashes the lifetime id) and are dispatched live, through the
  pre-dispatch guardrails;
* iteration counters, joins, usage totals and the event sequence carry on, so the
  fork's events continue after the origin's sequence at the fork point.

With ``replacement_output`` a task's recorded output is replaced (as if it had
succeeded with it) before it is routed; a plan is asked again, with the
replacement as its goal. The replacement is kept in the fork's state
(``fork_replacement``), so :func:`replay_fork` can build the same starting state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.sdk import NotFoundError, execution_id
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    graph_pb2,
    header_pb2,
    lifetime_pb2,
    payload_pb2,
    result_pb2,
    router_service_pb2,
)

from . import core
from .fastforward import fast_forward
from .replay import NOT_ABORTED, RecordedAbort, Redriver, ReplayReport, record_of, replay

LS = lifetime_pb2


class ForkError(Exception):
    """The lifetime cannot be forked at that execution."""


def fork(
    origin: rs.RouterLifetime,
    graph: graph_pb2.AgentGraph,
    records: Sequence[execution_pb2.ExecutionRef],
    *,
    execution: str,
    new_lifetime_id: str,
    replacement: payload_pb2.Payload | None,
    client_request_id: str,
    producer: core.Producer,
    now: datetime,
    guard: core.Guard = core.allow_all,
    fast: bool = True,
    quiet: bool = False,
) -> core.Lifetime:
    """Build the forked lifetime; its first messages are in the returned ``out``.

    ``fast=False`` re-drives every record through ``core``: the reference the
    fast-forward is held to. ``quiet=True`` keeps the open steps' requests as
    envelopes in ``requests`` instead (``core.Lifetime.quiet``), for a replay.

    Raises:
        NotFoundError: ``execution`` has no final record in the origin.
        ForkError: The recorded history does not replay up to the fork point.
    """
    if fast:
        r, taken = fast_forward(
            origin, graph, records, producer=producer, now=now, stop_at=execution
        )
    else:
        r, taken = Redriver(origin, graph, producer, now), 0
    reask_plan = False
    found = False
    for ref in records[taken:]:
        record = record_of(ref)
        header = record.header
        if r.lt.view.state == LS.LIFETIME_STATE_WAITING:
            r.wake()
        if not r.decided(header.execution_id):
            raise ForkError(
                f"the history of {origin.lifetime.lifetime_id} does not replay: execution "
                f"{header.execution_id} ({header.node.id} iteration {header.iteration}) was not "
                "dispatched when it was re-driven"
            )
        if header.execution_id != execution:
            r.feed(ref)
            continue
        if header.execution_id not in r.lt.state.in_flight:
            continue
        if replacement is not None and ref.HasField("plan_execution"):
            probe = core.Lifetime(_copy(r.lt.state), graph, producer, now)
            if core.on_execution(probe, ref):
                reask_plan = found = True  # final: leave the plan in flight, ask it again
                break
            continue
        if replacement is not None:
            ref = _replaced(ref, replacement)
        if r.feed(ref):
            found = True
            break
    if not found:
        raise NotFoundError(
            f"lifetime {origin.lifetime.lifetime_id} has no finished execution {execution!r}"
        )
    return _rekey(
        r,
        origin=origin,
        execution=execution,
        new_lifetime_id=new_lifetime_id,
        replacement=replacement,
        reask_plan=reask_plan,
        client_request_id=client_request_id,
        guard=guard,
        quiet=quiet,
    )


def replay_fork(
    recorded: rs.RouterLifetime,
    origin: rs.RouterLifetime,
    graph: graph_pb2.AgentGraph,
    origin_records: Sequence[execution_pb2.ExecutionRef],
    records: Sequence[execution_pb2.ExecutionRef],
    *,
    producer: core.Producer,
    now: datetime | None = None,
    code_digests: Mapping[str, str] | None = None,
    after_abort: RecordedAbort = NOT_ABORTED,
) -> ReplayReport:
    """Replay the fork ``recorded``: rebuild its starting state from ``origin`` and
    ``origin_records`` as :func:`fork` did, then re-drive its own ``records`` and compare.

    The origin's records are held to the execution ids the re-drive computes (as by
    :func:`fork`); their requests and code are compared by replaying the origin.
    """
    now = now or datetime.now(UTC)
    view = recorded.lifetime
    at = view.fork_origin
    try:
        lt = fork(
            origin,
            graph,
            origin_records,
            execution=at.execution_id,
            new_lifetime_id=view.lifetime_id,
            replacement=recorded.fork_replacement
            if recorded.HasField("fork_replacement")
            else None,
            client_request_id=view.client_request_id,
            producer=producer,
            now=now,
            quiet=True,
        )
    except (ForkError, NotFoundError) as exc:
        return _not_forked(view, graph, f"the fork of {at.lifetime_id} at {at.execution_id}", exc)
    if lt.view.fork_origin.sequence != at.sequence:
        # The fork point's sequence counts the origin's events up to it: another count
        # means the origin's history decided something else on the way there.
        return _not_forked(
            view,
            graph,
            f"the fork point at sequence {at.sequence}",
            f"the fork point at sequence {lt.view.fork_origin.sequence}",
        )
    return replay(
        recorded,
        graph,
        records,
        producer=producer,
        now=now,
        code_digests=code_digests,
        start=Redriver.resuming(lt, recorded.wakes),
        after_abort=after_abort,
    )


def _not_forked(
    view: lifetime_pb2.AgentLifetime,
    graph: graph_pb2.AgentGraph,
    expected: str,
    actual: object,
) -> ReplayReport:
    return ReplayReport(
        reproduced=False,
        decisions_checked=1,
        divergences=[
            router_service_pb2.ReplayDivergence(
                sequence=view.fork_origin.sequence,
                execution_id=view.fork_origin.execution_id,
                expected=expected,
                actual=str(actual),
                message="the fork's starting state is not reproduced from its origin's history",
            )
        ],
        graph=header_pb2.GraphRef(id=graph.id, version=graph.version, digest=graph.digest),
    )


def _replaced(
    ref: execution_pb2.ExecutionRef, replacement: payload_pb2.Payload
) -> execution_pb2.ExecutionRef:
    copy = execution_pb2.ExecutionRef()
    copy.CopyFrom(ref)
    result = copy.task_execution.result
    result.status = result_pb2.TASK_STATUS_SUCCEEDED
    result.ClearField("error")
    result.output.CopyFrom(replacement)
    return copy


def _rekey(
    r: Redriver,
    *,
    origin: rs.RouterLifetime,
    execution: str,
    new_lifetime_id: str,
    replacement: payload_pb2.Payload | None,
    reask_plan: bool,
    client_request_id: str,
    guard: core.Guard,
    quiet: bool,
) -> core.Lifetime:
    state = _copy(r.lt.state)
    sequence = state.lifetime.last_sequence
    origin_id = origin.lifetime.lifetime_id
    view = state.lifetime
    view.lifetime_id = new_lifetime_id
    view.client_request_id = client_request_id
    view.mode = header_pb2.EXECUTION_MODE_FORK
    view.fork_origin.CopyFrom(
        header_pb2.ForkOrigin(lifetime_id=origin_id, execution_id=execution, sequence=sequence)
    )
    if replacement is not None:
        state.fork_replacement.CopyFrom(replacement)
        if reask_plan:
            view.input.CopyFrom(replacement)
    state.ClearField("outbox")
    state.ClearField("held")
    # The waits that ended before the fork point are the origin's (replay_fork reads them
    # from its events); the fork counts the wakes its own events record.
    state.ClearField("wakes")
    state.wake_count = 0
    lt = core.Lifetime(state, r.lt.graph, r.lt.producer, r.lt.now, guard, quiet=quiet)
    view.created_at.CopyFrom(lt.timestamp())
    lt.event(
        LS.LIFETIME_EVENT_KIND_STARTED,
        execution_id=execution,
        message=f"forked from {origin_id} at {execution} (sequence {sequence})",
        input=view.input,
        replacement_output=replacement,
    )
    # The open steps, in the order they were decided.
    open_ids = [i for i in r.dispatched if i in state.in_flight]
    renamed: dict[str, str] = {}
    for old in open_ids:
        request = envelope_pb2.ExecutionEnvelope()
        request.CopyFrom(r.dispatched[old].envelope)
        header = request.header
        new = execution_id(
            view.tenant_id,
            new_lifetime_id,
            list(header.parent_execution_ids),
            header.node.id,
            header.iteration,
        )
        renamed[old] = new
        base = lt.base_header()
        header.envelope_id = base.envelope_id
        header.lifetime_id = new_lifetime_id
        header.execution_id = new
        header.idempotency_key = f"req:{new}"
        header.mode = base.mode
        header.fork_origin.CopyFrom(base.fork_origin)
        header.producer.CopyFrom(base.producer)
        shift = lt.timestamp().ToNanoseconds() - header.created_at.ToNanoseconds()
        header.created_at.CopyFrom(base.created_at)
        deadline = timestamp_pb2.Timestamp()
        deadline.FromNanoseconds(header.deadline.ToNanoseconds() + max(shift, 0))
        header.deadline.CopyFrom(deadline)
        if reask_plan and old == execution:
            request.plan_request.goal.CopyFrom(view.input)
        flight = rs.InFlight()
        flight.CopyFrom(state.in_flight[old])
        flight.dispatched_at.CopyFrom(lt.timestamp())
        del state.in_flight[old]
        state.in_flight[new].CopyFrom(flight)
        for join in state.joins.values():
            for i, expected in enumerate(join.expected):
                if expected == old:
                    join.expected[i] = new
        core.redispatch(lt, request)
    return lt


def _copy(state: rs.RouterLifetime) -> rs.RouterLifetime:
    copy = rs.RouterLifetime()
    copy.CopyFrom(state)
    return copy
