"""A watch of a lifetime (WatchLifetime): its history from the state service's store,
then its events live from core NATS.

The lifetime's subject carries each decision's events as it happens and keeps nothing;
the state service stores them a few milliseconds to a few hundred behind the router. So a
watch subscribes first, then reads the store from where the caller left off up to the
router's last sequence, then serves live messages (held in the subscription meanwhile).
A live message that starts past the last event served (the store's read ended short of
it, or a message was dropped) has the events between read from the store first, waiting
for the store to hold them. A quiet spell while the lifetime runs reads the router's
state, and the store when the router has decided past what was served: a dropped live
message, the terminal one included, is not lost, and a watch of a parked lifetime does not
read the store every spell.

A watch holds at most ``LIVE_HELD_BYTES`` of live messages its caller has not taken (one
that stops reading is held back by gRPC's flow control, while the lifetime goes on): past
that it drops them and reads those events from the store once its caller catches up."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tickmesh.runtime.consumer import message_type
from tickmesh.runtime.errors import StatusError
from tickmesh.runtime.nats_wire import deliver_inline
from tickmesh.sdk import ValidationError, decode_envelope, events_of
from tickmesh.sdk.errors import StatusCode
from tickmesh.v1 import lifetime_pb2

from . import core
from .replay import PAGE, HistorySource

logger = logging.getLogger(__name__)

TRAILING_EVENTS_WAIT_S = 2.0
"""After a lifetime ends, how long a watch waits for steps still in flight to report."""
QUIET_S = 30.0
"""While a lifetime runs, how long without a live message before a watch reads the
router's state, and the store if the router is ahead (a message dropped by a slow
subscription is there)."""
STORE_POLL_FIRST_S = 0.01
STORE_POLL_MAX_S = 0.5
"""Waiting for the store to hold events it lags on: the first and the longest pause."""
STORE_WAIT_WARN_S = 10.0
"""How often a watch waiting on the store says so."""
STORE_WAIT_MAX_S = 60.0
"""How long a watch waits for the store to hold events it lags on before it ends with
UNAVAILABLE (the state service stopped storing: a watch must not hang on it)."""
LIVE_HELD_BYTES = 1024 * 1024
"""The live messages one watch holds for its caller (while the store is read, or while the
caller does not read), in bytes of their data: about one NATS message at its largest, which
is always taken when nothing else is held. Past it they are dropped and their events read
from the store instead (without a state service the watch ends RESOURCE_EXHAUSTED): a
client that stops reading costs the router this much, not every event the lifetime makes."""


@dataclass(frozen=True)
class Watched:
    """The lifetime a watch follows, as the router holds it when the watch starts."""

    tenant: str
    lifetime_id: str
    subject: str
    """The lifetime's events subject."""
    last_sequence: int
    before_first: int
    """The sequence before the lifetime's first event: a fork's go on from its fork point."""
    ended: bool = False
    """Whether it had ended: a watch resumed after the terminal event waits only for late
    step results."""


async def follow(
    nc: NatsClient,
    watched: Watched,
    *,
    after_sequence: int,
    history: HistorySource | None,
    complete: Callable[[int], Awaitable[bool]],
    position: Callable[[], Awaitable[tuple[int, bool]]] | None = None,
) -> AsyncGenerator[lifetime_pb2.LifetimeEvent, None]:
    """A lifetime's events after ``after_sequence``, in order, each once: from the state
    service (``history``) those up to the router's last sequence, then live ones, until
    the lifetime has ended and ``complete(last sequence)`` says its history is whole (or,
    once ended, nothing more arrives for ``TRAILING_EVENTS_WAIT_S``). Out-of-band events
    (sequence 0, e.g. dead letters) are always passed on. Without ``history`` only live
    events are served, and asking for past ones is FAILED_PRECONDITION.

    ``position`` reads the lifetime's last sequence and whether it has ended once the
    subscription is made: the events published between ``watched``'s read and the
    subscription are then read from the store too (a lifetime that ended in between
    would otherwise leave the watch waiting for a live message that already went)."""
    after = max(after_sequence, watched.before_first)  # a fork's events follow its fork point
    ended = watched.ended
    if history is None and after < watched.last_sequence:
        raise StatusError(
            StatusCode.FAILED_PRECONDITION,
            "a watch of past events needs the state service: set TICKMESH_ROUTER_STATE_TARGET",
        )

    def fresh(events: Iterable[lifetime_pb2.LifetimeEvent]) -> list[lifetime_pb2.LifetimeEvent]:
        nonlocal after, ended
        served: list[lifetime_pb2.LifetimeEvent] = []
        for event in events:
            # Checked for events served before too, so a watch resumed after the end ends.
            ended = ended or ends(event)
            if event.sequence == 0 or event.sequence > after:
                served.append(event)
                after = max(after, event.sequence)
        return served

    def store(until: int) -> AsyncIterator[list[lifetime_pb2.LifetimeEvent]]:
        assert history is not None
        return _stored_pages(history, watched, after, until=until)

    live = _Live(LIVE_HELD_BYTES)

    async def receive(msg: Msg) -> None:
        live.put(msg)

    # Taken off the subscription as they come (in the client's read loop where it can):
    # nats-py's own overflow reports every message it drops to the connection's error
    # callback, which logs it.
    sub = await nc.subscribe(watched.subject, cb=receive)
    deliver_inline(nc, sub, live.put)
    try:
        # Subscribed at the server before the store is read: no event falls between.
        await nc.flush()
        last = watched.last_sequence
        if position is not None:
            now_last, now_ended = await position()
            last, ended = max(last, now_last), ended or now_ended
        if history is not None:
            async for page in store(until=last):
                for event in fresh(page):
                    yield event
        if ended and await complete(after):
            return
        while True:
            # Once ended, only late step results can follow; while running, a quiet spell
            # may be a dropped live message, which the store has (if there is one).
            wait = TRAILING_EVENTS_WAIT_S if ended else None if history is None else QUIET_S
            try:
                async with asyncio.timeout(wait):
                    msg = await live.take()
            except TimeoutError:
                if ended:
                    return
                msg = None
            if msg is None:  # a quiet spell, or live messages were dropped
                if history is None:
                    raise StatusError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"this watch fell more than {LIVE_HELD_BYTES:,} bytes of events "
                        "behind the lifetime, and without a state service they cannot be "
                        "read again: read faster, or set TICKMESH_ROUTER_STATE_TARGET",
                    )
                until = await _quiet_until(position, after)
                if until is None:
                    continue  # the router decided nothing since: no live message was lost
                async for page in store(until=until):
                    for event in fresh(page):
                        yield event
                if ended and await complete(after):
                    return
                continue
            try:
                events = events_of(decode_envelope(msg.data, expected_kind=message_type(msg)))
                if not events:
                    raise ValidationError("not a lifetime event")
            except ValidationError:
                logger.error("unreadable event on %s", watched.subject)
                continue
            first = next((e.sequence for e in events if e.sequence), 0)
            if history is not None and first > after + 1:
                async for page in store(until=first - 1):
                    for event in fresh(page):
                        yield event
            for event in fresh(events):
                yield event
            if ended and await complete(after):
                return
    finally:
        await sub.unsubscribe()


class _Live:
    """The live messages a watch holds until it takes them: at most ``limit`` bytes of
    data, or one message; what would pass that is dropped, and said so once the rest
    is taken."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held: deque[Msg] = deque()
        self._bytes = 0
        self._dropped = False
        self._ready = asyncio.Event()

    def put(self, msg: Msg) -> None:
        size = len(msg.data)
        if self._held and self._bytes + size > self._limit:
            self._dropped = True
        else:
            self._held.append(msg)
            self._bytes += size
        self._ready.set()

    async def take(self) -> Msg | None:
        """The next message held, in order, waiting for one; None when messages were
        dropped since the last None and none is held now (their events are in the store)."""
        while not self._held:
            if self._dropped:
                self._dropped = False
                return None
            self._ready.clear()
            await self._ready.wait()
        msg = self._held.popleft()
        self._bytes -= len(msg.data)
        return msg


async def _quiet_until(
    position: Callable[[], Awaitable[tuple[int, bool]]] | None, after: int
) -> int | None:
    """After a quiet spell, the sequence up to which to read the store: the router's last
    one when it is past ``after`` (a live message was lost), None when it is not (nothing
    to read: a watch of a parked lifetime costs the router's state, not a store read).
    Without ``position``, or when it cannot be read, whatever the store holds."""
    if position is None:
        return after
    try:
        last, ended = await position()
    except Exception as exc:
        logger.warning("watch: the lifetime's position could not be read (%s)", exc)
        return after
    if last > after:
        return last
    return after if ended else None


def ends(event: lifetime_pb2.LifetimeEvent) -> bool:
    """Whether ``event`` says its lifetime has ended."""
    return (
        event.kind == lifetime_pb2.LIFETIME_EVENT_KIND_STATE_CHANGED
        and event.state in core.TERMINAL
    )


async def _stored_pages(
    history: HistorySource, watched: Watched, after: int, *, until: int
) -> AsyncIterator[list[lifetime_pb2.LifetimeEvent]]:
    """Pages of the stored events after ``after``, waiting until the store holds those up
    to ``until`` (it stores them behind the router)."""
    pause = STORE_POLL_FIRST_S
    clock = asyncio.get_running_loop().time
    since = warned = clock()
    while True:
        page = await history.events(
            watched.tenant, watched.lifetime_id, after_sequence=after, limit=PAGE
        )
        if page:
            yield page
            after = page[-1].sequence
        if len(page) == PAGE:
            continue
        if after >= until:
            return
        if clock() - since >= STORE_WAIT_MAX_S:
            raise StatusError(
                StatusCode.UNAVAILABLE,
                f"the state service has not stored events {after + 1} to {until} of lifetime "
                f"{watched.lifetime_id} in {STORE_WAIT_MAX_S:.0f} s; watch again later",
            )
        if clock() - warned >= STORE_WAIT_WARN_S:
            warned = clock()
            logger.warning(
                "watch of %s waits for the state service to store events %d to %d (%.0f s)",
                watched.lifetime_id,
                after + 1,
                until,
                warned - since,
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, STORE_POLL_MAX_S)
