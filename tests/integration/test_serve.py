"""Each service runs as its own process (`tickmesh serve`), reports SERVING on the gRPC
health service, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.nats_server import new_tenant
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer
from tests.support.s3_server import S3Bucket, S3Endpoint
from tickmesh.runtime.embedded_nats import EmbeddedNats

SERVICES = {
    "router": "ROUTER",
    "guardrail": "GUARDRAIL",
    "state": "STATE",
    "executor-pool": "EXECUTOR_POOL",
}


async def _serving(target: str, within: float) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the health stubs are untyped
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    return False


def _serve_env(
    service: str, nats_url: str, tmp_path: Path, grpc_port: int, **settings: str
) -> dict[str, str]:
    """The environment of ``tickmesh serve service`` for one fresh tenant, plus ``settings``
    (field names, without the service's prefix)."""
    prefix = f"TICKMESH_{SERVICES[service]}_"
    return {
        **os.environ,
        f"{prefix}NATS_URL": nats_url,
        f"{prefix}TENANTS": new_tenant("s"),
        f"{prefix}GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        f"{prefix}STORE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        f"{prefix}BLOB_URL": str(tmp_path / "blobs"),
        **{prefix + name.upper(): value for name, value in settings.items()},
    }


async def _spawn_serve(service: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    """``tickmesh serve service`` with its stderr piped."""
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("tickmesh")),
        "serve",
        service,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_tickmesh_serve_runs_and_stops_cleanly(
    service: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    port = free_port()
    process = await _spawn_serve(service, _serve_env(service, nats_server.url, tmp_path, port))
    try:
        serving = await _serving(f"127.0.0.1:{port}", within=20)
        assert serving, f"{service} never reported SERVING"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_while_a_service_starts_stops_it_cleanly_once_started(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    env = _serve_env("state", nats_server.url, tmp_path, free_port(), log_json="false")
    process = await _spawn_serve("state", env)
    assert process.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(20):
            # The store is opened while the service is built, before its tenants, consumers
            # and gRPC server start: a SIGTERM now arrives in the middle of the start.
            while not any("applied schema migration" in line for line in seen):
                line = await process.stderr.readline()
                assert line, f"state exited while starting: {''.join(seen)}"
                seen.append(line.decode())
            process.send_signal(signal.SIGTERM)
            _, rest = await process.communicate()
        text = "".join(seen) + rest.decode()
        assert process.returncode == 0, text
        assert "state serving on" in text  # it finished starting ...
        assert "state stopping" in text  # ... then stopped as asked
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _fails_to_start(service: str, env: dict[str, str], within: float) -> tuple[str, float]:
    """Run ``tickmesh serve service``; it must exit 1 within ``within`` s. Returns stderr."""
    started = asyncio.get_running_loop().time()
    process = await _spawn_serve(service, {**os.environ, **env})
    try:
        async with asyncio.timeout(within):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    took = asyncio.get_running_loop().time() - started
    text = stderr.decode()
    assert process.returncode == 1, text
    assert "Traceback" not in text, text
    return text, took


def _base_env(prefix: str, nats_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        f"{prefix}NATS_URL": nats_url,
        f"{prefix}TENANTS": new_tenant("ff"),
        f"{prefix}GRPC_LISTEN": f"127.0.0.1:{free_port()}",
        f"{prefix}STORE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        f"{prefix}BLOB_URL": str(tmp_path / "blobs"),
        f"{prefix}NATS_CONNECT_TIMEOUT_S": "2",
    }


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_serve_fails_fast_when_nats_is_unreachable(service: str, tmp_path: Path) -> None:
    prefix = f"TICKMESH_{SERVICES[service]}_"
    port = free_port()
    env = _base_env(prefix, f"nats://svc:s3cret@127.0.0.1:{port}", tmp_path)
    stderr, took = await _fails_to_start(service, env, within=20)
    assert f"cannot connect to NATS at nats://svc:***@127.0.0.1:{port}" in stderr
    assert "s3cret" not in stderr
    assert took < 15, took


async def test_state_fails_fast_on_a_wrong_postgresql_dsn(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    env = _base_env("TICKMESH_STATE_", nats_server.url, tmp_path)
    port = free_port()
    env["TICKMESH_STATE_STORE_URL"] = f"postgresql://tm:hunter2@127.0.0.1:{port}/state"
    stderr, took = await _fails_to_start("state", env, within=30)
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}" in stderr, stderr
    assert "hunter2" not in stderr
    assert took < 20, took


async def test_state_fails_fast_on_a_database_that_does_not_exist(
    nats_server: EmbeddedNats, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    env = _base_env("TICKMESH_STATE_", nats_server.url, tmp_path)
    env["TICKMESH_STATE_STORE_URL"] = postgres_server.dsn_for("no_such_database")
    stderr, _ = await _fails_to_start("state", env, within=30)
    assert "no_such_database" in stderr, stderr
    assert "does not exist" in stderr, stderr


@pytest.mark.parametrize("service", ["state", "executor-pool"])
async def test_serve_fails_fast_on_a_missing_bucket(
    service: str, nats_server: EmbeddedNats, s3_server: S3Endpoint, tmp_path: Path
) -> None:
    prefix = f"TICKMESH_{SERVICES[service]}_"
    env = _base_env(prefix, nats_server.url, tmp_path)
    query = urlencode({"endpoint_url": s3_server.endpoint_url, "region": s3_server.region})
    env[f"{prefix}BLOB_URL"] = f"s3://no-such-bucket-here/tm?{query}"
    env["AWS_ACCESS_KEY_ID"] = s3_server.access_key_id
    env["AWS_SECRET_ACCESS_KEY"] = s3_server.secret_access_key
    stderr, took = await _fails_to_start(service, env, within=30)
    assert "no-such-bucket-here" in stderr, stderr
    assert took < 20, took


@pytest.mark.parametrize("service", ["router", "guardrail", "state"])
async def test_serve_fails_fast_when_redis_is_unreachable(
    service: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    prefix = f"TICKMESH_{SERVICES[service]}_"
    env = _base_env(prefix, nats_server.url, tmp_path)
    port = free_port()
    env[f"{prefix}USAGE_COUNTER_URL"] = f"redis://127.0.0.1:{port}/0"
    stderr, took = await _fails_to_start(service, env, within=30)
    assert f"127.0.0.1:{port}" in stderr, stderr
    assert "Redis" in stderr, stderr
    assert took < 20, took


async def test_serve_names_the_line_of_an_unknown_key_in_the_config_file(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    config = tmp_path / "tickmesh.yaml"
    config.write_text(f"nats_url: {nats_server.url}\nstate:\n  store_urll: sqlite:///x.db\n")
    env = {"TICKMESH_CONFIG": str(config)}
    stderr, _ = await _fails_to_start("state", env, within=20)
    assert f"{config}:3" in stderr, stderr
    assert "store_urll" in stderr, stderr


async def test_state_serves_the_cloud_profile_from_one_config_file(
    nats_server: EmbeddedNats,
    postgres_dsn: str,
    s3_bucket: S3Bucket,
    redis_url: str,
    tmp_path: Path,
) -> None:
    endpoint = s3_bucket.endpoint
    query = urlencode({"endpoint_url": endpoint.endpoint_url, "region": endpoint.region})
    port = free_port()
    config = tmp_path / "tickmesh.yaml"
    config.write_text(
        f"nats: {{url: '{nats_server.url}'}}\n"
        f"tenants: [{new_tenant('cfg')}]\n"
        f"usage_counter_url: '{redis_url}'\n"
        f"s3_access_key_id: {endpoint.access_key_id}\n"
        f"s3_secret_access_key: {endpoint.secret_access_key}\n"
        "state:\n"
        f"  grpc_listen: 127.0.0.1:{port}\n"
        f"  store_url: '{postgres_dsn}'\n"
        f"  blob_url: 's3://{s3_bucket.name}/svc?{query}'\n"
    )
    tickmesh = Path(sys.executable).with_name("tickmesh")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TICKMESH_", "AWS_"))}
    shown = await asyncio.create_subprocess_exec(
        str(tickmesh),
        "config",
        "show",
        "--service",
        "state",
        env={**env, "TICKMESH_CONFIG": str(config)},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await shown.communicate()
    assert f"store_url: {postgres_dsn}" in out.decode()
    assert "s3_secret_access_key: '***'" in out.decode()
    process = await asyncio.create_subprocess_exec(
        str(tickmesh),
        "serve",
        "state",
        env={**env, "TICKMESH_CONFIG": str(config)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert await _serving(f"127.0.0.1:{port}", within=30), "state never reported SERVING"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
