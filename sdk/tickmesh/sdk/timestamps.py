"""Datetimes and protobuf Timestamps as integers since the epoch, without the calendar
work of ``Timestamp.FromDatetime`` / ``ToDatetime`` (on the router's step path they
cost more than the arithmetic they wrap).

Both directions keep whole microseconds, as datetimes hold them, so comparing a
converted Timestamp with a converted datetime gives what comparing datetimes would.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS = 1_000_000_000


def epoch_parts(at: datetime) -> tuple[int, int]:
    """``at`` as (seconds, nanos) since the epoch, as ``Timestamp.FromDatetime`` gives
    them (a naive ``at`` is UTC)."""
    delta = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)) - _EPOCH
    return delta.days * 86_400 + delta.seconds, delta.microseconds * 1000


def epoch_ns(at: datetime) -> int:
    """``at`` in nanoseconds since the epoch (a naive ``at`` is UTC)."""
    seconds, nanos = epoch_parts(at)
    return seconds * _NS + nanos


def timestamp_of(at: datetime) -> timestamp_pb2.Timestamp:
    """``at`` as a Timestamp, equal to one filled by ``FromDatetime``."""
    seconds, nanos = epoch_parts(at)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def set_timestamp(target: timestamp_pb2.Timestamp, at: datetime) -> None:
    """Fill ``target`` (a message field) with ``at``, as ``FromDatetime`` would."""
    target.seconds, target.nanos = epoch_parts(at)


def timestamp_ns(ts: timestamp_pb2.Timestamp) -> int:
    """``ts`` in nanoseconds since the epoch, cut to whole microseconds (what
    ``epoch_ns(ts.ToDatetime())`` gives)."""
    return ts.seconds * _NS + ts.nanos // 1000 * 1000


def datetime_of(ts: timestamp_pb2.Timestamp) -> datetime:
    """``ts`` as an aware UTC datetime, equal to ``ts.ToDatetime(tzinfo=UTC)`` (whole
    microseconds)."""
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def timestamp_from_ns(ns: int) -> timestamp_pb2.Timestamp:
    """A Timestamp of ``ns`` nanoseconds since the epoch (``FromNanoseconds``'s result)."""
    seconds, nanos = divmod(ns, _NS)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def now_timestamp() -> timestamp_pb2.Timestamp:
    """The current time as a Timestamp, to the nanosecond (``GetCurrentTime``'s result)."""
    return timestamp_from_ns(time.time_ns())


def set_now(target: timestamp_pb2.Timestamp) -> None:
    """Fill ``target`` (a message field) with the current time, as ``GetCurrentTime``."""
    target.seconds, target.nanos = divmod(time.time_ns(), _NS)
