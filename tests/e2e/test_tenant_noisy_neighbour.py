"""A tenant at its limits does not slow another: B's step latency with A exhausted.

One set of services serves tenants a and b, each through its own account
(``nats_tenant_dir``). A's storage is filled to its account limit; then B runs the same
workload in alternate phases: alone (A idle), and while A hammers its full storage —
publishes refused by JetStream, and StartLifetime calls whose state cannot be written,
each answered RESOURCE_EXHAUSTED. B's per-step orchestration gap (a step finished → the
next one started, from the recorded timestamps), pooled over the phases of each kind,
must keep its p99 within 2x of the alone phases'. (Alternate phases, so a spell of the
machine running slow lands on both sides; pooled, so a p99 rests on some ten gaps
rather than two.)
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import APIError

from tests.support.nats_configs import NatsServers
from tests.support.tenant_accounts import AccountsServer, login, provision, start_accounts_server
from tests.support.tenant_services import Services
from tickmesh.runtime.subjects import HDR_TYPE, TenantNames
from tickmesh.runtime.tenancy import SERVICE, Limits
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    RPCError,
    TaskContext,
    TickmeshError,
    Worker,
    complete,
    dispatch,
    plan,
    step,
    task,
)
from tickmesh.v1 import envelope_pb2

ROUNDS = 25  # plan -> task rounds per lifetime: 50 steps, 49 gaps
LIFETIMES = 4  # at once, per phase
PHASES = 4  # of each kind, alternately: alone, with a hammering
A_STORAGE = 2 << 20


@plan(name="nn_loop")
async def nn_loop(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    done = ctx.iteration - 1
    if done >= goal["rounds"]:
        return complete({"rounds": done})
    return dispatch(step("work", done + 1))


@task(name="nn_work")
async def nn_work(ctx: TaskContext, n: int) -> int:
    return n


GRAPH = (
    GraphBuilder("noisy", max_iterations=ROUNDS + 2)
    .plan("loop", handler="nn_loop")
    .task("work", handler="nn_work")
    .edge("loop", "work")
    .edge("work", "loop")
    .final("loop")
    .build()
)


@pytest.fixture
async def accounts(servers: NatsServers, tmp_path: Path) -> AccountsServer:
    server = start_accounts_server(
        servers, tmp_path, {"a": Limits(max_storage=A_STORAGE), "b": Limits()}
    )
    for tenant in ("a", "b"):
        await provision(server, tenant)
    return server


@pytest.fixture
async def services(accounts: AccountsServer, tmp_path: Path) -> AsyncIterator[Services]:
    running = Services(accounts, tmp_path / "mesh")
    running.root.mkdir()
    try:
        yield running
    finally:
        await running.stop()


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def _gaps(services: Services, tenant: str, lifetime_ids: list[str]) -> list[float]:
    """Step finished → next step started, in ms, over the lifetimes' stored records."""
    assert services.store is not None
    assert services.state is not None
    # The router decides on a record before the store has it: wait for the store.
    assert await services.state.consumer(tenant).caught_up()
    gaps: list[float] = []
    for lifetime_id in lifetime_ids:
        rows = await services.store.list_executions(tenant, lifetime_id, limit=1000)
        records = {}
        for row in rows:
            env = envelope_pb2.ExecutionEnvelope.FromString(row.envelope)
            body = env.task_execution if env.HasField("task_execution") else env.plan_execution
            records[body.header.execution_id] = body
        assert len(records) == 2 * ROUNDS + 1
        for child in records.values():
            for parent_id in child.header.parent_execution_ids:
                parent = records[parent_id]
                gaps.append(
                    (child.started_at.ToNanoseconds() - parent.finished_at.ToNanoseconds()) / 1e6
                )
    return gaps


async def _b_workload(client: Client, graph_id: str) -> list[str]:
    handles = await asyncio.gather(
        *(client.start_lifetime(graph_id, {"rounds": ROUNDS}) for _ in range(LIFETIMES))
    )
    results = await asyncio.gather(*(h.result(within=60) for h in handles))
    assert results == [{"rounds": ROUNDS}] * LIFETIMES
    return [h.id for h in handles]


async def _fill(accounts: AccountsServer) -> int:
    """Fill a's storage until JetStream refuses even the smallest write: 64 KiB messages,
    then 1 KiB, then 64 bytes. Returns how many bytes of payload fit."""
    a = TenantNames("a")
    stored = 0
    refusals: list[APIError] = []
    async with login(accounts.url, nkeys_seed=str(accounts.seed("a", SERVICE))) as user:
        for size in (64 << 10, 1 << 10, 64):
            for _ in range(4 * A_STORAGE // size):
                try:
                    await user.js.publish(a.dlq("flood"), b"x" * size, headers={HDR_TYPE: "f"})
                except APIError as exc:
                    refusals.append(exc)
                    break
                stored += size
    assert [e.err_code for e in refusals] == [10002] * 3, refusals  # resource limits exceeded
    return stored


async def _hammer(
    accounts: AccountsServer,
    client_a: Client,
    graph_id: str,
    counts: dict[str, int],
    refusals: set[str],
    stop: asyncio.Event,
) -> None:
    """What a tenant stuck at its limits keeps doing, until ``stop``: publishing, and
    starting lifetimes. (Stopped by an event, not by cancelling it: a cancellation that
    lands inside a refused call can come back as the call's error and be counted as one
    more refusal, and the loop would go on.)"""
    a = TenantNames("a")
    async with login(accounts.url, nkeys_seed=str(accounts.seed("a", SERVICE))) as user:
        while not stop.is_set():
            try:
                await user.js.publish(a.dlq("flood"), b"x" * 4096, headers={HDR_TYPE: "flood"})
            except APIError:
                counts["publishes_refused"] += 1
            try:
                await client_a.start_lifetime(graph_id, {"rounds": ROUNDS})
                counts["starts_accepted"] += 1
            except TickmeshError as exc:
                counts["starts_refused"] += 1
                refusals.add(exc.status.name if isinstance(exc, RPCError) else repr(exc))
            await asyncio.sleep(0.01)


async def test_a_tenant_at_its_limits_leaves_the_others_latency_alone(
    accounts: AccountsServer, services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    await services.start_all()
    assert services.router is not None
    assert services.pool is not None
    router, pool = services.router.target, services.pool.target
    async with (
        await Client.connect(router, tenant="a") as client_a,
        await Client.connect(router, tenant="b") as client_b,
        Worker(pool, tenant="a", tasks=[nn_loop, nn_work]) as worker_a,
        Worker(pool, tenant="b", tasks=[nn_loop, nn_work]) as worker_b,
    ):
        await worker_a.wait_connected()
        await worker_b.wait_connected()
        graph_a = await client_a.register_graph(GRAPH)
        graph_b = await client_b.register_graph(GRAPH)
        await _b_workload(client_b, graph_b.id)  # warm-up: caches, consumers, connections

        fitted = await _fill(accounts)
        counts = {"publishes_refused": 0, "starts_refused": 0, "starts_accepted": 0}
        refusals: set[str] = set()
        solo: list[float] = []
        noisy: list[float] = []
        solo_p99s: list[float] = []
        noisy_p99s: list[float] = []
        for _ in range(PHASES):
            gaps = await _gaps(services, "b", await _b_workload(client_b, graph_b.id))
            solo += gaps
            solo_p99s.append(_p99(gaps))
            stop = asyncio.Event()
            hammer = asyncio.create_task(
                _hammer(accounts, client_a, graph_a.id, counts, refusals, stop)
            )
            try:
                await asyncio.sleep(0.3)  # a is refused everywhere by now
                gaps = await _gaps(services, "b", await _b_workload(client_b, graph_b.id))
                noisy += gaps
                noisy_p99s.append(_p99(gaps))
            finally:
                stop.set()
                try:
                    await asyncio.wait_for(hammer, 30)
                except TimeoutError:  # stuck in a call: cancelling it is all that is left
                    with contextlib.suppress(asyncio.CancelledError):
                        await hammer

    solo_p99, noisy_p99 = _p99(solo), _p99(noisy)
    with capsys.disabled():
        print(  # noqa: T201 - the figure this test is about
            f"\nnoisy neighbour: a's storage full after {fitted >> 10} KiB; b's step gap "
            f"p50/p99 solo {statistics.median(solo):.1f}/{solo_p99:.1f} ms, with a at its "
            f"limits {statistics.median(noisy):.1f}/{noisy_p99:.1f} ms "
            f"({noisy_p99 / solo_p99:.2f}x; {len(noisy)} gaps); phase by phase, p99 alone "
            f"{' '.join(f'{v:.1f}' for v in solo_p99s)}, with a "
            f"{' '.join(f'{v:.1f}' for v in noisy_p99s)} ms; meanwhile a was refused "
            f"{counts['publishes_refused']} publishes and {counts['starts_refused']} starts "
            f"({', '.join(sorted(refusals))})"
        )
    assert fitted > 0
    # a really was at its limits the whole time: every write refused
    assert counts["publishes_refused"] > 10
    assert counts["starts_refused"] > 10
    assert counts["starts_accepted"] == 0
    assert refusals == {"RESOURCE_EXHAUSTED"}  # the account limit, not an internal error
    assert noisy_p99 <= 2 * solo_p99, (solo_p99, noisy_p99)
    assert accounts.violations() == []
