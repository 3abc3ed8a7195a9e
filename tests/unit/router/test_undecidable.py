"""A lifetime whose inputs, decided together, raise: it takes those before the one that
raises, each tried first on a copy of its state, then fails at that one."""

from __future__ import annotations

from tickmesh.router import core
from tickmesh.router.processor import _undecidable
from tickmesh.v1 import (
    execution_pb2,
    guardrail_pb2,
    header_pb2,
    lifetime_pb2,
    result_pb2,
    telemetry_pb2,
)

from .test_core import NOW, PRODUCER, Sim, hello_graph, payload

PHASE = guardrail_pb2.GuardrailPhase


def test_each_evaluation_of_an_input_tried_first_on_a_copy_is_made_once() -> None:
    """The trial's guard decisions are the ones the lifetime takes: the guard is asked
    once per evaluation (its metrics and spans count once), not again for the real run."""
    sim = Sim(hello_graph())
    greet = sim.take("greet")
    finished = execution_pb2.ExecutionRef(
        task_execution=execution_pb2.TaskExecution(
            header=greet.header,
            result=result_pb2.TaskResult(
                status=result_pb2.TASK_STATUS_SUCCEEDED, output=payload("hi")
            ),
        )
    )
    asked: list[tuple[int, str]] = []

    def guard(
        lt: core.Lifetime,
        phase: guardrail_pb2.GuardrailPhase.ValueType,
        header: header_pb2.EnvelopeHeader,
        telemetry: telemetry_pb2.Telemetry,
    ) -> guardrail_pb2.GuardrailDecision:
        asked.append((phase, header.node.id))
        return guardrail_pb2.GuardrailDecision(action=guardrail_pb2.GUARDRAIL_ACTION_ALLOW)

    def finish(lt: core.Lifetime) -> bool:
        return core.on_execution(lt, finished)

    def raising(lt: core.Lifetime) -> bool:
        raise ValueError("cannot decide")

    lt = core.Lifetime(sim.state, sim.graph, PRODUCER, NOW, guard)
    assert _undecidable(ValueError("together"), [finish, raising])(lt)

    assert asked == [
        (PHASE.GUARDRAIL_PHASE_POST_RESULT, "greet"),
        (PHASE.GUARDRAIL_PHASE_PRE_DISPATCH, "decide"),
    ]
    assert lt.guard is guard
    view = lt.state.lifetime
    assert view.state == lifetime_pb2.LIFETIME_STATE_FAILED
    assert view.error.message == (
        "the router could not decide on a step: ValueError('cannot decide')"
    )
    # The first input was taken: its step finished and the plan it led to was dispatched.
    assert [flight.node_id for flight in lt.state.in_flight.values()] == ["decide"]
