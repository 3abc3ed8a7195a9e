"""StateService over gRPC: history reads, counters, blobs, and appends for
callers that cannot publish to the bus.

Reads of records, lifetime rows (their execution counts and totals), counters and usage
first wait for the records already on the bus to be stored (``RecordConsumer.caught_up``):
the router acts on a record before the store has it, and a caller that saw the act must
find the record. A lifetime row also waits for the lifetime events on the bus, which it is
folded from. A read that cannot wait long enough answers UNAVAILABLE rather than miss
one."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import grpc

from tickmesh.runtime.auth import tenant_of
from tickmesh.runtime.blobs import BlobStore
from tickmesh.runtime.errors import StatusError, stream_errors, unary_errors
from tickmesh.runtime.records import MAX_SEQUENCE, require_records_stored
from tickmesh.sdk import NotFoundError, ValidationError
from tickmesh.sdk.errors import StatusCode
from tickmesh.v1 import (
    envelope_pb2,
    execution_pb2,
    payload_pb2,
    telemetry_pb2,
)
from tickmesh.v1 import (
    state_service_pb2 as pb,
)
from tickmesh.v1 import (
    state_service_pb2_grpc as pb_grpc,
)

from . import core
from .consumer import RecordConsumer
from .store import StateStore, StoredExecution, UsageRow

Context = grpc.aio.ServicerContext[Any, Any]
CHUNK = 1024 * 1024
_LIFETIME_TOKEN = re.compile(r"[A-Za-z0-9_\-]{1,128}")
"""A page token of ListLifetimeRecords: the last lifetime id of the page before."""
_SEQUENCE_TOKEN = re.compile(r"[0-9]{1,19}")
"""A page token of ListExecutions: the last store sequence of the page before (ASCII
digits only: str.isdigit() also takes digits int() refuses or reads in other scripts)."""
MAX_BLOB_BYTES = 1024 * 1024 * 1024
UINT32_MAX = 0xFFFF_FFFF


class StateServicer(pb_grpc.StateServiceServicer):
    def __init__(
        self,
        store: StateStore,
        blobs: BlobStore,
        consumers: Callable[[str], RecordConsumer],
        *,
        tenants: Collection[str],
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._consumers = consumers
        self._tenants = tenants

    def _tenant(self, context: Context) -> str:
        return tenant_of(context, self._tenants)

    async def _stored_so_far(self, tenant: str) -> None:
        """Wait until every record on the bus now is stored (a read must not miss what a
        caller saw); UNAVAILABLE if that takes longer than the consumer's bound."""
        await require_records_stored(lambda t: self._consumers(t).caught_up(), tenant)

    @unary_errors
    async def AppendExecution(
        self, request: pb.AppendExecutionRequest, context: Context
    ) -> pb.AppendExecutionResponse:
        tenant = self._tenant(context)
        names = self._consumers(tenant).names
        records = []
        for i, envelope in enumerate(request.envelopes):
            try:
                core.check_record(names.exec(envelope.header.lifetime_id or "_"), envelope)
            except ValidationError as exc:
                raise ValidationError(f"envelopes[{i}]: {exc}") from exc
            records.append((envelope.SerializeToString(deterministic=True), envelope))
        outcomes = await self._consumers(tenant).append_and_publish(records)
        return pb.AppendExecutionResponse(
            outcomes=[
                pb.AppendOutcome(
                    execution_id=_record(env).header.execution_id,
                    attempt=_record(env).header.attempt,
                    duplicate=duplicate,
                    store_sequence=seq,
                )
                for env, seq, duplicate in outcomes
            ]
        )

    @unary_errors
    async def GetExecution(
        self, request: pb.GetExecutionRequest, context: Context
    ) -> pb.GetExecutionResponse:
        tenant = self._tenant(context)
        await self._stored_so_far(tenant)
        stored = await self._store.get_execution(tenant, request.execution_id, request.attempt)
        if stored is None:
            raise NotFoundError(f"no execution {request.execution_id!r}")
        return pb.GetExecutionResponse(execution=_ref(stored))

    @unary_errors
    async def ListExecutions(
        self, request: pb.ListExecutionsRequest, context: Context
    ) -> pb.ListExecutionsResponse:
        tenant = self._tenant(context)
        after = _sequence_token(request.page_token)
        size = min(request.page_size or 100, 1000)
        await self._stored_so_far(tenant)
        rows = await self._store.list_executions(
            tenant, request.lifetime_id, after_sequence=after, limit=size + 1
        )
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListExecutionsResponse(
            executions=[_ref(r) for r in rows],
            next_page_token=str(rows[-1].store_sequence) if more and rows else "",
        )

    @unary_errors
    async def GetLifetimeRecord(
        self, request: pb.GetLifetimeRecordRequest, context: Context
    ) -> pb.GetLifetimeRecordResponse:
        tenant = self._tenant(context)
        await self._lifetime_rows_so_far(tenant)
        lifetime = await self._store.get_lifetime(tenant, request.lifetime_id)
        if lifetime is None:
            raise NotFoundError(f"no lifetime {request.lifetime_id!r}")
        return pb.GetLifetimeRecordResponse(lifetime=lifetime)

    @unary_errors
    async def ListLifetimeRecords(
        self, request: pb.ListLifetimeRecordsRequest, context: Context
    ) -> pb.ListLifetimeRecordsResponse:
        tenant = self._tenant(context)
        if request.page_token and not _LIFETIME_TOKEN.fullmatch(request.page_token):
            raise ValidationError(f"malformed page_token {request.page_token!r}")
        size = min(request.page_size or 100, 1000)
        await self._lifetime_rows_so_far(tenant)
        rows = await self._store.list_lifetimes(
            tenant,
            before=request.page_token,
            states=request.states,
            graph_id=request.graph_id,
            limit=size + 1,
        )
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListLifetimeRecordsResponse(
            lifetimes=rows, next_page_token=rows[-1].lifetime_id if more and rows else ""
        )

    @unary_errors
    async def ListLifetimeEvents(
        self, request: pb.ListLifetimeEventsRequest, context: Context
    ) -> pb.ListLifetimeEventsResponse:
        tenant = self._tenant(context)
        if not request.lifetime_id:
            raise ValidationError("lifetime_id is required")
        if request.after_sequence > MAX_SEQUENCE:
            raise ValidationError(
                f"after_sequence {request.after_sequence} is past the largest sequence a "
                f"store keeps ({MAX_SEQUENCE})"
            )
        # Whatever the caller saw on the event stream is stored before the read.
        await require_records_stored(
            lambda t: self._consumers(t).events_stored(), tenant, what="lifetime events"
        )
        events = await self._store.list_events(
            tenant,
            request.lifetime_id,
            after_sequence=request.after_sequence,
            limit=min(request.page_size or 1000, 1000),
        )
        return pb.ListLifetimeEventsResponse(events=events)

    async def _lifetime_rows_so_far(self, tenant: str) -> None:
        """Wait until the lifetime rows hold what the caller saw: their execution_count and
        totals come from the counters the records feed, the rest from the lifetime events
        folded into them."""
        await self._stored_so_far(tenant)
        await require_records_stored(
            lambda t: self._consumers(t).events_stored(), tenant, what="lifetime events"
        )

    @unary_errors
    async def GetCounters(
        self, request: pb.GetCountersRequest, context: Context
    ) -> pb.GetCountersResponse:
        tenant = self._tenant(context)
        now = datetime.now(UTC)
        # A window reaching back past 1970 holds every record: no bound (and no timedelta
        # overflow for a window of 2**63 s).
        since = (
            now - timedelta(seconds=request.window_seconds)
            if 0 < request.window_seconds < now.timestamp()
            else None
        )
        if request.scope == pb.COUNTER_SCOPE_LIFETIME:
            if not request.lifetime_id:
                raise ValidationError("lifetime scope needs a lifetime_id")
            await self._stored_so_far(tenant)
            totals, count = await self._store.counters(
                tenant, lifetime_id=request.lifetime_id, since=since
            )
        elif request.scope == pb.COUNTER_SCOPE_TENANT:
            # Routers read these sums every 200 ms and drop their own increments for the
            # records they saw before the call: those must be in the sums.
            await self._stored_so_far(tenant)
            totals, count = await self._store.counters(tenant, since=since)
        else:
            raise ValidationError("scope must be COUNTER_SCOPE_LIFETIME or COUNTER_SCOPE_TENANT")
        return pb.GetCountersResponse(totals=totals, executions=count)

    @unary_errors
    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        tenant = self._tenant(context)
        if request.group_by not in (
            pb.USAGE_GROUPING_UNSPECIFIED,
            pb.USAGE_GROUPING_GRAPH,
            pb.USAGE_GROUPING_NODE,
        ):
            raise ValidationError(f"unknown group_by {request.group_by}")
        await self._stored_so_far(tenant)
        rows = await self._store.usage(
            tenant,
            since=_moment(request, "since"),
            until=_moment(request, "until"),
            graph_id=request.graph_id or None,
            by_node=request.group_by != pb.USAGE_GROUPING_GRAPH,
        )
        total = _total(rows)
        return pb.GetUsageResponse(
            rows=[
                pb.UsageRow(
                    graph_id=row.graph_id,
                    graph_version=row.graph_version,
                    node_id=row.node_id,
                    handler=row.handler,
                    executions=row.executions,
                    totals=_usage_telemetry(row),
                )
                for row in rows
            ],
            totals=_usage_telemetry(total),
            executions=total.executions,
        )

    @unary_errors
    async def PutBlob(
        self, request_iterator: AsyncIterator[pb.PutBlobRequest], context: Context
    ) -> pb.PutBlobResponse:
        tenant = self._tenant(context)
        upload: pb.BlobUpload | None = None
        chunks: list[bytes] = []
        size = 0
        async for part in request_iterator:
            which = part.WhichOneof("part")
            if upload is None:
                if which != "upload":
                    raise ValidationError("PutBlob must start with an upload description")
                upload = part.upload
                if upload.size > MAX_BLOB_BYTES:
                    raise StatusError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"blob of {upload.size} bytes is over the {MAX_BLOB_BYTES}-byte limit",
                    )
                continue
            if which != "chunk":
                raise ValidationError("only chunks may follow the upload description")
            size += len(part.chunk)
            if size > upload.size:
                raise ValidationError(f"more bytes sent than the declared size {upload.size}")
            chunks.append(part.chunk)
        if upload is None:
            raise ValidationError("PutBlob received nothing")
        data = b"".join(chunks)
        if len(data) != upload.size:
            raise ValidationError(f"received {len(data)} bytes, declared {upload.size}")
        digest = hashlib.sha256(data).hexdigest()
        if upload.sha256 and upload.sha256 != digest:
            raise ValidationError(f"sha256 mismatch: declared {upload.sha256}, received {digest}")
        ref = await self._blobs.put(tenant, data, upload.content_type)
        return pb.PutBlobResponse(blob=ref)

    @stream_errors
    async def GetBlob(
        self, request: pb.GetBlobRequest, context: Context
    ) -> AsyncIterator[pb.GetBlobResponse]:
        tenant = self._tenant(context)
        data = await self._blobs.get(tenant, request.uri)
        yield pb.GetBlobResponse(
            blob=payload_pb2.BlobRef(
                uri=request.uri, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
            )
        )
        for start in range(0, len(data), CHUNK):
            yield pb.GetBlobResponse(chunk=data[start : start + CHUNK])


def _record(
    envelope: envelope_pb2.ExecutionEnvelope,
) -> execution_pb2.TaskExecution | execution_pb2.PlanExecution:
    if envelope.HasField("task_execution"):
        return envelope.task_execution
    return envelope.plan_execution


def _total(rows: list[UsageRow]) -> UsageRow:
    """The sum of a usage report's rows."""
    return UsageRow(
        graph_id="",
        graph_version=0,
        node_id="",
        handler="",
        executions=sum(r.executions for r in rows),
        input_tokens=sum(r.input_tokens for r in rows),
        output_tokens=sum(r.output_tokens for r in rows),
        cost_micros=sum(r.cost_micros for r in rows),
        model_calls=sum(r.model_calls for r in rows),
        tool_calls=sum(r.tool_calls for r in rows),
    )


def _usage_telemetry(row: UsageRow) -> telemetry_pb2.Telemetry:
    return telemetry_pb2.Telemetry(
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cost_micros=row.cost_micros,
        # The proto's call counts are uint32; a tenant's all-time sum could outgrow them.
        model_calls=min(row.model_calls, UINT32_MAX),
        tool_calls=min(row.tool_calls, UINT32_MAX),
    )


def _ref(stored: StoredExecution) -> execution_pb2.ExecutionRef:
    envelope = envelope_pb2.ExecutionEnvelope.FromString(stored.envelope)
    ref = execution_pb2.ExecutionRef(store_sequence=stored.store_sequence)
    ref.persisted_at.FromDatetime(stored.persisted_at)
    if envelope.HasField("task_execution"):
        ref.task_execution.CopyFrom(envelope.task_execution)
    else:
        ref.plan_execution.CopyFrom(envelope.plan_execution)
    return ref


def _sequence_token(token: str) -> int:
    """The store sequence a ListExecutions page token holds; 0 for none.

    Raises:
        ValidationError: No listing handed it out: not decimal digits, or past the
            largest sequence a store keeps.
    """
    if not token:
        return 0
    if _SEQUENCE_TOKEN.fullmatch(token) is None or int(token) > MAX_SEQUENCE:
        raise ValidationError(f"malformed page_token {token!r}")
    return int(token)


def _moment(request: pb.GetUsageRequest, field: Literal["since", "until"]) -> datetime | None:
    """The request's ``field`` as a datetime; None when unset.

    Raises:
        ValidationError: It is no timestamp (seconds past the year 9999, nanos outside
            0..999,999,999).
    """
    if not request.HasField(field):
        return None
    at = getattr(request, field)
    try:
        moment: datetime = at.ToDatetime(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValidationError(f"{field} is not a valid timestamp: {exc}") from exc
    return moment
