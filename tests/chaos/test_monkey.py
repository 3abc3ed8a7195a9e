"""The randomized "monkey" test (RELIABILITY.md §4.1), slow_chaos: random faults with a logged seed.

The crash-point and single-fault tests are deterministic; this one throws random faults
at the whole mesh for about a minute while lifetimes keep running, then heals
everything and checks the stored history exactly.

Load: the four services as processes (the chaos harness, SQLite store), one in-process
worker, ``STARTERS`` starters each starting a lifetime through the Client every few
hundred milliseconds without waiting for it to end. A lifetime is a plan loop: the plan
dispatches the task ``STEPS`` times, checks each result, and completes; so a completed
lifetime holds exactly ``STEPS`` task records and ``STEPS + 1`` plan records. A start is
retried with the same ``request_id`` until it is answered, so every start attempted
names exactly one lifetime.

Faults (``CHAOS_S`` seconds, a random pause between two faults):

* SIGKILL one of router, state, executor-pool, guardrail; restart it after a moment;
* SIGSTOP one of them for 1-4 s, then SIGCONT;
* SIGKILL nats-server, restart it on the same store directory.

About a third of the faults overlap the next one (on another target: a service killed
while nats-server is down, two services paused at once).

The seed comes from ``TICKMESH_CHAOS_SEED`` (random when unset) and is printed first; it
fixes the fault schedule (kinds, targets, durations, pauses), not the interleaving with
the load, so a failure replays the same faults in the same order::

    TICKMESH_CHAOS_SEED=<seed> make chaos PYTEST_ARGS='-k monkey'

What must hold after healing (README, Reliability):

* every start attempted was answered, each with its own lifetime, and the router holds no
  other lifetime of the graph;
* every lifetime is COMPLETED, in the router and in the state store. Nothing here may fail
  a lifetime: the graph allows ``MAX_ATTEMPTS`` deliveries per step (the default 3 can be
  used up by redeliveries alone when a step is hit by faults several times: the pool
  then records AttemptsExhausted, as designed); every guardrail outage is far shorter
  than the snapshot lease (30 s; a kill or a pause here takes the guardrail away for a
  few seconds), so the routers never fail closed; step timeouts (``STEP_TIMEOUT_S``)
  are far above any fault;
* every lifetime passes the lifetime auditor (tests/support/audit.py): each execution
  dispatched once (STEP_DISPATCHED once per execution id), stored once per (execution
  id, attempt), nothing dispatched left unstored, nothing stored undispatched, event
  sequences 1..N without gaps;
* exactly ``STEPS`` task and ``STEPS + 1`` plan records per lifetime in the store, one row
  per (execution id, attempt) across the tenant (dup = ∅);
* no dead letter; the work, records and refs streams (work queues) are empty, and every
  durable consumer has nothing pending or unacked; every service is SERVING and none
  exited unless the test killed it.

Handlers run at least once (README: a pool killed after a handler finished and before
its record was acked runs the step again; the second record is deduplicated): handler
re-runs are counted and printed, never asserted away; exactly-once is asserted on the
stored records and on the router's dispatch decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import pytest
from nats.aio.msg import Msg

from tests.chaos import report
from tests.chaos.auditor import audit_lifetime
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import SERVICES, Cluster, ServiceName, figure, wait_terminal
from tests.support.audit import AuditReport, record_of
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    Retry,
    TaskContext,
    complete,
    dispatch,
    events_of,
    fail,
    plan,
    step,
    task,
)
from tickmesh.v1 import envelope_pb2, lifetime_pb2

pytestmark = [pytest.mark.slow_chaos, pytest.mark.timeout(480)]

FaultKind = Literal["kill", "stop", "nats"]

SEED_ENV: Final = "TICKMESH_CHAOS_SEED"
CHAOS_S: Final = 75.0
"""How long faults are injected."""
STEPS: Final = 3
"""Tasks per lifetime (the plan runs STEPS + 1 times)."""
STARTERS: Final = 4
START_EVERY_S: Final = (0.2, 0.8)
"""Each starter's pause between two starts (uniform)."""
MAX_ATTEMPTS: Final = 25
"""Deliveries a step may take (the pool counts every redelivery as an attempt)."""
STEP_TIMEOUT_S: Final = 30.0
SETTLE_S: Final = 150.0
"""How long, after healing, every lifetime has to end."""
BUDGET_S: Final = 420.0
"""The whole test, inside pytest's timeout (so that running out still prints the seed)."""
PAUSE_S: Final = (0.3, 4.0)
"""The pause before the next fault: after a fault ends, or after an overlapping one began."""
OVERLAP: Final = 0.3
"""The share of faults the next one does not wait for (two faults at once, on two targets)."""
STOP_S: Final = (1.0, 4.0)
"""How long a SIGSTOPped service stays stopped."""
DOWN_S: Final = (0.0, 1.5)
"""How long a SIGKILLed service or nats-server stays down before it is started again."""
FAULT_WEIGHTS: Final[dict[FaultKind, float]] = {"kill": 0.45, "stop": 0.35, "nats": 0.20}
KILLABLE: Final[tuple[ServiceName, ...]] = ("router", "state", "executor-pool", "guardrail")

COMPLETED: Final = lifetime_pb2.LIFETIME_STATE_COMPLETED
STATE_CHANGED: Final = lifetime_pb2.LIFETIME_EVENT_KIND_STATE_CHANGED


@dataclass
class Fault:
    """One fault of the schedule, and what it cost."""

    number: int
    kind: FaultKind
    target: str
    """A service, or ``nats-server``."""
    hold_s: float
    """Down (kill, nats) or stopped (stop) for this long."""
    pause_s: float
    """The pause after it."""
    overlap: bool
    """The next fault starts while this one still holds (after the pause)."""
    began: float = 0.0
    healed: float = 0.0
    serve_s: float = 0.0
    """A killed service: from its new start until SERVING."""
    recovery_s: float | None = None
    """From healing until the next lifetime completed (None: none did after it)."""

    def describe(self) -> str:
        what = {"kill": "SIGKILL", "stop": "SIGSTOP", "nats": "SIGKILL"}[self.kind]
        overlapped = " (overlapped)" if self.overlap else ""
        return f"#{self.number} {what} {self.target} {self.hold_s:.1f}s{overlapped}"

    def outcome(self) -> str:
        served = f", serving after {self.serve_s:.1f}s" if self.kind == "kill" else ""
        recovered = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        return f"{self.describe()}{served}, then a completion after {recovered}"


@dataclass
class Monkey:
    """The run's seed, schedule and observations."""

    seed: int
    rng: random.Random
    faults: list[Fault] = field(default_factory=list)
    requests: dict[str, str | None] = field(default_factory=dict)
    """Start request id -> the lifetime id it was answered with (None: not yet)."""
    start_errors: Counter[str] = field(default_factory=Counter)
    """Start calls that raised, by exception type (each retried with its request id)."""
    completions: list[float] = field(default_factory=list)
    """Loop time of every COMPLETED state change seen on the events subjects."""
    task_runs: Counter[str] = field(default_factory=Counter)
    """Task handler runs by execution id."""
    plan_runs: Counter[str] = field(default_factory=Counter)
    handler_rng: random.Random = field(default_factory=random.Random)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    """Background tasks (starters, overlapping faults), cancelled when the test ends."""

    @property
    def replay(self) -> str:
        return (
            f"seed {self.seed}; replay: {SEED_ENV}={self.seed} make chaos PYTEST_ARGS='-k monkey'"
        )

    def next_fault(self) -> Fault:
        """Draw the next fault (a fixed number of draws, so the schedule follows the seed)."""
        kinds: list[FaultKind] = list(FAULT_WEIGHTS)
        kind = self.rng.choices(kinds, weights=[FAULT_WEIGHTS[k] for k in kinds])[0]
        service = self.rng.choice(KILLABLE)
        hold = self.rng.uniform(*(STOP_S if kind == "stop" else DOWN_S))
        pause = self.rng.uniform(*PAUSE_S)
        overlap = self.rng.random() < OVERLAP
        target = "nats-server" if kind == "nats" else service
        fault = Fault(len(self.faults) + 1, kind, target, hold, pause, overlap)
        self.faults.append(fault)
        return fault


def seed_from_env() -> int:
    raw = os.environ.get(SEED_ENV, "").strip()
    return int(raw) if raw else random.SystemRandom().randrange(2**32)


_current: Monkey | None = None
"""The running test's monkey, for the handlers (registered once, at import)."""


def _monkey() -> Monkey:
    assert _current is not None, "a monkey handler ran outside the monkey test"
    return _current


@task(name="monkey_work")
async def work(ctx: TaskContext, job: dict[str, int]) -> int:
    monkey = _monkey()
    monkey.task_runs[ctx.execution_id] += 1
    await asyncio.sleep(monkey.handler_rng.uniform(0.0, 0.15))
    return job["n"] * 100 + job["k"]


@plan(name="monkey_loop")
async def loop(ctx: PlanContext, goal: dict[str, int], inputs: list[PlanInputView]) -> Decision:
    _monkey().plan_runs[ctx.execution_id] += 1
    done = ctx.iteration - 1
    if done:
        # Exactly one input: the task this plan dispatched last, with its exact result.
        expected = goal["n"] * 100 + done
        got = [(i.node_id, i.status, i.output, i.error_type, i.error_message) for i in inputs]
        if got != [("work", "succeeded", expected, "", "")]:
            return fail(f"step {done}: expected [('work', 'succeeded', {expected})], got {got}")
    if done >= STEPS:
        return complete({"n": goal["n"], "steps": done})
    return dispatch(step("work", {"n": goal["n"], "k": done + 1}))


RETRY: Final = Retry(max_attempts=MAX_ATTEMPTS, initial_backoff=0.2, max_backoff=1.0)
GRAPH: Final = (
    GraphBuilder("monkey")
    .plan("loop", "monkey_loop", retry=RETRY, timeout=STEP_TIMEOUT_S)
    .task("work", "monkey_work", retry=RETRY, timeout=STEP_TIMEOUT_S)
    .edge("loop", "work")
    .edge("work", "loop")
    .final("loop")
    .build()
)


@contextlib.contextmanager
def installed(monkey: Monkey) -> Iterator[None]:
    global _current
    _current = monkey
    try:
        yield
    finally:
        _current = None


async def test_random_faults_lose_and_double_nothing(start_cluster: ClusterFactory) -> None:
    seed = seed_from_env()
    monkey = Monkey(seed, random.Random(seed), handler_rng=random.Random(seed ^ 0x5EED))
    figure(f"monkey: {monkey.replay}")
    try:
        async with asyncio.timeout(BUDGET_S):
            with installed(monkey):
                await run(monkey, start_cluster)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n[monkey {monkey.replay}]") from exc
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}\n[monkey {monkey.replay}]") from exc
    finally:
        for job in monkey.tasks:
            job.cancel()
        await asyncio.gather(*monkey.tasks, return_exceptions=True)


async def run(monkey: Monkey, start_cluster: ClusterFactory) -> None:
    cluster = await start_cluster()
    loop_time = asyncio.get_running_loop().time
    names = cluster.names
    await cluster.worker([work, loop], concurrency=32)
    client = await Client.connect(cluster.router_target, tenant=cluster.tenant, call_timeout=5)
    cluster.clients.append(client)
    graph = await client.register_graph(GRAPH)

    async def on_event(msg: Msg) -> None:
        """Progress, for the recovery times: a lifetime completed (seen on the core subject;
        what is missed while nats-server is down only makes a recovery look longer)."""
        with contextlib.suppress(Exception):
            envelope = envelope_pb2.ExecutionEnvelope.FromString(msg.data)
            for event in events_of(envelope):
                if event.kind == STATE_CHANGED and event.state == COMPLETED:
                    monkey.completions.append(loop_time())

    assert cluster.nc is not None
    events = await cluster.nc.subscribe(names.evt_all, cb=on_event)

    stopping = asyncio.Event()

    async def starter(number: int) -> None:
        rng = random.Random(f"{monkey.seed}:{number}")
        count = 0
        while not stopping.is_set():
            count += 1
            request_id = f"monkey-{number}-{count}"
            monkey.requests[request_id] = None
            while True:  # until answered, even once stopping: every attempt names a lifetime
                try:
                    handle = await client.start_lifetime(
                        graph.id,
                        {"n": number * 10_000 + count},
                        version=graph.version,
                        request_id=request_id,
                    )
                except Exception as exc:  # the router or NATS is down: retry, same id
                    monkey.start_errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.2)
                    continue
                monkey.requests[request_id] = handle.id
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), rng.uniform(*START_EVERY_S))

    starters = [asyncio.create_task(starter(n)) for n in range(1, STARTERS + 1)]
    monkey.tasks.extend(starters)
    chaos_began = loop_time()
    locks: dict[str, asyncio.Lock] = {}  # one fault at a time per target
    overlapping: list[asyncio.Task[None]] = []

    async def one(fault: Fault) -> None:
        async with locks.setdefault(fault.target, asyncio.Lock()):
            await inject(cluster, fault, loop_time)

    try:
        await asyncio.sleep(2.0)  # some lifetimes in flight before the first fault
        while loop_time() - chaos_began < CHAOS_S:
            for job in overlapping:
                if job.done():
                    job.result()  # a fault that could not be applied or healed fails the test
            busy = {target for target, lock in locks.items() if lock.locked()}
            await check_alive(cluster, busy)
            fault = monkey.next_fault()
            job = asyncio.create_task(one(fault))
            monkey.tasks.append(job)
            if fault.overlap:
                overlapping.append(job)
            else:
                await job
            await asyncio.sleep(fault.pause_s)
        await asyncio.gather(*overlapping)
    finally:
        # Heal whatever a failure left behind.
        for job in overlapping:
            job.cancel()
        await asyncio.gather(*overlapping, return_exceptions=True)
        for name in SERVICES:
            service = cluster.services[name]
            if service.running:
                cluster.cont(name)
    chaos_s = loop_time() - chaos_began
    await check_alive(cluster, set())
    healed_at = loop_time()
    stopping.set()
    async with asyncio.timeout(60):
        await asyncio.gather(*starters)
    schedule = "; ".join(f.describe() for f in monkey.faults)
    figure(f"monkey seed {monkey.seed}: {len(monkey.faults)} faults in {chaos_s:.0f}s: {schedule}")

    # --- every start answered, each with its own lifetime ------------------------------------
    unanswered = sorted(r for r, lt in monkey.requests.items() if lt is None)
    assert not unanswered, f"starts never answered: {unanswered}"
    ids = [lt for lt in monkey.requests.values() if lt is not None]
    assert len(set(ids)) == len(ids), f"two start requests got one lifetime: {Counter(ids)}"

    # --- every lifetime ends, COMPLETED --------------------------------------------------------
    reader = await Client.connect(cluster.router_target, tenant=cluster.tenant, call_timeout=60)
    cluster.clients.append(reader)
    states = await wait_terminal(reader, ids, SETTLE_S)
    settled_s = loop_time() - healed_at
    listed = await reader.list_lifetimes(graph_id=graph.id, page_size=1000)
    quiet_s = await cluster.wait_quiet(within=60)
    work_durables = [
        (names.work_stream, names.work_consumer("task", "monkey_work")),
        (names.work_stream, names.work_consumer("plan", "monkey_loop")),
    ]
    for stream, durable in work_durables:
        await cluster.wait_drained(stream, durable, within=30)
    for fault in monkey.faults:
        after = [t for t in monkey.completions if t >= fault.healed]
        fault.recovery_s = min(after) - fault.healed if after else None
    figure(
        f"monkey seed {monkey.seed} faults:\n  " + "\n  ".join(f.outcome() for f in monkey.faults)
    )

    # --- the auditor, per lifetime; the store, across the tenant -------------------------------
    audits, failures = await audit_all(cluster, ids)
    store = read_store(cluster)
    all_records = [r for a in audits.values() for r in a.records]
    stored_tasks = {
        record_of(r).header.execution_id for r in all_records if r.HasField("task_execution")
    }
    reruns = sum(n - 1 for e, n in monkey.task_runs.items() if e in stored_tasks and n > 1)
    plan_reruns = sum(n - 1 for n in monkey.plan_runs.values() if n > 1)
    lost = sum(len(a.lost) for a in audits.values())
    missing_steps = {
        lt: c for lt, c in store.per_lifetime.items() if c != (STEPS, STEPS + 1, 2 * STEPS + 1)
    }
    lost += sum(max(0, STEPS - c[0]) + max(0, STEPS + 1 - c[1]) for c in missing_steps.values())
    completed = sum(1 for s in states.values() if s == "completed")
    recoveries = [f.recovery_s for f in monkey.faults if f.recovery_s is not None]
    longest = max(recoveries, default=float("nan"))
    worst = max(monkey.faults, key=lambda f: f.recovery_s or 0.0, default=None)
    gaps = sorted(t for t in monkey.completions if chaos_began <= t)
    longest_gap = max((b - a for a, b in itertools.pairwise(gaps)), default=0.0)
    kinds = Counter(f"{f.kind} {f.target}" for f in monkey.faults)
    figure(
        f"monkey seed {monkey.seed}: lifetimes attempted {len(monkey.requests)}, started "
        f"{len(ids)}, completed {completed} (states {dict(Counter(states.values()))}); "
        f"start errors retried {dict(monkey.start_errors)}; records {store.rows} "
        f"(distinct {store.distinct}), lost steps {lost}, dup {store.rows - store.distinct}; "
        f"handler re-runs: task {reruns}, plan {plan_reruns} (at least once); "
        f"faults {dict(kinds)}; longest recovery {longest:.2f}s "
        f"({worst.describe() if worst else '-'}), longest gap between completions "
        f"{longest_gap:.2f}s; all ended {settled_s:.1f}s after healing, quiet after "
        f"{quiet_s:.1f}s more; peak RSS {cluster.peak_rss_mib():.0f} MiB"
    )
    report.record(
        report.Row(
            test="monkey (random faults)",
            fault=f"{len(monkey.faults)} random faults in {chaos_s:.0f}s (seed {monkey.seed})",
            attempted=len(monkey.requests),
            acked=len(ids),
            persisted=completed,
            lost=lost,
            duplicated=store.rows - store.distinct,
            recovery_s=longest,
            peak_rss_mib=cluster.peak_rss_mib(),
        )
    )
    await events.unsubscribe()

    not_completed = {lt: s for lt, s in states.items() if s != "completed"}
    if not_completed:
        details = []
        for lifetime_id in sorted(not_completed)[:10]:
            info = await reader.get_lifetime(lifetime_id)
            details.append(f"{lifetime_id}: {info.state} {info.raw.error}".strip())
        raise AssertionError(
            f"{len(not_completed)} of {len(ids)} lifetimes did not complete:\n  "
            + "\n  ".join(details)
        )
    assert not failures, f"{len(failures)} lifetimes failed the audit:\n" + "\n".join(failures[:10])
    steps = {lt: (a.dispatched, a.stored) for lt, a in audits.items()}
    wrong = {lt: n for lt, n in steps.items() if n != (2 * STEPS + 1, 2 * STEPS + 1)}
    assert not wrong, f"(dispatched, stored) executions per lifetime: {wrong}"
    assert sorted(v.lifetime_id for v in listed) == sorted(ids), (
        "the router holds lifetimes of the graph no start answered with (or lacks some): "
        f"{sorted(set(v.lifetime_id for v in listed) ^ set(ids))[:10]}"
    )
    assert store.rows == store.distinct, f"dup: {store.rows - store.distinct} rows"
    assert not missing_steps, f"(task, plan, distinct) records per lifetime: {missing_steps}"
    assert set(store.per_lifetime) == set(ids), "records of lifetimes no start answered with"
    assert store.lifetimes == {lt: COMPLETED for lt in ids}, (
        "the state store's lifetimes are not all COMPLETED: "
        f"{Counter(store.lifetimes.values())}, missing {len(set(ids) - set(store.lifetimes))}"
    )
    assert set(monkey.task_runs) >= stored_tasks, "a stored task never ran"
    for stream in (names.work_stream, names.exec_stream, names.ref_stream, names.dlq_stream):
        held = (await cluster.js.stream_info(stream)).state.messages
        assert held == 0, f"{stream} holds {held} messages"
    durables = [
        (names.exec_stream, names.state_consumer),
        (names.evt_stream, f"{names.state_consumer}_events"),
        (names.ref_stream, names.router_consumer),
        *work_durables,
    ]
    for stream, durable in durables:
        consumer = await cluster.consumer_info(stream, durable)
        assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0), (
            f"{stream}/{durable}: pending {consumer.num_pending}, "
            f"ack pending {consumer.num_ack_pending}"
        )
    for name in SERVICES:
        await cluster.wait_serving(name, within=10)
    assert completed == len(ids) == len(monkey.requests) > 0


async def inject(cluster: Cluster, fault: Fault, now: Any) -> None:
    """Apply ``fault`` and heal it; stamp when it began and when it was healed."""
    fault.began = now()
    if fault.kind == "nats":
        await cluster.restart_nats(kill=True, down_s=fault.hold_s)
    elif fault.kind == "stop":
        name: ServiceName = fault.target  # type: ignore[assignment]
        cluster.stop(name)
        try:
            await asyncio.sleep(fault.hold_s)
        finally:
            cluster.cont(name)
    else:
        name = fault.target  # type: ignore[assignment]
        code = await cluster.kill(name)
        assert code == -9, f"{name} exited {code} on SIGKILL"
        await asyncio.sleep(fault.hold_s)
        fault.serve_s = await cluster.start_service(name)
    fault.healed = now()


async def check_alive(cluster: Cluster, busy: set[str]) -> None:
    """Fail if a service ended on its own (those ``busy`` in a fault may be down)."""
    for name in SERVICES:
        service = cluster.services[name]
        if name not in busy and not service.running:
            code = None if service.process is None else service.process.returncode
            raise AssertionError(
                f"{name} exited on its own (status {code}); log:\n{cluster.log_tail(name)}"
            )


async def audit_all(cluster: Cluster, ids: list[str]) -> tuple[dict[str, AuditReport], list[str]]:
    """The lifetime auditor over every lifetime (four at a time)."""
    gate = asyncio.Semaphore(4)
    audits: dict[str, AuditReport] = {}
    failures: list[str] = []

    async def one(lifetime_id: str) -> None:
        async with gate:
            try:
                audits[lifetime_id] = await audit_lifetime(
                    cluster.state_target,
                    cluster.tenant,
                    lifetime_id,
                    router_target=cluster.router_target,
                    settle_s=5.0,
                )
            except AssertionError as exc:
                failures.append(str(exc))

    await asyncio.gather(*(one(lt) for lt in ids))
    return audits, failures


@dataclass(frozen=True, slots=True)
class Store:
    """What the SQLite store holds for the tenant."""

    rows: int
    distinct: int
    """Distinct (execution id, attempt)."""
    per_lifetime: dict[str, tuple[int, int, int]]
    """Lifetime -> (task rows, plan rows, distinct execution ids)."""
    lifetimes: dict[str, int]
    """Lifetime -> its state in the store's lifetimes table."""


def read_store(cluster: Cluster) -> Store:
    """Read the state service's SQLite database (read-only, beside the running service)."""
    db = sqlite3.connect(f"file:{cluster.work_dir / 'state.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows, distinct = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT execution_id || ':' || attempt) FROM executions "
            "WHERE tenant = ?",
            (cluster.tenant,),
        ).fetchone()
        per_lifetime = {
            lt: (int(t), int(p), int(d))
            for lt, t, p, d in db.execute(
                "SELECT lifetime_id, SUM(kind = 'task'), SUM(kind = 'plan'), "
                "COUNT(DISTINCT execution_id) FROM executions WHERE tenant = ? "
                "GROUP BY lifetime_id",
                (cluster.tenant,),
            )
        }
        lifetimes = {
            lt: int(state)
            for lt, state in db.execute(
                "SELECT lifetime_id, state FROM lifetimes WHERE tenant = ?", (cluster.tenant,)
            )
        }
    finally:
        db.close()
    return Store(int(rows), int(distinct), per_lifetime, lifetimes)
