"""Reading the NATS protocol with less Python per message, for the services' clients.

nats-py reads each delivery with two regular expressions, two coroutines (the message,
then its headers), and then hands it to the subscription's task through a queue, one
more task switch before anyone sees it. A step's messages cross that path about eight
times (the record, the events and PubAcks in the router, the state and the pool), so
:class:`WireParser` takes its place in every client :func:`tickmesh.runtime.nats.connect`
makes:

* ``MSG`` and ``HMSG`` control lines are split, not matched; every other operation is
  handled as nats-py handles it.
* A subscription registered with :func:`deliver_inline` gets its messages from the read
  loop itself, through a plain function, in the order they arrived, status messages
  included. Every other subscription is served by nats-py as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError
from nats.protocol import parser as nats_parser

logger = logging.getLogger(__name__)

InlineHandler = Callable[[Msg], None]
"""Takes one delivered message, in the read loop: it must not block, and whatever it
raises goes to the client's error callback."""

_HEADER_KEYS: dict[bytes, str] = {}
"""Header names already found valid, as they appear on the wire: a few constants, mostly."""

_PLAIN_HEADERS = b"NATS/1.0\r\n"
"""A header block without an inline status (``NATS/1.0 503`` has one)."""

_CRLF = b"\r\n"


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """A NATS header block (``Name: Value`` lines) as nats-py's ``_parse_header_lines``
    reads it: the same result for every input, with each name checked once per process
    rather than once per message. Names with non-ASCII bytes or whitespace inside are
    skipped; values are stripped and decoded as UTF-8, malformed bytes replaced."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = _HEADER_KEYS.get(name)
        if key is None:
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if any(c.isspace() for c in key):
                continue
            if len(_HEADER_KEYS) < 1024:
                _HEADER_KEYS[name] = key
        out[key] = value.strip().decode("utf-8", "replace")
    return out


class WireParser(nats_parser.Parser):
    """nats-py's protocol parser, faster for deliveries (see the module's docstring).

    It keeps the base class's state (``buf``, ``state``, ``needed``, ``header_needed``,
    ``msg_arg``), so the client's ``reset`` after a reconnect works unchanged.
    """

    def __init__(self, nc: NatsClient) -> None:
        super().__init__(nc)
        self.inline: dict[int, InlineHandler] = {}
        """Subscription id → the function its deliveries go to (see deliver_inline)."""

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        while buf:
            if self.state == nats_parser.AWAITING_CONTROL_LINE:
                if buf.startswith((b"HMSG ", b"MSG ")):
                    if not self._take_msg_line():
                        return
                elif not await self._take_other_line():
                    return
            elif len(buf) >= self.needed + nats_parser.CRLF_SIZE:
                await self._take_payload()
            else:
                return

    def _take_msg_line(self) -> bool:
        """``[H]MSG <subject> <sid> [reply] [<header size>] <size>``; False until whole."""
        buf = self.buf
        end = buf.find(_CRLF)
        if end < 0:
            return False
        args = bytes(buf[:end]).split()
        try:
            if args[0] == b"HMSG":
                if len(args) == 6:
                    _, subject, sid, reply, header_size, size = args
                elif len(args) == 5:
                    _, subject, sid, header_size, size = args
                    reply = b""
                else:
                    raise ValueError(len(args))
                self.header_needed = int(header_size)
            else:
                if len(args) == 5:
                    _, subject, sid, reply, size = args
                elif len(args) == 4:
                    _, subject, sid, size = args
                    reply = b""
                else:
                    raise ValueError(len(args))
                self.header_needed = 0
            arg = self.msg_arg
            arg["subject"] = subject
            arg["sid"] = int(sid)
            arg["reply"] = reply
            self.needed = int(size)
        except ValueError as exc:
            raise ProtocolError("nats: malformed MSG") from exc
        del buf[: end + nats_parser.CRLF_SIZE]
        self.state = nats_parser.AWAITING_MSG_PAYLOAD
        return True

    async def _take_other_line(self) -> bool:
        """Any other operation, as nats-py's parser takes it; False until it is whole."""
        buf, nc = self.buf, self.nc
        if found := nats_parser.OK_RE.match(buf):
            del buf[: found.end()]
        elif found := nats_parser.ERR_RE.match(buf):
            await nc._process_err(found.groups()[0].decode().lower())
            del buf[: found.end()]
        elif found := nats_parser.PING_RE.match(buf):
            del buf[: found.end()]
            await nc._process_ping()
        elif found := nats_parser.PONG_RE.match(buf):
            del buf[: found.end()]
            await nc._process_pong()
        elif found := nats_parser.INFO_RE.match(buf):
            info = json.loads(found.groups()[0].decode())
            await nc._process_info(info)
            del buf[: found.end()]
        elif len(buf) < nats_parser.MAX_CONTROL_LINE_SIZE and _CRLF in buf:
            raise ProtocolError("nats: unknown protocol")
        else:
            return False  # a split buffer: wait for more
        return True

    async def _take_payload(self) -> None:
        buf, nc, arg = self.buf, self.nc, self.msg_arg
        needed, header_size = self.needed, self.header_needed
        if header_size:
            headers: bytes | None = bytes(buf[:header_size])
            payload = bytes(buf[header_size:needed])
            self.header_needed = 0
        else:
            headers = None
            payload = bytes(buf[:needed])
        del buf[: needed + nats_parser.CRLF_SIZE]
        self.state = nats_parser.AWAITING_CONTROL_LINE
        sid: int = arg["sid"]
        handler = self.inline.get(sid)
        if handler is None:
            await nc._process_msg(sid, arg["subject"], arg["reply"], payload, headers)
            return
        sub = nc._subs.get(sid)
        if sub is None:  # unsubscribed: nats-py drops what still arrives
            del self.inline[sid]
            return
        nc.stats["in_msgs"] += 1
        nc.stats["in_bytes"] += len(payload)
        sub._received += 1
        parsed: dict[str, str] | None = None
        if headers is not None:
            if headers.startswith(_PLAIN_HEADERS):
                parsed = parse_header_lines(headers[len(_PLAIN_HEADERS) :]) or None
            else:  # an inline status (404, 408, 503, ...): read as nats-py reads it
                parsed = await nc._process_headers(headers)
        msg = nc.msg_class(
            subject=arg["subject"].decode(),
            reply=arg["reply"].decode(),
            data=payload,
            headers=parsed,
            _client=nc,
            _sid=sid,
        )
        try:
            handler(msg)
        except Exception as exc:
            await nc._error_cb(exc)


def install(nc: NatsClient) -> None:
    """Make ``nc`` read with a :class:`WireParser` (before it connects)."""
    nc._ps = WireParser(nc)
    # Header blocks read by nats-py itself (subscriptions not delivered inline) use the
    # same line parser: nats-py's own costs about three times as much (it re-validates
    # each name's characters on every message).
    nc._parse_header_lines = parse_header_lines  # type: ignore[method-assign]


def deliver_inline(nc: NatsClient, sub: Subscription, handler: InlineHandler) -> bool:
    """Have ``sub``'s messages go to ``handler`` straight from ``nc``'s read loop rather
    than through the subscription's queue and task (which stay, idle, for nats-py's own
    bookkeeping). ``handler`` must do what the subscription's callback does: it replaces
    it for every message, in order. False (nothing changes) for a client without a
    :class:`WireParser` or a subscription that unsubscribes itself after a count.
    """
    parser: Any = nc._ps
    if not isinstance(parser, WireParser) or sub._max_msgs > 0 or sub._jsi is not None:
        return False
    # Forget the subscriptions gone since (a pull inbox retired after a reconnect): the
    # parser drops an entry only when a message still comes for it.
    for gone in [sid for sid in parser.inline if sid not in nc._subs]:
        del parser.inline[gone]
    parser.inline[sub._id] = handler
    return True
