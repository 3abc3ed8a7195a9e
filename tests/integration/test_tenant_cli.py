"""`tickmesh tenant` against a real nats-server, and the check of what it renders.

The server's config includes the tenant directory's ``accounts.conf``; the commands
reload it through the system account (``--nats-url``), so every step is observed the
way an operator would: logins accepted or refused, limits applied, streams created,
data kept or purged.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from tests.support.nats_configs import NatsServerProcess, NatsServers, require_nats_server
from tests.support.tenant_accounts import jsz_accounts, start_including, tenant_cli
from tickmesh.runtime.embedded_nats import nats_server_path
from tickmesh.runtime.subjects import HDR_TYPE, TenantNames
from tickmesh.runtime.tenancy import (
    SERVICE,
    Limits,
    TenantDirectory,
    check_config,
    commit,
    render,
    tenant_streams,
)
from tickmesh.runtime.tenancy.registry import ROLES, Tenant, now_iso
from tickmesh.sdk import ConfigError

ACME = TenantNames("acme")


@pytest.fixture
async def fresh(servers: NatsServers, tmp_path: Path) -> tuple[NatsServerProcess, Path, int]:
    """A tenant directory with no tenant yet, and a server that includes its accounts."""
    tenants = servers.directory / "tenants"
    rendered = await tenant_cli("render", "--dir", str(tenants))
    assert rendered.code == 0, rendered.err
    assert "0 tenant(s)" in rendered.out
    process, http_port = start_including(servers, tmp_path)
    return process, tenants, http_port


async def _login_refused(url: str, seed: Path) -> str:
    """The server's refusal of a login with ``seed`` (one attempt, no retries)."""
    nc = NatsClient()
    try:
        with pytest.raises(nats.errors.Error) as caught:
            await nc.connect(
                servers=[url], nkeys_seed=str(seed), allow_reconnect=False, connect_timeout=2
            )
    finally:
        # A refused connect leaves its socket open until the client is closed.
        await nc.close()
    return str(caught.value)


async def test_tenant_lifecycle(fresh: tuple[NatsServerProcess, Path, int]) -> None:
    process, tenants, http_port = fresh
    url = process.url
    common = ("--dir", str(tenants), "--nats-url", url)
    directory = TenantDirectory(tenants)

    # create: account, users, streams with deny_delete and deny_purge.
    created = await tenant_cli("create", "acme", "--max-storage", "256MiB", *common)
    assert created.code == 0, created.err
    assert "tenant acme created: account acme" in created.out
    assert f"created   {', '.join(tenant_streams(ACME))}" in created.out
    service_seed = directory.seed_path("acme", SERVICE)
    assert oct(service_seed.stat().st_mode & 0o777) == "0o600"
    nc = await nats.connect(url, nkeys_seed=str(service_seed), allow_reconnect=False)
    js = nc.jetstream()
    for stream in (ACME.work_stream, ACME.exec_stream, ACME.evt_stream, ACME.dlq_stream):
        config = (await js.stream_info(stream)).config
        assert (config.deny_delete, config.deny_purge) == (True, True), stream
    assert (await js.account_info()).limits.max_storage == 256 << 20
    # The event stream may hold a quarter of it (its events cannot fill the account).
    assert (await js.stream_info(ACME.evt_stream)).config.max_bytes == 64 << 20

    # create again: nothing changes, the streams are found.
    again = await tenant_cli("create", "acme", *common)
    assert again.code == 0, again.err
    assert "tenant acme exists" in again.out
    assert f"existing  {ACME.work_stream}" in again.out

    # list, here and as a separate process.
    listed = await tenant_cli("list", *common)
    assert listed.code == 0, listed.err
    row = next(line for line in listed.out.splitlines() if line.startswith("acme "))
    assert row.split()[:6] == ["acme", "enabled", "256MiB", "16MiB", "16", "1000"]
    process_list = await asyncio.to_thread(
        subprocess.run,
        [
            str(Path(sys.executable).parent / "tickmesh"),
            "tenant",
            "list",
            "--dir",
            str(tenants),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (entry,) = json.loads(process_list.stdout)
    assert entry["tenant"] == "acme"
    assert entry["limits"]["max_storage"] == 256 << 20
    assert set(entry["users"]) == set(ROLES)

    # limits: applied on reload, read back by the account's own user.
    changed = await tenant_cli("limits", "acme", "--max-streams", "12", *common)
    assert changed.code == 0, changed.err
    assert "the server applies the limits of acme" in changed.out
    assert (await js.account_info()).limits.max_streams == 12
    assert f"events    {ACME.evt_stream} holds at most 64MiB of events" in changed.out
    # Less storage: the event stream's share follows at once.
    halved = await tenant_cli("limits", "acme", "--max-storage", "128MiB", *common)
    assert halved.code == 0, halved.err
    assert (await js.account_info()).limits.max_storage == 128 << 20
    assert f"events    {ACME.evt_stream} holds at most 32MiB of events" in halved.out
    assert (await js.stream_info(ACME.evt_stream)).config.max_bytes == 32 << 20
    too_big = await tenant_cli("limits", "acme", "--max-storage", "1TiB", *common)
    assert too_big.code == 1
    assert "do not fit the NATS server" in too_big.err
    assert "max_file_store" in too_big.err
    assert directory.load().get("acme").limits.max_storage == 128 << 20

    # disable: the open connection is closed on reload, a new login is refused.
    disabled = await tenant_cli("disable", "acme", *common)
    assert disabled.code == 0, disabled.err
    assert "tenant acme disabled" in disabled.out
    assert nc.is_closed
    await nc.close()
    refused = await _login_refused(url, service_seed)
    assert "authorization violation" in refused.lower()
    assert "acme" in (await jsz_accounts(f"http://127.0.0.1:{http_port}"))  # data kept

    # enable: back in, with the streams it had.
    enabled = await tenant_cli("enable", "acme", *common)
    assert enabled.code == 0, enabled.err
    nc = await nats.connect(url, nkeys_seed=str(service_seed), allow_reconnect=False)
    js = nc.jetstream()
    await js.publish(ACME.evb, b"event", headers={HDR_TYPE: "lifetime_event"})
    await nc.close()

    # delete: refused while a stream holds data, done with --force.
    refused_delete = await tenant_cli("delete", "acme", *common)
    assert refused_delete.code == 1
    assert f"{ACME.evt_stream} 1 message(s)" in refused_delete.err
    assert "--force" in refused_delete.err
    assert "acme" in directory.load().tenants
    deleted = await tenant_cli("delete", "acme", "--force", *common)
    assert deleted.code == 0, deleted.err
    assert "tenant acme deleted" in deleted.out
    assert "acme" not in directory.load().tenants
    assert not service_seed.exists()
    assert '"acme"' not in directory.accounts_path.read_text()
    assert (await jsz_accounts(f"http://127.0.0.1:{http_port}")).get("acme", []) == []
    listed = await tenant_cli("list", "--dir", str(tenants))
    assert "acme" not in listed.out


async def test_create_without_nats_then_provision(
    fresh: tuple[NatsServerProcess, Path, int],
) -> None:
    """Render first (for a server that is reloaded by other means), provision later."""
    process, tenants, _ = fresh
    offline = await tenant_cli("create", "beta", "--dir", str(tenants))
    assert offline.code == 0, offline.err
    assert "reload the NATS servers" in offline.out
    online = await tenant_cli("create", "beta", "--dir", str(tenants), "--nats-url", process.url)
    assert online.code == 0, online.err
    assert "reloaded NATS server(s)" in online.out
    assert f"created   {TenantNames('beta').work_stream}" in online.out


async def test_delete_without_nats_needs_force(
    fresh: tuple[NatsServerProcess, Path, int],
) -> None:
    _, tenants, _ = fresh
    assert (await tenant_cli("create", "gamma", "--dir", str(tenants))).code == 0
    refused = await tenant_cli("delete", "gamma", "--dir", str(tenants))
    assert refused.code == 1
    assert "no telling whether the streams of gamma hold data" in refused.err
    forced = await tenant_cli("delete", "gamma", "--dir", str(tenants), "--force")
    assert forced.code == 0, forced.err
    assert "stays on the servers" in forced.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("create", "Acme"), "invalid tenant id 'Acme'"),
        (("create", "a.b"), "invalid tenant id 'a.b'"),
        (("create", "acme", "--max-streams", "3"), "max_streams must be at least 7"),
        (("limits", "nobody", "--max-streams", "9"), "no tenant 'nobody'"),
    ],
)
async def test_bad_requests_are_refused_clearly(
    fresh: tuple[NatsServerProcess, Path, int], argv: tuple[str, ...], message: str
) -> None:
    _, tenants, _ = fresh
    result = await tenant_cli(*argv, "--dir", str(tenants))
    assert result.code == 1
    assert message in result.err
    assert TenantDirectory(tenants).load().tenants == {}


async def test_nats_url_on_a_new_directory_is_refused(tmp_path: Path) -> None:
    result = await tenant_cli(
        "create", "acme", "--dir", str(tmp_path / "new"), "--nats-url", "nats://127.0.0.1:1"
    )
    assert result.code == 1
    assert "no tenant registry yet" in result.err


# --- checking what is rendered ------------------------------------------------------------


def _registry(tmp_path: Path) -> TenantDirectory:
    directory = TenantDirectory(tmp_path / "tenants")
    registry = directory.load_or_init()
    for tenant in ("a", "b", "c"):
        users = {role: directory.new_user(tenant, role) for role in ROLES}
        registry = registry.with_tenant(Tenant(tenant, Limits(), users, now_iso()))
    directory.save(registry)
    return directory


def test_rendered_config_passes_nats_server_check(tmp_path: Path) -> None:
    require_nats_server()
    directory = _registry(tmp_path)
    text = render(directory.load())
    check_config(text)
    path = commit(directory, directory.load())
    # The file also passes on its own (accounts without a server block around them).
    checked = subprocess.run(
        [str(nats_server_path()), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_a_broken_config_is_reported_with_nats_servers_reason(tmp_path: Path) -> None:
    require_nats_server()
    directory = _registry(tmp_path)
    broken = render(directory.load()).replace("max_streams: 16", "max_streams: {", 1)
    with pytest.raises(ConfigError) as caught:
        check_config(broken, label="deploy/nats/accounts.conf")
    message = str(caught.value)
    assert message.startswith(
        "nats-server rejects the accounts configuration deploy/nats/accounts.conf: "
    ), message
    assert "Parse error on line" in message
    assert "tickmesh-accounts-" not in message  # no temporary paths


def test_a_server_config_that_fails_puts_the_old_file_back(tmp_path: Path) -> None:
    require_nats_server()
    directory = _registry(tmp_path)
    before_text = commit(directory, directory.load()).read_text()
    before_registry = directory.registry_path.read_text()
    server_conf = directory.path / "server.conf"
    server_conf.write_text("port: -1\ninclude accounts.conf\nlisten: [\n")
    smaller = directory.load().without("c")
    with pytest.raises(ConfigError) as caught:
        commit(directory, smaller, server_config=server_conf)
    assert f"nats-server rejects the server configuration {server_conf}" in str(caught.value)
    assert directory.accounts_path.read_text() == before_text
    assert directory.registry_path.read_text() == before_registry
