"""The benchmark's defaults: how many lifetimes each concurrency runs."""

from __future__ import annotations

import pytest

from bench.__main__ import parse_args


def test_each_concurrency_runs_enough_lifetimes_for_its_percentiles() -> None:
    args = parse_args(["--concurrency", "1,100,1000"])
    # M = 1: 100 lifetimes of 20 steps are 1,900 gaps, so the p99 is not one stall's;
    # M > 1: three lifetimes per lane, at least 300.
    assert args.lifetimes_list == [100, 300, 3000]


def test_lifetimes_given_per_concurrency_are_kept() -> None:
    args = parse_args(["--concurrency", "1,1000", "--lifetimes", "7,2000"])
    assert args.lifetimes_list == [7, 2000]


def test_one_lifetimes_value_for_two_concurrencies_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--concurrency", "1,1000", "--lifetimes", "7"])
    assert "one value per --concurrency value" in capsys.readouterr().err
