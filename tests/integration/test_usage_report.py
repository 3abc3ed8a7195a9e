"""Usage reports end to end: ``StateService.GetUsage`` and ``tickmesh usage`` on a running mesh.

Lifetimes of two graphs run on an embedded mesh (in both profiles: SQLite, and
PostgreSQL in the cloud profile) with tasks that report tokens, cost and calls.
Every figure of the report is checked exactly against the sums of the records
``ListExecutions`` returns for those lifetimes; the command runs as a user's
shell would, as a subprocess of the venv's ``tickmesh``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from tests.support.mesh import MeshFactory, MeshHarness
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    dispatch,
    plan,
    step,
    task,
)
from tickmesh.v1 import execution_pb2, graph_pb2, state_service_pb2, state_service_pb2_grpc

SS = state_service_pb2
TICKMESH = Path(sys.executable).with_name("tickmesh")
CLI_TIMEOUT_S = 60.0
FIGURES = (
    "executions",
    "input_tokens",
    "output_tokens",
    "cost_micros",
    "model_calls",
    "tool_calls",
)
Key = tuple[str, int, str, str]  # graph id, graph version, node id, handler


@task
async def usage_draft(ctx: TaskContext, value: Any) -> str:
    text = str(value["text"])
    ctx.report(input_tokens=100 + len(text), output_tokens=40, cost_micros=1_250, model="big")
    ctx.report(tool_calls=1)
    return text.upper()


@task
async def usage_review(ctx: TaskContext, value: Any) -> str:
    ctx.report(input_tokens=30, output_tokens=7 * len(str(value)), cost_micros=333, model="small")
    return "ok"


@plan
async def usage_decide(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    if inputs[-1].node_id == "draft":
        return dispatch(step("review", inputs[-1].output))
    return complete({"review": inputs[-1].output})


@plan
async def usage_done(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    return complete(inputs[-1].output)


def _pair_graph() -> graph_pb2.AgentGraph:
    return (
        GraphBuilder("usage_pair")
        .task("draft", "usage_draft")
        .plan("decide", "usage_decide")
        .task("review", "usage_review")
        .edge("draft", "decide")
        .edge("decide", "review")
        .edge("review", "decide")
        .final("decide")
        .build()
    )


def _solo_graph() -> graph_pb2.AgentGraph:
    return (
        GraphBuilder("usage_solo")
        .task("only", "usage_draft")
        .plan("done", "usage_done")
        .edge("only", "done")
        .final("done")
        .build()
    )


def _record(
    ref: execution_pb2.ExecutionRef,
) -> execution_pb2.TaskExecution | execution_pb2.PlanExecution:
    return ref.task_execution if ref.HasField("task_execution") else ref.plan_execution


def _expected(
    refs: Iterable[execution_pb2.ExecutionRef], *, by_node: bool = True
) -> dict[Key, dict[str, int]]:
    """The report the stored records call for, summed here from ListExecutions."""
    sums: dict[Key, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIGURES, 0))
    for ref in refs:
        record = _record(ref)
        t = record.result.telemetry
        h = record.header
        key = (h.graph.id, h.graph.version, h.node.id, h.node.handler)
        row = sums[key if by_node else (*key[:2], "", "")]
        row["executions"] += 1
        row["input_tokens"] += t.input_tokens
        row["output_tokens"] += t.output_tokens
        row["cost_micros"] += t.cost_micros
        row["model_calls"] += t.model_calls
        row["tool_calls"] += t.tool_calls
    return dict(sums)


def _reported(response: SS.GetUsageResponse) -> dict[Key, dict[str, int]]:
    rows = [(r.graph_id, r.graph_version, r.node_id, r.handler) for r in response.rows]
    assert rows == sorted(rows), "rows come ordered by graph, version, node, handler"
    return {
        (r.graph_id, r.graph_version, r.node_id, r.handler): {
            "executions": r.executions,
            "input_tokens": r.totals.input_tokens,
            "output_tokens": r.totals.output_tokens,
            "cost_micros": r.totals.cost_micros,
            "model_calls": r.totals.model_calls,
            "tool_calls": r.totals.tool_calls,
        }
        for r in response.rows
    }


def _total(rows: dict[Key, dict[str, int]]) -> dict[str, int]:
    return {name: sum(row[name] for row in rows.values()) for name in FIGURES}


async def _get_usage(h: MeshHarness, tenant: str, **fields: Any) -> SS.GetUsageResponse:
    async with grpc.aio.insecure_channel(h.mesh.state_target) as channel:
        stub = state_service_pb2_grpc.StateServiceStub(channel)
        response: SS.GetUsageResponse = await stub.GetUsage(
            SS.GetUsageRequest(**fields),
            metadata=(("x-tickmesh-tenant", tenant),),
            timeout=10,
        )
    return response


async def _tickmesh(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(TICKMESH),
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _run_lifetimes(
    h: MeshHarness, graph: graph_pb2.AgentGraph, texts: Iterable[str]
) -> list[execution_pb2.ExecutionRef]:
    refs: list[execution_pb2.ExecutionRef] = []
    for text in texts:
        handle = await h.start(graph, {"text": text})
        await handle.result(within=20)
        report = await h.audit(handle.id)
        assert report.state == "completed"
        refs.extend(await h.stored(handle.id))
    return refs


async def test_usage_report_matches_the_stored_history(start_mesh: MeshFactory) -> None:
    h = await start_mesh(tenants=2)
    other_tenant = h.tenants[1]
    await h.worker([usage_draft, usage_review, usage_decide, usage_done])
    pair = await h.register(_pair_graph())
    solo = await h.register(_solo_graph())

    early = await _run_lifetimes(h, pair, ["a", "bb"])
    late = [
        *await _run_lifetimes(h, solo, ["ccc"]),
        *await _run_lifetimes(h, pair, ["dddd"]),
    ]
    history = early + late
    assert len(history) == 3 * 4 + 2, "4 steps per pair lifetime, 2 per solo one"

    # By node (the default), by graph, for one graph, and since a point in time.
    by_node = await _get_usage(h, h.tenant)
    assert _reported(by_node) == _expected(history)
    assert {key[2] for key in _expected(history)} == {"draft", "decide", "review", "only", "done"}
    assert (by_node.executions, by_node.totals.cost_micros) == (
        len(history),
        _total(_expected(history))["cost_micros"],
    )
    node_default = await _get_usage(h, h.tenant, group_by=SS.USAGE_GROUPING_NODE)
    assert node_default == by_node

    by_graph = await _get_usage(h, h.tenant, group_by=SS.USAGE_GROUPING_GRAPH)
    assert _reported(by_graph) == _expected(history, by_node=False)
    assert len(by_graph.rows) == 2

    only_pair = await _get_usage(h, h.tenant, graph_id="usage_pair")
    assert _reported(only_pair) == _expected(
        ref for ref in history if _record(ref).header.graph.id == "usage_pair"
    )

    boundary = min(ref.persisted_at.ToDatetime(UTC) for ref in late)
    assert max(ref.persisted_at.ToDatetime(UTC) for ref in early) < boundary
    since_request = SS.GetUsageRequest()
    since_request.since.FromDatetime(boundary)
    recent = await _get_usage(h, h.tenant, since=since_request.since)
    assert _reported(recent) == _expected(late)
    before = await _get_usage(h, h.tenant, until=since_request.since)
    assert _reported(before) == _expected(early)

    # The tenant comes from the caller's metadata: the other tenant saw none of it.
    theirs = await _get_usage(h, other_tenant)
    assert (list(theirs.rows), theirs.executions, theirs.totals.cost_micros) == ([], 0, 0)

    # The command: the same report as JSON, by node and by graph.
    state = h.mesh.state_target
    code, out, err = await _tickmesh("usage", "--state", state, "--tenant", h.tenant, "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["group_by"] == "node"
    cli_rows = {
        (r["graph_id"], r["graph_version"], r["node_id"], r["handler"]): {
            name: r[name] for name in FIGURES
        }
        for r in document["rows"]
    }
    assert cli_rows == _expected(history)
    assert document["total"] == _total(_expected(history))

    code, out, err = await _tickmesh(
        "usage",
        "--state",
        state,
        "--tenant",
        h.tenant,
        "--by",
        "graph",
        "--graph",
        "usage_solo",
        "--json",
    )
    assert code == 0, err
    [solo_row] = json.loads(out)["rows"]
    [expected_solo] = [
        row for key, row in _expected(history, by_node=False).items() if key[0] == "usage_solo"
    ]
    assert solo_row == {"graph_id": "usage_solo", "graph_version": solo.version, **expected_solo}

    since = boundary.isoformat()
    code, out, err = await _tickmesh(
        "usage", "--state", state, "--tenant", h.tenant, "--since", since, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["total"] == _total(_expected(late))

    # The table: one line per node, a rule, and the total.
    code, out, err = await _tickmesh(
        "usage", "--state", state, "--tenant", h.tenant, "--since", "7d"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["GRAPH", "NODE", "STEPS"]
    assert len(lines) == 1 + len(by_node.rows) + 2
    assert lines[-1].split()[:2] == ["TOTAL", str(len(history))]
    total_cost = by_node.totals.cost_micros
    assert f"${total_cost // 1_000_000}.{total_cost % 1_000_000:06d}" in lines[-1]
    assert f"usage_pair v{pair.version}" in out

    # Bad input is refused before any call.
    code, out, err = await _tickmesh("usage", "--state", state, "--since", "last tuesday")
    assert code == 2
    assert "--since" in err
    assert "neither a duration" in err
    now = datetime.now(UTC).isoformat()
    code, out, err = await _tickmesh("usage", "--state", state, "--since", now, "--until", "1h")
    assert code == 2
    assert "is before --since" in err
