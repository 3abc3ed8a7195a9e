"""12, 15. Bad input, the slow half: mutation fuzz of records, hostile guardrail YAML
(RELIABILITY.md §4.2; outside the ★ subset: ``make chaos`` runs them).

What is already covered elsewhere, and not repeated here:

* tests/unit/sdk/test_convert.py fuzzes ``decode_envelope`` alone (random bytes; bit flips
  and truncations of one plan request) for "ValidationError or nothing";
* tests/unit/policy/test_document.py refuses each hostile document in ``validate_policy``
  (alias bomb, foreign tags, oversized, deep nesting) with line and column.

Added here:

* 12: bit flips, truncations, splices and byte inserts/deletes of valid execution records,
  fed through the state consumer's whole per-record path (``decode_envelope`` with the type
  header, ``core.check_record`` for the subject, the store's append, the ref it republishes):
  each ends as a stored row or a clean ``ValidationError``, never another exception, each
  in < 50 ms. Figure: cases, accepted / rejected, p50 / p99 / max per case.
* 15: the same hostile documents sent to the running guardrail service (``PutPolicy``), plus
  a 10 MB one: each refused within 1 s with a clear message, and the policy stored before
  them is still the one the router enforces (a step it rejects is still rejected).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.chaos import report
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import Cluster, figure
from tests.support.records import execution_record, unknown_field
from tests.support.service_harness import tenant_metadata
from tickmesh.runtime.policy import MAX_NESTING, MAX_POLICY_BYTES, validate_policy
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import (
    BodyKind,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    ValidationError,
    complete,
    decode_envelope,
    dispatch,
    encode_envelope,
    plan,
    step,
    task,
)
from tickmesh.state import core
from tickmesh.state.store import SQLiteStateStore
from tickmesh.v1 import guardrail_service_pb2, guardrail_service_pb2_grpc, header_pb2

pytestmark = pytest.mark.slow_chaos

# --- 12 ----------------------------------------------------------------------------------

FUZZ_CASES = 1000
CASE_BUDGET_S = 0.050
TENANT = "fuzz"
LIFETIME_ID = "019a0000-0000-7000-8000-0000000000f1"
SUBJECT = TenantNames(TENANT).exec(LIFETIME_ID)
PRODUCER = header_pb2.Producer(service="state", instance="fuzz")


def _seeds() -> list[tuple[bytes, BodyKind]]:
    """Valid records of both kinds, one with unknown fields and one with a nested Struct."""
    task_raw, _ = execution_record(1, tenant=TENANT, lifetime_id=LIFETIME_ID)
    plan_raw, _ = execution_record(2, tenant=TENANT, lifetime_id=LIFETIME_ID, kind="plan")
    extra_raw, _ = execution_record(
        3, tenant=TENANT, lifetime_id=LIFETIME_ID, extra=unknown_field(b"newer")
    )
    _, nested = execution_record(4, tenant=TENANT, lifetime_id=LIFETIME_ID)
    details = nested.task_execution.result.error.details
    details.fields["list"].list_value.values.add().struct_value.fields["x"].number_value = 1.5
    details.fields["text"].string_value = "héllo"
    return [
        (task_raw, "task_execution"),
        (plan_raw, "plan_execution"),
        (extra_raw, "task_execution"),
        (encode_envelope(nested), "task_execution"),
    ]


SEEDS = _seeds()


@st.composite
def mutants(draw: st.DrawFn) -> tuple[bytes, BodyKind]:
    """One valid record, mutated 1..4 times (bit flip, truncation, splice, insert, delete)."""
    data, kind = SEEDS[draw(st.integers(0, len(SEEDS) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "splice", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[at:]
        elif op == "splice":
            other, _ = SEEDS[draw(st.integers(0, len(SEEDS) - 1))]
            cut = draw(st.integers(0, len(other)))
            out[at:] = other[cut:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 8))]
    return bytes(out), kind


async def test_mutated_records_end_as_a_row_or_a_clean_reject(tmp_path: Path) -> None:
    store = await SQLiteStateStore.open(tmp_path / "fuzz.db", synchronous="OFF")
    loop = asyncio.get_running_loop()
    timings: list[float] = []
    outcomes = {"stored": 0, "duplicate": 0, "rejected": 0}
    slow: list[tuple[float, bytes]] = []

    def through_state(data: bytes, kind: BodyKind) -> None:
        """What RecordConsumer does with one message (decode, check, append, ref)."""
        try:
            env = decode_envelope(data, expected_kind=kind)
            core.check_record(SUBJECT, env)
        except ValidationError:
            outcomes["rejected"] += 1
            return
        future = asyncio.run_coroutine_threadsafe(
            store.append_executions(TENANT, [(data, env)]), loop
        )
        [row] = future.result(timeout=5)
        TenantNames(TENANT).ref(env.header.lifetime_id)  # the subject its ref goes to
        encode_envelope(core.ref_envelope(row, env, PRODUCER))
        outcomes["duplicate" if row.duplicate else "stored"] += 1

    @settings(
        max_examples=FUZZ_CASES,
        deadline=None,  # timed below, per case, to report p99 too
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(mutants())
    def fuzz(case: tuple[bytes, BodyKind]) -> None:
        began = time.perf_counter()
        through_state(*case)
        spent = time.perf_counter() - began
        timings.append(spent)
        if spent >= CASE_BUDGET_S:
            slow.append((spent, case[0]))

    began = time.perf_counter()
    try:
        await asyncio.to_thread(fuzz)
    finally:
        await store.close()
    total_s = time.perf_counter() - began
    quantiles = statistics.quantiles(timings, n=100)
    p50, p99, worst = quantiles[49], quantiles[98], max(timings)
    figure(
        f"12 mutation fuzz: {len(timings)} cases in {total_s:.1f} s: {outcomes['stored']} "
        f"stored, {outcomes['duplicate']} duplicates of a stored row, "
        f"{outcomes['rejected']} rejected; per case p50 {p50 * 1000:.2f} ms, "
        f"p99 {p99 * 1000:.2f} ms, max {worst * 1000:.2f} ms"
    )
    accepted = outcomes["stored"] + outcomes["duplicate"]
    report.record(
        report.Row(
            test="12 mutation fuzz",
            fault=f"{len(timings)} mutated records (flip/truncate/splice/insert/delete)",
            attempted=len(timings),
            acked=accepted,
            persisted=accepted,
            lost=0,
            duplicated=0,
        )
    )
    assert len(timings) >= FUZZ_CASES // 2  # hypothesis stops early only when it runs dry
    assert outcomes["rejected"]
    assert accepted
    assert not slow, [(f"{s * 1000:.1f} ms", d.hex()) for s, d in slow[:5]]


# --- 15 ----------------------------------------------------------------------------------

GUARD = """\
policy: guard
rules:
  - id: costly-step
    scope: execution
    phase: pre_dispatch
    when: estimate.cost_usd > 1
    action: reject_execution
"""


def _alias_bomb() -> str:
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        bomb += f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    return bomb + "policy: guard\nrules: []\n"


# (case, document, status expected from PutPolicy, what the message must say)
ABUSE: list[tuple[str, str, grpc.StatusCode, str]] = [
    ("alias bomb", _alias_bomb(), grpc.StatusCode.INVALID_ARGUMENT, "anchors are not allowed"),
    (
        "1 MiB document",
        "policy: guard\nrules: []\n" + ("# " + "x" * 1022 + "\n") * 1024,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"a policy may be at most {MAX_POLICY_BYTES}",
    ),
    (
        "10 MB document",
        "policy: guard\nrules: []\n" + ("# " + "x" * 998 + "\n") * 10_000,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    (
        "deep nesting",
        "policy: guard\nrules: []\ndescription: " + "[" * 50_000 + "]" * 50_000 + "\n",
        grpc.StatusCode.INVALID_ARGUMENT,
        f"nesting deeper than {MAX_NESTING} levels",
    ),
    (
        "!!python/object tag",
        "policy: guard\nrules: !!python/object/apply:os.system ['echo pwned']\n",
        grpc.StatusCode.INVALID_ARGUMENT,
        "tag !!python/object/apply:os.system is not allowed",
    ),
]


@plan(name="driver")
async def driver(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    if inputs:
        return complete([(i.node_id, i.status, i.error_type) for i in inputs])
    return dispatch(step("work", goal))


@task(name="work")
async def work(ctx: TaskContext, n: int) -> int:
    return n


GRAPH = (
    GraphBuilder("yaml-abuse")
    .plan("driver")
    .task("work", config={"estimate": {"cost_usd": 2}})
    .edge("driver", "work")
    .edge("work", "driver")
    .final("driver")
    .build()
)
REJECTED = [["work", "rejected", "guardrail.rejected"]]


async def _run(cluster: Cluster, graph_id: str, version: int) -> Any:
    client = cluster.clients[0]
    handle = await client.start_lifetime(graph_id, 1, version=version)
    return await handle.result(within=20)


async def until_async(check: Callable[[], Any], *, within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.1)


async def test_hostile_policy_yaml_is_refused_fast_and_the_valid_policy_stays_enforced(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster()
    await cluster.worker([driver, work])
    client = await cluster.client()
    graph = await client.register_graph(GRAPH)
    md = tenant_metadata(cluster.tenant)
    async with grpc.aio.insecure_channel(cluster.guardrail_target) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        put = await stub.PutPolicy(
            guardrail_service_pb2.PutPolicyRequest(source=GUARD), metadata=md
        )
        good = put.policy

        async def enforced() -> bool:
            return bool(await _run(cluster, graph.id, graph.version) == REJECTED)

        await until_async(enforced, within=15, what="the router enforcing the valid policy")

        results: list[tuple[str, int, float, grpc.StatusCode | None, str]] = []
        for case, document, _, _ in ABUSE:
            began = time.perf_counter()
            try:
                await stub.PutPolicy(
                    guardrail_service_pb2.PutPolicyRequest(source=document), metadata=md, timeout=5
                )
                code, message = None, "accepted"
            except grpc.aio.AioRpcError as exc:
                code, message = exc.code(), exc.details() or ""
            results.append((case, len(document), time.perf_counter() - began, code, message))
        # The 10 MB file never reaches the service over gRPC; refused by validation too.
        ten_mb = ABUSE[2][1]
        began = time.perf_counter()
        issues = validate_policy(ten_mb, name="10mb.yaml")
        local_s = time.perf_counter() - began
        listed = await stub.ListPolicies(guardrail_service_pb2.ListPoliciesRequest(), metadata=md)
    after = await _run(cluster, graph.id, graph.version)
    guardrail_up = cluster.services["guardrail"].running

    lines = "\n".join(
        f"  {case:20} {size:>9} B  {spent * 1000:7.1f} ms  {code and code.name}  {message[:90]!r}"
        for case, size, spent, code, message in results
    )
    figure(
        f"15 guardrail YAML abuse:\n{lines}\n  10 MB through validate_policy: "
        f"{local_s * 1000:.1f} ms, {issues[0].message[:80]!r}; enforced afterwards: {after}"
    )
    report.record(
        report.Row(
            test="15 guardrail YAML abuse",
            fault=f"{len(ABUSE)} hostile policy documents via PutPolicy",
            attempted=len(ABUSE),
            acked=sum(1 for r in results if r[3] is None),
            persisted=len(listed.policies),
            lost=0,
            duplicated=0,
            recovery_s=max(r[2] for r in results),
            peak_rss_mib=cluster.peak_rss_mib(),
        )
    )
    for (case, _, spent, code, message), (_, _, expected, fragment) in zip(
        results, ABUSE, strict=True
    ):
        assert code == expected, (case, code, message)
        assert fragment in message, (case, message)
        assert spent < 1.0, (case, spent)
    assert issues
    assert f"a policy may be at most {MAX_POLICY_BYTES}" in issues[0].message
    assert local_s < 1.0
    assert [(p.policy_id, p.version, p.digest) for p in listed.policies] == [
        (good.policy_id, good.version, good.digest)
    ]
    assert after == REJECTED
    assert guardrail_up
