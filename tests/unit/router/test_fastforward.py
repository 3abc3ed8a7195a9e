"""Fast-forward: the same routing state and open requests as a full redrive through core."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from tests.unit.router.test_core import (
    NOW,
    PRODUCER,
    complete,
    dispatch,
    fanout_graph,
    hello_graph,
    payload,
)
from tests.unit.router.test_replay import Recorder, run_hello
from tickmesh.router import core, fastforward, fork, replay
from tickmesh.sdk import GraphBuilder, NotFoundError, decode_envelope
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    graph_pb2,
    lifetime_pb2,
    result_pb2,
    telemetry_pb2,
)

WAITING = lifetime_pb2.LIFETIME_STATE_WAITING

# --- histories ---------------------------------------------------------------------------


def chain_graph(max_iterations: int = 0) -> graph_pb2.AgentGraph:
    return (
        GraphBuilder("chain", max_iterations=max_iterations)
        .task("noop")
        .plan("loop")
        .edge("noop", "loop")
        .edge("loop", "noop")
        .final("loop")
        .build()
    )


def wide_graph(join: str = "all", quorum: int = 0) -> graph_pb2.AgentGraph:
    """A plan fanning out to two different tasks that join into a second plan."""
    return (
        GraphBuilder("wide", max_iterations=6)
        .plan("plan")
        .task("a")
        .task("b")
        .plan("merge", join=join, quorum=quorum)
        .edge("plan", "a", "parallel")
        .edge("plan", "b", "parallel")
        .edge("a", "merge", "join")
        .edge("b", "merge", "join")
        .edge("merge", "a", "parallel")
        .edge("merge", "b", "parallel")
        .final("merge")
        .build()
    )


def run_chain(rounds: int) -> Recorder:
    sim = Recorder(chain_graph(max_iterations=rounds + 1))
    for n in range(rounds):
        sim.finish_task(sim.take("noop"), n, tokens=n)
        sim.decide(sim.take("loop"), dispatch("noop") if n < rounds - 1 else complete(None))
    return sim


def run_random(graph: graph_pb2.AgentGraph, seed: int, limit: int = 36) -> Recorder:
    """A history decided by dice: out-of-order results, retries, rejections, waits with
    signals and timeouts, completions, routing errors and iteration caps."""
    rng = random.Random(seed)
    sim = Recorder(graph)
    targets = {
        n.id: [e.to_node_id for e in graph.edges if e.from_node_id == n.id and e.to_node_id]
        for n in graph.nodes
    }
    attempts: dict[str, int] = {}
    while len(sim.refs) < limit and (sim.pending or sim.view.state == WAITING):
        if sim.view.state == WAITING:
            if rng.random() < 0.7:
                signal = lifetime_pb2.Signal(name="go", payload=payload(len(sim.refs)))
                sim.run(core.signal, signal)
            else:
                sim.run(core.wait_timed_out)
            continue
        request = sim.pending.pop(rng.randrange(len(sim.pending)))
        exec_id = request.header.execution_id
        attempt = attempts[exec_id] = attempts.get(exec_id, 0) + 1
        if request.HasField("task_request"):
            roll = rng.random()
            if roll < 0.15 and attempt < 3:
                sim.finish_task(request, status=result_pb2.TASK_STATUS_FAILED, attempt=attempt)
                sim.pending.append(request)  # the pool retries it
            elif roll < 0.25:
                sim.finish_task(request, status=result_pb2.TASK_STATUS_REJECTED, attempt=attempt)
            else:
                sim.finish_task(request, rng.randrange(9), attempt=attempt, tokens=rng.randrange(5))
            continue
        if sim.view.state in core.TERMINAL:
            continue
        roll = rng.random()
        node = request.header.node.id
        if roll < 0.08:
            sim.decide(request, complete(len(sim.refs)))
        elif roll < 0.18:
            sim.decide(
                request,
                result_pb2.PlanResult(
                    wait=result_pb2.WaitDecision(
                        signal_name="go",
                        on_timeout=result_pb2.WAIT_TIMEOUT_ACTION_SIGNAL,
                        default_payload=payload("late"),
                    )
                ),
            )
        elif roll < 0.21:
            sim.decide(request, dispatch(node))  # no edge leads there: a routing error
        else:
            fan = [rng.choice(targets[node]) for _ in range(rng.randrange(1, 4))]
            sim.decide(request, dispatch(*fan))
    # Usage the fast-forward must add up as core does (custom metrics are doubles).
    for n, ref in enumerate(sim.refs):
        record = ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
        telemetry = record.result.telemetry
        telemetry.output_tokens += n
        telemetry.cost_micros += 7 * n
        telemetry.model_calls += n % 2
        telemetry.tool_calls += n % 3
        telemetry.custom_metrics["score"] = 0.1 * n
        if n % 4 == 0:
            telemetry.custom_metrics[f"m{n % 3}"] = 1 / (n + 3)
    return sim


# --- comparing with the full redrive -------------------------------------------------------


def redriven(sim: Recorder, n: int, *, fast: bool) -> tuple[replay.Redriver, int, int]:
    """The state after ``n`` records, as fork builds it: fast-forward, then core. Also
    returns how many records the fast-forward consumed and how many of those it left to
    core on the way."""
    records = sim.refs[:n]
    fed: list[execution_pb2.ExecutionRef] = []
    feed_one = replay.Redriver.feed

    def counted(self: replay.Redriver, ref: execution_pb2.ExecutionRef) -> bool:
        fed.append(ref)
        return feed_one(self, ref)

    if fast:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(replay.Redriver, "feed", counted)
            r, taken = fastforward.fast_forward(
                sim.recorded, sim.graph, records, producer=PRODUCER, now=NOW
            )
    else:
        r, taken = replay.Redriver(sim.recorded, sim.graph, PRODUCER, NOW), 0
    for ref in records[taken:]:
        feed(r, ref)
    return r, taken, len(fed)


def feed(r: replay.Redriver, ref: execution_pb2.ExecutionRef) -> None:
    if r.lt.view.state == WAITING:
        r.wake()
    r.feed(ref)


def snapshot(r: replay.Redriver, ids: set[str]) -> tuple[object, ...]:
    """Everything of a redrive fork reads: the state, the open steps' requests in decision
    order (less their random envelope ids) and which steps were decided."""
    opened = []
    for exec_id, dispatched in r.dispatched.items():
        if exec_id not in r.lt.state.in_flight:
            continue
        request = envelope_pb2.ExecutionEnvelope()
        request.CopyFrom(dispatched.envelope)
        request.header.envelope_id = ""
        opened.append((exec_id, dispatched.digest, request.SerializeToString(deterministic=True)))
    return (
        r.lt.state.SerializeToString(deterministic=True),
        opened,
        sorted(i for i in ids if r.decided(i)),
    )


def all_ids(sim: Recorder) -> set[str]:
    ids = {replay.record_of(ref).header.execution_id for ref in sim.refs}
    return ids | {e.execution_id for e in sim.events if e.execution_id}


def assert_same_at_every_record(sim: Recorder) -> list[tuple[int, int]]:
    """Fast-forward every prefix of the history and compare it with the full redrive;
    return, for each prefix, the records consumed and those of them core applied."""
    ids = all_ids(sim)
    full = replay.Redriver(sim.recorded, sim.graph, PRODUCER, NOW)
    taken = []
    for n in range(len(sim.refs) + 1):
        if n:
            feed(full, sim.refs[n - 1])
        fast, consumed, by_core = redriven(sim, n, fast=True)
        assert fast.lt.state == full.lt.state, f"after {n} records"
        assert snapshot(fast, ids) == snapshot(full, ids), f"after {n} records"
        taken.append((consumed, by_core))
    return taken


def forked(sim: Recorder, execution: str, *, fast: bool, replacement: object = None) -> object:
    """A fork's state and messages (less random envelope ids), or the error it raised."""
    try:
        lt = fork.fork(
            sim.recorded,
            sim.graph,
            sim.refs,
            execution=execution,
            new_lifetime_id="l2",
            replacement=None if replacement is None else payload(replacement),
            client_request_id="",
            producer=PRODUCER,
            now=NOW,
            fast=fast,
        )
    except (fork.ForkError, NotFoundError) as exc:
        return type(exc), str(exc)
    messages = []
    for message in lt.out:
        envelope = decode_envelope(message.data)
        envelope.header.envelope_id = ""
        messages.append(
            (
                message.subject,
                message.msg_id,
                message.type,
                message.execution_id,
                envelope.SerializeToString(deterministic=True),
            )
        )
    return lt.state.SerializeToString(deterministic=True), messages


def assert_same_forks(sim: Recorder, replacement: object = None) -> None:
    for ref in sim.refs:
        execution = replay.record_of(ref).header.execution_id
        fast = forked(sim, execution, fast=True, replacement=replacement)
        assert fast == forked(sim, execution, fast=False, replacement=replacement), execution


# --- the state after every record ------------------------------------------------------------


def test_fast_forward_of_a_loop_matches_the_full_redrive_after_every_record() -> None:
    sim = run_hello(rounds=4)
    taken = assert_same_at_every_record(sim)
    # Every record but the plan's last decision (complete) is followed without core.
    assert taken == [(n, 0) for n in range(len(sim.refs))] + [(len(sim.refs), 1)]


@pytest.mark.parametrize(("join", "quorum"), [("all", 0), ("any", 0), ("quorum", 2)])
def test_fast_forward_of_a_fan_out_and_join_matches_the_full_redrive(
    join: str, quorum: int
) -> None:
    sim = Recorder(fanout_graph(join, quorum))
    sim.decide(sim.take("plan"), dispatch("work", "work", "work"))
    works = [sim.take("work") for _ in range(3)]
    sim.finish_task(works[2], 3, tokens=2)
    sim.finish_task(works[0], status=result_pb2.TASK_STATUS_FAILED, attempt=1)  # retried
    sim.finish_task(works[0], status=result_pb2.TASK_STATUS_REJECTED, attempt=2)
    sim.finish_task(works[1], 2)  # late under ANY and QUORUM: gathered, plan not asked again
    redelivered = execution_pb2.ExecutionRef()
    redelivered.CopyFrom(sim.refs[-1])
    redelivered.task_execution.header.attempt = 2
    sim.refs.append(redelivered)  # a record of a step no longer in flight: changes nothing
    sim.decide(sim.take("merge"), dispatch("work", "work"))
    again = [sim.take("work") for _ in range(2)]
    sim.finish_task(again[1], 5)
    sim.finish_task(again[0], 6)
    sim.decide(sim.take("merge"), complete("ok"))
    taken = assert_same_at_every_record(sim)
    assert taken[-1] == (len(sim.refs), 1)


def test_a_fan_out_to_different_tasks_matches_the_full_redrive() -> None:
    sim = Recorder(wide_graph())
    sim.decide(sim.take("plan"), dispatch("a", "b", "a"))
    b, a1, a2 = sim.take("b"), sim.take("a"), sim.take("a")
    sim.finish_task(a2, "a2")
    sim.finish_task(b, "b")
    sim.finish_task(a1, "a1")
    sim.decide(sim.take("merge"), dispatch("b"))
    sim.finish_task(sim.take("b"), "b2")
    assert sim.pending_nodes() == ["merge"]
    assert_same_at_every_record(sim)


def test_core_applies_a_wait_and_its_recorded_signal_and_the_fast_forward_goes_on() -> None:
    sim = Recorder(chain_graph())
    sim.finish_task(sim.take("noop"), 1)
    sim.decide(
        sim.take("loop"), result_pb2.PlanResult(wait=result_pb2.WaitDecision(signal_name="go"))
    )
    sim.run(core.signal, lifetime_pb2.Signal(name="go", payload=payload("yes"), approver="ana"))
    sim.decide(sim.take("loop"), dispatch("noop"))
    sim.finish_task(sim.take("noop"), 2)
    taken = assert_same_at_every_record(sim)
    # core applies the wait decision, the recorded signal wakes it, and the records
    # after it are followed again.
    assert taken == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1)]


@pytest.mark.parametrize("capped", ["task", "plan"])
def test_core_applies_the_record_where_the_iteration_cap_fails_the_lifetime(capped: str) -> None:
    if capped == "task":  # the plan's dispatch of the task is one too many
        sim = Recorder(chain_graph(max_iterations=3))
        for n in range(3):
            sim.finish_task(sim.take("noop"), n)
            sim.decide(sim.take("loop"), dispatch("noop"))
    else:  # the task's result would fire the plan's join once too often
        graph = hello_graph()
        graph.max_iterations = 3
        sim = Recorder(graph)
        sim.finish_task(sim.take("greet"), "hi")
        for n in range(3):
            sim.decide(sim.take("decide"), dispatch("shout"))
            sim.finish_task(sim.take("shout"), n)
    assert sim.view.error.type == "MaxIterationsExceeded"
    taken = assert_same_at_every_record(sim)
    assert taken[-1] == (len(sim.refs), 1)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
    "graph",
    [fanout_graph, lambda: fanout_graph("any"), lambda: fanout_graph("quorum", 2), wide_graph],
    ids=["all", "any", "quorum", "wide"],
)
def test_random_histories_fast_forward_to_the_full_redrive_state(
    graph: Callable[[], graph_pb2.AgentGraph], seed: int
) -> None:
    built = graph()
    built.max_iterations = 12
    sim = run_random(built, seed)
    assert_same_at_every_record(sim)


def test_a_long_chain_is_fast_forwarded_up_to_the_fork_execution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = run_chain(rounds=60)
    at = sim.refs[101]
    execution = at.plan_execution.header.execution_id
    with monkeypatch.context() as patch:
        patch.setattr(replay.Redriver, "feed", None)  # not one record goes through core
        r, taken = fastforward.fast_forward(
            sim.recorded, sim.graph, sim.refs, producer=PRODUCER, now=NOW, stop_at=execution
        )
    assert taken == 101
    full = replay.Redriver(sim.recorded, sim.graph, PRODUCER, NOW)
    for ref in sim.refs[:101]:
        feed(full, ref)
    ids = all_ids(sim)
    assert snapshot(r, ids) == snapshot(full, ids)
    assert r.lt.view.totals.input_tokens == sum(range(51))


# --- forks --------------------------------------------------------------------------------


def test_forks_inside_a_loop_are_the_same_with_and_without_the_fast_forward() -> None:
    sim = run_hello(rounds=3)
    assert_same_forks(sim)
    assert_same_forks(sim, replacement={"replaced": True})


@pytest.mark.parametrize("seed", range(4))
def test_forks_of_random_fan_outs_are_the_same_with_and_without_the_fast_forward(
    seed: int,
) -> None:
    sim = run_random(wide_graph("quorum", 2), seed, limit=16)
    assert_same_forks(sim)
    assert_same_forks(sim, replacement=7)


def test_a_history_that_does_not_replay_is_refused_the_same_way() -> None:
    sim = run_chain(rounds=6)
    sim.refs[5].plan_execution.header.execution_id = "zzz"
    last = sim.refs[-2].task_execution.header.execution_id
    refused = forked(sim, last, fast=True)
    assert refused == forked(sim, last, fast=False)
    assert isinstance(refused, tuple)
    assert refused[0] is fork.ForkError
    assert forked(sim, "nope", fast=True) == forked(sim, "nope", fast=False)


# --- reading history ----------------------------------------------------------------------


class _Stored:
    def __init__(self, at: datetime, envelope: envelope_pb2.ExecutionEnvelope) -> None:
        self.store_sequence = 42
        self.persisted_at = at
        self.envelope = envelope.SerializeToString()


@pytest.mark.parametrize(
    "at",
    [
        datetime(2026, 3, 4, 5, 6, 7, 891_011, tzinfo=UTC),
        datetime(2026, 3, 4, 5, 6, 7, 891_011),  # naive: UTC
        datetime(2026, 3, 4, 7, 6, 7, 1, tzinfo=timezone(timedelta(hours=2))),
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
)
def test_a_stored_record_becomes_the_same_ref_as_before(at: datetime) -> None:
    record = execution_pb2.TaskExecution(
        result=result_pb2.TaskResult(
            status=result_pb2.TASK_STATUS_SUCCEEDED,
            output=payload({"x": 1}),
            telemetry=telemetry_pb2.Telemetry(input_tokens=3),
        )
    )
    record.header.execution_id = "e1"
    ref = replay.ref_of(_Stored(at, envelope_pb2.ExecutionEnvelope(task_execution=record)))
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(at)
    assert ref.persisted_at == expected
    assert ref.store_sequence == 42
    assert ref.task_execution == record
