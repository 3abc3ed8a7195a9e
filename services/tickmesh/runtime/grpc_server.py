"""The gRPC server wiring every service shares: limits, health, shutdown.

* ``grpc.so_reuseport=0``: a second server on the same port fails loudly
  instead of silently sharing it (grpc's default on Linux).
* Message size limits both ways (the Python default sends unlimited).
* The standard health service, set SERVING once the service is ready and
  NOT_SERVING when it drains.
* TLS, API keys and deadline rules from :mod:`tickmesh.runtime.grpc_security`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tickmesh.sdk import ConfigError

from .grpc_security import ServerSecurity

logger = logging.getLogger(__name__)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    host: str

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def set_serving(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(service, status)
        await self.health.set("", status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def create_server(
    listen: str,
    *,
    max_message_bytes: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    maximum_concurrent_rpcs: int | None = None,
    security: ServerSecurity | None = None,
) -> GrpcServer:
    """Create and bind (but do not start) a grpc.aio server with a health service.

    ``security`` (see :mod:`tickmesh.runtime.grpc_security`): TLS and call rules; its
    guard runs first, so an unauthenticated call reaches no other interceptor.
    """
    security = security or ServerSecurity()
    server = grpc.aio.server(
        interceptors=[*security.interceptors(), *interceptors],
        options=server_options(max_message_bytes),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host, _, port_text = listen.rpartition(":")
    credentials = security.credentials()
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"cannot bind gRPC server to {listen}: {exc}") from exc
    if port == 0 and port_text != "0":
        raise ConfigError(f"cannot bind gRPC server to {listen}")
    return GrpcServer(server=server, health=health_servicer, port=port, host=host or "127.0.0.1")


def client_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
