"""The router's guardrail gate and tenant usage, without a bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.records import execution_record
from tickmesh.router import core
from tickmesh.router.config import RouterSettings
from tickmesh.router.guard import Gate, SnapshotWatcher, estimate_of, lifetime_usage
from tickmesh.router.usage import TenantUsage
from tickmesh.runtime.policy import PolicyEngine, Usage
from tickmesh.runtime.policy.sources import (
    AfterRecordsStored,
    Fetched,
    StoreUsageSource,
    TenantUsageUnavailableError,
    Window,
    counted_usage,
    tenant_windows,
)
from tickmesh.sdk import GraphBuilder, decode_envelope, events_of
from tickmesh.state.store import SQLiteStateStore
from tickmesh.v1 import (
    graph_pb2,
    guardrail_pb2,
    header_pb2,
    lifetime_pb2,
    payload_pb2,
    telemetry_pb2,
)

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PRODUCER = core.Producer("router", "test", "unit")


def tokens(n: int, cost_micros: int = 0, **custom: float) -> telemetry_pb2.Telemetry:
    return telemetry_pb2.Telemetry(input_tokens=n, cost_micros=cost_micros, custom_metrics=custom)


class Clock:
    def __init__(self, at: datetime = T0) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now

    def at(self, seconds: float = 0.0) -> datetime:
        return datetime.fromtimestamp(self.now + seconds, UTC)


# --- in process only (no source) ---------------------------------------------------------


async def test_without_a_source_usage_is_counted_once_per_execution_key() -> None:
    clock = Clock()
    usage = TenantUsage("acme", clock=clock)
    assert usage.record("ref:a:1", tokens(100), clock.at())
    assert not usage.record("ref:a:1", tokens(100), clock.at())  # a redelivered ref
    assert usage.record("ref:a:2", tokens(50), clock.at())
    total = usage.usage(None)
    assert (total.executions, total.input_tokens) == (2, 150)


async def test_without_a_source_windows_slide_and_a_new_window_sees_recent_history() -> None:
    clock = Clock()
    usage = TenantUsage("acme", clock=clock)
    usage.record("old", tokens(1000), clock.at())
    clock.now += 100
    usage.record("new", tokens(10), clock.at())
    # A policy with a 60 s window arrives: the window starts with what the router saw.
    await usage.track([60.0])
    assert usage.usage(60.0).input_tokens == 10
    clock.now += 30
    usage.record("newer", tokens(1), clock.at())
    assert usage.usage(60.0).input_tokens == 11
    clock.now += 45  # "new" is 75 s old now
    assert usage.usage(60.0).input_tokens == 1
    assert usage.usage(60.0).executions == 1
    assert usage.usage(None).input_tokens == 1011
    with pytest.raises(TenantUsageUnavailableError):
        usage.usage(3600.0)


async def test_without_a_source_redelivery_is_remembered_for_the_dedupe_horizon() -> None:
    clock = Clock()
    usage = TenantUsage("acme", clock=clock, dedupe_horizon_s=10)
    usage.record("k", tokens(1), clock.at())
    clock.now += 5
    assert not usage.record("k", tokens(1), clock.at(-5))
    clock.now += 20
    assert usage.record("k", tokens(1), clock.at(-25))
    assert usage.usage(None).executions == 2


# --- with an authoritative source ---------------------------------------------------------


class FakeSource:
    """Reports the executions in ``persisted`` (persisted_at, usage) before its cut."""

    def __init__(self) -> None:
        self.persisted: list[tuple[datetime, Usage]] = []
        self.calls: list[set[Window]] = []
        self.fail = False

    async def fetch(self, tenant: str, windows: Collection[Window], now: datetime) -> Fetched:
        if self.fail:
            raise ConnectionError("state service unavailable")
        self.calls.append(set(windows))
        result: dict[Window, Usage] = {}
        for window in windows:
            total = Usage()
            for at, usage in self.persisted:
                if at < now and (window is None or at >= now - timedelta(seconds=window)):
                    total = total.plus(usage)
            result[window] = total
        return Fetched(result, now)

    async def close(self) -> None:
        return None


async def test_with_a_source_increments_after_the_cut_add_to_the_fetched_figure() -> None:
    clock = Clock()
    source = FakeSource()
    source.persisted.append((clock.at(-10), Usage.of(tokens(500))))
    usage = TenantUsage("acme", source, clock=clock)
    with pytest.raises(TenantUsageUnavailableError, match="not loaded"):
        usage.usage(None)
    await usage.track([None])  # a tenant rule over all time
    assert usage.usage(None).input_tokens == 500

    clock.now += 1
    source.persisted.append((clock.at(), Usage.of(tokens(7))))
    assert usage.record("ref:b:1", tokens(7), clock.at())
    assert not usage.record("ref:b:1", tokens(7), clock.at())
    # Persisted before the cut: the source's figure already has it.
    assert not usage.record("ref:a:1", tokens(500), clock.at(-11))
    assert usage.usage(None).input_tokens == 507

    clock.now += 1
    await usage.refresh()  # the source now reports "b" itself: it is not counted twice
    assert usage.usage(None).input_tokens == 507
    assert usage.usage(None).executions == 2
    assert not usage.record("ref:b:1", tokens(7), clock.at(-1))
    assert usage.usage(None).input_tokens == 507


async def test_with_a_source_a_new_window_is_loaded_before_track_returns() -> None:
    clock = Clock()
    source = FakeSource()
    source.persisted.append((clock.at(-7200), Usage.of(tokens(1000))))
    source.persisted.append((clock.at(-60), Usage.of(tokens(10))))
    usage = TenantUsage("acme", source, clock=clock)
    await usage.start()
    try:
        await usage.track([3600.0])
        assert source.calls[-1] == {None, 3600.0}
        assert usage.usage(3600.0).input_tokens == 10
        assert usage.usage(None).input_tokens == 1010
        await usage.track([])
        with pytest.raises(TenantUsageUnavailableError):
            usage.usage(3600.0)
    finally:
        await usage.stop()


async def test_with_a_source_nothing_is_read_or_kept_without_tenant_rules() -> None:
    clock = Clock()
    source = FakeSource()
    usage = TenantUsage("acme", source, clock=clock)
    await usage.start()
    try:
        await usage.refresh()
        await usage.track([])
        assert not usage.record("ref:1", tokens(5), clock.at())
        assert source.calls == []
        assert usage.windows == frozenset()
    finally:
        await usage.stop()


async def test_with_a_source_that_stops_answering_tenant_usage_fails_closed() -> None:
    source = FakeSource()
    usage = TenantUsage("acme", source, max_staleness_s=0.05)
    await usage.track([None])
    usage.usage(None)
    source.fail = True
    with pytest.raises(ConnectionError):
        await usage.refresh()
    await asyncio.sleep(0.1)
    with pytest.raises(TenantUsageUnavailableError, match="stale"):
        usage.usage(None)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStateStore]:
    opened = await SQLiteStateStore.open(tmp_path / "state.db")
    yield opened
    await opened.close()


async def test_the_store_source_is_exact_to_its_cut(store: SQLiteStateStore) -> None:
    tenant = "acme"
    rows = await store.append_executions(
        tenant,
        [execution_record(n, telemetry=tokens(100 * n, cost_micros=n)) for n in (1, 2)],
    )
    cut = datetime.now(UTC)
    await asyncio.sleep(0.002)
    later = await store.append_executions(
        tenant, [execution_record(3, telemetry=tokens(300, cost_micros=3))]
    )
    assert later[0].persisted_at >= cut > rows[-1].persisted_at

    fetched = await StoreUsageSource(store).fetch(tenant, [None, 60.0], cut)
    assert fetched.cut == cut
    for window in (None, 60.0):
        found = fetched.usage[window]
        assert (found.executions, found.input_tokens, found.cost_micros) == (2, 300, 3)

    # Through TenantUsage: the third execution's ref comes after the cut, counted once.
    usage = TenantUsage(tenant, StoreUsageSource(store), clock=cut.timestamp)
    await usage.track([60.0])
    assert usage.record("ref:3", tokens(300, cost_micros=3), later[0].persisted_at)
    assert not usage.record("ref:1", tokens(100, cost_micros=1), rows[0].persisted_at)
    assert usage.usage(None).input_tokens == 600


async def test_the_store_source_falls_back_when_writes_keep_landing() -> None:
    class Busy:
        def __init__(self) -> None:
            self.n = 0

        async def counters(
            self, tenant: str, *, lifetime_id: str | None = None, since: datetime | None = None
        ) -> tuple[telemetry_pb2.Telemetry, int]:
            self.n += 1
            return tokens(self.n), self.n

    fetched = await StoreUsageSource(Busy()).fetch("acme", [None], T0)
    # Never subtracted from: an upper bound until the next refresh.
    assert fetched.usage[None].executions >= 1
    assert fetched.cut == T0


async def test_the_store_source_waits_for_the_bus_and_never_drops_a_record_read_before_its_cut(
    store: SQLiteStateStore,
) -> None:
    """A router counts a record it read from the bus at the time it read it, before the
    store commits it. With the wait, a record read before the cut is in the figure even
    when its commit comes after the cut; the subtraction that makes the store source
    exact would have taken it out, and the router drops its own increment: zero."""
    tenant = "acme"
    waits: list[str] = []
    read_at = datetime.now(UTC)  # the router read record 1 from the bus
    cut = read_at + timedelta(milliseconds=1)

    async def caught_up(asked: str) -> bool:
        waits.append(asked)
        # The state service commits record 1 only now, after the cut.
        await store.append_executions(tenant, [execution_record(1, telemetry=tokens(100))])
        return True

    usage = TenantUsage(tenant, StoreUsageSource(store, caught_up=caught_up), clock=cut.timestamp)
    await usage.track([60.0])
    assert waits == [tenant]
    # Read before the cut: the figure holds it, so the router's increment is dropped...
    assert not usage.record("ref:1:1", tokens(100), read_at)
    # ...and it is counted exactly once.
    assert (usage.usage(60.0).executions, usage.usage(60.0).input_tokens) == (1, 100)


async def test_the_store_source_fails_when_the_records_on_the_bus_are_not_stored(
    store: SQLiteStateStore,
) -> None:
    async def stuck(tenant: str) -> bool:
        return False

    with pytest.raises(TenantUsageUnavailableError, match="not stored yet"):
        await StoreUsageSource(store, caught_up=stuck).fetch("acme", [None], T0)


async def test_counters_are_read_only_once_the_records_on_the_bus_are_stored() -> None:
    """The state service counts a record after its commit; the router saw it before.
    A rule coming into force must not read counters that lack it."""
    order: list[str] = []

    class Counters:
        async def fetch(self, tenant: str, windows: Collection[Window], now: datetime) -> Fetched:
            order.append("fetch")
            return Fetched({None: counted_usage(tokens(1), 1)}, now)

        async def counted(
            self, tenant: str, executions: Collection[tuple[str, int]]
        ) -> set[tuple[str, int]]:
            return set(executions)

        async def close(self) -> None:
            order.append("close")

    async def stored(tenant: str) -> bool:
        order.append(f"stored {tenant}")
        return True

    counters = Counters()
    source = AfterRecordsStored(counters, stored)
    fetched = await source.fetch("acme", [None], T0)
    assert fetched.usage[None].executions == 1
    assert order == ["stored acme", "fetch"]
    # TenantUsage asks the counters what they hold through the wrapper.
    assert await source.counted("acme", [("e", 1)]) == {("e", 1)}

    async def not_yet(tenant: str) -> bool:
        return False

    with pytest.raises(TenantUsageUnavailableError, match="not stored yet"):
        await AfterRecordsStored(counters, not_yet).fetch("acme", [None], T0)
    await source.close()
    assert order[-1] == "close"


def test_counted_usage_has_sums_and_no_maxima() -> None:
    usage = counted_usage(tokens(10, cost_micros=20), 3)
    assert (usage.executions, usage.input_tokens, usage.cost_micros) == (3, 10, 20)
    assert dict(usage.max_values) == {}


# --- the gate -----------------------------------------------------------------------------

TENANT_POLICY = """\
policy: tenant-caps
rules:
  - id: daily
    scope: tenant
    window: 24h
    when: sum(tokens) > 1000
    action: pause_lifetime
  - id: ever
    scope: tenant
    when: count() > 1000000
    action: abort_lifetime
"""

LIFETIME_POLICY = """\
policy: lifetime-caps
rules:
  - id: custom-cap
    scope: lifetime
    when: sum(custom.lines) > 10 or count() > 5 or iterations > 3
    action: abort_lifetime
  - id: estimate
    scope: execution
    phase: pre_dispatch
    when: estimate.cost_usd > 1
    action: reject_execution
"""


def snapshot_of(*sources: str, tenant: str = "acme", dry_run: bool = False) -> Any:
    snapshot = guardrail_pb2.PolicySnapshot(tenant_id=tenant, revision=1)
    for i, source in enumerate(sources):
        snapshot.policies.add(
            tenant_id=tenant, policy_id=f"p{i}", version=1, source=source, dry_run=dry_run
        )
    snapshot.issued_at.FromDatetime(datetime.now(UTC))
    snapshot.lease.FromSeconds(60)
    return snapshot


class HeldSnapshot(SnapshotWatcher):
    """A watcher that holds a given snapshot (no KV)."""

    def __init__(self, snapshot: guardrail_pb2.PolicySnapshot | None) -> None:
        super().__init__(kv=None, tenant="acme")  # type: ignore[arg-type]
        self.snapshot = snapshot


def graph() -> graph_pb2.AgentGraph:
    built = (
        GraphBuilder("g", max_iterations=10)
        .plan("plan")
        .task("work", config={"estimate": {"cost_usd": 2.5, "tokens": 100, "custom": {"x": 1}}})
        .edge("plan", "work")
        .edge("work", "plan")
        .final("plan")
        .build()
    )
    built.version = 1
    return built


def lifetime(guard: core.Guard = core.allow_all) -> core.Lifetime:
    state = core.new_lifetime(
        tenant_id="acme",
        lifetime_id="l1",
        graph=graph(),
        input_payload=payload_pb2.Payload(),
        client_request_id="",
        labels={},
    )
    state.lifetime.created_at.FromDatetime(T0)
    return core.Lifetime(state, graph(), PRODUCER, T0 + timedelta(seconds=90), guard)


def step_header(node: str = "work", iteration: int = 1) -> header_pb2.EnvelopeHeader:
    kind = graph_pb2.NODE_KIND_TASK if node == "work" else graph_pb2.NODE_KIND_PLAN
    return header_pb2.EnvelopeHeader(
        tenant_id="acme",
        lifetime_id="l1",
        execution_id=f"{node}-{iteration}",
        iteration=iteration,
        node=header_pb2.NodeRef(id=node, kind=kind, handler=node),
    )


def test_lifetime_usage_comes_from_the_totals_with_count_iterations_fanout_and_time() -> None:
    lt = lifetime()
    lt.view.totals.CopyFrom(tokens(700, cost_micros=9, lines=4.0))
    lt.view.execution_count = 4
    lt.state.iterations["plan"] = 3
    lt.state.in_flight["a"].node_id = "work"
    lt.state.in_flight["b"].node_id = "work"
    usage = lifetime_usage(lt, tokens(200))
    assert (usage.executions, usage.input_tokens, usage.cost_micros) == (4, 700, 9)
    assert (usage.iterations, usage.fanout, usage.wall_time_s) == (3, 2, 90.0)
    assert dict(usage.custom) == {"lines": 4.0}
    assert usage.max_values["tokens"] == 200  # the current execution's
    assert dict(lifetime_usage(lt).max_values) == {}


def test_estimates_come_from_the_node_config() -> None:
    node = graph().nodes[1]
    estimate = estimate_of(node)
    assert (estimate.cost_micros, estimate.input_tokens) == (2_500_000, 100)
    assert dict(estimate.custom_metrics) == {"x": 1.0}
    assert estimate_of(None) == telemetry_pb2.Telemetry()
    bad = graph_pb2.Node()
    bad.config.update({"estimate": {"model_calls": -3, "cost_usd": "lots", "tool_calls": 1e30}})
    assert estimate_of(bad) == telemetry_pb2.Telemetry()


def test_the_gate_reads_tenant_usage_including_the_step_being_decided() -> None:
    clock = Clock()
    usage = TenantUsage("acme", clock=clock)
    asyncio.run(usage.track([86_400.0]))
    gate = Gate(HeldSnapshot(snapshot_of(TENANT_POLICY)), PolicyEngine(), usage)
    lt = lifetime(gate)
    header = step_header()
    usage.record("ref:1", tokens(900), clock.at())
    assert gate(lt, guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT, header, tokens(900)).action == (
        guardrail_pb2.GUARDRAIL_ACTION_ALLOW
    )
    usage.record("ref:2", tokens(200), clock.at())
    decision = gate(lt, guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT, header, tokens(200))
    assert decision.action == guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME
    [violation] = decision.violations
    assert (violation.rule_id, violation.observed, violation.limit) == ("daily", 1100, 1000)


def test_the_gate_fails_closed_when_tenant_usage_is_unavailable() -> None:
    usage = TenantUsage("acme", FakeSource())  # never refreshed
    gate = Gate(HeldSnapshot(snapshot_of(TENANT_POLICY)), PolicyEngine(), usage)
    decision = gate(
        lifetime(gate), guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT, step_header(), tokens(1)
    )
    assert decision.action == guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    assert decision.reason.startswith("evaluation_error")
    assert "not loaded yet" in decision.reason


def test_the_gate_enforces_lifetime_rules_and_pre_dispatch_estimates() -> None:
    gate = Gate(HeldSnapshot(snapshot_of(LIFETIME_POLICY)), PolicyEngine(), TenantUsage("acme"))
    lt = lifetime(gate)
    pre = gate(lt, guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH, step_header(), tokens(0))
    assert pre.action == guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
    assert pre.violations[0].observed == 2.5
    plan_pre = gate(lt, guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH, step_header("plan"), tokens(0))
    assert plan_pre.action == guardrail_pb2.GUARDRAIL_ACTION_ALLOW

    lt.view.totals.custom_metrics["lines"] = 11
    post = gate(lt, guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT, step_header(), tokens(1))
    assert post.action == guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME
    assert post.violations[0].rule_id == "custom-cap"


def test_a_missing_snapshot_rejects() -> None:
    gate = Gate(HeldSnapshot(None), PolicyEngine(), TenantUsage("acme"))
    decision = gate(
        lifetime(gate), guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH, step_header(), tokens(0)
    )
    assert decision.reason == "snapshot_missing"


def test_tenant_windows_lists_the_windows_of_tenant_rules_only() -> None:
    engine = PolicyEngine()
    snapshot = snapshot_of(TENANT_POLICY, LIFETIME_POLICY, "policy: broken\nrules: 3\n")
    assert tenant_windows(snapshot, engine) == {86_400.0, None}
    assert tenant_windows(snapshot_of(LIFETIME_POLICY), engine) == set()


async def test_a_new_snapshot_is_prepared_before_it_is_enforced() -> None:
    order: list[str] = []
    watcher: SnapshotWatcher

    async def prepare(snapshot: guardrail_pb2.PolicySnapshot) -> None:
        order.append(f"prepare, holding {watcher.snapshot is not None}")

    watcher = SnapshotWatcher(kv=None, tenant="acme", prepare=prepare)  # type: ignore[arg-type]
    await watcher.install(snapshot_of(TENANT_POLICY))
    assert order == ["prepare, holding False"]
    assert watcher.snapshot is not None
    assert watcher.received_at is not None

    async def stuck(snapshot: guardrail_pb2.PolicySnapshot) -> None:
        await asyncio.sleep(10)

    slow = SnapshotWatcher(kv=None, tenant="acme", prepare=stuck)  # type: ignore[arg-type]
    await slow.install(snapshot_of(TENANT_POLICY))  # bounded: enforced anyway
    assert slow.snapshot is not None


# --- dry run in the core ----------------------------------------------------------------


def test_a_dry_run_decision_is_recorded_and_the_step_proceeds() -> None:
    def dry(lt: core.Lifetime, phase: Any, header: Any, usage: Any) -> Any:
        decision = guardrail_pb2.GuardrailDecision(
            action=guardrail_pb2.GUARDRAIL_ACTION_ALLOW, phase=phase, dry_run=True
        )
        if phase == guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH:
            decision.violations.add(
                rule_id="cap", action=guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME
            )
            decision.violations.add(
                rule_id="big", action=guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME
            )
        return decision

    lt = lifetime(dry)
    core.start(lt)
    # The entry plan is dispatched, and the dry-run objection is on record.
    assert [m.type for m in lt.out if m.type.endswith("_request")] == ["plan_request"]
    assert lt.view.state == lifetime_pb2.LIFETIME_STATE_RUNNING
    events = [e for m in lt.out for e in events_of(decode_envelope(m.data))]
    [guard] = [e for e in events if e.kind == lifetime_pb2.LIFETIME_EVENT_KIND_GUARDRAIL]
    assert guard.message == "dry run: would have aborted the lifetime: cap, big"
    assert guard.guardrail.dry_run


def test_the_router_reads_its_state_target_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TICKMESH_ROUTER_STATE_TARGET", raising=False)
    assert RouterSettings().state_target is None
    monkeypatch.setenv("TICKMESH_ROUTER_STATE_TARGET", "state:7003")
    monkeypatch.setenv("TICKMESH_ROUTER_TENANT_USAGE_REFRESH_S", "0.5")
    settings = RouterSettings()
    assert (settings.state_target, settings.tenant_usage_refresh_s) == ("state:7003", 0.5)


class FakeKV:
    """A policy bucket whose watch yields the given entries, then waits."""

    def __init__(self, *entries: Any) -> None:
        self.entries = entries

    async def watch(self, key: str) -> AsyncIterator[Any]:
        async def stream() -> AsyncIterator[Any]:
            for entry in self.entries:
                yield entry
            await asyncio.Event().wait()

        return stream()


class Entry:
    def __init__(self, value: bytes | None, operation: str | None = None) -> None:
        self.value = value
        self.operation = operation


async def test_the_watcher_follows_puts_and_forgets_a_deleted_snapshot() -> None:
    snapshot = snapshot_of(TENANT_POLICY)
    installed: list[int] = []

    async def prepare(held: guardrail_pb2.PolicySnapshot) -> None:
        installed.append(held.revision)

    kv = FakeKV(Entry(snapshot.SerializeToString()), Entry(b"\xff\xff"), Entry(b"", "DEL"))
    watcher = SnapshotWatcher(kv, "acme", prepare=prepare)  # type: ignore[arg-type]
    await watcher.start()
    try:
        for _ in range(200):
            if installed and watcher.snapshot is None:
                break
            await asyncio.sleep(0.01)
    finally:
        await watcher.stop()
    assert installed == [1]  # the unreadable entry was skipped
    assert watcher.snapshot is None  # the deletion withdrew it


async def test_a_counter_that_lags_the_store_never_loses_an_execution() -> None:
    """The state service records the counters after it publishes a ref, so a refresh can
    read them after the execution was persisted and before it was counted. The router's
    own increment must stay until the counter holds it, not be dropped by the cut."""
    from tickmesh.runtime.counters import CountedExecution, InProcessUsageCounter

    counter = InProcessUsageCounter()
    persisted = T0
    clock = [T0.timestamp() + 0.001]
    usage = TenantUsage("acme", counter, clock=lambda: clock[0])
    await usage.track([60.0])
    execution = CountedExecution("e1", 1, persisted, input_tokens=7, cost_micros=4000)

    # The ref arrives; then a refresh reads the counter before the state recorded it.
    assert usage.record("ref:e1:1", tokens(7, cost_micros=4000), persisted)
    await usage.refresh()
    assert usage.usage(60.0).cost_micros == 4000
    assert usage.usage(None).executions == 1

    # Once counted, it is in the counter's figure and no longer an increment: once.
    await counter.record("acme", [execution])
    clock[0] += 0.5
    await usage.refresh()
    assert usage.usage(60.0).cost_micros == 4000
    assert usage.usage(None).executions == 1
    # A redelivered ref changes nothing.
    assert not usage.record("ref:e1:1", tokens(7, cost_micros=4000), persisted)
    assert usage.usage(None).executions == 1
