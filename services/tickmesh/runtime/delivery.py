"""What a JetStream ack subject says about a delivery, read without nats-py's ``Msg.metadata``.

``Msg.metadata`` also turns the delivery's timestamp into a datetime and builds three objects
per message; the pool reads the delivery count and stream sequence of every request it leases,
and metrics read the count of every message of a batch, so they parse only those tokens.
"""

from __future__ import annotations

from typing import NamedTuple

_V1_ACK_TOKENS = 9
"""$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>"""
_V2_ACK_TOKENS = 12
"""$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>
.<ts>.<pending>.<token>; the last token is optional (11 or more tokens)."""


class Delivery(NamedTuple):
    delivered: int
    """How often JetStream has delivered the message (1 on the first delivery)."""
    stream_seq: int
    """The message's sequence in its stream."""


def delivery_of(reply: str | None) -> Delivery | None:
    """The delivery that ``reply`` acks, or None when it is not a JetStream ack subject."""
    if not reply or not reply.startswith("$JS.ACK."):
        return None
    tokens = reply.split(".")
    if len(tokens) == _V1_ACK_TOKENS:
        delivered, stream_seq = tokens[4], tokens[5]
    elif len(tokens) >= _V2_ACK_TOKENS - 1:  # as nats-py reads it: extra tokens may follow
        delivered, stream_seq = tokens[6], tokens[7]
    else:
        return None
    if not (delivered.isdigit() and stream_seq.isdigit()):
        return None
    return Delivery(int(delivered), int(stream_seq))
