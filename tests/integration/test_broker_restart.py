"""The runtime across a nats-server SIGKILL and restart: what was waiting on the dead
connection goes on at once, not after a publish timeout or a pull request's expiry.

To have a publish or a KV write surely in flight when the server dies, the server is
paused (SIGSTOP: the connection stays up, nothing is answered) before it is sent, then
SIGKILLed and started again on the same ports and store.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats import errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import KeyWrongLastSequenceError

from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.consumer import PULL_EXPIRES_S, BatchConsumer, durable_config
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.subjects import HDR_MSG_ID

pytestmark = pytest.mark.timeout(60)

PROMPT_S = 2.0
"""Well under the publish timeout (10 s) and the lost-pull detection (7.5 s)."""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    srv = EmbeddedNats(data_dir=tmp_path / "nats", sync_always=True)
    await asyncio.to_thread(srv.start)
    try:
        yield srv
    finally:
        await asyncio.to_thread(srv.cleanup)


async def crash(srv: EmbeddedNats, *, down_s: float = 0.2) -> None:
    """SIGKILL the (paused or running) server and start it again on its store. A paused
    server dies without running again: what it was sent is never answered."""
    await asyncio.to_thread(srv.stop, kill=True)
    await asyncio.sleep(down_s)
    srv.port, srv.http_port = srv.client_port, srv.monitor_port
    await asyncio.to_thread(srv.start)


def pause(srv: EmbeddedNats) -> None:
    assert srv.process is not None
    srv.process.send_signal(signal.SIGSTOP)


async def connect(srv: EmbeddedNats) -> tuple[NatsClient, JetStreamContext]:
    nc = await tm_nats.connect(srv.url, name="broker-restart-test")
    return nc, tm_nats.jetstream(nc)


async def test_a_publish_in_flight_when_the_server_dies_is_acked_soon_after_it_is_back(
    server: EmbeddedNats,
) -> None:
    nc, js = await connect(server)
    try:
        await js.add_stream(StreamConfig(name="S", subjects=["s.>"], duplicate_window=60))
        batch = [tm_nats.Outgoing("s.x", f"m{i}".encode(), {HDR_MSG_ID: f"m{i}"}) for i in range(5)]
        await tm_nats.publish_batch(js, batch[:2])  # two already stored
        pause(server)
        publishing = asyncio.create_task(tm_nats.publish_batch(js, batch))
        await asyncio.sleep(0.3)
        assert not publishing.done()
        await crash(server)
        back = time.monotonic()
        acks = await publishing
        waited = time.monotonic() - back
        info = await js.stream_info("S")
    finally:
        await nc.close()
    assert len(acks) == 5
    assert waited < PROMPT_S, waited
    assert info.state.messages == 5  # the retry of the two stored ones was deduplicated


async def test_a_publish_without_an_id_fails_at_once_when_the_connection_drops(
    server: EmbeddedNats,
) -> None:
    nc, js = await connect(server)
    try:
        await js.add_stream(StreamConfig(name="S", subjects=["s.>"]))
        pause(server)
        publishing = asyncio.create_task(
            tm_nats.publish_batch(js, [tm_nats.Outgoing("s.x", b"no id")])
        )
        await asyncio.sleep(0.3)
        await crash(server)
        with pytest.raises(tm_nats.PublishError) as raised:
            await publishing
    finally:
        await nc.close()
    ((_, error),) = raised.value.failures
    assert isinstance(error, tm_nats.LinkLostError)


async def test_a_kv_write_in_flight_when_the_server_dies_fails_promptly_as_a_timeout(
    server: EmbeddedNats,
) -> None:
    nc, js = await connect(server)
    try:
        kv = await js.create_key_value(KeyValueConfig(bucket="b"))
        revision = await kv.put("k", b"v1")
        pause(server)
        writing = asyncio.create_task(kv.update("k", b"v2", last=revision))
        await asyncio.sleep(0.3)
        began = time.monotonic()
        # The reply is lost with the server: the wait ends when the drop is noticed.
        await crash(server, down_s=1.0)
        # nats-py turns the LinkLostError into its own timeout error: callers see a timeout.
        with pytest.raises(nats_errors.TimeoutError):
            await writing
        assert writing.done()
        failed_within = time.monotonic() - began
        entry = await kv.get("k")
        assert entry.value is not None
        # Whether it landed or not, a retry on the revision read is a compare-and-set:
        # it lands once, or conflicts (the caller reloads).
        if entry.value == b"v1":
            await kv.update("k", b"v2", last=revision)
        else:
            with pytest.raises(KeyWrongLastSequenceError):
                await kv.update("k", b"v2", last=revision)
    finally:
        await nc.close()
    # Failed before the server was back (down 1 s), not after the 10 s publish timeout.
    assert failed_within < 1.0 + PROMPT_S, failed_within


async def test_a_consumer_asks_again_as_soon_as_the_connection_is_back(
    server: EmbeddedNats,
) -> None:
    nc, js = await connect(server)
    received: list[tuple[float, bytes]] = []
    got = asyncio.Event()

    async def handler(batch: list[Msg]) -> None:
        for m in batch:
            received.append((time.monotonic(), m.data))
            await m.ack()
        got.set()

    await js.add_stream(StreamConfig(name="S", subjects=["s.>"]))
    consumer = BatchConsumer(
        nc,
        js,
        stream="S",
        config=durable_config("c", "s.>", ack_wait_s=30),
        handler=handler,
        max_batch=8,
    )
    try:
        await consumer.start()
        await js.publish("s.x", b"before")
        async with asyncio.timeout(5):
            await got.wait()
        got.clear()
        await asyncio.sleep(0.5)  # the renewed pull request is waiting on the server
        await crash(server)
        back = time.monotonic()
        async with asyncio.timeout(10):
            while True:
                try:
                    await js.publish("s.x", b"after")
                    break
                except Exception:  # still reconnecting
                    await asyncio.sleep(0.05)
            await got.wait()
        waited = received[-1][0] - back
    finally:
        await consumer.stop()
        await nc.close()
    assert [d for _, d in received] == [b"before", b"after"]
    assert waited < min(PROMPT_S, PULL_EXPIRES_S), waited
