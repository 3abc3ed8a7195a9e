"""The executor pool against a real nats-server, with real Python Workers over gRPC.

Requests are published straight into the tenant's work stream (as the router
would), and the test reads execution records and dead letters from their
streams with plain nats-py consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from google.protobuf import duration_pb2
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tests.support.nats_server import new_tenant
from tests.support.service_harness import eventually
from tickmesh.executor_pool.config import ExecutorPoolSettings
from tickmesh.executor_pool.server import ExecutorPoolService, build
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.blobs import LocalBlobStore
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.runtime.subjects import (
    HDR_EXECUTION,
    HDR_LIFETIME,
    HDR_MSG_ID,
    HDR_REASON,
    HDR_TENANT,
    HDR_TYPE,
    TenantNames,
)
from tickmesh.sdk import TaskError, decode_envelope, encode_envelope, execution_id, uuid7
from tickmesh.sdk._plan import Decision, Plan, PlanContext, PlanInputView, dispatch, plan, step
from tickmesh.sdk._task import Task, TaskContext, task
from tickmesh.sdk._worker import Worker
from tickmesh.v1 import (
    envelope_pb2,
    graph_pb2,
    header_pb2,
    payload_pb2,
    request_pb2,
    result_pb2,
)

Handler = Task[Any, Any] | Plan[Any]


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def _retry(max_attempts: int, backoff_s: float = 0.05) -> graph_pb2.RetryPolicy:
    return graph_pb2.RetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=_duration(backoff_s),
        max_backoff=_duration(backoff_s * 4),
        backoff_multiplier=2.0,
    )


@dataclass
class Mesh:
    """A pool on a fresh tenant, plus helpers to feed it and watch what it publishes."""

    tenant: str
    names: TenantNames
    nc: NatsClient
    js: JetStreamContext
    blobs: LocalBlobStore
    service: ExecutorPoolService
    workers: list[Worker] = field(default_factory=list)
    _records: Any = None
    _dlq: Any = None

    @property
    def target(self) -> str:
        return self.service.target

    def worker(self, tasks: list[Handler], **kwargs: Any) -> Worker:
        worker = Worker(self.target, tenant=self.tenant, tasks=tasks, **kwargs)
        self.workers.append(worker)
        return worker

    async def start_worker(self, tasks: list[Handler], **kwargs: Any) -> Worker:
        worker = self.worker(tasks, **kwargs)
        await worker.__aenter__()
        async with asyncio.timeout(5):
            await worker.wait_connected()
        return worker

    def request(
        self,
        handler: str,
        input_json: str = "{}",
        *,
        kind: str = "task",
        node_id: str = "step",
        lifetime_id: str | None = None,
        retry: graph_pb2.RetryPolicy | None = None,
        timeout_s: float | None = None,
    ) -> envelope_pb2.ExecutionEnvelope:
        lifetime_id = lifetime_id or uuid7()
        exec_id = execution_id(self.tenant, lifetime_id, [], node_id, 1)
        node_kind = graph_pb2.NODE_KIND_TASK if kind == "task" else graph_pb2.NODE_KIND_PLAN
        env = envelope_pb2.ExecutionEnvelope(
            header=header_pb2.EnvelopeHeader(
                envelope_id=uuid7(),
                tenant_id=self.tenant,
                lifetime_id=lifetime_id,
                execution_id=exec_id,
                attempt=1,
                iteration=1,
                node=header_pb2.NodeRef(id=node_id, kind=node_kind, handler=handler),
                idempotency_key=f"req:{exec_id}",
                trace_context=header_pb2.TraceContext(
                    traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                ),
            )
        )
        env.header.created_at.GetCurrentTime()
        data = input_json.encode()
        payload = payload_pb2.Payload(
            content_type="application/json",
            inline=data,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        body: request_pb2.TaskRequest | request_pb2.PlanRequest
        if kind == "task":
            body = env.task_request
            body.input.CopyFrom(payload)
        else:
            body = env.plan_request
            body.goal.CopyFrom(payload)
        if retry is not None:
            body.retry.CopyFrom(retry)
        if timeout_s is not None:
            body.timeout.CopyFrom(_duration(timeout_s))
        return env

    async def publish(self, env: envelope_pb2.ExecutionEnvelope) -> None:
        kind = env.WhichOneof("body")
        assert kind in ("task_request", "plan_request")
        header = env.header
        await self.js.publish(
            self.names.work(kind.removesuffix("_request"), header.node.handler),  # type: ignore[arg-type]
            encode_envelope(env),
            headers={
                HDR_MSG_ID: header.idempotency_key,
                HDR_TYPE: kind,
                HDR_TENANT: self.tenant,
                HDR_LIFETIME: header.lifetime_id,
                HDR_EXECUTION: header.execution_id,
            },
        )

    async def submit(self, handler: str, input_json: str = "{}", **kwargs: Any) -> str:
        env = self.request(handler, input_json, **kwargs)
        await self.publish(env)
        return env.header.execution_id

    async def records(
        self, count: int, within: float = 8.0
    ) -> list[envelope_pb2.ExecutionEnvelope]:
        """Wait for ``count`` execution records (and take them off the stream)."""
        if self._records is None:
            self._records = await self.js.pull_subscribe(
                self.names.exec_all, durable="test_records", stream=self.names.exec_stream
            )
        msgs = await _fetch(self._records, count, within)
        out = []
        for msg in msgs:
            assert msg.headers is not None
            kind = msg.headers[HDR_TYPE]
            assert kind in ("task_execution", "plan_execution")
            env = decode_envelope(msg.data, expected_kind=kind)  # type: ignore[arg-type]
            assert msg.headers[HDR_MSG_ID] == f"exec:{env.header.execution_id}"
            assert msg.headers[HDR_TENANT] == self.tenant
            assert msg.headers[HDR_LIFETIME] == env.header.lifetime_id
            assert msg.headers[HDR_EXECUTION] == env.header.execution_id
            out.append(env)
        return out

    async def no_more_records(self, wait: float = 0.5) -> None:
        extra = await self.records(1, within=wait)
        assert not extra, f"unexpected extra records: {extra}"

    async def dead_letters(self, count: int, within: float = 8.0) -> list[Msg]:
        if self._dlq is None:
            self._dlq = await self.js.pull_subscribe(
                self.names.dlq_all, durable="test_dlq", stream=self.names.dlq_stream
            )
        return await _fetch(self._dlq, count, within)

    async def work_pending(self) -> int:
        info = await self.js.stream_info(self.names.work_stream)
        return int(info.state.messages)

    async def wait_work_drained(self, within: float = 5.0) -> None:
        """Every request was acked (the work-queue stream is empty)."""
        deadline = time.monotonic() + within
        pending = await self.work_pending()
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            pending = await self.work_pending()
        assert pending == 0, "the request was not acked"


async def _fetch(sub: Any, count: int, within: float) -> list[Msg]:
    msgs: list[Msg] = []
    deadline = time.monotonic() + within
    while len(msgs) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        with contextlib.suppress(TimeoutError):
            batch = await sub.fetch(count - len(msgs), timeout=min(remaining, 1.0))
            for msg in batch:
                await msg.ack()
            msgs.extend(batch)
    return msgs


PoolFactory = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def start_pool(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[PoolFactory]:
    meshes: list[Mesh] = []
    connections: list[NatsClient] = []

    async def factory(**overrides: Any) -> Mesh:
        tenant = new_tenant()
        nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
        connections.append(nc)
        js = runtime_nats.jetstream(nc)
        names = await ensure_tenant(js, tenant)
        settings = ExecutorPoolSettings(
            tenants=[tenant],
            grpc_listen="127.0.0.1:0",
            blob_url=str(tmp_path / "blobs"),
            **overrides,
        )
        blobs = LocalBlobStore(settings.blob_url, fsync=False)
        service = await build(settings, nc=nc, js=js, blobs=blobs)
        await service.start()
        mesh = Mesh(tenant, names, nc, js, blobs, service)
        meshes.append(mesh)
        return mesh

    yield factory
    for mesh in meshes:
        for worker in mesh.workers:
            await worker.shutdown(grace=1.0)
        await mesh.service.stop(grace=0.5)
        await mesh.blobs.close()
    for nc in connections:
        await nc.close()


# --- handlers -----------------------------------------------------------------------------


def _status(env: envelope_pb2.ExecutionEnvelope) -> str:
    return result_pb2.TaskStatus.Name(env.task_execution.result.status)


async def test_pool_records_one_execution_and_acks_the_request(start_pool: PoolFactory) -> None:
    mesh = await start_pool()

    @task
    async def double(ctx: TaskContext, value: dict[str, int]) -> dict[str, int]:
        ctx.report(input_tokens=10, output_tokens=5, cost_micros=7, model="m1")
        return {"n": value["n"] * 2, "attempt": ctx.attempt}

    worker = await mesh.start_worker([double])
    request = mesh.request("double", '{"n":21}')
    await mesh.publish(request)

    [record] = await mesh.records(1)
    execution = record.task_execution
    assert record.header.producer.service == "executor-pool"
    assert record.header.envelope_id != request.header.envelope_id
    assert record.header.trace_context.traceparent == request.header.trace_context.traceparent
    assert execution.header.execution_id == request.header.execution_id
    assert execution.header.lifetime_id == request.header.lifetime_id
    assert execution.header.attempt == 1
    assert (
        execution.request_digest
        == hashlib.sha256(request.task_request.SerializeToString(deterministic=True)).hexdigest()
    )
    assert _status(record) == "TASK_STATUS_SUCCEEDED"
    assert execution.result.output.content_type == "application/json"
    assert execution.result.output.inline == b'{"n":42,"attempt":1}'
    assert execution.result.telemetry.input_tokens == 10
    assert execution.result.telemetry.model_usage[0].model == "m1"
    assert execution.executor.executor_id == worker.executor_id
    assert execution.executor.code_digest == double.code_digest
    assert execution.executor.runtime.startswith("python ")
    assert execution.HasField("started_at")
    assert execution.HasField("finished_at")
    await mesh.wait_work_drained()
    await mesh.no_more_records()


async def test_pool_respects_executor_concurrency(start_pool: PoolFactory) -> None:
    mesh = await start_pool()
    running = 0
    peak = 0

    @task
    async def slow(ctx: TaskContext, value: Any) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.2)
        finally:
            running -= 1
        return 1

    for i in range(6):
        await mesh.submit("slow", node_id=f"n{i}")
    worker = await mesh.start_worker([slow], concurrency=2)
    records = await mesh.records(6)
    assert len(records) == 6
    assert peak == 2
    assert mesh.service.pool.stats.max_in_flight[worker.executor_id] == 2
    await mesh.wait_work_drained()


async def test_pool_sends_assignments_in_batches(start_pool: PoolFactory) -> None:
    mesh = await start_pool()

    @task
    async def echo(ctx: TaskContext, value: Any) -> Any:
        return value

    for i in range(50):
        await mesh.submit("echo", f'{{"i":{i}}}', node_id=f"n{i}")
    worker = await mesh.start_worker([echo], concurrency=16)
    records = await mesh.records(50)
    assert sorted(r.task_execution.result.output.inline for r in records) == sorted(
        f'{{"i":{i}}}'.encode() for i in range(50)
    )
    stats = worker.stats
    assert stats.assignments == 50
    assert stats.assignment_frames < 50, stats
    assert stats.completions == 50
    assert stats.completion_frames < 50, stats
    assert mesh.service.pool.stats.assignment_frames == stats.assignment_frames
    await mesh.wait_work_drained()


async def test_pool_retries_failures_with_backoff_then_dead_letters(
    start_pool: PoolFactory,
) -> None:
    mesh = await start_pool()
    attempts: list[tuple[int, float]] = []

    @task
    async def flaky(ctx: TaskContext, value: Any) -> None:
        attempts.append((ctx.attempt, time.monotonic()))
        raise RuntimeError(f"boom on attempt {ctx.attempt}")

    await mesh.start_worker([flaky])
    exec_id = await mesh.submit("flaky", retry=_retry(3, backoff_s=0.1))

    [record] = await mesh.records(1)
    assert [a for a, _ in attempts] == [1, 2, 3]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.09, gaps  # initial backoff 0.1 s
    assert gaps[1] >= 0.19, gaps  # then doubled
    result = record.task_execution.result
    assert record.task_execution.header.attempt == 3
    assert _status(record) == "TASK_STATUS_FAILED"
    assert result.error.type == "RuntimeError"
    assert result.error.message == "boom on attempt 3"
    assert result.error.retryable

    [letter] = await mesh.dead_letters(1)
    assert letter.subject == mesh.names.dlq("work")
    assert letter.headers is not None
    assert "boom on attempt 3" in letter.headers[HDR_REASON]
    assert "attempt 3 of 3" in letter.headers[HDR_REASON]
    assert letter.headers["Tickmesh-Attempt"] == "3"
    assert letter.headers[HDR_EXECUTION] == exec_id
    original = decode_envelope(letter.data, expected_kind="task_request")
    assert original.header.execution_id == exec_id
    await mesh.wait_work_drained()
    await mesh.no_more_records()


async def test_pool_does_not_retry_non_retryable_errors(start_pool: PoolFactory) -> None:
    mesh = await start_pool()
    calls = 0

    @task
    async def strict(ctx: TaskContext, value: Any) -> None:
        nonlocal calls
        calls += 1
        raise TaskError("bad input", type="BadInput", retryable=False, details={"field": "x"})

    await mesh.start_worker([strict])
    await mesh.submit("strict", retry=_retry(3))
    [record] = await mesh.records(1)
    error = record.task_execution.result.error
    assert calls == 1
    assert record.task_execution.header.attempt == 1
    assert (error.type, error.message, error.retryable) == ("BadInput", "bad input", False)
    assert dict(error.details) == {"field": "x"}
    assert len(await mesh.dead_letters(1)) == 1
    await mesh.wait_work_drained()
    await mesh.no_more_records()


async def test_pool_times_out_attempts_and_retries_them(start_pool: PoolFactory) -> None:
    mesh = await start_pool()
    seen_cancel: list[bool] = []

    @task
    async def stuck(ctx: TaskContext, value: Any) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            seen_cancel.append(ctx.cancelled.is_set())

    await mesh.start_worker([stuck])
    await mesh.submit("stuck", retry=_retry(2, backoff_s=0.05), timeout_s=0.3)
    [record] = await mesh.records(1)
    result = record.task_execution.result
    assert _status(record) == "TASK_STATUS_TIMED_OUT"
    assert record.task_execution.header.attempt == 2
    assert result.error.type == "TimeoutError"
    assert result.error.retryable
    assert len(seen_cancel) == 2
    assert len(await mesh.dead_letters(1)) == 1
    await mesh.wait_work_drained()


async def test_a_handler_that_ignores_its_cancellation_is_reported_after_the_grace(
    start_pool: PoolFactory,
) -> None:
    mesh = await start_pool()
    released = asyncio.Event()

    @task
    async def stubborn(ctx: TaskContext, value: Any) -> None:
        while not released.is_set():  # every cancellation ignored, until the test ends it
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    worker = await mesh.start_worker([stubborn])
    started = time.monotonic()
    await mesh.submit("stubborn", retry=_retry(1), timeout_s=0.3)
    [record] = await mesh.records(1)
    assert _status(record) == "TASK_STATUS_TIMED_OUT"  # the pool's own deadline

    # The worker cancels the handler at the deadline and, as it does not stop, reports the
    # time-out once the one-second grace is over: neither before, nor never.
    async def reported() -> bool:
        return worker.stats.completions == 1

    await eventually(reported, within=5, what="the worker's report")
    assert time.monotonic() - started >= 1.2
    released.set()


async def test_pool_offloads_large_outputs_to_the_blob_store(start_pool: PoolFactory) -> None:
    mesh = await start_pool()
    big = bytes(range(256)) * (5 * 1024 * 4)  # 5 MiB

    @task
    async def produce(ctx: TaskContext, value: Any) -> bytes:
        return big

    await mesh.start_worker([produce])
    await mesh.submit("produce")
    [record] = await mesh.records(1)
    output = record.task_execution.result.output
    assert output.WhichOneof("data") == "blob"
    digest = hashlib.sha256(big).hexdigest()
    assert (output.sha256, output.size) == (digest, len(big))
    assert (output.blob.sha256, output.blob.size) == (digest, len(big))
    assert output.content_type == "application/octet-stream"
    path = Path(unquote(urlsplit(output.blob.uri).path))
    assert await asyncio.to_thread(path.read_bytes) == big
    assert path.is_relative_to(mesh.blobs.root / mesh.tenant)
    assert await mesh.blobs.get(mesh.tenant, output.blob.uri) == big
    await mesh.wait_work_drained()


async def test_pool_dead_letters_malformed_requests_and_keeps_going(
    start_pool: PoolFactory,
) -> None:
    mesh = await start_pool()

    @task
    async def echo(ctx: TaskContext, value: Any) -> Any:
        return value

    await mesh.start_worker([echo])
    await mesh.js.publish(
        mesh.names.work("task", "echo"),
        b"\xff\x00 definitely not protobuf",
        headers={HDR_TYPE: "task_request", HDR_MSG_ID: "garbage-1"},
    )
    wrong_tenant = mesh.request("echo")
    wrong_tenant.header.tenant_id = "someone_else"
    await mesh.js.publish(
        mesh.names.work("task", "echo"),
        wrong_tenant.SerializeToString(),
        headers={HDR_TYPE: "task_request", HDR_MSG_ID: "garbage-2"},
    )
    await mesh.submit("echo", '{"ok":true}')

    [record] = await mesh.records(1)
    assert record.task_execution.result.output.inline == b'{"ok":true}'
    letters = await mesh.dead_letters(2)
    assert len(letters) == 2
    reasons = sorted((m.headers or {})[HDR_REASON] for m in letters)
    assert "malformed" in reasons[0] or "malformed" in reasons[1]
    assert any("tenant" in r for r in reasons)
    assert any(m.data == b"\xff\x00 definitely not protobuf" for m in letters)
    assert mesh.service.pool.stats.malformed == 2
    await mesh.wait_work_drained()


async def test_pool_redelivers_the_work_of_a_disconnected_executor(
    start_pool: PoolFactory,
) -> None:
    mesh = await start_pool()
    started = asyncio.Event()
    runs: list[str] = []

    @task(name="work")
    async def hangs(ctx: TaskContext, value: Any) -> str:
        runs.append("first")
        started.set()
        await asyncio.sleep(30)
        return "never"

    @task(name="work")
    async def finishes(ctx: TaskContext, value: Any) -> str:
        runs.append("second")
        return f"done on attempt {ctx.attempt}"

    first = mesh.worker([hangs], executor_id="first")
    first_run = asyncio.create_task(first.run())
    await mesh.submit("work")
    async with asyncio.timeout(5):
        await started.wait()
    first_run.cancel()  # the executor process dies mid-task
    with contextlib.suppress(asyncio.CancelledError):
        await first_run

    await mesh.start_worker([finishes], executor_id="second")
    [record] = await mesh.records(1)
    assert runs == ["first", "second"]
    assert record.task_execution.executor.executor_id == "second"
    assert record.task_execution.header.attempt == 2
    assert record.task_execution.result.output.inline == b'"done on attempt 2"'
    await mesh.wait_work_drained()
    await mesh.no_more_records()


async def test_heartbeats_keep_long_work_from_being_redelivered(start_pool: PoolFactory) -> None:
    mesh = await start_pool(ack_wait_s=1.0, heartbeat_interval_s=0.3)
    calls = 0

    @task
    async def long(ctx: TaskContext, value: Any) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(2.5)
        return "ok"

    worker = await mesh.start_worker([long])
    await mesh.submit("long", timeout_s=10)
    [record] = await mesh.records(1)
    assert calls == 1
    assert record.task_execution.header.attempt == 1
    assert _status(record) == "TASK_STATUS_SUCCEEDED"
    assert worker.stats.heartbeat_frames >= 5
    await mesh.wait_work_drained()
    await mesh.no_more_records(wait=1.5)
    assert calls == 1
    # Idle past an ack wait, then given work again: a heartbeating executor is never
    # taken for an unresponsive one.
    await mesh.submit("long", node_id="again", timeout_s=10)
    [again] = await mesh.records(1)
    assert _status(again) == "TASK_STATUS_SUCCEEDED"
    assert again.task_execution.header.attempt == 1
    assert mesh.service.pool.stats.unresponsive == 0
    assert worker.stats.connections == 1


async def test_cancellation_stops_running_work(start_pool: PoolFactory) -> None:
    mesh = await start_pool()
    started = asyncio.Event()
    saw: list[bool] = []

    @task
    async def waits(ctx: TaskContext, value: Any) -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            saw.append(ctx.cancelled.is_set())
        return "never"

    await mesh.start_worker([waits])
    request = mesh.request("waits", retry=_retry(3))
    await mesh.publish(request)
    async with asyncio.timeout(5):
        await started.wait()
    cancel = envelope_pb2.ExecutionEnvelope(
        header=header_pb2.EnvelopeHeader(
            envelope_id=uuid7(), tenant_id=mesh.tenant, lifetime_id=request.header.lifetime_id
        )
    )
    await mesh.nc.publish(mesh.names.cancel, cancel.SerializeToString())

    [record] = await mesh.records(1)
    assert _status(record) == "TASK_STATUS_CANCELLED"
    assert "cancelled" in record.task_execution.result.error.message
    assert saw == [True]
    await mesh.wait_work_drained()
    assert not await mesh.dead_letters(1, within=0.3)
    await mesh.no_more_records()


async def test_pool_runs_plans_and_records_their_decisions(start_pool: PoolFactory) -> None:
    mesh = await start_pool()

    @plan
    async def planner(
        ctx: PlanContext, goal: dict[str, str], inputs: list[PlanInputView]
    ) -> Decision:
        assert not inputs
        assert ctx.signal is None
        return dispatch(step("search", {"q": goal["topic"]}), rationale="look it up")

    await mesh.start_worker([planner])
    await mesh.submit("planner", '{"topic":"nats"}', kind="plan", node_id="plan")
    [record] = await mesh.records(1)
    result = record.plan_execution.result
    assert record.WhichOneof("body") == "plan_execution"
    assert result.rationale == "look it up"
    assert [(s.node_id, s.input.inline) for s in result.dispatch.steps] == [
        ("search", b'{"q":"nats"}')
    ]
    await mesh.wait_work_drained()


async def test_pool_refuses_a_hello_without_handlers(start_pool: PoolFactory) -> None:
    import grpc

    from tickmesh.v1 import executor_pool_service_pb2, executor_pool_service_pb2_grpc

    mesh = await start_pool()
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        stub = executor_pool_service_pb2_grpc.ExecutorPoolServiceStub(channel)
        call = stub.Connect(metadata=(("x-tickmesh-tenant", mesh.tenant),))
        await call.write(
            executor_pool_service_pb2.ConnectRequest(
                hello=executor_pool_service_pb2.ExecutorHello(executor_id="x", concurrency=1)
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_pool_drains_executors_on_shutdown(start_pool: PoolFactory) -> None:
    mesh = await start_pool()
    started = asyncio.Event()

    @task
    async def finishing(ctx: TaskContext, value: Any) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished during drain"

    worker = await mesh.start_worker([finishing])
    await mesh.submit("finishing")
    async with asyncio.timeout(5):
        await started.wait()
    await mesh.service.stop(grace=5.0)

    [record] = await mesh.records(1)
    assert record.task_execution.result.output.inline == b'"finished during drain"'
    assert worker.stats.completions == 1
    await mesh.wait_work_drained()


async def test_pool_dead_letters_work_whose_deliveries_ran_out(start_pool: PoolFactory) -> None:
    mesh = await start_pool()
    started = asyncio.Event()

    @task(name="work")
    async def hangs(ctx: TaskContext, value: Any) -> None:
        started.set()
        await asyncio.sleep(30)

    @task(name="work")
    async def never(ctx: TaskContext, value: Any) -> None:
        raise AssertionError("a request past its attempts must not run")

    first = mesh.worker([hangs])
    first_run = asyncio.create_task(first.run())
    await mesh.submit("work", retry=_retry(1))
    async with asyncio.timeout(5):
        await started.wait()
    first_run.cancel()  # the only attempt is lost with its executor
    with contextlib.suppress(asyncio.CancelledError):
        await first_run

    await mesh.start_worker([never])
    [record] = await mesh.records(1)
    error = record.task_execution.result.error
    assert _status(record) == "TASK_STATUS_FAILED"
    assert (error.type, error.retryable) == ("AttemptsExhausted", False)
    assert record.task_execution.header.attempt == 2
    [letter] = await mesh.dead_letters(1)
    assert "AttemptsExhausted" in (letter.headers or {})[HDR_REASON]
    await mesh.wait_work_drained()


@pytest.mark.parametrize("status", [0, 9999, -3])
async def test_a_task_result_whose_status_is_no_outcome_fails_the_attempt(
    start_pool: PoolFactory, status: int
) -> None:
    """An executor in another language answers a task with status UNSPECIFIED (which the
    contract calls invalid) or a number no TaskStatus has: the attempt fails as
    InvalidCompletion, naming the status, rather than being recorded as an outcome the
    router cannot read."""
    import grpc

    from tickmesh.v1 import executor_pool_service_pb2 as ep
    from tickmesh.v1 import executor_pool_service_pb2_grpc as eg

    mesh = await start_pool()
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        call = eg.ExecutorPoolServiceStub(channel).Connect(
            metadata=(("x-tickmesh-tenant", mesh.tenant),)
        )
        await call.write(
            ep.ConnectRequest(
                hello=ep.ExecutorHello(
                    executor_id="raw",
                    concurrency=1,
                    protocol_version=1,
                    handlers=[ep.HandlerSpec(name="odd", kind=graph_pb2.NODE_KIND_TASK)],
                )
            )
        )

        async def frame() -> ep.ConnectResponse:
            read = await call.read()
            assert isinstance(read, ep.ConnectResponse), read
            return read

        assert (await frame()).WhichOneof("message") == "welcome"
        await mesh.submit("odd", retry=_retry(1))
        async with asyncio.timeout(5):
            while (assigned := await frame()).WhichOneof("message") != "assignments":
                pass
        [assignment] = assigned.assignments.items
        odd = result_pb2.TaskResult(status=status)  # type: ignore[arg-type]
        await call.write(
            ep.ConnectRequest(
                completions=ep.Completions(
                    items=[ep.Completion(assignment_id=assignment.assignment_id, task_result=odd)]
                )
            )
        )
        [record] = await mesh.records(1)
        await call.done_writing()
    result = record.task_execution.result
    assert _status(record) == "TASK_STATUS_FAILED"
    assert result.error.type == "InvalidCompletion"
    assert f"a task result's status {status} is not an outcome" in result.error.message
    assert len(await mesh.dead_letters(1)) == 1
