"""Graph definitions in requests: compile (YAML or proto), validate, digest."""

from __future__ import annotations

from collections.abc import Sequence

from tickmesh.sdk import Issue, ValidationError, graph_digest, load_graph_yaml, validate_graph
from tickmesh.v1 import graph_pb2, validation_pb2
from tickmesh.v1 import router_service_pb2 as pb

Definition = pb.RegisterGraphRequest | pb.ValidateGraphRequest


def compile_definition(request: Definition) -> graph_pb2.AgentGraph:
    """Return the validated graph with its digest (version 0).

    Raises:
        ValidationError: With every issue found (file, line, field).
    """
    kind = request.WhichOneof("definition")
    if kind == "yaml_source":
        return load_graph_yaml(request.yaml_source, source="request")
    if kind != "graph":
        raise ValidationError("the request carries no graph: set graph or yaml_source")
    graph = graph_pb2.AgentGraph()
    graph.CopyFrom(request.graph)
    graph.version = 0
    graph.digest = ""
    issues = validate_graph(graph)
    if issues:
        raise ValidationError(f"graph {graph.id!r} is invalid", issues)
    graph.digest = graph_digest(graph)
    return graph


def validate_definition(request: Definition) -> tuple[graph_pb2.AgentGraph | None, list[Issue]]:
    try:
        return compile_definition(request), []
    except ValidationError as exc:
        return None, list(exc.issues) or [Issue(message=str(exc))]


def issues_to_proto(issues: Sequence[Issue]) -> list[validation_pb2.ValidationIssue]:
    return [
        validation_pb2.ValidationIssue(
            source=i.source, line=i.line, column=i.column, field=i.field, message=i.message
        )
        for i in issues
    ]
