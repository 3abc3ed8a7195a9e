"""The execution records both readers of the record stream share: the one check the
state service (before it stores a record) and the router (before it decides on one)
both run, so a record the state service dead-letters is never routed; and the wait for
the state service to have stored what is on the stream, which readers of the store run
because the router acts on a record before the store has it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Final

from nats.js import JetStreamContext

from tickmesh.sdk import ValidationError
from tickmesh.sdk.errors import StatusCode
from tickmesh.v1 import envelope_pb2, telemetry_pb2

from .errors import StatusError
from .subjects import TenantNames, check_token, tenant_of_subject

logger = logging.getLogger(__name__)

STORED_WAIT_S = 5.0
"""How long a reader waits for the records already on the bus to be stored."""
STORED_POLL_S = 0.005

RECORD_KINDS = ("task_execution", "plan_execution")

MAX_USAGE: Final = 2**40
"""The most tokens, or cost micros, one execution may report: about 1.1e12 (a trillion
tokens; a million currency units in micros). The router, the state store and Redis sum
these figures in 64-bit integers: eight million executions at this bound still fit,
where a single report near 2**63 made the next sum overflow — a counter that can no
longer be written, and a tenant's records that can no longer be stored. Negative
figures would let a report lower a tenant's spend under its guardrail caps."""
MAX_SEQUENCE: Final = 2**63 - 1
"""The largest lifetime event sequence the state stores keep (SQLite INTEGER, PostgreSQL
BIGINT: signed 64 bits), where protobuf's sequences are uint64: no event has a later one."""
_USAGE_FIELDS: Final = ("input_tokens", "output_tokens", "cost_micros")


def check_record(subject: str, envelope: envelope_pb2.ExecutionEnvelope) -> None:
    """A record's tenant must match its subject's, in the header and in the record, and
    the two headers must name the same lifetime, execution and attempt.

    Raises:
        ValidationError: Naming the mismatch.
    """
    kind = envelope.WhichOneof("body")
    if kind not in RECORD_KINDS:
        raise ValidationError(f"expected an execution record, got a {kind} body")
    subject_tenant = tenant_of_subject(subject)
    record = envelope.task_execution if kind == "task_execution" else envelope.plan_execution
    claimed = {envelope.header.tenant_id, record.header.tenant_id}
    if claimed != {subject_tenant}:
        raise ValidationError(
            f"record claims tenant(s) {sorted(claimed)} but arrived on a subject of "
            f"tenant {subject_tenant!r}"
        )
    inner, outer = record.header, envelope.header
    if not inner.execution_id or inner.attempt < 1:
        raise ValidationError("record header needs an execution_id and an attempt >= 1")
    if inner.lifetime_id != outer.lifetime_id:
        raise ValidationError("record and envelope disagree on the lifetime id")
    # What the store refuses must be refused here: a record the store rejects after it
    # passed this check would fail its whole batch, which is then redelivered forever.
    if not inner.lifetime_id:
        raise ValidationError("record header needs a lifetime_id")
    check_token(inner.lifetime_id, "lifetime id")  # its ref is published under it
    if (inner.execution_id, inner.attempt) != (outer.execution_id, outer.attempt):
        raise ValidationError("record and envelope disagree on the execution id or attempt")
    # The store keeps these as text columns, which in PostgreSQL cannot hold a NUL.
    node = outer.node
    if "\x00" in f"{outer.execution_id}{node.id}{outer.graph.id}{node.handler}":
        for what, value in (
            ("execution id", outer.execution_id),
            ("node id", node.id),
            ("graph id", outer.graph.id),
            ("handler", node.handler),
        ):
            if "\x00" in value:
                raise ValidationError(f"record {what} {value!r} holds a NUL character")
    check_telemetry(record.result.telemetry)


def check_telemetry(telemetry: telemetry_pb2.Telemetry) -> None:
    """What an execution reports it consumed must be summable: each token and cost figure
    within 0..MAX_USAGE (the per-model ones too), each custom metric a finite number.

    Raises:
        ValidationError: Naming the first figure out of range.
    """
    t = telemetry
    if (
        0 <= t.input_tokens <= MAX_USAGE
        and 0 <= t.output_tokens <= MAX_USAGE
        and 0 <= t.cost_micros <= MAX_USAGE
        and not t.model_usage
        and not t.custom_metrics
    ):
        return  # nearly every record: three comparisons, no loop
    _check_usage(t, "telemetry")
    for i, usage in enumerate(t.model_usage):
        _check_usage(usage, f"telemetry.model_usage[{i}]")
    for name, value in t.custom_metrics.items():
        if not math.isfinite(value):
            raise ValidationError(
                f"telemetry.custom_metrics[{name!r}] is {value}: expected a finite number"
            )


def _check_usage(usage: telemetry_pb2.Telemetry | telemetry_pb2.ModelUsage, where: str) -> None:
    for field in _USAGE_FIELDS:
        value = getattr(usage, field)
        if not 0 <= value <= MAX_USAGE:
            raise ValidationError(
                f"{where}.{field} is {value}: expected 0 to {MAX_USAGE:,} (2**40) per execution"
            )


async def records_stored(
    js: JetStreamContext, names: TenantNames, *, within_s: float = STORED_WAIT_S
) -> bool:
    """Wait until every record the tenant's record stream held when this was called is
    stored (or dead-lettered) by the state service; False if that took longer than
    ``within_s``.

    The state service acks a record once it is committed and counted, so its consumer's
    ack floor says how far the store has come. One consumer-info request when it is idle.
    """
    return await consumer_caught_up(
        js, names.exec_stream, names.state_consumer, within_s=within_s, what="records"
    )


async def consumer_caught_up(
    js: JetStreamContext, stream: str, durable: str, *, within_s: float, what: str
) -> bool:
    """Wait until durable consumer ``durable`` has acked every message ``stream`` held
    for it when this was called; False if that took longer than ``within_s``."""
    info = await js.consumer_info(stream, durable)
    if not info.num_pending and not info.num_ack_pending:
        return True
    # Everything up to the last message delivered or waiting now must be acked.
    target = (info.delivered.stream_seq or 0) + (info.num_pending or 0)
    deadline = time.monotonic() + within_s
    while (info.ack_floor.stream_seq or 0) < target:
        if time.monotonic() >= deadline:
            logger.warning(
                "%s on %s up to stream sequence %d not stored within %.1f s",
                what,
                stream,
                target,
                within_s,
            )
            return False
        await asyncio.sleep(STORED_POLL_S)
        info = await js.consumer_info(stream, durable)
    return True


async def require_records_stored(
    stored: Callable[[str], Awaitable[bool]], tenant: str, *, what: str = "execution records"
) -> None:
    """For a reader of the store: wait with ``stored`` (e.g. the state service's
    ``caught_up``, or ``events_stored`` for ``what`` = lifetime events); UNAVAILABLE if the
    wait fails, rather than answer without a record the caller may have seen the effect of."""
    if not await stored(tenant):
        raise StatusError(
            StatusCode.UNAVAILABLE,
            f"the state service is still storing the {what} on the bus (retry shortly)",
        )
