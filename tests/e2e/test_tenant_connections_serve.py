"""`tickmesh serve` with ``nats_tenant_dir`` and no shared NATS credentials.

The state service and the executor pool run as processes, each configured only with
the server URL, the tenant directory and two tenants. Each opens one connection per
tenant in that tenant's account (the pool as the executor user, which may not create
streams), counts each tenant's consumers through the tenant's own connection, and
stops cleanly on SIGTERM. A tenant without a seed stops the start with an error that
names it and the missing file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.nats_configs import NatsServers
from tests.support.ports import free_port
from tests.support.tenant_accounts import AccountsServer, provision, start_accounts_server
from tickmesh.runtime.tenancy import Limits

TENANTS = ("a", "b")
WAIT_S = 20.0
TICKMESH = Path(sys.executable).with_name("tickmesh")


@pytest.fixture
async def accounts(servers: NatsServers, tmp_path: Path) -> AccountsServer:
    server = start_accounts_server(servers, tmp_path, dict.fromkeys(TENANTS, Limits()))
    for tenant in TENANTS:
        await provision(server, tenant)
    return server


def _environment(prefix: str, accounts: AccountsServer, **extra: str) -> dict[str, str]:
    # Nothing of the caller's TICKMESH_* settings: no shared credentials at all.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKMESH_")}
    env.update(
        {
            f"{prefix}NATS_URL": accounts.url,
            f"{prefix}NATS_TENANT_DIR": str(accounts.directory.path),
            f"{prefix}TENANTS": ",".join(TENANTS),
            f"{prefix}LOG_JSON": "false",
            **{f"{prefix}{k.upper()}": v for k, v in extra.items()},
        }
    )
    return env


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


async def _connections(accounts: AccountsServer) -> set[tuple[str, str]]:
    report = json.loads(
        await asyncio.to_thread(_get, f"{accounts.monitor_url}/connz?auth=true&limit=1024")
    )
    return {(c.get("name", ""), c.get("account", "")) for c in report.get("connections") or []}


async def _consumers(metrics_url: str) -> set[tuple[str, str]]:
    try:
        text = (await asyncio.to_thread(_get, metrics_url)).decode()
    except OSError:
        return set()
    return {
        (sample.labels["tenant"], sample.labels["consumer"])
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tickmesh_consumer_pending_messages"
    }


async def test_tickmesh_serve_holds_one_connection_per_tenant_without_shared_credentials(
    accounts: AccountsServer, tmp_path: Path
) -> None:
    metrics_port = free_port()
    state_env = _environment(
        "TICKMESH_STATE_",
        accounts,
        instance="st",
        store_url=f"sqlite:///{tmp_path / 'state.db'}",
        blob_url=str(tmp_path / "blobs"),
        metrics_listen=f"127.0.0.1:{metrics_port}",
    )
    pool_env = _environment(
        "TICKMESH_EXECUTOR_POOL_", accounts, instance="ep", blob_url=str(tmp_path / "blobs")
    )
    processes: dict[str, asyncio.subprocess.Process] = {}
    try:
        for service, env in (("state", state_env), ("executor-pool", pool_env)):
            processes[service] = await asyncio.create_subprocess_exec(
                str(TICKMESH),
                "serve",
                service,
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        expected = {
            (f"{service} {instance} {tenant}", tenant)
            for service, instance in (("state", "st"), ("executor-pool", "ep"))
            for tenant in TENANTS
        }
        wanted_consumers = {(t, c) for t in TENANTS for c in ("state", "state_events")}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        seen: Any = None
        while True:
            for service, process in processes.items():
                if process.returncode is not None:
                    _, stderr = await process.communicate()
                    raise AssertionError(f"tickmesh serve {service} exited: {stderr.decode()}")
            connections = await _connections(accounts)
            consumers = await _consumers(f"http://127.0.0.1:{metrics_port}/metrics")
            seen = (connections, consumers)
            if expected <= connections and wanted_consumers <= consumers:
                break
            assert loop.time() < deadline, f"not there yet: {seen}"
            await asyncio.sleep(0.1)
        # Nothing of either service outside the tenants' accounts.
        assert {c for c in connections if c[0].startswith(("state ", "executor-pool "))} == (
            expected
        )
        for service, process in processes.items():
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT_S):
                _, stderr = await process.communicate()
            assert process.returncode == 0, f"{service}: {stderr.decode()}"
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert accounts.violations() == []


async def test_tickmesh_serve_refuses_a_tenant_without_a_seed(
    accounts: AccountsServer, tmp_path: Path
) -> None:
    env = _environment(
        "TICKMESH_STATE_",
        accounts,
        store_url=f"sqlite:///{tmp_path / 'state.db'}",
        blob_url=str(tmp_path / "blobs"),
    )
    env["TICKMESH_STATE_TENANTS"] = "a,c"
    process = await asyncio.create_subprocess_exec(
        str(TICKMESH),
        "serve",
        "state",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT_S):
        _, stderr = await process.communicate()
    message = stderr.decode()
    assert process.returncode == 1, message
    missing = accounts.directory.path / "creds" / "c" / "service.nk"
    assert f"tenant 'c': no service NKey seed at {missing}" in message
