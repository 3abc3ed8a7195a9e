"""GuardrailService over gRPC: policy CRUD, validation, batched evaluation, and
the snapshot stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from datetime import UTC, datetime
from functools import partial
from typing import Any

import grpc
from opentelemetry.trace import Tracer

from tickmesh.runtime.auth import tenant_of
from tickmesh.runtime.errors import StatusError, stream_errors, unary_errors
from tickmesh.runtime.policy import (
    EvaluationContext,
    PolicyEngine,
    Usage,
    load_policy,
    validate_policy,
)
from tickmesh.runtime.policy.sources import (
    TenantUsageUnavailableError,
    UsageSource,
    Window,
    tenant_windows,
)
from tickmesh.runtime.tracing import end_evaluation_span, evaluation_span
from tickmesh.sdk import Issue
from tickmesh.sdk.errors import StatusCode
from tickmesh.v1 import (
    guardrail_pb2,
    validation_pb2,
)
from tickmesh.v1 import (
    guardrail_service_pb2 as pb,
)
from tickmesh.v1 import (
    guardrail_service_pb2_grpc as pb_grpc,
)

from .store import PolicyStore

Context = grpc.aio.ServicerContext[Any, Any]
LifetimeUsage = Callable[[str, str], Awaitable[Usage]]
"""(tenant, lifetime id) -> what the lifetime has used so far."""


logger = logging.getLogger(__name__)


class GuardrailServicer(pb_grpc.GuardrailServiceServicer):
    def __init__(
        self,
        stores: dict[str, PolicyStore],
        *,
        tenants: Collection[str],
        lease_s: float,
        on_change: Callable[[str], Awaitable[None]],
        lifetime_usage: LifetimeUsage,
        usage_source: UsageSource | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._stores = stores
        self._tracer = tracer
        self._tenants = tenants
        self._lease_s = lease_s
        self._on_change = on_change
        self._lifetime_usage = lifetime_usage
        self._usage_source = usage_source
        self._engine = PolicyEngine()
        self.snapshot_changed: dict[str, asyncio.Condition] = {}
        self._published: dict[str, int] = {}

    async def notify(self, tenant: str) -> None:
        """Wake the tenant's watchers: its snapshot was published, or it was removed."""
        # Counted, not only notified: a watcher reading the store when this runs is not yet
        # waiting, and must not miss it (see WatchPolicies).
        self._published[tenant] = self._published.get(tenant, 0) + 1
        condition = self.snapshot_changed.get(tenant)
        if condition is not None:
            async with condition:
                condition.notify_all()

    def _published_since(self, tenant: str, seen: int) -> bool:
        return self._published.get(tenant, 0) != seen

    def _store(self, context: Context) -> PolicyStore:
        return self._stores[tenant_of(context, self._tenants)]

    @unary_errors
    async def Evaluate(self, request: pb.EvaluateRequest, context: Context) -> pb.EvaluateResponse:
        store = self._store(context)
        policies = await store.latest_all()
        now = datetime.now(UTC)
        snapshot = guardrail_pb2.PolicySnapshot(tenant_id=store.tenant, policies=policies)
        snapshot.issued_at.FromDatetime(now)
        snapshot.lease.FromSeconds(60)
        tenant_usage = await self._tenant_usage(store.tenant, snapshot, now)
        decisions = []
        for item in request.items:
            if item.header.tenant_id and item.header.tenant_id != store.tenant:
                # The tenant comes from the caller's credentials; a body naming another is
                # refused and logged (a bug, or an attempt to read another tenant's usage).
                logger.warning(
                    "Evaluate by tenant %r for a step of tenant %r refused",
                    store.tenant,
                    item.header.tenant_id,
                )
                raise StatusError(
                    StatusCode.PERMISSION_DENIED,
                    f"an item names tenant {item.header.tenant_id!r}; the caller is "
                    f"{store.tenant!r}",
                )
            lifetime = (
                await self._lifetime_usage(store.tenant, item.header.lifetime_id)
                if item.header.lifetime_id
                else Usage()
            )
            post = item.phase == guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT
            # The step's own iteration counts, in its usage and its lifetime's, as in the
            # router (tickmesh.router.guard.Gate): the same step gets the same decision.
            iteration = item.header.iteration
            if iteration > lifetime.iterations:
                lifetime = dataclasses.replace(lifetime, iterations=iteration)
            execution = Usage()
            if post:
                execution = Usage.of(item.telemetry, iteration=iteration)
                # Time since the lifetime started already covers this execution's run time.
                wall_time_s = lifetime.wall_time_s or execution.wall_time_s
                lifetime = dataclasses.replace(lifetime.plus(execution), wall_time_s=wall_time_s)
            context_ = EvaluationContext(
                phase=item.phase,
                header=item.header,
                execution=execution,
                estimate=Usage() if post else Usage.of(item.estimate, iteration=iteration),
                lifetime=lifetime,
                tenant_usage=tenant_usage,
            )
            span = (
                None
                if self._tracer is None
                else evaluation_span(self._tracer, item.header, item.phase)
            )
            decision = self._engine.evaluate(
                snapshot, context_, now=now, graph_id=item.header.graph.id
            )
            if span is not None:
                end_evaluation_span(span, decision)
            decisions.append(decision)
        return pb.EvaluateResponse(decisions=decisions)

    async def _tenant_usage(
        self, tenant: str, snapshot: guardrail_pb2.PolicySnapshot, now: datetime
    ) -> Callable[[Window], Usage]:
        """Tenant usage for the windows the tenant's rules read; without a source (or if
        it fails) tenant rules are answered with an error, which the engine rejects."""
        windows = tenant_windows(snapshot, self._engine)
        if not windows:
            return _unavailable("no tenant-scope rules")
        if self._usage_source is None:
            return _unavailable("the guardrail service has no tenant usage source configured")
        try:
            fetched = await self._usage_source.fetch(tenant, windows, now)
        except Exception as exc:
            return _unavailable(f"tenant usage unavailable: {exc}")

        def usage(window: Window) -> Usage:
            try:
                return fetched.usage[window]
            except KeyError:
                raise TenantUsageUnavailableError(f"no tenant usage for window {window}") from None

        return usage

    @unary_errors
    async def ValidatePolicy(
        self, request: pb.ValidatePolicyRequest, context: Context
    ) -> pb.ValidatePolicyResponse:
        self._store(context)
        issues = validate_policy(request.source)
        return pb.ValidatePolicyResponse(valid=not issues, issues=_issues(issues))

    @unary_errors
    async def PutPolicy(
        self, request: pb.PutPolicyRequest, context: Context
    ) -> pb.PutPolicyResponse:
        store = self._store(context)
        compiled = load_policy(request.source, name="request")
        policy, created = await store.put(
            compiled.id,
            request.source,
            graph_id=request.graph_id,
            dry_run=request.dry_run or compiled.dry_run,
        )
        if created:
            await self._on_change(store.tenant)
        return pb.PutPolicyResponse(policy=policy, created=created)

    @unary_errors
    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: Context
    ) -> pb.GetPolicyResponse:
        store = self._store(context)
        return pb.GetPolicyResponse(policy=await store.get(request.policy_id, request.version))

    @unary_errors
    async def ListPolicies(
        self, request: pb.ListPoliciesRequest, context: Context
    ) -> pb.ListPoliciesResponse:
        store = self._store(context)
        policies = [p for p in await store.latest_all() if p.policy_id > request.page_token]
        size = min(request.page_size or 100, 1000)
        page = policies[:size]
        more = len(policies) > size
        return pb.ListPoliciesResponse(
            policies=page, next_page_token=page[-1].policy_id if more else ""
        )

    @stream_errors
    async def WatchPolicies(
        self, request: pb.WatchPoliciesRequest, context: Context
    ) -> AsyncIterator[pb.WatchPoliciesResponse]:
        store = self._store(context)
        tenant = store.tenant
        condition = self.snapshot_changed.setdefault(tenant, asyncio.Condition())
        loop = asyncio.get_running_loop()
        last_revision = request.after_revision
        sent = False
        renew_at = loop.time() + self._lease_s / 3
        while True:
            if tenant not in self._tenants:
                # Disabled or deleted while watching (see remove_tenant): as for a new call.
                raise StatusError(StatusCode.PERMISSION_DENIED, f"unknown tenant {tenant!r}")
            # Read before the store: a change published from here on ends the wait below.
            seen = self._published.get(tenant, 0)
            snapshot = await store.publish_snapshot(self._lease_s)
            # The first answer is the current snapshot, even of revision 0 (no policies yet);
            # then every change, and the same revision again before the client's lease runs
            # out, however often the snapshot was republished without a change in between.
            if (
                snapshot.revision > last_revision
                or (not sent and last_revision == 0)
                or loop.time() >= renew_at
            ):
                last_revision = max(last_revision, snapshot.revision)
                sent = True
                renew_at = loop.time() + self._lease_s / 3
                yield pb.WatchPoliciesResponse(snapshot=snapshot)
            async with condition:
                # Until a publication, or the time to renew the client's lease.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(renew_at):
                        await condition.wait_for(partial(self._published_since, tenant, seen))


def _unavailable(reason: str) -> Callable[[Window], Usage]:
    def usage(window: Window) -> Usage:
        raise TenantUsageUnavailableError(reason)

    return usage


def _issues(issues: list[Issue]) -> list[validation_pb2.ValidationIssue]:
    return [
        validation_pb2.ValidationIssue(
            source=i.source, line=i.line, column=i.column, field=i.field, message=i.message
        )
        for i in issues
    ]
