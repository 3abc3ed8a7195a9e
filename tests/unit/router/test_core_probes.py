"""Decisions on graphs and plan results at the edges of what they may hold."""

from __future__ import annotations

from tests.unit.router.test_core import NOW, PRODUCER, Sim, dispatch, fanout_graph, state_of
from tickmesh.router import core
from tickmesh.runtime import steps
from tickmesh.sdk import GraphBuilder, Retry
from tickmesh.v1 import graph_pb2


def loop_graph(retry: Retry | None = None, timeout: float | None = None) -> graph_pb2.AgentGraph:
    return (
        GraphBuilder("loop")
        .task("work", retry=retry, timeout=timeout)
        .plan("decide")
        .edge("work", "decide")
        .final("decide")
        .build()
    )


def test_a_step_retried_2000_times_is_dispatched_with_its_whole_deadline() -> None:
    """2,000 attempts of 60 s, backoffs doubling from 1 s to 60 s: a valid policy (under
    three days per step). The 1,025th backoff overflowed a float, so every decision on
    the graph raised (StartLifetime answered INTERNAL)."""
    sim = Sim(loop_graph(Retry(max_attempts=2000)))
    work = sim.take("work")
    backoffs = 1 + 2 + 4 + 8 + 16 + 32 + 60 * (1999 - 6)
    assert work.header.deadline.seconds == int(NOW.timestamp()) + 2000 * 60 + backoffs
    assert steps.backoff_seconds(work.task_request.retry, 1999) == 60.0


def test_a_policy_of_every_attempt_a_uint32_holds_is_indexed_without_a_loop_over_them() -> None:
    """max_attempts 2**32 - 1 (the field's largest) with a constant backoff: the deadline
    summed each backoff one by one (billions of calls on the router's event loop). It is
    bounded instead, as far as a timestamp goes, and validation refuses such a node."""
    graph = loop_graph()
    graph.nodes[0].retry.max_attempts = 2**32 - 1
    graph.nodes[0].retry.backoff_multiplier = 1.0
    index = core.index_of(graph)
    assert index.deadlines_ns["work"] == core.MAX_STEP_S * 10**9
    retry = graph.nodes[0].retry
    assert steps.total_backoff_seconds(retry, 2**32 - 1) == (2**32 - 2) * 1.0


def test_a_node_whose_deadline_is_past_the_year_9999_still_starts() -> None:
    """A timeout of 8,000 years (valid for a Duration, and accepted by validation before
    it bounded a step to a century): the deadline could not be written (ValueError), so
    the lifetime of a graph stored then could not even start."""
    graph = loop_graph(timeout=60)
    graph.nodes[0].timeout.seconds = 8000 * 366 * 86_400
    sim = Sim(graph)
    work = sim.take("work")
    assert work.header.deadline.seconds == int(NOW.timestamp()) + core.MAX_STEP_S
    assert work.header.deadline.ToDatetime().year < 9999


def test_a_dispatch_over_max_iterations_sends_none_of_its_steps() -> None:
    """Three steps of a node that may run twice: the lifetime fails and none of the
    three leaves (the first two were published, and ran, for a failed lifetime)."""
    graph = fanout_graph()
    graph.max_iterations = 2
    sim = Sim(graph)
    sim.decide(sim.take("plan"), dispatch("work", "work", "work"))
    assert state_of(sim) == "LIFETIME_STATE_FAILED"
    assert sim.view.error.type == "MaxIterationsExceeded"
    assert "node 'work' would run 3 times, over the graph's max_iterations 2" in (
        sim.view.error.message
    )
    assert sim.pending_nodes() == []
    assert sim.cancels == []
    assert not sim.state.in_flight
    assert "work" not in sim.state.iterations


def test_a_dispatch_up_to_max_iterations_runs_every_step() -> None:
    graph = fanout_graph()
    graph.max_iterations = 2
    sim = Sim(graph)
    sim.decide(sim.take("plan"), dispatch("work", "work"))
    assert state_of(sim) == "LIFETIME_STATE_RUNNING"
    assert sim.pending_nodes() == ["work", "work"]


def test_a_default_policy_keeps_its_deadline() -> None:
    lt = core.Lifetime(Sim(loop_graph()).state, loop_graph(), PRODUCER, NOW)
    assert lt.index.deadlines_ns["work"] == (3 * 60 + 1 + 2) * 10**9
