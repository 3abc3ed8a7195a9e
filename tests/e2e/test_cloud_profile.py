"""The cloud profile through a PostgreSQL restart: the lifetime completes, nothing lost or doubled.

The state store rides out a short outage by retrying inside the store; a longer one
(past ``store_retry_s``) fails the batch, which goes back to JetStream and is
redelivered once the server is back. Both paths are driven here against a
PostgreSQL cluster of the test's own, stopped and started mid-lifetime.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.mesh import MeshFactory, cloud_profile
from tests.support.postgres import PostgresFactory
from tests.support.s3_server import S3Bucket
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

ROUNDS = 15
"""Plan/task rounds of the looping lifetime: 2 * ROUNDS + 1 executions."""


@pytest.fixture
def mesh_profile(
    s3_bucket: S3Bucket, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Cloud only; each test passes the store URL of its own PostgreSQL cluster."""
    return cloud_profile(None, s3_bucket, redis_url, monkeypatch)


@pytest.mark.parametrize(
    ("outage_s", "store_retry_s"),
    [(2.0, 30.0), (4.0, 0.5)],
    ids=["retried-in-the-store", "redelivered-by-jetstream"],
)
async def test_a_lifetime_completes_across_a_postgresql_restart_with_every_execution_stored_once(
    start_mesh: MeshFactory,
    start_postgres: PostgresFactory,
    outage_s: float,
    store_retry_s: float,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pg = start_postgres()
    dsn = await pg.create_database("state")
    h = await start_mesh(store_url=dsn, store_retry_s=store_retry_s)
    underway = asyncio.Event()

    @plan
    async def loop(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        done = max((i.output["round"] for i in inputs), default=0)
        if done == ROUNDS:
            return complete({"rounds": done})
        return dispatch(step("work", {"round": done + 1}))

    @task
    async def work(ctx: TaskContext, job: dict[str, int]) -> dict[str, int]:
        if job["round"] == 4:
            underway.set()
        await asyncio.sleep(0.05)
        return job

    await h.worker([loop, work])
    graph = await h.register(
        GraphBuilder("pg-restart", max_iterations=ROUNDS + 5)
        .plan("loop")
        .task("work")
        .edge("loop", "work")
        .edge("work", "loop")
        .final("loop")
        .build()
    )
    handle = await h.start(graph, {})

    # Let a few rounds reach the store, then take PostgreSQL away mid-lifetime.
    async with asyncio.timeout(20):
        await underway.wait()
    await asyncio.to_thread(pg.stop, "immediate")
    stopped_at = time.monotonic()
    await asyncio.sleep(outage_s)
    await asyncio.to_thread(pg.start)
    restarted_in = time.monotonic() - stopped_at

    assert await handle.result(within=60) == {"rounds": ROUNDS}
    finished_in = time.monotonic() - stopped_at
    report = await h.audit(handle.id)
    with capsys.disabled():
        print(  # noqa: T201 - the recovery time is a figure worth seeing
            f"\nPostgreSQL down {restarted_in:.1f} s (store retry {store_retry_s:g} s): lifetime "
            f"finished {finished_in:.1f} s after the stop; {report.stored} executions stored"
        )
    # The rounds left take well under the outage: finishing after it shows the lifetime
    # really waited for the store rather than running past it.
    assert finished_in > outage_s
    assert report.problems == []
    assert report.duplicates == []
    assert report.lost == []
    assert report.by_node == {"loop": ROUNDS + 1, "work": ROUNDS}
    assert report.stored == report.dispatched == 2 * ROUNDS + 1
