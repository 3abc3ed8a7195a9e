"""What ``tickmesh tenant`` does on a running NATS: reload, check, provision, purge.

The system account's admin user asks every server to reload its configuration
(``$SYS.REQ.SERVER.<id>.RELOAD``), reads the servers' JetStream capacity
(``$SYS.REQ.SERVER.PING.JSZ``) and an account's streams (``$SYS.REQ.ACCOUNT.<a>.JSZ``),
and purges a deleted tenant's JetStream data (``$JS.API.ACCOUNT.PURGE.<a>``). The
tenant's streams are created in its own account by its service user, with the same
stream definitions the services use, plus ``deny_purge``.

A server that cannot fit an account's limits still reloads, logs the error and leaves
the account without JetStream (or with its old limits); that is why the capacity is
checked before a reload and the account's limits are read back after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError

from tickmesh.sdk import ConfigError, TransportError

from .. import nats as tm_nats
from ..streams import account_storage, ensure_tenant, fit_event_stream, stream_configs
from ..subjects import TenantNames
from .registry import KV_STREAM_PREFIX, Limits, Registry, format_size

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S: Final = 5.0
CONNZ_LIMIT: Final = 100_000
"""Connections listed per server and account (nats-server's default page is 1024)."""
GATHER_WINDOW_S: Final = 0.5
"""How long to wait for more servers' answers after the first, when the first does not
say how many servers there are."""


@dataclass(frozen=True, slots=True)
class NatsAccess:
    """How ``tickmesh tenant`` reaches the operator's NATS."""

    url: str
    """Server URL(s), comma-separated."""
    tls: ssl.SSLContext | None = None
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class StreamUsage:
    name: str
    messages: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Connection:
    """A client connection to one of the servers, as its ``connz`` reports it."""

    server: str
    cid: int
    name: str
    """The name the client gave (tickmesh services: ``<service> <instance> <tenant>``)."""
    user: str
    """The public NKey it authenticated with."""


@contextlib.asynccontextmanager
async def connected(access: NatsAccess, seed: Path, name: str) -> AsyncIterator[NatsClient]:
    """A connection authenticated by the NKey seed in ``seed``, closed on exit.

    A refused login is retried until ``access.connect_timeout_s`` (a reload that adds
    the account may still be settling).

    Raises:
        ConfigError: The seed file is missing.
        TransportError: NATS refused or did not answer.
    """
    if not await asyncio.to_thread(seed.is_file):
        raise ConfigError(f"NKey seed {seed} not found")
    nc = await tm_nats.connect(
        [url.strip() for url in access.url.split(",") if url.strip()],
        name=name,
        nkeys_seed=str(seed),
        tls=access.tls,
        first_connect_within=access.connect_timeout_s,
    )
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


class SystemAccount:
    """Requests of the system account's admin user."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc

    async def _request(self, subject: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload or {}).encode()
        try:
            msg = await self._nc.request(subject, data, timeout=REQUEST_TIMEOUT_S)
        except NatsTimeoutError as exc:
            raise TransportError(f"no answer to {subject} within {REQUEST_TIMEOUT_S:g} s") from exc
        return _checked(subject, json.loads(msg.data))

    async def _gather(self, subject: str, payload: dict[str, Any] | None = None) -> list[Any]:
        """Every server's answer to a ping: as many as the first answer says servers
        there are (itself and its routes' peers), or what arrives soon after it."""
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        answers: list[Any] = []
        try:
            await self._nc.publish(subject, json.dumps(payload or {}).encode(), reply=inbox)
            expected: int | None = None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + REQUEST_TIMEOUT_S
            while expected is None or len(answers) < expected:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except NatsTimeoutError:
                    break
                answers.append(_checked(subject, json.loads(msg.data)))
                if len(answers) == 1:
                    peers = _route_peers(answers[0])
                    if peers is None:
                        deadline = min(deadline, loop.time() + GATHER_WINDOW_S)
                    else:
                        expected = peers + 1
        finally:
            await sub.unsubscribe()
        if not answers:
            raise TransportError(f"no server answered {subject} within {REQUEST_TIMEOUT_S:g} s")
        return answers

    async def server_ids(self) -> list[str]:
        return [answer["server"]["id"] for answer in await self._gather("$SYS.REQ.SERVER.PING")]

    async def reload(self) -> list[str]:
        """Make every server reload its configuration file; returns their names.

        Raises:
            ConfigError: A server refused the new configuration.
        """
        reloaded = []
        for server_id in await self.server_ids():
            answer = await self._request(f"$SYS.REQ.SERVER.{server_id}.RELOAD")
            reloaded.append(answer["server"].get("name") or server_id)
        return reloaded

    async def capacity(self) -> tuple[int, int]:
        """The JetStream memory and storage the smallest server offers to accounts.

        Raises:
            ConfigError: A server runs without JetStream.
        """
        memory: list[int] = []
        storage: list[int] = []
        for answer in await self._gather("$SYS.REQ.SERVER.PING.JSZ"):
            config = (answer.get("data") or {}).get("config")
            if not config:
                name = answer["server"].get("name")
                raise ConfigError(f"NATS server {name} runs without JetStream")
            memory.append(int(config.get("max_memory", 0)))
            storage.append(int(config.get("max_storage", 0)))
        return min(memory), min(storage)

    async def streams(self, tenant: str) -> list[StreamUsage]:
        """The streams of ``tenant``'s account, with what they hold."""
        answer = await self._request(f"$SYS.REQ.ACCOUNT.{tenant}.JSZ", {"streams": True})
        details = (answer.get("data") or {}).get("stream_detail") or []
        return [
            StreamUsage(
                name=stream["name"],
                messages=int(stream.get("state", {}).get("messages", 0)),
                bytes=int(stream.get("state", {}).get("bytes", 0)),
            )
            for stream in details
        ]

    async def connections(self, tenant: str) -> list[Connection]:
        """The client connections in ``tenant``'s account, on every server."""
        request = {"acc": tenant, "auth": True, "limit": CONNZ_LIMIT}
        found = []
        for answer in await self._gather("$SYS.REQ.SERVER.PING.CONNZ", request):
            server = answer["server"].get("name") or answer["server"].get("id", "?")
            for conn in (answer.get("data") or {}).get("connections") or []:
                found.append(
                    Connection(
                        server=server,
                        cid=int(conn.get("cid", 0)),
                        name=str(conn.get("name", "")),
                        user=str(conn.get("authorized_user", "")),
                    )
                )
        return found

    async def purge(self, tenant: str) -> None:
        """Delete every stream and consumer of ``tenant``'s account, and its store files.

        Raises:
            ConfigError: The server refused.
        """
        answer = await self._request(f"$JS.API.ACCOUNT.PURGE.{tenant}")
        if not answer.get("initiated"):
            raise ConfigError(f"the purge of account {tenant} was not started: {answer}")


def _route_peers(answer: Any) -> int | None:
    routes = (answer.get("statsz") or {}).get("routes") if isinstance(answer, dict) else None
    if routes is None:
        return None
    return len({route.get("name") or route.get("rid") for route in routes})


def _checked(subject: str, answer: Any) -> Any:
    error = answer.get("error") if isinstance(answer, dict) else None
    if error:
        description = error.get("description", error) if isinstance(error, dict) else error
        raise ConfigError(f"NATS refused {subject}: {description}")
    return answer


def check_capacity(registry: Registry, capacity: tuple[int, int]) -> None:
    """Raises: ConfigError: The tenants' limits add up to more than the server offers."""
    memory, storage = registry.reserved()
    server_memory, server_storage = capacity
    problems = []
    if memory > server_memory:
        problems.append(
            f"max_memory adds up to {format_size(memory)}, the server offers "
            f"{format_size(server_memory)} (jetstream max_memory_store)"
        )
    if storage > server_storage:
        problems.append(
            f"max_storage adds up to {format_size(storage)}, the server offers "
            f"{format_size(server_storage)} (jetstream max_file_store)"
        )
    if problems:
        raise ConfigError(
            "the tenants' JetStream limits do not fit the NATS server, which would leave an "
            "account without JetStream: " + "; ".join(problems)
        )


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    created: tuple[str, ...]
    """Streams and buckets this call created."""
    existing: tuple[str, ...]
    """Streams that were there already (kept as they are)."""
    without_deny_purge: tuple[str, ...]
    """Existing streams that can still be purged (made before the tenant was provisioned)."""


async def provision_streams(
    js: JetStreamContext, tenant: str, *, replicas: int = 1
) -> ProvisionResult:
    """Create the tenant's streams (the services' definitions, plus ``deny_purge``: their
    records must not vanish by API call) and its KV buckets, in the account ``js`` is in.
    """
    names = TenantNames(tenant)
    created: list[str] = []
    existing: list[str] = []
    purgeable: list[str] = []
    for config in stream_configs(names, replicas=replicas, storage=await account_storage(js)):
        assert config.name is not None
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(replace(config, deny_purge=True))
            created.append(config.name)
            continue
        existing.append(config.name)
        if not info.config.deny_purge:
            purgeable.append(config.name)
    buckets = (names.router_bucket, names.policy_bucket)
    before = set()
    for bucket in buckets:
        with contextlib.suppress(NotFoundError):
            await js.stream_info(KV_STREAM_PREFIX + bucket)
            before.add(bucket)
    # The KV buckets exactly as the services make them.
    await ensure_tenant(js, tenant, replicas=replicas)
    created += [KV_STREAM_PREFIX + bucket for bucket in buckets if bucket not in before]
    return ProvisionResult(tuple(created), tuple(existing), tuple(purgeable))


async def fit_event_limit(js: JetStreamContext, tenant: str) -> str:
    """Fit the tenant's event stream's byte limit to its account's storage as it is now
    (after ``tickmesh tenant limits``); returns what the stream holds, for the operator."""
    names = TenantNames(tenant)
    try:
        limit = await fit_event_stream(js, names, storage=await account_storage(js))
    except NotFoundError:
        return f"{names.evt_stream} is not there yet: the services make it when they start"
    if limit is None:
        return f"{names.evt_stream} has no byte limit"
    return f"{names.evt_stream} holds at most {format_size(limit)} of events"


async def account_limits(js: JetStreamContext) -> dict[str, int] | None:
    """The JetStream limits the server applies to the connection's account (named as in
    :meth:`Limits.to_json`), or None when JetStream is not enabled for it."""
    try:
        info = await js.account_info()
    except ServiceUnavailableError:
        # 10039 "JetStream not enabled for account", or no JetStream answering at all.
        return None
    limits = info.limits
    return {
        "max_memory": limits.max_memory,
        "max_storage": limits.max_storage,
        "max_streams": limits.max_streams,
        "max_consumers": limits.max_consumers,
    }


async def verify_limits(js: JetStreamContext, tenant: str, limits: Limits) -> None:
    """Raises: ConfigError: The server does not apply ``limits`` to the tenant's account."""
    applied = await account_limits(js)
    if applied == limits.to_json():
        return
    found = "JetStream is not enabled for it" if applied is None else f"it applies {applied}"
    raise ConfigError(
        f"the NATS server did not apply the limits of tenant {tenant} ({found}); "
        "its log says why (often: the accounts' limits add up to more than the "
        "server's max_memory_store or max_file_store)"
    )
