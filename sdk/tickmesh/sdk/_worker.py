"""The Python executor: runs tasks and plans for the executor pool over its
public gRPC protocol (``ExecutorPoolService.Connect``), like any other language.

One stream carries everything, in batches: the pool sends ``Assignments``
frames; the worker answers with ``Completions`` frames that hold every result
finished since the last frame (results finishing in the same event-loop tick
travel together), one ``Heartbeat`` frame listing all running assignments per
heartbeat interval, and ``Rejections`` for work it cannot run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import logging
import os
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from opentelemetry.trace import TracerProvider, get_tracer

from . import codecs
from ._convert import (
    AssignmentData,
    PlanInputData,
    WirePayload,
    completion_to_proto,
    plan_result_to_proto,
    task_result_to_proto,
)
from ._plan import Decision, Plan, PlanContext, PlanInputView, SignalView
from ._task import ErrorData, ExecutionContext, Task, TaskContext
from ._transport import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CHANNEL_MESSAGE_BYTES,
    AssignmentBatch,
    CancelBatch,
    Channel,
    ChannelSecurity,
    Completion,
    DrainRequest,
    ExecutorStream,
    HandlerInfo,
    Hello,
    WelcomeInfo,
    create_channel,
    fetch_blob,
    oversized_completion,
)
from .errors import (
    ConfigError,
    NotFoundError,
    RPCError,
    StatusCode,
    TaskError,
    TickmeshError,
    TransportError,
    ValidationError,
)
from .ids import TENANT_ID_PATTERN, uuid7
from .tracing import (
    ATTR_ATTEMPT,
    ATTR_EXECUTION,
    ATTR_HANDLER,
    ATTR_ITERATION,
    ATTR_KIND,
    ATTR_LIFETIME,
    ATTR_NODE,
    ATTR_TENANT,
    context_from,
)

logger = logging.getLogger(__name__)

CANCELLED_ERROR_TYPE = "CancelledError"
"""ErrorInfo.type of a plan attempt stopped by a cancellation (plans have no status)."""

_CANCEL_GRACE_S = 1.0
"""How long a cancelled handler may take to unwind before its result is reported anyway."""

_CLOSE_TIMEOUT_S = 5.0
"""How long a drained stream waits for the pool to end it before abandoning the call."""

_FATAL_STATUSES = {
    StatusCode.INVALID_ARGUMENT,
    StatusCode.PERMISSION_DENIED,
    StatusCode.UNAUTHENTICATED,
    StatusCode.UNIMPLEMENTED,
}

Handler = Task[Any, Any] | Plan[Any]


class BlobResolver(Protocol):
    """Fetches the bytes of a payload that travels as a BlobRef."""

    async def resolve(self, tenant: str, uri: str, sha256: str, size: int) -> bytes:
        """Return the blob's bytes, checked against ``sha256`` and ``size`` when given."""
        ...


class FileBlobResolver:
    """Resolves the embedded profile's ``file://`` blob URIs by reading the file.

    Only objects laid out as the local blob store keeps them are read
    (``<root>/<tenant>/<sha[:2]>/<sha>``, under ``root`` when given), and the
    bytes must match their SHA-256.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._root = Path(root).resolve() if root is not None else None

    async def resolve(self, tenant: str, uri: str, sha256: str, size: int) -> bytes:
        parts = urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise ValidationError(f"cannot resolve blob {uri!r}: only file:// URIs are supported")
        path = Path(unquote(parts.path))
        if ".." in path.parts or len(path.parts) < 4:
            raise ValidationError(f"blob URI {uri!r} is not a blob store path")
        name, shard, owner = path.parts[-1], path.parts[-2], path.parts[-3]
        if owner != tenant or shard != name[:2] or (sha256 and name != sha256):
            raise ValidationError(f"blob URI {uri!r} is not one of tenant {tenant!r}'s blobs")
        if self._root is not None and path.parts[: len(self._root.parts)] != self._root.parts:
            raise ValidationError(f"blob URI {uri!r} lies outside {self._root}")
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFoundError(f"blob {uri} does not exist") from None
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if digest != (sha256 or name) or (size and size != len(data)):
            raise ValidationError(f"blob {uri} failed its sha256/size check")
        return data


class PoolBlobResolver:
    """Resolves blobs of any blob store, downloading through the executor pool.

    A ``file://`` blob that exists on this machine (under ``root``, when given),
    laid out as the local blob store keeps it, is read directly, with
    :class:`FileBlobResolver`'s checks: the embedded profile's fast path. Every
    other blob (``s3://`` in the cloud profile, or a file this machine cannot
    see) is downloaded from the pool's ``ExecutorPoolService.FetchBlob``, so
    executors need no credentials for the blob store. Either way the bytes must
    match their SHA-256 and size.

    This is the Worker's default resolver, on the Worker's own channel.

    Args:
        pool: The pool's gRPC address (``host:port``), or an open channel to it.
            A channel this resolver opens for an address is closed by :meth:`close`.
        root: Read ``file://`` blobs directly only under this folder; others
            are downloaded through the pool.
        timeout_s: The longest one download may take (None: no limit).
        max_message_bytes: The message size limit of a channel opened for ``pool``.

    Example:
        resolver = PoolBlobResolver("127.0.0.1:50051")
        data = await resolver.resolve("acme", ref.uri, ref.sha256, ref.size)
        await resolver.close()
    """

    def __init__(
        self,
        pool: str | Channel,
        *,
        root: str | os.PathLike[str] | None = None,
        timeout_s: float | None = 300.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: ChannelSecurity | None = None,
    ) -> None:
        self._security = security
        self._target = pool if isinstance(pool, str) else None
        self._channel = None if isinstance(pool, str) else pool
        self._owns_channel = isinstance(pool, str)
        self._root = Path(root).resolve() if root is not None else None
        self._files = FileBlobResolver(self._root)
        self._timeout_s = timeout_s
        self._max_message_bytes = max_message_bytes

    async def resolve(self, tenant: str, uri: str, sha256: str, size: int) -> bytes:
        """Return the blob's bytes, checked against ``sha256`` and ``size`` when given.

        Raises:
            ValidationError: The URI is not one of ``tenant``'s blobs, or the bytes
                fail their SHA-256 or size check.
            NotFoundError: The blob does not exist.
            TickmeshError: The pool could not be asked (``TransportError``), or
                does not serve FetchBlob (``ConfigError``).
        """
        if self._may_read_locally(uri):
            try:
                return await self._files.resolve(tenant, uri, sha256, size)
            except NotFoundError:
                pass  # not on this machine: the pool's blob store has it
        fetched = await fetch_blob(
            self._pool_channel(),
            tenant=tenant,
            uri=uri,
            sha256=sha256,
            size=size,
            timeout_s=self._timeout_s,
        )
        data = fetched.data
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if digest != fetched.sha256 or (sha256 and digest != sha256) or len(data) != fetched.size:
            raise ValidationError(f"blob {uri} from the pool failed its sha256/size check")
        return data

    async def close(self) -> None:
        """Close the channel this resolver opened (a channel it was given stays open)."""
        channel, self._channel = self._channel, None
        if channel is not None and self._owns_channel:
            await channel.close()

    def _may_read_locally(self, uri: str) -> bool:
        parts = urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            return False
        if self._root is None:
            return True
        path = Path(unquote(parts.path))
        return path.parts[: len(self._root.parts)] == self._root.parts

    def _pool_channel(self) -> Channel:
        if self._channel is None:
            if self._target is None:
                raise ConfigError("this PoolBlobResolver's channel was closed")
            self._channel = create_channel(
                self._target, max_message_bytes=self._max_message_bytes, security=self._security
            )
        return self._channel


@dataclass
class WorkerStats:
    """Counters of what a Worker sent and received (over all its connections)."""

    connections: int = 0
    assignment_frames: int = 0
    assignments: int = 0
    completion_frames: int = 0
    completions: int = 0
    heartbeat_frames: int = 0
    rejections: int = 0
    cancellations: int = 0


@dataclass(eq=False)
class _Running:
    item: AssignmentData
    handler: Handler
    ctx: ExecutionContext
    started_at: datetime
    inner: asyncio.Task[Any] | None = None
    settled: asyncio.Future[None] | None = None
    """Done once the run's outcome is reported (or dropped): what draining waits for."""
    timer: asyncio.TimerHandle | None = None
    """Fires at the deadline, and after a time-out, at the end of the cancel grace."""
    timed_out: bool = False
    cancel_reason: str = ""
    dropped: bool = False


def _sdk_version() -> str:
    try:
        return importlib.metadata.version("tickmesh")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class Worker:
    """Runs task and plan handlers for one tenant, fed by the executor pool.

    Args:
        target: The pool's gRPC address, ``host:port``.
        tenant: The tenant whose work this worker runs.
        tasks: The handlers to serve (``@task`` and ``@plan`` objects).
        concurrency: The most assignments run at once.
        executor_id: Identifies this executor in records; defaults to host:pid:random.
        labels: Free-form metadata announced to the pool.
        blob_resolver: Fetches payloads that travel as blobs; defaults to a
            :class:`PoolBlobResolver` on the worker's channel (local ``file://``
            blobs read directly, all others downloaded through the pool).
        max_message_bytes: The channel's message size limit.
        tracer_provider: Where the handlers' spans go (one ``tickmesh.execute`` span per
            assignment of a traced lifetime, the parent of any span the handler opens);
            None: the process's global provider (a no-op unless one is configured).
        security: TLS and an API key for a pool that requires them.

    Example:
        async with Worker("127.0.0.1:50051", tenant="acme", tasks=[summarize]):
            await asyncio.Event().wait()
    """

    def __init__(
        self,
        target: str,
        *,
        tenant: str,
        tasks: Sequence[Handler],
        concurrency: int = 16,
        executor_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        blob_resolver: BlobResolver | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        reconnect_initial_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        tracer_provider: TracerProvider | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        if not TENANT_ID_PATTERN.fullmatch(tenant):
            raise ConfigError(f"invalid tenant id {tenant!r}")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        if not 1 <= max_message_bytes <= MAX_CHANNEL_MESSAGE_BYTES:
            raise ConfigError(
                f"max_message_bytes must be between 1 and {MAX_CHANNEL_MESSAGE_BYTES}, "
                f"got {max_message_bytes}"
            )
        if not tasks:
            raise ConfigError("a Worker needs at least one task or plan")
        handlers: dict[tuple[str, str], Handler] = {}
        for handler in tasks:
            if not isinstance(handler, Task | Plan):
                raise ConfigError(f"{handler!r} is not a @task or @plan")
            key = (handler.kind, handler.name)
            if key in handlers and handlers[key] is not handler:
                raise ConfigError(f"two {handler.kind}s are named {handler.name!r}")
            handlers[key] = handler
        self._target = target
        self._tenant = tenant
        self._handlers = handlers
        self._concurrency = concurrency
        self._executor_id = executor_id or f"{socket.gethostname()}:{os.getpid()}:{uuid7()[-8:]}"
        self._labels = dict(labels or {})
        self._blob_resolver = blob_resolver
        self._resolver: BlobResolver | None = blob_resolver
        self._max_message_bytes = max_message_bytes
        self._reconnect = (reconnect_initial_s, reconnect_max_s)
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._connected = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        self._session: _Session | None = None
        self._background: asyncio.Task[None] | None = None
        self.stats = WorkerStats()
        self._security = security
        self._tracer = get_tracer("tickmesh.executor", tracer_provider=tracer_provider)

    @property
    def executor_id(self) -> str:
        return self._executor_id

    def _hello(self) -> Hello:
        return Hello(
            executor_id=self._executor_id,
            handlers=[
                HandlerInfo(name=h.name, kind=h.kind, code_digest=h.code_digest)
                for h in self._handlers.values()
            ],
            concurrency=self._concurrency,
            runtime=f"python {platform.python_version()}",
            sdk_version=_sdk_version(),
            labels=self._labels,
        )

    async def run(self) -> None:
        """Serve until :meth:`shutdown`, reconnecting with backoff when the stream breaks.

        Raises:
            TickmeshError: The pool refused this executor (bad tenant or hello).
        """
        if self._running:
            raise ConfigError("this Worker is already running")
        self._running = True
        self._done.clear()
        channel: Channel | None = None
        initial, cap = self._reconnect
        backoff = initial
        # Everything after _running is set is inside the try: shutdown() waits for _done.
        try:
            channel = create_channel(
                self._target, max_message_bytes=self._max_message_bytes, security=self._security
            )
            if self._blob_resolver is None:
                # Blob downloads share the Connect stream's channel (one connection to the pool).
                self._resolver = PoolBlobResolver(channel)
            while not self._stopping:
                welcomed = False
                try:
                    welcomed = await self._serve_once(channel)
                except _FatalError as exc:
                    raise exc.error from exc.error.__cause__
                except TickmeshError as exc:
                    logger.warning("executor stream to %s broke: %s", self._target, exc)
                if self._stopping:
                    break
                if welcomed:
                    backoff = initial
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await self._stop_event.wait()
                backoff = min(cap, backoff * 2)
        finally:
            self._connected.clear()
            if channel is not None:
                await channel.close()
            self._resolver = self._blob_resolver
            self._running = False
            self._done.set()

    async def _serve_once(self, channel: Channel) -> bool:
        stream = ExecutorStream(channel, tenant=self._tenant)
        opening = asyncio.create_task(stream.open(self._hello()))
        stopping = asyncio.create_task(self._stop_event.wait())
        try:
            await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
            stream.cancel()
            return False
        try:
            welcome = opening.result()
        except RPCError as exc:
            stream.cancel()
            if exc.status in _FATAL_STATUSES:
                raise _FatalError(exc) from exc
            raise
        except ValidationError as exc:
            stream.cancel()
            raise _FatalError(exc) from exc
        except BaseException:
            stream.cancel()
            raise
        self.stats.connections += 1
        session = _Session(self, stream, welcome)
        self._session = session
        self._connected.set()
        try:
            await session.run()
        finally:
            self._connected.clear()
            self._session = None
        return True

    async def wait_connected(self) -> None:
        """Wait until the pool has welcomed this worker (bound it with ``asyncio.timeout``)."""
        await self._connected.wait()

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop taking work, let running work finish (up to ``grace`` s) and disconnect."""
        self._stopping = True
        self._stop_event.set()
        session = self._session
        if session is not None:
            await session.drain(grace)
        if self._running:
            await self._done.wait()
        if self._background is not None:
            task, self._background = self._background, None
            try:
                await task
            except TickmeshError as exc:
                logger.warning("worker stopped with an error: %s", exc)

    async def __aenter__(self) -> Worker:
        self._background = asyncio.create_task(self.run(), name=f"worker:{self._executor_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # --- running one assignment --------------------------------------------------------------

    def _handler(self, item: AssignmentData) -> Handler | None:
        return self._handlers.get((item.kind, item.handler))

    async def _payload_bytes(self, tenant: str, payload: WirePayload) -> bytes:
        if payload.inline is not None:
            return payload.inline
        if self._resolver is None:
            raise TransportError("the worker is not connected to the pool")
        return await self._resolver.resolve(tenant, payload.blob_uri, payload.sha256, payload.size)

    async def _decode(self, tenant: str, payload: WirePayload | None, annotation: Any) -> Any:
        if payload is None:
            return codecs.decode("", b"", annotation)
        try:
            data = await self._payload_bytes(tenant, payload)
            return codecs.decode(payload.content_type, data, annotation)
        except (ValidationError, NotFoundError) as exc:
            raise TaskError(
                f"cannot read the input: {exc}", type="InvalidInput", retryable=False
            ) from exc

    async def _decode_outputs(self, tenant: str, plan_inputs: Sequence[PlanInputData]) -> list[Any]:
        """The outputs of a plan's inputs, in order. Those that travel as blobs (a wide
        join's, mostly) are read concurrently: one after the other, a join of N would wait
        for N downloads in turn."""
        blobs = [i for i, p in enumerate(plan_inputs) if p.output and p.output.inline is None]
        if len(blobs) < 2:
            return [
                await self._decode(tenant, p.output, None) if p.output else None
                for p in plan_inputs
            ]
        read = await asyncio.gather(
            *(self._decode(tenant, p.output, None) for p in plan_inputs if p.output),
            return_exceptions=True,
        )
        for value in read:
            if isinstance(value, BaseException):
                raise value  # the first in the inputs' order, like a sequential read
        values = iter(read)
        return [next(values) if p.output else None for p in plan_inputs]

    async def _invoke(self, run: _Running) -> Any:
        item = run.item
        parent = context_from(item.traceparent, item.tracestate)
        if parent is None:
            return await self._call_handler(run)
        with self._tracer.start_as_current_span(
            f"tickmesh.execute {item.kind} {item.handler}",
            context=parent,
            attributes={
                ATTR_TENANT: item.tenant_id,
                ATTR_LIFETIME: item.lifetime_id,
                ATTR_NODE: item.node_id,
                ATTR_HANDLER: item.handler,
                ATTR_KIND: item.kind,
                ATTR_EXECUTION: item.execution_id,
                ATTR_ATTEMPT: item.attempt,
                ATTR_ITERATION: item.iteration,
                "tickmesh.executor_id": self._executor_id,
            },
        ):
            return await self._call_handler(run)

    async def _call_handler(self, run: _Running) -> Any:
        item, handler, ctx = run.item, run.handler, run.ctx
        if isinstance(handler, Task):
            assert isinstance(ctx, TaskContext)
            value = await self._decode(item.tenant_id, item.input, handler.input_annotation)
            return await handler.fn(ctx, value)
        assert isinstance(ctx, PlanContext)
        goal = await self._decode(item.tenant_id, item.input, handler.goal_annotation)
        outputs = await self._decode_outputs(item.tenant_id, item.plan_inputs)
        inputs = []
        for p, output in zip(item.plan_inputs, outputs, strict=True):
            inputs.append(
                PlanInputView(
                    execution_id=p.execution_id,
                    node_id=p.node_id,
                    status=p.status,
                    output=output,
                    error_type=p.error_type,
                    error_message=p.error_message,
                    input_tokens=p.input_tokens,
                    output_tokens=p.output_tokens,
                    cost_micros=p.cost_micros,
                )
            )
        if item.signal is not None:
            ctx.signal = SignalView(
                name=item.signal.name,
                payload=await self._decode(item.tenant_id, item.signal.payload, None),
                approver=item.signal.approver,
                timed_out=item.signal.timed_out,
            )
        return await handler.fn(ctx, goal, inputs)

    def _context(self, item: AssignmentData, handler: Handler, now: datetime) -> ExecutionContext:
        deadline = item.deadline
        if handler.timeout is not None:
            deadline = min(deadline, now + timedelta(seconds=handler.timeout))
        cls = TaskContext if isinstance(handler, Task) else PlanContext
        return cls(
            tenant_id=item.tenant_id,
            lifetime_id=item.lifetime_id,
            execution_id=item.execution_id,
            node_id=item.node_id,
            handler=item.handler,
            attempt=item.attempt,
            iteration=item.iteration,
            deadline=deadline,
            labels=item.labels,
            config=item.config,
        )

    def _supervise(self, session: _Session, run: _Running) -> None:
        """Report the handler's outcome when it ends, or a time-out at its deadline.

        Callbacks rather than a supervising task per assignment: a task awaiting the
        handler with ``asyncio.wait`` costs about four times as much, on every step.
        """
        inner = run.inner
        assert inner is not None
        loop = asyncio.get_running_loop()
        run.settled = loop.create_future()
        remaining = (run.ctx.deadline - datetime.now(UTC)).total_seconds()
        run.timer = loop.call_later(max(0.0, remaining), self._time_out, session, run)
        inner.add_done_callback(lambda _: self._settle(session, run))

    def _time_out(self, session: _Session, run: _Running) -> None:
        assert run.inner is not None
        if run.inner.done():
            return  # finished as the deadline passed: its callback reports it
        run.timed_out = True
        run.ctx.cancelled.set()
        run.inner.cancel()
        # A handler that ignores the cancellation is reported as timed out all the same.
        run.timer = asyncio.get_running_loop().call_later(
            _CANCEL_GRACE_S, self._settle, session, run
        )

    def _settle(self, session: _Session, run: _Running) -> None:
        inner = run.inner
        assert inner is not None
        assert run.settled is not None
        if run.settled.done():
            return
        run.settled.set_result(None)
        if run.timer is not None:
            run.timer.cancel()
        session.running.pop(run.item.assignment_id, None)
        if run.dropped:
            if inner.done() and not inner.cancelled():
                inner.exception()  # retrieved: nobody will report it
            return
        try:
            completion = self._completion(run, inner, timed_out=run.timed_out)
        except Exception as exc:
            # Raised in a done callback, this would lose the outcome: the pool would hold
            # the assignment until its deadline, and time it out.
            completion = self._unsendable(run, inner, exc)
        session.complete(completion)

    def _unsendable(self, run: _Running, inner: asyncio.Task[Any], why: Exception) -> Completion:
        """A final failure standing in for an outcome protobuf cannot carry (text with
        lone surrogates, telemetry outside its field's range, an output the codec trips
        over), as the pool fails a result it cannot record."""
        logger.warning(
            "%s %s: the result cannot be sent: %r", run.handler.kind, run.handler.name, why
        )
        # repr() escapes what a protobuf string cannot hold.
        message = f"the {run.handler.kind}'s result cannot be sent: {why!r}"
        if not run.timed_out and not inner.cancelled() and inner.exception() is not None:
            message += f"; it raised {inner.exception()!r}"
        error = ErrorData("InvalidResult", message, False)
        finished = datetime.now(UTC)
        run_time = (finished - run.started_at).total_seconds()
        result: Any
        if isinstance(run.handler, Task):
            result = task_result_to_proto("failed", error=error, run_time_s=run_time)
        else:
            result = plan_result_to_proto(None, error=error, run_time_s=run_time)
        return _completion_of(run, result, finished)

    def _completion(
        self, run: _Running, inner: asyncio.Task[Any], *, timed_out: bool
    ) -> Completion:
        finished = datetime.now(UTC)
        run_time = (finished - run.started_at).total_seconds()
        created = run.item.created_at
        queue_wait = (run.started_at - created).total_seconds() if created else None
        is_task = isinstance(run.handler, Task)
        error: ErrorData | None = None
        value: Any = None
        status = "succeeded"
        if timed_out:
            status = "timed_out"
            error = ErrorData("TimeoutError", "the attempt ran past its deadline", True)
        elif inner.cancelled():
            status = "cancelled"
            error = ErrorData(
                CANCELLED_ERROR_TYPE, run.cancel_reason or "the attempt was cancelled", False
            )
        elif (exc := inner.exception()) is not None:
            status = "failed"
            error = ErrorData.from_exception(exc)
            if not isinstance(exc, TaskError):
                logger.info(
                    "%s %s failed: %r", run.handler.kind, run.handler.name, exc, exc_info=exc
                )
        else:
            value = inner.result()
        usage, actions = run.ctx.usage, run.ctx.tool_actions
        if is_task:
            output = None
            if status == "succeeded":
                try:
                    output = codecs.encode(value)
                except ValidationError as exc:
                    status = "failed"
                    error = ErrorData("ValidationError", str(exc), False)
            result: Any = task_result_to_proto(
                status,
                output=output,
                error=error,
                usage=usage,
                tool_actions=actions,
                run_time_s=run_time,
                queue_wait_s=queue_wait,
            )
        else:
            decision: Decision | None = None
            if status == "succeeded":
                if isinstance(value, Decision):
                    decision = value
                else:
                    error = ErrorData(
                        "InvalidDecision",
                        f"a plan must return dispatch/complete/wait_for/fail, not {value!r:.200}",
                        False,
                    )
            try:
                result = plan_result_to_proto(
                    decision, error=error, usage=usage, run_time_s=run_time, queue_wait_s=queue_wait
                )
            except ValidationError as exc:
                result = plan_result_to_proto(
                    None,
                    error=ErrorData("ValidationError", str(exc), False),
                    usage=usage,
                    run_time_s=run_time,
                    queue_wait_s=queue_wait,
                )
        return _completion_of(run, result, finished)


def _completion_of(run: _Running, result: Any, finished: datetime) -> Completion:
    """The Completion reporting ``result``, the outcome of ``run``, finished at ``finished``."""
    return completion_to_proto(
        run.item.assignment_id,
        result,
        started_at=run.started_at,
        finished_at=finished,
        code_digest=run.handler.code_digest,
    )


class _FatalError(Exception):
    """The pool refused the executor; reconnecting would not help."""

    def __init__(self, error: TickmeshError) -> None:
        super().__init__(str(error))
        self.error = error


class _Session:
    """One connected stream: reads frames, runs assignments, sends batched frames."""

    def __init__(self, worker: Worker, stream: ExecutorStream, welcome: WelcomeInfo) -> None:
        self.worker = worker
        self.stream = stream
        self.welcome = welcome
        self.running: dict[str, _Running] = {}
        self.done: list[Completion] = []
        self.rejected: list[tuple[str, ErrorData]] = []
        self.wake = asyncio.Event()
        self.heartbeat_due = False
        self.draining = False
        self.closing = False
        self._drain_task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()
        self._max_bytes = min(
            welcome.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES, worker._max_message_bytes
        )

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop(), name="worker-sender")
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat")
        if self.worker._stopping:
            self.start_drain(0.0)
        try:
            while True:
                frame = await self.stream.read()
                if frame is None:
                    return
                if isinstance(frame, AssignmentBatch):
                    self._on_assignments(frame)
                elif isinstance(frame, CancelBatch):
                    self._on_cancellations(frame)
                elif isinstance(frame, DrainRequest):
                    self.start_drain(frame.grace_s)
        finally:
            heartbeat.cancel()
            for run in list(self.running.values()):
                run.dropped = True
                if run.timer is not None:
                    run.timer.cancel()
                if run.inner is not None:
                    run.inner.cancel()
            pending = [r.settled for r in self.running.values() if r.settled is not None]
            if pending:
                await asyncio.wait(pending, timeout=_CANCEL_GRACE_S)
            sender.cancel()
            self.finished.set()
            for task in (sender, heartbeat, self._drain_task):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, TickmeshError):
                        await task
            self.stream.cancel()

    def _on_assignments(self, batch: AssignmentBatch) -> None:
        worker = self.worker
        worker.stats.assignment_frames += 1
        worker.stats.assignments += len(batch.items) + len(batch.invalid)
        for assignment_id, reason in batch.invalid:
            self.reject(assignment_id, ErrorData("InvalidAssignment", reason, False))
        now = datetime.now(UTC)
        # Cancelled work still unwinding no longer holds a slot as far as the pool knows.
        busy = sum(1 for r in self.running.values() if not r.cancel_reason)
        for item in batch.items:
            handler = worker._handler(item)
            if handler is None:
                self.reject(
                    item.assignment_id,
                    ErrorData("UnknownHandler", f"no {item.kind} named {item.handler!r} here"),
                )
                continue
            if self.draining:
                self.reject(item.assignment_id, ErrorData("Draining", "the executor is draining"))
                continue
            if busy >= worker._concurrency:
                self.reject(item.assignment_id, ErrorData("ExecutorBusy", "no free slot"))
                continue
            busy += 1
            run = _Running(item, handler, worker._context(item, handler, now), now)
            run.inner = asyncio.create_task(worker._invoke(run))
            worker._supervise(self, run)
            self.running[item.assignment_id] = run

    def _on_cancellations(self, batch: CancelBatch) -> None:
        for assignment_id, reason in batch.items:
            run = self.running.get(assignment_id)
            if run is None or run.inner is None:
                continue
            self.worker.stats.cancellations += 1
            run.cancel_reason = reason or "cancelled"
            run.ctx.cancelled.set()
            run.inner.cancel()

    def complete(self, completion: Completion) -> None:
        replacement = oversized_completion(completion, self._max_bytes)
        self.done.append(replacement or completion)
        self.wake.set()

    def reject(self, assignment_id: str, error: ErrorData) -> None:
        self.worker.stats.rejections += 1
        self.rejected.append((assignment_id, error))
        self.wake.set()

    async def _send_loop(self) -> None:
        stats = self.worker.stats
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                # Results finishing in this loop tick join the same frame.
                await asyncio.sleep(0)
                if self.rejected:
                    items, self.rejected = self.rejected, []
                    await self.stream.send_rejections(items)
                if self.done:
                    items_done, self.done = self.done, []
                    stats.completion_frames += await self.stream.send_completions(
                        items_done, max_bytes=self._max_bytes
                    )
                    stats.completions += len(items_done)
                if self.heartbeat_due:
                    self.heartbeat_due = False
                    ids = [a for a, r in self.running.items() if not r.dropped]
                    if ids:
                        await self.stream.send_heartbeat(ids)
                        stats.heartbeat_frames += 1
                if self.closing and not self.done and not self.rejected:
                    await self.stream.done_writing()
                    return
        except TickmeshError as exc:
            logger.warning("cannot send to the pool: %s", exc)
            self.stream.cancel()

    async def _heartbeat_loop(self) -> None:
        interval = self.welcome.heartbeat_interval_s or 2.0
        while True:
            await asyncio.sleep(interval)
            if self.running:
                self.heartbeat_due = True
                self.wake.set()

    def start_drain(self, grace: float) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(grace), name="worker-drain")

    async def drain(self, grace: float) -> None:
        """Finish running work within ``grace`` seconds, then close the stream for writing."""
        self.start_drain(grace)
        assert self._drain_task is not None
        await asyncio.shield(self._drain_task)

    async def _drain(self, grace: float) -> None:
        self.draining = True
        pending = [r.settled for r in self.running.values() if r.settled is not None]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        leftovers = list(self.running.values())
        for run in leftovers:
            # Not reported: the pool returns unreported work to the queue when we leave.
            run.dropped = True
            run.ctx.cancelled.set()
            if run.inner is not None:
                run.inner.cancel()
        unsettled = [r.settled for r in leftovers if r.settled is not None]
        if unsettled:
            await asyncio.wait(unsettled, timeout=_CANCEL_GRACE_S)
        self.closing = True
        self.wake.set()
        # The pool ends the stream once we stop writing; don't wait forever if it doesn't.
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self.finished.wait()
        except TimeoutError:
            self.stream.cancel()
