"""Guardrail evaluation in the router's process, against the newest policy
snapshot the guardrail service published (watched over the tenant's policy KV
bucket). No snapshot, or one past its lease, means every step is rejected:
the router fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from tickmesh.runtime.policy import EvaluationContext, PolicyEngine, Usage
from tickmesh.runtime.subjects import TenantNames
from tickmesh.v1 import guardrail_pb2, header_pb2, telemetry_pb2

from .core import Lifetime

logger = logging.getLogger(__name__)

SNAPSHOT_KEY = "snapshot"


class SnapshotWatcher:
    """Keeps the newest PolicySnapshot of one tenant."""

    def __init__(self, kv: KeyValue, tenant: str) -> None:
        self._kv = kv
        self._tenant = tenant
        self.snapshot: guardrail_pb2.PolicySnapshot | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, js: JetStreamContext, names: TenantNames) -> SnapshotWatcher:
        watcher = cls(await js.key_value(names.policy_bucket), names.tenant)
        await watcher.start()
        return watcher

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"policy-watch:{self._tenant}")

    async def _run(self) -> None:
        while True:
            try:
                watcher = await self._kv.watch(SNAPSHOT_KEY)
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        continue
                    try:
                        self.snapshot = guardrail_pb2.PolicySnapshot.FromString(entry.value)
                    except Exception:
                        logger.exception("unreadable policy snapshot for %s", self._tenant)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("policy watch for %s failed (%s); retrying", self._tenant, exc)
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Gate:
    """The core's Guard for one tenant: the engine over the watched snapshot."""

    def __init__(self, watcher: SnapshotWatcher, engine: PolicyEngine) -> None:
        self._watcher = watcher
        self._engine = engine
        self._tenant_usage = Usage()

    def record_tenant_usage(self, telemetry: telemetry_pb2.Telemetry) -> None:
        self._tenant_usage = self._tenant_usage.plus(Usage.of(telemetry))

    def __call__(
        self,
        lifetime: Lifetime,
        phase: guardrail_pb2.GuardrailPhase.ValueType,
        header: header_pb2.EnvelopeHeader,
        telemetry: telemetry_pb2.Telemetry,
    ) -> guardrail_pb2.GuardrailDecision:
        view = lifetime.view
        lifetime_usage = Usage.of(view.totals)
        lifetime_usage = Usage(
            executions=int(view.execution_count),
            input_tokens=lifetime_usage.input_tokens,
            output_tokens=lifetime_usage.output_tokens,
            cost_micros=lifetime_usage.cost_micros,
            model_calls=lifetime_usage.model_calls,
            tool_calls=lifetime_usage.tool_calls,
            iterations=max(lifetime.state.iterations.values(), default=0),
            wall_time_s=max(
                0.0,
                (lifetime.now - view.created_at.ToDatetime(tzinfo=UTC)).total_seconds(),
            ),
            fanout=len(lifetime.state.in_flight),
        )
        post = phase == guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT
        context = EvaluationContext(
            phase=phase,
            header=header,
            execution=Usage.of(telemetry) if post else Usage(),
            estimate=Usage() if post else Usage.of(telemetry),
            lifetime=lifetime_usage,
            tenant_usage=lambda _window: self._tenant_usage,
        )
        return self._engine.evaluate(
            self._watcher.snapshot, context, now=datetime.now(UTC), graph_id=view.graph.id
        )
