"""Provisioning of one tenant's streams and KV buckets (idempotent).

Requests sit in a work-queue stream (a message leaves when acked). Execution
records and refs are work queues too: the store, not the bus, is the system of
record. Events and dead letters are kept for a while, for watchers and operators.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from .subjects import TenantNames

logger = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 120.0
EVENT_MAX_AGE_S = 7 * 24 * 3600.0
DLQ_MAX_AGE_S = 30 * 24 * 3600.0


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
        cfg(names.exec_stream, names.exec_all, RetentionPolicy.WORK_QUEUE),
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
            await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
                logger.info("created stream %s", config.name)
            except BadRequestError as exc:
                # Another service created it between our check and our add.
                if "already in use" not in str(exc):
                    raise
    for bucket, history in ((names.router_bucket, 1), (names.policy_bucket, 5)):
        try:
            await js.key_value(bucket)
        except Exception:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket, history=history, storage=StorageType.FILE, replicas=replicas
                )
            )
            logger.info("created KV bucket %s", bucket)
    return names
