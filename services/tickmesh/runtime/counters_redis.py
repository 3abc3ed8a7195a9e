"""Tenant usage counters in Redis: one cheap, atomic source for every router, guardrail and
state replica of the cloud profile.

Keys (``{tenant}`` is a Redis Cluster hash tag, so one tenant's keys share a slot and both
scripts stay legal on a cluster)::

    <prefix>:{<tenant>}:u:s:<epoch s>        hash per fine bucket (bucket_s wide), 10 min
    <prefix>:{<tenant>}:u:m:<epoch min>      hash per minute, max_window_s + 1 h
    <prefix>:{<tenant>}:u:h:<epoch hour>     hash per hour, max_window_s + 1 h
    <prefix>:{<tenant>}:u:all                hash, all time (never expires)
    <prefix>:{<tenant>}:seen:<execution id>:<attempt>   marker: counted already

Every hash has the fields input_tokens, output_tokens, cost_micros, model_calls, tool_calls
and executions. ``record`` is one Lua script per batch: for each execution it sets the
marker with ``SET NX EX`` and only if that set it adds the values into the execution's fine,
minute and hour buckets and the all-time hash, so a redelivered or concurrent record never
counts twice (and a client retry after a lost reply is harmless too).

``fetch`` is one Lua script per call, whatever the number of windows: a window is the whole
hours inside it, whole minutes at its edges, and fine buckets at the edges of those. The
hour buckets keep a 24 h window at about 200 reads instead of 1,500 (a 31-day one at about
900 instead of 45,000), which matters because a script blocks Redis while it runs.

Precision: every edge is rounded *outward* to a bucket boundary, never inward, because a
guardrail must fail safe: it may count a little more than the window, never less.

* The near edge (``now``) is exact to ``bucket_s``. The fine bucket holding ``now`` is read
  whole, so executions persisted in the rest of that second count already (and may count
  twice in a router's cache until its next refresh, as with the state service's RPC).
* The far edge (``now - window``) is exact to ``bucket_s`` for windows up to 5 minutes.
  Fine buckets are kept only 10 minutes (keeping them as long as the longest window would
  cost one hash per second per tenant), so for longer windows the far edge is rounded
  outward to the minute: a 24 h window counts up to 59 s of usage from just before it.
* All time counts every execution recorded, including any persisted after ``now``.

Sums are exact integers (Redis stores int64): Lua adds numbers in doubles only while they
stay below 2**53 and otherwise leaves the adding to Redis or Python.

Limits: windows longer than ``max_window_s`` raise ConfigError (their oldest buckets may
have expired, which would count less). An execution recorded again after ``marker_ttl_s``
counts again. Counters live only as long as Redis keeps its data: run it with persistence
(AOF) where losing them matters.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tickmesh.sdk.errors import ConfigError, TransportError

from .counters import (
    DEFAULT_MARKER_TTL_S,
    DEFAULT_MAX_WINDOW_S,
    CountedExecution,
    Sums,
    check_tenant,
    epoch_us,
    usage_of,
    window_us,
)
from .policy.sources import Fetched, Window

FINE_TTL_S: Final = 600
"""How long a fine bucket outlives its last write."""
EXACT_FAR_EDGE_S: Final = 300
"""Windows up to this long read fine buckets at their far edge too (well inside FINE_TTL_S,
so a bucket written late or a clock a little apart cannot make one disappear)."""
BUCKET_TTL_MARGIN_S: Final = 3600
"""Minute and hour buckets live ``max_window_s`` plus this (which also covers the outward
minute and buckets written a little late)."""

_FIELDS: Final = ("input_tokens", "output_tokens", "cost_micros", "model_calls", "tool_calls")
_US: Final = 1_000_000
_MINUTE_US: Final = 60 * _US
_HOUR_US: Final = 3600 * _US
_LUA_EXACT: Final = 2**53

# KEYS: [all-time hash, then per execution: marker, fine, minute and hour bucket]
# ARGV: [marker ttl, fine ttl, minute and hour ttl, then per execution the five values in
# _FIELDS order]
# New executions are summed per fine bucket first, and each fine bucket's sums then roll up
# into its minute, its hour and all time: a batch (whose executions mostly share a second)
# costs one SET per execution and a few HINCRBYs in all. A value one execution alone brings
# stays the caller's string (exact); sums are Lua doubles, exact because the caller keeps
# every field's batch total below 2**53 (see _exact_batches).
_RECORD_LUA: Final = """
local fields = {'input_tokens', 'output_tokens', 'cost_micros', 'model_calls', 'tool_calls',
                'executions'}
local sums, order, ttl = {}, {}, {}
local function bucket(key, seconds)
  local held = sums[key]
  if held == nil then
    held = {}
    sums[key] = held
    order[#order + 1] = key
    ttl[key] = seconds
  end
  return held
end
local function add(held, f, value)
  local before = held[f]
  if before == nil then
    held[f] = value
  else
    held[f] = tonumber(before) + tonumber(value)
  end
end
-- New executions into their fine buckets; each fine bucket lies in one minute and one hour.
local parents = {}
local added = 0
for k = 2, #KEYS, 4 do
  if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[1]) then
    added = added + 1
    local fine = KEYS[k + 1]
    local held = sums[fine]
    if held == nil then
      held = bucket(fine, ARGV[2])
      parents[fine] = {KEYS[k + 2], KEYS[k + 3]}
    end
    local a = 4 + 5 * (k - 2) / 4
    for f = 1, 5 do
      local value = ARGV[a + f - 1]
      if value ~= '0' then
        add(held, f, value)
      end
    end
    add(held, 6, '1')
  end
end
-- Then each fine bucket's sums into its minute, its hour and all time.
local fines = #order
for i = 1, fines do
  local fine = order[i]
  local up = {bucket(parents[fine][1], ARGV[3]), bucket(parents[fine][2], ARGV[3]),
              bucket(KEYS[1], false)}
  for f, value in pairs(sums[fine]) do
    for _, held in ipairs(up) do
      add(held, f, value)
    end
  end
end
for _, key in ipairs(order) do
  for f, value in pairs(sums[key]) do
    if type(value) == 'number' then
      value = string.format('%.0f', value)
    end
    if value ~= '0' then
      redis.call('HINCRBY', key, fields[f], value)
    end
  end
  if ttl[key] then
    redis.call('EXPIRE', key, ttl[key])
  end
end
return added
"""

# KEYS: every hash any window reads, once. ARGV: [window count, then per window: the number
# of its keys followed by their indexes into KEYS]. Returns {1, per window the sums in _FIELDS
# order plus executions} while Lua's doubles add them exactly (below 2**53); past that,
# {0, every key's raw fields} for Python to add up. One script reads every window at one
# instant, so they agree with each other.
_FETCH_LUA: Final = """
local fields = {'input_tokens', 'output_tokens', 'cost_micros', 'model_calls', 'tool_calls',
                'executions'}
local read = {}
for i = 1, #KEYS do
  read[i] = redis.call('HMGET', KEYS[i], unpack(fields))
end
local out = {}
local p = 2
for w = 1, tonumber(ARGV[1]) do
  local total, size = {0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0}
  local count = tonumber(ARGV[p])
  for j = p + 1, p + count do
    local values = read[tonumber(ARGV[j])]
    for f = 1, 6 do
      local value = tonumber(values[f]) or 0
      total[f] = total[f] + value
      size[f] = size[f] + math.abs(value)
    end
  end
  for f = 1, 6 do
    if size[f] >= 9007199254740992 then
      return {0, read}
    end
  end
  p = p + count + 1
  out[w] = total
end
return {1, out}
"""


def redis_location(url: str) -> str:
    """Where ``url`` points (host:port or socket path), without credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return unquote(parts.path)
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{parts.hostname or 'localhost'}:{port}"


def _fine_divides_minute(bucket_s: int) -> bool:
    return bucket_s >= 1 and 60 % bucket_s == 0


class RedisUsageCounter:
    """Usage counters in Redis, shared by all replicas (see the module docstring for the key
    layout and the precision of each window).

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` or ``unix://``.
        key_prefix: Goes before every key (several meshes can share one Redis).
        bucket_s: Width of a fine bucket: the resolution of a window's edges. Divides 60.
        marker_ttl_s: How long an execution is remembered as counted.
        max_window_s: The longest window answered; minute and hour buckets are kept this long.
        timeout_s: Connect and read timeout of each call.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "tm",
        bucket_s: int = 1,
        marker_ttl_s: int = DEFAULT_MARKER_TTL_S,
        max_window_s: int = DEFAULT_MAX_WINDOW_S,
        timeout_s: float = 5.0,
    ) -> None:
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ConfigError(
                f"key_prefix must be non-empty and free of braces (they would move the "
                f"tenant's cluster hash tag), not {key_prefix!r}"
            )
        if not _fine_divides_minute(bucket_s):
            raise ConfigError(f"bucket_s must divide 60 (1, 2, 5, 10, ...), not {bucket_s}")
        if marker_ttl_s < 1:
            raise ConfigError(f"marker_ttl_s must be >= 1, not {marker_ttl_s}")
        if max_window_s < 60:
            raise ConfigError(f"max_window_s must be >= 60, not {max_window_s}")
        self._where = redis_location(url)
        self._prefix = key_prefix
        self._bucket_s = bucket_s
        self._marker_ttl_s = marker_ttl_s
        self._max_window_s = max_window_s
        self._minute_ttl_s = max_window_s + BUCKET_TTL_MARGIN_S
        try:
            # A short retry absorbs a dropped connection (a failover, a Redis restart); a
            # server that stays down fails the call within a second, and the caller (the
            # router's usage cache) treats that as stale and fails closed.
            self._redis: redis.Redis = redis.Redis.from_url(
                url,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL for the usage counters: {exc}") from exc
        self._record_script = self._redis.register_script(_RECORD_LUA)
        self._fetch_script = self._redis.register_script(_FETCH_LUA)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        key_prefix: str = "tm",
        bucket_s: int = 1,
        marker_ttl_s: int = DEFAULT_MARKER_TTL_S,
        max_window_s: int = DEFAULT_MAX_WINDOW_S,
        timeout_s: float = 5.0,
    ) -> RedisUsageCounter:
        """A counter on ``url`` that has answered a PING.

        Raises:
            ConfigError: a bad argument, or Redis does not answer.
        """
        counter = cls(
            url,
            key_prefix=key_prefix,
            bucket_s=bucket_s,
            marker_ttl_s=marker_ttl_s,
            max_window_s=max_window_s,
            timeout_s=timeout_s,
        )
        try:
            await counter.check()
        except BaseException:
            await counter.close()
            raise
        return counter

    async def check(self) -> None:
        """PING Redis.

        Raises:
            ConfigError: it does not answer, or refuses the credentials.
        """
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise ConfigError(f"cannot reach Redis at {self._where}: {exc}") from exc

    def _key(self, tenant: str, rest: str) -> str:
        return f"{self._prefix}:{{{tenant}}}:{rest}"

    async def record(self, tenant: str, executions: Sequence[CountedExecution]) -> int:
        check_tenant(tenant)
        added = 0
        for batch in _exact_batches(executions):
            added += await self._record_batch(tenant, batch)
        return added

    async def _record_batch(self, tenant: str, executions: Sequence[CountedExecution]) -> int:
        """One script call: each new execution's values into its buckets, atomically."""
        fine_us = self._bucket_s * _US
        keys: list[str] = [self._key(tenant, "u:all")]
        args: list[int] = [self._marker_ttl_s, FINE_TTL_S, self._minute_ttl_s]
        for execution in executions:
            at_us = epoch_us(execution.persisted_at, "persisted_at")
            keys += (
                self._key(tenant, f"seen:{execution.execution_id}:{execution.attempt}"),
                self._key(tenant, f"u:s:{at_us // fine_us * self._bucket_s}"),
                self._key(tenant, f"u:m:{at_us // _MINUTE_US}"),
                self._key(tenant, f"u:h:{at_us // _HOUR_US}"),
            )
            args += (
                execution.input_tokens,
                execution.output_tokens,
                execution.cost_micros,
                execution.model_calls,
                execution.tool_calls,
            )
        return int(await self._call(self._record_script, keys, args))

    async def counted(
        self, tenant: str, executions: Collection[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        check_tenant(tenant)
        asked = list(executions)
        if not asked:
            return set()
        keys = [self._key(tenant, f"seen:{e}:{a}") for e, a in asked]
        try:
            # One slot (the tenant's hash tag): one MGET, legal on a cluster too.
            values = await self._redis.mget(keys)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise TransportError(f"cannot reach Redis at {self._where}: {exc}") from exc
        return {e for e, value in zip(asked, values, strict=True) if value is not None}

    async def fetch(self, tenant: str, windows: Collection[Window], now: datetime) -> Fetched:
        check_tenant(tenant)
        end_us = epoch_us(now, "now")
        index: dict[str, int] = {}
        spans: list[tuple[Window, list[int]]] = []
        args: list[int] = [0]
        for window in windows:
            names = (
                [self._key(tenant, "u:all")]
                if window is None
                else self._window_keys(tenant, end_us, window_us(window, self._max_window_s))
            )
            held = [index.setdefault(name, len(index) + 1) for name in names]
            spans.append((window, held))
            args += (len(held), *held)
        if not spans:
            return Fetched({}, now)
        args[0] = len(spans)
        summed, found = await self._call(self._fetch_script, list(index), args)
        if summed:
            sums = [_sums(values) for values in found]
        else:  # too large for Lua's doubles: add the raw values up here
            read = [_sums(values) for values in found]
            sums = [_total(read[i - 1] for i in held) for _, held in spans]
        usage = {window: usage_of(s) for (window, _), s in zip(spans, sums, strict=True)}
        return Fetched(usage, now)

    def _window_keys(self, tenant: str, end_us: int, span_us: int) -> list[str]:
        """The bucket keys that cover ``[end - span, end)``, rounded outward (see the module
        docstring): whole hours, whole minutes at the edges, fine buckets at theirs."""
        b = self._bucket_s
        fine_us = b * _US
        # The fine buckets overlapping the window: the first one's start, the last one's end.
        lo = (end_us - span_us) // fine_us * b
        hi = ((end_us - 1) // fine_us + 1) * b
        if span_us > EXACT_FAR_EDGE_S * _US:
            lo = lo // 60 * 60  # fine buckets this old are gone: take its whole minute
        return [self._key(tenant, name) for name in _cover(lo, hi, (3600, 60, b))]

    async def _call(self, script: AsyncScript, keys: list[str], args: Sequence[int]) -> Any:
        """Run a script (EVALSHA, loading it again after NOSCRIPT), errors made clear."""
        try:
            return await script(keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise TransportError(f"cannot reach Redis at {self._where}: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()

    def __repr__(self) -> str:
        return f"RedisUsageCounter({self._where!r}, key_prefix={self._prefix!r})"


_BUCKET_NAMES: Final = {3600: "u:h:", 60: "u:m:"}


def _cover(lo: int, hi: int, sizes: tuple[int, ...]) -> list[str]:
    """Bucket names (largest buckets first) that tile ``[lo, hi)`` exactly; both ends are
    multiples of the smallest size, and each size divides the one before it."""
    size, smaller = sizes[0], sizes[1:]
    if not smaller:
        return [f"u:s:{start}" for start in range(lo, hi, size)]
    first, end = -(-lo // size) * size, hi // size * size
    if first >= end:
        return _cover(lo, hi, smaller)
    name = _BUCKET_NAMES[size]
    whole = [f"{name}{start // size}" for start in range(first, end, size)]
    return _cover(lo, first, smaller) + whole + _cover(end, hi, smaller)


def _exact_batches(
    executions: Sequence[CountedExecution],
) -> Iterable[Sequence[CountedExecution]]:
    """The batch whole when Lua can sum every field of it exactly (below 2**53), else one
    execution at a time (the script then passes each value on as the exact string)."""
    if not executions:
        return []
    for field in _FIELDS:
        if sum(abs(getattr(e, field)) for e in executions) >= _LUA_EXACT:
            return [[e] for e in executions]
    return [executions]


def _sums(values: Sequence[int | bytes | None]) -> Sums:
    a, b, c, d, e, f = (0 if v is None else int(v) for v in values)
    return (a, b, c, d, e, f)


def _total(each: Iterable[Sums]) -> Sums:
    a = b = c = d = e = f = 0
    for s in each:
        a, b, c, d, e, f = a + s[0], b + s[1], c + s[2], d + s[3], e + s[4], f + s[5]
    return (a, b, c, d, e, f)


__all__ = ["RedisUsageCounter", "redis_location"]
