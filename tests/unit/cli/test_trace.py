"""`tickmesh trace` rendering: stored executions drawn as a tree with totals."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf import timestamp_pb2

from tests.support.factories import BASE_TIME
from tickmesh.cli.trace import render, rows_of
from tickmesh.v1 import (
    execution_pb2,
    graph_pb2,
    header_pb2,
    lifetime_pb2,
    result_pb2,
    telemetry_pb2,
)

LIFETIME_ID = "019a0000-0000-7000-8000-0000000000d1"


def _ts(ms: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(BASE_TIME + timedelta(milliseconds=ms))
    return stamp


def _header(
    execution_id: str,
    node: str,
    handler: str,
    kind: graph_pb2.NodeKind.ValueType,
    parents: tuple[str, ...],
    iteration: int,
    attempt: int,
) -> header_pb2.EnvelopeHeader:
    return header_pb2.EnvelopeHeader(
        tenant_id="acme",
        lifetime_id=LIFETIME_ID,
        execution_id=execution_id,
        attempt=attempt,
        iteration=iteration,
        node=header_pb2.NodeRef(id=node, kind=kind, handler=handler),
        parent_execution_ids=parents,
    )


def task_ref(
    execution_id: str,
    node: str,
    *,
    handler: str = "",
    parents: tuple[str, ...] = (),
    start_ms: float = 0,
    run_ms: float = 1,
    status: result_pb2.TaskStatus.ValueType = result_pb2.TASK_STATUS_SUCCEEDED,
    tokens: tuple[int, int] = (0, 0),
    cost_micros: int = 0,
    error: str = "",
    iteration: int = 1,
    attempt: int = 1,
) -> execution_pb2.ExecutionRef:
    result = result_pb2.TaskResult(
        status=status,
        telemetry=telemetry_pb2.Telemetry(
            input_tokens=tokens[0], output_tokens=tokens[1], cost_micros=cost_micros
        ),
    )
    if error:
        result.error.CopyFrom(result_pb2.ErrorInfo(type="Boom", message=error))
    header = _header(
        execution_id,
        node,
        handler or node,
        graph_pb2.NODE_KIND_TASK,
        parents,
        iteration,
        attempt,
    )
    return execution_pb2.ExecutionRef(
        task_execution=execution_pb2.TaskExecution(
            header=header,
            result=result,
            started_at=_ts(start_ms),
            finished_at=_ts(start_ms + run_ms),
        )
    )


def plan_ref(
    execution_id: str,
    node: str,
    result: result_pb2.PlanResult,
    *,
    handler: str = "",
    parents: tuple[str, ...] = (),
    start_ms: float = 0,
    run_ms: float = 1,
    iteration: int = 1,
) -> execution_pb2.ExecutionRef:
    header = _header(
        execution_id, node, handler or node, graph_pb2.NODE_KIND_PLAN, parents, iteration, 1
    )
    return execution_pb2.ExecutionRef(
        plan_execution=execution_pb2.PlanExecution(
            header=header,
            result=result,
            started_at=_ts(start_ms),
            finished_at=_ts(start_ms + run_ms),
        )
    )


def _dispatch(*nodes: str) -> result_pb2.PlanResult:
    return result_pb2.PlanResult(
        dispatch=result_pb2.DispatchDecision(steps=[result_pb2.NextStep(node_id=n) for n in nodes])
    )


def _lifetime(
    state: lifetime_pb2.LifetimeState.ValueType = lifetime_pb2.LIFETIME_STATE_COMPLETED,
    *,
    elapsed_ms: float | None = 60,
    error: str = "",
) -> lifetime_pb2.AgentLifetime:
    lifetime = lifetime_pb2.AgentLifetime(
        lifetime_id=LIFETIME_ID,
        state=state,
        graph=header_pb2.GraphRef(id="coding_agent", version=3),
        created_at=_ts(0),
    )
    if elapsed_ms is not None:
        lifetime.finished_at.CopyFrom(_ts(elapsed_ms))
    if error:
        lifetime.error.CopyFrom(result_pb2.ErrorInfo(type="x", message=error))
    return lifetime


def _fan_out_and_join() -> list[execution_pb2.ExecutionRef]:
    """intake -> plan -> generate x2 (parallel) -> assemble (joins both)."""
    return [
        # Out of order on purpose: rendering orders by start time.
        plan_ref(
            "e5",
            "assemble",
            result_pb2.PlanResult(complete=result_pb2.CompleteDecision(), rationale="all done"),
            handler="assembler",
            parents=("e3", "e4"),
            start_ms=55,
        ),
        task_ref(
            "e1",
            "intake",
            handler="parse_request",
            run_ms=5,
            tokens=(100, 20),
            cost_micros=1500,
        ),
        plan_ref(
            "e2",
            "plan",
            _dispatch("generate", "generate"),
            handler="coding_planner",
            parents=("e1",),
            start_ms=6,
            run_ms=2,
        ),
        task_ref(
            "e4",
            "generate",
            handler="llm_codegen",
            parents=("e2",),
            start_ms=10,
            run_ms=40,
            status=result_pb2.TASK_STATUS_FAILED,
            error="boom",
            iteration=2,
            attempt=2,
        ),
        task_ref(
            "e3",
            "generate",
            handler="llm_codegen",
            parents=("e2",),
            start_ms=9,
            run_ms=30,
            tokens=(50, 50),
            cost_micros=2000,
        ),
    ]


def test_render_draws_fan_out_and_join_as_a_tree_with_totals() -> None:
    text = render(_lifetime(), _fan_out_and_join())
    assert text.splitlines() == [
        f"lifetime {LIFETIME_ID} COMPLETED in 0.06s — graph coding_agent v3, "
        "5 executions, 220 tokens, $0.0035",
        "└─ intake #1 [task parse_request] succeeded 5.0 ms 120 tok $0.0015",
        "   └─ plan #1 [plan coding_planner] dispatch 2.0 ms  → generate, generate",
        "      ├─ generate #1 [task llm_codegen] succeeded 30.0 ms 100 tok $0.0020",
        "      └─ generate #2 [task llm_codegen] failed attempt 2 40.0 ms  boom",
        "         └─ assemble #1 [plan assembler] complete 1.0 ms (joins 2)  all done",
    ]


def test_render_draws_a_join_under_the_parent_that_finished_last() -> None:
    refs = _fan_out_and_join()
    # Make the first generate finish last: the join moves under it.
    refs[4].task_execution.finished_at.CopyFrom(_ts(9 + 45))
    lines = render(_lifetime(), refs).splitlines()
    assert lines[3:] == [
        "      ├─ generate #2 [task llm_codegen] failed attempt 2 40.0 ms  boom",
        "      └─ generate #1 [task llm_codegen] succeeded 45.0 ms 100 tok $0.0020",
        "         └─ assemble #1 [plan assembler] complete 1.0 ms (joins 2)  all done",
    ]


def test_render_shows_the_lifetime_error_and_every_plan_decision() -> None:
    refs = [
        task_ref("a1", "ask", run_ms=0.5),
        plan_ref(
            "a2",
            "gate",
            result_pb2.PlanResult(wait=result_pb2.WaitDecision(signal_name="approval")),
            parents=("a1",),
            start_ms=1,
        ),
        plan_ref(
            "a3",
            "gate",
            result_pb2.PlanResult(
                fail=result_pb2.FailDecision(error=result_pb2.ErrorInfo(message="denied"))
            ),
            parents=("a2",),
            start_ms=2,
            iteration=2,
        ),
    ]
    text = render(
        _lifetime(lifetime_pb2.LIFETIME_STATE_FAILED, elapsed_ms=1500, error="denied"), refs
    )
    assert text.splitlines() == [
        f"lifetime {LIFETIME_ID} FAILED in 1.50s — graph coding_agent v3, "
        "3 executions, 0 tokens, $0.0000",
        "  error: denied",
        "└─ ask #1 [task ask] succeeded 0.5 ms",
        "   └─ gate #1 [plan gate] wait 1.0 ms  waits for 'approval'",
        "      └─ gate #2 [plan gate] fail 1.0 ms  denied",
    ]


def test_render_treats_executions_with_unknown_parents_as_roots() -> None:
    refs = [
        task_ref("r1", "left", parents=("gone",), start_ms=0, tokens=(1, 1)),
        task_ref("r2", "right", parents=("also-gone",), start_ms=3),
        plan_ref(
            "r3",
            "broken",
            result_pb2.PlanResult(error=result_pb2.ErrorInfo(message="plan crashed")),
            parents=("r2",),
            start_ms=5,
        ),
    ]
    text = render(_lifetime(lifetime_pb2.LIFETIME_STATE_RUNNING, elapsed_ms=None), refs)
    assert text.splitlines() == [
        f"lifetime {LIFETIME_ID} RUNNING — graph coding_agent v3, 3 executions, 2 tokens, $0.0000",
        "├─ left #1 [task left] succeeded 1.0 ms 2 tok",
        "└─ right #1 [task right] succeeded 1.0 ms",
        "   └─ broken #1 [plan broken] error 1.0 ms  plan crashed",
    ]


def test_render_of_a_lifetime_without_executions_is_its_summary() -> None:
    assert render(_lifetime(elapsed_ms=None), []) == (
        f"lifetime {LIFETIME_ID} COMPLETED — graph coding_agent v3, 0 executions, 0 tokens, $0.0000"
    )


def test_rows_of_reads_status_timing_and_usage() -> None:
    rows = {r.execution_id: r for r in rows_of(_fan_out_and_join())}
    failed = rows["e4"]
    assert (failed.kind, failed.node, failed.handler, failed.status) == (
        "task",
        "generate",
        "llm_codegen",
        "failed",
    )
    assert (failed.iteration, failed.attempt, failed.duration_ms, failed.detail) == (
        2,
        2,
        40.0,
        "boom",
    )
    assert rows["e5"].parents == ("e3", "e4")
    assert (rows["e1"].tokens, rows["e1"].cost_micros) == (120, 1500)
    assert rows["e2"].detail == "→ generate, generate"
    # A clock that stepped back never gives a negative duration.
    backwards = task_ref("b1", "x", start_ms=10, run_ms=-5)
    assert rows_of([backwards])[0].duration_ms == 0.0
