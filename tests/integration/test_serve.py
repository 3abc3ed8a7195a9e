"""Each service runs as its own process (`tickmesh serve`), reports SERVING on the gRPC
health service, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.nats_server import new_tenant
from tickmesh.runtime.embedded_nats import EmbeddedNats

SERVICES = {
    "router": "ROUTER",
    "guardrail": "GUARDRAIL",
    "state": "STATE",
    "executor-pool": "EXECUTOR_POOL",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_tickmesh_serve_runs_and_stops_cleanly(
    service: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    prefix = f"TICKMESH_{SERVICES[service]}_"
    port = _free_port()
    env = {
        **os.environ,
        f"{prefix}NATS_URL": nats_server.url,
        f"{prefix}TENANTS": new_tenant("s"),
        f"{prefix}GRPC_LISTEN": f"127.0.0.1:{port}",
        f"{prefix}STORE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        f"{prefix}BLOB_ROOT": str(tmp_path / "blobs"),
    }
    tickmesh = Path(sys.executable).with_name("tickmesh")
    process = await asyncio.create_subprocess_exec(
        str(tickmesh),
        "serve",
        service,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
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
