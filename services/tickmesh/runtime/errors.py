"""One table maps tickmesh errors to gRPC status codes, for every servicer.

Servicer methods are wrapped with :func:`unary_errors` / :func:`stream_errors`:
a known error becomes its status with its message; anything unexpected becomes
INTERNAL with an error id that is logged with the traceback (the caller never
sees a traceback).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from tickmesh.sdk import errors
from tickmesh.sdk.ids import uuid7

logger = logging.getLogger(__name__)

_TABLE: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.TransportError, grpc.StatusCode.UNAVAILABLE),
    (errors.GuardrailRejectedError, grpc.StatusCode.FAILED_PRECONDITION),
]


class StatusError(errors.RPCError):
    """Raise to answer a call with a specific status."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, errors.RPCError):
        return grpc.StatusCode[exc.status.name], exc.detail
    for kind, code in _TABLE:
        if isinstance(exc, kind):
            return code, str(exc)
    error_id = uuid7()
    logger.error("unexpected error %s", error_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id})"


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort always raises


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")

UnaryMethod = Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]
StreamMethod = Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]


def unary_errors(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    return wrapper


def stream_errors(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    return wrapper
