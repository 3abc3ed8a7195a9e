"""★ 2. Crash points at every durability boundary (RELIABILITY.md §4.2).

For each named point, the service that owns it is restarted with
``TICKMESH_CRASH_AT=<point>``, one lifetime (a task, then a plan) is started, the
service exits with 137 at the point, and it is started again without the crash
point. The lifetime must then complete with exactly one stored record per
execution, every dispatched step stored, and no step dispatched twice: a record
redelivered after ``after_store_commit`` hits the store's "already stored" path.
The router reads the same records from the record stream while the state service is
down, so a crash there must not stall the lifetime either. (``after_republish`` is
reached only by appends through the state API, which this lifetime does not use.)
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from tests.chaos import report
from tests.chaos.auditor import audit_lifetime
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import ServiceName, figure
from tests.support.audit import list_executions, record_of
from tickmesh.runtime.crash import EXIT_STATUS
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    plan,
    task,
)

INLINE_LIMIT = 1024
"""The pool's inline limit here, so that the task's output is offloaded to a blob."""

POINTS: tuple[tuple[str, ServiceName], ...] = (
    ("after_store_commit", "state"),
    ("before_ack", "state"),
    ("router_after_dispatch_before_ack", "router"),
    ("pool_after_blob_put", "executor-pool"),
    ("pool_after_record_publish", "executor-pool"),
)

KNOWN_FAILURES: dict[str, str] = {}
"""Points whose case fails today, with why: the test xfails on them (and fails if one
starts passing, so the entry is removed with the fix)."""


async def test_each_crash_point_leaves_one_record_per_execution_and_no_duplicate_step(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster(ack_wait_s=1.0)
    pool_env = {"TICKMESH_EXECUTOR_POOL_INLINE_LIMIT": str(INLINE_LIMIT)}
    await cluster.restart("executor-pool", env=pool_env)
    runs: dict[str, list[int]] = {}

    @task
    async def work(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
        runs.setdefault(job["point"], []).append(ctx.attempt)
        return {"point": job["point"], "padding": "x" * (2 * INLINE_LIMIT)}

    @plan
    async def finish(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return complete({"point": inputs[0].output["point"], "status": inputs[0].status})

    await cluster.worker([work, finish])
    client = await cluster.client()
    graph = await client.register_graph(
        GraphBuilder("crash-points")
        .task("work", timeout=30)
        .plan("finish")
        .edge("work", "finish")
        .final("finish")
        .build()
    )
    failures: list[str] = []
    for point, service in POINTS:
        loop = asyncio.get_running_loop()
        # Nothing in flight: the crash must come from this point's lifetime.
        quiet_s = await cluster.wait_quiet()
        armed = {"TICKMESH_CRASH_AT": point, **(pool_env if service == "executor-pool" else {})}
        armed_s = await cluster.restart(service, env=armed)
        if service == "executor-pool":
            await _wait_reconnected(cluster)
        handle = await client.start_lifetime(graph.id, {"point": point}, version=graph.version)
        code = await cluster.wait_exit(service, within=30)
        crashed_at = loop.time()
        restart_s = await cluster.start_service(
            service, env=pool_env if service == "executor-pool" else None
        )
        try:
            found = await audit_lifetime(
                cluster.state_target,
                cluster.tenant,
                handle.id,
                router_target=cluster.router_target,
                settle_s=12,
            )
        except AssertionError as exc:
            failures.append(f"{point}: {exc}")
            stored = await list_executions(cluster.state_target, cluster.tenant, handle.id)
            per_id = Counter(record_of(r).header.execution_id for r in stored)
            figure(f"2 crash point {point} ({service} exit {code}): FAILED {exc}")
            report.record(
                report.Row(
                    test="2 crash point",
                    fault=f"{point} ({service}) [known failure]",
                    attempted=len(per_id),
                    acked=len(per_id),
                    persisted=len(per_id),
                    lost=0,
                    duplicated=sum(n - 1 for n in per_id.values()),
                    peak_rss_mib=cluster.peak_rss_mib(),
                )
            )
            continue
        recovery = loop.time() - crashed_at
        per_execution = found.by_node
        output = found.info.raw
        figure(
            f"2 crash point {point} ({service} exit {code}): {found.summary()}; "
            f"handler runs {runs.get(point)}; recovery {recovery:.2f}s "
            f"(quiet {quiet_s:.2f}s, armed start {armed_s:.2f}s, restart {restart_s:.2f}s)"
        )
        report.record(
            report.Row(
                test="2 crash point",
                fault=f"{point} ({service})",
                attempted=found.dispatched,
                acked=found.dispatched,
                persisted=found.stored,
                lost=len(found.lost),
                duplicated=len(found.duplicates),
                recovery_s=recovery,
                peak_rss_mib=cluster.peak_rss_mib(),
            )
        )
        if code != EXIT_STATUS:
            failures.append(f"{point}: {service} exited {code}, not {EXIT_STATUS}")
        if found.state != "completed":
            failures.append(f"{point}: lifetime {found.state} ({output.error})")
        if dict(per_execution) != {"work": 1, "finish": 1}:
            failures.append(f"{point}: stored per node {dict(per_execution)}")
        ids = [record_of(r).header.execution_id for r in found.records]
        if len(ids) != len(set(ids)):
            failures.append(f"{point}: an execution stored twice: {ids}")
    known = [f for f in failures if f.split(":", 1)[0] in KNOWN_FAILURES]
    unexpected = [f for f in failures if f not in known]
    assert not unexpected, "\n".join(unexpected)
    fixed = set(KNOWN_FAILURES) - {f.split(":", 1)[0] for f in known}
    assert not fixed, f"now passing, remove from KNOWN_FAILURES: {sorted(fixed)}"
    if known:
        pytest.xfail("; ".join(f"{p}: {KNOWN_FAILURES[p]}" for p in KNOWN_FAILURES))


async def _wait_reconnected(cluster: Any, within: float = 15.0) -> None:
    """Wait until every worker is connected to the (restarted) pool again."""
    async with asyncio.timeout(within):
        for worker in cluster.workers:
            await worker.wait_connected()
