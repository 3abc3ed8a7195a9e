"""The bench's hop breakdown: the tap keys messages by the ids the services give them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bench.hops import BESIDE, SEGMENTS, Tap
from bench.records import Record
from tickmesh.executor_pool.pool import record_message_id


@dataclass
class Seen:
    """What the tap reads of a NATS message."""

    subject: str
    headers: dict[str, str] = field(default_factory=dict)


async def see(tap: Tap, subject: str, msg_id: str | None, at: float) -> None:
    """The tap sees a message at wall-clock time ``at``."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("bench.hops.time.time", lambda: at)
        await tap.on_msg(Seen(subject, headers))  # type: ignore[arg-type]


async def test_each_hop_of_a_step_is_the_gap_between_its_timestamps() -> None:
    tap = Tap("default")
    parent = Record("p", "lt", 2, "task", (), 0.0, 1.000, 1.010, 1.013)
    child = Record("c", "lt", 1, "plan", ("p",), 1.020, 1.030, 1.040, 1.050)
    await see(tap, "tm.default.exec.x", record_message_id("p"), 1.011)
    await see(tap, f"$KV.{tap.names.router_bucket}.lt", None, 1.024)
    await see(tap, "tm.default.work.x", "req:c", 1.027)

    segments = tap.segments([parent, child])

    # ms, in SEGMENTS order: the router builds the child's request from the record itself.
    expected = [1.0, 9.0, 4.0, 3.0, 3.0]
    for name, ms in zip(SEGMENTS, expected, strict=True):
        assert segments[name]["n"] == 1, name
        assert segments[name]["p50"] == pytest.approx(ms, abs=1e-6), name
    # The store's insert, beside that path: record published 1.011, inserted 1.013.
    assert segments[BESIDE]["p50"] == pytest.approx(2.0, abs=1e-6)
