"""Usage counters: one contract run against the in-process counter and against a real Redis,
then what only one of them does (Redis's outward edges and restarts, in-process exactness).

Times are injected (``persisted_at`` and ``now`` around ``T``), never slept for.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from tests.support.factories import make_envelope
from tests.support.records import execution_record, usage
from tests.support.redis_server import RedisServer
from tickmesh.router.usage import TenantUsage
from tickmesh.runtime.counters import (
    CountedExecution,
    InProcessUsageCounter,
    UsageCounter,
    counted_from_envelope,
)
from tickmesh.runtime.counters_redis import FINE_TTL_S, RedisUsageCounter
from tickmesh.runtime.policy import PolicyEngine, Usage
from tickmesh.runtime.policy.engine import EvaluationContext
from tickmesh.runtime.policy.sources import Window, counted_usage, tenant_windows
from tickmesh.sdk.errors import ConfigError, TransportError, ValidationError
from tickmesh.v1 import guardrail_pb2, header_pb2, telemetry_pb2

T = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)
"""Half a minute past a minute, so windows end inside a minute and cross minute edges."""
DAY = 86_400.0


def at(offset_s: float) -> datetime:
    return T + timedelta(seconds=offset_s)


def ex(n: int, offset_s: float = -1.0, *, cost: int = 0, attempt: int = 1) -> CountedExecution:
    """Execution ``n``: ``n`` input tokens, 2n output tokens, one model call, one tool call
    per odd n, ``cost`` micros (distinct powers of two tell exactly which were counted)."""
    return CountedExecution(
        execution_id=f"{n:032x}",
        attempt=attempt,
        persisted_at=at(offset_s),
        input_tokens=n,
        output_tokens=2 * n,
        cost_micros=cost,
        model_calls=1,
        tool_calls=n % 2,
    )


def total(executions: Iterable[CountedExecution]) -> Usage:
    found = list(executions)
    return Usage(
        executions=len(found),
        input_tokens=sum(e.input_tokens for e in found),
        output_tokens=sum(e.output_tokens for e in found),
        cost_micros=sum(e.cost_micros for e in found),
        model_calls=sum(e.model_calls for e in found),
        tool_calls=sum(e.tool_calls for e in found),
    )


class Backend:
    """Opens counters over one shared set of counts: the in-process counter is one object;
    each Redis counter is its own client, standing in for another process."""

    def __init__(self, kind: str, url: str = "") -> None:
        self.kind = kind
        self._url = url
        self._shared = InProcessUsageCounter()
        self._opened: list[UsageCounter] = []

    async def open(self) -> UsageCounter:
        if self.kind == "in_process":
            return self._shared
        counter = await RedisUsageCounter.open(self._url)
        self._opened.append(counter)
        return counter

    async def close(self) -> None:
        for counter in self._opened:
            await counter.close()


@pytest.fixture(params=["in_process", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    opened = Backend(request.param, url)
    yield opened
    await opened.close()


@pytest.fixture
async def counter(backend: Backend) -> UsageCounter:
    return await backend.open()


@pytest.fixture
async def redis_counter(redis_url: str) -> AsyncIterator[RedisUsageCounter]:
    counter = await RedisUsageCounter.open(redis_url)
    yield counter
    await counter.close()


# --- the contract ------------------------------------------------------------------------


async def test_counter_counts_each_execution_once_across_repeated_records(
    counter: UsageCounter,
) -> None:
    a, b, c = ex(1, cost=10), ex(2, cost=20), ex(3, cost=40)
    assert await counter.record("acme", [a, b, a]) == 2
    assert await counter.record("acme", [b, a]) == 0
    assert await counter.record("acme", [c, b]) == 1
    assert await counter.record("acme", []) == 0
    fetched = await counter.fetch("acme", [None, 60.0], T)
    assert fetched.cut == T
    assert fetched.usage[None] == fetched.usage[60.0] == total([a, b, c])


async def test_counter_counts_each_execution_once_under_concurrent_records(
    backend: Backend,
) -> None:
    # 20 writers (separate clients for Redis) record overlapping ranges in batches that
    # also repeat themselves: 250 distinct executions, each offered by up to 6 writers.
    executions = [ex(n, -(n % 120) - 0.5, cost=n) for n in range(250)]
    writers = [await backend.open() for _ in range(20)]

    async def write(i: int) -> int:
        mine = executions[i * 10 : i * 10 + 60]
        added = 0
        for start in range(0, len(mine), 15):
            batch = mine[start : start + 15]
            added += await writers[i].record("acme", batch + batch[:3])
        return added

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(write(i)) for i in range(20)]
    assert sum(task.result() for task in tasks) == 250
    fetched = await writers[7].fetch("acme", [None, 120.0], T)
    assert fetched.usage[None] == fetched.usage[120.0] == total(executions)


async def test_counter_windows_give_exact_sums(counter: UsageCounter) -> None:
    offsets = {
        "now-0.25s": -0.25,
        "now-1.5s": -1.5,
        "now-59.9s": -59.9,
        "now-60.5s": -60.5,
        "now-89s": -89.0,
        "now-91s": -91.0,
        "now-23h": -23 * 3600.0,
        "now-24h+5s": -DAY + 5,
        "now-24h-2m": -DAY - 120,
        "now-30d": -30 * DAY,
    }
    executions = {name: ex(i + 1, s, cost=1 << i) for i, (name, s) in enumerate(offsets.items())}
    assert await counter.record("acme", list(executions.values())) == len(executions)
    expected: dict[Window, list[str]] = {
        1.0: ["now-0.25s"],
        60.0: ["now-0.25s", "now-1.5s", "now-59.9s"],
        90.0: ["now-0.25s", "now-1.5s", "now-59.9s", "now-60.5s", "now-89s"],
        DAY: [name for name in offsets if offsets[name] >= -DAY],
        None: list(offsets),
    }
    fetched = await counter.fetch("acme", list(expected), T)
    for window, names in expected.items():
        assert fetched.usage[window] == total(executions[n] for n in names), window


async def test_counter_counts_attempts_of_one_execution_separately(counter: UsageCounter) -> None:
    first, second = ex(5, cost=100), ex(5, cost=300, attempt=2)
    assert await counter.record("acme", [first]) == 1
    assert await counter.record("acme", [second, first]) == 1
    assert await counter.record("acme", [second]) == 0
    found = (await counter.fetch("acme", [None], T)).usage[None]
    assert (found.executions, found.cost_micros) == (2, 400)


async def test_counter_sums_stay_exact_past_what_a_double_holds(counter: UsageCounter) -> None:
    big = 2**60 + 1  # a double would round it
    executions = [ex(1, cost=big), ex(2, cost=1), ex(3, cost=-2)]
    assert await counter.record("acme", executions) == 3
    assert await counter.record("acme", [ex(4, cost=big), ex(5, cost=7)]) == 2
    fetched = await counter.fetch("acme", [None, 60.0], T)
    for window in (None, 60.0):
        assert fetched.usage[window].cost_micros == 2 * big + 6
        assert fetched.usage[window].input_tokens == 15


async def test_counter_keeps_tenants_apart(counter: UsageCounter) -> None:
    assert await counter.record("acme", [ex(1, cost=5)]) == 1
    assert await counter.record("globex", [ex(1, cost=7)]) == 1  # the same id elsewhere
    windows: list[Window] = [None, 60.0]
    acme = await counter.fetch("acme", windows, T)
    globex = await counter.fetch("globex", windows, T)
    nobody = await counter.fetch("initech", windows, T)
    for window in windows:
        assert acme.usage[window].cost_micros == 5
        assert globex.usage[window].cost_micros == 7
        assert nobody.usage[window] == Usage()


async def test_counter_refuses_bad_tenants_windows_and_times(counter: UsageCounter) -> None:
    with pytest.raises(ValidationError, match="invalid tenant id"):
        await counter.record("Not A Tenant", [ex(1)])
    with pytest.raises(ConfigError, match="max_window_s"):
        await counter.fetch("acme", [40 * DAY], T)
    with pytest.raises(ValidationError, match="positive"):
        await counter.fetch("acme", [0.0], T)
    with pytest.raises(ValidationError, match="timezone-aware"):
        await counter.fetch("acme", [None], T.replace(tzinfo=None))
    assert (await counter.fetch("acme", [], T)).usage == {}


SPEND = """\
policy: spend
rules:
  - id: daily-spend
    scope: tenant
    window: 24h
    when: sum(cost_usd) > 0.01
    action: pause_lifetime
  - id: burst
    scope: tenant
    window: 90s
    when: count() > 3
    action: reject_execution
"""


def _snapshot(source: str) -> guardrail_pb2.PolicySnapshot:
    snapshot = guardrail_pb2.PolicySnapshot(tenant_id="acme", revision=1)
    snapshot.policies.add(
        tenant_id="acme",
        policy_id="spend",
        version=1,
        source=source,
        digest=hashlib.sha256(source.encode()).hexdigest(),
    )
    snapshot.issued_at.FromDatetime(T)
    snapshot.lease.FromSeconds(60)
    return snapshot


async def test_counter_usage_plugs_into_the_policy_engine(counter: UsageCounter) -> None:
    engine = PolicyEngine()
    snapshot = _snapshot(SPEND)
    windows = tenant_windows(snapshot, engine)
    assert windows == {DAY, 90.0}
    header = header_pb2.EnvelopeHeader(tenant_id="acme", attempt=1)

    async def decide() -> guardrail_pb2.GuardrailDecision:
        fetched = await counter.fetch("acme", windows, T)
        context = EvaluationContext(
            phase=guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT,
            header=header,
            tenant_usage=lambda window: fetched.usage[window],
        )
        return engine.evaluate(snapshot, context, now=T)

    await counter.record("acme", [ex(1, -3600, cost=6_000)])
    assert (await decide()).action == guardrail_pb2.GUARDRAIL_ACTION_ALLOW
    await counter.record("acme", [ex(2, -600, cost=14_000), ex(3, -2 * DAY, cost=10**9)])
    decision = await decide()
    assert decision.action == guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME
    [violation] = decision.violations
    assert violation.rule_id == "daily-spend"
    assert violation.observed == pytest.approx(0.02)

    # The same figures counted_usage gives a StoreUsageSource, and the router's cache takes
    # the counter as its source.
    day = (await counter.fetch("acme", [DAY], T)).usage[DAY]
    assert day == counted_usage(
        telemetry_pb2.Telemetry(
            input_tokens=3, output_tokens=6, cost_micros=20_000, model_calls=2, tool_calls=1
        ),
        2,
    )
    tenant_usage = TenantUsage("acme", counter, clock=T.timestamp)
    await tenant_usage.track(windows)
    assert tenant_usage.usage(DAY) == day
    assert tenant_usage.usage(None).cost_micros == 10**9 + 20_000


async def test_counter_takes_records_as_the_state_service_stores_them(
    counter: UsageCounter,
) -> None:
    _, task = execution_record(1, telemetry=usage(10, 20, 30, 2, 1))
    _, plan = execution_record(2, kind="plan", attempt=3, telemetry=usage(1, 2, 3, 4, 5))
    counted = [counted_from_envelope(env, at(-5)) for env in (task, plan)]
    assert counted[1] == CountedExecution(f"{2:032x}", 3, at(-5), 1, 2, 3, 4, 5)
    assert await counter.record("acme", counted) == 2
    found = (await counter.fetch("acme", [60.0], T)).usage[60.0]
    assert found == Usage(
        executions=2, input_tokens=11, output_tokens=22, cost_micros=33, model_calls=6, tool_calls=6
    )


def test_only_execution_records_are_counted() -> None:
    with pytest.raises(ValidationError, match="not task_request"):
        counted_from_envelope(make_envelope("task_request"), T)
    _, env = execution_record(1)
    with pytest.raises(ValidationError, match="timezone-aware"):
        counted_from_envelope(env, T.replace(tzinfo=None))
    env.header.attempt = 0
    with pytest.raises(ValidationError, match="attempt must be >= 1"):
        counted_from_envelope(env, T)


async def test_counter_throughput_and_fetch_latency(
    backend: Backend, counter: UsageCounter, capsys: pytest.CaptureFixture[str]
) -> None:
    batches, size = 20, 512
    count = batches * size
    # Spread over the last day, so the 24 h window reads every minute bucket.
    executions = [ex(n, -DAY * (n + 0.5) / count, cost=n) for n in range(count)]
    started = time.perf_counter()
    for start in range(0, count, size):
        assert await counter.record("acme", executions[start : start + size]) == size
    record_s = time.perf_counter() - started

    windows: list[Window] = [60.0, 3600.0, DAY, None]
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        fetched = await counter.fetch("acme", windows, T)
    fetch_ms = (time.perf_counter() - started) / rounds * 1000
    assert fetched.usage[None] == fetched.usage[DAY] == total(executions)
    assert fetched.usage[60.0].executions == sum(1 for e in executions if e.persisted_at >= at(-60))
    with capsys.disabled():
        sys.stdout.write(
            f"\n[{backend.kind}] record: {count / record_s:,.0f} executions/s in batches of "
            f"{size}; fetch of 4 windows (60 s, 1 h, 24 h, all): {fetch_ms:.2f} ms\n"
        )


# --- in process only ---------------------------------------------------------------------


async def test_in_process_windows_are_exact_to_the_microsecond() -> None:
    counter = InProcessUsageCounter()
    now = at(0.25)
    edge = now - timedelta(seconds=60)
    inside = [
        CountedExecution("a", 1, edge, cost_micros=1),
        CountedExecution("b", 1, now - timedelta(microseconds=1), cost_micros=2),
    ]
    outside = [
        CountedExecution("c", 1, edge - timedelta(microseconds=1), cost_micros=4),
        CountedExecution("d", 1, now, cost_micros=8),  # persisted at the cut: after it
    ]
    # Out of time order on purpose: late records are placed where they belong.
    await counter.record("acme", [outside[1], inside[1]])
    await counter.record("acme", [outside[0], inside[0]])
    fetched = await counter.fetch("acme", [60.0, None], now)
    assert fetched.usage[60.0].cost_micros == 3
    assert fetched.usage[None].cost_micros == 7
    assert (await counter.fetch("acme", [None], at(1))).usage[None].cost_micros == 15


async def test_in_process_forgets_markers_after_their_ttl() -> None:
    clock = [0.0]
    counter = InProcessUsageCounter(marker_ttl_s=10, clock=lambda: clock[0])
    assert await counter.record("acme", [ex(1)]) == 1
    clock[0] = 9.5
    assert await counter.record("acme", [ex(1)]) == 0
    clock[0] = 20.0
    assert await counter.record("acme", [ex(1)]) == 1  # a redelivery past the horizon
    assert (await counter.fetch("acme", [None], T)).usage[None].executions == 2


async def test_in_process_drops_old_window_data_but_keeps_all_time() -> None:
    counter = InProcessUsageCounter(max_window_s=3600)
    await counter.record("acme", [ex(n, -10 * 3600 - n, cost=1) for n in range(1, 100)])
    await counter.record("acme", [ex(100, -1, cost=1000)])  # ten hours newer: the rest go
    fetched = await counter.fetch("acme", [3600.0, None], T)
    assert fetched.usage[3600.0].cost_micros == 1000
    assert fetched.usage[None].cost_micros == 1099


# --- Redis only --------------------------------------------------------------------------


async def test_redis_rounds_window_edges_outward_never_inward(
    redis_counter: RedisUsageCounter,
) -> None:
    counter = redis_counter
    named = {
        "24h-10s": (-DAY - 10, 1),  # in the minute holding the 24 h window's far edge
        "24h-31s": (-DAY - 31, 2),  # the minute before it
        "300s": (-300.0, 4),  # 5 min: the far edge is exact to the second
        "300.5s": (-300.5, 8),
        "301s": (-301.0, 16),
        "330s": (-330.0, 32),  # 301 s window: its far edge T-300.75 rounds out to T-330
        "330.5s": (-330.5, 64),
        "+0.5s": (0.5, 128),  # persisted after now, in the second that holds now
    }
    executions = [ex(i + 1, s, cost=c) for i, (s, c) in enumerate(named.values())]
    await counter.record("acme", executions)
    now = at(0.25)
    fetched = await counter.fetch("acme", [DAY, 300.0, 301.0, 1.0, None], now)
    cost = {w: u.cost_micros for w, u in fetched.usage.items()}
    assert cost[DAY] == 255 - 2  # counts up to 59 s more, at the far edge
    assert cost[300.0] == 4 + 128  # [now-300 s, now) is T-299.75..T+0.25, read as T-300..T+1
    assert cost[301.0] == 4 + 8 + 16 + 32 + 128
    assert cost[1.0] == 128
    assert cost[None] == 255  # all time holds everything recorded
    exact = await counter.fetch("acme", [300.0], T)
    assert exact.usage[300.0].cost_micros == 4  # aligned edges: exact


async def test_redis_windows_round_outward_at_any_alignment(
    redis_counter: RedisUsageCounter,
) -> None:
    # The module docstring's rule, as a model: the window's fine buckets (seconds here),
    # and past 5 minutes the far edge taken back to its minute. Checked against records
    # spread over two days and dense around each edge, for ends at odd fractions of a second.
    rng = random.Random(7)
    nows = [at(0.75), at(3600 * 5 + 1234.5), at(-7 * 3600 + 59.999)]
    windows = [1.0, 59.0, 60.0, 61.0, 299.0, 300.0, 301.0, 3599.0, 3600.0, 7200.0, DAY, DAY + 1]
    offsets = [rng.uniform(-2 * DAY, 6 * 3600) for _ in range(1500)]
    for now in nows:
        for window in windows:
            edge = (now - at(0)).total_seconds() - window
            offsets += [edge + rng.uniform(-90, 90) for _ in range(4)]
    executions = [
        ex(i + 1, offset, cost=rng.randrange(1, 10**6)) for i, offset in enumerate(offsets)
    ]
    await redis_counter.record("acme", executions)
    exact = InProcessUsageCounter()
    await exact.record("acme", executions)

    def modelled(now: datetime, window: float) -> Usage:
        lo = math.floor(now.timestamp() - window)
        if window > 300:
            lo = lo // 60 * 60
        hi = math.ceil(now.timestamp())
        return total(e for e in executions if lo <= e.persisted_at.timestamp() < hi)

    for now in nows:
        found = (await redis_counter.fetch("acme", windows, now)).usage
        floor = (await exact.fetch("acme", windows, now)).usage
        for window in windows:
            assert found[window] == modelled(now, window), (now, window)
            assert found[window].cost_micros >= floor[window].cost_micros, (now, window)


async def test_redis_wider_fine_buckets_round_edges_to_their_width(redis_url: str) -> None:
    counter = await RedisUsageCounter.open(redis_url, key_prefix="b5", bucket_s=5)
    try:
        # T is a multiple of 5 s; the buckets before it start at T-5, T-10, T-15.
        await counter.record("acme", [ex(1, -7, cost=1), ex(2, -9.5, cost=2), ex(3, -11, cost=4)])
        fetched = await counter.fetch("acme", [8.0, 10.0, 15.0], T)
        cost = {w: u.cost_micros for w, u in fetched.usage.items()}
        assert cost == {8.0: 1 + 2, 10.0: 1 + 2, 15.0: 1 + 2 + 4}
        exact = InProcessUsageCounter()
        await exact.record("acme", [ex(1, -7, cost=1), ex(2, -9.5, cost=2)])
        assert (await exact.fetch("acme", [8.0], T)).usage[8.0].cost_micros == 1
    finally:
        await counter.close()


async def test_redis_keys_share_the_tenants_slot_and_expire(
    redis_counter: RedisUsageCounter, redis_url: str
) -> None:
    await redis_counter.record("acme", [ex(1, -0.5, cost=3)])
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = sorted(str(key) for key in await raw.keys("*"))
        second = int(at(-0.5).timestamp())
        minute, hour = second // 60, second // 3600
        assert keys == sorted(
            [
                "tm:{acme}:u:all",
                f"tm:{{acme}}:u:s:{second}",
                f"tm:{{acme}}:u:m:{minute}",
                f"tm:{{acme}}:u:h:{hour}",
                f"tm:{{acme}}:seen:{1:032x}:1",
            ]
        )
        assert len({key_slot(k.encode()) for k in keys}) == 1
        assert await raw.hgetall("tm:{acme}:u:all") == {
            "input_tokens": "1",
            "output_tokens": "2",
            "cost_micros": "3",
            "model_calls": "1",
            "tool_calls": "1",
            "executions": "1",
        }
        assert await raw.ttl("tm:{acme}:u:all") == -1
        assert 0 < await raw.ttl(f"tm:{{acme}}:u:s:{second}") <= FINE_TTL_S
        for long_lived in (f"tm:{{acme}}:u:m:{minute}", f"tm:{{acme}}:u:h:{hour}"):
            assert 31 * DAY < await raw.ttl(long_lived) <= 31 * DAY + 3600
        assert 6 * DAY < await raw.ttl(f"tm:{{acme}}:seen:{1:032x}:1") <= 7 * DAY
        # Scripts flushed (a failover to a fresh replica): loaded again on NOSCRIPT.
        await raw.script_flush()
        assert await redis_counter.record("acme", [ex(2, cost=4)]) == 1
        assert (await redis_counter.fetch("acme", [None], T)).usage[None].cost_micros == 7
    finally:
        await raw.aclose()


async def test_redis_restart_fails_clearly_while_down_and_works_after(
    redis_server: RedisServer, redis_url: str
) -> None:
    counter = await RedisUsageCounter.open(redis_url)
    try:
        assert await counter.record("acme", [ex(1, cost=5)]) == 1
        where = f"cannot reach Redis at 127.0.0.1:{redis_server.port}"
        redis_server.stop()
        try:
            with pytest.raises(ConfigError, match=where):
                await counter.check()
            with pytest.raises(TransportError, match=where):
                await counter.fetch("acme", [None], T)
            with pytest.raises(TransportError, match=where):
                await counter.record("acme", [ex(2)])
            with pytest.raises(ConfigError, match=where):
                await RedisUsageCounter.open(redis_url)
        finally:
            redis_server.start()
        await counter.check()
        # The server kept nothing (no persistence): counting starts again.
        assert await counter.record("acme", [ex(1, cost=5), ex(2, cost=6)]) == 2
        assert (await counter.fetch("acme", [None], T)).usage[None].cost_micros == 11
    finally:
        await counter.close()


async def test_redis_open_names_the_server_without_its_password() -> None:
    url = "redis://user:s3cret@127.0.0.1:1/0"
    with pytest.raises(ConfigError, match=r"cannot reach Redis at 127\.0\.0\.1:1: ") as caught:
        await RedisUsageCounter.open(url, timeout_s=1.0)
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(RedisUsageCounter(url))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("key_prefix", "tm{x}", "braces"),
        ("key_prefix", "", "non-empty"),
        ("bucket_s", 7, "divide 60"),
        ("max_window_s", 10, ">= 60"),
        ("marker_ttl_s", 0, ">= 1"),
    ],
)
def test_redis_counter_refuses_bad_options(option: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RedisUsageCounter("redis://127.0.0.1:1", **{option: value})  # type: ignore[arg-type]


async def test_counter_says_which_executions_it_holds(backend: Backend) -> None:
    writer, reader = await backend.open(), await backend.open()
    a, b, c = ex(1, cost=10), ex(2, cost=20), ex(3, cost=40)
    assert await writer.record("acme", [a, b]) == 2
    asked = [(e.execution_id, e.attempt) for e in (a, b, c)]
    assert await reader.counted("acme", asked) == set(asked[:2])
    assert await reader.counted("other", asked) == set()
    assert await reader.counted("acme", []) == set()
