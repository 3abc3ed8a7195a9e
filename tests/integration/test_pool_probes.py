"""The executor pool spoken to frame by frame, and Workers against it, at the edges of
the protocol: frames that refer to nothing, arrive twice or out of order, executors that
leave mid-batch, and handlers whose outcome cannot be sent as it is."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from nats.aio.msg import Msg

from tests.integration.test_executor_pool import Mesh, PoolFactory, _retry, _status, start_pool
from tickmesh.runtime import steps
from tickmesh.sdk._task import TaskContext, task
from tickmesh.v1 import (
    executor_pool_service_pb2 as pool_pb2,
)
from tickmesh.v1 import (
    executor_pool_service_pb2_grpc,
    graph_pb2,
    result_pb2,
)

__all__ = ["start_pool"]

Request = pool_pb2.ConnectRequest
Response = pool_pb2.ConnectResponse


class RawExecutor:
    """One Connect stream driven by hand."""

    def __init__(self, channel: grpc.aio.Channel, tenant: str) -> None:
        stub = executor_pool_service_pb2_grpc.ExecutorPoolServiceStub(channel)
        self.call = stub.Connect(metadata=(("x-tickmesh-tenant", tenant),))

    async def hello(
        self, *handlers: str, concurrency: int = 4, executor_id: str = "raw"
    ) -> pool_pb2.Welcome:
        await self.send(
            hello=pool_pb2.ExecutorHello(
                executor_id=executor_id,
                concurrency=concurrency,
                protocol_version=1,
                handlers=[
                    pool_pb2.HandlerSpec(name=h, kind=graph_pb2.NODE_KIND_TASK, code_digest="d")
                    for h in handlers
                ],
            )
        )
        response = await self.read()
        assert response.WhichOneof("message") == "welcome"
        return response.welcome

    async def send(self, **fields: Any) -> None:
        await self.call.write(Request(**fields))

    async def read(self, within: float = 5.0) -> Response:
        async with asyncio.timeout(within):
            response = await self.call.read()
        assert isinstance(response, Response), response
        return response

    async def read_to_the_end(self) -> None:
        """Read until the stream ends (raising its status)."""
        while True:
            await self.read()

    async def assignments(self, count: int, within: float = 5.0) -> list[pool_pb2.Assignment]:
        items: list[pool_pb2.Assignment] = []
        while len(items) < count:
            response = await self.read(within)
            if response.WhichOneof("message") == "assignments":
                items.extend(response.assignments.items)
        return items

    async def complete(self, *items: pool_pb2.Completion) -> None:
        await self.send(completions=pool_pb2.Completions(items=list(items)))


def succeeded(assignment_id: str, output: bytes = b'"ok"') -> pool_pb2.Completion:
    completion = pool_pb2.Completion(assignment_id=assignment_id)
    result = completion.task_result
    result.status = result_pb2.TASK_STATUS_SUCCEEDED
    result.output.content_type = "application/json"
    result.output.inline = output
    return completion


@pytest.fixture
async def channel_to(start_pool: PoolFactory) -> AsyncIterator[Any]:
    channels: list[grpc.aio.Channel] = []

    def open_channel(mesh: Mesh) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(mesh.target)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        await channel.close()


async def test_a_completion_for_no_assignment_of_the_session_changes_nothing(
    start_pool: PoolFactory, channel_to: Any
) -> None:
    mesh = await start_pool()
    first = RawExecutor(channel_to(mesh), mesh.tenant)
    await first.hello("work", concurrency=1, executor_id="first")
    await mesh.submit("work")
    [item] = await first.assignments(1)
    other = RawExecutor(channel_to(mesh), mesh.tenant)
    await other.hello("work", concurrency=1, executor_id="other")
    # Another session's assignment, an unknown id, heartbeats and a rejection of nothing.
    await other.complete(succeeded(item.assignment_id, b'"stolen"'), succeeded("unknown"))
    await other.send(heartbeat=pool_pb2.Heartbeat(assignment_ids=["unknown", item.assignment_id]))
    await other.send(
        rejections=pool_pb2.Rejections(items=[pool_pb2.Rejection(assignment_id="unknown")])
    )
    # The same completion twice in one frame, then again in another.
    await first.complete(succeeded(item.assignment_id), succeeded(item.assignment_id, b'"twice"'))
    await first.complete(succeeded(item.assignment_id, b'"thrice"'))
    [record] = await mesh.records(1)
    assert record.task_execution.result.output.inline == b'"ok"'
    assert record.task_execution.executor.executor_id == "first"
    await mesh.wait_work_drained()
    await mesh.no_more_records()
    assert mesh.service.pool.stats.completions == 1


async def test_a_handler_error_that_cannot_be_encoded_still_settles_the_attempt(
    start_pool: PoolFactory,
) -> None:
    mesh = await start_pool()

    @task
    async def reads(ctx: TaskContext, value: Any) -> str:
        # A file name read with surrogateescape: protobuf strings cannot hold it.
        name = b"/data/caf\xe9".decode(errors="surrogateescape")
        raise FileNotFoundError(f"cannot open {name}")

    await mesh.start_worker([reads])
    await mesh.submit("reads", retry=_retry(1), timeout_s=3)
    [record] = await mesh.records(1)
    result = record.task_execution.result
    assert _status(record) == "TASK_STATUS_FAILED", result
    assert result.error.type == "InvalidResult"
    assert "FileNotFoundError" in result.error.message
    assert "/data/caf\\udce9" in result.error.message
    await mesh.wait_work_drained()


async def test_telemetry_the_wire_cannot_carry_fails_the_attempt(start_pool: PoolFactory) -> None:
    mesh = await start_pool()

    @task
    async def counts(ctx: TaskContext, value: Any) -> str:
        ctx.report(input_tokens=2**64, model="m")
        return "ok"

    worker = await mesh.start_worker([counts])
    await mesh.submit("counts", retry=_retry(1), timeout_s=3)
    [record] = await mesh.records(1)
    result = record.task_execution.result
    assert _status(record) == "TASK_STATUS_FAILED", result
    assert result.error.type == "InvalidResult"
    assert "out of range" in result.error.message
    assert not result.error.retryable
    assert worker.stats.completions == 1
    await mesh.wait_work_drained()


async def test_frames_before_hello_and_a_second_hello_end_the_stream(
    start_pool: PoolFactory, channel_to: Any
) -> None:
    mesh = await start_pool()
    early = RawExecutor(channel_to(mesh), mesh.tenant)
    await early.send(heartbeat=pool_pb2.Heartbeat(assignment_ids=["x"]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await early.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    twice = RawExecutor(channel_to(mesh), mesh.tenant)
    await twice.hello("work", concurrency=1, executor_id="twice")
    await mesh.submit("work")
    [item] = await twice.assignments(1)
    await twice.send(
        hello=pool_pb2.ExecutorHello(
            executor_id="again",
            concurrency=1,
            handlers=[pool_pb2.HandlerSpec(name="work", kind=graph_pb2.NODE_KIND_TASK)],
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as second:
        await twice.read()
    assert second.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The work it held goes back to the queue for the next executor.
    after = RawExecutor(channel_to(mesh), mesh.tenant)
    await after.hello("work", "work", concurrency=1, executor_id="after")
    [again] = await after.assignments(1)
    assert again.envelope.header.execution_id == item.envelope.header.execution_id
    assert again.envelope.header.attempt == 2
    await after.complete(succeeded(again.assignment_id))
    [record] = await mesh.records(1)
    assert record.task_execution.executor.executor_id == "after"
    await mesh.wait_work_drained()


async def silent_beside_reader(
    start_pool: PoolFactory, channel_to: Any
) -> tuple[Mesh, RawExecutor]:
    """A pool (ack wait 1 s, heartbeats every 0.3 s) with a raw executor of 4 slots that
    says hello and then never reads or answers, beside a Worker ("reader") of one slot
    for the same "work" task: assigning least-loaded first favours the silent one."""
    mesh = await start_pool(ack_wait_s=1.0, heartbeat_interval_s=0.3)
    silent = RawExecutor(channel_to(mesh), mesh.tenant)
    await silent.hello("work", concurrency=4, executor_id="silent")

    @task(name="work")
    async def work(ctx: TaskContext, value: Any) -> str:
        return "ok"

    await mesh.start_worker([work], executor_id="reader", concurrency=1)
    return mesh, silent


async def all_ran_on_the_reader(mesh: Mesh) -> None:
    """Eight steps were recorded, each once, each succeeded on the reader."""
    records = await mesh.records(8, within=30)
    assert len({r.header.execution_id for r in records}) == 8
    for record in records:
        executor = record.task_execution.executor.executor_id
        assert (executor, _status(record)) == ("reader", "TASK_STATUS_SUCCEEDED"), record


async def cut_off_for_missing_heartbeats(mesh: Mesh, silent: RawExecutor) -> None:
    """Nothing more is recorded, and the silent executor's stream was ended: past the
    frames it never read comes the status, naming the missing heartbeat."""
    await mesh.wait_work_drained()
    await mesh.no_more_records()
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await silent.read_to_the_end()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "heartbeat" in (ended.value.details() or "")


async def test_an_executor_that_stops_reading_is_cut_off_and_its_work_runs_elsewhere(
    start_pool: PoolFactory, channel_to: Any
) -> None:
    # Steps time out long after the ack wait: only the missing heartbeats take work back.
    mesh, silent = await silent_beside_reader(start_pool, channel_to)
    big = '"' + "x" * 200_000 + '"'
    for i in range(8):
        await mesh.submit("work", big, node_id=f"n{i}", timeout_s=30.0, retry=_retry(3))
    await all_ran_on_the_reader(mesh)
    stats = mesh.service.pool.stats
    assert 0 < stats.max_in_flight["silent"] <= 4
    assert stats.unresponsive == 1
    await cut_off_for_missing_heartbeats(mesh, silent)


async def test_an_executor_that_never_answers_short_steps_is_cut_off(
    start_pool: PoolFactory, channel_to: Any
) -> None:
    # Steps time out long before the ack wait: their deadlines, not JetStream, take them
    # back, and the silent executor would get them again and again.
    mesh, silent = await silent_beside_reader(start_pool, channel_to)
    for i in range(8):
        await mesh.submit("work", node_id=f"n{i}", timeout_s=0.5, retry=_retry(6))
    await all_ran_on_the_reader(mesh)
    assert mesh.service.pool.stats.unresponsive == 1
    await cut_off_for_missing_heartbeats(mesh, silent)


async def test_a_handler_that_cancels_itself_is_given_back_after_the_retry_backoff(
    start_pool: PoolFactory,
) -> None:
    mesh = await start_pool()
    attempts: list[int] = []

    @task
    async def quits(ctx: TaskContext, value: Any) -> str:
        attempts.append(ctx.attempt)
        raise asyncio.CancelledError  # the pool asked for nothing

    # The acks the pool sends for the step, as the server receives them.
    durable = mesh.names.work_consumer("task", "quits")
    acks: list[bytes] = []

    async def on_ack(msg: Msg) -> None:
        if f".{durable}." in msg.subject:
            acks.append(msg.data)

    await mesh.nc.subscribe("$JS.ACK.>", cb=on_ack)
    await mesh.nc.flush()
    retry = _retry(3, backoff_s=0.1)
    await mesh.start_worker([quits])
    await mesh.submit("quits", retry=retry)
    [record] = await mesh.records(1)
    error = record.task_execution.result.error
    assert _status(record) == "TASK_STATUS_FAILED", record
    assert (error.type, record.task_execution.header.attempt) == ("AttemptsExhausted", 4)
    assert attempts == [1, 2, 3]
    await mesh.wait_work_drained()
    # Each self-cancelled attempt went back with the step's backoff, as a failed one does.
    naks = [a for a in acks if a.startswith(b"-NAK")]
    assert naks == [
        b"-NAK " + json.dumps({"delay": int(steps.backoff_seconds(retry, n) * 10**9)}).encode()
        for n in (1, 2, 3)
    ]
