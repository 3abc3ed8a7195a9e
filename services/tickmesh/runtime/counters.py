"""Tenant usage counters: where the state service adds each stored execution's telemetry,
and where routers and guardrails read a tenant's usage over a window.

A :class:`UsageCounter` is a :class:`~tickmesh.runtime.policy.sources.UsageSource` that can
also be written. Recording is idempotent per (tenant, execution id, attempt): the state
service records every batch it stores, duplicates included, so a crash between its commit
and the counter call heals on redelivery without counting anything twice.

:class:`InProcessUsageCounter` lives in this module; the Redis one, shared by every replica
in the cloud profile, is in :mod:`tickmesh.runtime.counters_redis` so the embedded profile
never imports redis.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

from tickmesh.sdk.errors import ConfigError, ValidationError
from tickmesh.sdk.ids import TENANT_ID_PATTERN
from tickmesh.v1 import envelope_pb2

from .policy.sources import Fetched, UsageSource, Window
from .policy.usage import Usage

DEFAULT_MARKER_TTL_S: Final = 7 * 86_400
"""How long an execution is remembered as counted: a redelivery later than this counts again."""
DEFAULT_MAX_WINDOW_S: Final = 31 * 86_400
"""The longest window a counter answers for (tenant rules' ``window:``)."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)

Sums = tuple[int, int, int, int, int, int]
"""input_tokens, output_tokens, cost_micros, model_calls, tool_calls, executions."""
_ZERO: Final[Sums] = (0, 0, 0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class CountedExecution:
    """One stored execution attempt, as the counters see it."""

    execution_id: str
    attempt: int
    persisted_at: datetime
    """When the state store persisted it (timezone-aware); decides which windows hold it."""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    model_calls: int = 0
    tool_calls: int = 0

    def __post_init__(self) -> None:
        if not self.execution_id:
            raise ValidationError("a counted execution needs an execution_id")
        if self.attempt < 1:
            raise ValidationError(
                f"execution {self.execution_id}: attempt must be >= 1, not {self.attempt}"
            )
        if self.persisted_at.tzinfo is None:
            raise ValidationError(
                f"execution {self.execution_id}: persisted_at must be timezone-aware"
            )

    @property
    def sums(self) -> Sums:
        """Its values in :data:`Sums` order (one execution)."""
        return (
            self.input_tokens,
            self.output_tokens,
            self.cost_micros,
            self.model_calls,
            self.tool_calls,
            1,
        )


def counted_from_envelope(
    env: envelope_pb2.ExecutionEnvelope, persisted_at: datetime
) -> CountedExecution:
    """The counted form of a stored ``task_execution`` or ``plan_execution`` record.

    Takes the ids from the envelope header and the telemetry from the body's result, as
    the state store does when it sums its own counters.

    Raises:
        ValidationError: another body kind, or a header without execution id or attempt.
    """
    kind = env.WhichOneof("body")
    if kind == "task_execution":
        telemetry = env.task_execution.result.telemetry
    elif kind == "plan_execution":
        telemetry = env.plan_execution.result.telemetry
    else:
        raise ValidationError(
            f"only task_execution and plan_execution records are counted, not {kind}"
        )
    header = env.header
    return CountedExecution(
        execution_id=header.execution_id,
        attempt=header.attempt,
        persisted_at=persisted_at,
        input_tokens=telemetry.input_tokens,
        output_tokens=telemetry.output_tokens,
        cost_micros=telemetry.cost_micros,
        model_calls=telemetry.model_calls,
        tool_calls=telemetry.tool_calls,
    )


class UsageCounter(UsageSource, Protocol):
    """A usage source the state service writes: ``record`` after each stored batch."""

    async def record(self, tenant: str, executions: Sequence[CountedExecution]) -> int:
        """Count each execution attempt of ``tenant`` once; return how many were new.

        Recording an attempt again (in the same batch, later, or from another process)
        changes nothing.
        """
        ...

    async def counted(
        self, tenant: str, executions: Collection[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        """Which of these (execution id, attempt) were recorded (and are still remembered:
        ``marker_ttl_s``). The state service records after the store's commit, so a read
        can come between the two; a router asks this to know which of its own increments
        the counters hold."""
        ...


def usage_of(sums: Sums) -> Usage:
    """Summed counters as the :class:`Usage` a tenant rule reads.

    The same value :func:`~tickmesh.runtime.policy.sources.counted_usage` gives, built
    directly because a tenant's sums can outgrow Telemetry's uint32 call counters.
    """
    input_tokens, output_tokens, cost_micros, model_calls, tool_calls, executions = sums
    return Usage(
        executions=executions,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_micros=cost_micros,
        model_calls=model_calls,
        tool_calls=tool_calls,
    )


def check_tenant(tenant: str) -> None:
    """Raise ValidationError unless ``tenant`` is a well-formed tenant id."""
    if TENANT_ID_PATTERN.fullmatch(tenant) is None:
        raise ValidationError(f"invalid tenant id {tenant!r}")


def epoch_us(when: datetime, what: str) -> int:
    """``when`` (timezone-aware) as whole microseconds since the epoch."""
    if when.tzinfo is None:
        raise ValidationError(f"{what} must be timezone-aware")
    return (when - _EPOCH) // _MICROSECOND


def window_us(window: float, max_window_s: int) -> int:
    """A finite window in whole microseconds, refused past what the counter keeps."""
    if not window > 0:
        raise ValidationError(f"a usage window must be positive, not {window!r}")
    if window > max_window_s:
        raise ConfigError(
            f"a tenant rule reads usage over {window:g}s, longer than the usage counter keeps "
            f"(max_window_s={max_window_s}): shorten the rule's window or raise max_window_s"
        )
    return round(window * 1_000_000)


def _time(item: tuple[int, Sums]) -> int:
    return item[0]


def _plus(a: Sums, b: Sums) -> Sums:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5])


def _minus(a: Sums, b: Sums) -> Sums:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3], a[4] - b[4], a[5] - b[5])


class _Series:
    """Executions in persistence order with running totals: any time range sums in O(log n).

    ``totals[i]`` is the sum of every execution before ``times[i]`` (including pruned ones),
    so a range is a difference of two totals. A batch in time order after what is held (the
    usual case) costs O(batch); a batch reaching back rewrites the totals after its oldest
    record once, O(held after it + batch).
    """

    def __init__(self) -> None:
        self.times: list[int] = []
        self.totals: list[Sums] = [_ZERO]

    def add(self, items: list[tuple[int, Sums]]) -> None:
        """Add executions given as (persisted µs, sums), in any order."""
        if not items:
            return
        items.sort(key=_time)
        times, totals = self.times, self.totals
        if times and items[0][0] < times[-1]:
            # Late records: take the held ones from where they belong and merge them back.
            start = bisect_right(times, items[0][0])
            held = [(times[i], _minus(totals[i + 1], totals[i])) for i in range(start, len(times))]
            del times[start:]
            del totals[start + 1 :]
            items = list(heapq.merge(held, items, key=_time))
        for at_us, sums in items:
            times.append(at_us)
            totals.append(_plus(totals[-1], sums))

    def before(self, at_us: int) -> Sums:
        """The sum over every execution persisted before ``at_us``."""
        return self.totals[bisect_left(self.times, at_us)]

    def prune_before(self, at_us: int) -> None:
        """Forget the executions persisted before ``at_us`` (their sum stays in the totals).

        Only when they are at least half of what is held, so the copying stays amortised O(1).
        """
        drop = bisect_left(self.times, at_us)
        if drop and drop * 2 >= len(self.times):
            del self.times[:drop]
            del self.totals[:drop]


@dataclass(slots=True)
class _Tenant:
    seen: dict[tuple[str, int], float]
    """Counted (execution id, attempt) -> when it was recorded (clock time), oldest first."""
    series: _Series
    newest_us: int = 0


class InProcessUsageCounter:
    """Counters in this process's memory: exact, for the embedded profile and as a test fake.

    A window ending at ``now`` holds exactly the executions persisted in
    ``[now - window, now)``, and all time those persisted before ``now``. The cut is ``now``.

    Like the Redis counter, an execution is remembered as counted for ``marker_ttl_s`` after
    it was recorded, and windows longer than ``max_window_s`` are refused (ConfigError):
    executions persisted more than ``max_window_s`` (plus an hour) before the newest one are
    dropped from the window data, though they stay in all time.

    Args:
        marker_ttl_s: How long a recorded execution is remembered as counted.
        max_window_s: The longest window answered.
        clock: Monotonic seconds, for the marker lifetime (tests may inject one).
    """

    def __init__(
        self,
        *,
        marker_ttl_s: int = DEFAULT_MARKER_TTL_S,
        max_window_s: int = DEFAULT_MAX_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if marker_ttl_s < 1:
            raise ConfigError(f"marker_ttl_s must be >= 1, not {marker_ttl_s}")
        if max_window_s < 1:
            raise ConfigError(f"max_window_s must be >= 1, not {max_window_s}")
        self._marker_ttl_s = marker_ttl_s
        self._max_window_s = max_window_s
        self._keep_us = (max_window_s + 3600) * 1_000_000
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}

    async def record(self, tenant: str, executions: Sequence[CountedExecution]) -> int:
        check_tenant(tenant)
        if not executions:
            return 0
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant({}, _Series())
        now = self._clock()
        seen = state.seen
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] > now - self._marker_ttl_s:
                break
            del seen[oldest]
        new: list[tuple[int, Sums]] = []
        for execution in executions:
            key = (execution.execution_id, execution.attempt)
            if key in seen:
                continue
            at_us = epoch_us(execution.persisted_at, "persisted_at")
            seen[key] = now
            new.append((at_us, execution.sums))
            state.newest_us = max(state.newest_us, at_us)
        state.series.add(new)
        state.series.prune_before(state.newest_us - self._keep_us)
        return len(new)

    async def counted(
        self, tenant: str, executions: Collection[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        check_tenant(tenant)
        state = self._tenants.get(tenant)
        if state is None:
            return set()
        return {e for e in executions if e in state.seen}

    async def fetch(self, tenant: str, windows: Collection[Window], now: datetime) -> Fetched:
        check_tenant(tenant)
        end_us = epoch_us(now, "now")
        spans = {w: None if w is None else window_us(w, self._max_window_s) for w in windows}
        state = self._tenants.get(tenant)
        usage: dict[Window, Usage] = {}
        for window, span in spans.items():
            if state is None:
                usage[window] = usage_of(_ZERO)
                continue
            series = state.series
            upto = series.before(end_us)
            usage[window] = usage_of(
                upto if span is None else _minus(upto, series.before(end_us - span))
            )
        return Fetched(usage, now)

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return "InProcessUsageCounter()"


__all__ = [
    "DEFAULT_MARKER_TTL_S",
    "DEFAULT_MAX_WINDOW_S",
    "CountedExecution",
    "InProcessUsageCounter",
    "UsageCounter",
    "counted_from_envelope",
    "usage_of",
]
