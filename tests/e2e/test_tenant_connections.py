"""One set of services serves two tenant accounts, each through its own connection.

A nats-server includes the accounts rendered for tenants a and b. One router, state,
guardrail and executor pool (in process, built as ``serve()`` builds them) are given
the tenant directory (``nats_tenant_dir``) and no shared credentials: each holds one
connection per tenant, as that tenant's ``service`` user (the pool: ``executor``).
A lifetime runs for each tenant; the monitoring endpoint shows every service's
connection of a tenant in that tenant's account; the server logs no permission
violation. A record that claims tenant b, published with a's credentials on a's
subject, is dead-lettered in a's account and never stored under b.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import examples.hello.handlers as hello
from tests.support.factories import LIFETIME_ID
from tests.support.nats_configs import NatsServers, require_nats_server
from tests.support.records import exec_id, execution_record
from tests.support.tenant_accounts import (
    AccountsServer,
    jsz_accounts,
    login,
    provision,
    start_accounts_server,
)
from tickmesh.executor_pool import server as pool_server
from tickmesh.executor_pool.config import ExecutorPoolSettings
from tickmesh.guardrail import server as guardrail_server
from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.router import server as router_server
from tickmesh.router.config import RouterSettings
from tickmesh.runtime.adapters import open_blob_store
from tickmesh.runtime.lifecycle import Service, open_tenant_links
from tickmesh.runtime.subjects import HDR_MSG_ID, HDR_TENANT, HDR_TYPE, TenantNames
from tickmesh.runtime.tenancy import (
    EXECUTOR,
    EXECUTOR_INBOX_PREFIX,
    SERVICE,
    Limits,
    tenant_streams,
)
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
def servers(tmp_path: Path) -> Iterator[NatsServers]:
    require_nats_server()
    started = NatsServers(tmp_path / "servers")
    try:
        yield started
    finally:
        started.stop_all()


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


async def test_one_set_of_services_serves_each_tenant_through_its_own_account(
    accounts: AccountsServer, services: Services
) -> None:
    await services.start_all()
    assert services.router is not None
    assert services.pool is not None
    for name, links in services.links.items():
        assert links.is_per_tenant, name
        assert sorted(links.connections()) == sorted(TENANTS), name

    results = await asyncio.gather(
        *(run_hello(services.router.target, services.pool.target, t) for t in TENANTS)
    )
    assert results == [{"greeting": "HELLO, A!"}, {"greeting": "HELLO, B!"}]

    # Every service's connection of a tenant is in that tenant's account, and nothing of
    # the services is anywhere else.
    mine = {
        (c["name"], c.get("account"))
        for c in await connz(accounts.monitor_url)
        if str(c.get("name", "")).endswith(tuple(f" {INSTANCE} {t}" for t in TENANTS))
    }
    assert mine == {
        (f"{service} {INSTANCE} {tenant}", tenant)
        for service in ("state", "guardrail", "router", "executor-pool")
        for tenant in TENANTS
    }
    # The executor pool logged in as each tenant's executor user: its replies use the
    # executor inbox, the only one that user may subscribe to.
    pool_links = services.links["executor-pool"]
    for nc in pool_links.connections().values():
        assert nc.new_inbox().startswith(EXECUTOR_INBOX_PREFIX + ".")
    for nc in services.links["router"].connections().values():
        assert not nc.new_inbox().startswith(EXECUTOR_INBOX_PREFIX)

    assert accounts.violations() == []
    streams = await jsz_accounts(accounts.monitor_url)
    for tenant in TENANTS:
        assert streams[tenant] == sorted(tenant_streams(TenantNames(tenant)))


async def test_a_record_claiming_b_published_with_as_credentials_is_never_stored_under_b(
    accounts: AccountsServer, services: Services
) -> None:
    await services.start_state()
    assert services.store is not None
    a = TenantNames("a")
    raw, _ = execution_record(1, tenant="b")
    # A's executor user may publish records on a's subjects, and on no one else's.
    async with login(
        accounts.url,
        nkeys_seed=str(accounts.seed("a", EXECUTOR)),
        inbox_prefix=EXECUTOR_INBOX_PREFIX,
    ) as executor:
        await executor.js.publish(
            a.exec(LIFETIME_ID),
            raw,
            headers={
                HDR_TYPE: "task_execution",
                HDR_TENANT: "b",
                HDR_MSG_ID: f"forged:{exec_id(1)}",
            },
        )

    async with login(accounts.url, nkeys_seed=str(accounts.seed("a", SERVICE))) as service:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while (await service.js.stream_info(a.dlq_stream)).state.messages == 0:
            assert loop.time() < deadline, "the forged record was not dead-lettered in a"
            await asyncio.sleep(0.05)
        dead = await service.js.get_last_msg(a.dlq_stream, a.dlq("exec"))
        assert dead.data == raw
        consumer = await service.js.consumer_info(a.exec_stream, a.state_consumer)
        assert consumer.num_pending == 0
        assert consumer.num_ack_pending == 0

    for tenant in TENANTS:
        assert await services.store.get_execution(tenant, exec_id(1)) is None
        assert await services.store.list_executions(tenant, LIFETIME_ID) == []
    async with login(accounts.url, nkeys_seed=str(accounts.seed("b", SERVICE))) as b_service:
        b = TenantNames("b")
        for stream in (b.exec_stream, b.dlq_stream):
            assert (await b_service.js.stream_info(stream)).state.messages == 0
    assert accounts.violations() == []
