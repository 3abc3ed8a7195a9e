"""The bench's throughput with all M lifetimes in flight: the load generator marks when
every lane had a lifetime running, and the steps finished meanwhile are counted."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

from bench.load import LoadGenerator
from bench.records import Record, steps_per_s_within
from tickmesh.v1 import graph_pb2


def record(execution_id: str, finished_at: float, attempt: int = 1) -> Record:
    return Record(execution_id, "lt", attempt, "task", (), 0.0, finished_at - 0.001, finished_at, 0)


def test_steps_within_the_window_are_counted_once_per_execution() -> None:
    records = [
        record("before", 9.99),
        record("a", 10.0),
        record("b", 10.5),
        record("b", 10.6, attempt=2),  # a retried step is one step
        record("c", 11.99),
        record("at-end", 12.0),
    ]
    assert steps_per_s_within(records, (10.0, 12.0)) == 3 / 2.0
    assert steps_per_s_within(records, None) is None
    assert steps_per_s_within(records, (12.0, 12.0)) is None


@dataclass
class Handle:
    id: str


class Client:
    """Starts lifetimes at once, numbered."""

    def __init__(self) -> None:
        self._ids = itertools.count()

    async def start_lifetime(self, graph_id: str, value: Any, *, version: int) -> Handle:
        await asyncio.sleep(0)
        return Handle(f"lt-{next(self._ids)}")


class Ends:
    """Every lifetime ends ``after`` seconds after it is waited for."""

    def __init__(self, after: float) -> None:
        self._after = after

    async def wait(self, lifetime_id: str, limit_s: float) -> str:
        await asyncio.sleep(self._after)
        return "completed"

    def error_of(self, lifetime_id: str) -> str:
        return ""


def generator(lifetime_s: float) -> LoadGenerator:
    load = LoadGenerator("router:0", "nats://nowhere", "default")
    load.client = Client()  # type: ignore[assignment]
    load.graph = graph_pb2.AgentGraph(id="g", version=1)
    load.watcher = Ends(lifetime_s)  # type: ignore[assignment]
    return load


async def test_the_window_runs_from_all_lanes_busy_to_the_first_lane_out_of_work() -> None:
    run = await generator(0.05).run(concurrency=3, lifetimes=9, rounds=1)

    assert run.states["completed"] == 9
    window = run.full_window()
    assert window is not None
    start, end = window
    # Three lifetimes of 50 ms one after another per lane: all three lanes are busy
    # from the first starts until the first lane finds nothing left, about 150 ms on.
    assert 0.12 <= end - start <= 0.3, end - start


async def test_one_lifetime_per_lane_gives_the_window_of_their_common_run() -> None:
    # Fewer lifetimes than M: one lane each, all running at once until the first ends.
    run = await generator(0.05).run(concurrency=5, lifetimes=2, rounds=1)
    window = run.full_window()
    assert window is not None
    assert 0.03 <= window[1] - window[0] <= 0.2


async def test_a_phase_without_lifetimes_has_no_window() -> None:
    run = await generator(0.05).run(concurrency=2, lifetimes=0, rounds=1)
    assert run.full_window() is None


class SlowStarts(Client):
    """Each StartLifetime call takes ``took`` seconds."""

    def __init__(self, took: float) -> None:
        super().__init__()
        self._took = took

    async def start_lifetime(self, graph_id: str, value: Any, *, version: int) -> Handle:
        await asyncio.sleep(self._took)
        return await super().start_lifetime(graph_id, value, version=version)


async def test_lanes_restarting_after_every_lane_started_keep_the_window_open() -> None:
    # Starts queue one at a time and take 20 ms; lifetimes take 50 ms. The first lane's
    # lifetime ends before the fourth lane's first one has started, so four lifetimes are
    # never in flight at the same instant — yet from the fourth lane's first start on,
    # every lane is busy (running or starting its next) until the first runs out of work.
    load = generator(0.05)
    load.client = SlowStarts(0.02)  # type: ignore[assignment]
    load.max_starting = 1
    run = await load.run(concurrency=4, lifetimes=12, rounds=1)

    assert run.states["completed"] == 12
    window = run.full_window()
    assert window is not None, "every lane started and kept busy, yet no window"
    assert window[1] - window[0] >= 0.05, window
