"""The executor pool's core: sessions, capacity-driven pulling, assignment,
timeouts, retries, dead letters and the publish-then-ack of execution records.

No gRPC here: a session is an outbox of ``ConnectResponse`` frames that the
servicer streams out, and the servicer feeds ``ConnectRequest`` frames in.

Invariants:

* A session never holds more assignments than its concurrency.
* A request is acked only after its execution record (and, for a final
  failure, its dead letter) has a PubAck; a failed publish leaves it unacked
  for JetStream to redeliver.
* Every frame carries a batch: one ``Assignments`` frame per session per pulled
  batch, one ``publish_batch`` per ``Completions`` frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import Span, SpanKind, Status, Tracer
from opentelemetry.trace import StatusCode as SpanStatus

from tickmesh.runtime import steps
from tickmesh.runtime.blobs import (
    BlobStore,
    offload_payload,
    offload_to_budget,
    payload_sha256,
)
from tickmesh.runtime.consumer import BatchConsumer, durable_config, message_type, term
from tickmesh.runtime.crash import crash_point
from tickmesh.runtime.delivery import Delivery, delivery_of
from tickmesh.runtime.metrics import Metrics
from tickmesh.runtime.nats import Outgoing, PublishError, ack_all, publish_batch
from tickmesh.runtime.records import check_telemetry
from tickmesh.runtime.subjects import (
    HDR_ATTEMPT,
    HDR_EXECUTION,
    HDR_LIFETIME,
    HDR_MSG_ID,
    HDR_REASON,
    HDR_TENANT,
    HDR_TRACEPARENT,
    HDR_TYPE,
    TenantNames,
    WorkKind,
    check_token,
    tenant_of_subject,
)
from tickmesh.runtime.tenant_links import TenantLinks
from tickmesh.runtime.tracing import parent_of, set_parent
from tickmesh.sdk import BodyKind, ValidationError, decode_envelope, encode_envelope, uuid7
from tickmesh.sdk.errors import NotFoundError, RPCError, StatusCode, TickmeshError, TransportError
from tickmesh.sdk.timestamps import now_timestamp, set_now, timestamp_from_ns
from tickmesh.sdk.tracing import (
    ATTR_ATTEMPT,
    ATTR_EXECUTION,
    ATTR_GRAPH,
    ATTR_HANDLER,
    ATTR_ITERATION,
    ATTR_KIND,
    ATTR_LIFETIME,
    ATTR_NODE,
    ATTR_TENANT,
)
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    executor_pool_service_pb2,
    graph_pb2,
    header_pb2,
    payload_pb2,
    result_pb2,
)

from .config import ExecutorPoolSettings

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_CONCURRENCY = 10_000
_TASK_OUTCOMES = frozenset(
    {
        result_pb2.TASK_STATUS_SUCCEEDED,
        result_pb2.TASK_STATUS_FAILED,
        result_pb2.TASK_STATUS_TIMED_OUT,
        result_pb2.TASK_STATUS_CANCELLED,
    }
)
MAX_HANDLERS = 1_000
"""The most handlers one executor may announce. Each is a JetStream consumer the pool
opens and pulls from (and a durable the server keeps): an executor announcing names by
the hundred thousand would have the pool and the server spend themselves on it."""
"""The most assignments one executor session may ask for."""
DLQ_KIND = "work"
"""Dead letters carry the attempt count that exhausted the step."""
CANCELLED_ERROR_TYPE = "CancelledError"
"""ErrorInfo.type a plan attempt carries when it was cancelled (plans have no status)."""
PUBLISH_RETRIES = 2
"""Extra tries of a failed record publish (same message ids) before leaving it to redelivery."""
_ABORT_GRACE_S = 1.0
"""How long an unresponsive session's stream may take to deliver its status before it is
cancelled."""
_MAX_HEADER_VALUE = 512
_AGGRESSIVE_INLINE_LIMIT = 1024
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Hashing this much on the event loop costs well under a millisecond; more goes to a thread.
_HASH_ON_LOOP_MAX = 256 * 1024

_REQUEST_KIND: dict[WorkKind, BodyKind] = {"task": "task_request", "plan": "plan_request"}
_RECORD_KIND: dict[WorkKind, str] = {"task": "task_execution", "plan": "plan_execution"}
_NODE_KINDS: dict[int, WorkKind] = {
    graph_pb2.NODE_KIND_TASK: "task",
    graph_pb2.NODE_KIND_PLAN: "plan",
}

Frame = executor_pool_service_pb2.ConnectResponse
Result = result_pb2.TaskResult | result_pb2.PlanResult


@dataclass
class PoolStats:
    """Counters for tests, logs and benchmarks."""

    sessions: int = 0
    assignment_frames: int = 0
    assignments: int = 0
    completion_frames: int = 0
    completions: int = 0
    records: int = 0
    dead_letters: int = 0
    malformed: int = 0
    retries: int = 0
    timeouts: int = 0
    rejections: int = 0
    cancellations: int = 0
    requeued: int = 0
    publish_failures: int = 0
    blob_fetches: int = 0
    """Blobs read for executors (``FetchBlob`` calls that found their blob)."""
    unresponsive: int = 0
    """Sessions the pool ended because their executor stopped answering for its work."""
    max_in_flight: dict[str, int] = field(default_factory=dict)
    """Highest number of assignments each executor id held at once."""


def _now() -> timestamp_pb2.Timestamp:
    return now_timestamp()


async def _sha256_off_loop(data: bytes) -> str:
    if len(data) <= _HASH_ON_LOOP_MAX:
        return payload_sha256(data)
    return await asyncio.to_thread(payload_sha256, data)


def _header_value(text: str) -> str:
    """NATS header values are one line."""
    return " ".join(text.split())[:_MAX_HEADER_VALUE]


def check_hello(
    hello: executor_pool_service_pb2.ExecutorHello,
) -> dict[tuple[WorkKind, str], str]:
    """Check an executor's hello; return its handlers as (kind, name) -> code digest.

    Raises:
        ValidationError: Saying what is wrong with the hello.
    """
    if hello.protocol_version not in (0, PROTOCOL_VERSION):
        raise ValidationError(
            f"protocol version {hello.protocol_version} is not supported "
            f"(this pool speaks {PROTOCOL_VERSION})"
        )
    if not hello.handlers:
        raise ValidationError("hello must announce at least one handler")
    if len(hello.handlers) > MAX_HANDLERS:
        raise ValidationError(
            f"hello announces {len(hello.handlers):,} handlers; "
            f"one executor may serve at most {MAX_HANDLERS:,}"
        )
    if not 1 <= hello.concurrency <= MAX_CONCURRENCY:
        raise ValidationError(
            f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {hello.concurrency}"
        )
    handlers: dict[tuple[WorkKind, str], str] = {}
    for spec in hello.handlers:
        kind = _NODE_KINDS.get(spec.kind)
        if kind is None:
            raise ValidationError(f"handler {spec.name!r}: kind must be TASK or PLAN")
        check_token(spec.name, "handler name")
        handlers[(kind, spec.name)] = spec.code_digest
    return handlers


class Session:
    """One connected executor: what it serves, what it holds, and its outbox."""

    def __init__(
        self,
        *,
        tenant: str,
        hello: executor_pool_service_pb2.ExecutorHello,
        handlers: dict[tuple[WorkKind, str], str],
    ) -> None:
        self.id = uuid7()
        self.tenant = tenant
        self.executor_id = hello.executor_id or self.id
        self.runtime = hello.runtime
        self.sdk_version = hello.sdk_version
        self.concurrency = int(hello.concurrency)
        self.handlers = handlers
        """(kind, handler) -> code digest announced in hello."""
        self.in_flight: dict[str, Lease] = {}
        self.draining = False
        self.closed = False
        self.released = False
        self.owing_since: float | None = None
        """Loop time since which the executor owes an answer (it was given work, and has
        sent no frame since, or holds work still), or None: how long it has been silent.
        Work the pool took back (deadline, redelivery) is still owed its report."""
        self.abort: Callable[[], None] | None = None
        """Ends the stream even while a frame waits on an executor that does not read
        (set by the servicer)."""
        self._outbox: asyncio.Queue[Frame | BaseException | None] = asyncio.Queue()
        self.frames_sent = 0

    @property
    def free(self) -> int:
        if self.closed or self.draining:
            return 0
        return max(0, self.concurrency - len(self.in_flight))

    def send(self, frame: Frame) -> None:
        if not self.closed:
            self._outbox.put_nowait(frame)

    def close(self, error: BaseException | None = None) -> None:
        """End the response stream (with ``error``, if given)."""
        if not self.closed:
            self.closed = True
            self._outbox.put_nowait(error)

    async def frames(self, stats: PoolStats) -> AsyncIterator[Frame]:
        """The frames to stream out; frames queued together are merged into one."""
        while True:
            queued = [await self._outbox.get()]
            while not self._outbox.empty():
                queued.append(self._outbox.get_nowait())
            frames, ended, error = merge_frames(queued)
            for frame in frames:
                if frame.WhichOneof("message") == "assignments":
                    stats.assignment_frames += 1
                self.frames_sent += 1
                yield frame
            if error is not None:
                raise error
            if ended:
                return


def merge_frames(
    queued: list[Frame | BaseException | None],
) -> tuple[list[Frame], bool, BaseException | None]:
    """Merge runs of queued frames of the same kind (assignments, cancellations) into one
    frame each, keeping their order: a cancellation never overtakes the assignment it
    stops, nor an assignment the cancellation that freed its slot. Stops at the end marker."""
    out: list[Frame] = []
    for item in queued:
        if item is None or isinstance(item, BaseException):
            return out, True, item
        kind = item.WhichOneof("message")
        last = out[-1] if out else None
        if last is not None and kind == last.WhichOneof("message"):
            if kind == "assignments":
                last.assignments.items.extend(item.assignments.items)
                continue
            if kind == "cancellations":
                last.cancellations.items.extend(item.cancellations.items)
                continue
        out.append(item)
    return out, False, None


@dataclass(eq=False)
class Lease:
    """One delivered request, from delivery until it is acked, naked or termed."""

    msg: Msg
    envelope: envelope_pb2.ExecutionEnvelope
    group: HandlerGroup
    attempt: int
    retry: graph_pb2.RetryPolicy
    timeout_s: float
    request_digest: str
    stream_seq: int
    id: str = ""
    session: Session | None = None
    assigned_at: timestamp_pb2.Timestamp | None = None
    timer: asyncio.TimerHandle | None = None
    cancel_reason: str = ""
    settling: bool = False
    heard_at: float = 0.0
    """Loop time of the assignment, then of each heartbeat naming it."""
    span: Span | None = None
    """The step's span while it is traced: from delivery until the lease is settled."""

    def end_span(self, outcome: str, error: str = "") -> None:
        """End the step's span (once) with how the attempt ended."""
        span, self.span = self.span, None
        if span is None:
            return
        span.set_attribute("tickmesh.outcome", outcome)
        if error:
            span.set_status(Status(SpanStatus.ERROR, error[:512]))
        span.end()

    def settle(self) -> None:
        """Mark the lease as being settled; its deadline no longer applies."""
        self.settling = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @property
    def kind(self) -> WorkKind:
        return self.group.kind

    @property
    def header(self) -> header_pb2.EnvelopeHeader:
        return self.envelope.header


@dataclass(eq=False)
class Outcome:
    """A finished attempt, to be recorded or retried."""

    lease: Lease
    result: Result
    finished_at: timestamp_pb2.Timestamp
    started_at: timestamp_pb2.Timestamp | None = None
    code_digest: str = ""
    final: bool = False
    """Record it whatever the retry policy says (attempts exhausted, cancelled)."""


class HandlerGroup:
    """The sessions serving one (tenant, kind, handler), and its consumer."""

    def __init__(self, tenant: str, kind: WorkKind, handler: str) -> None:
        self.tenant = tenant
        self.kind = kind
        self.handler = handler
        self.names = TenantNames(tenant)
        self.durable = self.names.work_consumer(kind, handler)
        """The name of the group's durable consumer."""
        self.sessions: list[Session] = []
        self.backlog: deque[Lease] = deque()
        """Delivered but not yet handed out (a session serving several handlers was full)."""
        self.consumer: BatchConsumer | None = None

    @property
    def key(self) -> tuple[str, WorkKind, str]:
        return (self.tenant, self.kind, self.handler)

    def capacity(self) -> int:
        """How many more messages to ask the server for."""
        if self.consumer is None:
            return 0
        free = sum(s.free for s in self.sessions)
        held = len(self.backlog) + self.consumer.queued + self.consumer.outstanding
        return free - held


class ExecutorPool:
    """Assigns queued work to executor sessions and settles what they return."""

    def __init__(
        self,
        settings: ExecutorPoolSettings,
        *,
        links: TenantLinks,
        blobs: BlobStore,
        version: str = "0.0.0",
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._tracer = tracer
        self._links = links
        """Each tenant's NATS connection: its work, records, dead letters and cancels."""
        self._blobs = blobs
        self._producer = header_pb2.Producer(
            service="executor-pool", version=version, instance=settings.instance
        )
        self.stats = PoolStats()
        self._sessions: set[Session] = set()
        self._groups: dict[tuple[str, WorkKind, str], HandlerGroup] = {}
        self._consumers: dict[tuple[str, str], str] = {}
        """(tenant, durable) -> stream of every work consumer started in this process."""
        self._by_seq: dict[tuple[str, int], Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        """Per tenant, over its handler groups: starting a group creates its consumer
        through the tenant's link, which must not wait on another tenant's."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._cancel_subs: dict[str, Subscription] = {}
        """Tenant -> its cancellation subscription; the keys are the tenants served."""
        self._pull_wanted: set[HandlerGroup] = set()
        self._pull_wake = asyncio.Event()
        self._released = asyncio.Event()
        self._expired: list[Lease] = []
        self._stopping = False
        self._started = False
        # A conforming executor heartbeats every interval. Only an assignment not heard
        # of for well over that (two beats, half the ack wait) when its ack wait ran out
        # marks its executor as silent: one heartbeated on time whose extension the bus
        # lost, or given the work late in its ack wait, is not to blame.
        interval, ack_wait = settings.heartbeat_interval_s, settings.ack_wait_s
        self._lease_silence = max(2 * interval, ack_wait / 2)
        # An executor given work that sends nothing at all for a whole ack wait has let
        # the ack wait of what it held run out, or ignored the cancellations of what timed
        # out: wedged, whatever its steps' timeouts.
        self._session_silence = max(2 * interval, ack_wait)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def served_tenants(self) -> Collection[str]:
        """The tenants served now (a live view; see :meth:`add_tenant`)."""
        return self._cancel_subs.keys()

    async def add_tenant(self, tenant: str) -> None:
        """Serve ``tenant``: its executors may connect, and its cancellations are heard."""
        if tenant in self._cancel_subs:
            return
        link = await self._links.get(tenant)
        sub = await link.nc.subscribe(TenantNames(tenant).cancel, cb=self._on_cancel_msg)
        self._cancel_subs[tenant] = sub

    async def remove_tenant(self, tenant: str) -> None:
        """Stop serving ``tenant``: its executor streams end with PERMISSION_DENIED, its
        work consumers stop, what its executors held goes back to its queue (when its
        connection still allows), and its link closes."""
        sub = self._cancel_subs.pop(tenant, None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        gone = RPCError(StatusCode.PERMISSION_DENIED, f"tenant {tenant!r} is no longer served")
        for session in [s for s in self._sessions if s.tenant == tenant]:
            session.close(gone)
        async with self._lock(tenant):
            for group in [g for g in self._groups.values() if g.tenant == tenant]:
                await self._stop_group(group)
        await self._links.drop(tenant)

    async def start(self) -> None:
        """Start the pull and timer loops (tenants are added by :meth:`add_tenant`)."""
        if self._started:
            return
        self._started = True
        self._loops = [
            asyncio.create_task(self._pull_loop(), name="pool:pull"),
            asyncio.create_task(self._housekeeping_loop(), name="pool:housekeeping"),
        ]

    async def stop(self, grace: float) -> None:
        """Drain: ask every executor to finish, stop pulling, wait up to ``grace``,
        then return what is left to the queue."""
        if self._stopping:
            return
        self._stopping = True
        drain = executor_pool_service_pb2.Drain(reason="executor pool shutting down")
        drain.grace.FromMilliseconds(int(grace * 1000))
        for session in list(self._sessions):
            session.draining = True
            session.send(Frame(drain=drain))
        for group in list(self._groups.values()):
            async with self._lock(group.tenant):
                await self._stop_group(group)
        for sub in self._cancel_subs.values():
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._cancel_subs.clear()
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        while any(s.in_flight for s in self._sessions) and loop.time() < until:
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, until - loop.time())):
                    await self._released.wait()
        for session in list(self._sessions):
            await self._requeue(session.in_flight.values())
            session.in_flight.clear()
            session.close()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loops.clear()

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())

    def spawn(self, coro: Coroutine[Any, Any, None], name: str = "") -> None:
        """Run ``coro`` as a task owned by the pool (awaited in stop)."""
        task = asyncio.create_task(coro, name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("pool task %s failed", task.get_name(), exc_info=exc)

    # --- sessions ----------------------------------------------------------------------------

    def open_session(self, tenant: str, hello: executor_pool_service_pb2.ExecutorHello) -> Session:
        """Check an executor's hello and make its session (not yet registered).

        Raises:
            ValidationError: The hello is malformed.
            TransportError: The pool is shutting down.
        """
        if self._stopping:
            raise TransportError("the executor pool is shutting down")
        return Session(tenant=tenant, hello=hello, handlers=check_hello(hello))

    def welcome(self, session: Session) -> Frame:
        settings = self._settings
        interval = duration_pb2.Duration()
        interval.FromMilliseconds(int(settings.heartbeat_interval_s * 1000))
        return Frame(
            welcome=executor_pool_service_pb2.Welcome(
                session_id=session.id,
                heartbeat_interval=interval,
                inline_payload_limit=settings.inline_limit,
                max_message_bytes=settings.max_message_bytes,
                protocol_version=PROTOCOL_VERSION,
            )
        )

    async def register(self, session: Session) -> None:
        """Join the session to its handler groups, starting their consumers as needed."""
        async with self._lock(session.tenant):
            if self._stopping:
                raise TransportError("the executor pool is shutting down")
            self._sessions.add(session)
            self.stats.sessions += 1
            if self._metrics is not None:
                self._metrics.executor_joined(session.tenant)
            for kind, handler in session.handlers:
                group = self._groups.get((session.tenant, kind, handler))
                if group is None:
                    group = HandlerGroup(session.tenant, kind, handler)
                    await self._start_group(group)
                    self._groups[group.key] = group
                group.sessions.append(session)
                self._assign(group, ())
                self._want_pull(group)
        logger.info(
            "executor %s joined (session %s, tenant %s, %d handlers, concurrency %d)",
            session.executor_id,
            session.id,
            session.tenant,
            len(session.handlers),
            session.concurrency,
        )

    def release(self, session: Session) -> None:
        """The session's stream ended: return its unfinished work (in a pool task)."""
        session.close()
        if session.released:  # ended by the pool before its stream ended
            return
        session.released = True
        self.spawn(self._unregister(session), name=f"pool:release:{session.id}")

    def _end_unresponsive(self, session: Session, why: str) -> None:
        """End a session whose executor stopped answering for its work: its assignments
        go back to the queue at once, and it is given nothing more. A live executor
        reconnects and is welcomed as a new session."""
        if session.closed:
            return
        self.stats.unresponsive += 1
        logger.warning(
            "executor %s (session %s) is unresponsive: %s; ending its session",
            session.executor_id,
            session.id,
            why,
        )
        session.close(TransportError(f"session {session.id} ended: {why}"))
        self.release(session)
        abort = session.abort
        if abort is not None:
            # The status follows the frames queued before it: an executor that reads gets
            # it at once; for one that does not, the call is cancelled after a grace.
            asyncio.get_running_loop().call_later(_ABORT_GRACE_S, abort)

    async def _unregister(self, session: Session) -> None:
        leases = [lease for lease in session.in_flight.values() if not lease.settling]
        session.in_flight.clear()
        async with self._lock(session.tenant):
            if session in self._sessions and self._metrics is not None:
                self._metrics.executor_left(session.tenant)
            self._sessions.discard(session)
            for kind, handler in session.handlers:
                group = self._groups.get((session.tenant, kind, handler))
                if group is None:
                    continue
                with contextlib.suppress(ValueError):
                    group.sessions.remove(session)
                if not group.sessions:
                    # Stop pulling before giving the work back: a pull request still
                    # open would take the returned work again, only to return it.
                    await self._stop_group(group)
                else:
                    self._want_pull(group)
            await self._requeue(leases)
        self._released.set()
        logger.info(
            "executor %s left (session %s); %d assignment(s) returned to the queue",
            session.executor_id,
            session.id,
            len(leases),
        )

    async def _requeue(self, leases: Iterable[Lease]) -> None:
        """Give work back to JetStream at once, for another executor."""
        for lease in list(leases):
            if lease.settling:
                continue
            lease.settle()
            self._forget(lease)
            self.stats.requeued += 1
            with contextlib.suppress(Exception):
                await lease.msg.nak()

    async def _start_group(self, group: HandlerGroup) -> None:
        names = group.names
        config = durable_config(
            group.durable,
            names.work(group.kind, group.handler),
            ack_wait_s=self._settings.ack_wait_s,
            max_ack_pending=self._settings.max_ack_pending,
        )

        async def handle(batch: list[Msg]) -> None:
            await self._on_batch(group, batch)

        link = await self._links.get(group.tenant)
        consumer = BatchConsumer(
            link.nc,
            link.js,
            stream=names.work_stream,
            config=config,
            handler=handle,
            max_batch=self._settings.max_batch,
            auto=False,
            name=f"pool:{group.tenant}:{group.kind}:{group.handler}",
            on_request_end=lambda: self._want_pull(group),
        )
        await consumer.start()
        group.consumer = consumer
        if (group.tenant, group.durable) not in self._consumers:
            self._consumers[(group.tenant, group.durable)] = names.work_stream
            if self._metrics is not None:
                self._metrics.consumers_changed()

    def consumers(self) -> list[tuple[str, str, str]]:
        """(tenant, stream, durable) of every work consumer this pool has read, including
        those whose executors all left (their queues still fill)."""
        return [(tenant, stream, durable) for (tenant, durable), stream in self._consumers.items()]

    async def _stop_group(self, group: HandlerGroup) -> None:
        consumer, group.consumer = group.consumer, None
        self._groups.pop(group.key, None)
        if consumer is not None:
            await consumer.stop()
        backlog = list(group.backlog)
        group.backlog.clear()
        await self._requeue(backlog)

    # --- pulling and assigning -----------------------------------------------------------------

    def _want_pull(self, group: HandlerGroup) -> None:
        self._pull_wanted.add(group)
        self._pull_wake.set()

    async def _pull_loop(self) -> None:
        while True:
            await self._pull_wake.wait()
            self._pull_wake.clear()
            wanted, self._pull_wanted = self._pull_wanted, set()
            for group in wanted:
                consumer = group.consumer
                count = group.capacity()
                if consumer is None or count <= 0 or self._stopping:
                    continue
                try:
                    await consumer.pull(min(count, self._settings.max_ack_pending))
                except Exception as exc:  # disconnected: the housekeeping tick asks again
                    logger.warning("cannot pull for %s/%s: %s", group.kind, group.handler, exc)

    async def _on_batch(self, group: HandlerGroup, msgs: list[Msg]) -> None:
        """A batch was delivered: hand out what is valid, dead-letter what is not."""
        valid: list[Lease] = []
        exhausted: list[Lease] = []
        malformed: list[tuple[Msg, str]] = []
        now = asyncio.get_running_loop().time()
        for msg in msgs:
            try:
                lease = self._lease(group, msg)
            except ValidationError as exc:
                malformed.append((msg, str(exc)))
                continue
            key = (group.tenant, lease.stream_seq)
            previous = self._by_seq.get(key)
            if previous is not None:
                if previous.settling:
                    # Its record is being published right now; that ack settles this delivery too.
                    continue
                holder = previous.session
                silent = now - previous.heard_at
                if (
                    holder is not None
                    and holder.in_flight.get(previous.id) is previous
                    and silent > self._lease_silence
                ):
                    # Before the revocation frees its slot: it would get the step again.
                    self._end_unresponsive(
                        holder,
                        f"no heartbeat for assignment {previous.id} in {silent:.1f}s, "
                        "past the ack wait",
                    )
                self._revoke(previous, "redelivered: no heartbeat within the ack wait")
            self._by_seq[key] = lease
            if self._tracer is not None:
                self._start_span(self._tracer, lease)
            if lease.attempt > steps.max_attempts(lease.retry):
                lease.settle()
                exhausted.append(lease)
            else:
                valid.append(lease)
        if valid:
            self._assign(group, valid)
        if exhausted:
            self._settle_soon(
                [
                    Outcome(
                        lease,
                        self._failure(
                            lease,
                            "AttemptsExhausted",
                            f"delivered {lease.attempt} times without a result "
                            f"(max attempts {steps.max_attempts(lease.retry)})",
                            retryable=False,
                        ),
                        _now(),
                        final=True,
                    )
                    for lease in exhausted
                ]
            )
        if malformed:
            await self._dead_letter_malformed(group.tenant, malformed)
        if self._metrics is not None:
            self._metrics.count_redeliveries(group.tenant, group.durable, msgs)
        self._want_pull(group)

    def _lease(self, group: HandlerGroup, msg: Msg) -> Lease:
        headers = msg.headers or {}
        expected = _REQUEST_KIND[group.kind]
        declared = message_type(msg)
        if declared != expected:
            raise ValidationError(f"message type header is {declared!r}, expected {expected!r}")
        envelope = decode_envelope(msg.data, expected_kind=expected)
        header = envelope.header
        subject_tenant = tenant_of_subject(msg.subject)
        if subject_tenant != group.tenant or header.tenant_id != group.tenant:
            raise ValidationError(
                f"tenant {header.tenant_id!r} of the envelope does not match the subject's "
                f"tenant {subject_tenant!r}"
            )
        header_tenant = headers.get(HDR_TENANT)
        if header_tenant is not None and header_tenant != group.tenant:
            raise ValidationError(f"{HDR_TENANT} header {header_tenant!r} != {group.tenant!r}")
        if header.node.handler != group.handler:
            raise ValidationError(
                f"envelope is for handler {header.node.handler!r}, subject for {group.handler!r}"
            )
        check_token(header.lifetime_id, "lifetime id")
        check_token(header.execution_id, "execution id")
        body = envelope.task_request if group.kind == "task" else envelope.plan_request
        delivery = delivery_of(msg.reply)
        if delivery is None:  # not a JetStream delivery: nats-py raises its own error
            metadata = msg.metadata
            delivery = Delivery(metadata.num_delivered, metadata.sequence.stream)
        header.attempt = delivery.delivered
        timeout = body.timeout.ToTimedelta().total_seconds() if body.HasField("timeout") else 0.0
        return Lease(
            msg=msg,
            envelope=envelope,
            group=group,
            attempt=delivery.delivered,
            retry=body.retry,
            timeout_s=steps.timeout_seconds(timeout),
            request_digest=hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest(),
            stream_seq=delivery.stream_seq,
        )

    @staticmethod
    def _start_span(tracer: Tracer, lease: Lease) -> None:
        """Open the step's span under the lifetime's, and make it the parent of what the
        step leads to: the executor's work (the assignment carries the header) and, through
        the record's header, the state's append and the router's routing."""
        header = lease.header
        parent = parent_of(header)
        if parent is None:
            return
        lease.span = tracer.start_span(
            f"tickmesh.step {lease.kind} {header.node.handler}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                ATTR_TENANT: header.tenant_id,
                ATTR_LIFETIME: header.lifetime_id,
                ATTR_GRAPH: f"{header.graph.id}@{header.graph.version}",
                ATTR_NODE: header.node.id,
                ATTR_HANDLER: header.node.handler,
                ATTR_KIND: lease.kind,
                ATTR_EXECUTION: header.execution_id,
                ATTR_ATTEMPT: lease.attempt,
                ATTR_ITERATION: header.iteration,
            },
        )
        set_parent(header, lease.span)

    def _assign(self, group: HandlerGroup, leases: Sequence[Lease]) -> None:
        """Hand out the backlog, then ``leases``: least-loaded session first, one frame each."""
        queue = group.backlog
        queue.extend(leases)
        if not queue:
            return
        # Each session's frame is built in place: protobuf copies a message into any field
        # or list it is given, and an envelope carries the step's whole input.
        frames: dict[Session, Frame] = {}
        loop = asyncio.get_running_loop()
        while queue:
            session = max(
                (s for s in group.sessions if s.free > 0),
                key=lambda s: (s.free, -len(s.in_flight)),
                default=None,
            )
            if session is None:
                break
            lease = queue.popleft()
            lease.id = uuid7()
            lease.session = session
            lease.assigned_at = _now()
            lease.heard_at = loop.time()
            if session.owing_since is None:
                session.owing_since = lease.heard_at
            lease.timer = loop.call_at(loop.time() + lease.timeout_s, self._on_deadline, lease)
            assigned = lease.assigned_at
            deadline = timestamp_from_ns(
                assigned.seconds * 1_000_000_000 + assigned.nanos + int(lease.timeout_s * 1e9)
            )
            session.in_flight[lease.id] = lease
            frame = frames.get(session)
            if frame is None:
                frame = frames[session] = Frame()
            item = frame.assignments.items.add()
            item.assignment_id = lease.id
            item.envelope.CopyFrom(lease.envelope)
            item.deadline.CopyFrom(deadline)
        for session, frame in frames.items():
            session.send(frame)
            self.stats.assignments += len(frame.assignments.items)
            peak = self.stats.max_in_flight
            peak[session.executor_id] = max(
                peak.get(session.executor_id, 0), len(session.in_flight)
            )

    def _slots_freed(self, sessions: Iterable[Session]) -> None:
        groups = {
            self._groups.get((s.tenant, kind, handler))
            for s in sessions
            for kind, handler in s.handlers
        }
        for group in groups:
            if group is not None:
                if group.backlog:
                    self._assign(group, ())
                self._want_pull(group)
        self._released.set()

    def _take(self, session: Session, assignment_id: str) -> Lease | None:
        lease = session.in_flight.pop(assignment_id, None)
        if lease is not None:
            lease.settle()
        return lease

    def _revoke(self, lease: Lease, reason: str) -> None:
        """Take an assignment back from its executor without settling it."""
        session = lease.session
        if session is not None and session.in_flight.get(lease.id) is lease:
            del session.in_flight[lease.id]
            session.send(self._cancellations([(lease.id, reason)]))
            self._slots_freed([session])
        if lease in lease.group.backlog:
            lease.group.backlog.remove(lease)
        lease.settle()
        lease.end_span("revoked", reason)

    @staticmethod
    def _cancellations(items: Iterable[tuple[str, str]]) -> Frame:
        return Frame(
            cancellations=executor_pool_service_pb2.Cancellations(
                items=[
                    executor_pool_service_pb2.Cancellation(assignment_id=a, reason=r)
                    for a, r in items
                ]
            )
        )

    # --- what executors send ---------------------------------------------------------------

    async def handle(
        self, session: Session, request: executor_pool_service_pb2.ConnectRequest
    ) -> None:
        """Act on one frame from an executor.

        Raises:
            ValidationError: The frame breaks the protocol (e.g. a second hello).
        """
        kind = request.WhichOneof("message")
        now = asyncio.get_running_loop().time()
        session.owing_since = now  # until the frame is handled: then None if it holds nothing
        if kind == "heartbeat":
            for assignment_id in request.heartbeat.assignment_ids:
                lease = session.in_flight.get(assignment_id)
                if lease is not None:
                    lease.heard_at = now
                    with contextlib.suppress(Exception):
                        await lease.msg.in_progress()
        elif kind == "completions":
            self._on_completions(session, request.completions.items)
        elif kind == "rejections":
            await self._on_rejections(session, request.rejections.items)
        elif kind == "hello":
            raise ValidationError("hello may only be sent once, as the first message")
        if not session.in_flight:
            session.owing_since = None

    def _on_completions(
        self, session: Session, items: Sequence[executor_pool_service_pb2.Completion]
    ) -> None:
        self.stats.completion_frames += 1
        outcomes: list[Outcome] = []
        for item in items:
            lease = self._take(session, item.assignment_id)
            if lease is None:
                continue  # timed out, revoked or unknown: already settled elsewhere
            self.stats.completions += 1
            which = item.WhichOneof("result")
            result: Result
            if lease.kind == "task" and which == "task_result":
                result = item.task_result
                if item.task_result.status not in _TASK_OUTCOMES:
                    # UNSPECIFIED or a number no TaskStatus has: not an outcome to record.
                    result = self._failure(
                        lease,
                        "InvalidCompletion",
                        f"a task result's status {item.task_result.status} is not an outcome "
                        "(expected SUCCEEDED, FAILED, TIMED_OUT or CANCELLED)",
                        retryable=True,
                    )
            elif lease.kind == "plan" and which == "plan_result":
                result = item.plan_result
            else:
                result = self._failure(
                    lease,
                    "InvalidCompletion",
                    f"a {lease.kind} assignment was completed with {which or 'no result'}",
                    retryable=True,
                )
            outcomes.append(
                Outcome(
                    lease,
                    result,
                    finished_at=item.finished_at if item.HasField("finished_at") else _now(),
                    started_at=item.started_at if item.HasField("started_at") else None,
                    code_digest=item.code_digest,
                )
            )
        if outcomes:
            self._slots_freed([session])
            self._settle_soon(outcomes)

    async def _on_rejections(
        self, session: Session, items: Sequence[executor_pool_service_pb2.Rejection]
    ) -> None:
        final: list[Outcome] = []
        for item in items:
            lease = self._take(session, item.assignment_id)
            if lease is None:
                continue
            self.stats.rejections += 1
            if lease.attempt >= steps.max_attempts(lease.retry):
                error = item.error
                final.append(
                    Outcome(
                        lease,
                        self._failure(
                            lease,
                            error.type or "Rejected",
                            f"rejected by executor {session.executor_id}: {error.message}",
                            retryable=False,
                        ),
                        _now(),
                        final=True,
                    )
                )
                continue
            self._forget(lease)
            with contextlib.suppress(Exception):
                await lease.msg.nak(delay=self._settings.reject_delay_s)
        self._slots_freed([session])
        if final:
            self._settle_soon(final)

    def _failure(self, lease: Lease, type_: str, message: str, *, retryable: bool) -> Result:
        error = result_pb2.ErrorInfo(type=type_, message=message, retryable=retryable)
        if lease.kind == "task":
            return result_pb2.TaskResult(status=result_pb2.TASK_STATUS_FAILED, error=error)
        return result_pb2.PlanResult(error=error)

    # --- timeouts, cancellations ------------------------------------------------------------

    def _on_deadline(self, lease: Lease) -> None:
        """A lease's deadline passed (a loop timer): expire it with the others due this tick."""
        lease.timer = None
        session = lease.session
        if lease.settling or session is None or session.in_flight.get(lease.id) is not lease:
            return
        if not self._expired:
            asyncio.get_running_loop().call_soon(self._expire_due)
        self._expired.append(lease)

    def _expire_due(self) -> None:
        leases, self._expired = self._expired, []
        live = [
            lease
            for lease in leases
            if lease.session is not None and lease.session.in_flight.get(lease.id) is lease
        ]
        if live:
            self._expire(live)

    async def _housekeeping_loop(self) -> None:
        tick = min(1.0, self._settings.ack_wait_s / 3)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for session in list(self._sessions):
                if session.owing_since is None or session.closed:
                    continue
                silent = now - session.owing_since
                if silent > self._session_silence:
                    self._end_unresponsive(
                        session,
                        f"given work, it sent no heartbeat or other frame in {silent:.1f}s",
                    )
            for group in list(self._groups.values()):
                # Work delivered but not yet handed out must not hit its ack wait.
                for lease in list(group.backlog):
                    with contextlib.suppress(Exception):
                        await lease.msg.in_progress()
                # Pull requests lost without a status (e.g. a broker restart) are asked again.
                self._want_pull(group)

    def _expire(self, leases: list[Lease]) -> None:
        per_session: dict[Session, list[tuple[str, str]]] = {}
        outcomes: list[Outcome] = []
        for lease in leases:
            session = lease.session
            assert session is not None
            self._take(session, lease.id)
            per_session.setdefault(session, []).append((lease.id, "deadline exceeded"))
            if lease.cancel_reason:
                result = self._cancelled(lease)
            else:
                self.stats.timeouts += 1
                error = result_pb2.ErrorInfo(
                    type="TimeoutError",
                    message=f"no result within the {lease.timeout_s:g}s timeout",
                    retryable=True,
                )
                result = (
                    result_pb2.TaskResult(status=result_pb2.TASK_STATUS_TIMED_OUT, error=error)
                    if lease.kind == "task"
                    else result_pb2.PlanResult(error=error)
                )
            outcomes.append(
                Outcome(
                    lease,
                    result,
                    finished_at=_now(),
                    started_at=lease.assigned_at,
                    final=bool(lease.cancel_reason),
                )
            )
        for session, items in per_session.items():
            session.send(self._cancellations(items))
        self._slots_freed(per_session)
        self._settle_soon(outcomes)

    def _cancelled(self, lease: Lease) -> Result:
        error = result_pb2.ErrorInfo(
            type=CANCELLED_ERROR_TYPE, message=lease.cancel_reason, retryable=False
        )
        if lease.kind == "task":
            return result_pb2.TaskResult(status=result_pb2.TASK_STATUS_CANCELLED, error=error)
        return result_pb2.PlanResult(error=error)

    async def _on_cancel_msg(self, msg: Msg) -> None:
        tenant = tenant_of_subject(msg.subject)
        try:
            envelope = envelope_pb2.ExecutionEnvelope.FromString(msg.data)
        except DecodeError:
            logger.warning("ignoring a malformed cancellation on %s", msg.subject)
            return
        header = envelope.header
        if header.tenant_id != tenant or not header.lifetime_id:
            logger.warning(
                "ignoring a cancellation for tenant %r on %s", header.tenant_id, msg.subject
            )
            return
        self.cancel(tenant, header.lifetime_id, header.execution_id)

    def cancel(self, tenant: str, lifetime_id: str, execution_id: str = "") -> int:
        """Cancel the matching work of a lifetime; return how many assignments were hit."""
        reason = f"lifetime {lifetime_id} cancelled"

        def matches(lease: Lease) -> bool:
            header = lease.header
            return header.lifetime_id == lifetime_id and (
                not execution_id or header.execution_id == execution_id
            )

        hits = 0
        for session in self._sessions:
            if session.tenant != tenant:
                continue
            items = []
            for lease in session.in_flight.values():
                if matches(lease) and not lease.cancel_reason:
                    lease.cancel_reason = reason
                    items.append((lease.id, reason))
            if items:
                hits += len(items)
                session.send(self._cancellations(items))
        outcomes: list[Outcome] = []
        for group in self._groups.values():
            if group.tenant != tenant:
                continue
            for lease in [lease for lease in group.backlog if matches(lease)]:
                group.backlog.remove(lease)
                lease.cancel_reason = reason
                lease.settle()
                outcomes.append(Outcome(lease, self._cancelled(lease), _now(), final=True))
        if outcomes:
            self._settle_soon(outcomes)
        self.stats.cancellations += hits + len(outcomes)
        return hits + len(outcomes)

    # --- blob downloads --------------------------------------------------------------------

    async def read_blob(
        self, tenant: str, uri: str, sha256: str = ""
    ) -> tuple[payload_pb2.BlobRef, bytes]:
        """Read one of ``tenant``'s blobs for an executor, verified, with its reference.

        Executors have no credentials for the blob store (S3 in the cloud
        profile), so they read the blobs their assignments refer to through the
        pool, which already holds a store for offloading.

        Args:
            tenant: The caller's tenant (already checked against the served tenants).
            uri: The blob's URI; the store refuses one outside ``tenant``'s prefix.
            sha256: The digest the caller expects, or empty for the one the URI names.

        Raises:
            ValidationError: ``uri`` is empty or ``sha256`` is not a lowercase hex digest.
            RPCError: PERMISSION_DENIED for a URI that is not one of ``tenant``'s (another
                tenant's, another store's, or not a blob URI at all); DATA_LOSS for stored
                bytes that fail their digest, or do not hash to ``sha256``.
            NotFoundError: Nothing is stored at ``uri``.
        """
        if not uri:
            raise ValidationError("FetchBlob needs the blob's uri")
        if sha256 and _SHA256_HEX.fullmatch(sha256) is None:
            raise ValidationError(f"sha256 {sha256!r} is not 64 lowercase hex digits")
        try:
            data = await self._blobs.get(tenant, uri)
        except ValidationError as exc:
            raise await self._blob_refusal(tenant, uri, exc) from exc
        digest = await _sha256_off_loop(data)
        if sha256 and digest != sha256:
            logger.warning("blob %s hashes to %s, not the %s asked for", uri, digest, sha256)
            raise RPCError(
                StatusCode.DATA_LOSS,
                f"blob {uri} holds bytes with sha256 {digest}, not the expected {sha256}",
            )
        self.stats.blob_fetches += 1
        return payload_pb2.BlobRef(uri=uri, sha256=digest, size=len(data)), data

    async def _blob_refusal(self, tenant: str, uri: str, exc: ValidationError) -> TickmeshError:
        """Tell a URI the store refuses from stored bytes that fail their digest.

        ``BlobStore.get`` raises ValidationError for both; ``exists`` checks only
        the URI (it refuses the same URIs, reading nothing), so asking it splits
        them without a request on the success path.
        """
        try:
            present = await self._blobs.exists(tenant, uri)
        except ValidationError:
            logger.warning("refused a blob URI of tenant %s: %s", tenant, exc)
            return RPCError(
                StatusCode.PERMISSION_DENIED,
                f"blob URI {uri!r} is not one of tenant {tenant!r}'s blobs in this pool's "
                f"store: {exc}",
            )
        if not present:  # removed since the read
            return NotFoundError(f"blob {uri} does not exist")
        logger.error("blob %s of tenant %s is corrupt: %s", uri, tenant, exc)
        return RPCError(StatusCode.DATA_LOSS, str(exc))

    # --- settling: record, dead-letter, ack ---------------------------------------------------

    def _settle_soon(self, outcomes: list[Outcome]) -> None:
        self.spawn(self._settle(outcomes), name="pool:settle")

    def _forget(self, lease: Lease) -> None:
        lease.end_span("settled")  # unless ended with a more precise outcome before
        key = (lease.group.tenant, lease.stream_seq)
        if self._by_seq.get(key) is lease:
            del self._by_seq[key]

    def _is_cancelled(self, outcome: Outcome) -> bool:
        result = outcome.result
        if isinstance(result, result_pb2.TaskResult):
            return result.status == result_pb2.TASK_STATUS_CANCELLED
        return result.WhichOneof("decision") is None and result.error.type == CANCELLED_ERROR_TYPE

    async def _settle(self, outcomes: list[Outcome]) -> None:
        """Retry or record each outcome; one publish for all records, then the acks."""
        publishes: list[tuple[Lease, list[Outgoing]]] = []
        for outcome in outcomes:
            lease = outcome.lease
            try:
                plan = self._classify(outcome)
                if plan == "retry":
                    self.stats.retries += 1
                    lease.end_span("retry", _error_text(outcome.result))
                    self._forget(lease)
                    await lease.msg.nak(delay=steps.backoff_seconds(lease.retry, lease.attempt))
                elif plan == "requeue":
                    # After the step's backoff, as a failed attempt: straight back, a handler
                    # that cancels itself would go round until its attempts ran out.
                    lease.end_span("requeued", _error_text(outcome.result))
                    self._forget(lease)
                    await lease.msg.nak(delay=steps.backoff_seconds(lease.retry, lease.attempt))
                else:
                    error = _error_text(outcome.result)
                    if lease.span is not None and error:
                        lease.span.set_status(Status(SpanStatus.ERROR, error[:512]))
                    publishes.append((lease, await self._outgoing(outcome, plan == "dead")))
            except Exception:
                # Left unacked: JetStream redelivers it after the ack wait.
                logger.exception("cannot settle execution %s", lease.header.execution_id)
                self._forget(lease)
        if publishes:
            await self._publish_and_ack(publishes)

    def _classify(self, outcome: Outcome) -> str:
        """``record``, ``dead`` (record + dead letter), ``retry`` or ``requeue``."""
        lease, result = outcome.lease, outcome.result
        if self._is_cancelled(outcome):
            # Only a cancellation the pool asked for ends the step; an executor that
            # stopped on its own (shutting down, or a handler that raised CancelledError)
            # gives the work back.
            return "record" if lease.cancel_reason else "requeue"
        if isinstance(result, result_pb2.TaskResult):
            if result.status == result_pb2.TASK_STATUS_UNSPECIFIED:
                result.status = result_pb2.TASK_STATUS_FAILED
                result.error.type = result.error.type or "InvalidCompletion"
                result.error.message = result.error.message or "the executor reported no status"
                result.error.retryable = True
            failed = result.status != result_pb2.TASK_STATUS_SUCCEEDED
            final = outcome.final or steps.task_attempt_is_final(lease.retry, lease.attempt, result)
        else:
            if result.WhichOneof("decision") is None and not result.HasField("error"):
                result.error.CopyFrom(
                    result_pb2.ErrorInfo(
                        type="InvalidCompletion",
                        message="the plan returned neither a decision nor an error",
                        retryable=True,
                    )
                )
            failed = result.WhichOneof("decision") is None
            final = outcome.final or steps.plan_attempt_is_final(lease.retry, lease.attempt, result)
        if not final:
            return "retry"
        return "dead" if failed else "record"

    async def _outgoing(self, outcome: Outcome, dead: bool) -> list[Outgoing]:
        lease = outcome.lease
        record, replaced = await self._record(outcome)
        messages = [record]
        if dead or replaced:
            error = outcome.result.error
            reason = (
                f"{error.type or 'Error'}: {error.message} "
                f"(attempt {lease.attempt} of {steps.max_attempts(lease.retry)})"
            )
            headers = {k: v for k, v in (lease.msg.headers or {}).items() if k != HDR_MSG_ID}
            headers[HDR_MSG_ID] = f"dlq:work:{lease.header.execution_id}:{lease.attempt}"
            headers[HDR_REASON] = _header_value(reason)
            headers[HDR_ATTEMPT] = str(lease.attempt)
            messages.append(Outgoing(lease.group.names.dlq(DLQ_KIND), lease.msg.data, headers))
        return messages

    async def _record(self, outcome: Outcome) -> tuple[Outgoing, bool]:
        """The execution record of an outcome, with large payloads offloaded.

        Returns:
            The record, and whether the executor's result had to be replaced by a
            failure because it could not be recorded (a digest that does not match
            its bytes, Struct details nested too deep, too large even offloaded,
            telemetry figures out of range).
        """
        lease = outcome.lease
        tenant = lease.group.tenant
        replaced = False
        try:
            # Figures that cannot be summed would fail the record where it is read (router
            # and state check it too): the attempt fails here, saying why.
            check_telemetry(outcome.result.telemetry)
        except ValidationError as exc:
            self._unrecordable(outcome, exc)
            replaced = True
        try:
            data = await self._encode_record(outcome, self._settings.inline_limit)
        except ValidationError:
            # Too large with several payloads just under the limit: offload nearly all.
            try:
                data = await self._encode_record(outcome, _AGGRESSIVE_INLINE_LIMIT)
            except ValidationError as exc:
                self._unrecordable(outcome, exc)
                data = encode_envelope(self._envelope(outcome))
                replaced = True
        header = lease.header
        headers = {
            # One id per execution, not per attempt: only a final attempt is ever recorded, and
            # a request redelivered after the pool died between publishing its record and
            # acking it runs again; its second record is then dropped by JetStream's
            # deduplication window instead of being stored as another attempt.
            HDR_MSG_ID: record_message_id(header.execution_id),
            HDR_TYPE: _RECORD_KIND[lease.kind],
            HDR_TENANT: tenant,
            HDR_LIFETIME: header.lifetime_id,
            HDR_EXECUTION: header.execution_id,
        }
        traceparent = header.trace_context.traceparent or (lease.msg.headers or {}).get(
            HDR_TRACEPARENT, ""
        )
        if traceparent:
            headers[HDR_TRACEPARENT] = traceparent
        return Outgoing(lease.group.names.exec(header.lifetime_id), data, headers), replaced

    def _unrecordable(self, outcome: Outcome, why: ValidationError) -> None:
        """Replace an executor's result that cannot be recorded by a failure saying why."""
        lease = outcome.lease
        logger.warning(
            "execution %s: the result cannot be recorded: %s", lease.header.execution_id, why
        )
        outcome.result = self._failure(lease, "InvalidResult", str(why), retryable=False)

    async def _encode_record(self, outcome: Outcome, inline_limit: int) -> bytes:
        lease = outcome.lease
        await self._offload(
            lease.group.tenant, outcome.result, inline_limit, lease.header.output_inline_limit
        )
        return encode_envelope(self._envelope(outcome))

    def _envelope(self, outcome: Outcome) -> envelope_pb2.ExecutionEnvelope:
        lease = outcome.lease
        request_header = lease.header
        session = lease.session
        handler_digest = (
            session.handlers.get((lease.kind, lease.group.handler), "") if session else ""
        )
        executor = execution_pb2.ExecutorInfo(
            executor_id=session.executor_id if session else "",
            runtime=session.runtime if session else "",
            sdk_version=session.sdk_version if session else "",
            code_digest=outcome.code_digest or handler_digest,
        )
        envelope = envelope_pb2.ExecutionEnvelope()
        header = envelope.header
        header.CopyFrom(request_header)
        header.envelope_id = uuid7()
        header.producer.CopyFrom(self._producer)
        set_now(header.created_at)
        header.idempotency_key = record_message_id(request_header.execution_id)
        record: execution_pb2.TaskExecution | execution_pb2.PlanExecution
        if lease.kind == "task":
            record = envelope.task_execution
            assert isinstance(outcome.result, result_pb2.TaskResult)
            record.result.CopyFrom(outcome.result)
        else:
            record = envelope.plan_execution
            assert isinstance(outcome.result, result_pb2.PlanResult)
            record.result.CopyFrom(outcome.result)
        record.header.CopyFrom(request_header)
        record.request_digest = lease.request_digest
        record.executor.CopyFrom(executor)
        started = outcome.started_at or lease.assigned_at
        if started is not None:
            record.started_at.CopyFrom(started)
        record.finished_at.CopyFrom(outcome.finished_at)
        return envelope

    async def _offload(self, tenant: str, result: Result, limit: int, share: int) -> None:
        """Replace every inline payload over ``limit`` bytes with a blob reference, then
        keep payloads that travel on together within one budget: the inputs of the steps
        a plan dispatches within ``limit`` in all (their requests wait in the lifetime's
        state together), and a task's output within ``share``, its request's
        ``output_inline_limit`` (its fan-out's part of what the join gathers), if set."""
        for payload in _payloads(result):
            if payload.WhichOneof("data") == "inline" and len(payload.inline) > limit:
                payload.CopyFrom(
                    await offload_payload(self._blobs, tenant, payload, inline_limit=limit)
                )
                crash_point("pool_after_blob_put")
        if isinstance(result, result_pb2.TaskResult):
            if share and result.HasField("output"):
                await offload_to_budget(self._blobs, tenant, [result.output], budget=share)
        elif result.WhichOneof("decision") == "dispatch" and len(result.dispatch.steps) > 1:
            # (One input alone is within the limit already.)
            inputs = [step.input for step in result.dispatch.steps if step.HasField("input")]
            await offload_to_budget(self._blobs, tenant, inputs, budget=limit)

    async def _publish_and_ack(self, publishes: list[tuple[Lease, list[Outgoing]]]) -> None:
        """Publish each tenant's records through its own link, the tenants concurrently:
        one tenant's failing publishes (retried with backoff) never delay another's."""
        by_tenant: dict[str, list[tuple[Lease, list[Outgoing]]]] = {}
        for lease, messages in publishes:
            by_tenant.setdefault(lease.group.tenant, []).append((lease, messages))
        if len(by_tenant) == 1:
            # One tenant (nearly always): publish from this task. gather() would wrap the
            # call in a new task and put a loop hop (~0.07 ms at M = 1) before the publish.
            [(tenant, items)] = by_tenant.items()
            await self._publish_and_ack_tenant(tenant, items)
            return
        await asyncio.gather(
            *(self._publish_and_ack_tenant(t, items) for t, items in by_tenant.items())
        )

    async def _publish_and_ack_tenant(
        self, tenant: str, publishes: list[tuple[Lease, list[Outgoing]]]
    ) -> None:
        pending = [m for _, messages in publishes for m in messages]
        for attempt in range(PUBLISH_RETRIES + 1):
            try:
                link = await self._links.get(tenant)
                await publish_batch(link.js, pending)
                pending = []
                break
            except PublishError as exc:
                pending = [m for m, _ in exc.failures]
                error: Exception = exc
            except Exception as exc:  # e.g. the connection is closed
                error = exc
            self.stats.publish_failures += 1
            logger.warning(
                "publishing %d record(s) failed (try %d): %s", len(pending), attempt + 1, error
            )
            if attempt < PUBLISH_RETRIES:
                await asyncio.sleep(0.1 * (attempt + 1))
        crash_point("pool_after_record_publish")
        failed = {id(m) for m in pending}
        acks: list[Msg] = []
        for lease, messages in publishes:
            if any(id(m) in failed for m in messages):
                lease.end_span("unpublished", "the record could not be published")
                self._forget(lease)
                continue  # unacked: redelivered after the ack wait, the msg ids dedup the retry
            dead = len(messages) > 1
            lease.end_span("dead_lettered" if dead else "recorded")
            self._forget(lease)
            self.stats.records += 1
            if len(messages) > 1:
                self.stats.dead_letters += 1
                if self._metrics is not None:
                    self._metrics.dead_lettered(lease.group.tenant, DLQ_KIND)
            acks.append(lease.msg)
        try:
            await ack_all(acks)
        except Exception:  # e.g. one already settled: ack the others one by one
            for msg in acks:
                with contextlib.suppress(Exception):
                    await msg.ack()

    async def _dead_letter_malformed(self, tenant: str, malformed: list[tuple[Msg, str]]) -> None:
        """Copy poison messages of ``tenant``'s work to its dead-letter subject, then
        terminate them."""
        outgoing: list[Outgoing] = []
        names = TenantNames(tenant)
        for msg, reason in malformed:
            headers = {k: v for k, v in (msg.headers or {}).items() if k != HDR_MSG_ID}
            headers[HDR_MSG_ID] = f"dlq:work:seq:{msg.metadata.sequence.stream}"
            headers[HDR_REASON] = _header_value(reason)
            headers[HDR_ATTEMPT] = str(msg.metadata.num_delivered)
            outgoing.append(Outgoing(names.dlq(DLQ_KIND), msg.data, headers))
            logger.warning("dead-lettering a malformed request on %s: %s", msg.subject, reason)
        try:
            link = await self._links.get(tenant)
            await publish_batch(link.js, outgoing)
        except Exception as exc:
            logger.warning("cannot dead-letter %d malformed request(s): %s", len(outgoing), exc)
            return
        for msg, reason in malformed:
            self.stats.malformed += 1
            if self._metrics is not None:
                self._metrics.dead_lettered(tenant, DLQ_KIND)
            with contextlib.suppress(Exception):
                await term(msg, reason)


def _payloads(result: Result) -> Iterable[payload_pb2.Payload]:
    """Every payload of a result that may be large."""
    if isinstance(result, result_pb2.TaskResult):
        if result.HasField("output"):
            yield result.output
        for action in result.tool_actions:
            if action.HasField("input"):
                yield action.input
            if action.HasField("output"):
                yield action.output
        return
    decision = result.WhichOneof("decision")
    if decision == "dispatch":
        for step in result.dispatch.steps:
            if step.HasField("input"):
                yield step.input
    elif decision == "complete" and result.complete.HasField("output"):
        yield result.complete.output
    elif decision == "wait" and result.wait.HasField("default_payload"):
        yield result.wait.default_payload


def record_message_id(execution_id: str) -> str:
    """The ``Nats-Msg-Id`` (and idempotency key) of an execution's record."""
    return f"exec:{execution_id}"


def _error_text(result: Result) -> str:
    """What went wrong in an attempt's result, or "" when it succeeded."""
    if isinstance(result, result_pb2.TaskResult):
        if result.status == result_pb2.TASK_STATUS_SUCCEEDED:
            return ""
        return f"{result.error.type or 'Error'}: {result.error.message}"
    if result.WhichOneof("decision") is not None:
        return ""
    return f"{result.error.type or 'Error'}: {result.error.message}"
