"""The fault proxy, mode by mode, in front of a trivial echo server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.chaos.proxy import FaultProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy("127.0.0.1", port) as fault_proxy:
        yield fault_proxy
    server.close()
    await server.wait_closed()


async def _connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def _roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, within: float = 2.0
) -> bytes:
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(within):
        return await reader.readexactly(len(data))


async def _ended(reader: asyncio.StreamReader, within: float = 2.0) -> bool:
    """Whether the connection ends (EOF or reset) within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            return await reader.read(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


async def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    assert await _roundtrip(reader, writer, b"hello") == b"hello"
    big = bytes(range(256)) * 4096  # 1 MiB, several chunks
    assert await _roundtrip(reader, writer, big) == big
    writer.close()


async def test_delay_holds_each_chunk(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    await _roundtrip(reader, writer, b"warm")
    proxy.set("delay", delay_ms=200)
    started = time.monotonic()
    assert await _roundtrip(reader, writer, b"slow") == b"slow"
    assert time.monotonic() - started >= 0.4  # both directions delayed
    proxy.set("pass")
    started = time.monotonic()
    await _roundtrip(reader, writer, b"fast")
    assert time.monotonic() - started < 0.2
    writer.close()


async def test_drop_new_refuses_new_connections_and_keeps_open_ones(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    await _roundtrip(reader, writer, b"before")
    proxy.set("drop_new")
    new_reader, new_writer = await _connect(proxy)
    assert await _ended(new_reader)
    new_writer.close()
    assert await _roundtrip(reader, writer, b"still") == b"still"
    proxy.set("pass")
    again_reader, again_writer = await _connect(proxy)
    assert await _roundtrip(again_reader, again_writer, b"back") == b"back"
    for w in (writer, again_writer):
        w.close()


async def test_reset_all_closes_every_open_connection(proxy: FaultProxy) -> None:
    pairs = [await _connect(proxy) for _ in range(3)]
    for reader, writer in pairs:
        await _roundtrip(reader, writer, b"x")
    assert proxy.connections == 3
    assert proxy.reset_all() == 3
    for reader, _ in pairs:
        assert await _ended(reader)
    assert proxy.connections == 0
    reader, writer = await _connect(proxy)  # the mode is unchanged: new ones pass
    assert await _roundtrip(reader, writer, b"new") == b"new"
    writer.close()


async def test_blackhole_accepts_and_holds_until_released(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    await _roundtrip(reader, writer, b"open")
    proxy.set("blackhole")
    new_reader, new_writer = await _connect(proxy)  # accepted...
    for r, w in ((reader, writer), (new_reader, new_writer)):
        w.write(b"held")
        await w.drain()
        with pytest.raises(TimeoutError):  # ...and never answered
            async with asyncio.timeout(0.3):
                await r.read(1)
    proxy.set("pass")
    for r in (reader, new_reader):
        async with asyncio.timeout(2):
            assert await r.readexactly(4) == b"held"
    for w in (writer, new_writer):
        w.close()


async def test_close_ends_connections_and_the_listener() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    fault_proxy = await FaultProxy("127.0.0.1", server.sockets[0].getsockname()[1]).start()
    reader, writer = await _connect(fault_proxy)
    await _roundtrip(reader, writer, b"x")
    fault_proxy.set("blackhole")
    held_reader, held_writer = await _connect(fault_proxy)
    await asyncio.sleep(0.05)
    await fault_proxy.close()
    assert await _ended(reader)
    assert await _ended(held_reader)
    with pytest.raises(ConnectionRefusedError):
        await _connect(fault_proxy)
    for w in (writer, held_writer):
        w.close()
    server.close()
    await server.wait_closed()
