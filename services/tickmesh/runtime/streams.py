"""Provisioning of one tenant's streams, record consumers and KV buckets (idempotent).

Requests and refs sit in work-queue streams (a message leaves when acked).
Execution records are read by two services: the state service stores them and the
router decides on them, at the same time. Their stream keeps a record until both
have acked it (interest retention), and both durable consumers are made here, with
the stream: an interest stream stores nothing that no consumer is there to read.
The store, not the bus, is the system of record. Events and dead letters are kept
for a while, for watchers and operators.
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
RECORD_ACK_WAIT_S = 30.0
"""The ack wait of the two record consumers made with the stream (the services' default)."""


def stream_configs(names: TenantNames, *, replicas: int = 1) -> list[StreamConfig]:
    """The tenant's streams, each kept on ``replicas`` servers of a JetStream cluster."""

    def cfg(
        name: str, subject: str, retention: RetentionPolicy, max_age: float = 0
    ) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[subject],
            retention=retention,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=max_age or None,
            discard=DiscardPolicy.OLD if max_age else DiscardPolicy.NEW,
            # Records must not vanish by API call; operators remove a tenant instead.
            deny_delete=True,
            allow_direct=True,
        )

    return [
        cfg(names.work_stream, names.work_all, RetentionPolicy.WORK_QUEUE),
        cfg(names.exec_stream, names.exec_all, RetentionPolicy.INTEREST),
        cfg(names.ref_stream, names.ref_all, RetentionPolicy.WORK_QUEUE),
        cfg(names.evt_stream, names.evt_all, RetentionPolicy.LIMITS, EVENT_MAX_AGE_S),
        cfg(names.dlq_stream, names.dlq_all, RetentionPolicy.LIMITS, DLQ_MAX_AGE_S),
    ]


async def ensure_tenant(js: JetStreamContext, tenant: str, *, replicas: int = 1) -> TenantNames:
    """Create (or confirm) every stream and bucket of ``tenant``.

    ``replicas`` applies to what this call creates; a stream or bucket that already exists
    keeps its own (an operator raises it with ``nats stream edit``, not a restart).
    """
    names = TenantNames(tenant)
    for config in stream_configs(names, replicas=replicas):
        assert config.name is not None
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await _add_stream(js, config)
            continue
        if info.config.retention != config.retention:
            await _recreate_drained(js, info, config)
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
