"""The guardrail's snapshot refresh keeps its cadence when a put is lost.

A put sent into a dead link (a partition, or a connection that died with the put in it)
gets no reply; each round gives up on it after the refresh interval. The next round
must then start at once, not an interval later: with the default refresh fraction
(0.3), one lost put followed by an interval of sleep left the routers' snapshot at 90%
of its lease before the next put, and two in a row let it expire, so every step was
refused (``snapshot_expired``) though the service and its link were back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.guardrail.server import GuardrailService

LEASE_S = 4.0
FRACTION = 0.25
INTERVAL_S = LEASE_S * FRACTION
"""1 s: each round's put is also given up after this long."""


class LosingStore:
    """A policy store whose puts number ``lost`` get no reply."""

    def __init__(self, lost: set[int]) -> None:
        self.lost = lost
        self.calls: list[float] = []
        self.published: list[float] = []
        self.twice = asyncio.Event()
        """Set once two puts were published."""

    async def publish_snapshot(self, lease_s: float) -> None:
        loop = asyncio.get_running_loop()
        self.calls.append(loop.time())
        if len(self.calls) in self.lost:
            await asyncio.Event().wait()  # no reply: the round's timeout gives up on it
        self.published.append(loop.time())
        if len(self.published) == 2:
            self.twice.set()


async def test_two_lost_puts_in_a_row_still_renew_the_snapshot_within_its_lease() -> None:
    store = LosingStore(lost={2, 3})
    settings = GuardrailSettings(snapshot_lease_s=LEASE_S, refresh_fraction=FRACTION)
    service = GuardrailService(
        settings=settings,
        links=None,  # type: ignore[arg-type]  # the refresh loop uses only the stores
        grpc=None,  # type: ignore[arg-type]
        stores={"acme": store},  # type: ignore[dict-item]
    )
    refresher = asyncio.create_task(service._refresh())
    try:
        async with asyncio.timeout(4 * LEASE_S):
            await store.twice.wait()
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
    first, second = store.published[:2]
    starts = [round(b - a, 2) for a, b in itertools.pairwise(store.calls)]
    # The routers get the next snapshot before the last one's lease ends ...
    assert second - first < LEASE_S - 0.5, (second - first, starts)
    # ... because rounds keep an interval's cadence: a lost put (given up after an
    # interval) is followed by the next round at once.
    assert all(gap < INTERVAL_S + 0.3 for gap in starts), starts
