"""The SDK's gRPC seam: channels, the mapping of gRPC errors into the SDK's
error tree, the executor's ``ExecutorPoolService.Connect`` stream, and blob
downloads through ``ExecutorPoolService.FetchBlob``.

Everything that touches grpc or the generated stubs lives here (and in
``_convert``), so the rest of the SDK works on plain Python values.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tickmesh.v1 import (
    executor_pool_service_pb2,
    executor_pool_service_pb2_grpc,
    graph_pb2,
    result_pb2,
)

from ._convert import AssignmentData, assignment_from_proto, error_to_proto
from ._task import ErrorData, HandlerKind
from .errors import (
    ConfigError,
    DeadlineExceededError,
    NotFoundError,
    RPCError,
    StatusCode,
    TickmeshError,
    TransportError,
    ValidationError,
)

TENANT_METADATA_KEY = "x-tickmesh-tenant"
"""The call metadata entry that names the caller's tenant."""

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest message the SDK's channels send or receive."""

MAX_CHANNEL_MESSAGE_BYTES = 2**31 - 1
"""The largest message limit a channel takes (gRPC holds it in a C int)."""

PROTOCOL_VERSION = 1

_KINDS: dict[HandlerKind, graph_pb2.NodeKind.ValueType] = {
    "task": graph_pb2.NODE_KIND_TASK,
    "plan": graph_pb2.NODE_KIND_PLAN,
}

Completion = executor_pool_service_pb2.Completion
Channel = grpc.aio.Channel


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client proves who it is to a tickmesh service.

    Args:
        api_key: Sent as ``authorization: Bearer <key>`` on every call; the service
            binds it to a tenant.
        root_certificates: PEM CA bundle that signs the services' certificates (TLS on).
        certificate_chain: PEM client certificate, for services that require mutual TLS.
        private_key: The client certificate's PEM key.
    """

    api_key: str | None = None
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def __post_init__(self) -> None:
        # gRPC aborts the process when it is given a certificate chain without its key.
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ConfigError("a client certificate and its key go together")

    @classmethod
    def from_files(
        cls,
        *,
        api_key: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> ChannelSecurity:
        """Read the PEM files given (``ca``, client ``cert`` and ``key``).

        Raises:
            ConfigError: A file cannot be read, or ``cert`` comes without ``key``.
        """
        if bool(cert) != bool(key):
            raise ConfigError("a client certificate and its key go together")

        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as file:
                    return file.read()
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc}") from exc

        return cls(api_key or None, read(ca), read(cert), read(key))

    @property
    def tls(self) -> bool:
        return self.root_certificates is not None or self.certificate_chain is not None

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        if not self.api_key:
            return []
        entry = ("authorization", f"Bearer {self.api_key}")
        return [
            _WithMetadata(entry),
            _StreamWithMetadata(entry),
            _StreamUnaryWithMetadata(entry),
            _StreamStreamWithMetadata(entry),
        ]


def _details_with(details: Any, entry: tuple[str, str]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*entry)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _WithMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_details_with(details, self._entry), request)


class _StreamWithMetadata(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_details_with(details, self._entry), request)


class _StreamUnaryWithMetadata(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_details_with(details, self._entry), request_iterator)


class _StreamStreamWithMetadata(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_details_with(details, self._entry), request_iterator)


def create_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    security: ChannelSecurity | None = None,
) -> grpc.aio.Channel:
    """Open a grpc.aio channel with the SDK's limits and keepalives: TLS and an API key
    on every call when ``security`` says so, plaintext otherwise."""
    merged = dict(channel_options(max_message_bytes))
    merged.update(dict(options))
    chained = [*(security.interceptors() if security else ()), *interceptors] or None
    if security is not None and security.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=security.root_certificates,
            private_key=security.private_key,
            certificate_chain=security.certificate_chain,
        )
        return grpc.aio.secure_channel(
            target, credentials, options=list(merged.items()), interceptors=chained
        )
    return grpc.aio.insecure_channel(target, options=list(merged.items()), interceptors=chained)


def map_rpc_error(exc: grpc.aio.AioRpcError) -> TickmeshError:
    """Map a failed gRPC call to the SDK's error tree (raise the result ``from exc``)."""
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        return TransportError(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValidationError(details)
    value = code.value[0]
    status = StatusCode(value) if value in StatusCode._value2member_map_ else StatusCode.UNKNOWN
    return RPCError(status, details)


# --- the executor stream -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandlerInfo:
    """One handler an executor announces."""

    name: str
    kind: HandlerKind
    code_digest: str


@dataclass(frozen=True, slots=True)
class Hello:
    """What an executor announces when it connects."""

    executor_id: str
    handlers: Sequence[HandlerInfo]
    concurrency: int
    runtime: str
    sdk_version: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WelcomeInfo:
    """The pool's answer to hello: the session's limits."""

    session_id: str
    heartbeat_interval_s: float
    inline_payload_limit: int
    max_message_bytes: int
    protocol_version: int


@dataclass(frozen=True, slots=True)
class AssignmentBatch:
    """Work handed to the executor in one frame."""

    items: tuple[AssignmentData, ...]
    invalid: tuple[tuple[str, str], ...] = ()
    """(assignment id, reason) of items that could not be unpacked; reject them."""


@dataclass(frozen=True, slots=True)
class CancelBatch:
    """Assignments the pool asks the executor to stop: (assignment id, reason)."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class DrainRequest:
    """The pool asks the executor to finish in-flight work, take no more and close."""

    grace_s: float
    reason: str


Inbound = AssignmentBatch | CancelBatch | DrainRequest


def _request(**fields: Any) -> executor_pool_service_pb2.ConnectRequest:
    return executor_pool_service_pb2.ConnectRequest(**fields)


class ExecutorStream:
    """One ``Connect`` call: hello, then frames both ways.

    Reads and writes may run concurrently, but writes must not overlap one
    another; the Worker sends from a single task.
    """

    def __init__(self, channel: grpc.aio.Channel, *, tenant: str) -> None:
        self._stub = executor_pool_service_pb2_grpc.ExecutorPoolServiceStub(channel)
        self._tenant = tenant
        self._call: (
            grpc.aio.StreamStreamCall[
                executor_pool_service_pb2.ConnectRequest, executor_pool_service_pb2.ConnectResponse
            ]
            | None
        ) = None

    async def open(self, hello: Hello, *, welcome_timeout_s: float = 10.0) -> WelcomeInfo:
        """Open the stream, say hello and wait for welcome.

        Raises:
            TickmeshError: The pool refused the executor or could not be reached.
        """
        self._call = self._stub.Connect(metadata=((TENANT_METADATA_KEY, self._tenant),))
        message = executor_pool_service_pb2.ExecutorHello(
            executor_id=hello.executor_id,
            concurrency=hello.concurrency,
            runtime=hello.runtime,
            sdk_version=hello.sdk_version,
            protocol_version=PROTOCOL_VERSION,
            labels=dict(hello.labels),
            handlers=[
                executor_pool_service_pb2.HandlerSpec(
                    name=h.name, kind=_KINDS[h.kind], code_digest=h.code_digest
                )
                for h in hello.handlers
            ],
        )
        await self._write(_request(hello=message))
        try:
            async with asyncio.timeout(welcome_timeout_s):
                response = await self._read_raw()
        except TimeoutError:
            raise DeadlineExceededError(
                f"no welcome from the pool within {welcome_timeout_s}s"
            ) from None
        if response is None or response.WhichOneof("message") != "welcome":
            raise TransportError("the pool did not answer hello with welcome")
        welcome = response.welcome
        return WelcomeInfo(
            session_id=welcome.session_id,
            heartbeat_interval_s=welcome.heartbeat_interval.ToTimedelta().total_seconds(),
            inline_payload_limit=welcome.inline_payload_limit,
            max_message_bytes=welcome.max_message_bytes,
            protocol_version=welcome.protocol_version,
        )

    async def read(self) -> Inbound | None:
        """The next frame from the pool, or None when the pool closed the stream.

        Raises:
            TickmeshError: The stream broke.
        """
        while True:
            response = await self._read_raw()
            if response is None:
                return None
            kind = response.WhichOneof("message")
            if kind == "assignments":
                items: list[AssignmentData] = []
                invalid: list[tuple[str, str]] = []
                for item in response.assignments.items:
                    try:
                        items.append(assignment_from_proto(item))
                    except ValidationError as exc:
                        invalid.append((item.assignment_id, str(exc)))
                return AssignmentBatch(tuple(items), tuple(invalid))
            if kind == "cancellations":
                return CancelBatch(
                    tuple((c.assignment_id, c.reason) for c in response.cancellations.items)
                )
            if kind == "drain":
                return DrainRequest(
                    grace_s=response.drain.grace.ToTimedelta().total_seconds(),
                    reason=response.drain.reason,
                )
            # welcome again or a message kind from a newer protocol: nothing to do.

    async def send_completions(self, completions: Sequence[Completion], *, max_bytes: int) -> int:
        """Send completions in as few frames as ``max_bytes`` allows; return the frame count."""
        frames = 0
        batch: list[Completion] = []
        size = 0
        for completion in completions:
            item_size = completion.ByteSize() + 16
            if batch and size + item_size > max_bytes:
                await self._send_completion_frame(batch)
                frames += 1
                batch, size = [], 0
            batch.append(completion)
            size += item_size
        if batch:
            await self._send_completion_frame(batch)
            frames += 1
        return frames

    async def _send_completion_frame(self, batch: Sequence[Completion]) -> None:
        await self._write(
            _request(completions=executor_pool_service_pb2.Completions(items=list(batch)))
        )

    async def send_heartbeat(self, assignment_ids: Sequence[str]) -> None:
        await self._write(
            _request(heartbeat=executor_pool_service_pb2.Heartbeat(assignment_ids=assignment_ids))
        )

    async def send_rejections(self, items: Sequence[tuple[str, ErrorData]]) -> None:
        await self._write(
            _request(
                rejections=executor_pool_service_pb2.Rejections(
                    items=[
                        executor_pool_service_pb2.Rejection(
                            assignment_id=assignment_id, error=error_to_proto(error)
                        )
                        for assignment_id, error in items
                    ]
                )
            )
        )

    async def done_writing(self) -> None:
        """Tell the pool the executor sends nothing more."""
        if self._call is not None:
            with contextlib.suppress(
                grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
            ):
                await self._call.done_writing()

    def cancel(self) -> None:
        """Abandon the call (the pool returns unfinished work to the queue)."""
        if self._call is not None:
            self._call.cancel()

    async def _read_raw(self) -> executor_pool_service_pb2.ConnectResponse | None:
        assert self._call is not None
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise TransportError(f"executor stream closed: {exc}") from exc
        except asyncio.CancelledError:
            self._raise_if_abandoned()
            raise
        if response is grpc.aio.EOF:
            return None
        assert isinstance(response, executor_pool_service_pb2.ConnectResponse)
        return response

    async def _write(self, request: executor_pool_service_pb2.ConnectRequest) -> None:
        assert self._call is not None
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise TransportError(f"executor stream closed: {exc}") from exc
        except asyncio.CancelledError:
            self._raise_if_abandoned()
            raise

    def _raise_if_abandoned(self) -> None:
        """grpc.aio raises CancelledError from every read and write of a call cancelled
        locally (:meth:`cancel`): unless this task itself is being cancelled, that is the
        stream breaking, not a cancellation to pass on (it would end the caller's task).

        Raises:
            TransportError: The call was abandoned.
        """
        task = asyncio.current_task()
        abandoned = self._call is not None and self._call.cancelled()
        if abandoned and (task is None or task.cancelling() == 0):
            raise TransportError("executor stream abandoned") from None


# --- blob downloads -----------------------------------------------------------------------

# Statuses that mean this blob cannot be had from this pool, however often it is asked.
_BLOB_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.DATA_LOSS,
}


@dataclass(frozen=True, slots=True)
class FetchedBlob:
    """A blob downloaded from the pool, with the digest and size the pool announced."""

    sha256: str
    size: int
    data: bytes


async def fetch_blob(
    channel: grpc.aio.Channel,
    *,
    tenant: str,
    uri: str,
    sha256: str = "",
    size: int = 0,
    timeout_s: float | None = None,
) -> FetchedBlob:
    """Download one of ``tenant``'s blobs through ``ExecutorPoolService.FetchBlob``.

    The stream must be the blob's reference, then chunks adding up to exactly the
    size it announced (which must equal ``size`` when that is given), so a
    confused pool cannot make the SDK buffer more than expected. The caller
    checks the bytes against their digest.

    Raises:
        NotFoundError: Nothing is stored at ``uri``.
        ValidationError: The pool refused the URI (not one of ``tenant``'s), found
            the stored bytes corrupt, or sent a malformed stream.
        ConfigError: The pool does not serve FetchBlob (it predates it).
        TickmeshError: The call failed otherwise (``TransportError`` when the pool
            cannot be reached).
    """
    stub = executor_pool_service_pb2_grpc.ExecutorPoolServiceStub(channel)
    call = stub.FetchBlob(
        executor_pool_service_pb2.FetchBlobRequest(uri=uri, sha256=sha256),
        metadata=((TENANT_METADATA_KEY, tenant),),
        timeout=timeout_s,
    )
    try:
        first = await _next_blob_part(call)
        if first is None or first.WhichOneof("part") != "blob":
            raise ValidationError(f"the pool's answer for blob {uri} did not start with its ref")
        expected = first.blob.size
        if size and expected != size:
            raise ValidationError(f"the pool has blob {uri} as {expected} bytes, not {size}")
        chunks: list[bytes] = []
        received = 0
        while (response := await _next_blob_part(call)) is not None:
            if response.WhichOneof("part") != "chunk":
                raise ValidationError(f"the pool sent blob {uri} with a second ref")
            received += len(response.chunk)
            if received > expected:
                raise ValidationError(f"the pool sent more than the {expected} bytes of blob {uri}")
            chunks.append(response.chunk)
        if received != expected:
            raise ValidationError(f"the pool sent {received} of the {expected} bytes of blob {uri}")
        return FetchedBlob(sha256=first.blob.sha256, size=expected, data=b"".join(chunks))
    except grpc.aio.AioRpcError as exc:
        raise _fetch_error(exc, uri) from exc
    finally:
        # Ends the call when the download is abandoned (a bad stream, a cancelled task).
        call.cancel()


async def _next_blob_part(
    call: grpc.aio.UnaryStreamCall[
        executor_pool_service_pb2.FetchBlobRequest, executor_pool_service_pb2.FetchBlobResponse
    ],
) -> executor_pool_service_pb2.FetchBlobResponse | None:
    response = await call.read()
    if response is grpc.aio.EOF:
        return None
    assert isinstance(response, executor_pool_service_pb2.FetchBlobResponse)
    return response


def _fetch_error(exc: grpc.aio.AioRpcError, uri: str) -> TickmeshError:
    code = exc.code()
    details = exc.details() or code.name
    if code in _BLOB_REFUSALS:
        return ValidationError(f"cannot fetch blob {uri} from the pool ({code.name}): {details}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ConfigError(
            f"the executor pool does not serve FetchBlob, so blob {uri} cannot be fetched: "
            "upgrade the pool, or give the Worker a blob_resolver that can read it"
        )
    return map_rpc_error(exc)


def oversized_completion(completion: Completion, max_bytes: int) -> Completion | None:
    """A failed stand-in for a completion too large to send, or None if it fits."""
    size = completion.ByteSize()
    if size <= max_bytes - 1024:
        return None
    error = result_pb2.ErrorInfo(
        type="OutputTooLarge",
        message=(
            f"the result is {size} bytes, over the pool's {max_bytes}-byte message limit; "
            "store large outputs in the blob store"
        ),
        retryable=False,
    )
    replacement = executor_pool_service_pb2.Completion(
        assignment_id=completion.assignment_id,
        started_at=completion.started_at,
        finished_at=completion.finished_at,
        code_digest=completion.code_digest,
    )
    if completion.HasField("task_result"):
        replacement.task_result.status = result_pb2.TASK_STATUS_FAILED
        replacement.task_result.error.CopyFrom(error)
        replacement.task_result.telemetry.CopyFrom(completion.task_result.telemetry)
    else:
        replacement.plan_result.error.CopyFrom(error)
        replacement.plan_result.telemetry.CopyFrom(completion.plan_result.telemetry)
    return replacement
