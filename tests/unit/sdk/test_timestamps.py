"""The epoch arithmetic gives what protobuf's Timestamp conversions give."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from tickmesh.sdk import timestamps
from tickmesh.sdk.timestamps import (
    datetime_of,
    epoch_ns,
    epoch_parts,
    set_timestamp,
    timestamp_ns,
    timestamp_of,
)

MOMENTS = [
    datetime(2026, 12, 5, 9, 10, 11, 123456, tzinfo=UTC),
    datetime(2026, 12, 5, 9, 10, 11, 123456),  # naive: UTC
    datetime(2026, 12, 5, 11, 10, 11, 999999, tzinfo=timezone(timedelta(hours=2))),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),  # before the epoch
]


def from_datetime(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


@pytest.mark.parametrize("at", MOMENTS, ids=str)
def test_a_datetime_converts_as_from_datetime_converts_it(at: datetime) -> None:
    expected = from_datetime(at)
    assert epoch_parts(at) == (expected.seconds, expected.nanos)
    assert timestamp_of(at) == expected
    target = timestamp_pb2.Timestamp()
    set_timestamp(target, at)
    assert target == expected
    assert epoch_ns(at) == expected.ToNanoseconds()


@pytest.mark.parametrize("at", MOMENTS, ids=str)
def test_timestamp_ns_keeps_whole_microseconds_as_to_datetime_does(at: datetime) -> None:
    ts = from_datetime(at)
    ts.nanos += 789  # below a microsecond: a datetime cannot hold it
    assert timestamp_ns(ts) == epoch_ns(ts.ToDatetime(tzinfo=UTC))
    assert timestamp_ns(ts) == epoch_ns(at)


@pytest.mark.parametrize("at", MOMENTS, ids=str)
def test_datetime_of_is_what_to_datetime_gives(at: datetime) -> None:
    ts = from_datetime(at)
    ts.nanos += 789  # below a microsecond: dropped, as ToDatetime drops it
    assert datetime_of(ts) == ts.ToDatetime(tzinfo=UTC)
    assert epoch_ns(datetime_of(ts)) == epoch_ns(at)
    assert datetime_of(ts).tzinfo is UTC


@pytest.mark.parametrize("ns", [0, 1, 999_999_999, 1_000_000_000, 1_796_475_418_188_947_673, -1])
def test_timestamp_from_ns_is_what_from_nanoseconds_gives(ns: int) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromNanoseconds(ns)
    assert timestamps.timestamp_from_ns(ns) == expected


def test_now_is_the_current_time_to_the_nanosecond() -> None:
    before = time.time_ns()
    now = timestamps.now_timestamp()
    field = timestamp_pb2.Timestamp()
    timestamps.set_now(field)
    after = time.time_ns()
    for stamp in (now, field):
        assert 0 <= stamp.nanos < 1_000_000_000
        assert before <= stamp.ToNanoseconds() <= after
