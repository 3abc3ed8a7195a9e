"""Author agent graphs in Python or YAML, validate them, and give them a digest.

Both ways of writing a graph compile to the same ``tickmesh.v1.AgentGraph``
proto, in one canonical form, so the same graph written either way has the same
digest: every plan carries an explicit join mode (``all`` by default), every
edge an explicit kind and id, every node a handler, and a retry policy is
complete (fields not given take the :class:`Retry` defaults).

Graph files
-----------

A graph file is one YAML document (at most 1 MiB)::

    graph: coding_agent            # required: [a-z0-9][a-z0-9_.-]{0,127}
    description: Generate code in parallel, validate, refine until accepted
    entry: intake                  # optional: defaults to the first node
    max_iterations: 8              # optional: 0 means the default (100)
    policy: {id: default, version: 0}   # optional; `policy: default` also works
    labels: {team: platform}       # optional: string keys and values
    nodes:                         # required
      - id: intake                 # required: [a-z0-9][a-z0-9_-]{0,63}
        kind: task                 # required: task | plan
        handler: parse_request     # optional: defaults to the id; [A-Za-z0-9_-]{1,128}
        description: Parse the request
        timeout: 30s               # optional: one attempt's limit
        retry: {max_attempts: 3, initial_backoff: 100ms, max_backoff: 5s,
                multiplier: 2, non_retryable: [ValueError]}
        max_concurrency: 4         # optional: 0 means unbounded
        config: {model: fake-llm}  # optional: any JSON-like mapping
        input_schema: json-schema://request   # optional: a URI, or {uri: ..., digest: ...}
        output_schema: json-schema://spec
      - id: plan
        kind: plan
        handler: coding_planner
        join: all                  # plans only: all | any | {quorum: 2}
      - id: generate
        kind: task
    edges:                         # required
      - {from: intake, to: plan}                    # kind defaults to normal
      - {from: plan, to: generate, kind: parallel}  # a fan-out branch
      - {from: generate, to: plan, kind: join}      # back into the plan under its join
      - {from: plan, kind: final}                   # completes the lifetime; no `to`
      # optional on every edge: `id` (default "<from>-><to>", or "<from>->end" for
      # a final edge) and `condition` (a guard in the policy expression language)

Durations are a number of seconds (``1.5``) or a string of one or more
number-and-unit parts: ``250ms``, ``30s``, ``2m``, ``1h``, ``1m30s``
(units ``ns``, ``us``, ``ms``, ``s``, ``m``, ``h``).

Only plain YAML is accepted: unknown or duplicate keys, anchors and aliases,
tags such as ``!!python/object``, multiple documents and documents that are not
a mapping are refused. Shape and type errors are reported first, all of them,
each with its 1-based line and column; once the document has the right shape,
:func:`validate_graph` checks the graph's rules and its issues carry the line
and column of the offending field too.

Field paths
-----------

An :class:`~tickmesh.sdk.errors.Issue` names the offending field by its path in
the YAML form, whichever way the graph was written: ``graph`` (the id),
``entry``, ``max_iterations``, ``policy.id``, ``nodes[2].handler``,
``nodes[0].retry.max_backoff``, ``nodes[1].join.quorum``, ``edges[0].to``,
``edges[3]`` (the edge as a whole).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Final, cast

import yaml
from google.protobuf import duration_pb2, struct_pb2
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from tickmesh.v1 import graph_pb2

from ._convert import MAX_STRUCT_DEPTH
from .errors import Issue, ValidationError

GRAPH_ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")
"""Graph ids, unique within a tenant."""
NODE_ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""Node ids, unique within a graph."""
HANDLER_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""Handler names: they become NATS subject tokens (``tm.<tenant>.work.task.<handler>``)."""
EDGE_ID_PATTERN: Final = re.compile(r"[\x21-\x7e]{1,256}")
"""Edge ids: 1-256 visible ASCII characters (the default ``a->b`` form included)."""
POLICY_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""Guardrail policy ids a graph may name."""
MAX_GRAPH_YAML_BYTES: Final = 1024 * 1024
"""Largest graph document :func:`load_graph_yaml` accepts (UTF-8 bytes)."""

_UINT32_MAX = 2**32 - 1
_MAX_EXACT_INT = 2**53
_MAX_DURATION_SECONDS = 315_576_000_000  # google.protobuf.Duration's range (~10,000 years)
MAX_STEP_SECONDS: Final = 100 * 366 * 86_400
"""The longest one step of a node may take, every attempt and backoff included: about
a century (its deadline is a timestamp, which ends in the year 9999)."""
_DEFAULT_TIMEOUT_NANOS = 60 * 1_000_000_000  # an attempt's limit when a node sets none
_NANOS = 1_000_000_000
# Graph documents are shallow; config may nest MAX_STRUCT_DEPTH levels below a node.
_MAX_YAML_DEPTH = MAX_STRUCT_DEPTH + 8
_DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")

_TASK = graph_pb2.NODE_KIND_TASK
_PLAN = graph_pb2.NODE_KIND_PLAN
_NODE_KIND_NAMES: dict[int, str] = {_TASK: "task", _PLAN: "plan"}
_JOIN_MODES = {"all": graph_pb2.JOIN_MODE_ALL, "any": graph_pb2.JOIN_MODE_ANY}
_JOIN_MODE_NAMES = {
    graph_pb2.JOIN_MODE_UNSPECIFIED: "all",
    graph_pb2.JOIN_MODE_ALL: "all",
    graph_pb2.JOIN_MODE_ANY: "any",
    graph_pb2.JOIN_MODE_QUORUM: "quorum",
}
_EDGE_KINDS = {
    "normal": graph_pb2.EDGE_KIND_NORMAL,
    "parallel": graph_pb2.EDGE_KIND_PARALLEL,
    "join": graph_pb2.EDGE_KIND_JOIN,
    "final": graph_pb2.EDGE_KIND_FINAL,
}
_EDGE_KIND_NAMES = {value: name for name, value in _EDGE_KINDS.items()}


@dataclass(frozen=True, slots=True)
class Retry:
    """How failed attempts of a node are retried before the work is dead-lettered."""

    max_attempts: int = 3
    """Total attempts, the first included; 1 means no retries, 0 the runtime default (3)."""
    initial_backoff: float = 1.0
    """Seconds before the first retry."""
    max_backoff: float = 60.0
    """Cap on the seconds between retries."""
    multiplier: float = 2.0
    """Growth of the backoff after each retry; 0 means the runtime default (2.0)."""
    non_retryable: tuple[str, ...] = ()
    """``ErrorInfo.type`` values that are never retried."""


_RETRY_DEFAULTS = Retry()


def default_edge_id(from_node: str, to_node: str) -> str:
    """Return the default id of an edge: ``"<from>-><to>"``, or ``"<from>->end"`` if final.

    Args:
        from_node: The node the edge leaves.
        to_node: The node it enters; empty for a final edge.
    """
    return f"{from_node}->{to_node or 'end'}"


class GraphBuilder:
    """Build an ``AgentGraph`` in Python.

    Every method returns the builder, so calls chain. Nothing is checked until
    :meth:`build`, which reports every problem at once.

    Example:
        >>> graph = (
        ...     GraphBuilder("echo")
        ...     .task("ask", "llm_call", timeout=30)
        ...     .plan("decide")
        ...     .edge("ask", "decide")
        ...     .edge("decide", "ask")
        ...     .final("decide")
        ...     .build()
        ... )
        >>> graph.entry_node_id
        'ask'
    """

    def __init__(
        self,
        graph_id: str,
        *,
        description: str = "",
        max_iterations: int = 0,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Start a graph.

        Args:
            graph_id: The graph's id within its tenant.
            description: What the graph is for.
            max_iterations: How often any node may run in one lifetime; 0 means
                the default (100).
            labels: Free-form key/value metadata.
        """
        self._graph = graph_pb2.AgentGraph(id=graph_id, description=description)
        self._issues: list[Issue] = []
        self._entry: str | None = None
        if _uint32_ok(max_iterations):
            self._graph.max_iterations = max_iterations
        else:
            self._problem("max_iterations", _uint32_message(max_iterations))
        for key, value in (labels or {}).items():
            if isinstance(key, str) and isinstance(value, str):
                self._graph.labels[key] = value
            else:
                self._problem(f"labels.{key}", f"labels map strings to strings, got {value!r}")

    def task(
        self,
        node_id: str,
        handler: str | None = None,
        *,
        timeout: float | None = None,
        retry: Retry | None = None,
        max_concurrency: int = 0,
        description: str = "",
        config: Mapping[str, Any] | None = None,
        input_schema: str = "",
        output_schema: str = "",
    ) -> GraphBuilder:
        """Add a task node: it does work and sends its result to one plan.

        Args:
            node_id: The node's id within the graph.
            handler: The handler executors serve for it; defaults to ``node_id``.
            timeout: Seconds one attempt may take; None means the default (60 s).
            retry: How failed attempts are retried; None means the runtime default.
            max_concurrency: How many executions may run at once in one
                lifetime; 0 means unbounded.
            description: What the node does.
            config: JSON-like static configuration sent with every request.
            input_schema: URI of a schema for the node's input.
            output_schema: URI of a schema for the node's output.
        """
        node = self._node(node_id, _TASK, handler, timeout, retry, description, config)
        path = f"nodes[{len(self._graph.nodes) - 1}]"
        if _uint32_ok(max_concurrency):
            node.max_concurrency = max_concurrency
        else:
            self._problem(f"{path}.max_concurrency", _uint32_message(max_concurrency))
        _set_schemas(node, input_schema, output_schema)
        return self

    def plan(
        self,
        node_id: str,
        handler: str | None = None,
        *,
        join: str = "all",
        quorum: int = 0,
        timeout: float | None = None,
        retry: Retry | None = None,
        description: str = "",
        config: Mapping[str, Any] | None = None,
        input_schema: str = "",
        output_schema: str = "",
    ) -> GraphBuilder:
        """Add a plan node: it decides what runs next.

        Args:
            node_id: The node's id within the graph.
            handler: The handler executors serve for it; defaults to ``node_id``.
            join: When the plan fires after a fan-out: ``"all"`` branches
                finished, ``"any"`` (the first), or ``"quorum"`` (``quorum`` of them).
            quorum: The number of branches ``join="quorum"`` waits for.
            timeout: Seconds one attempt may take; None means the default (60 s).
            retry: How failed attempts are retried; None means the runtime default.
            description: What the node decides.
            config: JSON-like static configuration sent with every request.
            input_schema: URI of a schema for the node's input.
            output_schema: URI of a schema for the node's output.
        """
        node = self._node(node_id, _PLAN, handler, timeout, retry, description, config)
        path = f"nodes[{len(self._graph.nodes) - 1}]"
        _set_schemas(node, input_schema, output_schema)
        if join == "quorum":
            node.join.mode = graph_pb2.JOIN_MODE_QUORUM
        elif join in _JOIN_MODES:
            node.join.mode = _JOIN_MODES[join]
        else:
            node.join.mode = graph_pb2.JOIN_MODE_ALL
            self._problem(f"{path}.join", f"expected join 'all', 'any' or 'quorum', got {join!r}")
        if _uint32_ok(quorum):
            node.join.quorum = quorum
        else:
            self._problem(f"{path}.join.quorum", _uint32_message(quorum))
        return self

    def edge(
        self,
        from_node: str,
        to_node: str,
        kind: str = "normal",
        *,
        condition: str = "",
        edge_id: str = "",
    ) -> GraphBuilder:
        """Connect a task to a plan, or a plan to a task.

        Args:
            from_node: The node the edge leaves.
            to_node: The node it enters.
            kind: ``"normal"``, ``"parallel"`` (a fan-out branch leaving a plan)
                or ``"join"`` (a task flowing back into a plan under its join policy).
                Final edges are added with :meth:`final`.
            condition: A guard in the policy expression language; the edge is
                only taken when it holds.
            edge_id: The edge's id; defaults to ``"<from>-><to>"``.
        """
        path = f"edges[{len(self._graph.edges)}]"
        edge_kind = _EDGE_KINDS.get(kind) if kind != "final" else None
        if edge_kind is None:
            hint = "; add final edges with final()" if kind == "final" else ""
            self._problem(
                f"{path}.kind", f"expected 'normal', 'parallel' or 'join', got {kind!r}{hint}"
            )
            edge_kind = graph_pb2.EDGE_KIND_NORMAL
        self._graph.edges.add(
            id=edge_id or default_edge_id(from_node, to_node),
            from_node_id=from_node,
            to_node_id=to_node,
            kind=edge_kind,
            condition=condition,
        )
        return self

    def final(self, from_plan: str, *, edge_id: str = "") -> GraphBuilder:
        """Add a final edge: taking it completes the lifetime.

        Args:
            from_plan: The plan the edge leaves.
            edge_id: The edge's id; defaults to ``"<from_plan>->end"``.
        """
        self._graph.edges.add(
            id=edge_id or f"{from_plan}->end",
            from_node_id=from_plan,
            kind=graph_pb2.EDGE_KIND_FINAL,
        )
        return self

    def entry(self, node_id: str) -> GraphBuilder:
        """Start lifetimes at ``node_id`` instead of the first node added."""
        self._entry = node_id
        return self

    def policy(self, policy_id: str, version: int = 0) -> GraphBuilder:
        """Apply a guardrail policy to lifetimes of this graph.

        Args:
            policy_id: The policy's id within the tenant.
            version: A pinned version; 0 means the newest.
        """
        self._graph.policy.policy_id = policy_id
        if _uint32_ok(version):
            self._graph.policy.version = version
        else:
            self._problem("policy.version", _uint32_message(version))
        return self

    def build(self) -> graph_pb2.AgentGraph:
        """Validate the graph and return it with its digest filled in (version 0).

        Raises:
            ValidationError: Listing every problem found (``.issues``).
        """
        graph = graph_pb2.AgentGraph()
        graph.CopyFrom(self._graph)
        if self._entry is not None:
            graph.entry_node_id = self._entry
        elif graph.nodes:
            graph.entry_node_id = graph.nodes[0].id
        issues = [*self._issues, *validate_graph(graph)]
        if issues:
            raise ValidationError(_invalid(repr(graph.id), issues), issues)
        graph.digest = graph_digest(graph)
        return graph

    def _node(
        self,
        node_id: str,
        kind: graph_pb2.NodeKind.ValueType,
        handler: str | None,
        timeout: float | None,
        retry: Retry | None,
        description: str,
        config: Mapping[str, Any] | None,
    ) -> graph_pb2.Node:
        path = f"nodes[{len(self._graph.nodes)}]"
        node = self._graph.nodes.add(
            id=node_id,
            kind=kind,
            handler=node_id if handler is None else handler,
            description=description,
        )
        if timeout is not None:
            _seconds_to_proto(timeout, node.timeout, f"{path}.timeout", self._issues)
        if retry is not None:
            _retry_to_proto(retry, node.retry, f"{path}.retry", self._issues)
        if config is not None:
            _python_to_struct(config, node.config, f"{path}.config", self._issues)
        return node

    def _problem(self, field: str, message: str) -> None:
        self._issues.append(Issue(message, field=field))


def _set_schemas(node: graph_pb2.Node, input_schema: str, output_schema: str) -> None:
    if input_schema:
        node.input_schema.uri = input_schema
    if output_schema:
        node.output_schema.uri = output_schema


def _retry_to_proto(
    retry: Retry, target: graph_pb2.RetryPolicy, path: str, issues: list[Issue]
) -> None:
    if _uint32_ok(retry.max_attempts):
        target.max_attempts = retry.max_attempts
    else:
        issues.append(Issue(_uint32_message(retry.max_attempts), field=f"{path}.max_attempts"))
    _seconds_to_proto(
        retry.initial_backoff, target.initial_backoff, f"{path}.initial_backoff", issues
    )
    _seconds_to_proto(retry.max_backoff, target.max_backoff, f"{path}.max_backoff", issues)
    if isinstance(retry.multiplier, int | float) and not isinstance(retry.multiplier, bool):
        target.backoff_multiplier = retry.multiplier
    else:
        issues.append(
            Issue(f"expected a number, got {retry.multiplier!r}", field=f"{path}.multiplier")
        )
    for i, name in enumerate(retry.non_retryable):
        if isinstance(name, str):
            target.non_retryable_error_types.append(name)
        else:
            issues.append(
                Issue(
                    f"expected an error type name, got {name!r}", field=f"{path}.non_retryable[{i}]"
                )
            )


def _default_retry() -> graph_pb2.RetryPolicy:
    retry = graph_pb2.RetryPolicy()
    _retry_to_proto(Retry(), retry, "", [])
    return retry


def _seconds_to_proto(
    seconds: float, target: duration_pb2.Duration, path: str, issues: list[Issue]
) -> None:
    nanos = None
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        nanos = _decimal_seconds_to_nanos(Decimal(repr(seconds)))
    if nanos is None:
        issues.append(Issue(f"expected a number of seconds, got {seconds!r}", field=path))
    else:
        target.CopyFrom(_nanos_to_duration(nanos))


def graph_digest(graph: graph_pb2.AgentGraph) -> str:
    """Return the hex SHA-256 of the graph's canonical content.

    The graph is serialized deterministically with ``version`` and ``digest``
    cleared; the id stays in. The same content always has the same digest.
    """
    content = graph_pb2.AgentGraph()
    content.CopyFrom(graph)
    content.ClearField("version")
    content.ClearField("digest")
    return hashlib.sha256(content.SerializeToString(deterministic=True)).hexdigest()


def validate_graph(
    graph: graph_pb2.AgentGraph,
    *,
    locations: Mapping[str, tuple[int, int]] | None = None,
    source: str = "",
) -> list[Issue]:
    """Check a graph against every rule of a tickmesh graph.

    Args:
        graph: The graph to check.
        locations: Where each field path sits in the source document, as
            1-based ``(line, column)``. A field without an entry takes its
            closest enclosing field's location.
        source: The document's name, copied into every issue.

    Returns:
        Every problem found, in document order as far as possible; an empty
        list means the graph is valid.
    """
    return _Validator(graph, locations or {}, source).run()


def load_graph_yaml(text: str, *, source: str = "<string>") -> graph_pb2.AgentGraph:
    """Parse and validate a YAML graph document (the format is in this module's docs).

    Args:
        text: The document.
        source: Its name, for messages (a file path, or ``<string>``).

    Returns:
        The graph, with its digest filled in (version 0).

    Raises:
        ValidationError: The document is not a valid graph; ``.issues`` has
            every problem with its line, column and field path.
    """
    # Characters never outnumber UTF-8 bytes, so the cheap check comes first.
    if len(text) > MAX_GRAPH_YAML_BYTES:
        _refuse_oversized(source)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        position = _text_position(text, exc.start)
        raise _yaml_error(
            source, "not valid Unicode: a lone surrogate character", position
        ) from exc
    if size > MAX_GRAPH_YAML_BYTES:
        _refuse_oversized(source)
    root = _compose(text, source)
    reader = _YamlReader(text, source)
    graph = reader.read_graph(root)
    # Shape and type errors first: checking the rules of a half-read graph would
    # only report their echoes. Either way, issues are listed in document order.
    issues = reader.issues or validate_graph(graph, locations=reader.locations, source=source)
    if issues:
        issues = sorted(issues, key=lambda issue: (issue.line, issue.column))
        raise ValidationError(_invalid(source, issues), issues)
    graph.digest = graph_digest(graph)
    return graph


def load_graph_file(path: str | os.PathLike[str]) -> graph_pb2.AgentGraph:
    """Read, parse and validate a YAML graph file.

    Raises:
        ValidationError: The file is over 1 MiB, not UTF-8, or not a valid graph.
        OSError: The file cannot be read.
    """
    name = os.fspath(path)
    with open(name, "rb") as file:
        data = file.read(MAX_GRAPH_YAML_BYTES + 1)
    if len(data) > MAX_GRAPH_YAML_BYTES:
        _refuse_oversized(name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        issue = Issue(f"not UTF-8: invalid byte at offset {exc.start}", source=name)
        raise ValidationError(_invalid(name, [issue]), [issue]) from exc
    return load_graph_yaml(text, source=name)


def graph_to_yaml(graph: graph_pb2.AgentGraph) -> str:
    """Render a graph as a YAML document that :func:`load_graph_yaml` reads back equal.

    Defaults are left out (a handler equal to the id, the first node as entry,
    default edge ids, ``join: all``). ``version`` and ``digest`` are not part of
    the document; loading it fills the digest in again.
    """
    doc: dict[str, Any] = {"graph": graph.id}
    if graph.description:
        doc["description"] = graph.description
    if graph.entry_node_id and (not graph.nodes or graph.entry_node_id != graph.nodes[0].id):
        doc["entry"] = graph.entry_node_id
    if graph.max_iterations:
        doc["max_iterations"] = graph.max_iterations
    if graph.HasField("policy"):
        policy = _Flow(id=graph.policy.policy_id)
        if graph.policy.version:
            policy["version"] = graph.policy.version
        doc["policy"] = policy
    if graph.labels:
        doc["labels"] = _Flow(sorted(graph.labels.items()))
    doc["nodes"] = [_node_to_yaml(node) for node in graph.nodes]
    doc["edges"] = [_edge_to_yaml(edge) for edge in graph.edges]
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


# --- validation ---------------------------------------------------------------------------


class _Validator:
    def __init__(
        self, graph: graph_pb2.AgentGraph, locations: Mapping[str, tuple[int, int]], source: str
    ) -> None:
        self.graph = graph
        self.locations = locations
        self.source = source
        self.issues: list[Issue] = []
        # First occurrence of each node id; later duplicates are reported and ignored.
        self.nodes: dict[str, graph_pb2.Node] = {}
        self.node_index: dict[str, int] = {}

    def add(self, field: str, message: str) -> None:
        line, column = _locate(self.locations, field)
        self.issues.append(
            Issue(message, field=field, line=line, column=column, source=self.source)
        )

    def run(self) -> list[Issue]:
        graph = self.graph
        if not GRAPH_ID_PATTERN.fullmatch(graph.id):
            self.add("graph", _pattern_message("graph id", graph.id, GRAPH_ID_PATTERN))
        if graph.digest and graph.digest != graph_digest(graph):
            self.add("digest", "digest does not match the graph's content; rebuild the graph")
        if graph.HasField("policy") and not POLICY_ID_PATTERN.fullmatch(graph.policy.policy_id):
            self.add(
                "policy.id",
                _pattern_message("policy id", graph.policy.policy_id, POLICY_ID_PATTERN),
            )
        if any(not key for key in graph.labels):
            self.add("labels", "label keys must not be empty")
        if not graph.nodes:
            self.add("nodes", "a graph needs at least one node")
        for i, node in enumerate(graph.nodes):
            if node.id in self.nodes:
                self.add(
                    f"nodes[{i}].id",
                    f"duplicate node id {node.id!r} (also nodes[{self.node_index[node.id]}])",
                )
            else:
                self.nodes[node.id] = node
                self.node_index[node.id] = i
        incoming: dict[str, int] = {}
        for edge in graph.edges:
            incoming[edge.to_node_id] = incoming.get(edge.to_node_id, 0) + 1
        for i, node in enumerate(graph.nodes):
            self.check_node(f"nodes[{i}]", node, incoming.get(node.id, 0))
        self.check_entry()
        self.check_edges()
        self.check_reachable()
        return self.issues

    def check_node(self, path: str, node: graph_pb2.Node, incoming: int) -> None:
        if not NODE_ID_PATTERN.fullmatch(node.id):
            self.add(f"{path}.id", _pattern_message("node id", node.id, NODE_ID_PATTERN))
        if node.kind == graph_pb2.NODE_KIND_UNSPECIFIED:
            self.add(f"{path}.kind", "kind is not set: expected task or plan")
        elif node.kind not in _NODE_KIND_NAMES:
            self.add(f"{path}.kind", f"unknown node kind {node.kind}: expected task or plan")
        if not node.handler:
            self.add(f"{path}.handler", "handler is not set")
        elif not HANDLER_PATTERN.fullmatch(node.handler):
            self.add(f"{path}.handler", _pattern_message("handler", node.handler, HANDLER_PATTERN))
        if node.HasField("timeout"):
            self.check_duration(f"{path}.timeout", node.timeout, positive=True)
        if node.HasField("retry"):
            self.check_retry(f"{path}.retry", node.retry)
        if node.HasField("join"):
            self.check_join(path, node, incoming)
        self.check_step_length(path, node)
        if node.HasField("config"):
            depth = _struct_depth(node.config)
            if depth > MAX_STRUCT_DEPTH:
                self.add(
                    f"{path}.config",
                    f"config nests {depth} levels deep; the limit is {MAX_STRUCT_DEPTH}",
                )
            else:
                # As the YAML reader and the builder refuse it: no JSON (nor YAML read
                # back) holds a NaN or an infinity.
                where = _non_finite(node.config, f"{path}.config")
                if where is not None:
                    self.add(where[0], f"expected a finite number, got {where[1]}")
        for name in ("input_schema", "output_schema"):
            if node.HasField(name):
                schema: graph_pb2.SchemaRef = getattr(node, name)
                if not schema.uri:
                    self.add(f"{path}.{name}", "a schema needs a uri")
                if schema.digest and not _DIGEST_PATTERN.fullmatch(schema.digest):
                    self.add(
                        f"{path}.{name}.digest",
                        f"expected a hex SHA-256 (64 lowercase hex digits), got {schema.digest!r}",
                    )

    def check_step_length(self, path: str, node: graph_pb2.Node) -> None:
        """A step's deadline (every attempt's timeout and the backoffs between them, after
        its dispatch) is a timestamp: it must stay far inside the year 9999."""
        timeout = _DEFAULT_TIMEOUT_NANOS
        if node.HasField("timeout"):
            timeout = _duration_to_nanos(node.timeout) or 0
        retry = node.retry
        durations = {"timeout": timeout}
        if retry.HasField("initial_backoff"):
            durations["retry.initial_backoff"] = _duration_to_nanos(retry.initial_backoff) or 0
        if retry.HasField("max_backoff"):
            durations["retry.max_backoff"] = _duration_to_nanos(retry.max_backoff) or 0
        too_long = False
        for name, nanos in durations.items():
            if nanos > MAX_STEP_SECONDS * _NANOS:
                too_long = True
                self.add(
                    f"{path}.{name}",
                    f"{_format_nanos(nanos)} is too long: at most {MAX_STEP_SECONDS:,} s "
                    "(about a century)",
                )
        multiplier = retry.backoff_multiplier
        if too_long or not math.isfinite(multiplier) or (multiplier != 0 and multiplier < 1):
            return  # reported on its own
        attempts = retry.max_attempts or _RETRY_DEFAULTS.max_attempts
        total = timeout * attempts + _total_backoff_nanos(retry, attempts)
        if total > MAX_STEP_SECONDS * _NANOS:
            self.add(
                f"{path}.retry.max_attempts" if retry.max_attempts else f"{path}.timeout",
                f"a step of node {node.id!r} may take {total / _NANOS:,.0f} s ({attempts:,} "
                f"attempts of {_format_nanos(timeout)} and the backoffs between them): at "
                f"most {MAX_STEP_SECONDS:,} s (about a century)",
            )

    def check_join(self, path: str, node: graph_pb2.Node, incoming: int) -> None:
        join = node.join
        if node.kind != _PLAN:
            self.add(f"{path}.join", "a join policy applies to plan nodes only")
            return
        if join.mode not in _JOIN_MODE_NAMES:
            self.add(f"{path}.join", f"unknown join mode {join.mode}: expected all, any or quorum")
        elif join.mode == graph_pb2.JOIN_MODE_QUORUM:
            # Branches are counted at run time (one PARALLEL edge may carry many), and a
            # quorum above the branches dispatched waits for all of them.
            if join.quorum < 1:
                self.add(f"{path}.join.quorum", "quorum must be at least 1")
        elif join.quorum:
            self.add(
                f"{path}.join.quorum",
                f"quorum is only used by join {{quorum: n}}, but the join is "
                f"{_JOIN_MODE_NAMES[join.mode]}",
            )

    def check_retry(self, path: str, retry: graph_pb2.RetryPolicy) -> None:
        initial = max_ = None
        if retry.HasField("initial_backoff"):
            initial = self.check_duration(f"{path}.initial_backoff", retry.initial_backoff)
        if retry.HasField("max_backoff"):
            max_ = self.check_duration(f"{path}.max_backoff", retry.max_backoff)
        if initial is not None and max_ is not None and max_ < initial:
            self.add(
                f"{path}.max_backoff",
                f"max_backoff ({_format_nanos(max_)}) is shorter than initial_backoff "
                f"({_format_nanos(initial)})",
            )
        multiplier = retry.backoff_multiplier
        if not math.isfinite(multiplier) or (multiplier != 0 and multiplier < 1):
            self.add(
                f"{path}.multiplier",
                f"expected 0 (the default, 2) or a multiplier of at least 1, got {multiplier}",
            )
        for j, name in enumerate(retry.non_retryable_error_types):
            if not name:
                self.add(f"{path}.non_retryable[{j}]", "error type names must not be empty")

    def check_duration(
        self, path: str, duration: duration_pb2.Duration, *, positive: bool = False
    ) -> int | None:
        nanos = _duration_to_nanos(duration)
        if nanos is None:
            self.add(path, "not a valid duration (seconds and nanos out of range or mixed signs)")
        elif positive and nanos <= 0:
            self.add(path, f"must be positive, got {_format_nanos(nanos)}")
        elif nanos < 0:
            self.add(path, f"must not be negative, got {_format_nanos(nanos)}")
        else:
            return nanos
        return None

    def check_entry(self) -> None:
        entry = self.graph.entry_node_id
        if not entry:
            if self.graph.nodes:
                self.add("entry", "no entry node: set entry to the id of the first node to run")
        elif entry not in self.nodes:
            self.add("entry", f"entry node {entry!r} is not a node of this graph{self.hint(entry)}")

    def check_edges(self) -> None:
        triples: dict[tuple[str, str, int], int] = {}
        ids: dict[str, int] = {}
        # Non-final edges leaving each task, in order.
        leaving: dict[str, list[int]] = {}
        has_final = False
        for j, edge in enumerate(self.graph.edges):
            path = f"edges[{j}]"
            kind = edge.kind or graph_pb2.EDGE_KIND_NORMAL
            if kind not in _EDGE_KIND_NAMES:
                self.add(
                    f"{path}.kind",
                    f"unknown edge kind {kind}: expected normal, parallel, join or final",
                )
                continue
            final = kind == graph_pb2.EDGE_KIND_FINAL
            has_final = has_final or final
            triple = (edge.from_node_id, edge.to_node_id, kind)
            effective_id = edge.id or default_edge_id(edge.from_node_id, edge.to_node_id)
            if triple in triples:
                self.add(path, f"duplicate of edges[{triples[triple]}] (same from, to and kind)")
            elif edge.id and not EDGE_ID_PATTERN.fullmatch(edge.id):
                self.add(f"{path}.id", _pattern_message("edge id", edge.id, EDGE_ID_PATTERN))
            elif effective_id in ids:
                self.add(
                    f"{path}.id",
                    f"edge id {effective_id!r} is also used by edges[{ids[effective_id]}]; "
                    "give one of them an explicit id",
                )
            triples.setdefault(triple, j)
            ids.setdefault(effective_id, j)
            source = self.check_endpoint(f"{path}.from", edge.from_node_id, "from")
            if final:
                if source is not None and source.kind != _PLAN:
                    self.add(
                        f"{path}.from",
                        f"a final edge must leave a plan node; {source.id!r} is a "
                        f"{_kind_name(source.kind)}",
                    )
                if edge.to_node_id:
                    self.add(f"{path}.to", "a final edge has no target: remove `to`")
                continue
            target = self.check_endpoint(f"{path}.to", edge.to_node_id, "to")
            if source is not None and source.kind == _TASK:
                leaving.setdefault(source.id, []).append(j)
            if source is not None and target is not None:
                self.check_alternation(path, kind, source, target)
        self.check_task_outputs(leaving)
        if not has_final:
            self.add(
                "edges",
                "no final edge: a lifetime could never complete; add {from: <plan>, kind: final}",
            )

    def check_endpoint(self, path: str, node_id: str, end: str) -> graph_pb2.Node | None:
        if not node_id:
            self.add(path, f"`{end}` is not set: expected a node id")
            return None
        node = self.nodes.get(node_id)
        if node is None:
            self.add(path, f"unknown node {node_id!r}{self.hint(node_id)}")
        return node

    def check_alternation(
        self,
        path: str,
        kind: graph_pb2.EdgeKind.ValueType,
        source: graph_pb2.Node,
        target: graph_pb2.Node,
    ) -> None:
        if source.kind not in _NODE_KIND_NAMES or target.kind not in _NODE_KIND_NAMES:
            return  # the node's kind is reported on the node
        if source.kind == target.kind:
            name = _kind_name(source.kind)
            self.add(
                f"{path}.to",
                f"edges alternate task -> plan -> task, but {source.id!r} and {target.id!r} "
                f"are both {name}s",
            )
        elif kind == graph_pb2.EDGE_KIND_PARALLEL and source.kind != _PLAN:
            self.add(
                f"{path}.kind",
                f"a parallel edge is a fan-out branch leaving a plan; {source.id!r} is a task",
            )
        elif kind == graph_pb2.EDGE_KIND_JOIN and target.kind != _PLAN:
            self.add(
                f"{path}.kind",
                f"a join edge flows back into a plan; {target.id!r} is a task",
            )

    def check_task_outputs(self, leaving: Mapping[str, list[int]]) -> None:
        for node_id, node in self.nodes.items():
            if node.kind != _TASK:
                continue
            edges = leaving.get(node_id, [])
            if not edges:
                self.add(
                    f"nodes[{self.node_index[node_id]}]",
                    f"task {node_id!r} has no outgoing edge: a task sends its result to "
                    "exactly one plan",
                )
            for j in edges[1:]:
                self.add(
                    f"edges[{j}].from",
                    f"task {node_id!r} already sends its result along edges[{edges[0]}]: "
                    "a task has exactly one outgoing edge",
                )

    def check_reachable(self) -> None:
        entry = self.graph.entry_node_id
        if entry not in self.nodes:
            return
        successors: dict[str, list[str]] = {}
        for edge in self.graph.edges:
            if edge.to_node_id in self.nodes:
                successors.setdefault(edge.from_node_id, []).append(edge.to_node_id)
        seen = {entry}
        stack = [entry]
        while stack:
            for nxt in successors.get(stack.pop(), []):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        for node_id, index in self.node_index.items():
            if node_id not in seen:
                self.add(
                    f"nodes[{index}]",
                    f"node {node_id!r} is not reachable from the entry node {entry!r}",
                )

    def hint(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.nodes), n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""


def _locate(locations: Mapping[str, tuple[int, int]], field: str) -> tuple[int, int]:
    path = field
    while True:
        if path in locations:
            return locations[path]
        if not path:
            return (0, 0)
        path = _parent_path(path)


def _parent_path(path: str) -> str:
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""


def _pattern_message(what: str, value: str, pattern: re.Pattern[str]) -> str:
    expected = _PATTERN_WORDS.get(pattern.pattern, pattern.pattern)
    if not value:
        return f"{what} is not set: expected {expected}"
    return f"{what} {value!r} is invalid: expected {expected}"


_PATTERN_WORDS = {EDGE_ID_PATTERN.pattern: "1-256 visible ASCII characters, no spaces"}


def _kind_name(kind: int) -> str:
    return _NODE_KIND_NAMES.get(kind, f"node of kind {kind}")


def _uint32_ok(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _UINT32_MAX


def _uint32_message(value: object) -> str:
    return f"expected a whole number from 0 to {_UINT32_MAX}, got {value!r}"


def _invalid(source: str, issues: Sequence[Issue]) -> str:
    count = len(issues)
    return f"invalid graph {source}: {count} problem{'s' if count != 1 else ''}"


def _refuse_oversized(source: str) -> None:
    issue = Issue(
        f"the document is larger than 1 MiB; graph documents are limited to "
        f"{MAX_GRAPH_YAML_BYTES} bytes",
        source=source,
    )
    raise ValidationError(_invalid(source, [issue]), [issue])


def _non_finite(
    value: struct_pb2.Struct | struct_pb2.ListValue, path: str
) -> tuple[str, float] | None:
    """The path and value of the first NaN or infinity in ``value``, if any."""
    items = (
        ((f"{path}.{key}", child) for key, child in sorted(value.fields.items()))
        if isinstance(value, struct_pb2.Struct)
        else ((f"{path}[{i}]", child) for i, child in enumerate(value.values))
    )
    for where, child in items:
        kind = child.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(child.number_value):
            return where, child.number_value
        if kind in ("struct_value", "list_value"):
            found = _non_finite(getattr(child, kind), where)
            if found is not None:
                return found
    return None


def _total_backoff_nanos(retry: graph_pb2.RetryPolicy, attempts: int) -> int:
    """The backoffs between ``attempts`` attempts, summed as the runtime spaces them
    (``Retry``'s defaults for fields not set); past the first 64, each counts as the
    cap (a policy may allow 2**32 - 1 attempts; a usual one is capped well before)."""
    initial = (
        _duration_to_nanos(retry.initial_backoff) or 0
        if retry.HasField("initial_backoff")
        else int(_RETRY_DEFAULTS.initial_backoff * _NANOS)
    )
    cap = (
        _duration_to_nanos(retry.max_backoff) or 0
        if retry.HasField("max_backoff")
        else int(_RETRY_DEFAULTS.max_backoff * _NANOS)
    )
    multiplier = retry.backoff_multiplier or _RETRY_DEFAULTS.multiplier
    count = max(0, attempts - 1)
    total = 0.0
    backoff = float(initial)
    for done in range(min(count, 64)):
        if backoff >= cap or multiplier == 1:
            return int(total) + int(min(backoff, cap)) * (count - done)
        total += backoff
        backoff *= multiplier
    return int(total) + cap * max(0, count - 64)


# --- durations ----------------------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": _NANOS,
    "m": 60 * _NANOS,
    "h": 3600 * _NANOS,
}
_DURATION_PART = r"(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|ms|s|m|h)"
_DURATION_RE = re.compile(rf"([+-]?)((?:{_DURATION_PART})+)")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|ms|s|m|h)")


def _parse_duration(text: str) -> int | None:
    """Return a duration string's length in nanoseconds, or None if it is not one."""
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        return None
    total = Decimal(0)
    for number, unit in _DURATION_PART_RE.findall(match.group(2)):
        total += Decimal(number) * _DURATION_UNITS[unit]
    nanos = int(total.to_integral_value())
    return -nanos if match.group(1) == "-" else nanos


def _decimal_seconds_to_nanos(seconds: Decimal) -> int | None:
    try:
        if not seconds.is_finite():
            return None
        return int((seconds * _NANOS).to_integral_value())
    except InvalidOperation:
        return None


def _nanos_to_duration(nanos: int) -> duration_pb2.Duration:
    seconds, rest = divmod(abs(nanos), _NANOS)
    sign = -1 if nanos < 0 else 1
    if seconds > _MAX_DURATION_SECONDS:
        # Out of Duration's range: keep a value that validation reports as invalid.
        return duration_pb2.Duration(seconds=sign * (_MAX_DURATION_SECONDS + 1))
    return duration_pb2.Duration(seconds=sign * seconds, nanos=sign * rest)


def _duration_to_nanos(duration: duration_pb2.Duration) -> int | None:
    seconds, nanos = duration.seconds, duration.nanos
    if abs(seconds) > _MAX_DURATION_SECONDS or abs(nanos) >= _NANOS:
        return None
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        return None
    return seconds * _NANOS + nanos


def _format_nanos(nanos: int) -> str:
    """Format nanoseconds exactly, in the largest unit that divides them."""
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    magnitude = abs(nanos)
    for unit in ("h", "m", "s", "ms", "us", "ns"):
        size = _DURATION_UNITS[unit]
        if magnitude % size == 0:
            return f"{sign}{magnitude // size}{unit}"
    raise AssertionError("unreachable: 1ns divides everything")


# --- config structs -----------------------------------------------------------------------


def _python_to_struct(
    data: Mapping[str, Any], target: struct_pb2.Struct, path: str, issues: list[Issue]
) -> None:
    if not isinstance(data, Mapping):
        issues.append(Issue(f"expected a mapping, got {data!r}", field=path))
        return
    value = _python_to_value(data, path, 1, issues)
    target.CopyFrom(value.struct_value)


def _python_to_value(obj: object, path: str, depth: int, issues: list[Issue]) -> struct_pb2.Value:
    value = struct_pb2.Value()
    problem = ""
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, int):
        if abs(obj) <= _MAX_EXACT_INT:
            value.number_value = float(obj)
        else:
            problem = _BIG_INT
    elif isinstance(obj, float):
        if math.isfinite(obj):
            value.number_value = obj
        else:
            problem = f"expected a finite number, got {obj!r}"
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, Mapping | list | tuple):
        if depth > MAX_STRUCT_DEPTH:
            problem = f"config nests more than {MAX_STRUCT_DEPTH} levels deep"
        elif isinstance(obj, Mapping):
            value.struct_value.SetInParent()
            for key, item in obj.items():
                if not isinstance(key, str):
                    issues.append(Issue(f"config keys must be strings, got {key!r}", field=path))
                    continue
                value.struct_value.fields[key].CopyFrom(
                    _python_to_value(item, f"{path}.{key}", depth + 1, issues)
                )
        else:
            value.list_value.SetInParent()
            for i, item in enumerate(obj):
                value.list_value.values.append(
                    _python_to_value(item, f"{path}[{i}]", depth + 1, issues)
                )
    else:
        problem = (
            f"expected a JSON-like value (null, bool, number, string, list, mapping), got {obj!r}"
        )
    if problem:
        issues.append(Issue(problem, field=path))
    return value


_BIG_INT = (
    "integer is too large to store exactly (config numbers are doubles: keep integers "
    "within ±2^53, or quote them)"
)


def _struct_depth(value: struct_pb2.Struct | struct_pb2.ListValue) -> int:
    children = value.fields.values() if isinstance(value, struct_pb2.Struct) else value.values
    deepest = 0
    for child in children:
        kind = child.WhichOneof("kind")
        if kind == "struct_value":
            deepest = max(deepest, _struct_depth(child.struct_value))
        elif kind == "list_value":
            deepest = max(deepest, _struct_depth(child.list_value))
    return deepest + 1


def _value_to_python(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        fields = value.struct_value.fields
        return {key: _value_to_python(fields[key]) for key in sorted(fields)}
    if kind == "list_value":
        return [_value_to_python(item) for item in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


# --- YAML in ------------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (f"{_TAG}{n}" for n in ("str", "int", "float", "bool", "null"))
_SEQ, _MAP = f"{_TAG}seq", f"{_TAG}map"
_SCALAR_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL})

_TOP_KEYS = (
    "graph",
    "description",
    "entry",
    "max_iterations",
    "policy",
    "labels",
    "nodes",
    "edges",
)
_NODE_KEYS = (
    "id",
    "kind",
    "handler",
    "description",
    "timeout",
    "retry",
    "max_concurrency",
    "join",
    "config",
    "input_schema",
    "output_schema",
)
_RETRY_KEYS = ("max_attempts", "initial_backoff", "max_backoff", "multiplier", "non_retryable")
_EDGE_KEYS = ("id", "from", "to", "kind", "condition")
_DURATION_EXPECTED = "a duration like 30s, 250ms, 2m or 1h (or a number of seconds)"


class _RefusedError(Exception):
    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _RefusingComposer(Composer):
    """PyYAML's composer, refusing what graph files never need.

    Only the node tree is built (nothing is constructed), so no tag can run
    code; anchors, aliases (alias bombs) and tags are still refused outright,
    and nesting is bounded because composition recurses. The events come from
    libyaml when PyYAML has it (about five times faster), else from PyYAML's
    own parser.
    """

    offsets_in_bytes: ClassVar[bool] = False
    """Whether a ReaderError's position counts UTF-8 bytes (libyaml) or characters."""
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.NodeEvent = cast(Any, self).peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _RefusedError(
                f"aliases (*{event.anchor}) are not allowed in graph files; write the value out",
                event.start_mark,
            )
        if event.anchor is not None:
            raise _RefusedError(
                f"anchors (&{event.anchor}) are not allowed in graph files", event.start_mark
            )
        tag: str | None = getattr(event, "tag", None)
        if tag is not None and tag != "!" and not _tag_fits(event, tag):
            raise _RefusedError(
                f"tag {_show_tag(tag)} is not allowed in graph files: use plain YAML values",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > _MAX_YAML_DEPTH:
                raise _RefusedError(
                    f"the document nests more than {_MAX_YAML_DEPTH} levels deep",
                    event.start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _PythonComposer(_RefusingComposer, yaml.SafeLoader):
    pass


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _LibyamlComposer(_RefusingComposer, CParser, Resolver):
        offsets_in_bytes = True

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            Resolver.__init__(self)


_USE_LIBYAML = yaml.__with_libyaml__


def _new_composer(text: str) -> _RefusingComposer:
    # The parsers refuse unprintable characters as soon as they are made.
    if _USE_LIBYAML:
        return _LibyamlComposer(text)
    return _PythonComposer(text)


def _tag_fits(event: yaml.Event, tag: str) -> bool:
    if isinstance(event, yaml.ScalarEvent):
        return tag in _SCALAR_TAGS
    if isinstance(event, yaml.SequenceStartEvent):
        return tag == _SEQ
    return isinstance(event, yaml.MappingStartEvent) and tag == _MAP


def _show_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _compose(text: str, source: str) -> yaml.Node:
    loader: _RefusingComposer | None = None
    try:
        loader = _new_composer(text)
        root = loader.get_single_node()
    except _RefusedError as exc:
        raise _yaml_error(source, exc.message, _mark_position(exc.mark)) from None
    except yaml.MarkedYAMLError as exc:
        problem = "; ".join(p for p in (exc.context, exc.problem) if p)
        position = _mark_position(exc.problem_mark)
        raise _yaml_error(source, f"invalid YAML: {problem}", position) from exc
    except yaml.reader.ReaderError as exc:
        index = exc.position
        if loader is None or loader.offsets_in_bytes:
            index = len(text.encode("utf-8")[:index].decode("utf-8", "ignore"))
        code = f"U+{ord(text[index]):04X}" if index < len(text) else repr(exc.character)
        message = f"invalid YAML: character {code} is not allowed in YAML documents"
        raise _yaml_error(source, message, _text_position(text, index)) from exc
    except yaml.YAMLError as exc:
        raise _yaml_error(source, f"invalid YAML: {exc}", (0, 0)) from exc
    except RecursionError:
        raise _yaml_error(source, "the document nests too deeply", (0, 0)) from None
    finally:
        if loader is not None:
            cast(Any, loader).dispose()
    if root is None:
        raise _yaml_error(source, "expected a graph mapping, got an empty document", (0, 0))
    return root


def _mark_position(mark: Any) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)


def _text_position(text: str, index: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _yaml_error(source: str, message: str, position: tuple[int, int]) -> ValidationError:
    line, column = position
    issue = Issue(message, line=line, column=column, source=source)
    return ValidationError(_invalid(source, [issue]), [issue])


_SCALARS = SafeConstructor()
"""Reads int, float and bool scalars the YAML 1.1 way (it keeps no state for them)."""


class _YamlReader:
    """Turns a composed YAML tree into an AgentGraph, recording issues and locations."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.issues: list[Issue] = []
        self.locations: dict[str, tuple[int, int]] = {}

    # generic readers

    def error(self, node: yaml.Node, field: str, message: str) -> None:
        line, column = _position(node)
        self.issues.append(
            Issue(message, field=field, line=line, column=column, source=self.source)
        )

    def expected(self, node: yaml.Node, field: str, what: str) -> None:
        self.error(node, field, f"expected {what}, got {self.describe(node)}")

    def mapping(
        self, node: yaml.Node, path: str, keys: Sequence[str] | None, what: str
    ) -> dict[str, yaml.Node] | None:
        """Read a mapping; with ``keys``, only those keys are allowed."""
        if not isinstance(node, yaml.MappingNode):
            self.expected(node, path, what)
            return None
        found: dict[str, yaml.Node] = {}
        first: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _NULL:
                self.expected(key_node, path, "a string key")
                continue
            key = str(key_node.value)
            field = f"{path}.{key}" if path else key
            if key in first:
                line, _ = _position(first[key])
                self.error(key_node, field, f"duplicate key {key!r} (first on line {line})")
                continue
            first[key] = key_node
            if keys is not None and key not in keys:
                self.error(key_node, field, _unknown_key(key, keys))
                continue
            found[key] = value_node
            self.locations[field] = _position(value_node)
        return found

    def sequence(self, node: yaml.Node, path: str, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.expected(node, path, what)
            return []
        for i, item in enumerate(node.value):
            self.locations[f"{path}[{i}]"] = _position(item)
        return list(node.value)

    def string(self, node: yaml.Node, path: str, what: str = "a string") -> str | None:
        # A plain scalar is read as the text written (`1.10`, `no`, `2024-01-01` stay as typed).
        if isinstance(node, yaml.ScalarNode) and node.tag != _NULL:
            return str(node.value)
        self.expected(node, path, what)
        return None

    def uint32(self, node: yaml.Node, path: str) -> int | None:
        number = self.integer(node)
        if number is not None and 0 <= number <= _UINT32_MAX:
            return number
        self.expected(node, path, f"a whole number from 0 to {_UINT32_MAX}")
        return None

    def integer(self, node: yaml.Node) -> int | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT:
            try:
                return _SCALARS.construct_yaml_int(node)
            except (ValueError, yaml.YAMLError):
                return None
        return None

    def number(self, node: yaml.Node) -> Decimal | None:
        """Read an int or float scalar exactly; None if it is not a finite number."""
        if not isinstance(node, yaml.ScalarNode):
            return None
        if node.tag == _INT:
            integer = self.integer(node)
            return None if integer is None else Decimal(integer)
        if node.tag == _FLOAT:
            try:
                number = _SCALARS.construct_yaml_float(node)
            except (ValueError, yaml.YAMLError):
                return None
            return Decimal(repr(number)) if math.isfinite(number) else None
        return None

    def duration(self, node: yaml.Node, path: str) -> duration_pb2.Duration | None:
        nanos: int | None = None
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR:
                nanos = _parse_duration(str(node.value))
            else:
                seconds = self.number(node)
                nanos = None if seconds is None else _decimal_seconds_to_nanos(seconds)
        if nanos is None:
            self.expected(node, path, _DURATION_EXPECTED)
            return None
        if abs(nanos) > _MAX_DURATION_SECONDS * _NANOS:
            self.error(node, path, "duration is out of range (at most about 10,000 years)")
            return None
        return _nanos_to_duration(nanos)

    def describe(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _NULL:
                return "null (an empty value)" if not node.value else str(node.value)
            text = _shorten(str(node.value))
            return f'"{text}"' if node.tag == _STR else text
        start, end = node.start_mark, node.end_mark
        if isinstance(node, yaml.CollectionNode) and node.flow_style and start and end:
            return _shorten(" ".join(self.text[start.index : end.index].split()))
        return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"

    # the graph

    def read_graph(self, root: yaml.Node) -> graph_pb2.AgentGraph:
        graph = graph_pb2.AgentGraph()
        top = self.mapping(root, "", _TOP_KEYS, "a graph mapping (graph:, nodes:, edges:)")
        if top is None:
            return graph
        self.locations[""] = _position(root)
        for required in ("graph", "nodes", "edges"):
            if required not in top:
                self.error(root, required, f"missing required key {required!r}")
        if "graph" in top:
            graph.id = self.string(top["graph"], "graph", "a graph id") or ""
        if "description" in top:
            graph.description = self.string(top["description"], "description") or ""
        if "max_iterations" in top:
            graph.max_iterations = self.uint32(top["max_iterations"], "max_iterations") or 0
        if "policy" in top:
            self.read_policy(top["policy"], graph.policy)
        if "labels" in top:
            self.read_labels(top["labels"], graph)
        if "nodes" in top:
            for i, item in enumerate(self.sequence(top["nodes"], "nodes", "a list of nodes")):
                self.read_node(item, f"nodes[{i}]", graph.nodes.add())
        if "edges" in top:
            for i, item in enumerate(self.sequence(top["edges"], "edges", "a list of edges")):
                self.read_edge(item, f"edges[{i}]", graph.edges.add())
        if "entry" in top:
            graph.entry_node_id = self.string(top["entry"], "entry", "a node id") or ""
        elif graph.nodes:
            graph.entry_node_id = graph.nodes[0].id
        return graph

    def read_policy(self, node: yaml.Node, policy: graph_pb2.PolicyRef) -> None:
        policy.SetInParent()
        if isinstance(node, yaml.ScalarNode):
            policy.policy_id = self.string(node, "policy", "a policy id") or ""
            return
        fields = self.mapping(node, "policy", ("id", "version"), "{id: ..., version: ...}")
        if fields is None:
            return
        if "id" in fields:
            policy.policy_id = self.string(fields["id"], "policy.id", "a policy id") or ""
        else:
            self.error(node, "policy.id", "missing required key 'id'")
        if "version" in fields:
            policy.version = self.uint32(fields["version"], "policy.version") or 0

    def read_labels(self, node: yaml.Node, graph: graph_pb2.AgentGraph) -> None:
        labels = self.mapping(node, "labels", None, "a mapping of strings to strings")
        for key, value in (labels or {}).items():
            text = self.string(value, f"labels.{key}")
            if text is not None:
                graph.labels[key] = text

    def read_node(self, item: yaml.Node, path: str, node: graph_pb2.Node) -> None:
        fields = self.mapping(item, path, _NODE_KEYS, "a node mapping like {id: x, kind: task}")
        if fields is None:
            return
        for required in ("id", "kind"):
            if required not in fields:
                self.error(item, f"{path}.{required}", f"missing required key {required!r}")
        if "id" in fields:
            node.id = self.string(fields["id"], f"{path}.id", "a node id") or ""
        if "kind" in fields:
            kind = self.string(fields["kind"], f"{path}.kind", "task or plan")
            if kind == "task":
                node.kind = _TASK
            elif kind == "plan":
                node.kind = _PLAN
            elif kind is not None:
                self.expected(fields["kind"], f"{path}.kind", "task or plan")
        if "handler" in fields:
            node.handler = self.string(fields["handler"], f"{path}.handler", "a handler") or ""
        else:
            node.handler = node.id
        if "description" in fields:
            node.description = self.string(fields["description"], f"{path}.description") or ""
        if "timeout" in fields:
            timeout = self.duration(fields["timeout"], f"{path}.timeout")
            if timeout is not None:
                node.timeout.CopyFrom(timeout)
        if "retry" in fields:
            self.read_retry(fields["retry"], f"{path}.retry", node.retry)
        if "max_concurrency" in fields:
            node.max_concurrency = (
                self.uint32(fields["max_concurrency"], f"{path}.max_concurrency") or 0
            )
        if "join" in fields:
            self.read_join(fields["join"], f"{path}.join", node.join)
        elif node.kind == _PLAN:
            node.join.mode = graph_pb2.JOIN_MODE_ALL
        if "config" in fields:
            config = self.config_value(fields["config"], f"{path}.config", 1)
            if config is not None and config.HasField("struct_value"):
                node.config.CopyFrom(config.struct_value)
            elif config is not None:
                self.expected(fields["config"], f"{path}.config", "a mapping")
        for name in ("input_schema", "output_schema"):
            if name in fields:
                self.read_schema(fields[name], f"{path}.{name}", getattr(node, name))

    def read_retry(self, node: yaml.Node, path: str, retry: graph_pb2.RetryPolicy) -> None:
        fields = self.mapping(node, path, _RETRY_KEYS, "a retry mapping like {max_attempts: 3}")
        if fields is None:
            return
        retry.CopyFrom(_default_retry())  # keys left out take the Retry defaults
        if "max_attempts" in fields:
            retry.max_attempts = self.uint32(fields["max_attempts"], f"{path}.max_attempts") or 0
        for name in ("initial_backoff", "max_backoff"):
            if name in fields:
                duration = self.duration(fields[name], f"{path}.{name}")
                if duration is not None:
                    getattr(retry, name).CopyFrom(duration)
        if "multiplier" in fields:
            multiplier = self.number(fields["multiplier"])
            if multiplier is None:
                self.expected(fields["multiplier"], f"{path}.multiplier", "a number")
            else:
                retry.backoff_multiplier = float(multiplier)
        if "non_retryable" in fields:
            names = self.sequence(
                fields["non_retryable"], f"{path}.non_retryable", "a list of error types"
            )
            for i, item in enumerate(names):
                text = self.string(item, f"{path}.non_retryable[{i}]", "an error type name")
                if text is not None:
                    retry.non_retryable_error_types.append(text)

    def read_join(self, node: yaml.Node, path: str, join: graph_pb2.JoinPolicy) -> None:
        join.SetInParent()
        expected = "all, any or {quorum: n}"
        if isinstance(node, yaml.ScalarNode):
            mode = self.string(node, path, expected)
            if mode in _JOIN_MODES:
                join.mode = _JOIN_MODES[mode]
            elif mode == "quorum":
                self.error(node, path, "a quorum join needs a count: join: {quorum: 2}")
            elif mode is not None:
                self.expected(node, path, expected)
            return
        if not isinstance(node, yaml.MappingNode):
            self.expected(node, path, expected)
            return
        fields = self.mapping(node, path, ("quorum",), expected)
        join.mode = graph_pb2.JOIN_MODE_QUORUM
        if fields is not None and "quorum" in fields:
            join.quorum = self.uint32(fields["quorum"], f"{path}.quorum") or 0
        elif fields is not None:
            self.error(node, f"{path}.quorum", "missing required key 'quorum'")

    def read_schema(self, node: yaml.Node, path: str, schema: graph_pb2.SchemaRef) -> None:
        schema.SetInParent()
        if isinstance(node, yaml.ScalarNode):
            schema.uri = self.string(node, path, "a schema URI") or ""
            return
        fields = self.mapping(
            node, path, ("uri", "digest"), "a schema URI or {uri: ..., digest: ...}"
        )
        for name, value in (fields or {}).items():
            setattr(schema, name, self.string(value, f"{path}.{name}") or "")

    def read_edge(self, item: yaml.Node, path: str, edge: graph_pb2.Edge) -> None:
        fields = self.mapping(item, path, _EDGE_KEYS, "an edge mapping like {from: a, to: b}")
        if fields is None:
            return
        if "from" not in fields:
            self.error(item, f"{path}.from", "missing required key 'from'")
        else:
            edge.from_node_id = self.string(fields["from"], f"{path}.from", "a node id") or ""
        if "to" in fields:
            edge.to_node_id = self.string(fields["to"], f"{path}.to", "a node id") or ""
        edge.kind = graph_pb2.EDGE_KIND_NORMAL
        if "kind" in fields:
            kind = self.string(fields["kind"], f"{path}.kind", "normal, parallel, join or final")
            if kind in _EDGE_KINDS:
                edge.kind = _EDGE_KINDS[kind]
            elif kind is not None:
                self.expected(fields["kind"], f"{path}.kind", "normal, parallel, join or final")
        if edge.kind != graph_pb2.EDGE_KIND_FINAL and "to" not in fields:
            self.error(item, f"{path}.to", "missing required key 'to' (only final edges have none)")
        if "condition" in fields:
            edge.condition = self.string(fields["condition"], f"{path}.condition") or ""
        if "id" in fields:
            edge.id = self.string(fields["id"], f"{path}.id", "an edge id") or ""
        else:
            edge.id = default_edge_id(edge.from_node_id, edge.to_node_id)

    def config_value(self, node: yaml.Node, path: str, depth: int) -> struct_pb2.Value | None:
        value = struct_pb2.Value()
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and depth > MAX_STRUCT_DEPTH:
            self.error(node, path, f"config nests more than {MAX_STRUCT_DEPTH} levels deep")
            return None
        if isinstance(node, yaml.MappingNode):
            value.struct_value.SetInParent()
            for key, item in (self.mapping(node, path, None, "a mapping") or {}).items():
                child = self.config_value(item, f"{path}.{key}", depth + 1)
                if child is not None:
                    value.struct_value.fields[key].CopyFrom(child)
        elif isinstance(node, yaml.SequenceNode):
            value.list_value.SetInParent()
            for i, item in enumerate(self.sequence(node, path, "a list")):
                child = self.config_value(item, f"{path}[{i}]", depth + 1)
                if child is not None:
                    value.list_value.values.append(child)
        elif not isinstance(node, yaml.ScalarNode):
            return None  # composition makes only mappings, sequences and scalars
        elif node.tag == _NULL:
            value.null_value = struct_pb2.NULL_VALUE
        elif node.tag == _BOOL:
            value.bool_value = _SCALARS.construct_yaml_bool(node)
        elif node.tag in (_INT, _FLOAT):
            number = self.number(node)
            if number is None:
                self.expected(node, path, "a finite number")
                return None
            if node.tag == _INT and abs(number) > _MAX_EXACT_INT:
                self.error(node, path, _BIG_INT)
                return None
            value.number_value = float(number)
        else:  # strings, and timestamps as written
            value.string_value = str(node.value)
        return value


def _position(node: yaml.Node) -> tuple[int, int]:
    return _mark_position(node.start_mark)


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown_key(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if key == "<<":
        hint = " (merge keys are not supported)"
    return f"unknown key {key!r}{hint}; expected one of: {', '.join(allowed)}"


# --- YAML out -----------------------------------------------------------------------------


class _Flow(dict[str, Any]):
    """A mapping written in flow style: ``{from: a, to: b}``."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        # Indent list items under their key, as the documented format does.
        super().increase_indent(flow, False)


def _represent_flow(dumper: yaml.SafeDumper, data: _Flow) -> yaml.Node:
    return dumper.represent_mapping(_MAP, data, flow_style=True)


_Dumper.add_representer(_Flow, _represent_flow)


def _node_to_yaml(node: graph_pb2.Node) -> dict[str, Any]:
    out: dict[str, Any] = {"id": node.id}
    if node.kind in _NODE_KIND_NAMES:
        out["kind"] = _NODE_KIND_NAMES[node.kind]
    if node.handler != node.id:
        out["handler"] = node.handler
    if node.description:
        out["description"] = node.description
    if node.HasField("timeout"):
        out["timeout"] = _duration_to_yaml(node.timeout)
    if node.HasField("retry"):
        out["retry"] = _retry_to_yaml(node.retry)
    if node.max_concurrency:
        out["max_concurrency"] = node.max_concurrency
    if node.HasField("join"):
        join = node.join
        if join.mode == graph_pb2.JOIN_MODE_QUORUM:
            out["join"] = _Flow(quorum=join.quorum)
        elif join.mode == graph_pb2.JOIN_MODE_ANY:
            out["join"] = "any"
        elif node.kind != _PLAN:
            out["join"] = "all"
    if node.HasField("config"):
        out["config"] = {key: _value_to_python(v) for key, v in node.config.fields.items()}
    for name in ("input_schema", "output_schema"):
        if node.HasField(name):
            schema: graph_pb2.SchemaRef = getattr(node, name)
            out[name] = _Flow(uri=schema.uri, digest=schema.digest) if schema.digest else schema.uri
    return out


def _retry_to_yaml(retry: graph_pb2.RetryPolicy) -> _Flow:
    default = _default_retry()
    out = _Flow()
    if retry.max_attempts != default.max_attempts:
        out["max_attempts"] = retry.max_attempts
    for name in ("initial_backoff", "max_backoff"):
        value: duration_pb2.Duration = getattr(retry, name)
        if retry.HasField(name) and value != getattr(default, name):
            out[name] = _duration_to_yaml(value)
    if retry.backoff_multiplier != default.backoff_multiplier:
        multiplier = retry.backoff_multiplier
        out["multiplier"] = int(multiplier) if multiplier.is_integer() else multiplier
    if retry.non_retryable_error_types:
        out["non_retryable"] = list(retry.non_retryable_error_types)
    return out


def _duration_to_yaml(duration: duration_pb2.Duration) -> str:
    nanos = _duration_to_nanos(duration)
    return _format_nanos(nanos if nanos is not None else duration.seconds * _NANOS)


def _edge_to_yaml(edge: graph_pb2.Edge) -> _Flow:
    out = _Flow()
    out["from"] = edge.from_node_id
    final = edge.kind == graph_pb2.EDGE_KIND_FINAL
    if edge.to_node_id or not final:
        out["to"] = edge.to_node_id
    if edge.kind in _EDGE_KIND_NAMES and edge.kind != graph_pb2.EDGE_KIND_NORMAL:
        out["kind"] = _EDGE_KIND_NAMES[edge.kind]
    if edge.condition:
        out["condition"] = edge.condition
    if edge.id != default_edge_id(edge.from_node_id, edge.to_node_id):
        out["id"] = edge.id
    return out
