"""Provisioning of one tenant's streams, record consumers and KV buckets (idempotent).

Requests and refs sit in work-queue streams (a message leaves when acked).
Execution records are read by two services: the state service stores them and the
router decides on them, at the same time. Their stream keeps a record until both
have acked it (interest retention), and both durable consumers are made here, with
the stream: an interest stream stores nothing that no consumer is there to read.
The store, not the bus, is the system of record. Events and dead letters are kept
for a while, for operators and, events, for the state service, which stores them (the
router publishes them in batches, one message per routed batch; a watch reads the state
service's store and follows a lifetime's live subject); in an account with a storage limit,
the event stream also holds at most a share of it, so that a busy tenant's events cannot
fill the account and stop its work.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError, NotFoundError

from tickmesh.sdk import ConfigError

from .consumer import durable_config, ensure_consumer
from .subjects import TenantNames

logger = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 120.0
EVENT_MAX_AGE_S = 7 * 24 * 3600.0
DLQ_MAX_AGE_S = 30 * 24 * 3600.0
EVENT_STORAGE_SHARE = 4
"""The event stream holds at most 1/4 of a tenant account's JetStream storage: a busy
tenant writes events far faster than anything else it keeps, and JetStream refuses every
write of an account at its limit."""
EVENT_LIMIT_KEY = "tickmesh.max_bytes"
"""Stream metadata: the byte limit the services last gave the event stream ("-1": none).
A stream whose limit is not that one has an operator's, which is left alone."""
RECORD_ACK_WAIT_S = 30.0
"""The ack wait of the two record consumers made with the stream (the services' default)."""


def event_stream_bytes(account_storage: int | None, *, replicas: int) -> int | None:
    """The most the event stream may hold in an account with ``account_storage`` bytes of
    JetStream storage (None: no limit, so none for the stream either). Each replica's copy
    counts against the account."""
    if account_storage is None:
        return None
    return max(1, account_storage // (EVENT_STORAGE_SHARE * replicas))


async def account_storage(js: JetStreamContext) -> int | None:
    """The JetStream storage limit of the account ``js`` is in (bytes), None if it has
    none."""
    limit = (await js.account_info()).limits.max_storage
    return limit if limit is not None and limit > 0 else None


def stream_configs(
    names: TenantNames, *, replicas: int = 1, storage: int | None = None
) -> list[StreamConfig]:
    """The tenant's streams, each kept on ``replicas`` servers of a JetStream cluster, in
    an account with ``storage`` bytes of JetStream storage (None: unlimited)."""

    def cfg(
        name: str,
        subject: str,
        retention: RetentionPolicy,
        max_age: float = 0,
        max_bytes: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[subject],
            retention=retention,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=max_age or None,
            max_bytes=max_bytes,
            discard=DiscardPolicy.OLD if max_age else DiscardPolicy.NEW,
            # Records must not vanish by API call; operators remove a tenant instead.
            deny_delete=True,
            allow_direct=True,
            metadata=metadata,
        )

    event_bytes = event_stream_bytes(storage, replicas=replicas)
    return [
        cfg(names.work_stream, names.work_all, RetentionPolicy.WORK_QUEUE),
        cfg(names.exec_stream, names.exec_all, RetentionPolicy.INTEREST),
        cfg(names.ref_stream, names.ref_all, RetentionPolicy.WORK_QUEUE),
        cfg(
            names.evt_stream,
            names.evb,
            RetentionPolicy.LIMITS,
            EVENT_MAX_AGE_S,
            event_bytes,
            {EVENT_LIMIT_KEY: str(event_bytes or -1)},
        ),
        cfg(names.dlq_stream, names.dlq_all, RetentionPolicy.LIMITS, DLQ_MAX_AGE_S),
    ]


async def ensure_tenant(js: JetStreamContext, tenant: str, *, replicas: int = 1) -> TenantNames:
    """Create (or confirm) every stream and bucket of ``tenant``.

    ``replicas`` applies to what this call creates; a stream or bucket that already exists
    keeps its own (an operator raises it with ``nats stream edit``, not a restart). So do
    its limits, but for one: the event stream's byte limit is kept at its share of the
    account's storage as it is now (:func:`fit_event_stream`).
    """
    names = TenantNames(tenant)
    storage = await account_storage(js)
    for config in stream_configs(names, replicas=replicas, storage=storage):
        assert config.name is not None
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await _add_stream(js, config)
            continue
        if info.config.retention != config.retention:
            await _recreate_drained(js, info, config)
        elif config.name == names.evt_stream:
            info = await _batch_events(js, info, config)
            await fit_event_stream(js, names, storage=storage, info=info)
    await ensure_record_consumers(js, names)
    for bucket, history in ((names.router_bucket, 1), (names.policy_bucket, 5)):
        try:
            await js.key_value(bucket)
        except Exception:
            # nats-py makes every bucket's stream allow per-message TTLs.
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket, history=history, storage=StorageType.FILE, replicas=replicas
                )
            )
            logger.info("created KV bucket %s", bucket)
    await _allow_msg_ttl(js, names.router_bucket)
    return names


async def _batch_events(js: JetStreamContext, info: StreamInfo, wanted: StreamConfig) -> StreamInfo:
    """Move an event stream made by a version that kept one message per decision (on
    each lifetime's subject, ``tm.<tenant>.evt.>``) to the batch subject. The per-lifetime
    subjects are live only from now on: were the stream still to take them, every live
    message would be stored again. What it holds stays, until its max age."""
    if list(info.config.subjects or []) == list(wanted.subjects or []):
        return info
    updated = await js.update_stream(replace(info.config, subjects=wanted.subjects))
    logger.info(
        "stream %s now keeps %s (it kept %s)",
        wanted.name,
        ", ".join(wanted.subjects or []),
        ", ".join(info.config.subjects or []),
    )
    return updated


def _positive(value: int | None) -> bool:
    return value is not None and value > 0


async def fit_event_stream(
    js: JetStreamContext,
    names: TenantNames,
    *,
    storage: int | None,
    info: StreamInfo | None = None,
) -> int | None:
    """Keep the event stream's byte limit at its share of the account's ``storage`` (see
    ``EVENT_STORAGE_SHARE``; None: unlimited), as the storage was raised or lowered since
    the stream was made. Returns the stream's limit afterwards (None: none).

    The services do this when they start and ``tickmesh tenant limits`` when it changes a
    tenant's storage. A limit the services did not set (an operator's: see
    ``EVENT_LIMIT_KEY``) is kept; a stream without any (made by a version before the
    limit) is given one. Where this connection may not update the stream, the log says
    how to."""
    if info is None:
        info = await js.stream_info(names.evt_stream)
    config = info.config
    current = config.max_bytes if _positive(config.max_bytes) else None
    metadata = dict(config.metadata or {})
    ours = metadata.get(EVENT_LIMIT_KEY)
    if ours is None and current is not None:
        return current  # an operator's limit
    if ours is not None and ours != str(current or -1):
        return current  # an operator's, set over ours
    wanted = event_stream_bytes(storage, replicas=config.num_replicas or 1)
    if ours == str(wanted or -1):
        return current
    metadata[EVENT_LIMIT_KEY] = str(wanted or -1)
    try:
        await js.update_stream(replace(config, max_bytes=wanted or -1, metadata=metadata))
    except Exception as exc:
        over = wanted is not None and (current is None or current > wanted)
        logger.warning(
            "stream %s should hold at most %s (1/%d of its account's storage) and this "
            "connection may not set that (%s): an operator can, with `nats stream edit %s "
            "--max-bytes %d` as a user of the account that may%s",
            names.evt_stream,
            "any size" if wanted is None else f"{wanted} bytes",
            EVENT_STORAGE_SHARE,
            exc or type(exc).__name__,
            names.evt_stream,
            wanted or -1,
            "; until then the tenant's events can fill more of its JetStream storage"
            if over
            else "",
        )
        return current
    if wanted is None:
        logger.info("stream %s now has no byte limit, as its account", names.evt_stream)
    else:
        logger.info("stream %s now holds at most %d bytes", names.evt_stream, wanted)
    return wanted


def bucket_stream(bucket: str) -> str:
    return f"KV_{bucket}"


async def allows_msg_ttl(js: JetStreamContext, bucket: str) -> bool:
    """Whether ``bucket`` takes per-message TTLs (finished lifetimes expire by them)."""
    info = await js.stream_info(bucket_stream(bucket))
    return bool(info.config.allow_msg_ttl)


async def _allow_msg_ttl(js: JetStreamContext, bucket: str) -> None:
    """Let ``bucket`` take per-message TTLs, if a version before them made it without.
    NATS allows turning this on for an existing stream (never off). Where this fails
    (e.g. a server before 2.11), the router keeps finished lifetimes for ever and says
    so when it starts."""
    info = await js.stream_info(bucket_stream(bucket))
    if info.config.allow_msg_ttl:
        return
    config = info.config
    config.allow_msg_ttl = True
    try:
        await js.update_stream(config)
    except Exception as exc:
        logger.warning("cannot let KV bucket %s expire its keys: %s", bucket, exc)
        return
    logger.info("KV bucket %s now takes per-message TTLs", bucket)


def record_consumers(names: TenantNames) -> list[tuple[str, ConsumerConfig]]:
    """(stream, config) of the two durable consumers of the records: the state service's
    and the router's."""
    return [
        (names.exec_stream, durable_config(durable, names.exec_all, ack_wait_s=RECORD_ACK_WAIT_S))
        for durable in (names.state_consumer, names.router_record_consumer)
    ]


async def ensure_record_consumers(js: JetStreamContext, names: TenantNames) -> None:
    """Make both record consumers if they are missing: until both exist, a record one
    service acks is gone for the other. An existing one is left as it is (its service
    sets its own ack wait when it starts)."""
    for stream, config in record_consumers(names):
        assert config.durable_name is not None
        try:
            await js.consumer_info(stream, config.durable_name)
        except NotFoundError:
            await ensure_consumer(js, stream, config)


async def _add_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
        logger.info("created stream %s", config.name)
    except BadRequestError as exc:
        # Another service created it between our check and our add.
        if "already in use" not in str(exc):
            raise


async def _recreate_drained(js: JetStreamContext, info: StreamInfo, config: StreamConfig) -> None:
    """A stream made by an earlier version with another retention policy, which NATS
    cannot change in place: recreated with the new one if it holds nothing, else refused
    (its messages would be lost)."""
    name = config.name
    assert name is not None
    held = info.state.messages
    if held:
        raise ConfigError(
            f"stream {name} has {info.config.retention} retention from an earlier version "
            f"and holds {held} message(s); this version needs {config.retention} retention, "
            "which NATS cannot change in place. Stop the executor pools, let the state "
            f"service drain the stream to 0 messages, then start again (an empty {name} is "
            "recreated)"
        )
    try:
        await js.delete_stream(name)
    except Exception as exc:
        raise ConfigError(
            f"stream {name} has {info.config.retention} retention from an earlier version; "
            f"it is empty but this connection may not delete it ({exc}). Delete it as an "
            f"operator (nats stream rm {name}) and start again"
        ) from exc
    await _add_stream(
        js,
        replace(
            config,
            num_replicas=info.config.num_replicas,
            deny_purge=info.config.deny_purge,
        ),
    )
    logger.warning("recreated empty stream %s with %s retention", name, config.retention)
