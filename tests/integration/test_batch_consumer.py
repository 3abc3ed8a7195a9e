"""BatchConsumer against a real JetStream: a failed batch comes back soon, not after ack_wait."""

from __future__ import annotations

import asyncio
import time

from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from tests.support.nats_server import new_tenant
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.consumer import RETRY_FAILED_BATCH_S, BatchConsumer, durable_config
from tickmesh.runtime.embedded_nats import EmbeddedNats

ACK_WAIT_S = 30.0


async def test_a_batch_whose_handler_raises_is_redelivered_well_before_ack_wait(
    nats_server: EmbeddedNats,
) -> None:
    nc = await tm_nats.connect(nats_server.url, name="batch-consumer-test")
    js = tm_nats.jetstream(nc)
    stream = new_tenant("bc")
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
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

    consumer = BatchConsumer(
        nc,
        js,
        stream=stream,
        config=durable_config("c", f"{stream}.>", ack_wait_s=ACK_WAIT_S),
        handler=handler,
        max_batch=16,
    )
    try:
        for i in range(3):
            await js.publish(f"{stream}.x", f"m{i}".encode())
        await consumer.start()
        async with asyncio.timeout(ACK_WAIT_S / 2):
            await settled.wait()
    finally:
        await consumer.stop()
        await js.delete_stream(stream)
        await nc.close()

    first, again = deliveries[:3], deliveries[3:]
    assert sorted(d for _, d in again) == sorted(d for _, d in first) == [b"m0", b"m1", b"m2"]
    waited = again[0][0] - first[-1][0]
    assert RETRY_FAILED_BATCH_S * 0.8 <= waited < ACK_WAIT_S / 3, waited
