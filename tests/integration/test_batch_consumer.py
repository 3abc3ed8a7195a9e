"""BatchConsumer against a real JetStream: a failed batch comes back soon (not after
ack_wait), a small batch lingers for more, and a hurried consumer hands it over at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from tests.support.nats_server import new_tenant
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.consumer import (
    RETRY_FAILED_BATCH_S,
    BatchConsumer,
    BatchHandler,
    durable_config,
)
from tickmesh.runtime.embedded_nats import EmbeddedNats

ACK_WAIT_S = 30.0


@contextlib.asynccontextmanager
async def consumer_of_new_stream(
    nats_server: EmbeddedNats, handler: BatchHandler, *, max_batch: int, linger_s: float = 0.0
) -> AsyncIterator[tuple[JetStreamContext, str, BatchConsumer]]:
    """A stream of its own and a BatchConsumer of it (not started); both go afterwards."""
    nc = await tm_nats.connect(nats_server.url, name="batch-consumer-test")
    js = tm_nats.jetstream(nc)
    stream = new_tenant("bc")
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
    consumer = BatchConsumer(
        nc,
        js,
        stream=stream,
        config=durable_config("c", f"{stream}.>", ack_wait_s=ACK_WAIT_S),
        handler=handler,
        max_batch=max_batch,
        linger_s=linger_s,
    )
    try:
        yield js, stream, consumer
    finally:
        await consumer.stop()
        await js.delete_stream(stream)
        await nc.close()


async def test_a_batch_whose_handler_raises_is_redelivered_well_before_ack_wait(
    nats_server: EmbeddedNats,
) -> None:
    deliveries: list[tuple[float, bytes]] = []
    settled = asyncio.Event()

    async def handler(batch: list[Msg]) -> None:
        deliveries.extend((time.monotonic(), m.data) for m in batch)
        if len(deliveries) <= 3:  # the first batch fails, as when the store is restarting
            raise ConnectionError("store unreachable")
        for m in batch:
            await m.ack()
        if len({data for _, data in deliveries}) == 3 and len(deliveries) >= 6:
            settled.set()

    async with consumer_of_new_stream(nats_server, handler, max_batch=16) as (js, stream, consumer):
        for i in range(3):
            await js.publish(f"{stream}.x", f"m{i}".encode())
        await consumer.start()
        async with asyncio.timeout(ACK_WAIT_S / 2):
            await settled.wait()

    first, again = deliveries[:3], deliveries[3:]
    assert sorted(d for _, d in again) == sorted(d for _, d in first) == [b"m0", b"m1", b"m2"]
    waited = again[0][0] - first[-1][0]
    assert RETRY_FAILED_BATCH_S * 0.8 <= waited < ACK_WAIT_S / 3, waited


async def batches_of(
    nats_server: EmbeddedNats, *, linger_s: float, max_batch: int, publish: list[list[bytes]]
) -> list[list[bytes]]:
    """The batches a consumer hands over when ``publish``'s groups arrive 0.1 s apart."""
    batches: list[list[bytes]] = []
    expected = sum(len(group) for group in publish)
    done = asyncio.Event()

    async def handler(batch: list[Msg]) -> None:
        batches.append([m.data for m in batch])
        for m in batch:
            await m.ack()
        if sum(len(b) for b in batches) >= expected:
            done.set()

    async with consumer_of_new_stream(
        nats_server, handler, max_batch=max_batch, linger_s=linger_s
    ) as (js, stream, consumer):
        await consumer.start()
        for group in publish:
            for data in group:
                await js.publish(f"{stream}.x", data)
            await asyncio.sleep(0.1)
        async with asyncio.timeout(5):
            await done.wait()
    return batches


async def test_a_lingering_consumer_lets_a_small_batch_grow(nats_server: EmbeddedNats) -> None:
    groups = [[b"a"], [b"b", b"c"]]
    # Without a linger the first message is handed over alone, at once.
    at_once = await batches_of(nats_server, linger_s=0, max_batch=16, publish=groups)
    assert at_once[0] == [b"a"]
    assert [m for batch in at_once for m in batch] == [b"a", b"b", b"c"]
    # Messages arriving within the linger join the first batch.
    assert await batches_of(nats_server, linger_s=0.5, max_batch=16, publish=groups) == [
        [b"a", b"b", b"c"]
    ]


async def test_a_full_batch_does_not_linger(nats_server: EmbeddedNats) -> None:
    began = time.monotonic()
    batches = await batches_of(
        nats_server, linger_s=30.0, max_batch=2, publish=[[b"a", b"b"], [b"c", b"d"]]
    )
    assert batches == [[b"a", b"b"], [b"c", b"d"]]
    assert time.monotonic() - began < 5


async def test_a_hurried_consumer_hands_over_a_lingering_batch_at_once_and_lingers_no_more(
    nats_server: EmbeddedNats,
) -> None:
    handed: list[list[bytes]] = []
    arrived = asyncio.Event()

    async def handler(batch: list[Msg]) -> None:
        handed.append([m.data for m in batch])
        for m in batch:
            await m.ack()
        arrived.set()

    async def handed_within(seconds: float) -> list[bytes]:
        async with asyncio.timeout(seconds):
            await arrived.wait()
        arrived.clear()
        return handed[-1]

    async with consumer_of_new_stream(nats_server, handler, max_batch=16, linger_s=30.0) as (
        js,
        stream,
        consumer,
    ):
        await consumer.start()
        await js.publish(f"{stream}.x", b"a")
        await asyncio.sleep(0.3)
        assert handed == []  # lingering: it would wait 30 s for more
        with consumer.hurrying():
            # The lingering batch is handed over now, and while a reader is hurrying
            # a new message is handed over alone, at once.
            assert await handed_within(2) == [b"a"]
            await js.publish(f"{stream}.x", b"b")
            assert await handed_within(2) == [b"b"]
        # Once nobody hurries, a small batch lingers again.
        await js.publish(f"{stream}.x", b"c")
        await asyncio.sleep(0.3)
        assert handed == [[b"a"], [b"b"]]
