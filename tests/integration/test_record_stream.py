"""The record stream: two services read every record (the state service stores it, the
router decides on it), so the stream keeps a record until both have acked it, and
both durable consumers exist from the moment the stream does. A stream made by an
earlier version (a work queue, read by the state service alone) is recreated when it
is empty and refused, with nothing lost, when it is not. Against a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StreamConfig

from tests.support.nats_server import new_tenant
from tickmesh.runtime.consumer import durable_config, ensure_consumer
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.nats import jetstream
from tickmesh.runtime.streams import DUPLICATE_WINDOW_S, EVENT_MAX_AGE_S, ensure_tenant
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import ConfigError


@pytest.fixture
async def js(nats_server: EmbeddedNats) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    yield jetstream(nc)
    await nc.close()


async def fetch_one(js: JetStreamContext, names: TenantNames, durable: str) -> Msg:
    sub = await js.pull_subscribe(names.exec_all, durable=durable, stream=names.exec_stream)
    (msg,) = await sub.fetch(1, timeout=2)
    return msg


async def held(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.messages


async def test_a_record_published_before_any_service_starts_reaches_both_readers(
    js: JetStreamContext,
) -> None:
    names = await ensure_tenant(js, new_tenant("rec"))
    info = await js.stream_info(names.exec_stream)
    assert info.config.retention == RetentionPolicy.INTEREST
    # Both readers exist with the stream: an interest stream keeps nothing for a
    # consumer that is not there yet.
    for durable in (names.state_consumer, names.router_record_consumer):
        consumer = await js.consumer_info(names.exec_stream, durable)
        assert consumer.config.filter_subject == names.exec_all

    await js.publish(names.exec("lt1"), b"record")
    assert await held(js, names.exec_stream) == 1

    state_copy = await fetch_one(js, names, names.state_consumer)
    await state_copy.ack_sync()
    # Stored, not yet routed: the router's copy is still there.
    assert await held(js, names.exec_stream) == 1

    router_copy = await fetch_one(js, names, names.router_record_consumer)
    assert router_copy.data == b"record"
    await router_copy.ack_sync()
    assert await held(js, names.exec_stream) == 0


async def test_provisioning_again_keeps_the_ack_wait_a_service_set(js: JetStreamContext) -> None:
    names = await ensure_tenant(js, new_tenant("rec"))
    await ensure_consumer(
        js,
        names.exec_stream,
        durable_config(names.router_record_consumer, names.exec_all, ack_wait_s=1.5),
    )
    await ensure_tenant(js, names.tenant)
    consumer = await js.consumer_info(names.exec_stream, names.router_record_consumer)
    assert consumer.config.ack_wait == pytest.approx(1.5)


async def test_an_event_stream_age_an_operator_set_is_kept(js: JetStreamContext) -> None:
    """Operators shorten how long the event stream keeps events with `nats stream edit`
    (docs/operators.md); a service starting again keeps what it finds."""
    names = await ensure_tenant(js, new_tenant("rec"))
    info = await js.stream_info(names.evt_stream)
    assert info.config.max_age == pytest.approx(EVENT_MAX_AGE_S)
    await js.update_stream(replace(info.config, max_age=3600.0))

    await ensure_tenant(js, names.tenant)

    assert (await js.stream_info(names.evt_stream)).config.max_age == pytest.approx(3600.0)


async def earlier_version_stream(js: JetStreamContext, names: TenantNames) -> None:
    await js.add_stream(
        StreamConfig(
            name=names.exec_stream,
            subjects=[names.exec_all],
            retention=RetentionPolicy.WORK_QUEUE,
            duplicate_window=DUPLICATE_WINDOW_S,
            deny_delete=True,
            deny_purge=True,
        )
    )
    await ensure_consumer(
        js, names.exec_stream, durable_config(names.state_consumer, names.exec_all, ack_wait_s=30)
    )


async def test_an_empty_work_queue_from_an_earlier_version_is_recreated(
    js: JetStreamContext,
) -> None:
    names = TenantNames(new_tenant("rec"))
    await earlier_version_stream(js, names)

    await ensure_tenant(js, names.tenant)

    info = await js.stream_info(names.exec_stream)
    assert info.config.retention == RetentionPolicy.INTEREST
    assert info.config.deny_purge  # what the operator's provisioning set is kept
    await js.consumer_info(names.exec_stream, names.router_record_consumer)
    await js.publish(names.exec("lt1"), b"record")
    assert await held(js, names.exec_stream) == 1


async def test_a_work_queue_that_still_holds_records_is_refused_and_keeps_them(
    js: JetStreamContext,
) -> None:
    names = TenantNames(new_tenant("rec"))
    await earlier_version_stream(js, names)
    for i in range(3):
        await js.publish(names.exec(f"lt{i}"), b"record")

    with pytest.raises(ConfigError) as refused:
        await ensure_tenant(js, names.tenant)

    message = str(refused.value)
    assert names.exec_stream in message
    assert "3 message(s)" in message
    assert "drain" in message
    info = await js.stream_info(names.exec_stream)
    assert info.config.retention == RetentionPolicy.WORK_QUEUE
    assert info.state.messages == 3
    # The state service of the earlier version can still drain it.
    msg = await fetch_one(js, names, names.state_consumer)
    await msg.ack_sync()
    assert await held(js, names.exec_stream) == 2


async def test_an_event_stream_made_before_batches_keeps_batches_and_its_old_events(
    js: JetStreamContext,
) -> None:
    """A version before kept one message per decision on each lifetime's subject: its event
    stream moves to the batch subject (the lifetime subjects are live only now: were it to
    keep taking them, every live message would be stored again), what it held stays, and
    the state service's events consumer, made again with the new filter, reads batches."""
    names = TenantNames(new_tenant())
    await ensure_tenant(js, names.tenant)
    old = (await js.stream_info(names.evt_stream)).config
    await js.update_stream(replace(old, subjects=[names.evt_all]))
    durable = "state_events"
    await ensure_consumer(
        js, names.evt_stream, durable_config(durable, names.evt_all, ack_wait_s=30)
    )
    await js.publish(names.evt("lt1"), b"kept", headers={"Tickmesh-Type": "lifetime_event"})

    await ensure_tenant(js, names.tenant)
    info = await js.stream_info(names.evt_stream)
    assert info.config.subjects == [names.evb]
    assert info.state.messages == 1
    # A lifetime's subject is no longer stored: a JetStream publish to it finds no stream.
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await js.publish(names.evt("lt1"), b"live", timeout=1)

    await ensure_consumer(js, names.evt_stream, durable_config(durable, names.evb, ack_wait_s=30))
    assert (await js.consumer_info(names.evt_stream, durable)).config.filter_subject == names.evb
    await js.publish(names.evb, b"batch", headers={"Tickmesh-Type": "lifetime_event_batch"})
    sub = await js.pull_subscribe(names.evb, durable=durable, stream=names.evt_stream)
    (msg,) = await sub.fetch(1, timeout=2)
    assert msg.data == b"batch"
