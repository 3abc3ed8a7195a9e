"""Tenant usage for tenant-scope guardrail rules, answered synchronously from a cache.

The engine asks ``tenant_usage(window_s)`` in the middle of a step, so the answer must
already be in memory. :class:`TenantUsage` keeps, for every window the tenant's
current policy snapshot uses (and always for all time):

* the usage an authoritative :class:`UsageSource` reported for the executions persisted
  before a *cut* instant, refreshed in the background every ``refresh_s``, and
* the increments this router recorded since: every stored execution it receives a ref
  for, recorded once by execution id and attempt, and only if it was persisted at or
  after the cut (older ones are already in the source's figure).

A source that is written after the store's commit (the usage counters: the state service
records them after it publishes the ref) can be read between an execution's commit and
its counting, so its cut does not prove the execution is in its figure. Such a source says
which executions it holds (``counted``); an increment is kept until the source holds it,
whatever the cut, and is asked about before each read, so it is never counted zero times
(at worst twice, until the next refresh).

So a redelivered ref never counts twice, an execution is in the figure its own
post-result rule reads, and executions applied by other router replicas arrive with
the next refresh. Window semantics: the executions persisted in the last ``window``
seconds (``None``: all time). Between refreshes a window does not slide, so an
execution may count up to ``refresh_s`` longer than its window (never shorter).

Without a source the router counts in process only (:class:`_Ledger`): exact, but
only for the executions this router saw since it started, and reset on restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Final, Protocol

from tickmesh.runtime.policy import EMPTY_USAGE, Usage
from tickmesh.runtime.policy.sources import (
    TenantUsageUnavailableError,
    UsageSource,
    Window,
)
from tickmesh.v1 import guardrail_pb2, telemetry_pb2

logger = logging.getLogger(__name__)

_TENANT_SCOPE: Final = guardrail_pb2.GUARDRAIL_SCOPE_TENANT


# --- in process only ------------------------------------------------------------------


def _minus(a: Usage, b: Usage) -> Usage:
    """``a`` without ``b`` for the counters; maxima and high-water marks stay (an upper bound)."""
    custom = dict(a.custom)
    for name, value in b.custom.items():
        custom[name] = custom.get(name, 0.0) - value
    return dataclasses.replace(
        a,
        executions=a.executions - b.executions,
        input_tokens=a.input_tokens - b.input_tokens,
        output_tokens=a.output_tokens - b.output_tokens,
        cost_micros=a.cost_micros - b.cost_micros,
        model_calls=a.model_calls - b.model_calls,
        tool_calls=a.tool_calls - b.tool_calls,
        wall_time_s=max(0.0, a.wall_time_s - b.wall_time_s),
        custom=MappingProxyType(custom),
    )


_MAX_PENDING = 4096
"""Most records a ledger holds unfolded (the periodic expiry folds them sooner)."""


@dataclass
class _Sliding:
    seconds: float
    start: int
    """Absolute index of the oldest bucket in the sum."""
    total: Usage


class _Ledger:
    """Usage by second of persistence, summed over sliding windows (no source configured).

    History is kept for the longest window in use, and at least ``min_history_s``, so a
    window a new policy introduces starts with what the router saw in that span.
    Maxima never expire (an upper bound over the window).
    """

    def __init__(self, *, min_history_s: float = 3600.0) -> None:
        self._buckets: deque[tuple[int, Usage]] = deque()
        self._first = 0
        """Absolute index of ``_buckets[0]``."""
        self._all = EMPTY_USAGE
        self._windows: dict[float, _Sliding] = {}
        self._min_history_s = min_history_s
        self._pending: list[tuple[int, Usage]] = []
        """Records added since the sums were last read, with the second of their bucket.
        Folded in on the next read: every step adds one, and a tenant rule (the only
        reader besides the periodic expiry) is rare."""

    def track(self, windows: Iterable[Window], now: float) -> None:
        self._flush()
        wanted = {w for w in windows if w is not None}
        for gone in set(self._windows) - wanted:
            del self._windows[gone]
        for window in wanted - set(self._windows):
            start = self._first + len(self._buckets)
            total = EMPTY_USAGE
            floor = math.floor(now - window)
            for second, usage in reversed(self._buckets):
                if second < floor:
                    break
                start -= 1
                total = total.plus(usage)
            self._windows[window] = _Sliding(window, start, total)
        self._prune(now)

    def add(self, at: float, usage: Usage) -> None:
        second = int(at)
        pending = self._pending
        newest = pending[-1][0] if pending else self._buckets[-1][0] if self._buckets else None
        if newest is not None and second <= newest:
            # Late (or same-second) records join the newest bucket: they expire later, never sooner.
            second = newest
        pending.append((second, usage))
        if len(pending) >= _MAX_PENDING:
            self._flush()

    def _flush(self) -> None:
        """Fold the pending records into the buckets and sums, as adding each in turn would."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        buckets = self._buckets
        i = 0
        while i < len(pending):
            second = pending[i][0]
            j = i + 1
            while j < len(pending) and pending[j][0] == second:
                j += 1
            group = [usage for _, usage in pending[i:j]]
            if buckets and buckets[-1][0] == second:
                buckets[-1] = (second, buckets[-1][1].plus_all(group))
            else:
                buckets.append((second, group[0].plus_all(group[1:]) if j - i > 1 else group[0]))
            i = j
        usages = [usage for _, usage in pending]
        self._all = self._all.plus_all(usages)
        for sliding in self._windows.values():
            sliding.total = sliding.total.plus_all(usages)

    def usage(self, window: Window, now: float) -> Usage:
        self._flush()
        if window is None:
            return self._all
        sliding = self._windows.get(window)
        if sliding is None:
            raise TenantUsageUnavailableError(f"tenant usage over {window:g}s is not tracked")
        floor = math.floor(now - window)
        end = self._first + len(self._buckets)
        while sliding.start < end:
            second, usage = self._buckets[sliding.start - self._first]
            if second >= floor:
                break
            sliding.total = _minus(sliding.total, usage)
            sliding.start += 1
        return sliding.total

    def _prune(self, now: float) -> None:
        self._flush()
        keep = max([self._min_history_s, *self._windows])
        floor = math.floor(now - keep)
        oldest = min((s.start for s in self._windows.values()), default=None)
        while self._buckets and self._buckets[0][0] < floor:
            if oldest is not None and self._first >= oldest:
                break  # still in some window's sum: it leaves when that window expires it
            self._buckets.popleft()
            self._first += 1

    def expire(self, now: float) -> None:
        self._flush()
        for window in list(self._windows):
            self.usage(window, now)
        self._prune(now)


# --- the cache --------------------------------------------------------------------------


def _seconds(at: datetime) -> float:
    return at.timestamp()


UNCOUNTED_HORIZON_S: Final = 600.0
"""With a source that says which executions it holds: how long before the cut an
execution the source never recorded is still counted here (the state service records it
right after its ref; one it never records, counters lost, stops counting then)."""


class _Counted(Protocol):
    async def __call__(
        self, tenant: str, executions: Collection[tuple[str, int]]
    ) -> set[tuple[str, int]]: ...


def _execution_of(key: str) -> tuple[str, int] | None:
    """(execution id, attempt) of an increment key such as ``ref:<execution id>:<attempt>``."""
    head, _, attempt = key.rpartition(":")
    execution_id = head.rpartition(":")[2]
    if not execution_id or not attempt.isdigit():
        return None
    return execution_id, int(attempt)


class TenantUsage:
    """One tenant's usage per window, for the engine's synchronous ``tenant_usage``.

    Args:
        tenant: The tenant.
        source: Where authoritative usage comes from; ``None`` counts in process only.
        refresh_s: How often the source is read again.
        max_staleness_s: With a source, answers older than this raise (fail closed).
        dedupe_horizon_s: Without a source, how long execution keys are remembered to
            ignore redelivered refs.
        clock: The wall clock (seconds since the epoch), for tests.
    """

    def __init__(
        self,
        tenant: str,
        source: UsageSource | None = None,
        *,
        refresh_s: float = 0.2,
        max_staleness_s: float = 30.0,
        dedupe_horizon_s: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tenant = tenant
        self.source = source
        self._refresh_s = refresh_s
        self._max_staleness_s = max_staleness_s
        self._dedupe_horizon_s = dedupe_horizon_s
        self._clock = clock
        # With a source, only what tenant rules use (nothing is fetched without them); without
        # one, all time is always counted so that a later rule sees the history.
        self._windows: set[Window] = set() if source is not None else {None}
        # With a source:
        self._base: dict[Window, Usage] = {}
        self._cut: float | None = None
        self._increments: dict[str, tuple[float, Usage]] = {}
        self._counted: _Counted | None = getattr(source, "counted", None)
        """The source says which executions it holds (see the module docstring)."""
        self._settled: dict[str, float] = {}
        """Keys the source was found to hold (persisted_at), so a redelivered ref is not
        counted again."""
        self._pending: dict[Window, Usage] = {}
        self._cache: dict[Window, Usage] = {}
        self._refreshed_at: float | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # Without one:
        self._ledger = _Ledger() if source is None else None
        self._seen: dict[str, float] = {}
        if self._ledger is not None:
            self._ledger.track(self._windows, clock())

    @property
    def windows(self) -> frozenset[Window]:
        """The windows tracked now (with any tenant rule, all time too)."""
        return frozenset(self._windows)

    # -- recording --------------------------------------------------------------------

    def record(self, key: str, telemetry: telemetry_pb2.Telemetry, persisted_at: datetime) -> bool:
        """Count one stored execution (``key``: execution id and attempt) once.

        Returns False when it was already counted (a redelivered ref), or when it is
        older than the source's last cut (the source's figure holds it).
        """
        at = _seconds(persisted_at)
        if self._ledger is not None:
            return self._record_local(key, telemetry, at)
        if not self._windows:
            # No tenant rule in force: the first fetch for one will include this execution.
            return False
        if key in self._increments or key in self._settled:
            return False
        if self._cut is not None:
            # A source that says what it holds may not hold an execution persisted before its
            # cut yet; one that does not is exact to the cut.
            horizon = UNCOUNTED_HORIZON_S if self._counted is not None else 0.0
            if at < self._cut - horizon:
                return False
        usage = Usage.of(telemetry)
        self._increments[key] = (at, usage)
        for window in self._windows:
            held = self._pending.get(window, EMPTY_USAGE)
            self._pending[window] = held.plus(usage)
        self._cache.clear()
        return True

    def _record_local(self, key: str, telemetry: telemetry_pb2.Telemetry, at: float) -> bool:
        assert self._ledger is not None
        now = self._clock()
        seen = self._seen
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] >= now - self._dedupe_horizon_s:
                break
            del seen[oldest]
        if key in seen:
            return False
        seen[key] = now
        self._ledger.add(at, Usage.of(telemetry))
        return True

    # -- answering --------------------------------------------------------------------

    def usage(self, window: Window) -> Usage:
        """The tenant's usage over ``window`` (synchronous; the engine's ``tenant_usage``).

        Raises:
            TenantUsageUnavailableError: the window is not loaded yet, or the source has
                not answered for longer than ``max_staleness_s``.
        """
        if self._ledger is not None:
            return self._ledger.usage(window, self._clock())
        found = self._cache.get(window)
        if found is not None:
            self._check_fresh()
            return found
        base = self._base.get(window)
        if base is None:
            shown = "all time" if window is None else f"{window:g}s"
            raise TenantUsageUnavailableError(
                f"tenant usage over {shown} is not loaded yet from {self.source!r}"
            )
        self._check_fresh()
        pending = self._pending.get(window)
        value = base if pending is None else base.plus(pending)
        self._cache[window] = value
        return value

    def _check_fresh(self) -> None:
        refreshed = self._refreshed_at
        if refreshed is not None and time.monotonic() - refreshed > self._max_staleness_s:
            age = time.monotonic() - refreshed
            raise TenantUsageUnavailableError(
                f"tenant usage is stale: {self.source!r} last answered {age:.1f}s ago"
            )

    # -- refreshing -------------------------------------------------------------------

    async def track(self, windows: Iterable[Window]) -> None:
        """Follow exactly these windows (plus all time); load new ones before returning."""
        given = set(windows)
        wanted = {*given, None} if given or self._ledger is not None else set()
        new = wanted - self._windows
        if wanted == self._windows:
            return
        self._windows = wanted
        for gone in [w for w in self._base if w not in wanted]:
            self._base.pop(gone, None)
            self._pending.pop(gone, None)
        self._cache.clear()
        if self._ledger is not None:
            self._ledger.track(wanted, self._clock())
        elif new:
            try:
                await self.refresh()
            except Exception as exc:
                logger.warning("tenant %s: cannot load usage windows %s: %s", self.tenant, new, exc)

    async def refresh(self) -> None:
        """Read the source once (no-op without a source, beyond expiring old buckets)."""
        if self._ledger is not None:
            self._ledger.expire(self._clock())
            return
        assert self.source is not None
        async with self._lock:
            windows = set(self._windows)
            if not windows:
                self._increments.clear()
                self._settled.clear()
                self._pending.clear()
                self._base.clear()
                self._cache.clear()
                return
            held: set[str] = set()
            if self._counted is not None and self._increments:
                # Asked before the read: what the source held then is in what it reads.
                asked = {k: e for k in self._increments if (e := _execution_of(k)) is not None}
                found = await self._counted(self.tenant, list(asked.values()))
                held = {k for k, e in asked.items() if e in found}
            now = datetime.fromtimestamp(self._clock(), UTC)
            fetched = await self.source.fetch(self.tenant, windows, now)
            cut = _seconds(fetched.cut)
            if self._counted is None:
                self._increments = {k: v for k, v in self._increments.items() if v[0] >= cut}
            else:
                oldest = cut - UNCOUNTED_HORIZON_S
                for key in held:
                    if key in self._increments:
                        self._settled[key] = self._increments[key][0]
                self._increments = {
                    k: v for k, v in self._increments.items() if k not in held and v[0] >= oldest
                }
                self._settled = {k: at for k, at in self._settled.items() if at >= oldest}
            self._cut = cut
            current = self._windows
            self._base = {w: u for w, u in fetched.usage.items() if w in current}
            pending: dict[Window, Usage] = {}
            for _, usage in self._increments.values():
                for window in current:
                    pending[window] = pending.get(window, EMPTY_USAGE).plus(usage)
            self._pending = pending
            self._cache.clear()
            self._refreshed_at = time.monotonic()

    async def start(self) -> None:
        """Load the tracked windows once, then refresh in the background."""
        try:
            await self.refresh()
        except Exception as exc:
            logger.warning("tenant %s: cannot load usage: %s", self.tenant, exc)
        self._task = asyncio.create_task(self._run(), name=f"tenant-usage:{self.tenant}")

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
                if failing:
                    logger.info("tenant %s: usage source answers again", self.tenant)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    logger.warning("tenant %s: cannot refresh usage: %s", self.tenant, exc)
                failing = True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
