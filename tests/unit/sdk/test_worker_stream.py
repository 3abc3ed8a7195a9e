"""The Worker against a pool that stops answering: an in-process gRPC server that
welcomes the executor, then never ends the stream (a pool frozen or cut off)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tickmesh.sdk import _worker
from tickmesh.sdk._task import TaskContext, task
from tickmesh.sdk._worker import Worker
from tickmesh.v1 import executor_pool_service_pb2 as pool_pb2
from tickmesh.v1 import executor_pool_service_pb2_grpc


class SilentPool(executor_pool_service_pb2_grpc.ExecutorPoolServiceServicer):
    """Welcomes every executor, then sends nothing more and never closes the stream."""

    def __init__(self) -> None:
        self.connections = 0
        self.frames_after_hello: list[pool_pb2.ConnectRequest] = []
        self.half_closed = asyncio.Event()
        self.reconnected = asyncio.Event()

    async def Connect(
        self, request_iterator: AsyncIterator[pool_pb2.ConnectRequest], context: Any
    ) -> AsyncIterator[pool_pb2.ConnectResponse]:
        hello = await anext(aiter(request_iterator))
        assert hello.WhichOneof("message") == "hello"
        self.connections += 1
        if self.connections > 1:
            self.reconnected.set()
        yield pool_pb2.ConnectResponse(
            welcome=pool_pb2.Welcome(session_id=f"s{self.connections}", protocol_version=1)
        )
        # Read to the end, answering nothing: the worker half-closes its side after a drain.
        self.frames_after_hello = [frame async for frame in request_iterator]
        self.half_closed.set()
        await asyncio.Event().wait()

    async def FetchBlob(
        self, request: Any, context: Any
    ) -> AsyncIterator[pool_pb2.FetchBlobResponse]:
        await context.abort(grpc.StatusCode.NOT_FOUND, "this pool holds no blobs")
        yield pool_pb2.FetchBlobResponse()  # never reached: abort raises


@pytest.fixture
async def silent_pool() -> AsyncIterator[tuple[SilentPool, str]]:
    server = grpc.aio.server()
    pool = SilentPool()
    executor_pool_service_pb2_grpc.add_ExecutorPoolServiceServicer_to_server(pool, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield pool, f"127.0.0.1:{port}"
    await server.stop(0)


@task
async def idle(ctx: TaskContext, value: Any) -> None:
    return None


async def connected_worker(target: str, monkeypatch: pytest.MonkeyPatch) -> Worker:
    """A running Worker welcomed by the pool at ``target``, that abandons its call 0.1 s
    after it stops writing (rather than 5 s)."""
    monkeypatch.setattr(_worker, "_CLOSE_TIMEOUT_S", 0.1)
    worker = Worker(target, tenant="acme", tasks=[idle], reconnect_initial_s=0.01)
    await worker.__aenter__()
    async with asyncio.timeout(5):
        await worker.wait_connected()
    return worker


async def test_shutdown_against_a_pool_that_never_closes_the_stream_returns(
    silent_pool: tuple[SilentPool, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, target = silent_pool
    worker = await connected_worker(target, monkeypatch)
    background = worker._background
    assert background is not None
    # The worker abandons the call after the close timeout: the stream breaks, and
    # shutdown ends like any other, without a cancellation nobody asked for.
    await worker.shutdown(grace=0.0)
    assert pool.half_closed.is_set()
    assert background.done()
    assert not background.cancelled()
    assert background.exception() is None


async def test_a_stream_abandoned_under_a_running_worker_is_reconnected(
    silent_pool: tuple[SilentPool, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, target = silent_pool
    worker = await connected_worker(target, monkeypatch)
    session = worker._session
    assert session is not None
    # What the sender does when a frame cannot be sent.
    session.stream.cancel()
    async with asyncio.timeout(5):
        await pool.reconnected.wait()
        await worker.wait_connected()
    assert worker.stats.connections == 2
    background = worker._background
    assert background is not None
    assert not background.done()
    await worker.shutdown(grace=0.0)
