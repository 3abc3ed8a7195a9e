"""Replay: recorded lifetimes re-driven through core, decision by decision."""

from __future__ import annotations

from typing import Any

from tests.unit.router.test_core import (
    PRODUCER,
    Sim,
    complete,
    dispatch,
    fanout_graph,
    hello_graph,
    payload,
)
from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.router import core, replay
from tickmesh.sdk import GraphBuilder, graph_digest
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    graph_pb2,
    lifetime_pb2,
    result_pb2,
)


class Recorder(Sim):
    """A Sim that keeps the records it feeds, in store order, as the executor writes them
    (with the digest of the request that was executed)."""

    def __init__(self, graph: graph_pb2.AgentGraph, guard: core.Guard = core.allow_all) -> None:
        graph.digest = graph_digest(graph)
        self.refs: list[execution_pb2.ExecutionRef] = []
        self._digest = ""
        super().__init__(graph, guard)

    def run(self, fn: Any, *args: Any) -> Any:
        if fn is core.on_execution:
            ref: execution_pb2.ExecutionRef = args[0]
            record = ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
            record.request_digest = self._digest
            stored = execution_pb2.ExecutionRef()
            stored.CopyFrom(ref)
            stored.store_sequence = len(self.refs) + 1
            self.refs.append(stored)
        return super().run(fn, *args)

    def finish_task(self, request: envelope_pb2.ExecutionEnvelope, *a: Any, **kw: Any) -> bool:
        self._digest = replay.request_digest(request)
        return super().finish_task(request, *a, **kw)

    def decide(
        self, request: envelope_pb2.ExecutionEnvelope, result: result_pb2.PlanResult
    ) -> bool:
        self._digest = replay.request_digest(request)
        return super().decide(request, result)


def run_hello(rounds: int = 2) -> Recorder:
    sim = Recorder(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    for n in range(rounds):
        sim.decide(sim.take("decide"), dispatch("shout"))
        sim.finish_task(sim.take("shout"), f"HI {n}")
    sim.decide(sim.take("decide"), complete("done"))
    assert sim.view.state == lifetime_pb2.LIFETIME_STATE_COMPLETED
    return sim


def replayed(sim: Recorder, graph: graph_pb2.AgentGraph | None = None) -> replay.ReplayReport:
    return replay.replay(sim.state, graph or sim.graph, sim.refs, producer=PRODUCER)


def test_a_completed_loop_replays_every_decision() -> None:
    sim = run_hello(rounds=3)
    report = replayed(sim)
    assert report.reproduced, report.divergences
    # 8 dispatches, 4 plan decisions, where it ended and how it ended.
    assert report.decisions_checked == 8 + 4 + 2
    assert report.graph.digest == sim.graph.digest


def test_a_fan_out_with_a_join_replays() -> None:
    sim = Recorder(fanout_graph(join="quorum", quorum=2))
    sim.decide(sim.take("plan"), dispatch("work", "work", "work"))
    works = [sim.take("work") for _ in range(3)]
    sim.finish_task(works[2], 3)
    sim.finish_task(works[0], 1)  # the join fires here
    sim.finish_task(works[1], 2)  # late: ignored
    sim.decide(sim.take("merge"), complete("ok"))
    report = replayed(sim)
    assert report.reproduced, report.divergences


def test_signals_and_timeouts_are_replayed_from_the_recorded_wakes() -> None:
    sim = Recorder(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    wait = result_pb2.PlanResult(
        wait=result_pb2.WaitDecision(
            signal_name="approval",
            on_timeout=result_pb2.WAIT_TIMEOUT_ACTION_SIGNAL,
            default_payload=payload({"approved": False}),
        )
    )
    sim.decide(sim.take("decide"), wait)
    sim.run(
        core.signal,
        lifetime_pb2.Signal(name="approval", payload=payload({"ok": 1}), approver="ana"),
    )
    sim.decide(sim.take("decide"), wait)
    sim.run(core.wait_timed_out)
    again = sim.take("decide")
    assert again.plan_request.signal.timed_out
    sim.decide(again, complete("done"))
    assert [w.timed_out for w in sim.state.wakes] == [False, True]
    report = replayed(sim)
    assert report.reproduced, report.divergences

    # Without the recorded approver, the plan would be asked another question.
    tampered = rs.RouterLifetime()
    tampered.CopyFrom(sim.state)
    tampered.wakes[0].signal.approver = "mallory"
    report = replay.replay(tampered, sim.graph, sim.refs, producer=PRODUCER)
    assert not report.reproduced
    assert "another request" in report.divergences[0].message


def test_an_aborted_lifetime_replays_with_its_open_steps() -> None:
    sim = Recorder(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    sim.decide(sim.take("decide"), dispatch("shout"))
    sim.run(core.abort, "operator")
    report = replayed(sim)
    assert report.reproduced, report.divergences


def _changed(graph: graph_pb2.AgentGraph, **edit: Any) -> graph_pb2.AgentGraph:
    changed = graph_pb2.AgentGraph()
    changed.CopyFrom(graph)
    changed.version = 2
    if "max_iterations" in edit:
        changed.max_iterations = edit["max_iterations"]
    if "handler" in edit:
        for node in changed.nodes:
            if node.id == "shout":
                node.handler = edit["handler"]
    changed.digest = graph_digest(changed)
    return changed


def test_a_lower_max_iterations_diverges_at_the_plan_decision() -> None:
    sim = run_hello(rounds=3)
    report = replayed(sim, _changed(sim.graph, max_iterations=2))
    assert not report.reproduced
    first = report.divergences[0]
    assert first.message.startswith("graph digest changed: recorded v1")
    assert "does not fit the graph" in first.message
    assert first.node.id == "shout"  # its result would run decide a third time
    assert "max_iterations 2" in first.actual
    assert report.graph.version == 2


def test_a_changed_handler_diverges_at_its_first_dispatch() -> None:
    sim = run_hello()
    report = replayed(sim, _changed(sim.graph, handler="yell"))
    first = report.divergences[0]
    assert "the handler changed" in first.message
    assert first.node.id == "shout"
    assert "handler shout" in first.expected
    assert "handler yell" in first.actual


def test_a_changed_edge_diverges_at_the_first_step_routed_elsewhere() -> None:
    sim = run_hello()
    other = (
        GraphBuilder("hello", max_iterations=5)
        .task("greet")
        .plan("decide")
        .task("shout")
        .plan("check")
        .edge("greet", "decide")
        .edge("decide", "shout")
        .edge("shout", "check")
        .final("decide")
        .final("check")
        .build()
    )
    other.version = 2
    report = replayed(sim, other)
    assert not report.reproduced
    first = report.divergences[0]
    assert first.node.id == "decide"
    assert "not dispatched by replay" in first.message
    assert first.expected.startswith("dispatch decide (handler decide, iteration 2")
    assert first.actual.startswith("dispatch check (handler check, iteration 1")


def test_an_unchanged_graph_version_reproduces() -> None:
    sim = run_hello()
    same = _changed(sim.graph)
    same.description = sim.graph.description
    report = replayed(sim, same)
    assert report.reproduced


def test_a_record_replay_did_not_dispatch_is_the_first_divergence() -> None:
    sim = run_hello()
    refs = list(sim.refs)
    bogus = execution_pb2.ExecutionRef()
    bogus.CopyFrom(refs[1])
    bogus.plan_execution.header.execution_id = "x" * 20
    refs.insert(2, bogus)
    report = replay.replay(sim.state, sim.graph, refs, producer=PRODUCER)
    assert not report.reproduced
    assert report.divergences[0].execution_id == "x" * 20
    assert "not dispatched by replay" in report.divergences[0].message
