"""What a watch replays from the state service: the part of a lifetime's history that the
event stream no longer holds.

The event stream keeps a lifetime's events for its max age (7 days); a lifetime that has
run (or waited for a signal) longer, or that has left the router's bucket, has older events
only in the state service's store. A watch reads those first, then follows the stream."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as StreamMessageNotFound

from tickmesh.runtime.subjects import HDR_TYPE
from tickmesh.sdk import BODY_KINDS, ValidationError, decode_envelope, events_of
from tickmesh.v1 import lifetime_pb2

from .replay import PAGE, HistorySource

logger = logging.getLogger(__name__)

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
