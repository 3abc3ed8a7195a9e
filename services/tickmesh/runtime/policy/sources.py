"""Where tenant usage comes from: the state service's counters, read in process
(embedded mesh) or over ``StateService.GetCounters``. Shared by the router (which
caches it for every step) and the guardrail service (its ``Evaluate`` RPC)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Final, Protocol

import grpc

from tickmesh.sdk import ChannelSecurity
from tickmesh.sdk._transport import create_channel
from tickmesh.sdk.errors import ValidationError
from tickmesh.v1 import guardrail_pb2, state_service_pb2, state_service_pb2_grpc, telemetry_pb2

from .engine import PolicyEngine
from .usage import Usage

logger = logging.getLogger(__name__)

Window = float | None
"""A window in seconds; ``None`` means all time."""

TENANT_METADATA_KEY: Final = "x-tickmesh-tenant"
_TENANT_SCOPE: Final = guardrail_pb2.GUARDRAIL_SCOPE_TENANT
_FETCH_ATTEMPTS: Final = 3


class TenantUsageUnavailableError(LookupError):
    """The tenant's usage over a window is not known (not loaded yet, or stale).

    The engine turns it into a rejection with its message: tenant rules fail closed.
    """


@dataclass(frozen=True, slots=True)
class Fetched:
    """What a source reported: usage per window over the executions persisted before ``cut``."""

    usage: Mapping[Window, Usage]
    cut: datetime
    """Executions persisted before this instant are in ``usage``; later ones are not
    (exactly for the embedded store; approximately, see :class:`StateRpcUsageSource`)."""


class UsageSource(Protocol):
    """Where authoritative tenant usage comes from (the state service's counters)."""

    async def fetch(self, tenant: str, windows: Collection[Window], now: datetime) -> Fetched:
        """The tenant's usage over each window ending at ``now``, and the cut it is exact to."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class CounterStore(Protocol):
    """The part of the state service's ``StateStore`` a :class:`StoreUsageSource` reads."""

    async def counters(
        self, tenant: str, *, lifetime_id: str | None = None, since: datetime | None = None
    ) -> tuple[telemetry_pb2.Telemetry, int]: ...


def counted_usage(totals: telemetry_pb2.Telemetry, executions: int) -> Usage:
    """A stored counter (summed telemetry and an execution count) as a Usage.

    Counters carry sums only: no per-execution maxima, custom metrics or run time.
    """
    return dataclasses.replace(
        Usage.of(totals), executions=executions, max_values=MappingProxyType({})
    )


_COUNTER_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cost_micros",
    "model_calls",
    "tool_calls",
)


def _minus_counters(
    a: tuple[telemetry_pb2.Telemetry, int], b: tuple[telemetry_pb2.Telemetry, int]
) -> tuple[telemetry_pb2.Telemetry, int]:
    totals = telemetry_pb2.Telemetry()
    for name in _COUNTER_FIELDS:
        setattr(totals, name, max(0, getattr(a[0], name) - getattr(b[0], name)))
    return totals, max(0, a[1] - b[1])


class StoreUsageSource:
    """Reads the state store in the same process (the embedded mesh).

    Without ``caught_up``, exact to ``now`` for what is stored: it reads what was
    persisted at or after ``now`` before and after the window sums, and when both agree
    nothing landed in between, so subtracting it leaves exactly the executions persisted
    before ``now`` (the store assigns ``persisted_at`` in commit order on one thread). If
    writes keep interleaving it falls back to ``cut = now`` without the subtraction,
    which can count an execution persisted during the fetch twice until the next refresh.

    With ``caught_up`` (the state service's wait for the records on the bus, as the
    embedded mesh passes it), the cut is about what was *on the bus* at ``now``: a
    router counts a record it read from the bus before the store committed it, at the
    time it read it. The fetch waits until every record on the bus at ``now`` is stored
    and sums all that is stored, so a record read before ``now`` is in the figure, and
    one read after it may count twice until the next refresh (never zero times). If the
    wait fails the fetch fails, and tenant rules fail closed.
    """

    def __init__(
        self,
        store: CounterStore,
        *,
        caught_up: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._store = store
        self._caught_up = caught_up

    async def fetch(self, tenant: str, windows: Collection[Window], now: datetime) -> Fetched:
        store = self._store
        ordered = list(windows)
        if self._caught_up is not None:
            await _records_stored(self._caught_up, tenant)
            sums = [await store.counters(tenant, since=_since(now, w)) for w in ordered]
            return Fetched({w: counted_usage(*s) for w, s in zip(ordered, sums, strict=True)}, now)
        for _ in range(_FETCH_ATTEMPTS):
            before = await store.counters(tenant, since=now)
            sums = [await store.counters(tenant, since=_since(now, w)) for w in ordered]
            after = await store.counters(tenant, since=now)
            if after[1] == before[1] and after[0] == before[0]:
                usage = {
                    w: counted_usage(*_minus_counters(s, before))
                    for w, s in zip(ordered, sums, strict=True)
                }
                return Fetched(usage, now)
        logger.debug(
            "tenant %s: usage kept changing during the fetch; counting conservatively", tenant
        )
        return Fetched({w: counted_usage(*s) for w, s in zip(ordered, sums, strict=True)}, now)

    async def close(self) -> None:
        return None


class AfterRecordsStored:
    """A source whose figure follows the state service's acks (its usage counters, which
    it records after each commit, before the ack): each fetch first waits until the
    records on the bus are stored, and so counted.

    Without this, a rule coming into force would read a figure that lacks records the
    router saw before the rule (and did not keep: it keeps no increments while no tenant
    rule is in force). If the wait fails the fetch fails, and tenant rules fail closed.
    """

    def __init__(self, source: UsageSource, stored: Callable[[str], Awaitable[bool]]) -> None:
        self._source = source
        self._stored = stored
        counted = getattr(source, "counted", None)
        if counted is not None:
            self.counted = counted  # what TenantUsage asks the counters

    async def fetch(self, tenant: str, windows: Collection[Window], now: datetime) -> Fetched:
        await _records_stored(self._stored, tenant)
        return await self._source.fetch(tenant, windows, now)

    async def close(self) -> None:
        await self._source.close()

    def __repr__(self) -> str:
        return f"AfterRecordsStored({self._source!r})"


class StateRpcUsageSource:
    """Calls ``StateService.GetCounters`` (scope TENANT) on a remote state service.

    The service first waits until every execution record on the bus is stored, then
    computes each window against its own clock at the moment it reads, so the cut is
    the instant the fetch started here: every record a router read before it is in the
    figure, and one read or persisted while the calls are in flight may count twice
    until the next refresh (never zero times).
    Clocks are assumed synchronised (NTP).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 5.0,
        channel: grpc.aio.Channel | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        self._target = target
        self._channel = channel or create_channel(target, security=security)
        self._stub = state_service_pb2_grpc.StateServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def _one(self, tenant: str, window: Window) -> Usage:
        request = state_service_pb2.GetCountersRequest(
            scope=state_service_pb2.COUNTER_SCOPE_TENANT,
            window_seconds=0 if window is None else max(1, math.ceil(window)),
        )
        response: state_service_pb2.GetCountersResponse = await self._stub.GetCounters(
            request, metadata=((TENANT_METADATA_KEY, tenant),), timeout=self._timeout_s
        )
        return counted_usage(response.totals, int(response.executions))

    async def fetch(self, tenant: str, windows: Collection[Window], now: datetime) -> Fetched:
        ordered = list(windows)
        found = await asyncio.gather(*(self._one(tenant, w) for w in ordered))
        return Fetched(dict(zip(ordered, found, strict=True)), now)

    async def close(self) -> None:
        await self._channel.close()

    def __repr__(self) -> str:
        return f"StateRpcUsageSource({self._target!r})"


async def _records_stored(stored: Callable[[str], Awaitable[bool]], tenant: str) -> None:
    """Wait with ``stored``; a usage figure that may lack a record the router saw is
    unavailable (tenant rules fail closed)."""
    if not await stored(tenant):
        raise TenantUsageUnavailableError(
            f"tenant {tenant}: the execution records on the bus are not stored yet"
        )


def _since(now: datetime, window: Window) -> datetime | None:
    """Where ``window`` starts; ``None`` (all time) for one reaching back past 1970, as
    ``StateService.GetCounters`` reads it (a datetime cannot go back past year 1)."""
    if window is None or window >= now.timestamp():
        return None
    return now - timedelta(seconds=window)


def tenant_windows(snapshot: guardrail_pb2.PolicySnapshot, engine: PolicyEngine) -> set[Window]:
    """The windows the snapshot's tenant-scope rules read (policies that do not load are
    skipped: the engine rejects their steps anyway)."""
    windows: set[Window] = set()
    for policy in snapshot.policies:
        try:
            compiled = engine.compile(policy)
        except ValidationError:
            continue
        windows.update(r.window_s for r in compiled.rules if r.scope == _TENANT_SCOPE)
    return windows
