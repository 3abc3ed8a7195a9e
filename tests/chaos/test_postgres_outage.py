"""7 PostgreSQL outage through the fault proxy (RELIABILITY.md §4.2), slow_chaos.

The state service runs as a process (the chaos harness) with its store URL pointed at
the fault proxy in front of a PostgreSQL cluster of the test's own. While lifetimes run,
the proxy blackholes PostgreSQL for 5 s; later it resets every connection; later still a
side connection ``pg_terminate_backend``s the state service's sessions. Each time:
records back up in the execution stream (not lost, not acked), the state process stays
up (no crash loop), and once PostgreSQL is reachable the backlog drains. The lifetimes
keep running meanwhile: the router reads the records from the stream, not from the
store. At the end the auditor finds every dispatched execution stored exactly once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.chaos import report
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import Cluster
from tests.chaos.proxy import FaultProxy
from tests.support.audit import AuditReport, audit
from tests.support.postgres import PostgresFactory, start_postgres
from tests.support.records import execution_record
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    TransportError,
    complete,
    dispatch,
    plan,
    step,
    task,
)
from tickmesh.state.postgres import PostgresStateStore

__all__ = ["start_postgres"]  # a fixture these tests use

pytestmark = [pytest.mark.slow_chaos, pytest.mark.timeout(240)]

LIFETIMES: Final = 4
ROUNDS: Final = 150
"""Enough for the lifetimes to outlast the three faults: they keep running through each."""
"""Task rounds per lifetime: 2 * ROUNDS + 1 executions each."""
BLACKHOLE_S: Final = 5.0

progress: list[int] = []


@plan
async def loop(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    done = max((i.output["round"] for i in inputs), default=0)
    if done == ROUNDS:
        return complete({"rounds": done})
    return dispatch(step("work", {"round": done + 1}))


@task
async def work(ctx: TaskContext, job: dict[str, int]) -> dict[str, int]:
    progress.append(job["round"])
    await asyncio.sleep(0.1)
    return job


async def backlog(c: Cluster) -> int:
    """Records waiting for the state service: pending plus delivered-but-unacked."""
    info = await c.consumer_info(c.names.exec_stream, c.names.state_consumer)
    return (info.num_pending or 0) + (info.num_ack_pending or 0)


async def watch_backlog(c: Cluster, seconds: float) -> int:
    """The peak backlog over ``seconds`` (polled every 0.1 s)."""
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, await backlog(c))
        await asyncio.sleep(0.1)
    return peak


async def until_drained(c: Cluster, within: float = 60.0) -> float:
    """Seconds until the state consumer has nothing pending or unacked."""
    began = time.monotonic()
    while await backlog(c):
        if time.monotonic() - began > within:
            raise AssertionError(f"the backlog did not drain within {within} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def more_progress(n: int, within: float = 60.0) -> None:
    target = len(progress) + n
    deadline = time.monotonic() + within
    while len(progress) < target:
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress: {len(progress)} task runs, wanted {target}")
        await asyncio.sleep(0.05)


async def state_health(c: Cluster) -> str:
    """The state service's gRPC health status, by name."""
    async with grpc.aio.insecure_channel(c.state_target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the health stubs are untyped
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def assert_state_up(c: Cluster, pid: int | None) -> None:
    service = c.services["state"]
    assert service.running, f"the state service exited:\n{c.log_tail('state')}"
    assert (service.pid, service.starts) == (pid, 1), "the state service was restarted"


async def test_records_wait_in_the_stream_through_a_postgresql_outage_and_drain_once(
    start_cluster: ClusterFactory,
    start_postgres: PostgresFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress.clear()
    pg = start_postgres()
    dsn = await pg.create_database("state")
    parts = urlsplit(dsn)
    async with FaultProxy("127.0.0.1", pg.port) as proxy:
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
        c = await start_cluster(
            store_url=urlunsplit(parts._replace(netloc=netloc)),
            env={
                "TICKMESH_STATE_STORE_RETRY_S": "2",
                # A blackholed statement times out (and the health turns) within the outage.
                "TICKMESH_STATE_STORE_COMMAND_TIMEOUT_S": "1",
            },
        )
        pid = c.services["state"].pid
        await c.worker([loop, work])
        client = await c.client()
        graph = await client.register_graph(
            GraphBuilder("pg-outage", max_iterations=ROUNDS + 5)
            .plan("loop")
            .task("work")
            .edge("loop", "work")
            .edge("work", "loop")
            .final("loop")
            .build()
        )
        handles = [
            await client.start_lifetime(graph.id, {}, version=graph.version)
            for _ in range(LIFETIMES)
        ]
        figures: list[tuple[str, int, float]] = []

        # 1. Blackhole: connections accepted, nothing forwarded, for BLACKHOLE_S.
        await more_progress(10)
        proxy.set("blackhole")
        runs_before = len(progress)
        peak = await watch_backlog(c, BLACKHOLE_S)
        assert_state_up(c, pid)
        health_in_outage = await state_health(c)
        runs_in_outage = len(progress) - runs_before
        proxy.set("pass")
        figures.append((f"PostgreSQL blackholed {BLACKHOLE_S:g} s", peak, await until_drained(c)))
        # Records wait in the stream while the database is away, and the health says so.
        assert health_in_outage == "NOT_SERVING"
        assert await state_health(c) == "SERVING"
        assert peak > 0, "nothing backed up in the stream during the blackhole"
        assert runs_in_outage > 0, "the lifetimes stopped while the store was away"

        # 2. Every open connection reset at once.
        await more_progress(10)
        proxy.set("blackhole")  # hold the next writes, so the reset hits them in flight
        await asyncio.sleep(0.5)
        peak = await backlog(c)
        proxy.reset_all()
        proxy.set("pass")
        peak = max(peak, await watch_backlog(c, 0.5))
        assert_state_up(c, pid)
        figures.append(("proxy reset_all mid-write", peak, await until_drained(c)))

        # 3. The server ends the state service's sessions (pg_terminate_backend).
        await more_progress(10)
        side = await asyncpg.connect(dsn)
        try:
            ended = await side.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'tickmesh-state' AND pid <> pg_backend_pid()"
            )
        finally:
            await side.close()
        assert ended > 0, "no state service session to terminate"
        peak = await watch_backlog(c, 0.5)
        assert_state_up(c, pid)
        figures.append((f"pg_terminate_backend x{ended}", peak, await until_drained(c)))

        for handle in handles:
            assert await handle.result(within=90) == {"rounds": ROUNDS}
        audits: list[AuditReport] = [
            await audit(c.state_target, c.tenant, h.id, router_target=c.router_target)
            for h in handles
        ]
        assert_state_up(c, pid)

    stored = sum(a.stored for a in audits)
    dispatched = sum(a.dispatched for a in audits)
    duplicates = sum(len(a.duplicates) + len(a.redispatched) for a in audits)
    lost = sum(len(a.lost) for a in audits)
    with capsys.disabled():
        print(  # noqa: T201 - the figures this test measures
            f"\n[7] state service health while PostgreSQL was blackholed: {health_in_outage}; "
            f"{runs_in_outage} steps ran meanwhile"
        )
    for fault, peak, drained_s in figures:
        with capsys.disabled():
            print(  # noqa: T201 - the figures this test measures
                f"\n[7] {fault}: peak backlog {peak} record(s) in the stream; drained "
                f"{drained_s:.2f} s after PostgreSQL was back; state service never restarted"
            )
        report.record(
            report.Row(
                test="7 PostgreSQL outage",
                fault=fault,
                attempted=dispatched,
                acked=dispatched,
                persisted=stored,
                lost=lost,
                duplicated=duplicates,
                recovery_s=drained_s,
                peak_rss_mib=c.peak_rss_mib("state"),
            )
        )
    for a in audits:
        assert a.problems == [], a.summary()
        assert a.stored == a.dispatched == 2 * ROUNDS + 1
    assert lost == duplicates == 0


@pytest.mark.timeout(60)
async def test_a_silently_dropped_postgresql_link_fails_a_call_in_bounded_time(
    start_postgres: PostgresFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blackholed link (packets swallowed, no reset) would hold a statement until the
    kernel gave up on the socket, minutes later; the command timeout drops the connection,
    the store retries on a new one (whose connect is bounded too) and then gives the
    batch back — within its timeouts."""
    pg = start_postgres()
    dsn = await pg.create_database("dropped")
    parts = urlsplit(dsn)
    async with FaultProxy("127.0.0.1", pg.port) as proxy:
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
        store = await PostgresStateStore.open(
            urlunsplit(parts._replace(netloc=netloc)),
            retry_for_s=1.0,
            command_timeout_s=0.5,
        )
        try:
            raw, env = execution_record(1, tenant="t")
            assert not (await store.append_executions("t", [(raw, env)]))[0].duplicate
            proxy.set("blackhole")
            t0 = time.monotonic()
            with pytest.raises(TransportError, match="unreachable"):
                await store.append_executions("t", [execution_record(2, tenant="t")])
            took = time.monotonic() - t0
        finally:
            proxy.set("pass")
            await store.close()
    with capsys.disabled():
        print(  # noqa: T201 - the figure this test is about
            f"\n[7] blackholed PostgreSQL link: the call failed after {took:.1f} s "
            "(command timeout 0.5 s, then one reconnect bounded by the 10 s connect timeout), "
            "instead of hanging"
        )
    assert took < 0.5 + 10.0 + 3.0
