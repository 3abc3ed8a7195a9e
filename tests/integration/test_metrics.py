"""The Prometheus endpoints: the embedded mesh's counters agree with what the state service
stored, labels carry no lifetime or execution ids, and `tickmesh serve` exposes /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support.audit import list_executions
from tests.support.nats_server import new_tenant
from tests.support.ports import free_port
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.metrics import Metrics, num_delivered, step_status
from tickmesh.runtime.subjects import HDR_TYPE, TenantNames
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    Worker,
    complete,
    dispatch,
    plan,
    step,
    task,
)
from tickmesh.v1 import envelope_pb2, execution_pb2

pytestmark = pytest.mark.integration

WAIT_S = 15.0
ROUNDS = 3


def scrape(url: str) -> list[Sample]:
    """Every sample the endpoint at ``url`` serves (blocking: run it in a thread)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def until(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.05)


def as_envelope(ref: execution_pb2.ExecutionRef) -> envelope_pb2.ExecutionEnvelope:
    """The stored record of ``ref`` in the envelope shape the state service counts."""
    envelope = envelope_pb2.ExecutionEnvelope()
    if ref.HasField("task_execution"):
        envelope.task_execution.CopyFrom(ref.task_execution)
        envelope.header.CopyFrom(ref.task_execution.header)
    else:
        envelope.plan_execution.CopyFrom(ref.plan_execution)
        envelope.header.CopyFrom(ref.plan_execution.header)
    return envelope


@plan(name="loop")
async def loop(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    done = ctx.iteration - 1
    if done >= goal["rounds"]:
        return complete({"rounds": done})
    return dispatch(step("llm", {"round": done + 1}))


@task(name="llm")
async def llm(ctx: TaskContext, job: dict[str, int]) -> int:
    ctx.report(input_tokens=300 + job["round"], output_tokens=100, cost_micros=4_000)
    return job["round"]


@pytest.fixture
async def mesh(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Mesh]:
    mesh = Mesh(
        MeshConfig(
            nats_url=nats_server.url,
            tenants=(new_tenant("mx"),),
            data_dir=tmp_path / "mesh",
            metrics_listen="127.0.0.1:0",
        )
    )
    await mesh.start()
    try:
        yield mesh
    finally:
        await mesh.stop()


async def test_mesh_metrics_match_what_the_state_service_stored(mesh: Mesh) -> None:
    [tenant] = mesh.config.tenants
    assert mesh.metrics is not None
    url = mesh.metrics.url
    graph = (
        GraphBuilder("metered", max_iterations=20)
        .plan("loop")
        .task("llm")
        .edge("loop", "llm")
        .edge("llm", "loop")
        .final("loop")
        .build()
    )
    worker = Worker(mesh.pool_target, tenant=tenant, tasks=[loop, llm])
    async with worker, await Client.connect(mesh.router_target, tenant=tenant) as client:
        async with asyncio.timeout(5):
            await worker.wait_connected()
        registered = await client.register_graph(graph)
        handle = await client.start_lifetime(
            registered.id, {"rounds": ROUNDS}, version=registered.version
        )
        assert await handle.result(within=WAIT_S) == {"rounds": ROUNDS}
        refs = await list_executions(mesh.state_target, tenant, handle.id)
        assert len(refs) == 2 * ROUNDS + 1  # ROUNDS model calls, ROUNDS + 1 plan decisions

        # What the store holds, by the counters' labels.
        steps: Counter[tuple[str, str, str]] = Counter()
        tokens_in = tokens_out = cost = 0
        for ref in refs:
            envelope = as_envelope(ref)
            kind, status = step_status(envelope)
            steps[(kind, envelope.header.node.handler, status)] += 1
            record = ref.task_execution if kind == "task" else ref.plan_execution
            tokens_in += record.result.telemetry.input_tokens
            tokens_out += record.result.telemetry.output_tokens
            cost += record.result.telemetry.cost_micros
        assert tokens_in == sum(300 + r for r in range(1, ROUNDS + 1))
        assert steps == {
            ("task", "llm", "succeeded"): ROUNDS,
            ("plan", "loop", "succeeded"): ROUNDS + 1,
        }

        mesh.metrics.consumers_changed()

        def polled(samples: list[Sample]) -> set[str]:
            return {
                s.labels["consumer"]
                for s in samples
                if s.name == "tickmesh_consumer_ack_pending_messages"
                and s.labels["tenant"] == tenant
            }

        consumers = {
            "router",
            "router_records",
            "state",
            "state_events",
            "pool_task_llm",
            "pool_plan_loop",
        }

        async def settled() -> bool:
            samples = await asyncio.to_thread(scrape, url)
            stored = total(samples, "tickmesh_steps_total", tenant=tenant)
            return stored == len(refs) and polled(samples) >= consumers

        await until(settled, within=WAIT_S, what="the counters catching up with the store")
        samples = await asyncio.to_thread(scrape, url)
        executors = total(samples, "tickmesh_executors_connected", tenant=tenant)

    labels = {"tenant": tenant, "graph": "metered"}
    for (kind, handler, status), count in steps.items():
        assert (
            total(
                samples, "tickmesh_steps_total", **labels, kind=kind, handler=handler, status=status
            )
            == count
        )
    assert total(samples, "tickmesh_input_tokens_total", **labels) == tokens_in
    assert total(samples, "tickmesh_output_tokens_total", **labels) == tokens_out
    assert total(samples, "tickmesh_cost_micros_total", **labels) == cost
    # Every step was allowed before its dispatch and after its result (a compare-and-set
    # conflict would evaluate again, hence at least).
    for phase in ("pre_dispatch", "post_result"):
        allowed = total(
            samples, "tickmesh_guardrail_decisions_total", **labels, phase=phase, action="allow"
        )
        assert allowed >= len(refs), (phase, allowed)
    # One overhead observation per applied result.
    assert total(samples, "tickmesh_step_overhead_seconds_count", **labels) == len(refs)
    assert total(samples, "tickmesh_dead_letters_total", tenant=tenant) == 0
    assert executors == 1
    assert {
        s.labels["consumer"]
        for s in samples
        if s.name == "tickmesh_consumer_pending_messages" and s.labels["tenant"] == tenant
    } == consumers
    services = {s.labels["service"] for s in samples if s.name == "tickmesh_service_info"}
    assert services == {"router", "state", "guardrail", "executor-pool"}

    # No label value carries a lifetime, execution or envelope id.
    ids = {handle.id}
    for ref in refs:
        record = ref.task_execution if ref.HasField("task_execution") else ref.plan_execution
        ids |= {record.header.execution_id, record.header.envelope_id}
    ids.discard("")
    values = {v for s in samples for v in s.labels.values()}
    leaked = {v for v in values if any(i in v for i in ids)}
    assert not leaked, leaked


async def test_dead_letters_are_counted_by_kind(mesh: Mesh) -> None:
    [tenant] = mesh.config.tenants
    assert mesh.metrics is not None
    url = mesh.metrics.url
    nc = await tm_nats.connect(mesh.nats_url, name="metrics-test")
    try:
        js = tm_nats.jetstream(nc)
        await js.publish(
            TenantNames(tenant).exec("lt_garbage"), b"not an envelope", headers={HDR_TYPE: "nope"}
        )
    finally:
        await nc.close()

    async def counted() -> bool:
        samples = await asyncio.to_thread(scrape, url)
        return total(samples, "tickmesh_dead_letters_total", tenant=tenant, kind="exec") == 1

    await until(counted, within=WAIT_S, what="the exec dead letter counted")


def test_redeliveries_count_messages_delivered_before() -> None:
    metrics = Metrics()

    def delivered(times: int) -> Msg:
        # The JetStream ack subject: stream, consumer, delivered, stream seq, consumer seq,
        # timestamp, pending.
        reply = f"$JS.ACK.TM_T_REF.router.{times}.7.7.1700000000000000000.0"
        return Msg(None, reply=reply)  # type: ignore[arg-type]  # no client: never acked

    metrics.count_redeliveries("t", "router", [delivered(1), delivered(2), delivered(5)])
    metrics.count_redeliveries("t", "router", [delivered(1)])
    assert (
        metrics.registry.get_sample_value(
            "tickmesh_redeliveries_total", {"tenant": "t", "consumer": "router"}
        )
        == 2
    )
    # The fast parse agrees with nats-py's on both ack subject versions.
    for reply in (
        "$JS.ACK.TM_T_REF.router.3.7.8.1700000000000000000.4",
        "$JS.ACK.hub.ACCHASH.TM_T_REF.router.4.7.8.1700000000000000000.4",
        "$JS.ACK.hub.ACCHASH.TM_T_REF.router.5.7.8.1700000000000000000.4.xyz",
    ):
        expected = Msg(None, reply=reply).metadata.num_delivered  # type: ignore[arg-type]
        assert num_delivered(reply) == expected
    assert num_delivered("_INBOX.abc") == 0
    assert num_delivered(None) == 0


async def test_tickmesh_serve_exposes_metrics(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    tenant = new_tenant("mx")
    port = free_port()
    env = {
        **os.environ,
        "TICKMESH_STATE_NATS_URL": nats_server.url,
        "TICKMESH_STATE_TENANTS": tenant,
        "TICKMESH_STATE_STORE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        "TICKMESH_STATE_BLOB_URL": str(tmp_path / "blobs"),
        "TICKMESH_STATE_METRICS_LISTEN": f"127.0.0.1:{port}",
    }
    tickmesh = Path(sys.executable).with_name("tickmesh")
    process = await asyncio.create_subprocess_exec(
        str(tickmesh),
        "serve",
        "state",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    found: list[Sample] = []
    try:

        async def consumers_reported() -> bool:
            if process.returncode is not None:
                raise AssertionError("tickmesh serve state exited")
            try:
                samples = await asyncio.to_thread(scrape, url)
            except OSError:
                return False
            found[:] = samples
            return {"state", "state_events"} <= {
                s.labels["consumer"]
                for s in samples
                if s.name == "tickmesh_consumer_ack_pending_messages"
                and s.labels["tenant"] == tenant
            }

        await until(consumers_reported, within=20, what="the state service's /metrics")
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    names = {s.name for s in found}
    assert {"tickmesh_service_info", "process_cpu_seconds_total"} <= names
    [info] = [s for s in found if s.name == "tickmesh_service_info"]
    assert info.labels["service"] == "state"
    consumers = {
        s.labels["consumer"]
        for s in found
        if s.name == "tickmesh_consumer_pending_messages" and s.labels["tenant"] == tenant
    }
    assert consumers == {"state", "state_events"}
    assert not [s for s in found if s.name == "tickmesh_steps_total"]  # nothing stored yet
