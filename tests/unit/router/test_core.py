"""The router's step-loop decisions, driven without any network."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.router import core, replay
from tickmesh.sdk import (
    MAX_ENVELOPE_BYTES,
    GraphBuilder,
    ValidationError,
    decode_envelope,
    events_of,
)
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    graph_pb2,
    guardrail_pb2,
    lifetime_pb2,
    payload_pb2,
    result_pb2,
    telemetry_pb2,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PRODUCER = core.Producer("router", "test", "unit")


def payload(value: Any) -> payload_pb2.Payload:
    data = json.dumps(value).encode()
    return payload_pb2.Payload(content_type="application/json", inline=data, size=len(data))


class Sim:
    """Drives one lifetime through core, playing executor + state by hand."""

    def __init__(self, graph: graph_pb2.AgentGraph, guard: core.Guard = core.allow_all) -> None:
        graph.version = 1
        self.graph = graph
        self.guard = guard
        self.state = core.new_lifetime(
            tenant_id="acme",
            lifetime_id="l1",
            graph=graph,
            input_payload=payload({"goal": 1}),
            client_request_id="",
            labels={},
        )
        self.pending: list[envelope_pb2.ExecutionEnvelope] = []
        self.events: list[lifetime_pb2.LifetimeEvent] = []
        self.records: list[envelope_pb2.ExecutionEnvelope] = []
        self.cancels: list[str] = []
        self.run(core.start)

    def run(self, fn: Any, *args: Any) -> Any:
        lt = core.Lifetime(self.state, self.graph, PRODUCER, NOW, self.guard)
        result = fn(lt, *args)
        self.state = lt.state
        self.cancels.extend(lt.cancels)
        for message in lt.out:
            env = decode_envelope(message.data)
            kind = env.WhichOneof("body")
            if kind in ("task_request", "plan_request"):
                self.pending.append(env)
            elif kind in ("lifetime_event", "lifetime_events"):
                self.events.extend(events_of(env))
            else:
                self.records.append(env)
        return result

    @property
    def view(self) -> lifetime_pb2.AgentLifetime:
        return self.state.lifetime

    @property
    def recorded(self) -> rs.RouterLifetime:
        """The state as replay and fork read it: with the wakes its events recorded (the
        router reads them from the state service's store)."""
        state = rs.RouterLifetime()
        state.CopyFrom(self.state)
        state.wakes.extend(replay.wakes_of(self.events))
        return state

    def take(self, node_id: str) -> envelope_pb2.ExecutionEnvelope:
        for i, env in enumerate(self.pending):
            if env.header.node.id == node_id:
                return self.pending.pop(i)
        raise AssertionError(f"{node_id} not dispatched; pending {self.pending_nodes()}")

    def pending_nodes(self) -> list[str]:
        return sorted(e.header.node.id for e in self.pending)

    def finish_task(
        self,
        request: envelope_pb2.ExecutionEnvelope,
        output: Any = None,
        *,
        status: result_pb2.TaskStatus.ValueType = result_pb2.TASK_STATUS_SUCCEEDED,
        attempt: int = 1,
        tokens: int = 0,
    ) -> bool:
        header = request.header
        header.attempt = attempt
        result = result_pb2.TaskResult(
            status=status, telemetry=telemetry_pb2.Telemetry(input_tokens=tokens)
        )
        if status == result_pb2.TASK_STATUS_SUCCEEDED:
            result.output.CopyFrom(payload(output))
        else:
            result.error.CopyFrom(result_pb2.ErrorInfo(type="Boom", message="boom", retryable=True))
        ref = execution_pb2.ExecutionRef(
            task_execution=execution_pb2.TaskExecution(header=header, result=result)
        )
        return bool(self.run(core.on_execution, ref))

    def decide(
        self, request: envelope_pb2.ExecutionEnvelope, result: result_pb2.PlanResult
    ) -> bool:
        ref = execution_pb2.ExecutionRef(
            plan_execution=execution_pb2.PlanExecution(header=request.header, result=result)
        )
        return bool(self.run(core.on_execution, ref))


def dispatch(*nodes: str) -> result_pb2.PlanResult:
    return result_pb2.PlanResult(
        dispatch=result_pb2.DispatchDecision(
            steps=[result_pb2.NextStep(node_id=n, input=payload(i)) for i, n in enumerate(nodes)]
        )
    )


def complete(value: Any) -> result_pb2.PlanResult:
    return result_pb2.PlanResult(complete=result_pb2.CompleteDecision(output=payload(value)))


def hello_graph() -> graph_pb2.AgentGraph:
    return (
        GraphBuilder("hello", max_iterations=5)
        .task("greet")
        .plan("decide")
        .task("shout")
        .edge("greet", "decide")
        .edge("decide", "shout")
        .edge("shout", "decide")
        .final("decide")
        .build()
    )


def fanout_graph(join: str = "all", quorum: int = 0) -> graph_pb2.AgentGraph:
    return (
        GraphBuilder("fan")
        .plan("plan")
        .task("work")
        .plan("merge", join=join, quorum=quorum)
        .edge("plan", "work", "parallel")
        .edge("work", "merge", "join")
        .edge("merge", "work", "parallel")
        .final("merge")
        .build()
    )


def state_of(sim: Sim) -> str:
    return lifetime_pb2.LifetimeState.Name(sim.view.state)


def test_hello_runs_task_plan_task_final() -> None:
    sim = Sim(hello_graph())
    assert [e.kind for e in sim.events[:2]] == [
        lifetime_pb2.LIFETIME_EVENT_KIND_STARTED,
        lifetime_pb2.LIFETIME_EVENT_KIND_STEP_DISPATCHED,
    ]
    greet = sim.take("greet")
    assert greet.header.iteration == 1
    assert not greet.header.parent_execution_ids
    assert sim.finish_task(greet, "hi")
    decide = sim.take("decide")
    assert list(decide.header.parent_execution_ids) == [greet.header.execution_id]
    assert [i.execution_id for i in decide.plan_request.inputs] == [greet.header.execution_id]
    assert sim.decide(decide, dispatch("shout"))
    shout = sim.take("shout")
    assert sim.finish_task(shout, "HI")
    decide2 = sim.take("decide")
    assert decide2.header.iteration == 2
    assert sim.decide(decide2, complete({"done": True}))
    assert state_of(sim) == "LIFETIME_STATE_COMPLETED"
    assert json.loads(sim.view.output.inline) == {"done": True}
    assert not sim.state.in_flight
    sequences = [e.sequence for e in sim.events]
    assert sequences == list(range(1, len(sequences) + 1))


def test_execution_ids_are_deterministic() -> None:
    a, b = Sim(hello_graph()), Sim(hello_graph())
    assert a.take("greet").header.execution_id == b.take("greet").header.execution_id


def test_duplicate_and_stale_refs_change_nothing() -> None:
    sim = Sim(hello_graph())
    greet = sim.take("greet")
    assert sim.finish_task(greet, "hi")
    before = sim.state.SerializeToString(deterministic=True)
    assert not sim.finish_task(greet, "hi")  # redelivered ref
    assert sim.state.SerializeToString(deterministic=True) == before
    assert sim.pending_nodes() == ["decide"]


def test_non_final_attempt_is_ignored() -> None:
    sim = Sim(hello_graph())
    greet = sim.take("greet")
    # attempt 1 of 3 failed with a retryable error: the pool will retry.
    assert not sim.finish_task(greet, status=result_pb2.TASK_STATUS_FAILED, attempt=1)
    assert greet.header.execution_id in sim.state.in_flight
    assert sim.finish_task(greet, status=result_pb2.TASK_STATUS_FAILED, attempt=3)
    decide = sim.take("decide")
    assert decide.plan_request.inputs[0].status == result_pb2.TASK_STATUS_FAILED


def test_max_iterations_bounds_cycles() -> None:
    sim = Sim(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    rounds = 0
    while sim.view.state == lifetime_pb2.LIFETIME_STATE_RUNNING:
        sim.decide(sim.take("decide"), dispatch("shout"))
        if sim.view.state != lifetime_pb2.LIFETIME_STATE_RUNNING:
            break
        sim.finish_task(sim.take("shout"), "x")
        rounds += 1
    assert state_of(sim) == "LIFETIME_STATE_FAILED"
    assert sim.view.error.type == "MaxIterationsExceeded"
    # decide and shout each ran 5 times (the cap); the 6th dispatch of decide fails it.
    assert rounds == 5
    assert sim.state.iterations["decide"] == 5


@pytest.mark.parametrize(
    ("join", "quorum", "fires_after"), [("all", 0, 3), ("any", 0, 1), ("quorum", 2, 2)]
)
def test_join_fires_once(join: str, quorum: int, fires_after: int) -> None:
    sim = Sim(fanout_graph(join, quorum))
    sim.decide(sim.take("plan"), dispatch("work", "work", "work"))
    works = [sim.take("work") for _ in range(3)]
    assert len({w.header.execution_id for w in works}) == 3
    for i, work in enumerate(works, start=1):
        sim.finish_task(work, i)
        merges = [e for e in sim.pending if e.header.node.id == "merge"]
        assert len(merges) == (1 if i >= fires_after else 0), f"after {i} results"
    merge = sim.take("merge")
    assert len(merge.plan_request.inputs) == fires_after
    assert sorted(merge.header.parent_execution_ids) == sorted(
        w.header.execution_id for w in works[:fires_after]
    )
    assert not sim.state.joins  # everything arrived: the join is forgotten


@pytest.mark.parametrize(
    ("width", "share"), [(1, 0), (2, 131_072), (4, 65_536), (5, 52_428), (256, 1024), (300, 1024)]
)
def test_tasks_dispatched_together_share_one_output_budget(width: int, share: int) -> None:
    """Their outputs wait in the state for the join and travel in one plan request: each
    task's request names its share of the pool's default inline limit (never below 1 KiB),
    over which the pool stores its output as a blob. A task dispatched alone names none."""
    assert core.output_share(width) == share
    sim = Sim(fanout_graph())
    sim.decide(sim.take("plan"), dispatch(*["work"] * min(width, 5)))
    works = [sim.take("work") for _ in range(min(width, 5))]
    assert {w.header.output_inline_limit for w in works} == {core.output_share(len(works))}


def test_each_join_shares_its_own_budget() -> None:
    """Tasks of one decision that report to different plans are different joins: each
    task's share is its own join's part, not the whole decision's."""
    graph = (
        GraphBuilder("two-joins")
        .plan("plan")
        .task("a")
        .task("b")
        .plan("x")
        .plan("y")
        .edge("plan", "a")
        .edge("plan", "b")
        .edge("a", "x")
        .edge("b", "y")
        .final("x")
        .final("y")
        .build()
    )
    sim = Sim(graph)
    sim.decide(sim.take("plan"), dispatch("a", "a", "b"))
    shares = {(w.header.node.id, w.header.output_inline_limit) for w in sim.pending}
    assert shares == {("a", core.output_share(2)), ("b", 0)}


def test_refine_cycle_dispatches_fresh_ids() -> None:
    sim = Sim(fanout_graph())
    sim.decide(sim.take("plan"), dispatch("work", "work"))
    first = [sim.take("work") for _ in range(2)]
    for w in first:
        sim.finish_task(w, 1)
    sim.decide(sim.take("merge"), dispatch("work", "work"))
    second = [sim.take("work") for _ in range(2)]
    ids = {w.header.execution_id for w in first + second}
    assert len(ids) == 4
    assert {w.header.iteration for w in second} == {3, 4}


def test_plan_dispatching_an_unconnected_node_fails_the_lifetime() -> None:
    sim = Sim(fanout_graph())
    sim.decide(sim.take("plan"), dispatch("merge"))
    assert state_of(sim) == "LIFETIME_STATE_FAILED"
    assert "no edge" in sim.view.error.message


def test_complete_without_final_edge_fails() -> None:
    sim = Sim(fanout_graph())
    sim.decide(sim.take("plan"), complete(1))
    assert state_of(sim) == "LIFETIME_STATE_FAILED"
    assert "FINAL" in sim.view.error.message


def test_plan_error_fails_the_lifetime() -> None:
    sim = Sim(fanout_graph())
    plan = sim.take("plan")
    plan.header.attempt = 3
    bad = result_pb2.PlanResult(error=result_pb2.ErrorInfo(type="KeyError", message="oops"))
    sim.decide(plan, bad)
    assert state_of(sim) == "LIFETIME_STATE_FAILED"
    assert sim.view.error.type == "KeyError"


def _guard(
    action: guardrail_pb2.GuardrailAction.ValueType,
    phase: guardrail_pb2.GuardrailPhase.ValueType,
    node: str = "",
) -> core.Guard:
    def guard(
        lt: core.Lifetime, p: guardrail_pb2.GuardrailPhase.ValueType, header: Any, usage: Any
    ) -> guardrail_pb2.GuardrailDecision:
        if p == phase and (not node or header.node.id == node):
            return guardrail_pb2.GuardrailDecision(
                action=action,
                phase=p,
                policy_id="p",
                violations=[guardrail_pb2.Violation(rule_id="r", message="over")],
            )
        return guardrail_pb2.GuardrailDecision(action=guardrail_pb2.GUARDRAIL_ACTION_ALLOW)

    return guard


def test_pre_dispatch_reject_records_a_rejected_execution() -> None:
    guard = _guard(
        guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION,
        guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH,
        "work",
    )
    sim = Sim(fanout_graph(), guard)
    sim.decide(sim.take("plan"), dispatch("work"))
    assert sim.pending_nodes() == []
    assert len(sim.records) == 1
    record = sim.records[0].task_execution
    assert record.result.status == result_pb2.TASK_STATUS_REJECTED
    guardrail_events = [
        e for e in sim.events if e.kind == lifetime_pb2.LIFETIME_EVENT_KIND_GUARDRAIL
    ]
    assert guardrail_events
    assert guardrail_events[0].guardrail.violations[0].rule_id == "r"
    # The record comes back through the store; the plan is told.
    sim.run(core.on_execution, execution_pb2.ExecutionRef(task_execution=record))
    merge = sim.take("merge")
    assert merge.plan_request.inputs[0].status == result_pb2.TASK_STATUS_REJECTED


def test_post_result_abort_ends_the_lifetime_and_cancels_in_flight() -> None:
    guard = _guard(
        guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME,
        guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT,
        "work",
    )
    sim = Sim(fanout_graph(), guard)
    sim.decide(sim.take("plan"), dispatch("work", "work"))
    a, b = sim.take("work"), sim.take("work")
    sim.finish_task(a, 1, tokens=5000)
    assert state_of(sim) == "LIFETIME_STATE_ABORTED"
    assert sim.cancels == [b.header.execution_id]
    assert sim.view.totals.input_tokens == 5000
    assert not sim.finish_task(b, 2) or sim.pending_nodes() == []


def test_pause_holds_dispatches_and_resume_releases_them() -> None:
    sim = Sim(fanout_graph())
    plan = sim.take("plan")
    sim.run(core.pause, "operator")
    assert state_of(sim) == "LIFETIME_STATE_PAUSED"
    sim.decide(plan, dispatch("work"))  # in-flight work finishes and is recorded
    assert sim.pending_nodes() == []
    assert len(sim.state.held) == 1
    sim.run(core.resume, "")
    assert state_of(sim) == "LIFETIME_STATE_RUNNING"
    assert sim.pending_nodes() == ["work"]
    assert not sim.state.held


def test_wait_then_signal_asks_the_plan_again_with_its_inputs() -> None:
    sim = Sim(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    decide = sim.take("decide")
    wait = result_pb2.PlanResult(wait=result_pb2.WaitDecision(signal_name="approval"))
    sim.decide(decide, wait)
    assert state_of(sim) == "LIFETIME_STATE_WAITING"
    with pytest.raises(core.RoutingError, match="approval"):
        sim.run(core.signal, lifetime_pb2.Signal(name="other"))
    sim.run(
        core.signal,
        lifetime_pb2.Signal(signal_id="s1", name="approval", payload=payload(True), approver="ana"),
    )
    again = sim.take("decide")
    assert again.plan_request.signal.name == "approval"
    assert again.plan_request.signal.approver == "ana"
    assert len(again.plan_request.inputs) == 1
    assert list(again.header.parent_execution_ids) == [decide.header.execution_id]
    sim.run(core.signal, lifetime_pb2.Signal(signal_id="s1", name="approval"))  # duplicate
    assert sim.pending_nodes() == []


def test_a_lifetime_woken_by_many_signals_keeps_a_state_of_the_same_size() -> None:
    """The state counts the wakes and remembers the last MAX_SIGNAL_IDS ids; each signal
    itself (its payload) is only in its event, which names the plan that waited."""
    graph = hello_graph()
    graph.max_iterations = 1000
    sim = Sim(graph)
    sim.finish_task(sim.take("greet"), "hi")
    wait = result_pb2.PlanResult(wait=result_pb2.WaitDecision(signal_name="msg"))
    sizes = []
    turns = core.MAX_SIGNAL_IDS + 44
    for n in range(turns):
        decide = sim.take("decide")
        sim.decide(decide, wait)
        sim.run(
            core.signal,
            lifetime_pb2.Signal(signal_id=f"{n:05d}", name="msg", payload=payload("x" * 5000)),
        )
        sizes.append(sim.state.ByteSize())
        received = [
            e for e in sim.events if e.kind == lifetime_pb2.LIFETIME_EVENT_KIND_SIGNAL_RECEIVED
        ]
        assert len(received) == n + 1
        event = received[-1]
        assert event.execution_id == decide.header.execution_id
        assert event.signal.payload == payload("x" * 5000)
    assert sim.state.wake_count == turns
    assert not sim.state.wakes
    assert list(sim.state.signal_ids) == [f"{n:05d}" for n in range(44, turns)]
    # Flat once the ids' window is full (before, 1.5 MB of payloads in all).
    assert sizes[-1] == sizes[core.MAX_SIGNAL_IDS], (sizes[0], sizes[-1])
    assert sizes[-1] < 32 * 1024
    # An id in the window is a duplicate; one that left it is a new signal.
    sim.decide(sim.take("decide"), wait)
    sim.run(core.signal, lifetime_pb2.Signal(signal_id=f"{turns - 1:05d}", name="msg"))
    assert state_of(sim) == "LIFETIME_STATE_WAITING"
    sim.run(core.signal, lifetime_pb2.Signal(signal_id="00000", name="msg"))
    assert state_of(sim) == "LIFETIME_STATE_RUNNING"


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, 0), (-5, 0), (0, -1), (10**12, 0), (core.MAX_WAIT_S + 1, 0), (315_576_000_000, 0)],
)
def test_a_wait_timeout_out_of_range_fails_the_lifetime(seconds: int, nanos: int) -> None:
    """A plan result is an executor's word: a timeout of 0, below it, or past what a
    deadline can hold (a timestamp's seconds end in the year 9999) fails the lifetime,
    saying so, rather than raising on every redelivery of the plan's record."""
    sim = Sim(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    wait = result_pb2.WaitDecision(signal_name="approval")
    wait.timeout.seconds, wait.timeout.nanos = seconds, nanos
    sim.decide(sim.take("decide"), result_pb2.PlanResult(wait=wait))
    assert state_of(sim) == "LIFETIME_STATE_FAILED"
    assert sim.view.error.type == "RoutingError"
    assert "asked to wait for 'approval' with a timeout of" in sim.view.error.message
    assert not sim.state.HasField("wait")


def test_a_failed_step_s_finished_event_carries_its_error() -> None:
    """LifetimeEvent.error is for failures: watchers (the console's step tree, the SDKs)
    tell a failed step from a finished one by it, not by parsing the message."""
    sim = Sim(hello_graph())
    greet = sim.take("greet")
    # The last attempt (3 by default) is final: the step finishes failed.
    sim.finish_task(greet, status=result_pb2.TASK_STATUS_FAILED, attempt=3)
    finished = [e for e in sim.events if e.kind == lifetime_pb2.LIFETIME_EVENT_KIND_STEP_FINISHED]
    assert [(e.error.type, e.error.message) for e in finished] == [("Boom", "boom")]
    ok = Sim(hello_graph())
    ok.finish_task(ok.take("greet"), "hi")
    [done] = [e for e in ok.events if e.kind == lifetime_pb2.LIFETIME_EVENT_KIND_STEP_FINISHED]
    assert not done.HasField("error")


def test_a_wait_for_no_signal_name_fails_the_lifetime() -> None:
    """SignalLifetime requires a name, so a wait for '' could only end by timeout or
    abort: a plan result from an executor that left the name out fails the lifetime."""
    sim = Sim(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    sim.decide(sim.take("decide"), result_pb2.PlanResult(wait=result_pb2.WaitDecision()))
    assert state_of(sim) == "LIFETIME_STATE_FAILED"
    assert sim.view.error.type == "RoutingError"
    assert "without a signal name" in sim.view.error.message
    assert not sim.state.HasField("wait")


def test_a_wait_of_a_century_is_taken() -> None:
    sim = Sim(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    wait = result_pb2.WaitDecision(signal_name="approval")
    wait.timeout.seconds = core.MAX_WAIT_S
    sim.decide(sim.take("decide"), result_pb2.PlanResult(wait=wait))
    assert state_of(sim) == "LIFETIME_STATE_WAITING"
    assert sim.state.wait.deadline.seconds > core.MAX_WAIT_S


def test_abort_is_terminal_and_idempotent() -> None:
    sim = Sim(hello_graph())
    greet = sim.take("greet")
    sim.run(core.abort, "stop")
    assert state_of(sim) == "LIFETIME_STATE_ABORTED"
    assert sim.cancels == [greet.header.execution_id]
    count = len(sim.events)
    sim.run(core.abort, "again")
    assert len(sim.events) == count


def test_outbox_messages_are_valid_envelopes() -> None:
    sim = Sim(hello_graph())
    lt = core.Lifetime(sim.state, sim.graph, PRODUCER, NOW)
    core.pause(lt, "x")
    assert all(isinstance(m, rs.OutMessage) for m in lt.out)
    for m in lt.out:
        assert m.msg_id.startswith("evt:l1:")
        assert m.subject == "tm.acme.evt.l1"


def test_a_decision_publishes_its_events_as_one_message() -> None:
    sim = Sim(hello_graph())
    greet = sim.take("greet")
    before = sim.view.last_sequence
    lt = core.Lifetime(sim.state, sim.graph, PRODUCER, NOW)
    header = greet.header
    result = result_pb2.TaskResult(status=result_pb2.TASK_STATUS_SUCCEEDED, output=payload("hi"))
    ref = execution_pb2.ExecutionRef(
        task_execution=execution_pb2.TaskExecution(header=header, result=result)
    )
    assert core.on_execution(lt, ref)

    kinds = [m.type for m in lt.out]
    # The events come first (the step finished before the plan was dispatched).
    assert kinds == ["lifetime_events", "plan_request"]
    message = lt.out[0]
    envelope = decode_envelope(message.data, expected_kind="lifetime_events")
    events = list(events_of(envelope))
    assert [e.kind for e in events] == [
        lifetime_pb2.LIFETIME_EVENT_KIND_STEP_FINISHED,
        lifetime_pb2.LIFETIME_EVENT_KIND_STEP_DISPATCHED,
    ]
    assert [e.sequence for e in events] == [before + 1, before + 2]
    assert envelope.header.sequence == before + 1
    assert message.msg_id == f"evt:l1:{before + 1}-{before + 2}"
    assert message.subject == "tm.acme.evt.l1"


def test_events_after_the_messages_were_read_go_out_as_another_message() -> None:
    sim = Sim(hello_graph())
    lt = core.Lifetime(sim.state, sim.graph, PRODUCER, NOW)
    core.pause(lt, "first")
    assert [m.type for m in lt.out] == ["lifetime_event"]  # one event: the single form
    core.resume(lt, "then")
    ids = [m.msg_id for m in lt.out]
    assert len(ids) == 2
    assert len(set(ids)) == 2
    assert all(decode_envelope(m.data).header.sequence for m in lt.out)


def test_a_request_too_large_for_one_message_raises_the_same_live_and_re_driven() -> None:
    """Live, the request's encoding refuses it; re-driven (replay, fork: nothing encoded)
    its size is checked the same way, so both fail the lifetime with one message."""
    sim = Sim(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    decide = sim.take("decide")
    huge = result_pb2.PlanResult(
        dispatch=result_pb2.DispatchDecision(
            steps=[result_pb2.NextStep(node_id="shout", input=payload("z" * 1_100_000))]
        )
    )
    ref = execution_pb2.ExecutionRef(
        plan_execution=execution_pb2.PlanExecution(header=decide.header, result=huge)
    )
    messages = []
    for quiet in (False, True):
        state = rs.RouterLifetime()
        state.CopyFrom(sim.state)
        with pytest.raises(ValidationError) as raised:
            core.on_execution(core.Lifetime(state, sim.graph, PRODUCER, NOW, quiet=quiet), ref)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    assert f"over the {MAX_ENVELOPE_BYTES}-byte limit" in messages[0]
