"""Replay: recorded lifetimes re-driven through core, decision by decision."""

from __future__ import annotations

from typing import Any

import pytest

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
from tickmesh.runtime.errors import StatusError
from tickmesh.sdk import GraphBuilder, graph_digest
from tickmesh.sdk.errors import StatusCode
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    graph_pb2,
    guardrail_pb2,
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
            # The router's own rejection records carry the digest already.
            record.request_digest = record.request_digest or self._digest
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
    return replay.replay(sim.recorded, graph or sim.graph, sim.refs, producer=PRODUCER)


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


def test_a_fan_out_recorded_before_output_shares_replays() -> None:
    """An earlier version named no output share on a fan-out's requests (nor, then, did
    its records' headers): the share is in the header, not in the request body whose
    digest replay compares, so such a lifetime still reproduces."""
    sim = Recorder(fanout_graph())
    sim.decide(sim.take("plan"), dispatch("work", "work", "work"))
    works = [sim.take("work") for _ in range(3)]
    assert {w.header.output_inline_limit for w in works} == {core.output_share(3)}
    for i, work in enumerate(works):
        work.header.ClearField("output_inline_limit")
        sim.finish_task(work, i)
    sim.decide(sim.take("merge"), complete("ok"))
    assert not any(r.task_execution.header.output_inline_limit for r in sim.refs)
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
    # How each wait ended is in the events (the signal whole), not in the state.
    assert not sim.state.wakes
    assert sim.state.wake_count == 2
    assert [(w.timed_out, w.signal.approver) for w in sim.recorded.wakes] == [
        (False, "ana"),
        (True, ""),
    ]
    report = replayed(sim)
    assert report.reproduced, report.divergences
    # A state without its recorded wakes cannot reproduce the lifetime past its first wait.
    assert not replay.replay(sim.state, sim.graph, sim.refs, producer=PRODUCER).reproduced

    # Without the recorded approver, the plan would be asked another question.
    tampered = rs.RouterLifetime()
    tampered.CopyFrom(sim.recorded)
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
    report = replay.replay(sim.recorded, sim.graph, refs, producer=PRODUCER)
    assert not report.reproduced
    assert report.divergences[0].execution_id == "x" * 20
    assert "not dispatched by replay" in report.divergences[0].message


# --- handler code -----------------------------------------------------------------------


def _digest(name: str) -> str:
    return f"{name}-code".encode().hex().ljust(64, "0")


def stamped(sim: Recorder, **digests: str) -> list[execution_pb2.ExecutionRef]:
    """The records, as executors running each handler's code (``_digest``) write them;
    ``digests`` overrides the code of a handler from its second execution on."""
    refs: list[execution_pb2.ExecutionRef] = []
    runs: dict[str, int] = {}
    for ref in sim.refs:
        copy = execution_pb2.ExecutionRef()
        copy.CopyFrom(ref)
        record = replay.record_of(copy)
        handler = record.header.node.handler
        runs[handler] = runs.get(handler, 0) + 1
        code = digests[handler] if handler in digests and runs[handler] > 1 else None
        record.executor.code_digest = code or _digest(handler)
        refs.append(copy)
    return refs


def test_unchanged_handler_code_reproduces() -> None:
    sim = run_hello(rounds=3)
    current = {h: _digest(h) for h in ("greet", "decide", "shout")}
    report = replay.replay(
        sim.recorded, sim.graph, stamped(sim), producer=PRODUCER, code_digests=current
    )
    assert report.reproduced, report.divergences


def test_changed_handler_code_diverges_at_its_first_execution_that_ran_other_code() -> None:
    sim = run_hello(rounds=3)
    # decide ran its old code once, then the new one: 1 of 4 executions differs from now.
    refs = stamped(sim, decide=_digest("decide-v2"))
    current = {"greet": _digest("greet"), "decide": _digest("decide-v2")}
    report = replay.replay(sim.recorded, sim.graph, refs, producer=PRODUCER, code_digests=current)
    assert not report.reproduced
    [only] = report.divergences
    first_decide = next(r for r in refs if replay.record_of(r).header.node.id == "decide")
    assert only.execution_id == replay.record_of(first_decide).header.execution_id
    assert only.node.handler == "decide"
    assert only.expected == _digest("decide")
    assert only.actual == _digest("decide-v2")
    assert only.message == (
        f"handler code changed: decide recorded {_digest('decide')[:12]}, "
        f"current {_digest('decide-v2')[:12]} (1 of 4 recorded executions)"
    )


def test_handler_code_is_compared_only_for_the_handlers_given() -> None:
    sim = run_hello()
    refs = stamped(sim)
    everything_else = {"greet": "0" * 64, "shout": "1" * 64}
    report = replay.replay(
        sim.recorded, sim.graph, refs, producer=PRODUCER, code_digests=everything_else
    )
    assert [d.node.handler for d in report.divergences] == ["greet", "shout"]
    assert all(d.message.startswith("handler code changed: ") for d in report.divergences)
    assert report.divergences[0].sequence < report.divergences[1].sequence
    # Records without a code digest say nothing about the code.
    assert replay.replay(
        sim.recorded, sim.graph, sim.refs, producer=PRODUCER, code_digests=everything_else
    ).reproduced
    assert replay.replay(sim.recorded, sim.graph, refs, producer=PRODUCER).reproduced


# --- guardrails --------------------------------------------------------------------------


def _policy(version: int) -> guardrail_pb2.Policy:
    return guardrail_pb2.Policy(policy_id="caps", version=version, digest=f"{version:064x}")


def _reject_work_from(iteration: int) -> core.Guard:
    """Refuses ``work`` before dispatch from its ``iteration``-th run on."""

    def guard(
        lt: core.Lifetime, phase: Any, header: Any, usage: Any
    ) -> guardrail_pb2.GuardrailDecision:
        if (
            phase == guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH
            and header.node.id == "work"
            and header.iteration >= iteration
        ):
            return guardrail_pb2.GuardrailDecision(
                action=guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION,
                phase=phase,
                policy_id="caps",
                violations=[guardrail_pb2.Violation(rule_id="work-cap", message="work capped")],
            )
        return guardrail_pb2.GuardrailDecision(action=guardrail_pb2.GUARDRAIL_ACTION_ALLOW)

    return guard


def run_guarded(guard: core.Guard) -> Recorder:
    """plan -> work x3 (those the guard refuses come back as rejection records) -> merge."""
    sim = Recorder(fanout_graph(), guard)
    sim.decide(sim.take("plan"), dispatch("work", "work", "work"))
    for request in [sim.take("work") for _ in range(len(sim.pending))]:
        sim.finish_task(request, request.header.iteration)
    for record in list(sim.records):
        sim.run(core.on_execution, execution_pb2.ExecutionRef(task_execution=record.task_execution))
    sim.decide(sim.take("merge"), complete("ok"))
    assert sim.view.state == lifetime_pb2.LIFETIME_STATE_COMPLETED
    return sim


def test_replay_under_the_recorded_policy_reproduces_its_refusals() -> None:
    guard = _reject_work_from(3)
    sim = run_guarded(guard)
    v1 = [_policy(1)]
    report = replay.replay(
        sim.recorded,
        sim.graph,
        sim.refs,
        producer=PRODUCER,
        guardrails=replay.Guardrails(guard, policies=v1, recorded=v1),
    )
    assert report.reproduced, report.divergences
    assert report.policy_changes == []
    assert [(d.node_id, d.iteration, d.refused) for d in report.dispatched] == [
        ("plan", 1, ""),
        ("work", 1, ""),
        ("work", 2, ""),
        ("work", 3, "work capped"),
        ("merge", 1, ""),
    ]
    # Without guardrails, the recorded refusal replays as the stored record it is.
    assert replayed(sim).reproduced


def test_a_stricter_policy_diverges_where_it_now_refuses_and_names_the_versions() -> None:
    sim = run_guarded(_reject_work_from(3))
    report = replay.replay(
        sim.recorded,
        sim.graph,
        sim.refs,
        producer=PRODUCER,
        guardrails=replay.Guardrails(
            _reject_work_from(2), policies=[_policy(2)], recorded=[_policy(1)]
        ),
    )
    assert not report.reproduced
    assert report.policy_changes == [f"caps: recorded v1 {'0' * 12}, replayed v2 {'0' * 12}"]
    [first] = report.divergences
    assert first.node.id == "work"
    assert first.message == (
        f"guardrail policy changed: {report.policy_changes[0]}; "
        "the guardrail now rejects the step before dispatch"
    )
    assert first.actual == "refused: work capped"


def test_a_looser_policy_diverges_where_it_no_longer_refuses() -> None:
    sim = run_guarded(_reject_work_from(3))
    v1 = [_policy(1)]
    report = replay.replay(
        sim.recorded,
        sim.graph,
        sim.refs,
        producer=PRODUCER,
        guardrails=replay.Guardrails(core.allow_all, policies=[], recorded=v1),
    )
    assert report.policy_changes == [f"caps removed: recorded v1 {'0' * 12}"]
    [first] = report.divergences
    assert "the guardrail no longer rejects the step before dispatch" in first.message
    assert first.expected == "refused: work capped"


class EventHistory:
    """A HistorySource holding one lifetime's stored events (paged as the store pages)."""

    def __init__(self, events: list[lifetime_pb2.LifetimeEvent]) -> None:
        self.stored = events
        self.reads = 0

    async def events(
        self, tenant: str, lifetime_id: str, *, after_sequence: int, limit: int
    ) -> list[lifetime_pb2.LifetimeEvent]:
        self.reads += 1
        return [e for e in self.stored if e.sequence > after_sequence][:limit]


def signalled_twice() -> Recorder:
    sim = Recorder(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    wait = result_pb2.PlanResult(
        wait=result_pb2.WaitDecision(
            signal_name="go", on_timeout=result_pb2.WAIT_TIMEOUT_ACTION_SIGNAL
        )
    )
    sim.decide(sim.take("decide"), wait)
    sim.run(core.signal, lifetime_pb2.Signal(name="go", payload=payload(1), approver="ana"))
    sim.decide(sim.take("decide"), wait)
    sim.run(core.wait_timed_out)
    sim.decide(sim.take("decide"), complete("done"))
    return sim


async def test_the_wakes_are_read_from_the_stored_events() -> None:
    sim = signalled_twice()
    history = EventHistory(sim.events)
    recorded = await replay.with_recorded_wakes(history, "acme", sim.state)  # type: ignore[arg-type]
    assert list(recorded.wakes) == list(sim.recorded.wakes)
    assert [w.timed_out for w in recorded.wakes] == [False, True]
    assert recorded.wakes[0].signal.approver == "ana"
    assert not sim.state.wakes  # a copy: the state itself is left as it is
    assert replay.replay(recorded, sim.graph, sim.refs, producer=PRODUCER).reproduced


async def test_a_lifetime_that_never_waited_reads_no_events() -> None:
    sim = run_hello()
    history = EventHistory(sim.events)
    recorded = await replay.with_recorded_wakes(history, "acme", sim.state)  # type: ignore[arg-type]
    assert recorded is sim.state
    assert history.reads == 0


async def test_wakes_the_store_does_not_hold_yet_are_unavailable() -> None:
    sim = signalled_twice()
    signal_seq = next(
        e.sequence for e in sim.events if e.kind == lifetime_pb2.LIFETIME_EVENT_KIND_SIGNAL_RECEIVED
    )
    history = EventHistory([e for e in sim.events if e.sequence < signal_seq + 1])
    with pytest.raises(StatusError) as raised:
        await replay.with_recorded_wakes(history, "acme", sim.state)  # type: ignore[arg-type]
    assert raised.value.status == StatusCode.UNAVAILABLE
    assert "holds 1 of the 2 signals and wait timeouts" in str(raised.value)


async def test_wakes_kept_in_the_state_by_an_earlier_router_are_read_first() -> None:
    """A lifetime that waited under an earlier router has those wakes in its state and
    events without the waiting plan's execution; later wakes are in its events."""
    sim = signalled_twice()
    legacy_events = []
    first_signal = True
    for event in sim.events:
        copy = lifetime_pb2.LifetimeEvent()
        copy.CopyFrom(event)
        if first_signal and event.kind == lifetime_pb2.LIFETIME_EVENT_KIND_SIGNAL_RECEIVED:
            copy.ClearField("execution_id")  # as an earlier router wrote it
            first_signal = False
        legacy_events.append(copy)
    state = rs.RouterLifetime()
    state.CopyFrom(sim.state)
    state.wakes.append(sim.recorded.wakes[0])
    state.wake_count = 1
    recorded = await replay.with_recorded_wakes(EventHistory(legacy_events), "acme", state)  # type: ignore[arg-type]
    assert list(recorded.wakes) == list(sim.recorded.wakes)
    assert replay.replay(recorded, sim.graph, sim.refs, producer=PRODUCER).reproduced


async def test_a_lifetime_aborted_while_paused_with_a_held_step_replays() -> None:
    """The task finished while paused: the plan it led to was decided, held, and dropped
    by the abort. Replay pauses before that record, as the router was, so it holds and
    drops the plan too rather than report it as a step never run."""
    sim = Recorder(hello_graph())
    greet = sim.take("greet")
    sim.run(core.pause, "look")
    sim.finish_task(greet, "hi")
    assert len(sim.state.held) == 1
    sim.run(core.abort, "never mind")
    assert not sim.state.held
    after = await replay.received_after_abort(EventHistory(sim.events), "acme", sim.state)  # type: ignore[arg-type]
    assert after.while_paused == {greet.header.execution_id}
    assert after.late == frozenset()
    report = replay.replay(sim.recorded, sim.graph, sim.refs, producer=PRODUCER, after_abort=after)
    assert report.reproduced, report.divergences
    # Not paused, the re-drive publishes the plan, which the recorded lifetime never ran.
    unpaused = replay.replay(sim.recorded, sim.graph, sim.refs, producer=PRODUCER)
    assert [d.message for d in unpaused.divergences] == [
        "replay dispatched a step the recorded lifetime never ran"
    ]


async def test_a_pause_resumed_before_the_abort_holds_nothing_in_replay() -> None:
    """Only the pause the abort came in holds what it drops: a step decided in an earlier
    pause was published on resume and is left open by the abort."""
    sim = Recorder(hello_graph())
    greet = sim.take("greet")
    sim.run(core.pause, "look")
    sim.finish_task(greet, "hi")
    sim.run(core.resume, "go on")
    sim.take("decide")  # published on resume, in flight when aborted
    sim.run(core.abort, "never mind")
    after = await replay.received_after_abort(EventHistory(sim.events), "acme", sim.state)  # type: ignore[arg-type]
    assert after.while_paused == frozenset()
    report = replay.replay(sim.recorded, sim.graph, sim.refs, producer=PRODUCER, after_abort=after)
    assert report.reproduced, report.divergences


class StoredHistory(EventHistory):
    """The state service's record and events of one lifetime the router no longer holds."""

    def __init__(self, sim: Recorder) -> None:
        super().__init__(sim.events)
        self.view = lifetime_pb2.AgentLifetime()
        self.view.CopyFrom(sim.view)
        self.view.ClearField("input")  # the record folds it from the STARTED event

    async def lifetime(self, tenant: str, lifetime_id: str) -> lifetime_pb2.AgentLifetime | None:
        return self.view if lifetime_id == self.view.lifetime_id else None


async def rebuilt(history: StoredHistory) -> rs.RouterLifetime:
    state = await replay.recorded_from_history(history, "acme", "l1")  # type: ignore[arg-type]
    assert state is not None
    return state


async def test_a_lifetime_past_retention_replays_from_its_stored_history() -> None:
    """Its input from its STARTED event, its wakes from its events, and the steps it left
    open (dispatched, never finished) from its events: what the router's state held."""
    sim = signalled_twice()
    state = await rebuilt(StoredHistory(sim))
    assert state.lifetime.input == sim.view.input
    assert list(state.wakes) == list(sim.recorded.wakes)
    assert replay.replay(state, sim.graph, sim.refs, producer=PRODUCER).reproduced

    aborted = Recorder(hello_graph())
    aborted.finish_task(aborted.take("greet"), "hi")
    aborted.decide(aborted.take("decide"), dispatch("shout"))
    aborted.run(core.abort, "operator")
    state = await rebuilt(StoredHistory(aborted))
    assert sorted(state.in_flight) == sorted(aborted.state.in_flight)
    assert [f.node_id for f in state.in_flight.values()] == ["shout"]
    report = replay.replay(state, aborted.graph, aborted.refs, producer=PRODUCER)
    assert report.reproduced, report.divergences
    assert await replay.recorded_from_history(StoredHistory(aborted), "acme", "l2") is None  # type: ignore[arg-type]


async def test_a_lifetime_past_retention_without_what_a_re_drive_needs_is_refused() -> None:
    sim = run_hello()
    no_input = StoredHistory(sim)
    no_input.stored = [_without_input(e) for e in sim.events]
    with pytest.raises(StatusError) as raised:
        await rebuilt(no_input)
    assert raised.value.status == StatusCode.FAILED_PRECONDITION
    assert "no input to re-drive it from" in raised.value.detail


def _without_input(event: lifetime_pb2.LifetimeEvent) -> lifetime_pb2.LifetimeEvent:
    """The event as a version that did not put the input on STARTED wrote it."""
    copy = lifetime_pb2.LifetimeEvent()
    copy.CopyFrom(event)
    copy.ClearField("input")
    return copy


def test_a_decision_that_raised_ends_alike_whatever_its_message_counts() -> None:
    """The message of a DecisionError may hold an envelope's size, which counts the bytes
    of its timestamps (the clock's): replay compares the exception's type only."""

    def failed(error_type: str, message: str) -> lifetime_pb2.AgentLifetime:
        view = lifetime_pb2.AgentLifetime(state=lifetime_pb2.LIFETIME_STATE_FAILED)
        view.error.type, view.error.message = error_type, message
        return view

    said = "the router could not decide on a step: ValidationError('ExecutionEnvelope is {} bytes')"
    recorded = failed(core.DECISION_ERROR, said.format(1_251_500))
    assert replay._same_end(failed(core.DECISION_ERROR, said.format(1_251_498)), recorded)
    other = "the router could not decide on a step: ValueError('Timestamp is not valid')"
    assert not replay._same_end(failed(core.DECISION_ERROR, other), recorded)
    # Any other failure is compared by its whole message.
    assert not replay._same_end(
        failed("RoutingError", "plan a v1"), failed("RoutingError", "plan a v2")
    )
