"""A watch of a lifetime (WatchLifetime): its events from the event stream, live, and
from the state service the part of its history the stream no longer holds.

The event stream keeps a lifetime's events for its max age (7 days) and, in a tenant
account, up to its byte limit; a lifetime that has run (or waited for a signal) longer, or
that has left the router's bucket, has its older events only in the state service's store.
A watch reads those first, then follows the stream."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from nats import errors as nats_errors
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError as StreamMessageNotFound

from tickmesh.runtime.consumer import message_type
from tickmesh.runtime.subjects import HDR_TYPE
from tickmesh.sdk import BODY_KINDS, ValidationError, decode_envelope, events_of
from tickmesh.v1 import lifetime_pb2

from . import core
from .replay import PAGE, HistorySource

logger = logging.getLogger(__name__)

TRAILING_EVENTS_WAIT_S = 2.0
"""After a lifetime ends, how long a watch waits for steps still in flight to report."""
OUT_OF_BAND_LOOKAHEAD = 16
"""How many messages of out-of-band events (sequence 0: dead letters) the search for a
lifetime's oldest streamed event passes before it gives up and reads the store."""


async def oldest_streamed(js: JetStreamContext, stream: str, subject: str) -> int | None:
    """The sequence of the oldest lifetime event ``stream`` still holds on ``subject``;
    None if it holds none (or only out-of-band events among its first messages)."""
    after = 0
    for _ in range(OUT_OF_BAND_LOOKAHEAD):
        try:
            msg = await js.get_msg(stream, seq=after + 1, subject=subject, next=True)
        except StreamMessageNotFound:
            return None
        after = msg.seq or after + 1
        kind = (msg.headers or {}).get(HDR_TYPE)
        try:
            if kind not in BODY_KINDS:
                raise ValidationError(f"{HDR_TYPE} header {kind!r}")
            events = events_of(decode_envelope(msg.data or b"", expected_kind=kind))
        except ValidationError as exc:
            logger.error("unreadable event in %s at %d: %s", stream, after, exc)
            continue
        numbered = [e.sequence for e in events if e.sequence]
        if numbered:
            return min(numbered)
    return None


async def stored_events(
    history: HistorySource,
    tenant: str,
    lifetime_id: str,
    *,
    after_sequence: int,
    before_sequence: int | None = None,
) -> AsyncIterator[lifetime_pb2.LifetimeEvent]:
    """A lifetime's stored events after ``after_sequence`` (and before
    ``before_sequence``, if given), in order, a page at a time."""
    after = after_sequence
    while True:
        page = await history.events(tenant, lifetime_id, after_sequence=after, limit=PAGE)
        for event in page:
            if before_sequence is not None and event.sequence >= before_sequence:
                return
            yield event
            after = event.sequence
        if len(page) < PAGE:
            return


@dataclass(frozen=True)
class Watched:
    """The lifetime a watch follows, as the router holds it when the watch starts."""

    tenant: str
    lifetime_id: str
    stream: str
    """The tenant's event stream."""
    subject: str
    """The lifetime's subject on it."""
    last_sequence: int
    before_first: int
    """The sequence before the lifetime's first event: a fork's go on from its fork point."""


async def follow(
    js: JetStreamContext,
    watched: Watched,
    *,
    after_sequence: int,
    history: HistorySource | None,
    complete: Callable[[int], Awaitable[bool]],
) -> AsyncGenerator[lifetime_pb2.LifetimeEvent, None]:
    """A lifetime's events after ``after_sequence``, in order, each once: from the state
    service (``history``) what the stream no longer holds, then the stream's, live, until
    the lifetime has ended and ``complete(last sequence)`` says its history is whole (or,
    once ended, nothing more arrives for ``TRAILING_EVENTS_WAIT_S``). Out-of-band events
    (sequence 0, e.g. dead letters) are always passed on."""
    after = after_sequence
    ended = False
    sub = await js.subscribe(
        watched.subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        if history is not None:
            # The stream keeps events for its max age (and, in a tenant account, up to its
            # byte limit); what it no longer holds of the history asked for comes first.
            oldest = await oldest_streamed(js, watched.stream, watched.subject)
            missing = (
                watched.last_sequence > after
                if oldest is None
                else oldest > max(after, watched.before_first) + 1
            )
            if missing:
                async for event in _stored(history, watched, after, oldest):
                    yield event
                    after = event.sequence
                    ended = ended or ends(event)
                if ended and after and await complete(after):
                    return
        while True:
            try:
                # Once the lifetime has ended, only late step results can follow.
                msg = await sub.next_msg(timeout=TRAILING_EVENTS_WAIT_S if ended else None)
            except nats_errors.TimeoutError:
                return
            try:
                events = events_of(decode_envelope(msg.data, expected_kind=message_type(msg)))
                if not events:
                    raise ValidationError("not a lifetime event")
            except ValidationError:
                logger.error("unreadable event on %s", watched.subject)
                continue
            first = next((e.sequence for e in events if e.sequence), 0)
            if history is not None and first > max(after, watched.before_first) + 1:
                # Dropped from the stream between the look-up above and this delivery (a
                # stream at its byte limit drops its oldest events as new ones come).
                async for event in _stored(history, watched, after, first):
                    yield event
                    after = event.sequence
                    ended = ended or ends(event)
            for event in events:
                if event.sequence == 0 or event.sequence > after:
                    yield event
                    after = max(after, event.sequence)
                ended = ended or ends(event)
            last = events[-1].sequence
            # The check runs for skipped events too, so a watch resumed after the end ends
            # as soon as the history is complete.
            if ended and last and await complete(last):
                return
    finally:
        await sub.unsubscribe()


def ends(event: lifetime_pb2.LifetimeEvent) -> bool:
    """Whether ``event`` says its lifetime has ended."""
    return (
        event.kind == lifetime_pb2.LIFETIME_EVENT_KIND_STATE_CHANGED
        and event.state in core.TERMINAL
    )


def _stored(
    history: HistorySource, watched: Watched, after: int, before: int | None
) -> AsyncIterator[lifetime_pb2.LifetimeEvent]:
    return stored_events(
        history,
        watched.tenant,
        watched.lifetime_id,
        after_sequence=after,
        before_sequence=before,
    )
