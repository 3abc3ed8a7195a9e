"""WireParser reads what nats-py's parser reads, however the bytes are split, and a
subscription delivered inline gets what its callback would have, in the same order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from tickmesh.runtime import nats_wire

INLINE_SID, QUEUED_SID, GONE_SID = 1, 2, 3

PLAIN = b"NATS/1.0\r\nNats-Msg-Id: exec:1:1\r\nTickmesh-Type: task_execution\r\n\r\n"
STATUS_408 = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\n\r\n"
STATUS_503 = b"NATS/1.0 503\r\n\r\n"
HEARTBEAT = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\n\r\n"
EMPTY_BLOCK = b"NATS/1.0\r\n\r\n"


def msg_frame(sid: int, subject: bytes, reply: bytes, data: bytes) -> bytes:
    middle = b" " + reply if reply else b""
    return b"MSG %s %d%s %d\r\n%s\r\n" % (subject, sid, middle, len(data), data)


def hmsg_frame(sid: int, subject: bytes, reply: bytes, headers: bytes, data: bytes) -> bytes:
    middle = b" " + reply if reply else b""
    size = len(headers) + len(data)
    return b"HMSG %s %d%s %d %d\r\n%s%s\r\n" % (
        subject,
        sid,
        middle,
        len(headers),
        size,
        headers,
        data,
    )


OTHER_OPS = [
    b"PING\r\n",
    b"PONG\r\n",
    b"+OK\r\n",
    b'INFO {"server_id":"x","max_payload":1048576}\r\n',
    b"-ERR 'Permissions Violation for Subscription to \"x\"'\r\n",
]

frames = st.one_of(
    st.builds(
        msg_frame,
        st.sampled_from([INLINE_SID, QUEUED_SID, GONE_SID]),
        st.sampled_from([b"a.b", b"tm.t.exec.l1"]),
        st.sampled_from([b"", b"_INBOX.x.1", b"$JS.ACK.S.c.1.2.3.4.0"]),
        st.binary(max_size=40),
    ),
    st.builds(
        hmsg_frame,
        st.sampled_from([INLINE_SID, QUEUED_SID, GONE_SID]),
        st.sampled_from([b"a.b", b"tm.t.evt.l1"]),
        st.sampled_from([b"", b"_INBOX.x.2"]),
        st.sampled_from([PLAIN, STATUS_408, STATUS_503, HEARTBEAT, EMPTY_BLOCK]),
        st.binary(max_size=40),
    ),
    st.sampled_from(OTHER_OPS),
)


@dataclass
class Seen:
    """What a client was given by its parser, in order."""

    events: list[tuple[Any, ...]] = field(default_factory=list)


def client(seen: Seen) -> NatsClient:
    """A client that is not connected: what its parser hands over is recorded."""
    nc = NatsClient()

    async def op(name: str, *args: Any) -> None:
        seen.events.append((name, *args))

    nc._process_ping = lambda: op("ping")  # type: ignore[method-assign]
    nc._process_pong = lambda: op("pong")  # type: ignore[method-assign]
    nc._process_info = lambda info, *_: op("info", info)  # type: ignore[method-assign]
    nc._process_err = lambda err_msg: op("err", err_msg)  # type: ignore[method-assign]
    return nc


def subscribe(nc: NatsClient, sid: int, seen: Seen) -> Subscription:
    async def cb(msg: Msg) -> None:
        seen.events.append(described(msg))

    sub = Subscription(nc, sid, f"sub{sid}", cb=cb)
    nc._subs[sid] = sub
    return sub


def described(msg: Msg) -> tuple[Any, ...]:
    return ("msg", msg._sid, msg.subject, msg.reply, msg.data, msg.headers)


async def drain(sub: Subscription) -> None:
    """What the subscription's task would do with its queue."""
    assert sub._cb is not None
    while not sub._pending_queue.empty():
        await sub._cb(sub._pending_queue.get_nowait())


async def read(stream: bytes, cuts: list[int], *, wire: bool) -> list[tuple[Any, ...]]:
    seen = Seen()
    nc = client(seen)
    subs = [subscribe(nc, sid, seen) for sid in (INLINE_SID, QUEUED_SID)]
    if wire:
        nats_wire.install(nc)
        assert nats_wire.deliver_inline(nc, subs[0], lambda msg: seen.events.append(described(msg)))
    parser: Parser = nc._ps
    if not wire:
        nc._parse_header_lines = nats_wire.parse_header_lines  # type: ignore[method-assign]
    start = 0
    for end in [*sorted(cuts), len(stream)]:
        await parser.parse(stream[start:end])
        start = end
        # Queued messages reach their callback between reads, as the subscription's
        # task would take them; a message delivered inline is seen before the next read.
        if not wire:
            await drain(subs[0])
        await drain(subs[1])
    return seen.events


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, min_size=1, max_size=12), st.data())
def test_the_same_messages_and_operations_in_the_same_order_however_split(
    chunks: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(chunks)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    expected = asyncio.run(read(stream, cuts, wire=False))
    got = asyncio.run(read(stream, cuts, wire=True))
    # Each subscription's messages, and the other operations, in their order (a queued
    # message reaches its callback later than an operation read after it; inline, not).
    assert by_channel(got) == by_channel(expected)


def by_channel(events: list[tuple[Any, ...]]) -> dict[object, list[tuple[Any, ...]]]:
    channels: dict[object, list[tuple[Any, ...]]] = {}
    for event in events:
        channels.setdefault(event[1] if event[0] == "msg" else "ops", []).append(event)
    return channels


async def test_an_inline_subscription_gets_statuses_as_its_callback_would() -> None:
    stream = (
        hmsg_frame(INLINE_SID, b"i", b"", PLAIN, b"one")
        + hmsg_frame(INLINE_SID, b"i", b"", STATUS_408, b"")
        + msg_frame(INLINE_SID, b"i", b"r", b"two")
    )
    events = await read(stream, [], wire=True)
    assert [(e[4], e[5]) for e in events] == [
        (b"one", {"Nats-Msg-Id": "exec:1:1", "Tickmesh-Type": "task_execution"}),
        (
            b"",
            {"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "5"},
        ),
        (b"two", None),
    ]


async def test_a_message_delivered_inline_counts_in_the_client_and_subscription() -> None:
    seen = Seen()
    nc = client(seen)
    sub = subscribe(nc, INLINE_SID, seen)
    nats_wire.install(nc)
    assert nats_wire.deliver_inline(nc, sub, lambda msg: seen.events.append(described(msg)))
    await nc._ps.parse(msg_frame(INLINE_SID, b"s", b"", b"12345") * 2)
    assert (nc.stats["in_msgs"], nc.stats["in_bytes"], sub.delivered) == (2, 10, 2)
    assert sub._pending_queue.empty()  # nothing went the queued way too


async def test_after_an_unsubscribe_what_still_arrives_is_dropped() -> None:
    seen = Seen()
    nc = client(seen)
    sub = subscribe(nc, INLINE_SID, seen)
    nats_wire.install(nc)
    nats_wire.deliver_inline(nc, sub, lambda msg: seen.events.append(described(msg)))
    del nc._subs[INLINE_SID]  # what Subscription.unsubscribe does to the client
    await nc._ps.parse(msg_frame(INLINE_SID, b"s", b"", b"late"))
    assert seen.events == []
    assert isinstance(nc._ps, nats_wire.WireParser)
    assert INLINE_SID not in nc._ps.inline


async def test_a_failing_handler_is_reported_and_reading_goes_on() -> None:
    seen = Seen()
    nc = client(seen)
    sub = subscribe(nc, INLINE_SID, seen)
    reported: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        reported.append(exc)

    nc._error_cb = error_cb
    nats_wire.install(nc)

    def handler(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("handler failed")
        seen.events.append(described(msg))

    nats_wire.deliver_inline(nc, sub, handler)
    await nc._ps.parse(
        msg_frame(INLINE_SID, b"s", b"", b"bad") + msg_frame(INLINE_SID, b"s", b"", b"good")
    )
    assert [str(e) for e in reported] == ["handler failed"]
    assert [e[4] for e in seen.events] == [b"good"]


@pytest.mark.parametrize(
    "line",
    [b"MSG a.b\r\n", b"MSG a.b x 3\r\nabc\r\n", b"HMSG a.b 1 r 2 3 4 5\r\n", b"NOPE\r\n"],
)
async def test_a_malformed_line_is_a_protocol_error_as_in_nats_py(line: bytes) -> None:
    for install in (False, True):
        nc = client(Seen())
        if install:
            nats_wire.install(nc)
        with pytest.raises(ProtocolError):
            await nc._ps.parse(line)


async def test_only_a_client_with_the_wire_parser_delivers_inline() -> None:
    seen = Seen()
    nc = client(seen)
    sub = subscribe(nc, INLINE_SID, seen)
    assert not nats_wire.deliver_inline(nc, sub, lambda msg: None)
    nats_wire.install(nc)
    sub._max_msgs = 1  # unsubscribes itself after a count: nats-py keeps it
    assert not nats_wire.deliver_inline(nc, sub, lambda msg: None)


async def test_registering_forgets_the_subscriptions_gone_since() -> None:
    seen = Seen()
    nc = client(seen)
    old, new = subscribe(nc, INLINE_SID, seen), subscribe(nc, QUEUED_SID, seen)
    nats_wire.install(nc)
    assert isinstance(nc._ps, nats_wire.WireParser)
    nats_wire.deliver_inline(nc, old, lambda msg: None)
    del nc._subs[INLINE_SID]  # unsubscribed, and nothing came for it since
    nats_wire.deliver_inline(nc, new, lambda msg: None)
    assert set(nc._ps.inline) == {QUEUED_SID}
