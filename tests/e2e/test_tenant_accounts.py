"""A tenant provisioned with `tickmesh tenant create` runs lifetimes in its own account.

A fresh nats-server includes the tenant directory's rendered accounts. After
`tickmesh tenant create acme --nats-url ...`, the router, state and guardrail services
log in as acme's service user and the executor pool as acme's executor user, and a
lifetime of the hello graph completes. The grants are sufficient (the server logs no
permission violation) and the monitoring endpoint shows acme's streams in acme's
account, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client as NatsClient

import examples.hello.handlers as hello
from tests.support.nats_configs import NatsServers
from tests.support.tenant_accounts import jsz_accounts, start_including, tenant_cli
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime.subjects import TenantNames
from tickmesh.runtime.tenancy import (
    EXECUTOR,
    EXECUTOR_INBOX_PREFIX,
    SERVICE,
    TenantDirectory,
    tenant_streams,
)
from tickmesh.sdk import Client, Worker, load_graph_file

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello" / "graph.yaml"


@dataclass
class AccountMesh(Mesh):
    """The embedded mesh with each service logged in as one of a tenant's users."""

    tenant_dir: TenantDirectory | None = None
    logins: dict[str, str] = field(default_factory=dict)
    """Service name -> the role it logs in as."""

    async def _connect(self, name: str) -> NatsClient:
        assert self.tenant_dir is not None
        (tenant,) = self.config.tenants
        role = EXECUTOR if name == "executor-pool" else SERVICE
        self.logins[name] = role
        options = {"inbox_prefix": EXECUTOR_INBOX_PREFIX} if role == EXECUTOR else {}
        nc = await nats.connect(
            self.nats_url,
            name=name,
            nkeys_seed=str(self.tenant_dir.seed_path(tenant, role)),
            max_reconnect_attempts=-1,
            **options,
        )
        self._connections.append(nc)
        return nc


async def test_a_created_tenant_runs_lifetimes_in_its_own_account(
    servers: NatsServers, tmp_path: Path
) -> None:
    tenants = servers.directory / "tenants"
    rendered = await tenant_cli("render", "--dir", str(tenants))
    assert rendered.code == 0, rendered.err
    process, http_port = start_including(servers, tmp_path)
    created = await tenant_cli("create", "acme", "--dir", str(tenants), "--nats-url", process.url)
    assert created.code == 0, created.err
    names = TenantNames("acme")

    mesh = AccountMesh(
        MeshConfig(nats_url=process.url, tenants=("acme",), data_dir=tmp_path / "mesh"),
        tenant_dir=TenantDirectory(tenants),
    )
    await mesh.start()
    try:
        assert mesh.logins == {
            "guardrail": SERVICE,
            "state": SERVICE,
            "router": SERVICE,
            "executor-pool": EXECUTOR,
        }
        async with (
            await Client.connect(mesh.router_target, tenant="acme") as client,
            Worker(
                mesh.pool_target, tenant="acme", tasks=[hello.greet, hello.decide, hello.shout]
            ) as worker,
        ):
            await worker.wait_connected()
            graph = await client.register_graph(load_graph_file(HELLO))
            handle = await client.start_lifetime(graph.id, {"name": "ada"}, version=graph.version)
            assert await handle.result(within=20) == {"greeting": "HELLO, ADA!"}
            events = [event.kind async for event in handle.watch()]
            assert events, "the lifetime's events reached the watcher"
    finally:
        await mesh.stop()

    violations = [line for line in process.log().splitlines() if "Violation" in line]
    assert violations == []
    accounts = await jsz_accounts(f"http://127.0.0.1:{http_port}")
    assert accounts["acme"] == sorted(tenant_streams(names))
    assert all(
        not stream.startswith("TM_ACME_") and not stream.startswith("KV_TM_ACME_")
        for account, streams in accounts.items()
        if account != "acme"
        for stream in streams
    )
