"""Lifetime events as the router publishes them: one decision's envelope, and a batch of
decisions on a tenant's events subject (for driving the state service's consumer)."""

from __future__ import annotations

from collections.abc import Sequence

from nats.aio.client import Client as NatsClient

from tests.support.factories import make_envelope
from tickmesh.runtime.subjects import HDR_MSG_ID, HDR_TENANT, HDR_TYPE, TenantNames
from tickmesh.sdk import encode_envelope, encode_event_batch
from tickmesh.v1 import envelope_pb2, header_pb2


def decision_events(
    tenant: str, lifetime_id: str, sequences: Sequence[int]
) -> envelope_pb2.ExecutionEnvelope:
    """One decision's events envelope, as the router encodes it."""
    envelope = make_envelope("lifetime_events")
    envelope.header.tenant_id = tenant
    envelope.header.lifetime_id = lifetime_id
    envelope.header.sequence = sequences[0]
    template = envelope.lifetime_events.events[0]
    del envelope.lifetime_events.events[:]
    for sequence in sequences:
        event = envelope.lifetime_events.events.add()
        event.CopyFrom(template)
        event.sequence = sequence
    return envelope


async def publish_event_batch(
    nc: NatsClient, tenant: str, msg_id: str, decisions: Sequence[envelope_pb2.ExecutionEnvelope]
) -> None:
    """Publish ``decisions`` as one batch on ``tenant``'s events subject."""
    header = header_pb2.EnvelopeHeader(tenant_id=tenant)
    await nc.jetstream().publish(
        TenantNames(tenant).evb,
        encode_event_batch(header, [encode_envelope(d) for d in decisions]),
        headers={HDR_TYPE: "lifetime_event_batch", HDR_MSG_ID: msg_id, HDR_TENANT: tenant},
    )
