"""The in-process usage ledger folds records lazily, with the figures of adding each at once."""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

import pytest

from tickmesh.router.usage import _Ledger
from tickmesh.runtime.policy import EMPTY_USAGE, Usage
from tickmesh.v1 import telemetry_pb2

T0 = 1_800_000_000.0


@dataclass
class _Window:
    start: int
    total: Usage


class EagerLedger:
    """The ledger's semantics, one record at a time (what the lazy fold must reproduce)."""

    def __init__(self, min_history_s: float = 3600.0) -> None:
        self.buckets: deque[tuple[int, Usage]] = deque()
        self.first = 0
        self.all = EMPTY_USAGE
        self.windows: dict[float, _Window] = {}
        self.min_history_s = min_history_s

    def track(self, windows: set[float | None], now: float) -> None:
        wanted = {w for w in windows if w is not None}
        for gone in set(self.windows) - wanted:
            del self.windows[gone]
        for window in wanted - set(self.windows):
            start = self.first + len(self.buckets)
            total = EMPTY_USAGE
            floor = math.floor(now - window)
            for second, usage in reversed(self.buckets):
                if second < floor:
                    break
                start -= 1
                total = total.plus(usage)
            self.windows[window] = _Window(start, total)
        self.prune(now)

    def add(self, at: float, usage: Usage) -> None:
        second = int(at)
        if self.buckets and second <= self.buckets[-1][0]:
            newest, held = self.buckets[-1]
            self.buckets[-1] = (newest, held.plus(usage))
        else:
            self.buckets.append((second, usage))
        self.all = self.all.plus(usage)
        for sliding in self.windows.values():
            sliding.total = sliding.total.plus(usage)

    def usage(self, window: float | None, now: float) -> Usage:
        if window is None:
            return self.all
        sliding = self.windows[window]
        floor = math.floor(now - window)
        end = self.first + len(self.buckets)
        while sliding.start < end:
            second, usage = self.buckets[sliding.start - self.first]
            if second >= floor:
                break
            counters = {
                name: getattr(sliding.total, name) - getattr(usage, name)
                for name in (
                    "executions",
                    "input_tokens",
                    "output_tokens",
                    "cost_micros",
                    "model_calls",
                    "tool_calls",
                )
            }
            custom = dict(sliding.total.custom)
            for name, value in usage.custom.items():
                custom[name] = custom.get(name, 0.0) - value
            sliding.total = Usage(
                **counters,
                iterations=sliding.total.iterations,
                wall_time_s=max(0.0, sliding.total.wall_time_s - usage.wall_time_s),
                fanout=sliding.total.fanout,
                depth=sliding.total.depth,
                max_values=sliding.total.max_values,
                custom=custom,
            )
            sliding.start += 1
        return sliding.total

    def prune(self, now: float) -> None:
        keep = max([self.min_history_s, *self.windows])
        floor = math.floor(now - keep)
        oldest = min((s.start for s in self.windows.values()), default=None)
        while self.buckets and self.buckets[0][0] < floor:
            if oldest is not None and self.first >= oldest:
                break
            self.buckets.popleft()
            self.first += 1


def _usage(rng: random.Random) -> Usage:
    telemetry = telemetry_pb2.Telemetry(
        input_tokens=rng.randrange(1000),
        output_tokens=rng.randrange(1000),
        cost_micros=rng.randrange(10_000),
        model_calls=rng.randrange(3),
        tool_calls=rng.randrange(3),
    )
    telemetry.run_time.FromNanoseconds(rng.randrange(10**9))
    if rng.random() < 0.3:
        telemetry.custom_metrics[rng.choice("abc")] = rng.random() * 10
    return Usage.of(telemetry, iteration=rng.randrange(20), fanout=rng.randrange(4))


def _same(a: Usage, b: Usage) -> None:
    assert a.executions == b.executions
    assert (a.input_tokens, a.output_tokens, a.cost_micros) == (
        b.input_tokens,
        b.output_tokens,
        b.cost_micros,
    )
    assert (a.model_calls, a.tool_calls, a.iterations, a.fanout, a.depth) == (
        b.model_calls,
        b.tool_calls,
        b.iterations,
        b.fanout,
        b.depth,
    )
    assert a.wall_time_s == b.wall_time_s  # the same additions in the same order
    assert dict(a.custom) == dict(b.custom)
    assert dict(a.max_values) == dict(b.max_values)


@pytest.mark.parametrize("seed", range(8))
def test_lazy_folding_gives_the_figures_of_adding_each_record_at_once(seed: int) -> None:
    rng = random.Random(seed)
    lazy, eager = _Ledger(min_history_s=30.0), EagerLedger(min_history_s=30.0)
    windows: set[float | None] = {None, 5.0}
    now = T0
    lazy.track(windows, now)
    eager.track(windows, now)
    for _ in range(3000):
        roll = rng.random()
        if roll < 0.75:
            # Mostly in order, some late (an older second joins the newest bucket).
            at = now - (rng.random() * 20 if rng.random() < 0.1 else 0.0)
            usage = _usage(rng)
            lazy.add(at, usage)
            eager.add(at, usage)
        elif roll < 0.85:
            now += rng.random() * 3
        elif roll < 0.95:
            window = rng.choice(sorted(windows, key=lambda w: -1 if w is None else w))
            _same(lazy.usage(window, now), eager.usage(window, now))
        elif roll < 0.98:
            lazy.expire(now)
            for window in eager.windows:
                eager.usage(window, now)
            eager.prune(now)
        else:
            windows = {None, *rng.sample([2.0, 5.0, 10.0, 60.0], rng.randrange(1, 3))}
            lazy.track(windows, now)
            eager.track(windows, now)
    for window in windows:
        _same(lazy.usage(window, now), eager.usage(window, now))


def test_a_ledger_nobody_reads_folds_its_records_before_they_pile_up() -> None:
    ledger = _Ledger()
    usage = Usage.of(telemetry_pb2.Telemetry(input_tokens=1))
    for i in range(10_000):
        ledger.add(T0 + i / 1000, usage)
        assert len(ledger._pending) < 4096
    assert ledger.usage(None, T0 + 10).input_tokens == 10_000
