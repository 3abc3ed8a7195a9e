"""A call the router cannot serve because NATS is down answers UNAVAILABLE — the status
callers retry on, the Python SDK's ``TransportError`` — with the bus's reason, and no
traceback per call in the log; once NATS is back, the retried call (same request id)
starts its lifetime once, and the lifetime runs to the end.

The mesh runs on a nats-server of its own, stopped and started again on the same
ports and store (the session's server is shared by the other tests)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import examples.hello.handlers as hello
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.sdk import Client, TransportError, Worker, load_graph_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello" / "graph.yaml"
BACK_WITHIN_S = 30.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    srv = EmbeddedNats(data_dir=tmp_path / "nats")
    await asyncio.to_thread(srv.start)
    try:
        yield srv
    finally:
        await asyncio.to_thread(srv.cleanup)


@pytest.fixture
async def mesh(server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Mesh]:
    running = Mesh(MeshConfig(nats_url=server.url, tenants=("acme",), data_dir=tmp_path / "mesh"))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_a_call_during_a_nats_outage_is_unavailable_and_goes_through_once_it_is_back(
    server: EmbeddedNats, mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        await Client.connect(mesh.router_target, tenant="acme") as client,
        Worker(mesh.pool_target, tenant="acme", tasks=[hello.greet, hello.decide, hello.shout]),
    ):
        graph = await client.register_graph(load_graph_file(HELLO))
        before = await client.start_lifetime(graph.id, {"name": "before"})
        assert await before.result(within=30) == {"greeting": "HELLO, BEFORE!"}

        await asyncio.to_thread(server.stop)
        started = time.monotonic()
        with pytest.raises(TransportError) as refused:  # the SDK's name for UNAVAILABLE
            await client.start_lifetime(graph.id, {"name": "after"}, request_id="outage-1")
        took = time.monotonic() - started
        assert str(refused.value).startswith("NATS did not answer"), refused.value
        assert took < 20, f"answered after {took:.1f} s"

        server.port, server.http_port = server.client_port, server.monitor_port
        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + BACK_WITHIN_S
        after = None
        while after is None:  # what a caller does with UNAVAILABLE: retry, same request id
            try:
                after = await client.start_lifetime(
                    graph.id, {"name": "after"}, request_id="outage-1"
                )
            except TransportError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"NATS back, calls still refused: {exc}") from exc
                await asyncio.sleep(0.2)
        assert await after.result(within=30) == {"greeting": "HELLO, AFTER!"}
        again = await client.start_lifetime(graph.id, {"name": "after"}, request_id="outage-1")
        assert again.id == after.id
        listed = [lt.lifetime_id for lt in await client.list_lifetimes()]
        assert sorted(listed) == sorted([before.id, after.id])

    unexpected = [r for r in caplog.records if r.getMessage().startswith("unexpected error")]
    assert unexpected == []
    said = [r for r in caplog.records if "answering UNAVAILABLE" in r.getMessage()]
    assert said
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in said)
