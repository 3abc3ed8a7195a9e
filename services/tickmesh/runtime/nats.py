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
import logging
import ssl
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from nats import errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck

from tickmesh.sdk import ConfigError, TransportError

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
            included); the caller must not ack its inputs (they will be redelivered,
            and deterministic message ids make the retry safe).
    """
    if not messages:
        return []
    link = watch(js._nc)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ack_timeout
    outcomes: dict[int, PubAck | BaseException] = {}
    todo = list(range(len(messages)))
    while todo:
        lost = link.lost
        futures = await _publish_async(js, [messages[i] for i in todo])
        gathered: asyncio.Future[Any] = asyncio.gather(*futures, return_exceptions=True)
        await asyncio.wait(
            {gathered, lost},
            timeout=max(0.0, deadline - loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        unanswered: list[int] = []
        for i, fut in zip(todo, futures, strict=True):
            if fut.done() and not fut.cancelled():
                outcomes[i] = exc if (exc := fut.exception()) is not None else fut.result()
            else:
                fut.cancel()
                unanswered.append(i)
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
    acks: list[PubAck] = []
    failures: list[tuple[Outgoing, BaseException]] = []
    for i, msg in enumerate(messages):
        outcome = outcomes[i]
        if isinstance(outcome, BaseException):
            failures.append((msg, outcome))
        else:
            acks.append(outcome)
    if failures:
        raise PublishError(failures)
    return acks


async def _publish_async(
    js: JetStreamContext, messages: Sequence[Outgoing]
) -> list[asyncio.Future[PubAck]]:
    futures: list[asyncio.Future[PubAck]] = []
    try:
        for msg in messages:
            futures.append(
                await js.publish_async(msg.subject, msg.data, headers=dict(msg.headers) or None)
            )
    except BaseException:
        # Nothing will await these: free their places in the client's in-flight limit.
        for fut in futures:
            fut.cancel()
        raise
    return futures
