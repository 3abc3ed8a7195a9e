"""Graphs: the builder, YAML graph files, validation, digests and round trips."""

from __future__ import annotations

import contextlib
import math
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import duration_pb2, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from tickmesh.sdk import _graph
from tickmesh.sdk._graph import (
    MAX_GRAPH_YAML_BYTES,
    GraphBuilder,
    Retry,
    graph_digest,
    graph_to_yaml,
    load_graph_file,
    load_graph_yaml,
    validate_graph,
)
from tickmesh.sdk.errors import Issue, ValidationError
from tickmesh.v1 import graph_pb2

GRAPHS = Path(__file__).parent / "graphs"
TASK, PLAN = graph_pb2.NODE_KIND_TASK, graph_pb2.NODE_KIND_PLAN


# Documents are parsed by libyaml when PyYAML has it, else by PyYAML's own parser: test both.
BACKENDS = [False, True] if yaml.__with_libyaml__ else [False]


@pytest.fixture(params=BACKENDS, ids=lambda libyaml: "libyaml" if libyaml else "pyyaml")
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_graph, "_USE_LIBYAML", request.param)


@contextlib.contextmanager
def using(libyaml: bool) -> Iterator[None]:
    saved = _graph._USE_LIBYAML
    _graph._USE_LIBYAML = libyaml
    try:
        yield
    finally:
        _graph._USE_LIBYAML = saved


def coding_agent() -> GraphBuilder:
    """The graph of graphs/coding_agent.yaml, written with the builder."""
    again = "not accepted"
    return (
        GraphBuilder(
            "coding_agent",
            description="Generate code in parallel, validate, refine until accepted",
            max_iterations=8,
            labels={"team": "platform"},
        )
        .policy("default")
        .task(
            "intake",
            "parse_request",
            timeout=30,
            retry=Retry(initial_backoff=0.1, max_backoff=5, non_retryable=("ValueError",)),
            max_concurrency=4,
            config={"model": "fake-llm"},
        )
        .plan("plan", "coding_planner")
        .task("generate_a", "generate", timeout=120, config={"temperature": 0.2})
        .task("generate_b", "generate", timeout=120, config={"temperature": 0.8})
        .task("validate", "run_tests")
        .plan("review", "code_reviewer")
        .edge("intake", "plan")
        .edge("plan", "generate_a", "parallel")
        .edge("plan", "generate_b", "parallel")
        .edge("generate_a", "plan", "join")
        .edge("generate_b", "plan", "join")
        .edge("plan", "validate")
        .edge("validate", "review")
        .edge("review", "generate_a", "parallel", condition=again)
        .edge("review", "generate_b", "parallel", condition=again)
        .final("review")
    )


def minimal() -> graph_pb2.AgentGraph:
    """nodes: [0] work (task), [1] decide (plan); edges: [0] work->decide,
    [1] decide->work, [2] decide->end. Digest cleared, so tests can edit it."""
    graph = (
        GraphBuilder("loop")
        .task("work")
        .plan("decide")
        .edge("work", "decide")
        .edge("decide", "work")
        .final("decide")
        .build()
    )
    graph.ClearField("digest")
    return graph


def issues_of(build: Callable[[], object]) -> list[Issue]:
    with pytest.raises(ValidationError) as caught:
        build()
    return list(caught.value.issues)


def yaml_issues(text: str) -> list[Issue]:
    return issues_of(lambda: load_graph_yaml(textwrap.dedent(text), source="g.yaml"))


def where(issues: list[Issue]) -> list[tuple[str, int, int]]:
    return [(issue.field, issue.line, issue.column) for issue in issues]


# --- the builder ----------------------------------------------------------------------------


def test_builder_builds_the_expected_proto() -> None:
    graph = coding_agent().build()

    assert graph.id == "coding_agent"
    assert graph.version == 0
    assert graph.max_iterations == 8
    assert dict(graph.labels) == {"team": "platform"}
    assert graph.policy == graph_pb2.PolicyRef(policy_id="default")
    assert graph.entry_node_id == "intake"
    assert [(n.id, n.kind, n.handler) for n in graph.nodes] == [
        ("intake", TASK, "parse_request"),
        ("plan", PLAN, "coding_planner"),
        ("generate_a", TASK, "generate"),
        ("generate_b", TASK, "generate"),
        ("validate", TASK, "run_tests"),
        ("review", PLAN, "code_reviewer"),
    ]
    intake = graph.nodes[0]
    assert intake.timeout == duration_pb2.Duration(seconds=30)
    assert intake.retry == graph_pb2.RetryPolicy(
        max_attempts=3,
        initial_backoff=duration_pb2.Duration(nanos=100_000_000),
        max_backoff=duration_pb2.Duration(seconds=5),
        backoff_multiplier=2.0,
        non_retryable_error_types=["ValueError"],
    )
    assert intake.max_concurrency == 4
    assert intake.config.fields["model"].string_value == "fake-llm"
    assert not intake.HasField("join")
    assert graph.nodes[1].join == graph_pb2.JoinPolicy(mode=graph_pb2.JOIN_MODE_ALL)
    assert graph.nodes[2].config.fields["temperature"].number_value == 0.2
    assert [(e.id, e.from_node_id, e.to_node_id, e.kind, e.condition) for e in graph.edges] == [
        ("intake->plan", "intake", "plan", graph_pb2.EDGE_KIND_NORMAL, ""),
        ("plan->generate_a", "plan", "generate_a", graph_pb2.EDGE_KIND_PARALLEL, ""),
        ("plan->generate_b", "plan", "generate_b", graph_pb2.EDGE_KIND_PARALLEL, ""),
        ("generate_a->plan", "generate_a", "plan", graph_pb2.EDGE_KIND_JOIN, ""),
        ("generate_b->plan", "generate_b", "plan", graph_pb2.EDGE_KIND_JOIN, ""),
        ("plan->validate", "plan", "validate", graph_pb2.EDGE_KIND_NORMAL, ""),
        ("validate->review", "validate", "review", graph_pb2.EDGE_KIND_NORMAL, ""),
        (
            "review->generate_a",
            "review",
            "generate_a",
            graph_pb2.EDGE_KIND_PARALLEL,
            "not accepted",
        ),
        (
            "review->generate_b",
            "review",
            "generate_b",
            graph_pb2.EDGE_KIND_PARALLEL,
            "not accepted",
        ),
        ("review->end", "review", "", graph_pb2.EDGE_KIND_FINAL, ""),
    ]
    assert graph.digest == graph_digest(graph)


def test_builder_defaults_handler_entry_edge_ids_and_leaves_optional_fields_unset() -> None:
    graph = minimal()

    work, decide = graph.nodes
    assert (work.handler, decide.handler) == ("work", "decide")
    assert graph.entry_node_id == "work"
    assert [e.id for e in graph.edges] == ["work->decide", "decide->work", "decide->end"]
    assert not work.HasField("timeout")
    assert not work.HasField("retry")
    assert not work.HasField("config")
    assert not graph.HasField("policy")
    assert decide.join.mode == graph_pb2.JOIN_MODE_ALL


def test_builder_sets_entry_quorum_join_explicit_edge_ids_and_policy_version() -> None:
    graph = (
        GraphBuilder("fan")
        .task("a")
        .task("b")
        .plan("split", join="quorum", quorum=2, timeout=0.25)
        .plan("first", join="any")
        .edge("split", "a", "parallel", edge_id="to-a")
        .edge("split", "b", "parallel")
        .edge("a", "split", "join")
        .edge("b", "split", "join")
        .final("split", edge_id="done")
        .edge("first", "a")
        .final("first")
        .entry("first")
        .policy("strict", version=3)
        .build()
    )
    split, first = graph.nodes[2], graph.nodes[3]
    assert split.join == graph_pb2.JoinPolicy(mode=graph_pb2.JOIN_MODE_QUORUM, quorum=2)
    assert split.timeout == duration_pb2.Duration(nanos=250_000_000)
    assert first.join.mode == graph_pb2.JOIN_MODE_ANY
    assert graph.entry_node_id == "first"
    assert graph.edges[0].id == "to-a"
    assert graph.edges[4].id == "done"
    assert graph.policy == graph_pb2.PolicyRef(policy_id="strict", version=3)


def test_builder_config_becomes_a_struct() -> None:
    config: dict[str, Any] = {
        "model": "m",
        "n": 3,
        "ratio": 0.5,
        "on": True,
        "none": None,
        "l": [1, {"k": "v"}],
    }
    graph = (
        GraphBuilder("g")
        .task("work", config=config)
        .plan("decide")
        .edge("work", "decide")
        .final("decide")
        .build()
    )
    expected = struct_pb2.Struct()
    expected.update(config)
    assert graph.nodes[0].config == expected


def test_builder_build_returns_independent_copies() -> None:
    builder = coding_agent()
    first = builder.build()
    first.nodes[0].handler = "changed"
    assert builder.build().nodes[0].handler == "parse_request"


# --- digests ---------------------------------------------------------------------------------


def test_digest_is_stable_and_ignores_version_and_digest() -> None:
    graph = coding_agent().build()
    assert graph_digest(graph) == coding_agent().build().digest
    assert len(graph.digest) == 64
    versioned = graph_pb2.AgentGraph()
    versioned.CopyFrom(graph)
    versioned.version = 7
    versioned.digest = "something else"
    assert graph_digest(versioned) == graph.digest


@pytest.mark.parametrize(
    "change",
    [
        lambda g: setattr(g, "id", "other"),
        lambda g: setattr(g, "description", "changed"),
        lambda g: setattr(g.nodes[0], "handler", "other"),
        lambda g: setattr(g.edges[0], "condition", "x > 1"),
        lambda g: g.labels.update({"k": "v"}),
        lambda g: g.nodes[0].config.update({"model": "other"}),
    ],
)
def test_digest_changes_with_content(change: Callable[[graph_pb2.AgentGraph], None]) -> None:
    graph = coding_agent().build()
    change(graph)
    assert graph_digest(graph) != coding_agent().build().digest


# --- YAML ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("backend")
def test_yaml_file_and_builder_compile_to_the_same_graph() -> None:
    from_file = load_graph_file(GRAPHS / "coding_agent.yaml")
    assert from_file == coding_agent().build()


@pytest.mark.parametrize(
    "graph",
    [coding_agent().build(), minimal(), load_graph_file(GRAPHS / "coding_agent.yaml")],
    ids=["coding_agent", "minimal", "from_file"],
)
def test_graph_to_yaml_round_trips(graph: graph_pb2.AgentGraph) -> None:
    graph.digest = graph_digest(graph)
    assert load_graph_yaml(graph_to_yaml(graph)) == graph


def test_graph_to_yaml_round_trips_every_optional_field() -> None:
    graph = (
        GraphBuilder("all.fields", description="multi\nline: 'quoted'", max_iterations=3)
        .task(
            "work",
            "Handler_1",
            timeout=0.000001,
            retry=Retry(max_attempts=0, initial_backoff=90, max_backoff=3600, multiplier=1.5),
            description="yes",
            config={"nested": {"list": [1, 2.5, None, True, "no"]}, "big": 2**53},
            input_schema="json-schema://in",
            output_schema="proto:tickmesh.v1.Payload",
        )
        .plan("decide", join="quorum", quorum=1, config={})
        .plan("other", join="any")
        .edge("work", "decide", "join", edge_id="custom:id")
        .edge("decide", "work", condition="iteration < 3")
        .final("decide")
        .final("other")
        .edge("other", "work")
        .entry("other")
        .policy("p", 2)
        .build()
    )
    graph.nodes[0].input_schema.digest = "ab" * 32
    graph.digest = graph_digest(graph)
    text = graph_to_yaml(graph)
    assert load_graph_yaml(text) == graph
    assert "timeout: 1us" in text
    assert "initial_backoff: 90s, max_backoff: 1h" in text


def test_yaml_defaults_handler_entry_edge_ids_join_and_retry() -> None:
    graph = load_graph_yaml(
        textwrap.dedent(
            """\
            graph: g
            policy: p
            nodes:
              - {id: work, kind: task, retry: {max_attempts: 5}}
              - {id: decide, kind: plan}
            edges:
              - {from: work, to: decide}
              - {from: decide, kind: final}
            """
        )
    )
    assert graph.nodes[0].handler == "work"
    assert graph.entry_node_id == "work"
    assert [e.id for e in graph.edges] == ["work->decide", "decide->end"]
    assert graph.nodes[1].join.mode == graph_pb2.JOIN_MODE_ALL
    assert graph.policy.policy_id == "p"
    # Keys left out of `retry` take the Retry defaults, exactly as the builder has them.
    built = (
        GraphBuilder("g")
        .task("work", retry=Retry(max_attempts=5))
        .plan("decide")
        .edge("work", "decide")
        .final("decide")
        .build()
    )
    assert graph.nodes[0].retry == built.nodes[0].retry
    assert graph.nodes[0].retry.initial_backoff == duration_pb2.Duration(seconds=1)


@pytest.mark.parametrize(
    ("written", "nanos"),
    [
        ("30s", 30 * 10**9),
        ("250ms", 250 * 10**6),
        ("2m", 120 * 10**9),
        ("1h", 3600 * 10**9),
        ("1m30s", 90 * 10**9),
        ("1.5s", 1_500_000_000),
        ("10us", 10_000),
        ("7ns", 7),
        ("2", 2 * 10**9),
        ("0.25", 250_000_000),
    ],
)
def test_yaml_durations(written: str, nanos: int) -> None:
    graph = load_graph_yaml(
        "graph: g\n"
        f"nodes: [{{id: work, kind: task, timeout: {written}}}, {{id: decide, kind: plan}}]\n"
        "edges: [{from: work, to: decide}, {from: decide, kind: final}]\n"
    )
    timeout = graph.nodes[0].timeout
    assert timeout.seconds * 10**9 + timeout.nanos == nanos


@pytest.mark.usefixtures("backend")
def test_yaml_config_keeps_types_and_reads_scalars_as_written() -> None:
    graph = load_graph_yaml(
        textwrap.dedent(
            """\
            graph: g
            description: 2024-01-01
            nodes:
              - id: work
                kind: task
                config: {n: 3, f: 1.5, b: true, z: null, s: "x", d: 2024-01-01, l: [1, [2]]}
              - {id: decide, kind: plan, handler: 0123}
            edges: [{from: work, to: decide}, {from: decide, kind: final}]
            """
        )
    )
    expected = struct_pb2.Struct()
    expected.update({"n": 3, "f": 1.5, "b": True, "z": None, "s": "x", "d": "2024-01-01"})
    expected.update({"l": [1, [2]]})
    assert graph.nodes[0].config == expected
    assert graph.description == "2024-01-01"
    assert graph.nodes[1].handler == "0123"


# --- YAML errors, with their exact place ------------------------------------------------------


@pytest.mark.usefixtures("backend")
def test_yaml_validation_issues_carry_line_and_column() -> None:
    issues = yaml_issues(
        """\
        graph: demo
        nodes:
          - id: work
            kind: task
            handler: llm.call
          - id: decide
            kind: plan
        edges:
          - {from: work, to: decide}
          - {from: decide, to: wrok}
          - {from: decide, kind: final}
        """
    )
    assert where(issues) == [("nodes[0].handler", 5, 14), ("edges[1].to", 10, 24)]
    assert issues[1].message == "unknown node 'wrok' (did you mean 'work'?)"
    assert all(issue.source == "g.yaml" for issue in issues)
    assert str(issues[1]) == "g.yaml:10:24 edges[1].to: unknown node 'wrok' (did you mean 'work'?)"


def test_yaml_issue_for_a_missing_field_points_at_its_parent() -> None:
    issues = yaml_issues(
        """\
        graph: demo
        nodes:
          - {id: work, kind: task}
          - {id: decide, kind: plan}
        edges:
          - {from: work, to: decide}
        """
    )
    # No final edge: reported on `edges`, at its value.
    assert where(issues) == [("edges", 6, 3)]


@pytest.mark.usefixtures("backend")
def test_yaml_unknown_key_names_it_and_lists_the_allowed_ones() -> None:
    issues = yaml_issues(
        """\
        graph: demo
        nodes:
          - id: work
            kind: task
            timout: 30s
        edges: []
        """
    )
    assert where(issues) == [("nodes[0].timout", 5, 5)]
    assert issues[0].message.startswith("unknown key 'timout' (did you mean 'timeout'?); ")
    assert "expected one of: id, kind, handler, description, timeout," in issues[0].message


@pytest.mark.usefixtures("backend")
def test_yaml_bad_duration_says_what_was_expected() -> None:
    issues = yaml_issues(
        """\
        graph: demo
        nodes:
          - id: work
            kind: task
            timeout: [1, 2]
          - {id: decide, kind: plan, timeout: 30 seconds}
        edges: []
        """
    )
    assert where(issues) == [("nodes[0].timeout", 5, 14), ("nodes[1].timeout", 6, 39)]
    expected = "expected a duration like 30s, 250ms, 2m or 1h (or a number of seconds)"
    assert issues[0].message == f"{expected}, got [1, 2]"
    assert issues[1].message == f'{expected}, got "30 seconds"'


@pytest.mark.usefixtures("backend")
def test_yaml_bad_join_is_refused() -> None:
    issues = yaml_issues(
        """\
        graph: demo
        nodes:
          - {id: a, kind: plan, join: most}
          - {id: b, kind: plan, join: quorum}
          - {id: c, kind: plan, join: {quorum: two}}
          - {id: d, kind: plan, join: {count: 2}}
        edges: []
        """
    )
    assert where(issues) == [
        ("nodes[0].join", 3, 31),
        ("nodes[1].join", 4, 31),
        ("nodes[2].join.quorum", 5, 40),
        ("nodes[3].join.quorum", 6, 31),
        ("nodes[3].join.count", 6, 32),
    ]
    assert issues[0].message == 'expected all, any or {quorum: n}, got "most"'
    assert issues[1].message == "a quorum join needs a count: join: {quorum: 2}"


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize(
    ("text", "field", "line", "column", "message"),
    [
        ("graph: g\nnodes: {}\nedges: []\n", "nodes", 2, 8, "expected a list of nodes, got {}"),
        (
            "graph: g\nmax_iterations: -1\nnodes: []\nedges: []\n",
            "max_iterations",
            2,
            17,
            "expected a whole number from 0 to 4294967295, got -1",
        ),
        (
            "graph: g\nmax_iterations: 1.5\nnodes: []\nedges: []\n",
            "max_iterations",
            2,
            17,
            "expected a whole number from 0 to 4294967295, got 1.5",
        ),
        (
            "graph: [g]\nnodes: []\nedges: []\n",
            "graph",
            1,
            8,
            "expected a graph id, got [g]",
        ),
        (
            "graph:\nnodes: []\nedges: []\n",
            "graph",
            1,
            7,
            "expected a graph id, got null (an empty value)",
        ),
        (
            "graph: g\nnodes: [{id: a, kind: job}]\nedges: []\n",
            "nodes[0].kind",
            2,
            23,
            'expected task or plan, got "job"',
        ),
        (
            "graph: g\nnodes: []\nedges: [{from: a, to: b, kind: loop}]\n",
            "edges[0].kind",
            3,
            32,
            'expected normal, parallel, join or final, got "loop"',
        ),
        (
            "graph: g\nnodes: []\nedges: [{to: b}]\n",
            "edges[0].from",
            3,
            9,
            "missing required key 'from'",
        ),
        (
            "graph: g\nnodes: []\nedges: [{from: a}]\n",
            "edges[0].to",
            3,
            9,
            "missing required key 'to' (only final edges have none)",
        ),
        (
            "graph: g\nnodes: [{kind: task}]\nedges: []\n",
            "nodes[0].id",
            2,
            9,
            "missing required key 'id'",
        ),
        (
            "graph: g\nnodes: [{id: a, kind: task, config: {n: 9007199254740993}}]\nedges: []\n",
            "nodes[0].config.n",
            2,
            41,
            "integer is too large to store exactly (config numbers are doubles: keep "
            "integers within ±2^53, or quote them)",
        ),
        (
            "graph: g\nnodes: [{id: a, kind: task, config: {n: .inf}}]\nedges: []\n",
            "nodes[0].config.n",
            2,
            41,
            "expected a finite number, got .inf",
        ),
        (
            "graph: g\nnodes: [{id: a, kind: task, config: [1]}]\nedges: []\n",
            "nodes[0].config",
            2,
            37,
            "expected a mapping, got [1]",
        ),
        (
            "graph: g\nnodes: [{id: a, kind: task, retry: {multiplier: x}}]\nedges: []\n",
            "nodes[0].retry.multiplier",
            2,
            49,
            'expected a number, got "x"',
        ),
        (
            "graph: g\nnodes: []\nedges: []\nlabels: {a: [1]}\n",
            "labels.a",
            4,
            13,
            "expected a string, got [1]",
        ),
    ],
)
def test_yaml_wrong_types_say_what_was_expected(
    text: str, field: str, line: int, column: int, message: str
) -> None:
    issues = issues_of(lambda: load_graph_yaml(text))
    assert [(i.field, i.line, i.column, i.message) for i in issues] == [
        (field, line, column, message)
    ]


def test_yaml_missing_required_keys() -> None:
    issues = yaml_issues("description: nothing else\n")
    assert [(i.field, i.message) for i in issues] == [
        ("graph", "missing required key 'graph'"),
        ("nodes", "missing required key 'nodes'"),
        ("edges", "missing required key 'edges'"),
    ]


@pytest.mark.usefixtures("backend")
def test_yaml_duplicate_key_is_refused() -> None:
    issues = yaml_issues(
        """\
        graph: demo
        nodes:
          - id: work
            kind: task
            id: other
        edges: []
        """
    )
    assert where(issues) == [("nodes[0].id", 5, 5)]
    assert issues[0].message == "duplicate key 'id' (first on line 3)"


@pytest.mark.usefixtures("backend")
def test_yaml_alias_is_refused() -> None:
    issues = yaml_issues(
        """\
        graph: demo
        nodes:
          - &n {id: work, kind: task}
          - *n
        edges: []
        """
    )
    assert where(issues) == [("", 3, 5)]
    assert issues[0].message == "anchors (&n) are not allowed in graph files"


def test_yaml_alias_bomb_is_refused_before_it_expands() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    issues = issues_of(lambda: load_graph_yaml(bomb))
    assert "anchors (&a) are not allowed" in issues[0].message


@pytest.mark.usefixtures("backend")
def test_yaml_bare_alias_is_refused() -> None:
    issues = yaml_issues("graph: *g\n")
    assert where(issues) == [("", 1, 8)]
    assert issues[0].message == "aliases (*g) are not allowed in graph files; write the value out"


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize(
    "text",
    [
        "graph: !!python/object:os.system [echo]\n",
        "!!python/object/apply:os.system\n- echo\n",
        "graph: !!binary aGVsbG8=\n",
        "graph: !custom x\n",
    ],
)
def test_yaml_tags_are_refused(text: str) -> None:
    issues = issues_of(lambda: load_graph_yaml(text))
    assert len(issues) == 1
    assert "is not allowed in graph files: use plain YAML values" in issues[0].message
    assert issues[0].line == 1


@pytest.mark.usefixtures("backend")
def test_yaml_python_tag_message_and_place() -> None:
    issues = yaml_issues("graph: g\nnodes: !!python/object:os.system [echo]\n")
    assert where(issues) == [("", 2, 8)]
    assert issues[0].message == (
        "tag !!python/object:os.system is not allowed in graph files: use plain YAML values"
    )


def test_yaml_oversized_document_is_refused_before_parsing() -> None:
    text = "graph: g\n" + "#" * MAX_GRAPH_YAML_BYTES
    issues = issues_of(lambda: load_graph_yaml(text))
    assert len(issues) == 1
    assert "larger than 1 MiB" in issues[0].message
    # The limit counts UTF-8 bytes, not characters.
    wide = "# " + "é" * (MAX_GRAPH_YAML_BYTES // 2)
    assert "larger than 1 MiB" in issues_of(lambda: load_graph_yaml(wide))[0].message


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("", 0, 0, "expected a graph mapping, got an empty document"),
        ("- a\n- b\n", 1, 1, "expected a graph mapping (graph:, nodes:, edges:), got a list"),
        ("just text\n", 1, 1, 'expected a graph mapping (graph:, nodes:, edges:), got "just text"'),
        (
            "graph: g\n---\ngraph: h\n",
            2,
            1,
            "invalid YAML: expected a single document in the stream; but found another document",
        ),
        (
            "graph: g\nnodes: [a, b\nedges: []\n",
            3,
            6,
            "invalid YAML: while parsing a flow sequence; ",
        ),
        (
            "graph: g\n\x07\n",
            2,
            1,
            "invalid YAML: character U+0007 is not allowed in YAML documents",
        ),
    ],
)
def test_yaml_documents_that_are_not_a_graph_mapping(
    text: str, line: int, column: int, message: str
) -> None:
    issues = issues_of(lambda: load_graph_yaml(text))
    # Parser messages differ a little between libyaml and PyYAML's own parser.
    assert [(i.line, i.column) for i in issues] == [(line, column)]
    assert issues[0].message.startswith(message)


@pytest.mark.usefixtures("backend")
def test_yaml_deep_nesting_is_refused() -> None:
    issues = yaml_issues("graph: g\nnodes: " + "[" * 200 + "]" * 200 + "\n")
    assert "nests more than" in issues[0].message


def test_yaml_shape_errors_are_all_reported_in_document_order() -> None:
    issues = yaml_issues(
        """\
        graph: demo
        max_iterations: lots
        nodes:
          - {id: a, kind: task, timeout: soon}
          - {id: b, kind: plan, colour: red}
        edges: [{from: a, to: b, kind: sideways}]
        """
    )
    assert [i.field for i in issues] == [
        "max_iterations",
        "nodes[0].timeout",
        "nodes[1].colour",
        "edges[0].kind",
    ]


def test_load_graph_file_refuses_non_utf8_and_oversized_files(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"graph: caf\xe9\n")
    issues = issues_of(lambda: load_graph_file(latin))
    assert issues[0].message == "not UTF-8: invalid byte at offset 10"
    assert issues[0].source == str(latin)

    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_GRAPH_YAML_BYTES + 1))
    assert "larger than 1 MiB" in issues_of(lambda: load_graph_file(big))[0].message


def test_load_graph_file_names_the_file_in_issues(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("graph: g\nnodes: []\nedges: []\n")
    issues = issues_of(lambda: load_graph_file(path))
    assert {issue.source for issue in issues} == {str(path)}


@settings(max_examples=50)
@given(st.text(max_size=300))
def test_load_graph_yaml_raises_only_validation_errors_on_any_text(text: str) -> None:
    for libyaml in BACKENDS:
        with using(libyaml), contextlib.suppress(ValidationError):
            load_graph_yaml(text)


_TOKENS = [
    "graph: ",
    "nodes:",
    "edges:",
    "\n",
    "\n  - ",
    "  ",
    "{",
    "}",
    "[",
    "]",
    ", ",
    ": ",
    "id: a",
    "kind: task",
    "kind: plan",
    "kind: final",
    "timeout: ",
    "join: ",
    "{quorum: ",
    "retry: {",
    "config: ",
    "&a ",
    "*a",
    "!!int ",
    "!!python/object ",
    "0b_",
    "0x_",
    ".nan",
    "1e400",
    "-1",
    "30s",
    "~",
    "'",
    '"',
    "#",
    "\t",
    "? ",
    "<<: ",
    "---",
]


@settings(max_examples=50)
@given(st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join))
def test_load_graph_yaml_raises_only_validation_errors_on_yaml_like_text(text: str) -> None:
    for libyaml in BACKENDS:
        with using(libyaml), contextlib.suppress(ValidationError):
            load_graph_yaml(text)


# --- validation rules, one at a time ----------------------------------------------------------


def _set_duration(duration: duration_pb2.Duration, seconds: int, nanos: int = 0) -> None:
    duration.seconds = seconds
    duration.nanos = nanos


def _add_unreachable_plan(g: graph_pb2.AgentGraph) -> None:
    g.nodes.add(id="island", kind=PLAN, handler="island").join.mode = graph_pb2.JOIN_MODE_ALL
    g.edges.add(id="island->end", from_node_id="island", kind=graph_pb2.EDGE_KIND_FINAL)


def _nest(struct: struct_pb2.Struct, levels: int) -> None:
    for _ in range(levels - 1):
        struct = struct.fields["n"].struct_value
    struct.fields["leaf"].number_value = 1


RULES: list[tuple[str, Callable[[graph_pb2.AgentGraph], object], str, str]] = [
    ("graph id", lambda g: setattr(g, "id", "Bad Id"), "graph", "graph id 'Bad Id' is invalid"),
    ("graph id unset", lambda g: setattr(g, "id", ""), "graph", "graph id is not set"),
    (
        "node id",
        lambda g: g.nodes.add(id="Extra!", kind=TASK, handler="x"),
        "nodes[2].id",
        "node id 'Extra!' is invalid: expected [a-z0-9][a-z0-9_-]{0,63}",
    ),
    (
        "node id too long",
        lambda g: g.nodes.add(id="n" * 65, kind=TASK, handler="x"),
        "nodes[2].id",
        "is invalid",
    ),
    (
        "duplicate node id",
        lambda g: g.nodes.add(id="work", kind=TASK, handler="work"),
        "nodes[2].id",
        "duplicate node id 'work' (also nodes[0])",
    ),
    (
        "kind unset",
        lambda g: setattr(g.nodes[0], "kind", graph_pb2.NODE_KIND_UNSPECIFIED),
        "nodes[0].kind",
        "kind is not set: expected task or plan",
    ),
    (
        "handler unset",
        lambda g: setattr(g.nodes[0], "handler", ""),
        "nodes[0].handler",
        "handler is not set",
    ),
    (
        "handler not a subject token",
        lambda g: setattr(g.nodes[0], "handler", "llm.call"),
        "nodes[0].handler",
        "handler 'llm.call' is invalid: expected [A-Za-z0-9_-]{1,128}",
    ),
    ("entry unset", lambda g: g.ClearField("entry_node_id"), "entry", "no entry node"),
    (
        "entry unknown",
        lambda g: setattr(g, "entry_node_id", "decid"),
        "entry",
        "entry node 'decid' is not a node of this graph (did you mean 'decide'?)",
    ),
    (
        "edge from unknown",
        lambda g: setattr(g.edges[0], "from_node_id", "nope"),
        "edges[0].from",
        "unknown node 'nope'",
    ),
    (
        "edge to unknown",
        lambda g: setattr(g.edges[1], "to_node_id", "wrok"),
        "edges[1].to",
        "unknown node 'wrok' (did you mean 'work'?)",
    ),
    (
        "edge to unset",
        lambda g: setattr(g.edges[1], "to_node_id", ""),
        "edges[1].to",
        "`to` is not set: expected a node id",
    ),
    (
        "final edge from a task",
        lambda g: g.edges.add(from_node_id="work", kind=graph_pb2.EDGE_KIND_FINAL),
        "edges[3].from",
        "a final edge must leave a plan node; 'work' is a task",
    ),
    (
        "final edge from unknown",
        lambda g: setattr(g.edges[2], "from_node_id", "gone"),
        "edges[2].from",
        "unknown node 'gone'",
    ),
    (
        "final edge with a target",
        lambda g: setattr(g.edges[2], "to_node_id", "work"),
        "edges[2].to",
        "a final edge has no target: remove `to`",
    ),
    (
        "task to task",
        lambda g: setattr(g.edges[0], "to_node_id", "work"),
        "edges[0].to",
        "edges alternate task -> plan -> task, but 'work' and 'work' are both tasks",
    ),
    (
        "plan to plan",
        lambda g: setattr(g.edges[1], "to_node_id", "decide"),
        "edges[1].to",
        "edges alternate task -> plan -> task, but 'decide' and 'decide' are both plans",
    ),
    (
        "parallel edge from a task",
        lambda g: setattr(g.edges[0], "kind", graph_pb2.EDGE_KIND_PARALLEL),
        "edges[0].kind",
        "a parallel edge is a fan-out branch leaving a plan; 'work' is a task",
    ),
    (
        "join edge into a task",
        lambda g: setattr(g.edges[1], "kind", graph_pb2.EDGE_KIND_JOIN),
        "edges[1].kind",
        "a join edge flows back into a plan; 'work' is a task",
    ),
    (
        "unknown edge kind",
        lambda g: setattr(g.edges[0], "kind", 9),
        "edges[0].kind",
        "unknown edge kind 9",
    ),
    (
        "task without an outgoing edge",
        lambda g: g.edges.__delitem__(0),
        "nodes[0]",
        "task 'work' has no outgoing edge: a task sends its result to exactly one plan",
    ),
    (
        "task with two outgoing edges",
        lambda g: g.edges.add(
            id="again", from_node_id="work", to_node_id="decide", kind=graph_pb2.EDGE_KIND_JOIN
        ),
        "edges[3].from",
        "task 'work' already sends its result along edges[0]: a task has exactly one outgoing edge",
    ),
    ("no final edge", lambda g: g.edges.__delitem__(2), "edges", "no final edge"),
    (
        "join policy on a task",
        lambda g: setattr(g.nodes[0].join, "mode", graph_pb2.JOIN_MODE_ANY),
        "nodes[0].join",
        "a join policy applies to plan nodes only",
    ),
    (
        "quorum of zero",
        lambda g: setattr(g.nodes[1].join, "mode", graph_pb2.JOIN_MODE_QUORUM),
        "nodes[1].join.quorum",
        "quorum must be at least 1",
    ),
    (
        "quorum without a quorum join",
        lambda g: setattr(g.nodes[1].join, "quorum", 1),
        "nodes[1].join.quorum",
        "quorum is only used by join {quorum: n}, but the join is all",
    ),
    (
        "duplicate edge",
        lambda g: g.edges.add().CopyFrom(g.edges[1]),
        "edges[3]",
        "duplicate of edges[1] (same from, to and kind)",
    ),
    (
        "duplicate edge id",
        lambda g: setattr(g.edges[1], "id", "work->decide"),
        "edges[1].id",
        "edge id 'work->decide' is also used by edges[0]; give one of them an explicit id",
    ),
    (
        "edge id with spaces",
        lambda g: setattr(g.edges[1], "id", "back to work"),
        "edges[1].id",
        "edge id 'back to work' is invalid",
    ),
    (
        "unreachable node",
        _add_unreachable_plan,
        "nodes[2]",
        "node 'island' is not reachable from the entry node 'work'",
    ),
    (
        "zero timeout",
        lambda g: g.nodes[0].timeout.SetInParent(),
        "nodes[0].timeout",
        "must be positive, got 0s",
    ),
    (
        "negative timeout",
        lambda g: _set_duration(g.nodes[0].timeout, -5),
        "nodes[0].timeout",
        "must be positive, got -5s",
    ),
    (
        "malformed duration",
        lambda g: _set_duration(g.nodes[0].timeout, 1, -5),
        "nodes[0].timeout",
        "not a valid duration",
    ),
    (
        "negative backoff",
        lambda g: _set_duration(g.nodes[0].retry.initial_backoff, -1),
        "nodes[0].retry.initial_backoff",
        "must not be negative, got -1s",
    ),
    (
        "max backoff below initial backoff",
        lambda g: g.nodes[0].retry.MergeFrom(
            graph_pb2.RetryPolicy(
                initial_backoff=duration_pb2.Duration(seconds=10),
                max_backoff=duration_pb2.Duration(seconds=5),
            )
        ),
        "nodes[0].retry.max_backoff",
        "max_backoff (5s) is shorter than initial_backoff (10s)",
    ),
    (
        "negative multiplier",
        lambda g: setattr(g.nodes[0].retry, "backoff_multiplier", -1.0),
        "nodes[0].retry.multiplier",
        "expected 0 (the default, 2) or a multiplier of at least 1, got -1.0",
    ),
    (
        "shrinking multiplier",
        lambda g: setattr(g.nodes[0].retry, "backoff_multiplier", 0.5),
        "nodes[0].retry.multiplier",
        "got 0.5",
    ),
    (
        "infinite multiplier",
        lambda g: setattr(g.nodes[0].retry, "backoff_multiplier", math.inf),
        "nodes[0].retry.multiplier",
        "got inf",
    ),
    (
        "empty non-retryable type",
        lambda g: g.nodes[0].retry.non_retryable_error_types.extend(["Ok", ""]),
        "nodes[0].retry.non_retryable[1]",
        "error type names must not be empty",
    ),
    (
        "config too deep",
        lambda g: _nest(g.nodes[0].config, 33),
        "nodes[0].config",
        "config nests 33 levels deep; the limit is 32",
    ),
    (
        "policy without an id",
        lambda g: g.policy.SetInParent(),
        "policy.id",
        "policy id is not set",
    ),
    ("empty label key", lambda g: g.labels.update({"": "x"}), "labels", "must not be empty"),
    (
        "schema without a uri",
        lambda g: g.nodes[0].input_schema.SetInParent(),
        "nodes[0].input_schema",
        "a schema needs a uri",
    ),
    (
        "schema digest not hex",
        lambda g: g.nodes[0].output_schema.MergeFrom(graph_pb2.SchemaRef(uri="u", digest="xyz")),
        "nodes[0].output_schema.digest",
        "expected a hex SHA-256",
    ),
    (
        "stale digest",
        lambda g: setattr(g, "digest", "0" * 64),
        "digest",
        "digest does not match the graph's content",
    ),
    (
        "no nodes",
        lambda g: g.CopyFrom(graph_pb2.AgentGraph(id="empty")),
        "nodes",
        "at least one node",
    ),
]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [rule[1:] for rule in RULES],
    ids=[rule[0] for rule in RULES],
)
def test_validation_rule(
    change: Callable[[graph_pb2.AgentGraph], object], field: str, message: str
) -> None:
    graph = minimal()
    assert validate_graph(graph) == []
    change(graph)
    issues = validate_graph(graph)
    assert field in [issue.field for issue in issues], issues
    assert any(issue.field == field and message in issue.message for issue in issues), issues


def test_validation_reports_every_problem_not_just_the_first() -> None:
    graph = minimal()
    graph.id = "Bad"
    graph.nodes[0].handler = "a b"
    graph.edges[1].to_node_id = "missing"
    graph.ClearField("entry_node_id")
    assert [issue.field for issue in validate_graph(graph)] == [
        "graph",
        "nodes[0].handler",
        "entry",
        "edges[1].to",
    ]


def test_validation_uses_locations_and_falls_back_to_the_enclosing_field() -> None:
    graph = minimal()
    graph.nodes[0].handler = ""
    graph.edges[1].to_node_id = "missing"
    locations = {"nodes[0]": (3, 5), "edges[1].to": (9, 22), "": (1, 1)}
    issues = validate_graph(graph, locations=locations, source="x.yaml")
    assert [(i.source, i.field, i.line, i.column) for i in issues] == [
        ("x.yaml", "nodes[0].handler", 3, 5),
        ("x.yaml", "edges[1].to", 9, 22),
    ]


@pytest.mark.parametrize(
    ("build", "field", "message"),
    [
        (
            lambda: GraphBuilder("g", max_iterations=-1),
            "max_iterations",
            "expected a whole number from 0 to 4294967295, got -1",
        ),
        (
            lambda: GraphBuilder("g").task("work", max_concurrency=-2),
            "nodes[0].max_concurrency",
            "got -2",
        ),
        (
            lambda: GraphBuilder("g").task("work", retry=Retry(max_attempts=-1)),
            "nodes[0].retry.max_attempts",
            "got -1",
        ),
        (
            lambda: GraphBuilder("g").task("work", retry=Retry(multiplier=-2)),
            "nodes[0].retry.multiplier",
            "got -2",
        ),
        (
            lambda: GraphBuilder("g").task("work", timeout=math.nan),
            "nodes[0].timeout",
            "expected a number of seconds, got nan",
        ),
        (
            lambda: GraphBuilder("g").task("work", timeout=-1),
            "nodes[0].timeout",
            "must be positive, got -1s",
        ),
        (
            lambda: GraphBuilder("g").task("work").plan("decide", join="most"),
            "nodes[1].join",
            "expected join 'all', 'any' or 'quorum', got 'most'",
        ),
        (
            lambda: GraphBuilder("g").task("work").plan("decide", join="quorum"),
            "nodes[1].join.quorum",
            "quorum must be at least 1",
        ),
        (
            lambda: GraphBuilder("g").task("work").plan("decide").edge("decide", "x", "final"),
            "edges[0].kind",
            "expected 'normal', 'parallel' or 'join', got 'final'; add final edges with final()",
        ),
        (
            lambda: GraphBuilder("g").task("work", config={"when": object()}),
            "nodes[0].config.when",
            "expected a JSON-like value",
        ),
        (
            lambda: GraphBuilder("g").task("work", config={"n": 2**60}),
            "nodes[0].config.n",
            "integer is too large to store exactly",
        ),
        (
            lambda: GraphBuilder("g").task("work", config={"x": [math.inf]}),
            "nodes[0].config.x[0]",
            "expected a finite number, got inf",
        ),
        (
            lambda: GraphBuilder("g").policy("p", version=-1),
            "policy.version",
            "got -1",
        ),
        (
            lambda: GraphBuilder("g").task("work").entry("nowhere"),
            "entry",
            "entry node 'nowhere' is not a node of this graph",
        ),
    ],
)
def test_builder_reports_problems_with_field_paths(
    build: Callable[[], GraphBuilder], field: str, message: str
) -> None:
    issues = issues_of(lambda: build().build())
    assert any(i.field == field and message in i.message for i in issues), issues


def test_builder_error_lists_every_issue() -> None:
    with pytest.raises(ValidationError) as caught:
        GraphBuilder("Bad Id").task("work", "a.b").build()
    error = caught.value
    assert [i.field for i in error.issues] == ["graph", "nodes[0].handler", "nodes[0]", "edges"]
    assert str(error).startswith("invalid graph 'Bad Id': 4 problems\n  - graph: graph id 'Bad Id'")


# --- graphs that are valid -------------------------------------------------------------------


def test_cycles_are_allowed() -> None:
    graph = (
        GraphBuilder("loop")
        .task("draft")
        .plan("critic")
        .task("revise")
        .plan("judge")
        .edge("draft", "critic")
        .edge("critic", "revise")
        .edge("revise", "judge")
        .edge("judge", "draft")
        .edge("judge", "revise")
        .final("judge")
        .build()
    )
    assert validate_graph(graph) == []


def test_a_plan_may_be_the_entry_and_loop_on_itself_through_a_task() -> None:
    graph = GraphBuilder("p").plan("decide").task("act").edge("decide", "act")
    assert validate_graph(graph.edge("act", "decide").final("decide").build()) == []


def test_coding_agent_graph_validates() -> None:
    graph = load_graph_file(GRAPHS / "coding_agent.yaml")
    assert validate_graph(graph) == []
    assert graph.digest == graph_digest(graph)
    fan_in = [e.from_node_id for e in graph.edges if e.kind == graph_pb2.EDGE_KIND_JOIN]
    assert fan_in == ["generate_a", "generate_b"]


def test_quorum_join_counts_incoming_edges() -> None:
    graph = (
        GraphBuilder("vote")
        .plan("ask")
        .task("a")
        .task("b")
        .task("c")
        .plan("tally", join="quorum", quorum=3)
        .edge("ask", "a", "parallel")
        .edge("ask", "b", "parallel")
        .edge("ask", "c", "parallel")
        .edge("a", "tally", "join")
        .edge("b", "tally", "join")
        .edge("c", "tally", "join")
        .final("tally")
        .build()
    )
    assert graph.nodes[4].join.quorum == 3
