"""Graph shapes the end-to-end tests share."""

from __future__ import annotations

from typing import Any

from tickmesh.sdk import GraphBuilder
from tickmesh.v1 import graph_pb2


def plan_task_loop(
    name: str, plan_handler: str, task_handler: str, *, max_iterations: int, **task: Any
) -> graph_pb2.AgentGraph:
    """A plan node and a task node (ids = handlers) in a cycle, the plan final."""
    return (
        GraphBuilder(name, max_iterations=max_iterations)
        .plan(plan_handler)
        .task(task_handler, **task)
        .edge(plan_handler, task_handler)
        .edge(task_handler, plan_handler)
        .final(plan_handler)
        .build()
    )
