"""Renders a lifetime's stored executions as a tree with status, timings,
tokens and cost."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from tickmesh.v1 import execution_pb2, lifetime_pb2, result_pb2


@dataclass(frozen=True, slots=True)
class Row:
    execution_id: str
    parents: tuple[str, ...]
    node: str
    kind: str
    handler: str
    iteration: int
    attempt: int
    status: str
    started_ns: int
    duration_ms: float
    tokens: int
    cost_micros: int
    detail: str
    runtime: str = ""


def rows_of(refs: Sequence[execution_pb2.ExecutionRef]) -> list[Row]:
    rows = []
    for ref in refs:
        if ref.HasField("task_execution"):
            record: execution_pb2.TaskExecution | execution_pb2.PlanExecution = ref.task_execution
            result = ref.task_execution.result
            status = result_pb2.TaskStatus.Name(result.status).removeprefix("TASK_STATUS_").lower()
            telemetry = result.telemetry
            detail = result.error.message if result.HasField("error") else ""
        else:
            record = ref.plan_execution
            plan = ref.plan_execution.result
            decision = plan.WhichOneof("decision")
            status = decision or "error"
            telemetry = plan.telemetry
            if decision == "dispatch":
                targets = [s.node_id for s in plan.dispatch.steps]
                detail = f"→ {', '.join(targets)}"
            elif decision == "fail":
                detail = plan.fail.error.message
            elif decision == "wait":
                detail = f"waits for {plan.wait.signal_name!r}"
            else:
                detail = plan.rationale or plan.error.message
        header = record.header
        started = record.started_at.ToNanoseconds()
        finished = record.finished_at.ToNanoseconds()
        rows.append(
            Row(
                execution_id=header.execution_id,
                parents=tuple(header.parent_execution_ids),
                node=header.node.id,
                kind="plan" if ref.HasField("plan_execution") else "task",
                handler=header.node.handler,
                iteration=header.iteration,
                attempt=header.attempt,
                status=status,
                started_ns=started,
                duration_ms=max(0.0, (finished - started) / 1e6),
                tokens=telemetry.input_tokens + telemetry.output_tokens,
                cost_micros=telemetry.cost_micros,
                detail=detail,
                runtime=record.executor.runtime,
            )
        )
    return rows


def render(lifetime: lifetime_pb2.AgentLifetime, refs: Sequence[execution_pb2.ExecutionRef]) -> str:
    rows = rows_of(refs)
    state = lifetime_pb2.LifetimeState.Name(lifetime.state).removeprefix("LIFETIME_STATE_")
    elapsed = ""
    if lifetime.HasField("finished_at") and lifetime.HasField("created_at"):
        seconds = (lifetime.finished_at.ToNanoseconds() - lifetime.created_at.ToNanoseconds()) / 1e9
        elapsed = f" in {seconds:.2f}s"
    tokens = sum(r.tokens for r in rows)
    cost = sum(r.cost_micros for r in rows)
    lines = [
        f"lifetime {lifetime.lifetime_id} {state}{elapsed} — graph {lifetime.graph.id} "
        f"v{lifetime.graph.version}, {len(rows)} executions, {tokens:,} tokens, "
        f"${cost / 1e6:.4f}"
    ]
    if lifetime.HasField("error") and lifetime.error.message:
        lines.append(f"  error: {lifetime.error.message}")
    by_id = {r.execution_id: r for r in rows}
    children: dict[str, list[Row]] = defaultdict(list)
    roots: list[Row] = []
    for row in sorted(rows, key=lambda r: (r.started_ns, r.execution_id)):
        known = [p for p in row.parents if p in by_id]
        if known:
            # A join has several parents; it is drawn under the last to finish.
            parent = max(known, key=lambda p: by_id[p].started_ns + by_id[p].duration_ms * 1e6)
            children[parent].append(row)
        else:
            roots.append(row)

    def walk(row: Row, prefix: str, last: bool) -> None:
        branch = "└─ " if last else "├─ "
        joined = f" (joins {len(row.parents)})" if len(row.parents) > 1 else ""
        attempt = f" attempt {row.attempt}" if row.attempt > 1 else ""
        money = f" ${row.cost_micros / 1e6:.4f}" if row.cost_micros else ""
        tokens = f" {row.tokens:,} tok" if row.tokens else ""
        detail = f"  {row.detail}" if row.detail else ""
        # Python is the default; any other language's executor is named.
        runtime = (
            f" ({row.runtime})" if row.runtime and not row.runtime.startswith("python") else ""
        )
        lines.append(
            f"{prefix}{branch}{row.node} #{row.iteration} [{row.kind} {row.handler}]{runtime} "
            f"{row.status}{attempt} {row.duration_ms:.1f} ms{tokens}{money}{joined}{detail}"
        )
        # Leaves first, so a branch that continues (e.g. into a join) is drawn last.
        kids = sorted(
            children.get(row.execution_id, []),
            key=lambda k: (k.execution_id in children, k.started_ns, k.execution_id),
        )
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("   " if last else "│  "), i == len(kids) - 1)

    for i, root in enumerate(roots):
        walk(root, "", i == len(roots) - 1)
    return "\n".join(lines)
