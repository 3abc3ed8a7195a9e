"""★ 6. Poison work is dead-lettered, and work behind it keeps flowing (RELIABILITY.md §4.2).

* A handler that always raises: tried as the graph's retry policy says (3 attempts,
  backoff 0.1 s .. 0.4 s), then its request is copied to the dead-letter stream with the
  error and the attempt (delivery) count, the failed attempt is recorded, and the
  lifetime ends with the failure; lifetimes started meanwhile complete, unblocked.
* An undecodable request on a work subject: dead-lettered with its reason and
  ``+TERM``ed (a MSG_TERMINATED advisory with the reason), never handed to an executor.

Either way the work stream ends empty. Figure: first delivery → dead letter.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.msg import Msg

from tests.chaos import report
from tests.chaos.auditor import audit_lifetime
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import figure
from tests.support.audit import record_of, task_status
from tickmesh.runtime.subjects import HDR_ATTEMPT, HDR_REASON, HDR_TYPE
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    Retry,
    TaskContext,
    TaskError,
    complete,
    decode_envelope,
    plan,
    task,
)

HEALTHY = 10
"""Lifetimes started right behind the poisoned one."""


async def test_poison_work_is_dead_lettered_and_later_lifetimes_keep_flowing(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster()
    names = cluster.names
    loop = asyncio.get_running_loop()
    attempts: list[tuple[int, float]] = []

    @task
    async def poison(ctx: TaskContext, job: Any) -> None:
        attempts.append((ctx.attempt, loop.time()))
        raise TaskError("poisoned input", retryable=True)

    @task
    async def work(ctx: TaskContext, job: Any) -> Any:
        return job

    @plan
    async def judge(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        result = inputs[0]
        return complete({"status": result.status, "error": result.error_message})

    letters: list[tuple[Msg, float]] = []
    advisories: list[dict[str, Any]] = []

    async def on_letter(msg: Msg) -> None:
        letters.append((msg, loop.time()))

    async def on_advisory(msg: Msg) -> None:
        advisories.append(json.loads(msg.data))

    assert cluster.nc is not None
    await cluster.nc.subscribe(names.dlq("work"), cb=on_letter)
    await cluster.nc.subscribe(
        f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{names.work_stream}.>", cb=on_advisory
    )
    await cluster.worker([poison, work, judge])
    client = await cluster.client()
    poisoned = await client.register_graph(
        GraphBuilder("poison")
        .task("poison", retry=Retry(max_attempts=3, initial_backoff=0.1, max_backoff=0.4))
        .plan("judge")
        .edge("poison", "judge")
        .final("judge")
        .build()
    )
    healthy = await client.register_graph(
        GraphBuilder("healthy")
        .task("work")
        .plan("judge")
        .edge("work", "judge")
        .final("judge")
        .build()
    )

    bad = await client.start_lifetime(poisoned.id, {"x": 1}, version=poisoned.version)
    began = loop.time()
    good = [
        await client.start_lifetime(healthy.id, {"i": i}, version=healthy.version)
        for i in range(HEALTHY)
    ]
    outputs = await asyncio.gather(*(h.result(within=20) for h in good))
    healthy_s = loop.time() - began
    assert await bad.result(within=20) == {"status": "failed", "error": "poisoned input"}
    found = await audit_lifetime(
        cluster.state_target, cluster.tenant, bad.id, router_target=cluster.router_target
    )
    await cluster.wait_quiet()

    # An undecodable request on the work subject the pool consumes for `work`.
    await cluster.js.publish(
        names.work("task", "work"), b"\x00not an envelope", headers={HDR_TYPE: "task_request"}
    )
    async with asyncio.timeout(10):
        while len(letters) < 2 or not advisories:  # noqa: ASYNC110 - callbacks fill these
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    work_left = (await cluster.js.stream_info(names.work_stream)).state.messages

    [(letter, lettered_at), (malformed, _)] = letters
    headers = letter.headers or {}
    request = decode_envelope(letter.data, expected_kind="task_request")
    [stored] = found.of_node("poison")
    to_dead_letter_s = lettered_at - attempts[0][1]
    figure(
        f"6 poison: attempts {[a for a, _ in attempts]}, first delivery -> dead letter "
        f"{to_dead_letter_s:.2f} s; reason {headers.get(HDR_REASON)!r}, attempt header "
        f"{headers.get(HDR_ATTEMPT)}; {HEALTHY} lifetimes behind it done in {healthy_s:.2f} s; "
        f"malformed request: reason {(malformed.headers or {}).get(HDR_REASON)!r}, "
        f"advisories {len(advisories)}; work stream left {work_left}"
    )
    report.record(
        report.Row(
            test="6 poison -> dead letter",
            fault="handler always raises (3 attempts) + 1 undecodable request",
            attempted=1 + HEALTHY + 1,
            acked=1 + HEALTHY + 1,
            persisted=len([o for o in outputs if o["status"] == "succeeded"]) + len(found.records),
            lost=len(found.lost),
            duplicated=len(found.duplicates),
            recovery_s=to_dead_letter_s,
            peak_rss_mib=cluster.peak_rss_mib(),
        )
    )
    assert [a for a, _ in attempts] == [1, 2, 3]
    assert "poisoned input" in headers[HDR_REASON]
    assert headers[HDR_ATTEMPT] == "3"
    assert request.header.execution_id == record_of(stored).header.execution_id
    assert record_of(stored).header.attempt == 3
    assert task_status(stored) == "failed"
    assert all(o == {"status": "succeeded", "error": ""} for o in outputs), outputs
    assert (malformed.headers or {}).get(HDR_REASON)
    [advisory] = advisories
    assert advisory.get("reason"), advisory
    assert work_left == 0
