"""The bench's machine speed probe."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bench import machine


def test_the_speed_probe_is_the_median_run_per_piece_of_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three runs of two pieces each, taking 3, 1 and 2 seconds: the median run, per piece.
    ticks: Iterator[float] = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])
    monkeypatch.setattr(time, "thread_time", lambda: next(ticks))

    assert machine.speed_probe(ops=2, runs=3) == pytest.approx(1e6)


def test_the_speed_probe_times_real_work() -> None:
    probe = machine.speed_probe(ops=20, runs=3)

    assert 0.5 < probe < 50_000
