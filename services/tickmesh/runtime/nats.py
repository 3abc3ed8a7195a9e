"""NATS connections for services: reconnect forever, notice dead links fast,
drain on stop, and publish batches to JetStream with bounded in-flight.

nats-py gives up reconnecting after about two minutes by default and notices a
dead link only after minutes of missed pings; a service must outlive any
broker outage, so both are changed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck

from tickmesh.sdk import ConfigError, TransportError

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

    Returns:
        The PubAcks, in order. A duplicate (same Nats-Msg-Id within the stream's
        window) is an ack with ``duplicate=True``: the message is durable.

    Raises:
        PublishError: Any message was not acknowledged within ``ack_timeout``; the
            caller must not ack its inputs (they will be redelivered, and
            deterministic message ids make the retry safe).
    """
    if not messages:
        return []
    futures: list[asyncio.Future[PubAck]] = []
    for msg in messages:
        futures.append(
            await js.publish_async(msg.subject, msg.data, headers=dict(msg.headers) or None)
        )
    try:
        async with asyncio.timeout(ack_timeout):
            results = await asyncio.gather(*futures, return_exceptions=True)
    except TimeoutError:
        for fut in futures:
            fut.cancel()
        results = [
            fut.result()
            if fut.done() and not fut.cancelled() and fut.exception() is None
            else TimeoutError("no PubAck")
            for fut in futures
        ]
    acks: list[PubAck] = []
    failures: list[tuple[Outgoing, BaseException]] = []
    for msg, result in zip(messages, results, strict=True):
        if isinstance(result, BaseException):
            failures.append((msg, result))
        else:
            acks.append(result)
    if failures:
        raise PublishError(failures)
    return acks
