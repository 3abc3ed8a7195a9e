"""Which tenants a service serves: the settings' list, or a tenant registry as it changes."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import pytest

from tickmesh.runtime.settings import ServiceSettings
from tickmesh.runtime.tenancy import Limits, Tenant, TenantDirectory
from tickmesh.runtime.tenancy.registry import ROLES
from tickmesh.runtime.tenant_links import SERVICE
from tickmesh.runtime.tenant_watch import TenantWatcher, serve_tenants
from tickmesh.sdk import ConfigError, TransportError


class Host:
    """A service that records what it was asked to serve; ``broken`` tenants fail to add."""

    def __init__(self, broken: Collection[str] = ()) -> None:
        self.served: dict[str, bool] = {}
        self.broken = set(broken)
        self.removed: list[str] = []

    @property
    def served_tenants(self) -> Collection[str]:
        return self.served.keys()

    async def add_tenant(self, tenant: str) -> None:
        self.served[tenant] = False  # half-added, as a failure part-way leaves it
        if tenant in self.broken:
            raise TransportError(f"login of {tenant} refused")
        self.served[tenant] = True

    async def remove_tenant(self, tenant: str) -> None:
        self.served.pop(tenant, None)
        self.removed.append(tenant)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def register(directory: TenantDirectory, *tenants: str, disabled: Collection[str] = ()) -> None:
    registry = directory.load_or_init()
    for tenant in tenants:
        existing = registry.tenants.get(tenant)
        if existing is None:
            users = {role: directory.new_user(tenant, role) for role in ROLES}
            existing = Tenant(tenant, Limits(), users)
        registry = registry.with_tenant(replace(existing, disabled=tenant in disabled))
    directory.save(registry)


def delete(directory: TenantDirectory, tenant: str) -> None:
    directory.save(directory.load().without(tenant))


def watcher(host: Host, path: Path, clock: Clock) -> TenantWatcher:
    return TenantWatcher(host, path, name="test", refresh_s=1.0, settle_s=2.0, clock=clock)


async def test_the_registry_decides_what_is_served_as_it_changes(tmp_path: Path) -> None:
    directory = TenantDirectory(tmp_path)
    register(directory, "a", "b", disabled={"b"})
    host, clock = Host(), Clock()
    watch = watcher(host, tmp_path, clock)

    await watch.sync(initial=True)
    assert set(host.served) == {"a"}

    # A new tenant waits until it has been registered for the settle time.
    register(directory, "b", "c")
    await watch.sync()
    assert set(host.served) == {"a"}
    clock.now += 2.0
    await watch.sync()
    assert set(host.served) == {"a", "b", "c"}

    register(directory, "a", disabled={"a"})
    delete(directory, "c")
    await watch.sync()
    assert set(host.served) == {"b"}
    assert sorted(host.removed) == ["a", "c"]


async def test_a_tenant_that_cannot_be_served_is_retried_without_holding_up_others(
    tmp_path: Path,
) -> None:
    directory = TenantDirectory(tmp_path)
    register(directory, "a", "b")
    host, clock = Host(broken={"a"}), Clock()
    watch = watcher(host, tmp_path, clock)

    await watch.sync(initial=True)
    assert host.served == {"b": True}, "the half-added tenant is cleaned up"
    assert "login of a refused" in watch.failing["a"]

    host.broken.clear()
    await watch.sync()
    assert host.served == {"a": True, "b": True}
    assert watch.failing == {}


class StorageHost(Host):
    """A host that follows each tenant's storage once the server (``applied``) has it."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: dict[str, int] = {}
        self.followed: list[tuple[str, int]] = []

    async def follow_storage(self, tenant: str, storage: int) -> bool:
        assert tenant in self.served, "only a served tenant's storage is followed"
        if self.applied.get(tenant) != storage:
            return False
        self.followed.append((tenant, storage))
        return True


def set_storage(directory: TenantDirectory, tenant: str, storage: int) -> None:
    registry = directory.load()
    existing = registry.get(tenant)
    limits = replace(existing.limits, max_storage=storage)
    directory.save(registry.with_tenant(replace(existing, limits=limits)))


async def test_a_served_tenants_storage_is_followed_once_the_server_applies_it(
    tmp_path: Path,
) -> None:
    directory = TenantDirectory(tmp_path)
    register(directory, "a", "b")
    host, clock = StorageHost(), Clock()
    host.applied = {"a": 1 << 30, "b": 1 << 30}
    watch = watcher(host, tmp_path, clock)

    await watch.sync(initial=True)
    assert sorted(host.followed) == [("a", 1 << 30), ("b", 1 << 30)]
    await watch.sync()
    assert len(host.followed) == 2, "an unchanged storage is not followed again"

    # `tickmesh tenant limits` without --nats-url: the registry first, the server later.
    set_storage(directory, "a", 256 << 20)
    await watch.sync()
    await watch.sync()
    assert len(host.followed) == 2, "not before the server applies it"
    host.applied["a"] = 256 << 20  # the servers were reloaded
    await watch.sync()
    assert host.followed[2:] == [("a", 256 << 20)]
    await watch.sync()
    assert len(host.followed) == 3

    # A tenant disabled and enabled again is followed again.
    register(directory, "b", disabled={"b"})
    await watch.sync()
    register(directory, "b")
    await watch.sync()
    clock.now += 2.0  # settled
    await watch.sync()
    assert "b" in host.served
    assert host.followed[3:] == [("b", 1 << 30)]


async def test_a_host_failing_to_follow_is_asked_again_at_the_next_read(tmp_path: Path) -> None:
    directory = TenantDirectory(tmp_path)
    register(directory, "a")
    host, clock = StorageHost(), Clock()
    watch = watcher(host, tmp_path, clock)
    calls = 0

    async def flaky(tenant: str, storage: int) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("JetStream API timed out")
        return True

    host.follow_storage = flaky  # type: ignore[method-assign]
    await watch.sync(initial=True)
    await watch.sync()
    await watch.sync()
    assert calls == 2


async def test_an_unreadable_registry_stops_the_start_but_later_keeps_the_tenants(
    tmp_path: Path,
) -> None:
    host, clock = Host(), Clock()
    watch = watcher(host, tmp_path, clock)
    with pytest.raises(ConfigError, match="no tenant registry"):
        await watch.sync(initial=True)

    directory = TenantDirectory(tmp_path)
    register(directory, "a")
    await watch.sync(initial=True)
    directory.registry_path.write_text("{not json")
    await watch.sync()
    assert set(host.served) == {"a"}


async def test_serve_tenants_without_a_directory_serves_the_settings_list() -> None:
    host = Host()
    settings = ServiceSettings(tenants=["a", "b"])
    assert await serve_tenants(settings, host, name="test", role=SERVICE) is None
    assert set(host.served) == {"a", "b"}

    with pytest.raises(TransportError):
        await serve_tenants(settings, Host(broken={"b"}), name="test", role=SERVICE)


async def test_serve_tenants_with_a_directory_checks_listed_tenants_and_serves_the_registry(
    tmp_path: Path,
) -> None:
    directory = TenantDirectory(tmp_path)
    register(directory, "a", "b")
    host = Host()

    # The default `tenants` asks for nothing: the registry decides.
    settings = ServiceSettings(nats_tenant_dir=str(tmp_path), tenant_refresh_s=60.0)
    watch = await serve_tenants(settings, host, name="test", role=SERVICE)
    assert watch is not None
    await watch.stop()
    assert set(host.served) == {"a", "b"}

    listed = ServiceSettings(nats_tenant_dir=str(tmp_path), tenants=["a", "c"])
    missing = tmp_path / "creds" / "c" / "service.nk"
    with pytest.raises(ConfigError, match=f"tenant 'c': no service NKey seed at {missing}"):
        await serve_tenants(listed, Host(), name="test", role=SERVICE)
