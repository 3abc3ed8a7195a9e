"""ExecutorPoolService over gRPC: one Connect stream per executor session, and
FetchBlob for executors to read the blobs their work refers to.

The Connect stream is two halves: a reader task that feeds the executor's
frames to the pool, and this method's response generator that streams the
session's outbox. Either half ending ends the session, and the pool returns the
session's unfinished work to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc

from tickmesh.runtime.auth import tenant_of
from tickmesh.runtime.errors import stream_errors
from tickmesh.sdk import ValidationError
from tickmesh.v1 import executor_pool_service_pb2, executor_pool_service_pb2_grpc

from .pool import ExecutorPool, Session

logger = logging.getLogger(__name__)

Request = executor_pool_service_pb2.ConnectRequest
Response = executor_pool_service_pb2.ConnectResponse

FETCH_CHUNK_BYTES = 1024 * 1024
"""The most blob bytes one FetchBlobResponse carries (the contract's limit)."""


class ExecutorPoolServicer(executor_pool_service_pb2_grpc.ExecutorPoolServiceServicer):
    """Adapts Connect streams to :class:`ExecutorPool` sessions."""

    def __init__(self, pool: ExecutorPool, tenants: Collection[str]) -> None:
        self._pool = pool
        self._tenants = tenants
        """Live (the pool's served tenants): checked on every call."""

    @stream_errors
    async def Connect(
        self,
        request_iterator: AsyncIterator[Request],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Response]:
        tenant = tenant_of(context, self._tenants)
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        if first.WhichOneof("message") != "hello":
            raise ValidationError("the first message on the stream must be hello")
        session = self._pool.open_session(tenant, first.hello)
        session.abort = _canceller(asyncio.current_task())
        session.send(self._pool.welcome(session))
        reader: asyncio.Task[None] | None = None
        try:
            await self._pool.register(session)
            reader = asyncio.create_task(
                self._read(requests, session), name=f"pool:read:{session.id}"
            )
            async for frame in session.frames(self._pool.stats):
                yield frame
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            self._pool.release(session)

    @stream_errors
    async def FetchBlob(
        self,
        request: executor_pool_service_pb2.FetchBlobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[executor_pool_service_pb2.FetchBlobResponse]:
        tenant = tenant_of(context, self._tenants)
        ref, data = await self._pool.read_blob(tenant, request.uri, request.sha256)
        yield executor_pool_service_pb2.FetchBlobResponse(blob=ref)
        view = memoryview(data)
        for start in range(0, len(data), FETCH_CHUNK_BYTES):
            yield executor_pool_service_pb2.FetchBlobResponse(
                chunk=bytes(view[start : start + FETCH_CHUNK_BYTES])
            )

    async def _read(self, requests: AsyncIterator[Request], session: Session) -> None:
        try:
            async for request in requests:
                await self._pool.handle(session, request)
        except ValidationError as exc:
            session.close(exc)
        except grpc.aio.AioRpcError as exc:
            logger.debug("executor stream %s ended: %s", session.id, exc.code())
        except Exception:
            logger.exception("executor stream %s failed", session.id)
        finally:
            session.close()


def _canceller(task: asyncio.Task[Any] | None) -> Callable[[], None]:
    """Cancel the call's task, stopping its response generator even while it waits on a
    frame the executor does not read. (grpc.aio has no call reset for a server: the
    transport keeps the stream until the executor reads or disconnects.)"""

    def cancel() -> None:
        if task is not None:
            task.cancel()

    return cancel
