"""Adding and disabling tenants of a running embedded mesh, with no restart.

A fresh mesh is given a tenant directory: its nats-server includes the directory's
rendered accounts and its four services serve whatever the registry lists. While it
runs, `tickmesh tenant create acme --nats-url <the mesh's NATS>` adds a tenant: the
services pick it up from the registry, a lifetime of acme runs, the monitoring
endpoint shows acme's connections and streams in account acme, and the server logs
no violation. Disabling a tenant stops the services serving it (its calls are refused
with PERMISSION_DENIED) while another tenant keeps running.
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import pytest

from tests.support.service_harness import eventually
from tests.support.tenant_accounts import jsz_accounts
from tests.support.tenant_services import connz, run_hello
from tickmesh.cli.main import main
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime.subjects import TenantNames
from tickmesh.runtime.tenancy import SERVICE, tenant_streams
from tickmesh.runtime.tenancy.registry import TenantDirectory
from tickmesh.sdk import Client, RPCError
from tickmesh.sdk.errors import StatusCode

REFRESH_S = 0.2
WAIT_S = 20.0
HELLO_S = 5.0
TICKMESH = Path(sys.executable).with_name("tickmesh")


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    config = MeshConfig(
        data_dir=tmp_path / "mesh",
        tenant_dir=tmp_path / "tenants",
        tenant_refresh_s=REFRESH_S,
        ack_wait_s=5.0,
    )
    async with Mesh(config) as running:
        yield running


def _services(mesh: Mesh) -> dict[str, object]:
    return {
        "router": mesh.router,
        "state": mesh.state,
        "guardrail": mesh.guardrail,
        "pool": mesh.pool,
    }


def _served(mesh: Mesh) -> dict[str, set[str]]:
    served: dict[str, set[str]] = {}
    for name, service in _services(mesh).items():
        tenants = getattr(service, "served_tenants")  # noqa: B009 - every service has it
        served[name] = set(tenants)
    return served


async def _until(condition: Callable[[], bool], what: str) -> None:
    async def probe() -> bool:
        return condition()

    await eventually(probe, within=WAIT_S, what=what)


async def _tickmesh(*argv: str) -> str:
    out = io.StringIO()
    # The CLI runs its own event loop: off this one.
    code = await asyncio.to_thread(main, list(argv), out)
    assert code == 0, out.getvalue()
    return out.getvalue()


def _log(mesh: Mesh) -> str:
    assert mesh.nats is not None
    return mesh.nats.log_path.read_text()


async def test_a_tenant_created_while_the_mesh_runs_is_served_in_its_own_account(
    mesh: Mesh, tmp_path: Path
) -> None:
    tenant_dir = tmp_path / "tenants"
    assert TenantDirectory(tenant_dir).exists(), "the mesh initialises the directory"
    assert all(not tenants for tenants in _served(mesh).values()), _served(mesh)

    output = await _tickmesh(
        "tenant", "create", "acme", "--dir", str(tenant_dir), "--nats-url", mesh.nats_url
    )
    assert "reloaded NATS server(s)" in output

    await _until(
        lambda: all("acme" in tenants for tenants in _served(mesh).values()),
        f"every service serves acme: {_served(mesh)}",
    )
    result = await run_hello(mesh.router_target, mesh.pool_target, "acme")
    assert result == {"greeting": "HELLO, ACME!"}

    assert mesh.nats is not None
    connections = await connz(mesh.nats.monitor_url)
    of_acme = {c["name"]: c.get("account") for c in connections if c["name"].endswith(" acme")}
    services = {"router", "state", "guardrail", "executor-pool"}
    assert {name.split(" ")[0] for name in of_acme} == services, of_acme
    assert set(of_acme.values()) == {"acme"}, of_acme
    streams = await jsz_accounts(mesh.nats.monitor_url)
    assert set(tenant_streams(TenantNames("acme"))) <= set(streams.get("acme", [])), streams
    elsewhere = [n for account, names in streams.items() if account != "acme" for n in names]
    assert not [name for name in elsewhere if "ACME" in name], streams
    assert "Violation" not in _log(mesh)


async def test_a_disabled_tenant_is_no_longer_served_while_another_keeps_running(
    mesh: Mesh, tmp_path: Path
) -> None:
    tenant_dir = str(tmp_path / "tenants")
    for tenant in ("acme", "beta"):
        await _tickmesh(
            "tenant", "create", tenant, "--dir", tenant_dir, "--nats-url", mesh.nats_url
        )
    await _until(
        lambda: all({"acme", "beta"} <= tenants for tenants in _served(mesh).values()),
        f"every service serves acme and beta: {_served(mesh)}",
    )
    assert await run_hello(mesh.router_target, mesh.pool_target, "acme") == {
        "greeting": "HELLO, ACME!"
    }

    await _tickmesh("tenant", "disable", "acme", "--dir", tenant_dir, "--nats-url", mesh.nats_url)
    await _until(
        lambda: all(tenants == {"beta"} for tenants in _served(mesh).values()),
        f"acme is no longer served: {_served(mesh)}",
    )
    async with await Client.connect(mesh.router_target, tenant="acme") as client:
        with pytest.raises(RPCError) as refused:
            await client.list_lifetimes()
    assert refused.value.status == StatusCode.PERMISSION_DENIED
    assert "unknown tenant 'acme'" in str(refused.value)

    assert await run_hello(mesh.router_target, mesh.pool_target, "beta") == {
        "greeting": "HELLO, BETA!"
    }
    assert "Permissions Violation" not in _log(mesh)


async def test_tickmesh_dev_with_a_tenant_dir_serves_a_tenant_created_while_it_runs(
    tmp_path: Path,
) -> None:
    tenant_dir = tmp_path / "tenants"
    process = await asyncio.create_subprocess_exec(
        str(TICKMESH),
        "dev",
        "--tenant-dir",
        str(tenant_dir),
        "--data-dir",
        str(tmp_path / "mesh"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        lines: dict[str, str] = {}
        async with asyncio.timeout(WAIT_S):
            while "tickmesh dev is running" not in lines.get("tickmesh", ""):
                line = (await process.stdout.readline()).decode()
                assert line, "tickmesh dev ended before it ran"
                key, _, value = line.partition(" ")
                lines[key] = value.strip() if key != "tickmesh" else line
        assert lines["tenants"].startswith(str(tenant_dir))
        nats_url = lines["nats"]
        await _tickmesh(
            "tenant", "create", "acme", "--dir", str(tenant_dir), "--nats-url", nats_url
        )
        router, pool = lines["router"], lines["executor"].removeprefix("pool").strip()
        result = await eventually(
            lambda: _hello_when_served(router, pool), within=3 * HELLO_S, what="acme is served"
        )
        assert result == {"greeting": "HELLO, ACME!"}
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT_S):
            await process.communicate()
    assert process.returncode == 0


async def _hello_when_served(router: str, pool: str) -> dict[str, object] | None:
    """acme's hello once every service serves acme; None while one refuses it."""
    try:
        # A worker refused by the pool stops without connecting: give up on it.
        async with asyncio.timeout(HELLO_S):
            return await run_hello(router, pool, "acme")
    except TimeoutError:
        return None
    except RPCError as exc:
        if exc.status != StatusCode.PERMISSION_DENIED:
            raise
        return None


async def test_a_tenants_event_stream_follows_its_storage_without_a_restart(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`tickmesh tenant limits` without --nats-url, then a reload by hand: the running state
    service fits the event stream's byte limit to the new storage (a quarter of it). While
    the servers do not apply it yet, the service says so once, and again once they do."""
    caplog.set_level(logging.INFO, logger="tickmesh.state.server")
    tenant_dir = tmp_path / "tenants"
    await _tickmesh(
        "tenant", "create", "acme", "--max-storage", "256MiB",
        "--dir", str(tenant_dir), "--nats-url", mesh.nats_url,
    )  # fmt: skip
    await _until(
        lambda: all("acme" in tenants for tenants in _served(mesh).values()),
        f"every service serves acme: {_served(mesh)}",
    )
    evt = TenantNames("acme").evt_stream
    seed = TenantDirectory(tenant_dir).seed_path("acme", SERVICE)
    nc = await nats.connect(mesh.nats_url, nkeys_seed=str(seed), allow_reconnect=False)
    try:
        js = nc.jetstream()

        async def max_bytes() -> int:
            return int((await js.stream_info(evt)).config.max_bytes or -1)

        assert await max_bytes() == 64 << 20

        output = await _tickmesh(
            "tenant", "limits", "acme", "--max-storage", "128MiB", "--dir", str(tenant_dir)
        )
        assert "reload the NATS servers" in output
        await asyncio.sleep(5 * REFRESH_S)
        assert await max_bytes() == 64 << 20, "the server has not applied the new storage yet"
        waiting = [r.getMessage() for r in caplog.records if "still apply" in r.getMessage()]
        assert waiting == [
            "tenant acme: the registry gives it 128MiB of JetStream storage, the NATS servers "
            "still apply 256MiB; its event stream keeps its byte limit until they reload their "
            "configuration (nats-server --signal reload)"
        ], "said once, though asked at every refresh"

        assert mesh.nats is not None
        assert mesh.nats.process is not None
        mesh.nats.process.send_signal(signal.SIGHUP)  # nats-server --signal reload

        async def fitted() -> bool:
            return await max_bytes() == 32 << 20

        await eventually(fitted, within=WAIT_S, what=f"{evt} holds at most 32 MiB")
        assert "tenant acme: the NATS servers apply its storage of 128MiB" in caplog.messages
    finally:
        await nc.close()
