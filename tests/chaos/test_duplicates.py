"""★ 3. Duplicate publishes (RELIABILITY.md §4.2): JetStream's dedup is windowed, the store
and the router are not.

A lifetime (a task, then a plan) runs to completion with the records and refs streams'
``duplicate_window`` cut to 1 s; the test keeps the exact record message the pool
published. Past the window it publishes that record again twice, back to back with the
same ``Nats-Msg-Id``: the first lands (a second stream message for that id), the second
is a duplicate inside the window (``PubAck.duplicate``, no new stream message). Both
readers of the record stream take the republished record: the state service stores
nothing new (and publishes no ref: the router reads the record itself), the router
applies nothing new: still one row per execution, no step dispatched again, no new work
request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from tests.chaos import report
from tests.chaos.auditor import audit_lifetime
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import Cluster, figure
from tickmesh.runtime.subjects import HDR_MSG_ID
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

WINDOW_S = 1.0


async def _shorten_window(cluster: Cluster, stream: str) -> None:
    info = await cluster.js.stream_info(stream)
    config: StreamConfig = info.config
    config.duplicate_window = WINDOW_S
    await cluster.js.update_stream(config)


async def test_a_record_published_again_is_stored_once_and_dispatches_nothing(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster()
    names = cluster.names
    for stream in (names.exec_stream, names.ref_stream):
        await _shorten_window(cluster, stream)
    runs: list[int] = []

    @task
    async def work(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
        runs.append(ctx.attempt)
        return job

    @plan
    async def finish(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return complete(inputs[0].output)

    published: list[Msg] = []

    async def keep(msg: Msg) -> None:
        if msg.headers and msg.headers.get("Tickmesh-Type") == "task_execution":
            published.append(msg)

    assert cluster.nc is not None
    sub = await cluster.nc.subscribe(names.exec_all, cb=keep)
    await cluster.worker([work, finish])
    client = await cluster.client()
    graph = await client.register_graph(
        GraphBuilder("dup")
        .task("work")
        .plan("finish")
        .edge("work", "finish")
        .final("finish")
        .build()
    )
    handle = await client.start_lifetime(graph.id, {"n": 1}, version=graph.version)
    assert await handle.result(within=20) == {"n": 1}
    await cluster.wait_quiet()
    await sub.unsubscribe()
    [record] = published
    msg_id = (record.headers or {})[HDR_MSG_ID]

    exec_before = (await cluster.js.stream_info(names.exec_stream)).state.last_seq
    work_before = (await cluster.js.stream_info(names.work_stream)).state.last_seq
    ref_before = (await cluster.js.stream_info(names.ref_stream)).state.last_seq
    await asyncio.sleep(WINDOW_S + 1.0)  # past the window of the pool's publish
    loop = asyncio.get_running_loop()
    began = loop.time()
    acks = [
        await cluster.js.publish(record.subject, record.data, headers=dict(record.headers or {}))
        for _ in range(2)
    ]
    exec_after = (await cluster.js.stream_info(names.exec_stream)).state.last_seq
    settled_s = await cluster.wait_quiet()
    await asyncio.sleep(0.5)  # a wrong dispatch would have had time to show
    work_after = (await cluster.js.stream_info(names.work_stream)).state.last_seq
    ref_after = (await cluster.js.stream_info(names.ref_stream)).state.last_seq
    found = await audit_lifetime(
        cluster.state_target, cluster.tenant, handle.id, router_target=cluster.router_target
    )

    figure(
        f"3 duplicate publish ({msg_id}, window {WINDOW_S:g} s): PubAck.duplicate "
        f"{[a.duplicate for a in acks]}; records stream +{exec_after - exec_before} messages; "
        f"{found.summary()}; refs +{ref_after - ref_before}, "
        f"work requests +{work_after - work_before}; "
        f"handler runs {runs}; settled in {settled_s:.2f} s"
    )
    report.record(
        report.Row(
            test="3 duplicate publish",
            fault=f"same Nats-Msg-Id x2 after a {WINDOW_S:g} s window",
            attempted=3,
            acked=3,
            persisted=found.by_node["work"],
            lost=len(found.lost),
            duplicated=len(found.duplicates),
            recovery_s=loop.time() - began,
            peak_rss_mib=cluster.peak_rss_mib(),
        )
    )
    assert [bool(a.duplicate) for a in acks] == [False, True]
    assert exec_after - exec_before == 1, "only the first republish is a new stream message"
    assert dict(found.by_node) == {"work": 1, "finish": 1}
    assert found.dispatched == 2
    assert not found.redispatched
    assert ref_after == ref_before, "a record from the bus needs no ref"
    assert work_after == work_before, "the republished record dispatched new work"
    assert runs == [1]
