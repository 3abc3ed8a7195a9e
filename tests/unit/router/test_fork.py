"""Fork: the origin's state at one execution, re-keyed to a new lifetime."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from tests.unit.router.test_core import NOW, PRODUCER, complete, dispatch, fanout_graph, payload
from tests.unit.router.test_replay import Recorder, run_hello
from tickmesh.router import core, fork, replay
from tickmesh.sdk import NotFoundError, decode_envelope, events_of, execution_id
from tickmesh.v1 import envelope_pb2, execution_pb2, header_pb2, lifetime_pb2, result_pb2

logger = logging.getLogger(__name__)


def forked(sim: Recorder, execution: str, replacement: object = None) -> core.Lifetime:
    return fork.fork(
        sim.recorded,
        sim.graph,
        sim.refs,
        execution=execution,
        new_lifetime_id="l2",
        replacement=None if replacement is None else payload(replacement),
        client_request_id="",
        producer=PRODUCER,
        now=NOW,
    )


def requests(lt: core.Lifetime) -> list[envelope_pb2.ExecutionEnvelope]:
    return [decode_envelope(m.data) for m in lt.out if m.type in ("task_request", "plan_request")]


def test_fork_inside_a_loop_continues_after_the_fork_execution_with_a_new_output() -> None:
    sim = run_hello(rounds=3)
    shouts = [r for r in sim.refs if r.task_execution.header.node.id == "shout"]
    second = shouts[1].task_execution.header  # shout, iteration 2
    lt = forked(sim, second.execution_id, {"replaced": True})

    view = lt.view
    assert view.lifetime_id == "l2"
    assert view.mode == header_pb2.EXECUTION_MODE_FORK
    assert view.fork_origin.lifetime_id == "l1"
    assert view.fork_origin.execution_id == second.execution_id
    assert view.state == lifetime_pb2.LIFETIME_STATE_RUNNING
    # Only the step after the fork point is dispatched: decide, iteration 3, in the new lifetime.
    [decide] = requests(lt)
    assert decide.header.node.id == "decide"
    assert decide.header.iteration == 3
    assert decide.header.lifetime_id == "l2"
    assert list(decide.header.parent_execution_ids) == [second.execution_id]
    assert decide.header.execution_id == execution_id(
        "acme", "l2", [second.execution_id], "decide", 3
    )
    assert decide.header.fork_origin.lifetime_id == "l1"
    [given] = decide.plan_request.inputs
    assert given.output == payload({"replaced": True})
    assert list(lt.state.in_flight) == [decide.header.execution_id]
    # Events go on after the origin's sequence at the fork point.
    kinds = [e for m in lt.out for e in events_of(decode_envelope(m.data))]
    assert kinds[0].kind == lifetime_pb2.LIFETIME_EVENT_KIND_STARTED
    assert kinds[0].sequence == view.fork_origin.sequence + 1
    assert kinds[1].kind == lifetime_pb2.LIFETIME_EVENT_KIND_STEP_DISPATCHED
    # Usage of the shared history is carried over.
    assert view.execution_count == 5  # greet, decide, shout, decide, shout


def test_fork_of_one_fan_out_branch_redispatches_only_the_open_branches() -> None:
    sim = Recorder(fanout_graph())
    sim.decide(sim.take("plan"), dispatch("work", "work", "work"))
    works = [sim.take("work") for _ in range(3)]
    for n, work in enumerate(works):
        sim.finish_task(work, n)
    sim.decide(sim.take("merge"), complete("ok"))
    first = works[0].header.execution_id

    lt = forked(sim, first)
    sent = requests(lt)
    assert sorted(e.header.iteration for e in sent) == [2, 3]
    assert all(e.header.node.id == "work" and e.header.lifetime_id == "l2" for e in sent)
    [join] = lt.state.joins.values()
    assert join.expected[0] == first  # finished before the fork: shared history
    assert set(join.expected[1:]) == {e.header.execution_id for e in sent}

    # Finishing the re-dispatched branches fires the join in the fork.
    for env in sent:
        ref = execution_pb2.ExecutionRef(
            task_execution=execution_pb2.TaskExecution(
                header=env.header,
                result=result_pb2.TaskResult(
                    status=result_pb2.TASK_STATUS_SUCCEEDED, output=payload(9)
                ),
            )
        )
        lt.out.clear()
        assert core.on_execution(lt, ref)
    [merge] = requests(lt)
    assert merge.header.node.id == "merge"
    assert first in merge.header.parent_execution_ids
    assert [i.output for i in merge.plan_request.inputs].count(payload(9)) == 2


def test_fork_at_a_plan_with_a_replacement_asks_the_plan_again_with_a_new_goal() -> None:
    sim = run_hello(rounds=1)
    decides = [r for r in sim.refs if r.HasField("plan_execution")]
    first = decides[0].plan_execution.header
    lt = forked(sim, first.execution_id, {"goal": "other"})
    [again] = requests(lt)
    assert again.header.node.id == "decide"
    assert again.header.iteration == 1
    assert again.plan_request.goal == payload({"goal": "other"})
    assert lt.view.input == payload({"goal": "other"})


def test_fork_at_an_unknown_execution_is_not_found() -> None:
    sim = run_hello(rounds=1)
    with pytest.raises(NotFoundError):
        forked(sim, "nope")


def test_fork_of_a_history_that_does_not_replay_is_refused() -> None:
    sim = run_hello(rounds=1)
    sim.refs[2].task_execution.header.execution_id = "zzz"
    with pytest.raises(fork.ForkError, match="does not replay"):
        forked(sim, sim.refs[-1].plan_execution.header.execution_id)


def test_fork_latency_on_a_long_history() -> None:
    sim = Recorder(fanout_graph())
    sim.graph.max_iterations = 2000
    sim.decide(sim.take("plan"), dispatch("work"))
    for n in range(499):
        sim.finish_task(sim.take("work"), n)
        sim.decide(sim.take("merge"), dispatch("work"))
    sim.finish_task(sim.take("work"), 0)
    assert len(sim.refs) == 1000
    at = sim.refs[500].task_execution.header.execution_id or (
        sim.refs[501].task_execution.header.execution_id
    )
    started = datetime.now(UTC)
    lt = forked(sim, at)
    elapsed = (datetime.now(UTC) - started).total_seconds()
    assert requests(lt)
    logger.info("fork of 1000 records at record 500: %.1f ms", elapsed * 1000)


# --- replaying a fork --------------------------------------------------------------------


def run_fork(sim: Recorder, execution: str, replacement: object = None) -> Recorder:
    """The fork of ``sim`` at ``execution``, run to completion (its own records only)."""
    lt = forked(sim, execution, replacement)
    run = Recorder(sim.graph)
    run.state, run.pending, run.refs = lt.state, requests(lt), []
    while run.pending:
        request = run.pending[0]
        if request.HasField("task_request"):
            run.finish_task(run.take(request.header.node.id), "again")
        elif request.header.iteration < 5:
            run.decide(run.take("decide"), dispatch("shout"))
        else:
            run.decide(run.take("decide"), complete("forked"))
    assert run.view.state == lifetime_pb2.LIFETIME_STATE_COMPLETED
    return run


def replayed_fork(
    run: Recorder, sim: Recorder, origin_records: list[execution_pb2.ExecutionRef] | None = None
) -> replay.ReplayReport:
    return fork.replay_fork(
        run.state,
        sim.recorded,
        sim.graph,
        sim.refs if origin_records is None else origin_records,
        run.refs,
        producer=PRODUCER,
    )


def test_a_fork_replays_from_its_origin_with_the_replacement_it_was_given() -> None:
    sim = run_hello(rounds=3)
    second = [r for r in sim.refs if r.task_execution.header.node.id == "shout"][1]
    run = run_fork(sim, second.task_execution.header.execution_id, {"replaced": True})
    assert run.state.fork_replacement == payload({"replaced": True})
    report = replayed_fork(run, sim)
    assert report.reproduced, report.divergences
    # decide 3..5 and shout 3..4 dispatched and decided in the fork, and how it ended.
    assert report.decisions_checked == 5 + 3 + 2

    # Without the replacement the fork's first plan is asked another question.
    run.state.ClearField("fork_replacement")
    first = replayed_fork(run, sim).divergences[0]
    assert first.node.id == "decide"
    assert "another request" in first.message


def test_a_fork_that_asked_a_plan_again_replays() -> None:
    sim = run_hello(rounds=1)
    decide = next(r for r in sim.refs if r.HasField("plan_execution"))
    run = run_fork(sim, decide.plan_execution.header.execution_id, {"goal": "other"})
    report = replayed_fork(run, sim)
    assert report.reproduced, report.divergences


def test_a_fork_whose_origin_no_longer_replays_to_the_fork_point_diverges_there() -> None:
    sim = run_hello(rounds=3)
    second = [r for r in sim.refs if r.task_execution.header.node.id == "shout"][1]
    run = run_fork(sim, second.task_execution.header.execution_id)
    report = replayed_fork(run, sim, origin_records=sim.refs[:2])
    assert not report.reproduced
    [only] = report.divergences
    assert only.message == "the fork's starting state is not reproduced from its origin's history"
    assert only.execution_id == second.task_execution.header.execution_id
