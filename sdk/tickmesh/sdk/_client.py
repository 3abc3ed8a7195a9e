"""The orchestrator client: register graphs, start, watch and steer lifetimes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlparse

import grpc
from opentelemetry.trace import TracerProvider

from tickmesh.v1 import (
    graph_pb2,
    lifetime_pb2,
    payload_pb2,
)
from tickmesh.v1 import (
    router_service_pb2 as pb,
)
from tickmesh.v1 import (
    router_service_pb2_grpc as pb_grpc,
)

from . import codecs
from ._plan import Plan
from ._task import Task
from ._transport import ChannelSecurity, create_channel, map_rpc_error
from ._worker import PoolBlobResolver
from .errors import (
    ClientUsageError,
    ConfigError,
    LifetimeFailedError,
    TransportError,
    ValidationError,
)

TENANT_METADATA_KEY = "x-tickmesh-tenant"
_UNSET: Any = object()
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class LifetimeEvent:
    """Something that happened to a lifetime."""

    sequence: int
    kind: str
    """started, step_dispatched, step_finished, state_changed, guardrail, ..."""
    state: str
    """The lifetime's state after the event: running, waiting, paused, completed, ..."""
    at: datetime
    execution_id: str
    node_id: str
    message: str
    raw: lifetime_pb2.LifetimeEvent


@dataclass(frozen=True, slots=True)
class LifetimeInfo:
    """A lifetime's state as the router knows it."""

    lifetime_id: str
    state: str
    graph_id: str
    graph_version: int
    execution_count: int
    input_tokens: int
    output_tokens: int
    cost_micros: int
    error: str
    raw: lifetime_pb2.AgentLifetime

    @property
    def terminal(self) -> bool:
        return self.state in ("completed", "failed", "aborted")


def _enum_name(prefix: str, name: str) -> str:
    return name.removeprefix(prefix).lower()


def event_of(raw: lifetime_pb2.LifetimeEvent) -> LifetimeEvent:
    return LifetimeEvent(
        sequence=raw.sequence,
        kind=_enum_name("LIFETIME_EVENT_KIND_", lifetime_pb2.LifetimeEventKind.Name(raw.kind)),
        state=_enum_name("LIFETIME_STATE_", lifetime_pb2.LifetimeState.Name(raw.state)),
        at=raw.at.ToDatetime(tzinfo=UTC),
        execution_id=raw.execution_id,
        node_id=raw.node.id,
        message=raw.message,
        raw=raw,
    )


def info_of(raw: lifetime_pb2.AgentLifetime) -> LifetimeInfo:
    return LifetimeInfo(
        lifetime_id=raw.lifetime_id,
        state=_enum_name("LIFETIME_STATE_", lifetime_pb2.LifetimeState.Name(raw.state)),
        graph_id=raw.graph.id,
        graph_version=raw.graph.version,
        execution_count=raw.execution_count,
        input_tokens=raw.totals.input_tokens,
        output_tokens=raw.totals.output_tokens,
        cost_micros=raw.totals.cost_micros,
        error=raw.error.message,
        raw=raw,
    )


def to_payload(value: Any) -> payload_pb2.Payload:
    """Encode a Python value as an inline Payload (JSON, bytes, protobuf or codecs.Payload)."""
    if isinstance(value, payload_pb2.Payload):
        return value
    content_type, data = codecs.encode(value)
    return payload_pb2.Payload(
        content_type=content_type,
        inline=data,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def from_payload(payload: payload_pb2.Payload, annotation: Any = None) -> Any:
    """Decode a Payload; blobs of the embedded profile (file://) are read and checked."""
    kind = payload.WhichOneof("data")
    if kind is None:
        return None if not payload.content_type else codecs.decode(payload.content_type, b"")
    if kind == "inline":
        data = payload.inline
    else:
        uri = urlparse(payload.blob.uri)
        if uri.scheme != "file":
            raise ValidationError(
                f"cannot read blob {payload.blob.uri!r}: only file:// blobs are read directly; "
                "give Client.connect the executor pool's address (pool=) to read others"
            )
        data = Path(unquote(uri.path)).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if payload.blob.sha256 and digest != payload.blob.sha256:
            raise ValidationError(f"blob {payload.blob.uri} is corrupt: sha256 {digest}")
    return codecs.decode(payload.content_type, data, annotation)


class Client:
    """A connection to the router's orchestrator API for one tenant.

    Example:
        async with await Client.connect("127.0.0.1:50051", tenant="default") as client:
            handle = await client.start_lifetime("hello", {"name": "Ada"})
            print(await handle.result())
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        tenant: str,
        call_timeout: float,
        blobs: PoolBlobResolver | None = None,
    ) -> None:
        self._channel = channel
        self._stub = pb_grpc.RouterServiceStub(channel)
        self.tenant = tenant
        self._metadata = ((TENANT_METADATA_KEY, tenant),)
        self._timeout = call_timeout
        self._blobs = blobs
        self._closed = False
        # grpc.aio binds the channel to this loop: a call from another loop is still run
        # on it (a lifetime starts) while its caller gets a RuntimeError about futures.
        self._loop: asyncio.AbstractEventLoop | None = _running_loop()

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        tenant: str = "default",
        call_timeout: float = DEFAULT_TIMEOUT_S,
        pool: str | None = None,
        tracer_provider: TracerProvider | None = None,
        security: ChannelSecurity | None = None,
    ) -> Client:
        """Connect to a router at ``host:port``.

        Args:
            target: The router's gRPC address.
            tenant: The tenant to act for.
            call_timeout: The deadline of each call, in seconds.
            pool: The executor pool's gRPC address, to read lifetime outputs that were
                too large to travel inline and sit in a blob store this machine cannot
                read directly (S3 in the cloud profile). Without it only ``file://``
                blobs are read.
            tracer_provider: Traces each call (OpenTelemetry's gRPC instrumentation) and
                sends the caller's trace context, so a lifetime started inside a span
                joins that span's trace. None: calls are not traced.
            security: TLS and an API key for a router that requires them (and for the
                pool's blob downloads).

        Raises:
            TransportError: The router cannot be reached within ``timeout``.
        """
        interceptors: list[grpc.aio.ClientInterceptor] = []
        if tracer_provider is not None:
            from opentelemetry.instrumentation.grpc import aio_client_interceptors

            # The instrumentation package has no type hints.
            interceptors = aio_client_interceptors(  # type: ignore[no-untyped-call]
                tracer_provider=tracer_provider
            )
        channel = create_channel(target, interceptors=interceptors, security=security)
        try:
            async with asyncio.timeout(call_timeout):
                await channel.channel_ready()
        except TimeoutError as exc:
            await channel.close()
            raise TransportError(f"router at {target} unreachable within {call_timeout}s") from exc
        blobs = PoolBlobResolver(pool, security=security) if pool is not None else None
        return cls(channel, tenant=tenant, call_timeout=call_timeout, blobs=blobs)

    async def close(self) -> None:
        self._closed = True
        if self._blobs is not None:
            await self._blobs.close()
        await self._channel.close()

    async def decode_payload(self, payload: payload_pb2.Payload, annotation: Any = None) -> Any:
        """Decode a payload, reading a blob through the executor pool when one was given.

        Raises:
            ValidationError: The blob is not readable from here (no ``pool`` given) or
                fails its checks.
        """
        if payload.WhichOneof("data") != "blob" or self._blobs is None:
            return from_payload(payload, annotation)
        blob = payload.blob
        data = await self._blobs.resolve(
            self.tenant, blob.uri, payload.sha256 or blob.sha256, payload.size or blob.size
        )
        return codecs.decode(payload.content_type or blob.content_type, data, annotation)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_usable(self) -> None:
        """Refuse a call before it is made when it cannot be made right."""
        if self._closed:
            raise ClientUsageError("the client is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise ClientUsageError(
                "the client was connected in another event loop: connect a Client in each "
                "event loop that calls the router"
            )

    def _closed_under_call(self) -> None:
        """Closing the channel cancels its calls, and grpc.aio raises CancelledError (or,
        as the call was starting, UsageError or CANCELLED) in their callers: unless the
        caller's task is itself being cancelled, say so."""
        task = asyncio.current_task()
        if self._closed and (task is None or task.cancelling() == 0):
            raise ClientUsageError("the client was closed while the call was in flight")

    async def _call(self, method: Any, request: Any) -> Any:
        self._check_usable()
        try:
            return await method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                self._closed_under_call()
            raise map_rpc_error(exc) from exc
        except (asyncio.CancelledError, grpc.aio.UsageError):
            self._closed_under_call()
            raise

    # --- graphs ----------------------------------------------------------
    async def register_graph(self, graph: graph_pb2.AgentGraph | str) -> graph_pb2.AgentGraph:
        """Register a compiled graph or YAML source; returns the stored version."""
        request = (
            pb.RegisterGraphRequest(yaml_source=graph)
            if isinstance(graph, str)
            else pb.RegisterGraphRequest(graph=graph)
        )
        response: pb.RegisterGraphResponse = await self._call(self._stub.RegisterGraph, request)
        return response.graph

    async def get_graph(self, graph_id: str, version: int = 0) -> graph_pb2.AgentGraph:
        response: pb.GetGraphResponse = await self._call(
            self._stub.GetGraph, pb.GetGraphRequest(graph_id=graph_id, version=version)
        )
        return response.graph

    # --- lifetimes ---------------------------------------------------------
    async def start_lifetime(
        self,
        graph_id: str,
        input: Any = None,
        *,
        version: int = 0,
        request_id: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> LifetimeHandle:
        """Start a lifetime of a registered graph; idempotent by ``request_id``."""
        response: pb.StartLifetimeResponse = await self._call(
            self._stub.StartLifetime,
            pb.StartLifetimeRequest(
                graph_id=graph_id,
                graph_version=version,
                input=to_payload(input),
                client_request_id=request_id,
                labels=dict(labels or {}),
            ),
        )
        return LifetimeHandle(self, response.lifetime.lifetime_id)

    async def run_lifetime(self, graph_id: str, input: Any = None, **kwargs: Any) -> Any:
        """Start a lifetime and wait for its output.

        Raises:
            LifetimeFailedError: It ended FAILED or ABORTED.
        """
        handle = await self.start_lifetime(graph_id, input, **kwargs)
        return await handle.result()

    def handle(self, lifetime_id: str) -> LifetimeHandle:
        return LifetimeHandle(self, lifetime_id)

    async def get_lifetime(self, lifetime_id: str) -> LifetimeInfo:
        response: pb.GetLifetimeResponse = await self._call(
            self._stub.GetLifetime, pb.GetLifetimeRequest(lifetime_id=lifetime_id)
        )
        return info_of(response.lifetime)

    async def list_lifetimes(
        self, *, states: Sequence[str] = (), graph_id: str = "", page_size: int = 100
    ) -> list[LifetimeInfo]:
        found: list[LifetimeInfo] = []
        token = ""
        wanted = [_state_value(s) for s in states]
        while True:
            response: pb.ListLifetimesResponse = await self._call(
                self._stub.ListLifetimes,
                pb.ListLifetimesRequest(
                    page_size=page_size, page_token=token, states=wanted, graph_id=graph_id
                ),
            )
            found.extend(info_of(lt) for lt in response.lifetimes)
            token = response.next_page_token
            if not token:
                return found

    async def watch(
        self, lifetime_id: str, after_sequence: int = 0
    ) -> AsyncIterator[LifetimeEvent]:
        """Stream a lifetime's events (history first) until it ends.

        Raises:
            TransportError: The router went away; the message names the last sequence
                served, to watch again ``after_sequence`` it.
        """
        self._check_usable()
        call = self._stub.WatchLifetime(
            pb.WatchLifetimeRequest(lifetime_id=lifetime_id, after_sequence=after_sequence),
            metadata=self._metadata,
        )
        last = after_sequence
        try:
            async for response in call:
                event = event_of(response.event)
                last = max(last, event.sequence)
                yield event
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                self._closed_under_call()
            error = map_rpc_error(exc)
            if isinstance(error, TransportError):
                # gRPC's reason ("Cancelling all calls", "Socket closed") names neither
                # the watch nor how far it got; the caller resumes from there.
                error = type(error)(
                    f"watch of lifetime {lifetime_id} broke after sequence {last} ({error}): "
                    f"watch again with after_sequence={last} to go on"
                )
            raise error from exc
        except (asyncio.CancelledError, grpc.aio.UsageError):
            self._closed_under_call()
            raise
        finally:
            call.cancel()

    async def pause(self, lifetime_id: str, reason: str = "") -> LifetimeInfo:
        response: pb.PauseLifetimeResponse = await self._call(
            self._stub.PauseLifetime,
            pb.PauseLifetimeRequest(lifetime_id=lifetime_id, reason=reason),
        )
        return info_of(response.lifetime)

    async def resume(self, lifetime_id: str, reason: str = "") -> LifetimeInfo:
        response: pb.ResumeLifetimeResponse = await self._call(
            self._stub.ResumeLifetime,
            pb.ResumeLifetimeRequest(lifetime_id=lifetime_id, reason=reason),
        )
        return info_of(response.lifetime)

    async def abort(self, lifetime_id: str, reason: str = "") -> LifetimeInfo:
        response: pb.AbortLifetimeResponse = await self._call(
            self._stub.AbortLifetime,
            pb.AbortLifetimeRequest(lifetime_id=lifetime_id, reason=reason),
        )
        return info_of(response.lifetime)

    async def signal(
        self,
        lifetime_id: str,
        name: str,
        data: Any = None,
        *,
        approver: str = "",
        signal_id: str = "",
        confirmation_token: str = "",
    ) -> LifetimeInfo:
        signal = lifetime_pb2.Signal(
            signal_id=signal_id,
            name=name,
            payload=to_payload(data),
            approver=approver,
            confirmation_token=confirmation_token,
        )
        signal.sent_at.FromDatetime(datetime.now(UTC))
        response: pb.SignalLifetimeResponse = await self._call(
            self._stub.SignalLifetime,
            pb.SignalLifetimeRequest(lifetime_id=lifetime_id, signal=signal),
        )
        return info_of(response.lifetime)

    async def fork(
        self,
        lifetime_id: str,
        execution_id: str,
        *,
        replacement: Any = _UNSET,
        request_id: str = "",
    ) -> LifetimeHandle:
        """Start a lifetime that shares ``lifetime_id``'s history up to ``execution_id``
        and continues live from there; steps finished before it are not run again.

        Args:
            replacement: Replaces that execution's output in the fork (for a plan: the plan
                is asked again with it as its goal). Omit to keep the recorded output.
            request_id: Makes the call idempotent.
        """
        request = pb.ForkLifetimeRequest(
            lifetime_id=lifetime_id, execution_id=execution_id, client_request_id=request_id
        )
        if replacement is not _UNSET:
            request.replacement_output.CopyFrom(to_payload(replacement))
        response: pb.ForkLifetimeResponse = await self._call(self._stub.ForkLifetime, request)
        return LifetimeHandle(self, response.lifetime.lifetime_id)

    async def replay(
        self,
        lifetime_id: str,
        *,
        graph_version: int = 0,
        handlers: Iterable[Task[Any, Any] | Plan[Any]] = (),
    ) -> ReplayResult:
        """Re-drive a recorded lifetime through its graph version (or ``graph_version``)
        with its recorded results, and compare every decision.

        Replay runs no handler, so handler code is compared by digest instead: for each
        of ``handlers`` (the code the caller runs now), the recorded executions of a
        handler of that name that ran other code are reported, at the first of them, as
        a divergence whose message starts with ``handler code changed:``. Handlers not
        given are not compared.

        Args:
            lifetime_id: The lifetime to replay.
            graph_version: Another version of the lifetime's graph; 0 means the one it ran.
            handlers: Task and plan handlers whose code digests the records are held to.

        Returns:
            Whether every decision was reproduced, and the first divergences.

        Raises:
            ConfigError: Two handlers share a name but not their code.
        """
        response: pb.ReplayLifetimeResponse = await self._call(
            self._stub.ReplayLifetime,
            pb.ReplayLifetimeRequest(
                lifetime_id=lifetime_id,
                graph_version=graph_version,
                handler_code_digests=_code_digests(handlers),
            ),
        )
        return ReplayResult(
            reproduced=response.reproduced,
            decisions_checked=response.decisions_checked,
            divergences=tuple(
                Divergence(
                    sequence=d.sequence,
                    execution_id=d.execution_id,
                    node_id=d.node.id,
                    expected=d.expected,
                    actual=d.actual,
                    message=d.message,
                )
                for d in response.divergences
            ),
            graph_version=response.graph.version,
            raw=response,
        )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # made outside a loop: bound to the first that calls
        return None


def _code_digests(handlers: Iterable[Task[Any, Any] | Plan[Any]]) -> dict[str, str]:
    digests: dict[str, str] = {}
    for handler in handlers:
        known = digests.setdefault(handler.name, handler.code_digest)
        if known != handler.code_digest:
            # Which code would the records be held to? Neither answer is right.
            raise ConfigError(f"two handlers named {handler.name!r} with different code")
    return digests


@dataclass(frozen=True, slots=True)
class Divergence:
    """One decision replay did not reproduce."""

    sequence: int
    execution_id: str
    node_id: str
    expected: str
    actual: str
    message: str


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What ``Client.replay`` found."""

    reproduced: bool
    decisions_checked: int
    divergences: tuple[Divergence, ...]
    graph_version: int
    raw: pb.ReplayLifetimeResponse


class LifetimeHandle:
    """A started lifetime."""

    def __init__(self, client: Client, lifetime_id: str) -> None:
        self._client = client
        self.id = lifetime_id

    def __repr__(self) -> str:
        return f"LifetimeHandle({self.id!r})"

    async def describe(self) -> LifetimeInfo:
        return await self._client.get_lifetime(self.id)

    def watch(self, after_sequence: int = 0) -> AsyncIterator[LifetimeEvent]:
        return self._client.watch(self.id, after_sequence)

    async def result(self, within: float | None = None) -> Any:
        """Wait for the lifetime to end and return its decoded output.

        Args:
            within: Give up after this many seconds (None waits for as long as it takes).

        Raises:
            LifetimeFailedError: It ended FAILED or ABORTED.
            TimeoutError: ``within`` passed first.
        """
        async with asyncio.timeout(within):
            async for event in self.watch():
                if event.kind == "state_changed" and event.state in (
                    "completed",
                    "failed",
                    "aborted",
                ):
                    break
        info = await self.describe()
        if info.state != "completed":
            raise LifetimeFailedError(self.id, info.state.upper(), info.error or info.state)
        return await self._client.decode_payload(info.raw.output)

    async def signal(self, name: str, data: Any = None, **kwargs: Any) -> LifetimeInfo:
        return await self._client.signal(self.id, name, data, **kwargs)

    async def fork(
        self, execution_id: str, *, replacement: Any = _UNSET, request_id: str = ""
    ) -> LifetimeHandle:
        return await self._client.fork(
            self.id, execution_id, replacement=replacement, request_id=request_id
        )

    async def replay(
        self, *, graph_version: int = 0, handlers: Iterable[Task[Any, Any] | Plan[Any]] = ()
    ) -> ReplayResult:
        return await self._client.replay(self.id, graph_version=graph_version, handlers=handlers)

    async def pause(self, reason: str = "") -> LifetimeInfo:
        return await self._client.pause(self.id, reason)

    async def resume(self, reason: str = "") -> LifetimeInfo:
        return await self._client.resume(self.id, reason)

    async def abort(self, reason: str = "") -> LifetimeInfo:
        return await self._client.abort(self.id, reason)


def _state_value(name: str) -> lifetime_pb2.LifetimeState.ValueType:
    """A lifetime state by its short name (``"running"``), any case."""
    try:
        return lifetime_pb2.LifetimeState.Value(f"LIFETIME_STATE_{name.upper()}")
    except ValueError:
        known = ", ".join(
            n.removeprefix("LIFETIME_STATE_").lower()
            for n, _ in lifetime_pb2.LifetimeState.items()
            if n != "LIFETIME_STATE_UNSPECIFIED"
        )
        raise ValidationError(f"unknown lifetime state {name!r}: expected one of {known}") from None
