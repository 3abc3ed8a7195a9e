"""Services serving several tenant accounts in one process set, each tenant through its own
connection (``nats_tenant_dir``): a nats-server with rendered accounts, and router, state,
guardrail and executor pool built as ``serve()`` builds them, with no shared credentials."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import examples.hello.handlers as hello
from tests.support.nats_configs import NatsServers
from tests.support.tenant_accounts import AccountsServer, provision, start_accounts_server
from tickmesh.executor_pool import server as pool_server
from tickmesh.executor_pool.config import ExecutorPoolSettings
from tickmesh.guardrail import server as guardrail_server
from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.router import server as router_server
from tickmesh.router.config import RouterSettings
from tickmesh.runtime.adapters import open_blob_store
from tickmesh.runtime.lifecycle import Service, open_tenant_links
from tickmesh.runtime.tenancy import EXECUTOR, SERVICE, Limits
from tickmesh.runtime.tenant_links import TenantLinks
from tickmesh.sdk import Client, Worker, load_graph_file
from tickmesh.state import server as state_server
from tickmesh.state.config import StateSettings
from tickmesh.state.store import StateStore

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello" / "graph.yaml"
TENANTS = ("a", "b")
INSTANCE = "e2e"
WAIT_S = 20.0


@pytest.fixture
async def accounts(servers: NatsServers, tmp_path: Path) -> AccountsServer:
    server = start_accounts_server(servers, tmp_path, dict.fromkeys(TENANTS, Limits()))
    for tenant in TENANTS:
        await provision(server, tenant)
    return server


@dataclass
class Services:
    """Services started against a server with tenant accounts, and their links."""

    accounts: AccountsServer
    root: Path
    links: dict[str, TenantLinks] = field(default_factory=dict)
    started: list[Service] = field(default_factory=list)
    store: StateStore | None = None
    state: state_server.StateService | None = None
    router: router_server.RouterService | None = None
    pool: pool_server.ExecutorPoolService | None = None
    _opened: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def common(self) -> dict[str, Any]:
        # No shared credentials: every connection is a tenant's.
        return {
            "nats_url": self.accounts.url,
            "nats_tenant_dir": str(self.accounts.directory.path),
            "tenants": list(TENANTS),
            "instance": INSTANCE,
            "log_json": False,
            "grpc_listen": "127.0.0.1:0",
        }

    async def _links(self, settings: Any, name: str, role: str) -> TenantLinks:
        links = await open_tenant_links(settings, name, role)
        self.links[name] = links
        return links

    async def start_state(self) -> state_server.StateService:
        settings = StateSettings(
            **self.common(),
            store_url=f"sqlite:///{self.root / 'state.db'}",
            blob_url=str(self.root / "blobs"),
        )
        self.store = await state_server.open_settings_store(settings)
        self._opened.push_async_callback(self.store.close)
        blobs = await open_blob_store(settings.blob_url)
        self._opened.push_async_callback(blobs.close)
        self.state = await state_server.build(
            settings,
            links=await self._links(settings, "state", SERVICE),
            store=self.store,
            blobs=blobs,
        )
        await self._start(self.state)
        return self.state

    async def start_all(self) -> None:
        state = await self.start_state()
        guardrail = await guardrail_server.build(
            GuardrailSettings(**self.common()),
            links=await self._links(GuardrailSettings(**self.common()), "guardrail", SERVICE),
        )
        await self._start(guardrail)
        router_settings = RouterSettings(**self.common(), state_target=state.target)
        self.router = await router_server.build(
            router_settings, links=await self._links(router_settings, "router", SERVICE)
        )
        await self._start(self.router)
        pool_settings = ExecutorPoolSettings(
            **self.common(), blob_url=str(self.root / "blobs"), ack_wait_s=5.0
        )
        blobs = await open_blob_store(pool_settings.blob_url)
        self._opened.push_async_callback(blobs.close)
        self.pool = await pool_server.build(
            pool_settings,
            links=await self._links(pool_settings, "executor-pool", EXECUTOR),
            blobs=blobs,
        )
        await self._start(self.pool)

    async def _start(self, service: Service) -> None:
        self.started.append(service)
        await service.start()

    async def stop(self) -> None:
        for service in reversed(self.started):
            with contextlib.suppress(Exception):
                await service.stop()
        for links in self.links.values():
            await links.close()
        await self._opened.aclose()


@pytest.fixture
async def services(accounts: AccountsServer, tmp_path: Path) -> AsyncIterator[Services]:
    running = Services(accounts, tmp_path / "mesh")
    running.root.mkdir()
    try:
        yield running
    finally:
        await running.stop()


async def connz(monitor_url: str) -> list[dict[str, Any]]:
    def fetch() -> Any:
        with urllib.request.urlopen(f"{monitor_url}/connz?auth=true&limit=1024", timeout=5) as r:
            return json.loads(r.read())

    report = await asyncio.to_thread(fetch)
    return list(report.get("connections") or [])


async def run_hello(router: str, pool: str, tenant: str) -> dict[str, Any]:
    async with (
        await Client.connect(router, tenant=tenant) as client,
        Worker(pool, tenant=tenant, tasks=[hello.greet, hello.decide, hello.shout]) as worker,
    ):
        await worker.wait_connected()
        graph = await client.register_graph(load_graph_file(HELLO))
        handle = await client.start_lifetime(graph.id, {"name": tenant}, version=graph.version)
        result: dict[str, Any] = await handle.result(within=WAIT_S)
        return result


__all__ = ["Services", "accounts", "connz", "run_hello", "services"]
