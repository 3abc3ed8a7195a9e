"""One table maps tickmesh errors to gRPC status codes, for every servicer.

Servicer methods are wrapped with :func:`unary_errors` / :func:`stream_errors`:
a known error becomes its status with its message; anything unexpected becomes
INTERNAL with an error id that is logged with the traceback (the caller never
sees a traceback).

JetStream refusing a write because the tenant's account is out of storage is not
unexpected: it is the account limit an operator set. The caller gets
RESOURCE_EXHAUSTED with JetStream's reason, and the log gets one warning a minute
rather than a traceback per call — a tenant hammering its full storage would
otherwise spend the shared services' time formatting tracebacks.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from nats.js.errors import APIError

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


# JetStream's refusals for an account out of room: resource limits exceeded for account,
# insufficient resources, insufficient memory, insufficient storage.
STORAGE_FULL_CODES = frozenset({10002, 10023, 10028, 10047})
STORAGE_FULL_LOG_INTERVAL_S = 60.0
_storage_full_logged_at: dict[int, float] = {}
_clock = time.monotonic  # replaced in tests


class StatusError(errors.RPCError):
    """Raise to answer a call with a specific status."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, errors.RPCError):
        return grpc.StatusCode[exc.status.name], exc.detail
    for kind, code in _TABLE:
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, APIError) and exc.err_code in STORAGE_FULL_CODES:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _storage_full(exc)
    error_id = uuid7()
    logger.error("unexpected error %s", error_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id})"


def _storage_full(exc: APIError) -> str:
    code = exc.err_code or 0
    message = (
        f"the tenant's storage limit is reached: JetStream refused the write "
        f"({exc.description}, error {code})"
    )
    now = _clock()
    last = _storage_full_logged_at.get(code)
    if last is None or now - last >= STORAGE_FULL_LOG_INTERVAL_S:
        _storage_full_logged_at[code] = now
        logger.warning("%s; answering RESOURCE_EXHAUSTED (logged once a minute)", message)
    return message


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
