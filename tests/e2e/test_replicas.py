"""Two router replicas on one tenant: every step is dispatched exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from tests.support.mesh import MeshFactory
from tickmesh.router import server as router_server
from tickmesh.router.config import RouterSettings
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.consumer import message_type
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    decisions_of,
    decode_envelope,
    dispatch,
    events_of,
    plan,
    step,
    task,
)
from tickmesh.v1 import lifetime_pb2

LIFETIMES = 20
BRANCHES = 5
ROUNDS = 2


async def test_two_router_replicas_dispatch_every_step_exactly_once(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()

    @plan
    async def lead(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        done = max((i.output["round"] for i in inputs), default=0)
        if done == ROUNDS:
            return complete({"rounds": done, "parts": len(inputs)})
        return dispatch(*(step("part", {"round": done + 1, "i": i}) for i in range(BRANCHES)))

    @task
    async def part(ctx: TaskContext, job: dict[str, int]) -> dict[str, int]:
        await asyncio.sleep(0.001 * job["i"])
        return job

    graph = await h.register(
        GraphBuilder("replicas")
        .plan("lead")
        .task("part")
        .edge("lead", "part", "parallel")
        .edge("part", "lead", "join")
        .final("lead")
        .build()
    )
    await h.worker([lead, part], concurrency=32)

    nc = await tm_nats.connect(h.mesh.nats_url, name="router-b")
    second = await router_server.build(
        RouterSettings(
            nats_url=h.mesh.nats_url,
            tenants=[h.tenant],
            grpc_listen="127.0.0.1:0",
            instance="router-b",
            state_target=h.mesh.state_target,  # where its watches read a history
            log_json=False,
        ),
        nc=nc,
    )
    await second.start()
    try:
        async with await Client.connect(second.target, tenant=h.tenant) as other:
            clients = [h.client, other]
            handles = await asyncio.gather(
                *(
                    clients[n % 2].start_lifetime(graph.id, {"n": n}, version=graph.version)
                    for n in range(LIFETIMES)
                )
            )
            outputs = await asyncio.gather(*(handle.result(within=30) for handle in handles))
    finally:
        await second.stop()
        await nc.close()

    assert outputs == [{"rounds": ROUNDS, "parts": BRANCHES}] * LIFETIMES
    steps_per_lifetime = (ROUNDS + 1) + ROUNDS * BRANCHES
    dispatched = 0
    for handle in handles:
        report = await h.audit(handle.id)
        assert report.by_node == {"lead": ROUNDS + 1, "part": ROUNDS * BRANCHES}
        per_id = Counter(e.execution_id for e in report.events_of("step_dispatched"))
        assert set(per_id.values()) == {1}, per_id
        dispatched += report.dispatched
    assert dispatched == LIFETIMES * steps_per_lifetime
    # The work queue forgets acked requests, but its sequence counts every request it
    # ever stored: one per dispatched step, so none was stored twice.
    assert await h.stream_last_seq(h.names.work_stream) == dispatched

    # Both replicas routed refs: events carry the instance of the router that wrote them.
    # (Each event once: a decision published again, in another batch, is stored once.)
    finished_by: Counter[str] = Counter()
    seen: set[tuple[str, int]] = set()
    for msg in await h.stream_messages(h.names.evt_stream, h.names.evb):
        for decision in decisions_of(decode_envelope(msg.data, expected_kind=message_type(msg))):
            for event in events_of(decision):
                key = (decision.header.lifetime_id, event.sequence)
                if event.kind == lifetime_pb2.LIFETIME_EVENT_KIND_STEP_FINISHED and key not in seen:
                    seen.add(key)
                    finished_by[decision.header.producer.instance] += 1
    assert sum(finished_by.values()) == dispatched
    assert "router-b" in finished_by, finished_by
    assert len(finished_by) == 2, finished_by
