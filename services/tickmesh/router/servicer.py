"""RouterService over gRPC: decode, check the caller's tenant, call the core, encode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.runtime.auth import tenant_of
from tickmesh.runtime.errors import StatusError, stream_errors, unary_errors
from tickmesh.runtime.records import MAX_SEQUENCE
from tickmesh.sdk import NotFoundError, ValidationError, codecs
from tickmesh.sdk.errors import StatusCode
from tickmesh.sdk.ids import uuid7
from tickmesh.v1 import (
    lifetime_pb2,
    payload_pb2,
)
from tickmesh.v1 import (
    router_service_pb2 as pb,
)
from tickmesh.v1 import (
    router_service_pb2_grpc as pb_grpc,
)

from . import core
from . import fork as fork_
from . import replay as replay_
from . import watch as watch_
from .graphs import compile_definition, issues_to_proto, validate_definition
from .processor import Processor, Tenant, retrace
from .store import FORK_CLAIM_PREFIX, ConflictError, StateTooLargeError

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_SIGNAL_ID_CHARS = 256
"""The longest signal_id SignalLifetime takes (a lifetime keeps its last ids)."""


class RouterServicer(pb_grpc.RouterServiceServicer):
    def __init__(
        self,
        processor: Processor,
        *,
        tenants: Collection[str],
        inline_limit: int,
        history: replay_.HistorySource | None = None,
        producer: core.Producer | None = None,
    ) -> None:
        self._processor = processor
        self._history = history
        self._producer = producer or core.Producer("router", "0", "")
        self._tenants = tenants
        self._inline_limit = inline_limit

    def _tenant(self, context: Context) -> Tenant:
        return self._processor.tenant(tenant_of(context, self._tenants))

    # --- graphs ------------------------------------------------------------
    @unary_errors
    async def RegisterGraph(
        self, request: pb.RegisterGraphRequest, context: Context
    ) -> pb.RegisterGraphResponse:
        tenant = self._tenant(context)
        graph = compile_definition(request)
        stored, created = await tenant.store.put_graph(graph)
        return pb.RegisterGraphResponse(graph=stored, created=created)

    @unary_errors
    async def GetGraph(self, request: pb.GetGraphRequest, context: Context) -> pb.GetGraphResponse:
        tenant = self._tenant(context)
        graph = await tenant.store.get_graph(request.graph_id, request.version)
        return pb.GetGraphResponse(graph=graph)

    @unary_errors
    async def ListGraphs(
        self, request: pb.ListGraphsRequest, context: Context
    ) -> pb.ListGraphsResponse:
        tenant = self._tenant(context)
        ids = [i for i in await tenant.store.graph_ids() if i > request.page_token]
        size = _page_size(request.page_size)
        page = ids[:size]
        graphs = await asyncio.gather(*(tenant.store.get_graph(i) for i in page))
        more = len(ids) > size
        return pb.ListGraphsResponse(graphs=graphs, next_page_token=page[-1] if more else "")

    @unary_errors
    async def ValidateGraph(
        self, request: pb.ValidateGraphRequest, context: Context
    ) -> pb.ValidateGraphResponse:
        self._tenant(context)
        graph, issues = validate_definition(request)
        return pb.ValidateGraphResponse(
            valid=not issues,
            issues=issues_to_proto(issues),
            digest=graph.digest if graph is not None and not issues else "",
        )

    # --- lifetimes ---------------------------------------------------------
    @unary_errors
    async def StartLifetime(
        self, request: pb.StartLifetimeRequest, context: Context
    ) -> pb.StartLifetimeResponse:
        tenant = self._tenant(context)
        if request.client_request_id.startswith(FORK_CLAIM_PREFIX):
            # Those keys are the forks' (ForkLifetime claims "fork:<its id>"): a start
            # claiming one would answer with a fork, or a fork with this start.
            raise ValidationError(
                f"client_request_id may not begin with {FORK_CLAIM_PREFIX!r}: "
                "ForkLifetime keeps its request ids under that prefix"
            )
        self._check_payload("input", request.input)
        graph = await tenant.store.get_graph(request.graph_id, request.graph_version)
        lifetime_id = uuid7()
        if request.client_request_id:
            bound = await tenant.store.claim_request(request.client_request_id, lifetime_id)
            if bound != lifetime_id:
                existing = await tenant.store.load(bound, fresh=True)
                if existing is not None:
                    # Republish the first step in case the first call died before it did.
                    applied = await self._processor.apply(
                        tenant, bound, lambda _lt: False, ["start"]
                    )
                    return pb.StartLifetimeResponse(lifetime=applied.lifetime.view, created=False)
                # Finished and expired from the bucket while its request did not (the
                # request's own expiry failed): started already, not to be run again.
                record = await self._record_of(tenant, bound)
                if record is not None:
                    return pb.StartLifetimeResponse(lifetime=record, created=False)
                lifetime_id = bound  # the first call died before creating it
        state = core.new_lifetime(
            tenant_id=tenant.names.tenant,
            lifetime_id=lifetime_id,
            graph=graph,
            input_payload=request.input,
            client_request_id=request.client_request_id,
            labels=dict(request.labels),
        )
        try:
            lt = await self._processor.create(tenant, state)
        except ConflictError:
            loaded = await tenant.store.load(lifetime_id, fresh=True)
            assert loaded is not None
            return pb.StartLifetimeResponse(lifetime=loaded.state.lifetime, created=False)
        return pb.StartLifetimeResponse(lifetime=lt.view, created=True)

    @unary_errors
    async def GetLifetime(
        self, request: pb.GetLifetimeRequest, context: Context
    ) -> pb.GetLifetimeResponse:
        tenant = self._tenant(context)
        loaded = await tenant.store.load(request.lifetime_id, fresh=True)
        if loaded is not None:
            return pb.GetLifetimeResponse(lifetime=loaded.state.lifetime)
        # Finished and expired from the bucket (finished_retention_s): the state service
        # keeps its record.
        record = await self._record_of(tenant, request.lifetime_id)
        if record is None:
            raise NotFoundError(f"no lifetime {request.lifetime_id!r}")
        return pb.GetLifetimeResponse(lifetime=record)

    @unary_errors
    async def ListLifetimes(
        self, request: pb.ListLifetimesRequest, context: Context
    ) -> pb.ListLifetimesResponse:
        tenant = self._tenant(context)
        size = _page_size(request.page_size)
        if self._history is not None:
            # The state service's rows: a page read by index, finished lifetimes that left
            # the router's bucket included.
            lifetimes, token = await self._history.lifetimes(
                tenant.names.tenant,
                replay_.LifetimePage(
                    size, request.page_token, list(request.states), request.graph_id
                ),
            )
            return pb.ListLifetimesResponse(lifetimes=lifetimes, next_page_token=token)
        # Without one, every lifetime in the bucket: UUIDv7 ids sort by creation time.
        ids = sorted(await tenant.store.lifetime_ids(), reverse=True)
        if request.page_token:
            ids = [i for i in ids if i < request.page_token]
        states = set(request.states)
        found: list[lifetime_pb2.AgentLifetime] = []
        last = ""
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            loaded = await asyncio.gather(*(tenant.store.load(i, fresh=True) for i in chunk))
            for lifetime_id, item in zip(chunk, loaded, strict=True):
                last = lifetime_id
                if item is None:
                    continue
                view = item.state.lifetime
                if states and view.state not in states:
                    continue
                if request.graph_id and view.graph.id != request.graph_id:
                    continue
                found.append(view)
                if len(found) == size:
                    break
            if len(found) == size:
                break
        more = bool(found) and len(found) == size and last != ids[-1]
        return pb.ListLifetimesResponse(lifetimes=found, next_page_token=last if more else "")

    @stream_errors
    async def WatchLifetime(
        self, request: pb.WatchLifetimeRequest, context: Context
    ) -> AsyncIterator[pb.WatchLifetimeResponse]:
        tenant = self._tenant(context)
        lifetime_id = request.lifetime_id
        # No event has a later sequence (nor can the store be asked past it: its read
        # overflows), so a watch after it serves what a watch after the end does.
        after = min(request.after_sequence, MAX_SEQUENCE)
        loaded = await tenant.store.load(lifetime_id, fresh=True)
        if loaded is None:
            # Gone from the router's bucket (finished_retention_s): the state service holds
            # its record and history, if anything does.
            record = await self._record_of(tenant, lifetime_id)
            if record is None:
                raise NotFoundError(f"no lifetime {lifetime_id!r}")
            if after < record.last_sequence:
                async for event in self._stored_events(tenant, lifetime_id, after):
                    yield pb.WatchLifetimeResponse(event=event)
            return
        view = loaded.state.lifetime
        names = tenant.names
        watched = watch_.Watched(
            tenant=names.tenant,
            lifetime_id=lifetime_id,
            subject=names.evt(lifetime_id),
            last_sequence=view.last_sequence,
            before_first=view.fork_origin.sequence,
            ended=view.state in core.TERMINAL,
        )

        async def complete(sequence: int) -> bool:
            return await _history_complete(tenant, lifetime_id, sequence)

        async def position() -> tuple[int, bool]:
            now = await tenant.store.load(lifetime_id, fresh=True)
            if now is None:  # gone from the bucket meanwhile: what was read stands
                return view.last_sequence, view.state in core.TERMINAL
            return now.state.lifetime.last_sequence, now.state.lifetime.state in core.TERMINAL

        following = watch_.follow(
            tenant.link.nc,
            watched,
            after_sequence=after,
            history=self._history,
            complete=complete,
            position=position,
        )
        # Closed with the call (its subscription with it), not whenever it is collected.
        async with contextlib.aclosing(following) as events:
            async for event in events:
                yield pb.WatchLifetimeResponse(event=event)

    def _stored_events(
        self, tenant: Tenant, lifetime_id: str, after: int, before: int | None = None
    ) -> AsyncIterator[lifetime_pb2.LifetimeEvent]:
        history = self._require_history()
        return replay_.stored_events(
            history,
            tenant.names.tenant,
            lifetime_id,
            after_sequence=after,
            before_sequence=before,
        )

    @unary_errors
    async def PauseLifetime(
        self, request: pb.PauseLifetimeRequest, context: Context
    ) -> pb.PauseLifetimeResponse:
        view = await self._control(context, request.lifetime_id, core.pause, request.reason)
        return pb.PauseLifetimeResponse(lifetime=view)

    @unary_errors
    async def ResumeLifetime(
        self, request: pb.ResumeLifetimeRequest, context: Context
    ) -> pb.ResumeLifetimeResponse:
        view = await self._control(context, request.lifetime_id, core.resume, request.reason)
        return pb.ResumeLifetimeResponse(lifetime=view)

    @unary_errors
    async def AbortLifetime(
        self, request: pb.AbortLifetimeRequest, context: Context
    ) -> pb.AbortLifetimeResponse:
        view = await self._control(context, request.lifetime_id, core.abort, request.reason)
        return pb.AbortLifetimeResponse(lifetime=view)

    @unary_errors
    async def SignalLifetime(
        self, request: pb.SignalLifetimeRequest, context: Context
    ) -> pb.SignalLifetimeResponse:
        tenant = self._tenant(context)
        signal = request.signal
        if not signal.name:
            raise ValidationError("signal.name is required")
        if len(signal.signal_id) > MAX_SIGNAL_ID_CHARS:
            # The lifetime remembers its last signal ids: each must stay small.
            raise ValidationError(
                f"signal.signal_id has {len(signal.signal_id)} characters; "
                f"at most {MAX_SIGNAL_ID_CHARS} are allowed"
            )
        self._check_payload("signal.payload", signal.payload)
        duplicate = False

        def mutate(lt: core.Lifetime) -> bool:
            nonlocal duplicate
            if signal.signal_id and signal.signal_id in lt.state.signal_ids:
                duplicate = True
                return False
            try:
                core.signal(lt, signal)
            except core.RoutingError as exc:
                raise StatusError(StatusCode.FAILED_PRECONDITION, str(exc)) from exc
            return True

        key = f"signal:{signal.signal_id or uuid7()}"
        try:
            applied = await self._processor.apply(tenant, request.lifetime_id, mutate, [key])
        except StateTooLargeError as exc:
            raise _too_large_with("signal.payload", signal.payload, exc) from exc
        return pb.SignalLifetimeResponse(lifetime=applied.lifetime.view, duplicate=duplicate)

    async def _control(
        self, context: Context, lifetime_id: str, action: Any, reason: str
    ) -> lifetime_pb2.AgentLifetime:
        tenant = self._tenant(context)

        def mutate(lt: core.Lifetime) -> bool:
            before = lt.view.last_sequence
            action(lt, reason)
            return lt.view.last_sequence != before

        applied = await self._processor.apply(tenant, lifetime_id, mutate, [f"rpc:{uuid7()}"])
        return applied.lifetime.view

    @unary_errors
    async def ForkLifetime(
        self, request: pb.ForkLifetimeRequest, context: Context
    ) -> pb.ForkLifetimeResponse:
        tenant = self._tenant(context)
        if not request.lifetime_id or not request.execution_id:
            raise ValidationError("lifetime_id and execution_id are required")
        replacement = request.replacement_output if request.HasField("replacement_output") else None
        if replacement is not None:
            self._check_payload("replacement_output", replacement)
        history = self._require_history()
        new_id = uuid7()
        if request.client_request_id:
            claim = FORK_CLAIM_PREFIX + request.client_request_id
            bound = await tenant.store.claim_request(claim, new_id)
            if bound != new_id:
                existing = await tenant.store.load(bound, fresh=True)
                if existing is not None:
                    _require_fork(existing.state.lifetime, request.client_request_id)
                    applied = await self._processor.apply(
                        tenant, bound, lambda _lt: False, ["fork"]
                    )
                    return pb.ForkLifetimeResponse(lifetime=applied.lifetime.view)
                record = await self._record_of(tenant, bound)  # finished and expired
                if record is not None:
                    _require_fork(record, request.client_request_id)
                    return pb.ForkLifetimeResponse(lifetime=record)
                new_id = bound  # the first call died before creating it
        recorded = await self._recorded(tenant, request.lifetime_id)
        view = recorded.lifetime
        graph = await tenant.store.get_graph(view.graph.id, view.graph.version)
        records = await history.executions(tenant.names.tenant, request.lifetime_id)
        try:
            lt = fork_.fork(
                recorded,
                graph,
                records,
                execution=request.execution_id,
                new_lifetime_id=new_id,
                replacement=replacement,
                client_request_id=request.client_request_id,
                producer=self._producer,
                now=datetime.now(UTC),
                guard=tenant.guard,
            )
        except fork_.ForkError as exc:
            raise StatusError(StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        span = self._processor.lifetime_span(lt.state, origin=recorded)
        if span is not None:
            span.set_attribute("tickmesh.fork_of", request.lifetime_id)
            span.set_attribute("tickmesh.fork_at", request.execution_id)
            retrace(lt)
        entry = lt.state.outbox.add(key="fork", messages=lt.out)
        entry.created_at.FromDatetime(lt.now)
        try:
            # ConflictError: a concurrent call with the same client_request_id created it.
            with contextlib.suppress(ConflictError):
                await tenant.store.create(lt.state)
        except StateTooLargeError as exc:
            if replacement is None:
                raise
            raise _too_large_with("replacement_output", replacement, exc) from exc
        # Publishes the "fork" outbox entry (idempotent by message ids).
        applied = await self._processor.apply(tenant, new_id, lambda _lt: False, ["fork"])
        if span is not None:
            span.end()
        logger.info("forked %s at %s into %s", request.lifetime_id, request.execution_id, new_id)
        return pb.ForkLifetimeResponse(lifetime=applied.lifetime.view)

    @unary_errors
    async def ReplayLifetime(
        self, request: pb.ReplayLifetimeRequest, context: Context
    ) -> pb.ReplayLifetimeResponse:
        tenant = self._tenant(context)
        history = self._require_history()
        recorded = await self._recorded(tenant, request.lifetime_id)
        view = recorded.lifetime
        graph = await tenant.store.get_graph(
            view.graph.id, request.graph_version or view.graph.version
        )
        records = await history.executions(tenant.names.tenant, request.lifetime_id)
        code_digests = dict(request.handler_code_digests)
        after_abort = await replay_.received_after_abort(history, tenant.names.tenant, recorded)
        if view.HasField("fork_origin"):
            origin = await self._fork_origin(tenant, view)
            origin_records = await history.executions(
                tenant.names.tenant, view.fork_origin.lifetime_id
            )
            report = fork_.replay_fork(
                recorded,
                origin,
                graph,
                origin_records,
                records,
                producer=self._producer,
                code_digests=code_digests,
                after_abort=after_abort,
            )
        else:
            report = replay_.replay(
                recorded,
                graph,
                records,
                producer=self._producer,
                code_digests=code_digests,
                after_abort=after_abort,
            )
        return report.proto()

    def _check_payload(self, field: str, payload: payload_pb2.Payload) -> None:
        """Refuse a payload of a call that the router would carry inline and no step could
        take: the requests that carry it share one message with others as large, so it must
        keep within the inline limit; and a receiver decodes it by its content type, so
        bytes that content type cannot decode would fail the lifetime, not the call.

        Raises:
            ValidationError: Naming ``field``.
        """
        if payload.WhichOneof("data") != "inline":
            return  # a BlobRef: its bytes are read (and checked) by whoever uses them
        size = len(payload.inline)
        if size > self._inline_limit:
            raise ValidationError(
                f"{field} is {size} bytes inline, over the {self._inline_limit}-byte limit: "
                "upload it with StateService.PutBlob and pass the BlobRef"
            )
        problem = _undecodable(payload.content_type, payload.inline)
        if problem:
            raise ValidationError(
                f"{field} is not what its content type {payload.content_type!r} says: {problem}"
            )

    async def _record_of(
        self, tenant: Tenant, lifetime_id: str
    ) -> lifetime_pb2.AgentLifetime | None:
        """The state service's record of a lifetime (None without a history source)."""
        if self._history is None:
            return None
        return await self._history.lifetime(tenant.names.tenant, lifetime_id)

    async def _recorded(self, tenant: Tenant, lifetime_id: str) -> rs.RouterLifetime:
        """A lifetime's state as replay and fork re-drive it: the router's, with the wakes
        its events recorded; or, once the router no longer holds it (finished, past
        ``finished_retention_s``), rebuilt from the state service's record and events."""
        history = self._require_history()
        loaded = await tenant.store.load(lifetime_id, fresh=True)
        if loaded is not None:
            return await replay_.with_recorded_wakes(history, tenant.names.tenant, loaded.state)
        rebuilt = await replay_.recorded_from_history(history, tenant.names.tenant, lifetime_id)
        if rebuilt is None:
            raise NotFoundError(f"no lifetime {lifetime_id!r}")
        return rebuilt

    async def _fork_origin(
        self, tenant: Tenant, fork: lifetime_pb2.AgentLifetime
    ) -> rs.RouterLifetime:
        """The state of the lifetime ``fork`` was forked from, which its replay starts with."""
        origin_id = fork.fork_origin.lifetime_id
        try:
            origin = await self._recorded(tenant, origin_id)
        except NotFoundError:
            raise StatusError(
                StatusCode.FAILED_PRECONDITION,
                f"lifetime {fork.lifetime_id} is a fork of {origin_id}, which no longer exists",
            ) from None
        if origin.lifetime.HasField("fork_origin"):
            # ForkLifetime cannot fork a fork (its re-drive starts a fresh lifetime, whose
            # execution ids are not the fork's), so no fork should have one for its origin.
            raise StatusError(
                StatusCode.FAILED_PRECONDITION,
                f"the origin {origin_id} of fork {fork.lifetime_id} is a fork itself",
            )
        return origin

    def _require_history(self) -> replay_.HistorySource:
        if self._history is None:
            raise StatusError(
                StatusCode.FAILED_PRECONDITION,
                "this router has no history source: set TICKMESH_ROUTER_STATE_TARGET",
            )
        return self._history


async def _history_complete(tenant: Tenant, lifetime_id: str, sequence: int) -> bool:
    """Whether the lifetime has ended, nothing is in flight, and ``sequence`` is its last event."""
    loaded = await tenant.store.load(lifetime_id, fresh=True)
    if loaded is None:
        return True
    state = loaded.state
    return (
        state.lifetime.state in core.TERMINAL
        and not state.in_flight
        and sequence >= state.lifetime.last_sequence
    )


async def _load_view(tenant: Tenant, lifetime_id: str) -> lifetime_pb2.AgentLifetime:
    loaded = await tenant.store.load(lifetime_id, fresh=True)
    if loaded is None:
        raise NotFoundError(f"no lifetime {lifetime_id!r}")
    return loaded.state.lifetime


def _require_fork(bound: lifetime_pb2.AgentLifetime, client_request_id: str) -> None:
    """Refuse to answer a fork call with ``bound``, the lifetime its request id is bound
    to, unless that is a fork: a start of an earlier version may have claimed the key
    (its own id began with "fork:")."""
    if not bound.HasField("fork_origin"):
        raise StatusError(
            StatusCode.FAILED_PRECONDITION,
            f"client_request_id {client_request_id!r} is taken by lifetime "
            f"{bound.lifetime_id}, which StartLifetime started: use another",
        )


def _undecodable(content_type: str, data: bytes) -> str:
    """Why ``data`` cannot be decoded as ``content_type``, where that is cheap to tell
    (JSON, text, protobuf wire format); "" when it can, or the type is opaque here."""
    mime, _ = codecs.parse_content_type(content_type)
    if mime == codecs.PROTOBUF:
        # Without the message type only the wire format can be checked: any message
        # parses as an Empty with unknown fields, bytes that are no message do not.
        try:
            empty_pb2.Empty.FromString(data)
        except DecodeError:
            return "the bytes are not a serialized protobuf message"
        return ""
    try:
        # What every Python receiver runs on it (the SDK's decoding).
        codecs.decode(content_type, data)
    except ValidationError as exc:
        return str(exc)
    return ""


def _too_large_with(
    field: str, payload: payload_pb2.Payload, exc: StateTooLargeError
) -> ValidationError:
    """``exc`` (the lifetime's state would not fit in one message) naming the payload of
    the call that grew it, which a BlobRef would keep out of the state."""
    if payload.WhichOneof("data") != "inline":
        return exc
    return ValidationError(
        f"{exc}; {field} is {len(payload.inline)} bytes inline of it: upload it with "
        "StateService.PutBlob and pass the BlobRef"
    )


def _page_size(requested: int) -> int:
    return min(requested or DEFAULT_PAGE, MAX_PAGE)
