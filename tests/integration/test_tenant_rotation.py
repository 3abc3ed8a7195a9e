"""`tickmesh tenant rotate` against a real nats-server with tenant accounts.

The server includes the tenant directory's ``accounts.conf``; the command reloads it
through the system account, so each step is observed as a service would see it:
connections made with the old seed keep working during the overlap, the new seed is
accepted at once, and finishing the rotation closes what still uses the old key.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from tests.support.nats_configs import NatsServers, require_nats_server
from tests.support.tenant_accounts import AccountsServer, Login, start_accounts_server, tenant_cli
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.tenancy import EXECUTOR, SERVICE, Limits, TenantDirectory
from tickmesh.runtime.tenancy.registry import ROLES

CLOSE_WAIT_S = 3.0


@contextlib.asynccontextmanager
async def _connected(url: str, seed: Path) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(url, nkeys_seed=str(seed), allow_reconnect=False)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
def server(servers: NatsServers, tmp_path: Path) -> AccountsServer:
    return start_accounts_server(servers, tmp_path, {"acme": Limits()})


def _public_key(seed: str) -> str:
    import nkeys  # type: ignore[import-untyped]

    key: bytes = nkeys.from_seed(bytearray(seed.strip().encode())).public_key
    return key.decode()


async def _round_trip(nc: NatsClient, subject: str = "tm.acme.ctl.rotation") -> None:
    """A message the connection publishes comes back to it (its login works)."""
    sub = await nc.subscribe(subject)
    try:
        await nc.publish(subject, b"ping")
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"ping"
    finally:
        await sub.unsubscribe()


async def _closed_by_server(user: Login) -> None:
    """The server closes the connection (without a reason on the wire: the client sees
    the socket end)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_WAIT_S
    while not user.nc.is_closed:
        if loop.time() >= deadline:
            raise AssertionError(f"the connection is still open; errors: {user.errors}")
        await asyncio.sleep(0.02)


async def _refused(url: str, seed: str) -> str:
    nc = NatsClient()
    try:
        with pytest.raises(nats.errors.Error) as caught:
            await nc.connect(
                servers=[url], nkeys_seed_str=seed, allow_reconnect=False, connect_timeout=2
            )
    finally:
        await nc.close()
    return str(caught.value)


async def test_rotation_keeps_old_connections_until_finished(server: AccountsServer) -> None:
    directory = server.directory
    common = ("--dir", str(directory.path), "--nats-url", server.url)
    old_seeds = {role: server.seed("acme", role).read_text() for role in ROLES}
    old_keys = dict(directory.load().get("acme").users)

    # A service connected the way the services connect: by the seed file's path.
    old = await Login().connect(
        server.url, nkeys_seed=str(server.seed("acme", SERVICE)), name="router r1 acme"
    )
    old_executor = await Login().connect(
        server.url,
        nkeys_seed_str=old_seeds[EXECUTOR],
        name="executor e1 acme",
        inbox_prefix="_INBOX.executor",
    )
    try:
        await _round_trip(old.nc)

        rotated = await tenant_cli("rotate", "acme", *common)
        assert rotated.code == 0, rotated.err
        assert "reloaded NATS server(s)" in rotated.out
        assert "the server accepts the new key(s) of acme" in rotated.out
        tenant = directory.load().get("acme")
        assert tenant.rotating == ROLES
        for role in ROLES:
            new_seed = server.seed("acme", role).read_text()
            assert new_seed != old_seeds[role]
            assert tenant.users[role] == _public_key(new_seed)
            assert tenant.previous[role].nkey == old_keys[role]
            assert not directory.staged_seed_path("acme", role).exists()
        rendered = directory.accounts_path.read_text()
        assert all(key in rendered for key in (*old_keys.values(), *tenant.users.values()))

        # The overlap: the old connections work, and so do new ones with the new seeds.
        await _round_trip(old.nc)
        await old_executor.nc.publish("tm.acme.exec.x", b"record")
        await old_executor.nc.flush()
        async with _connected(server.url, server.seed("acme", SERVICE)) as new:
            await _round_trip(new)
        # The old seed may still log in during the overlap (a service not rolled yet).
        again = await nats.connect(
            server.url, nkeys_seed_str=old_seeds[SERVICE], allow_reconnect=False
        )
        await again.close()

        # A second rotation is refused while this one is pending.
        second = await tenant_cli("rotate", "acme", "--role", EXECUTOR, *common)
        assert second.code == 1
        assert "a rotation of its executor key is pending" in second.err
        assert "rotate --finish acme" in second.err
        assert directory.load().get("acme") == tenant

        listed = await tenant_cli("list", "--dir", str(directory.path))
        row = next(line for line in listed.out.splitlines() if line.startswith("acme "))
        assert "service,executor since" in row
        as_json = await tenant_cli("list", "--dir", str(directory.path), "--json")
        (entry,) = json.loads(as_json.out)
        assert entry["previous"][SERVICE]["nkey"] == old_keys[SERVICE]

        # finish refuses while a connection still uses a previous key, naming it.
        early = await tenant_cli("rotate", "--finish", "acme", "--role", SERVICE, *common)
        assert early.code == 1
        assert "still use a previous key" in early.err
        assert "'router r1 acme'" in early.err
        assert directory.load().get("acme").rotating == ROLES

        # --force: the old connections are closed by the server, new ones keep working.
        async with _connected(server.url, server.seed("acme", SERVICE)) as new:
            finished = await tenant_cli("rotate", "--finish", "acme", "--force", *common)
            assert finished.code == 0, finished.err
            assert "'router r1 acme'" in finished.out
            assert "'executor e1 acme'" in finished.out
            await _closed_by_server(old)
            await _closed_by_server(old_executor)
            await _round_trip(new)
        assert directory.load().get("acme").previous == {}
        for role in ROLES:
            assert old_keys[role] not in directory.accounts_path.read_text()
            refused = await _refused(server.url, old_seeds[role])
            assert "authorization violation" in refused.lower()
        async with _connected(server.url, server.seed("acme", EXECUTOR)) as new_executor:
            await new_executor.publish("tm.acme.exec.x", b"record")
            await new_executor.flush()

        nothing = await tenant_cli("rotate", "--finish", "acme", *common)
        assert nothing.code == 1
        assert "no rotation of its service or executor key is pending" in nothing.err
    finally:
        await old.close()
        await old_executor.close()


async def test_rotating_one_role_then_finishing_it(server: AccountsServer) -> None:
    directory = server.directory
    common = ("--dir", str(directory.path), "--nats-url", server.url)
    executor_key = directory.load().get("acme").users[EXECUTOR]
    rotated = await tenant_cli("rotate", "acme", "--role", SERVICE, *common)
    assert rotated.code == 0, rotated.err
    assert directory.load().get("acme").rotating == (SERVICE,)
    assert directory.load().get("acme").users[EXECUTOR] == executor_key
    # Nothing connected with the old key: finishing needs no --force.
    finished = await tenant_cli("rotate", "--finish", "acme", *common)
    assert finished.code == 0, finished.err
    assert "the previous service key(s) are removed" in finished.out
    assert directory.load().get("acme").previous == {}


# nats-py leaves the socket of a refused reconnect open; collected (and warned about) here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_reconnect_after_the_seed_changed_is_refused(server: AccountsServer) -> None:
    """Why a service must be restarted after `rotate`: nats-py keeps the public key it
    read when it first connected, but signs each reconnect with the seed file as it is
    then, so once the file holds the new seed the pair no longer matches."""
    directory = server.directory
    seed = server.seed("acme", SERVICE)
    errors: list[str] = []
    closed = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    async def on_closed() -> None:
        closed.set()

    nc = await nats.connect(
        server.url,
        nkeys_seed=str(seed),
        name="router r1 acme",
        error_cb=on_error,
        closed_cb=on_closed,
        max_reconnect_attempts=3,
        reconnect_time_wait=0.1,
    )
    admin = await nats.connect(server.url, nkeys_seed=str(directory.system_seed_path))
    try:
        rotated = await tenant_cli(
            "rotate", "acme", "--dir", str(directory.path), "--nats-url", server.url
        )
        assert rotated.code == 0, rotated.err
        await _round_trip(nc)  # the open connection is untouched
        server_id, cid = nc._server_info["server_id"], nc._server_info["client_id"]
        kick = json.dumps({"cid": cid}).encode()
        await admin.request(f"$SYS.REQ.SERVER.{server_id}.KICK", kick, timeout=2)
        async with asyncio.timeout(CLOSE_WAIT_S):
            await closed.wait()  # every reconnect was refused
        assert any("authorization violation" in error.lower() for error in errors), errors
    finally:
        await admin.close()
        await nc.close()
        gc.collect()
    # A new connection with the same file logs in.
    async with _connected(server.url, seed) as fresh:
        await _round_trip(fresh)
    assert TenantDirectory(directory.path).load().get("acme").rotating == ROLES


async def test_rotation_without_nats_asks_for_a_reload_first(tmp_path: Path) -> None:
    require_nats_server()
    tenants = tmp_path / "tenants"
    assert (await tenant_cli("create", "acme", "--dir", str(tenants))).code == 0
    before = TenantDirectory(tenants).seed_path("acme", EXECUTOR).read_text()
    rotated = await tenant_cli("rotate", "acme", "--role", EXECUTOR, "--dir", str(tenants))
    assert rotated.code == 0, rotated.err
    assert "before restarting any service" in rotated.out
    tenant = TenantDirectory(tenants).load().get("acme")
    assert tenant.rotating == (EXECUTOR,)
    assert TenantDirectory(tenants).seed_path("acme", EXECUTOR).read_text() != before
    forced = await tenant_cli("rotate", "acme", "--force", "--dir", str(tenants))
    assert forced.code == 1
    assert "--force goes with --finish" in forced.err
    finished = await tenant_cli("rotate", "--finish", "acme", "--dir", str(tenants))
    assert finished.code == 0, finished.err
    assert "reload the NATS servers" in finished.out
    assert TenantDirectory(tenants).load().get("acme").previous == {}


# As above: the refused reconnects after `--finish` leave nats-py's sockets to the collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_services_connection_keeps_its_key_through_a_rotations_overlap(
    server: AccountsServer,
) -> None:
    """tickmesh's own connections read the seed once, so a reconnect during the overlap
    uses the key they logged in with — still authorised — instead of failing like the
    raw client above; `rotate --finish` then closes them."""
    directory = server.directory
    nc = await tm_nats.connect(
        server.url,
        name="router r1 acme",
        nkeys_seed=str(server.seed("acme", SERVICE)),
        first_connect_within=5,
    )
    reconnected, dropped = asyncio.Event(), asyncio.Event()
    nc._reconnected_cb = _set(reconnected)  # the runtime's own callbacks only log
    nc._disconnected_cb = _set(dropped)
    admin = await nats.connect(server.url, nkeys_seed=str(directory.system_seed_path))
    try:
        rotated = await tenant_cli(
            "rotate", "acme", "--dir", str(directory.path), "--nats-url", server.url
        )
        assert rotated.code == 0, rotated.err
        server_id, cid = nc._server_info["server_id"], nc._server_info["client_id"]
        await admin.request(
            f"$SYS.REQ.SERVER.{server_id}.KICK", json.dumps({"cid": cid}).encode(), timeout=2
        )
        async with asyncio.timeout(CLOSE_WAIT_S):
            await reconnected.wait()
        dropped.clear()
        await _round_trip(nc)  # back, with the old key the overlap still accepts
        finished = await tenant_cli(
            "rotate",
            "--finish",
            "acme",
            "--force",
            "--dir",
            str(directory.path),
            "--nats-url",
            server.url,
        )
        assert finished.code == 0, finished.err
        async with asyncio.timeout(CLOSE_WAIT_S):
            await dropped.wait()  # the server closes connections of removed keys
        await asyncio.sleep(0.5)
        assert not nc.is_connected  # and refuses them back
    finally:
        await admin.close()
        with contextlib.suppress(Exception):
            await nc.close()
        gc.collect()


def _set(event: asyncio.Event) -> Callable[[], Awaitable[None]]:
    async def callback() -> None:
        event.set()

    return callback
