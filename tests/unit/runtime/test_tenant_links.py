"""TenantLinks: one shared connection, or one per tenant opened once, on first use."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from tickmesh.runtime.lifecycle import connect_tenant_nats, open_tenant_links
from tickmesh.runtime.settings import ServiceSettings
from tickmesh.runtime.tenancy import EXECUTOR_INBOX_PREFIX
from tickmesh.runtime.tenant_links import (
    EXECUTOR,
    SERVICE,
    TenantLinks,
    inbox_prefix,
    seed_file,
)
from tickmesh.sdk import ConfigError


class FakeClient(NatsClient):
    """An unconnected client that counts drains."""

    def __init__(self) -> None:
        super().__init__()
        self.drained = 0

    async def drain(self) -> None:
        self.drained += 1


async def test_tenant_links_share_one_connection_without_a_tenant_dir() -> None:
    nc = FakeClient()
    links = TenantLinks.shared(nc)
    a, b = await links.get("a"), await links.get("b")
    assert a.nc is nc
    assert b.nc is nc
    assert a.js is b.js
    assert links.js_of("a") is a.js
    assert links.shared_connection is nc
    assert not links.is_per_tenant
    await links.close()
    assert nc.drained == 0, "a connection passed in belongs to the caller"


async def test_tenant_links_drain_an_owned_shared_connection() -> None:
    nc = FakeClient()
    await TenantLinks.shared(nc, owned=True).close()
    assert nc.drained == 1


async def test_tenant_links_connect_each_tenant_once_and_drain_them_all() -> None:
    opened: dict[str, list[FakeClient]] = {}
    gate = asyncio.Event()

    async def connect(tenant: str) -> NatsClient:
        await gate.wait()
        nc = FakeClient()
        opened.setdefault(tenant, []).append(nc)
        return nc

    links = TenantLinks.per_tenant(connect)
    assert links.is_per_tenant
    assert links.shared_connection is None
    assert links.js_of("a") is None, "no link until first use"
    pending = [asyncio.create_task(links.get(t)) for t in ("a", "a", "b")]
    await asyncio.sleep(0)
    gate.set()
    first, second, other = await asyncio.gather(*pending)
    assert first is second
    assert first.nc is not other.nc
    assert {t: len(ncs) for t, ncs in opened.items()} == {"a": 1, "b": 1}
    assert links.connections() == {"a": first.nc, "b": other.nc}
    await links.close()
    assert [nc.drained for ncs in opened.values() for nc in ncs] == [1, 1]
    with pytest.raises(RuntimeError):
        await links.get("c")


async def test_a_slow_tenant_does_not_hold_up_another_tenants_first_connection() -> None:
    slow = asyncio.Event()

    async def connect(tenant: str) -> NatsClient:
        if tenant == "slow":
            await slow.wait()
        return FakeClient()

    links = TenantLinks.per_tenant(connect)
    stuck = asyncio.create_task(links.get("slow"))
    async with asyncio.timeout(1):
        await links.get("fast")
    assert not stuck.done()
    slow.set()
    await stuck
    await links.close()


def test_seed_file_names_the_tenant_and_the_path_when_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        seed_file(tmp_path, "acme", SERVICE)
    message = str(raised.value)
    assert "'acme'" in message
    assert str(tmp_path / "creds" / "acme" / "service.nk") in message


def test_seed_file_finds_each_role_seed(tmp_path: Path) -> None:
    for role in (SERVICE, EXECUTOR):
        path = tmp_path / "creds" / "acme" / f"{role}.nk"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("SU...")
        assert seed_file(tmp_path, "acme", role) == str(path)
    with pytest.raises(ConfigError):
        seed_file(tmp_path, "acme", "admin")


def test_only_the_executor_user_gets_its_own_inbox_prefix() -> None:
    assert inbox_prefix(EXECUTOR) == EXECUTOR_INBOX_PREFIX == "_INBOX.executor"
    assert inbox_prefix(SERVICE) is None


async def test_a_missing_tenant_seed_is_a_config_error_before_any_connection(
    tmp_path: Path,
) -> None:
    # Port 1: nothing listens there; the error must come before any attempt to connect.
    settings = ServiceSettings(
        nats_url="nats://127.0.0.1:1",
        nats_tenant_dir=str(tmp_path),
        tenants=["acme"],
        nats_connect_timeout_s=0.1,
    )
    links = await open_tenant_links(settings, "router", SERVICE)
    assert links.is_per_tenant
    with pytest.raises(ConfigError, match=r"tenant 'acme': no executor NKey seed at "):
        await connect_tenant_nats(settings, "executor-pool", "acme", EXECUTOR)
    with pytest.raises(ConfigError) as raised:
        await links.get("acme")
    assert str(tmp_path / "creds" / "acme" / "service.nk") in str(raised.value)
    await links.close()
