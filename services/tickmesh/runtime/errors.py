"""One table maps tickmesh errors to gRPC status codes, for every servicer.

Servicer methods are wrapped with :func:`unary_errors` / :func:`stream_errors`:
a known error becomes its status with its message; anything unexpected becomes
INTERNAL with an error id that is logged with the traceback (the caller never
sees a traceback).

Three conditions of the bus are not unexpected either, and get their own status with
the bus's reason and one warning a minute in the log rather than a traceback per call
(a tenant hammering its full storage, or every caller during an outage, would
otherwise spend the shared services' time formatting tracebacks):

* JetStream refusing a write because the tenant's account is out of storage — the
  account limit an operator set: RESOURCE_EXHAUSTED;
* a write larger than one NATS message (where the size was not checked before, as it is
  for lifetime states and graphs): RESOURCE_EXHAUSTED;
* NATS not answering — the connection down or reconnecting, a request timed out, no
  JetStream responder: UNAVAILABLE, the status callers retry on. (A timed-out write
  may still have been applied; the calls that write take idempotency keys for that.)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from nats import errors as nats_errors
from nats.js import errors as js_errors

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
# NATS not answering: nothing wrong with the call, the bus is away for now.
NATS_UNREACHABLE: tuple[type[BaseException], ...] = (
    nats_errors.TimeoutError,  # FlushTimeoutError among them
    nats_errors.NoServersError,
    nats_errors.ConnectionClosedError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.ConnectionDrainingError,
    nats_errors.StaleConnectionError,
    nats_errors.OutboundBufferLimitError,
    nats_errors.NoRespondersError,
    js_errors.ServiceUnavailableError,
    js_errors.NoStreamResponseError,
)
BUS_LOG_INTERVAL_S = 60.0
"""At most one warning per kind of bus condition in this interval."""
_bus_logged_at: dict[str, float] = {}
_clock = time.monotonic  # replaced in tests


class StatusError(errors.RPCError):
    """Raise to answer a call with a specific status."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, errors.RPCError):
        return grpc.StatusCode[exc.status.name], exc.detail
    for kind, code in _TABLE:
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, js_errors.APIError) and exc.err_code in STORAGE_FULL_CODES:
        message = (
            f"the tenant's storage limit is reached: JetStream refused the write "
            f"({exc.description}, error {exc.err_code})"
        )
        _warn_now_and_then(f"storage {exc.err_code}", message, "RESOURCE_EXHAUSTED")
        return grpc.StatusCode.RESOURCE_EXHAUSTED, message
    if isinstance(exc, nats_errors.MaxPayloadError):
        # What the call would write does not fit in one message of the bus; checked before
        # the write where the size is known (lifetime states, graphs), this is the rest.
        message = "what the call would write is larger than one NATS message may carry"
        _warn_now_and_then("bus MaxPayloadError", message, "RESOURCE_EXHAUSTED")
        return grpc.StatusCode.RESOURCE_EXHAUSTED, message
    if isinstance(exc, NATS_UNREACHABLE):
        message = f"NATS did not answer ({type(exc).__name__}: {exc}); retry once it is back"
        _warn_now_and_then(f"bus {type(exc).__name__}", message, "UNAVAILABLE")
        return grpc.StatusCode.UNAVAILABLE, message
    error_id = uuid7()
    logger.error("unexpected error %s", error_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id})"


def _warn_now_and_then(kind: str, message: str, status: str) -> None:
    now = _clock()
    last = _bus_logged_at.get(kind)
    if last is None or now - last >= BUS_LOG_INTERVAL_S:
        _bus_logged_at[kind] = now
        logger.warning(
            "%s; answering %s (logged once every %g s)", message, status, BUS_LOG_INTERVAL_S
        )


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
