"""Graph validation at the edges: how long a step may take, and config numbers."""

from __future__ import annotations

import math
import textwrap

import pytest

from tickmesh.sdk import GraphBuilder, Retry, ValidationError, graph_to_yaml, load_graph_yaml
from tickmesh.sdk._graph import validate_graph
from tickmesh.sdk.errors import Issue
from tickmesh.v1 import graph_pb2

MAX_STEP_SECONDS = 100 * 366 * 86_400
"""About a century: the longest a step may take (its deadline is a timestamp)."""


def loop(**task: object) -> graph_pb2.AgentGraph:
    graph = (
        GraphBuilder("loop")
        .task("work", **task)  # type: ignore[arg-type]
        .plan("decide")
        .edge("work", "decide")
        .final("decide")
        .build()
    )
    graph.ClearField("digest")
    return graph


def issues_of_yaml(text: str) -> list[Issue]:
    with pytest.raises(ValidationError) as caught:
        load_graph_yaml(textwrap.dedent(text), source="g.yaml")
    return list(caught.value.issues)


def test_a_timeout_longer_than_a_century_is_refused_by_field_and_line() -> None:
    """A step's deadline is a timestamp (it ends in the year 9999): a timeout of 8,000
    years passed validation, and the router could not write the deadline of its step."""
    issues = issues_of_yaml(
        """\
        graph: g
        nodes:
          - {id: work, kind: task, timeout: 70080000h}
          - {id: decide, kind: plan}
        edges:
          - {from: work, to: decide}
          - {from: decide, kind: final}
        """
    )
    assert [(i.field, i.line, i.column) for i in issues] == [("nodes[0].timeout", 3, 37)]
    assert "70080000h is too long: at most 3,162,240,000 s (about a century)" in issues[0].message


@pytest.mark.parametrize("field", ["initial_backoff", "max_backoff"])
def test_a_backoff_longer_than_a_century_is_refused(field: str) -> None:
    graph = loop(retry=Retry(max_backoff=120))
    getattr(graph.nodes[0].retry, field).seconds = MAX_STEP_SECONDS + 1
    if field == "initial_backoff":
        graph.nodes[0].retry.max_backoff.seconds = MAX_STEP_SECONDS + 1
    issues = validate_graph(graph)
    assert f"nodes[0].retry.{field}" in [i.field for i in issues], issues
    assert all("about a century" in i.message for i in issues), issues


def test_attempts_adding_up_to_more_than_a_century_are_refused() -> None:
    """2**32 - 1 attempts of 60 s each are 8,000 years: the router looped over every one
    of them to sum their backoffs."""
    graph = loop(retry=Retry())
    graph.nodes[0].retry.max_attempts = 2**32 - 1
    issues = validate_graph(graph)
    assert [i.field for i in issues] == ["nodes[0].retry.max_attempts"], issues
    assert issues[0].message.startswith(
        "a step of node 'work' may take 515,396,075,043 s (4,294,967,295 attempts of 1m "
    ), issues
    # Without a retry policy, three attempts: the timeout is the field to name.
    graph = loop()
    graph.nodes[0].timeout.seconds = MAX_STEP_SECONDS // 2
    assert [i.field for i in validate_graph(graph)] == ["nodes[0].timeout"]


def test_long_but_bounded_steps_are_valid() -> None:
    assert validate_graph(loop(retry=Retry(max_attempts=2000))) == []
    assert validate_graph(loop(timeout=MAX_STEP_SECONDS // 4)) == []
    assert validate_graph(loop(retry=Retry(max_attempts=1_000_000, multiplier=1))) == []


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_a_config_number_that_is_not_finite_is_refused_in_a_proto_graph(number: float) -> None:
    """The YAML reader and the builder refuse it; a graph registered as a proto was
    accepted, and graph_to_yaml then wrote a document load_graph_yaml refuses."""
    graph = loop(config={"model": {"scores": [1, 2]}})
    graph.nodes[0].config.fields["model"].struct_value.fields["scores"].list_value.values[
        1
    ].number_value = number
    issues = validate_graph(graph)
    assert [i.field for i in issues] == ["nodes[0].config.model.scores[1]"], issues
    assert issues[0].message == f"expected a finite number, got {number}"


def test_a_valid_graph_with_config_reads_back_from_its_yaml() -> None:
    graph = loop(config={"model": {"scores": [1, 2.5]}, "name": "x"})
    assert validate_graph(graph) == []
    again = load_graph_yaml(graph_to_yaml(graph))
    assert again.nodes[0].config == graph.nodes[0].config
