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
