"""Guardrail evaluation in the router's process, against the newest policy
snapshot the guardrail service published (watched over the tenant's policy KV
bucket). No snapshot, or one past its lease, means every step is rejected:
the router fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import MappingProxyType

from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from opentelemetry.trace import Tracer

from tickmesh.runtime.metrics import Metrics
from tickmesh.runtime.policy import EMPTY_USAGE, EvaluationContext, PolicyEngine, Usage
from tickmesh.runtime.policy.sources import tenant_windows
from tickmesh.runtime.policy.usage import new_usage
from tickmesh.runtime.subjects import TenantNames
from tickmesh.runtime.tracing import end_evaluation_span, evaluation_span
from tickmesh.sdk.timestamps import timestamp_ns
from tickmesh.v1 import graph_pb2, guardrail_pb2, header_pb2, telemetry_pb2

from .core import Lifetime
from .usage import TenantUsage

logger = logging.getLogger(__name__)

SNAPSHOT_KEY = "snapshot"
PREPARE_TIMEOUT_S = 0.5
"""Longest a new snapshot waits for its tenant usage windows to load before it is used."""

Prepare = Callable[[guardrail_pb2.PolicySnapshot], Awaitable[None]]
"""Called with each new snapshot before it is enforced (e.g. to load tenant usage windows)."""


class SnapshotWatcher:
    """Keeps the newest PolicySnapshot of one tenant."""

    def __init__(self, kv: KeyValue, tenant: str, *, prepare: Prepare | None = None) -> None:
        self._kv = kv
        self._tenant = tenant
        self._prepare = prepare
        self.snapshot: guardrail_pb2.PolicySnapshot | None = None
        self.received_at: datetime | None = None
        """When the current snapshot was installed (for measurements and diagnostics)."""
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, js: JetStreamContext, names: TenantNames, *, prepare: Prepare | None = None
    ) -> SnapshotWatcher:
        watcher = cls(await js.key_value(names.policy_bucket), names.tenant, prepare=prepare)
        await watcher.start()
        return watcher

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"policy-watch:{self._tenant}")

    async def _run(self) -> None:
        while True:
            try:
                watcher = await self._kv.watch(SNAPSHOT_KEY)
                async for entry in watcher:
                    if entry is None:
                        continue
                    if entry.operation in ("DEL", "PURGE"):
                        # The authority withdrew the snapshot: nothing is enforceable any more.
                        self.snapshot = None
                        self.received_at = datetime.now(UTC)
                        continue
                    if entry.value is None:
                        continue
                    try:
                        snapshot = guardrail_pb2.PolicySnapshot.FromString(entry.value)
                    except Exception:
                        logger.exception("unreadable policy snapshot for %s", self._tenant)
                        continue
                    await self.install(snapshot)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("policy watch for %s failed (%s); retrying", self._tenant, exc)
                await asyncio.sleep(0.5)

    async def install(self, snapshot: guardrail_pb2.PolicySnapshot) -> None:
        """Prepare for ``snapshot`` (bounded by PREPARE_TIMEOUT_S), then enforce it."""
        if self._prepare is not None:
            try:
                async with asyncio.timeout(PREPARE_TIMEOUT_S):
                    await self._prepare(snapshot)
            except Exception as exc:
                # Enforced anyway: a rule whose inputs are missing fails closed on its own.
                problem = (
                    f"not done within {PREPARE_TIMEOUT_S}s"
                    if isinstance(exc, TimeoutError)
                    else f"{type(exc).__name__}: {exc}"
                )
                logger.warning("preparing the policy snapshot of %s: %s", self._tenant, problem)
        self.snapshot = snapshot
        self.received_at = datetime.now(UTC)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def lifetime_usage(
    lifetime: Lifetime,
    current: telemetry_pb2.Telemetry | None = None,
    *,
    iteration: int = 0,
    step: Usage | None = None,
) -> Usage:
    """What the lifetime has used so far (its stored totals, which already include the
    execution being decided on after its result).

    Sums come from the lifetime's totals; ``executions`` is its execution count, ``wall_time_s``
    the time since it started, ``iterations`` its highest node iteration and ``fanout`` the
    steps in flight. The router keeps no per-execution maxima, so ``max(metric)`` sees the
    current execution only (``current``; nothing before dispatch). ``step`` is
    ``Usage.of(current)`` when the caller has it already.
    """
    state = lifetime.state
    view = state.lifetime
    iterations = max(max(state.iterations.values(), default=0), iteration)
    fanout = len(state.in_flight)
    maxima: dict[str, float] = {}
    if current is not None:
        if step is None:
            step = Usage.of(current)
        # The current execution's maxima, with the lifetime's high-water marks.
        maxima.update(step.max_values)
        maxima["iterations"] = iterations
        maxima["fanout"] = fanout
    elapsed = 0.0
    if view.HasField("created_at"):
        elapsed = max(0.0, (lifetime.now_ns - timestamp_ns(view.created_at)) / 1e9)
    totals = view.totals
    # One Usage built directly: this runs twice per step.
    return new_usage(
        depth=0,
        executions=int(view.execution_count),
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        cost_micros=totals.cost_micros,
        model_calls=totals.model_calls,
        tool_calls=totals.tool_calls,
        iterations=iterations,
        wall_time_s=elapsed,
        fanout=fanout,
        max_values=MappingProxyType(maxima),
        # dict() of a protobuf map walks it through the Mapping ABC, even when empty.
        custom=MappingProxyType(dict(totals.custom_metrics)) if totals.custom_metrics else _NONE,
    )


_NONE: MappingProxyType[str, float] = MappingProxyType({})

ESTIMATE_KEY = "estimate"
"""The node config key holding a step's usage estimate, read by pre_dispatch rules."""
_ESTIMATE_INTS = {
    "input_tokens": 2**62,
    "output_tokens": 2**62,
    "cost_micros": 2**62,
    "model_calls": 0xFFFF_FFFF,
    "tool_calls": 0xFFFF_FFFF,
}


def estimate_of(node: graph_pb2.Node | None) -> telemetry_pb2.Telemetry:
    """The step's estimated usage, from the node's ``config.estimate`` mapping.

    Keys: ``input_tokens``, ``output_tokens``, ``tokens`` (counted as input tokens),
    ``cost_usd`` or ``cost_micros``, ``model_calls``, ``tool_calls``, ``wall_time_s``, and
    ``custom`` (a mapping of numbers). Anything else, or a non-number, is ignored: an
    estimate only ever adds information, and its absence reads as 0.
    """
    estimate = telemetry_pb2.Telemetry()
    if node is None or ESTIMATE_KEY not in node.config.fields:
        return estimate
    value = node.config.fields[ESTIMATE_KEY]
    if value.WhichOneof("kind") != "struct_value":
        return estimate
    fields = value.struct_value.fields

    def number(name: str) -> float | None:
        item = fields.get(name)
        if item is None or item.WhichOneof("kind") != "number_value":
            return None
        found = item.number_value
        # Usage never goes negative, and NaN or infinity would only hide a violation.
        return found if 0 <= found < 1e15 else None

    for name, limit in _ESTIMATE_INTS.items():
        found = number(name)
        if found is not None:
            setattr(estimate, name, min(int(found), limit))
    tokens = number("tokens")
    if tokens is not None and not estimate.input_tokens and not estimate.output_tokens:
        estimate.input_tokens = int(tokens)
    cost = number("cost_usd")
    if cost is not None and not estimate.cost_micros:
        # Any accepted dollar figure past ~$9.2e12 is out of int64 range once in micros.
        estimate.cost_micros = min(round(cost * 1_000_000), _ESTIMATE_INTS["cost_micros"])
    wall = number("wall_time_s")
    if wall is not None:
        estimate.run_time.FromNanoseconds(int(wall * 1e9))
    custom = fields.get("custom")
    if custom is not None and custom.WhichOneof("kind") == "struct_value":
        for name, item in custom.struct_value.fields.items():
            if item.WhichOneof("kind") == "number_value":
                estimate.custom_metrics[name] = item.number_value
    return estimate


class Gate:
    """The core's Guard for one tenant: the engine over the watched snapshot, with the
    tenant's usage from ``usage``."""

    def __init__(
        self,
        watcher: SnapshotWatcher,
        engine: PolicyEngine,
        usage: TenantUsage,
        *,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._watcher = watcher
        self._engine = engine
        self.usage = usage
        self._metrics = metrics
        self._tracer = tracer

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        names: TenantNames,
        engine: PolicyEngine,
        usage: TenantUsage,
        *,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
    ) -> Gate:
        """Watch the tenant's snapshot; each new one loads its tenant windows before use.

        ``metrics`` (if any) counts every decision by phase and action; ``tracer`` (if
        any) records each decision of a traced lifetime as a span."""

        async def prepare(snapshot: guardrail_pb2.PolicySnapshot) -> None:
            await usage.track(tenant_windows(snapshot, engine))

        watcher = await SnapshotWatcher.open(js, names, prepare=prepare)
        return cls(watcher, engine, usage, metrics=metrics, tracer=tracer)

    @property
    def watcher(self) -> SnapshotWatcher:
        return self._watcher

    @property
    def snapshot(self) -> guardrail_pb2.PolicySnapshot | None:
        return self._watcher.snapshot

    def record_execution(
        self, key: str, telemetry: telemetry_pb2.Telemetry, persisted_at: datetime
    ) -> bool:
        """Count one stored execution in the tenant's usage (idempotent by ``key``)."""
        return self.usage.record(key, telemetry, persisted_at)

    def __call__(
        self,
        lifetime: Lifetime,
        phase: guardrail_pb2.GuardrailPhase.ValueType,
        header: header_pb2.EnvelopeHeader,
        telemetry: telemetry_pb2.Telemetry,
    ) -> guardrail_pb2.GuardrailDecision:
        post = phase == guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT
        graph_id = lifetime.view.graph.id
        snapshot = self._watcher.snapshot
        if self._engine.reads_usage(snapshot, phase, graph_id):
            if not post and telemetry.ByteSize() == 0:
                telemetry = estimate_of(lifetime.nodes.get(header.node.id))
            step = Usage.of(telemetry, iteration=header.iteration)
            context = EvaluationContext(
                phase=phase,
                header=header,
                execution=step if post else EMPTY_USAGE,
                estimate=EMPTY_USAGE if post else step,
                lifetime=lifetime_usage(
                    lifetime,
                    telemetry if post else None,
                    iteration=header.iteration,
                    step=step if post else None,
                ),
                tenant_usage=self.usage.usage,
            )
        else:
            # No rule of this phase applies: the evaluation reads no usage (it still checks
            # the snapshot's lease and tenant, and fails closed as always).
            context = EvaluationContext(phase=phase, header=header)
        span = (
            None
            if self._tracer is None or lifetime.quiet
            else evaluation_span(self._tracer, header, phase)
        )
        decision = self._engine.evaluate(
            snapshot, context, now=datetime.now(UTC), graph_id=graph_id
        )
        if span is not None:
            end_evaluation_span(span, decision)
        if self._metrics is not None:
            self._metrics.guardrail_decision(self.usage.tenant, graph_id, phase, decision.action)
        return decision

    async def stop(self) -> None:
        await self._watcher.stop()
        await self.usage.stop()
