"""NATS connections for services: reconnect forever, notice dead links fast,
drain on stop, and publish batches to JetStream with bounded in-flight.

nats-py gives up reconnecting after about two minutes by default and notices a
dead link only after minutes of missed pings; a service must outlive any
broker outage, so both are changed here.

nats-py also leaves every answer awaited over a connection that dropped (a
request's reply, a PubAck) waiting for its full timeout, though a restarted
server will never send it: :func:`watch` fails those waits as soon as the drop
is noticed, and tells the connection's consumers when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from nats import errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

from tickmesh.sdk import ConfigError, TransportError

from . import nats_wire
from .nats_wire import parse_header_lines as parse_header_lines  # re-exported
from .subjects import HDR_MSG_ID

logger = logging.getLogger(__name__)

PUBLISH_ACK_TIMEOUT = 10.0
"""How long a batch waits for its PubAcks before the batch counts as failed."""


async def connect(
    url: str | Sequence[str],
    *,
    name: str,
    user_credentials: str | None = None,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    nkeys_seed: str | None = None,
    tls: ssl.SSLContext | None = None,
    connect_timeout: float = 5.0,
    first_connect_within: float = 10.0,
    ping_interval: float = 5.0,
    inbox_prefix: str | None = None,
) -> NatsClient:
    """Connect with service-grade reconnect settings.

    Once connected, the client reconnects forever (rotating through every server it
    knows, including the cluster members the servers advertise). The *first*
    connection is different: a service that cannot reach NATS at start must say so
    and exit, not hang, so it is bounded by ``first_connect_within`` seconds.
    ``inbox_prefix`` replaces nats-py's ``_INBOX`` for reply subjects (a user allowed
    to subscribe to its own prefix only, such as a tenant's executor user).

    Raises:
        TransportError: The first connection could not be made in time.
    """
    seed = _read_seed(nkeys_seed) if nkeys_seed else None
    given = [url] if isinstance(url, str) else list(url)
    servers = given
    if user is None and password is None and token is None:
        servers, user, password, token = _lift_url_credentials(given)

    last_error: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        # A refused TLS handshake or login is followed by resets and broken pipes from the
        # same rejection; those must not hide the reason in the first-connect error.
        generic = isinstance(exc, ConnectionError)
        if not (generic and last_error and not isinstance(last_error[0], ConnectionError)):
            last_error[:] = [exc]
        logger.warning("nats error (%s): %s", name, exc)

    async def on_disconnected() -> None:
        # Also called on a deliberate close; reconnect failures are logged as errors.
        logger.info("nats disconnected (%s)", name)

    async def on_reconnected() -> None:
        logger.info("nats reconnected (%s)", name)

    nc = NatsClient()
    nats_wire.install(nc)
    try:
        # nats-py annotates the timings as int though it takes seconds as float.
        options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "reconnect_time_wait": 0.25,
            "ping_interval": ping_interval,
        }
        if inbox_prefix is not None:
            options["inbox_prefix"] = inbox_prefix
        async with asyncio.timeout(first_connect_within):
            await nc.connect(
                servers=servers,
                name=name,
                user_credentials=user_credentials,
                user=user,
                password=password,
                token=token,
                # The seed's contents, read once: nats-py re-reads a seed *file* on every
                # reconnect but keeps the public key of the first connect, so a seed rotated
                # on disk would make every reconnect fail until a restart. With the contents,
                # a connection keeps its key (authorised through a rotation's overlap) and
                # moves to the new one when the service restarts.
                nkeys_seed_str=seed,
                tls=tls,
                max_reconnect_attempts=-1,
                max_outstanding_pings=3,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                **options,
            )
    except Exception as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        if isinstance(exc, TimeoutError):
            reason = f"not connected within {first_connect_within:g} s"
            if last_error:
                reason += f" (last error: {last_error[0]})"
        else:
            reason = str(exc)
        raise TransportError(
            f"cannot connect to NATS at {', '.join(_redacted(s) for s in given)}: {reason}"
        ) from exc
    watch(nc)
    return nc


def _read_seed(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the NKey seed {path}: {exc}") from exc


def _lift_url_credentials(
    servers: list[str],
) -> tuple[list[str], str | None, str | None, str | None]:
    """Move the credentials in the servers' URLs into the connect options.

    nats-py sends a URL's userinfo only to that URL's server: after failing over to a
    cluster member it learned from the servers, it would log in with nothing and be
    refused forever. Returns the URLs without userinfo, then user, password and token
    (a user without a password is a token, as in nats-py). URLs carrying different
    credentials are left as they are.
    """
    parts = [urlsplit(server) for server in servers]
    found = {(p.username, p.password) for p in parts if p.username is not None}
    if len(found) != 1:
        return servers, None, None, None
    ((username, secret),) = found
    assert username is not None
    stripped = [
        urlunsplit(p._replace(netloc=p.netloc.rpartition("@")[2]))
        if p.username is not None
        else server
        for p, server in zip(parts, servers, strict=True)
    ]
    if secret is None:
        return stripped, None, None, unquote(username)
    return stripped, unquote(username), unquote(secret), None


def _redacted(server: str) -> str:
    """A server URL without the password (or token) of its userinfo."""
    parts = urlsplit(server)
    if parts.username is None:
        return server
    userinfo = "***" if parts.password is None else f"{parts.username}:***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc.rpartition('@')[2]}"))


class LinkLostError(nats_errors.TimeoutError):
    """The connection dropped while a request or publish waited for its answer.

    A timeout that came early, and means the same: the message may or may not have
    reached the server. It is a ``nats.errors.TimeoutError`` so that every caller
    handling a timeout handles it.
    """

    def __str__(self) -> str:
        return "nats: connection lost before the answer came"


class ConnectionWatch:
    """One connection's drops and reconnects, for what waits on answers over it.

    When the connection drops, every request still waiting for its reply fails (with
    :class:`LinkLostError`, which nats-py's ``request`` re-raises as its own timeout
    error), and :attr:`lost` resolves (publishers awaiting PubAcks race it). When it
    is back, the callbacks given to :meth:`on_reconnect` run (consumers renew their
    pull requests: a restarted server holds none).
    """

    def __init__(self, connected: bool) -> None:
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._up = asyncio.Event()
        if connected:
            self._up.set()
        self._closed = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    @property
    def lost(self) -> asyncio.Future[None]:
        """Resolves when the connection drops next. Take it *before* sending: what was
        sent on a connection that dropped may never be answered."""
        return self._lost

    async def wait_up(self, within: float) -> bool:
        """Wait until the connection is up; False if it was not within ``within``
        seconds, or is closed."""
        if self._up.is_set():
            return True
        if self._closed.is_set() or within <= 0:
            return False
        up = asyncio.ensure_future(self._up.wait())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({up, closed}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            closed.cancel()
        return self._up.is_set()

    def on_reconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every reconnect; returns what unregisters it."""
        self._listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return remove

    def _dropped(self, nc: NatsClient) -> None:
        self._up.clear()
        if nc.is_closed:
            self._closed.set()
        lost, self._lost = self._lost, asyncio.get_running_loop().create_future()
        lost.set_result(None)
        # nats-py keeps the reply futures of its requests (KV writes, JetStream API
        # calls, synchronous publishes) here, and would let each wait out its timeout.
        # A request sent again after the reconnect is a new one; a request still in
        # the reconnect buffer may yet be answered, and then fails needlessly: its
        # caller retries, as after a timeout.
        waiting: dict[str, asyncio.Future[Any]] = nc._resp_map
        for future in list(waiting.values()):
            if not future.done():
                future.set_exception(LinkLostError())

    def _reconnected(self) -> None:
        self._up.set()
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                logger.exception("a reconnect listener failed")


_WATCHES: weakref.WeakKeyDictionary[NatsClient, ConnectionWatch] = weakref.WeakKeyDictionary()


def watch(nc: NatsClient) -> ConnectionWatch:
    """The watch of a connected client, installed on first use (in front of the
    client's own disconnected and reconnected callbacks)."""
    found = _WATCHES.get(nc)
    if found is not None:
        return found
    found = _WATCHES[nc] = ConnectionWatch(nc.is_connected)
    dropped_cb, reconnected_cb = nc._disconnected_cb, nc._reconnected_cb
    ref = weakref.ref(nc)
    this = found

    async def on_disconnected() -> None:
        client = ref()
        if client is not None:
            this._dropped(client)
        if dropped_cb is not None:
            await dropped_cb()

    async def on_reconnected() -> None:
        this._reconnected()
        if reconnected_cb is not None:
            await reconnected_cb()

    nc._disconnected_cb = on_disconnected
    nc._reconnected_cb = on_reconnected
    return found


def jetstream(nc: NatsClient, *, max_pending: int = 4000) -> JetStreamContext:
    return nc.jetstream(publish_async_max_pending=max_pending, timeout=PUBLISH_ACK_TIMEOUT)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish to JetStream."""

    subject: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


class PublishError(TransportError):
    """Some messages of a batch were not acknowledged by JetStream."""

    def __init__(self, failures: Sequence[tuple[Outgoing, BaseException]]) -> None:
        first = failures[0][1]
        super().__init__(f"{len(failures)} publish(es) failed; first: {first!r}")
        self.failures = tuple(failures)


MAX_IN_FLIGHT = 4000
"""Messages one connection may have published to JetStream and not yet seen a PubAck
for; a batch that would go past it waits for room (a batch alone may exceed it)."""

_STATUS = "Status"
_NO_RESPONDERS = "503"
_BAD_SUBJECT = re.compile(r"[ \t\r\n]")
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_KEYS_SEEN: set[str] = set()
"""Header keys already found valid (a few constants, mostly): checked once."""


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """A message's NATS header block, as nats-py writes it: keys and values trimmed,
    a CR or LF in a value made a space (it could not inject protocol), empty keys
    skipped.

    Raises:
        nats.errors.BadHeaderError: A key holds a character a header name may not.
    """
    lines = ["NATS/1.0\r\n"]
    for key, value in headers.items():
        if key not in _KEYS_SEEN:
            stripped = key.strip()
            if not stripped:
                continue
            if not _HEADER_KEY.fullmatch(stripped):
                raise nats_errors.BadHeaderError(stripped)
            if stripped != key:
                key = stripped
            elif len(_KEYS_SEEN) < 1024:
                _KEYS_SEEN.add(key)
        value = value.strip()
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        lines.append(f"{key}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


_PLAIN_PUBACK = re.compile(rb'\{"stream":"([A-Za-z0-9_-]+)","seq":([0-9]{1,20})\}')
"""The answer to nearly every publish, exactly as nats-server writes it: read without
the JSON parser (a step takes three of them in the router and one in the pool)."""


def parse_puback(data: bytes) -> PubAck | Exception:
    """What JetStream answered a publish: its PubAck, or the error it reported as the
    exception nats-py raises for it (``err_code`` 10071 is a compare-and-set on the
    wrong last sequence). Only the fields tickmesh reads are taken."""
    plain = _PLAIN_PUBACK.fullmatch(data)
    if plain is not None:
        return PubAck(stream=plain[1].decode(), seq=int(plain[2]))
    try:
        resp = json.loads(data)
        error = resp.get("error")
        if error is not None:
            try:
                APIError.from_error(error)  # raises the class that fits the code
            except APIError as exc:
                return exc
            return APIError(description=str(error))
        return PubAck(
            stream=resp["stream"],
            seq=resp["seq"],
            domain=resp.get("domain"),
            duplicate=resp.get("duplicate"),
        )
    except Exception:
        return APIError(description=f"unreadable PubAck: {data[:200]!r}")


class _Round:
    """One send of (some of) a batch's messages and the answers that came for them."""

    __slots__ = ("left", "outcomes", "woken")

    def __init__(self, size: int, woken: asyncio.Future[None]) -> None:
        self.outcomes: list[PubAck | Exception | None] = [None] * size
        self.left = size
        self.woken = woken


class _Publisher:
    """Publishes to JetStream over one connection, with one reply subscription for
    every PubAck and one future per batch (nats-py's ``publish_async`` takes a future,
    a semaphore slot, a random token and a JSON-to-dataclass parse per message).

    A message's reply subject is ``<prefix><round>.<index>``, so an answer finds its
    batch and place; answers to a round no one waits on any more are dropped. When
    the connection drops, every round is woken (one callback on the watch's
    ``lost``, not one per round: a future's ``remove_done_callback`` scans them all).
    """

    def __init__(self, link: ConnectionWatch) -> None:
        # Holds no reference to its client: it is the value of a weak mapping keyed by it.
        self._link = link
        link.lost.add_done_callback(self._on_lost)
        self._prefix = ""
        self._lock = asyncio.Lock()
        self._rounds: dict[str, _Round] = {}
        self._next = 0
        self._in_flight = 0
        self._freed = asyncio.Event()

    async def _start(self, nc: NatsClient) -> None:
        async with self._lock:
            if self._prefix:
                return
            prefix = f"{nc._inbox_prefix.decode()}.{nc._nuid.next().decode()}."
            sub = await nc.subscribe(prefix + ">", cb=self._on_reply)
            nats_wire.deliver_inline(nc, sub, self._take_reply)
            self._prefix = prefix

    async def send(
        self, nc: NatsClient, messages: Sequence[Outgoing], woken: asyncio.Future[None]
    ) -> tuple[str, _Round]:
        """Write ``messages`` to ``nc`` (one flush); the round's ``woken`` resolves when
        every one of them is answered."""
        if not self._prefix:
            await self._start(nc)
        count = len(messages)
        while self._in_flight and self._in_flight + count > MAX_IN_FLIGHT:
            self._freed.clear()
            await self._freed.wait()
        name = f"{self._next:x}"
        self._next += 1
        round_ = self._rounds[name] = _Round(count, woken)
        self._in_flight += count
        reply = f"{self._prefix}{name}."
        size = 0
        try:
            for i, msg in enumerate(messages):
                data = msg.data
                _check_publishable(nc, msg.subject, len(data))
                if msg.headers:
                    hdr = encode_headers(msg.headers)
                    head = f"HPUB {msg.subject} {reply}{i} {len(hdr)} {len(hdr) + len(data)}\r\n"
                    await nc._send_command(b"".join((head.encode(), hdr, data, b"\r\n")))
                else:
                    head = f"PUB {msg.subject} {reply}{i} {len(data)}\r\n"
                    await nc._send_command(b"".join((head.encode(), data, b"\r\n")))
                size += len(data)
        except BaseException:
            self.release(name)
            raise
        finally:
            nc.stats["out_msgs"] += count
            nc.stats["out_bytes"] += size
        await _flush(nc)
        return name, round_

    def _on_lost(self, _: object) -> None:
        for round_ in self._rounds.values():
            if not round_.woken.done():
                round_.woken.set_result(None)
        self._link.lost.add_done_callback(self._on_lost)

    def release(self, name: str) -> None:
        """Nothing waits on the round any more: free its messages' places."""
        round_ = self._rounds.pop(name, None)
        if round_ is not None:
            self._in_flight -= len(round_.outcomes)
            self._freed.set()

    async def _on_reply(self, msg: Msg) -> None:
        self._take_reply(msg)

    def _take_reply(self, msg: Msg) -> None:
        name, _, place = msg.subject[len(self._prefix) :].partition(".")
        round_ = self._rounds.get(name)
        if round_ is None or not place.isdigit():
            return
        i = int(place)
        if i >= len(round_.outcomes) or round_.outcomes[i] is not None:
            return
        if not msg.data and msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            outcome: PubAck | Exception = NoStreamResponseError()
        else:
            outcome = parse_puback(msg.data)
        round_.outcomes[i] = outcome
        round_.left -= 1
        if not round_.left and not round_.woken.done():
            round_.woken.set_result(None)


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


def _check_publishable(nc: NatsClient, subject: str, size: int) -> None:
    """nats-py's checks before a publish, raising what its ``publish`` would."""
    if not subject or _BAD_SUBJECT.search(subject):
        raise nats_errors.BadSubjectError
    if nc.is_closed:
        raise nats_errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats_errors.ConnectionDrainingError
    if not nc.is_connected and (
        nc._max_pending_size <= 0 or size + nc._pending_data_size > nc._max_pending_size
    ):
        raise nats_errors.OutboundBufferLimitError
    if size > nc._max_payload:
        raise nats_errors.MaxPayloadError


async def _flush(nc: NatsClient) -> None:
    """Have the client's flusher write what was queued (as nats-py's publish does)."""
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


_PUBLISHERS: weakref.WeakKeyDictionary[NatsClient, _Publisher] = weakref.WeakKeyDictionary()


def _publisher(nc: NatsClient) -> _Publisher:
    found = _PUBLISHERS.get(nc)
    if found is None:
        found = _PUBLISHERS[nc] = _Publisher(watch(nc))
    return found


async def publish_batch(
    js: JetStreamContext, messages: Sequence[Outgoing], *, ack_timeout: float = PUBLISH_ACK_TIMEOUT
) -> list[PubAck]:
    """Publish every message without waiting in between, then await all PubAcks.

    If the connection drops before every PubAck came, the messages still unanswered
    that carry a ``Nats-Msg-Id`` are published again once it is back (the stream's
    duplicate window makes a copy that did land count once): a restarted server
    answers nothing sent before it died. A message without an id is not sent twice
    here; it fails at once instead.

    Returns:
        The PubAcks, in order. A duplicate (same Nats-Msg-Id within the stream's
        window) is an ack with ``duplicate=True``: the message is durable.

    Raises:
        PublishError: Any message was not acknowledged within ``ack_timeout`` (retries
            included), or JetStream answered it with an error (``failures`` holds it,
            e.g. an ``APIError`` with ``err_code`` 10071 for a compare-and-set on the
            wrong last sequence); the caller must not ack its inputs (they will be
            redelivered, and deterministic message ids make the retry safe).
    """
    outcomes = await publish_each(js, messages, ack_timeout=ack_timeout)
    acks: list[PubAck] = []
    failures: list[tuple[Outgoing, BaseException]] = []
    for msg, result in zip(messages, outcomes, strict=True):
        if isinstance(result, PubAck):
            acks.append(result)
        else:
            failures.append((msg, result))
    if failures:
        raise PublishError(failures)
    return acks


async def publish_each(
    js: JetStreamContext, messages: Sequence[Outgoing], *, ack_timeout: float = PUBLISH_ACK_TIMEOUT
) -> list[PubAck | BaseException]:
    """:func:`publish_batch`, answering for each message on its own: its PubAck, or why
    it is not known to be stored (for a batch that carries the work of several
    independent callers, each of which settles its own inputs)."""
    if not messages:
        return []
    nc: NatsClient = js._nc
    publisher = _publisher(nc)
    link = watch(nc)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ack_timeout
    outcomes: list[PubAck | BaseException | None] = [None] * len(messages)
    todo = list(range(len(messages)))
    while todo:
        lost = link.lost
        woken: asyncio.Future[None] = loop.create_future()
        sending = messages if len(todo) == len(messages) else [messages[i] for i in todo]
        name, round_ = await publisher.send(nc, sending, woken)

        # The publisher wakes its rounds when the connection drops; one that dropped
        # while this round was being sent may have come before the round was known.
        timer = loop.call_at(deadline, _wake, woken)
        try:
            if round_.left and not lost.done():
                await woken
        finally:
            timer.cancel()
            publisher.release(name)
        unanswered: list[int] = []
        for i, outcome in zip(todo, round_.outcomes, strict=True):
            if outcome is None:
                unanswered.append(i)
            else:
                outcomes[i] = outcome
        if not unanswered:
            break
        if not lost.done() or loop.time() >= deadline:
            for i in unanswered:
                outcomes[i] = TimeoutError("no PubAck")
            break
        todo = [i for i in unanswered if messages[i].headers.get(HDR_MSG_ID)]
        for i in unanswered:
            if i not in todo:
                outcomes[i] = LinkLostError()
        if todo and not await link.wait_up(deadline - loop.time()):
            for i in todo:
                outcomes[i] = TimeoutError("no PubAck: not reconnected in time")
            break
        if todo:
            logger.info("publishing %d message(s) again after a reconnect", len(todo))
    return [outcome if outcome is not None else TimeoutError("no PubAck") for outcome in outcomes]


async def publish_live(nc: NatsClient, messages: Sequence[Outgoing]) -> None:
    """Publish on core NATS, not stored and not answered, in one write (nats-py's
    ``publish`` is a coroutine and a flush request per message): for whoever listens now.

    Raises:
        nats.errors.Error: As nats-py's ``publish`` would, before anything is sent.
    """
    if not messages:
        return
    commands = []
    for msg in messages:
        data = msg.data
        _check_publishable(nc, msg.subject, len(data))
        if msg.headers:
            hdr = encode_headers(msg.headers)
            head = f"HPUB {msg.subject} {len(hdr)} {len(hdr) + len(data)}\r\n"
            commands.append(b"".join((head.encode(), hdr, data, b"\r\n")))
        else:
            head = f"PUB {msg.subject} {len(data)}\r\n"
            commands.append(b"".join((head.encode(), data, b"\r\n")))
    await nc._send_command(b"".join(commands))
    nc.stats["out_msgs"] += len(messages)
    nc.stats["out_bytes"] += sum(len(msg.data) for msg in messages)
    await _flush(nc)


async def ack_all(msgs: Sequence[Msg]) -> None:
    """Ack every message with one write per connection (``Msg.ack`` is a publish and
    a flush each). Each is marked acked, so a later nak or ack is refused, as after
    ``Msg.ack``.

    Raises:
        nats.js.errors.NotJSMessageError, MsgAlreadyAckdError: As ``Msg.ack`` would,
            before anything is sent.
    """
    by_client: dict[NatsClient, list[str]] = {}
    for msg in msgs:
        msg._check_reply()
        by_client.setdefault(msg._client, []).append(f"PUB {msg.reply} 0\r\n\r\n")
    for nc, commands in by_client.items():
        _check_publishable(nc, "ack", 0)
        await nc._send_command("".join(commands).encode())
        nc.stats["out_msgs"] += len(commands)
        await _flush(nc)
    for msg in msgs:
        msg._ackd = True
