"""Container health probe: exit 0 when a tickmesh service's gRPC health says SERVING.

    python healthcheck.py [HOST:PORT [SERVICE]]

The target defaults to ``$TICKMESH_HEALTHCHECK_TARGET`` (the image sets 127.0.0.1:7000) and the
service to "" (the whole server), which every tickmesh service sets SERVING once it is ready
and NOT_SERVING while it drains. Any other answer, or none within the timeout, exits 1 with one
line on stderr.

A service whose port serves TLS (``grpc_tls_cert``) is probed over TLS when
``TICKMESH_HEALTHCHECK_TLS_CA`` names the CA that signed its certificate;
``TICKMESH_HEALTHCHECK_TLS_CERT`` and ``..._TLS_KEY`` add a client certificate (mutual TLS), and
``TICKMESH_HEALTHCHECK_TLS_SERVER_NAME`` the name to check the certificate against (the probe
dials 127.0.0.1, which a service certificate rarely names). The health service needs no API key.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:7000"
TIMEOUT_S = 3.0
_ENV = "TICKMESH_HEALTHCHECK_"


def _read(variable: str) -> bytes | None:
    path = os.environ.get(_ENV + variable)
    return Path(path).read_bytes() if path else None


def open_channel(target: str) -> grpc.Channel:
    """A plaintext channel, or a TLS one when a CA is configured (see the module docstring)."""
    ca = _read("TLS_CA")
    if ca is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=_read("TLS_KEY"), certificate_chain=_read("TLS_CERT")
    )
    server_name = os.environ.get(_ENV + "TLS_SERVER_NAME")
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def check(target: str, service: str = "") -> str | None:
    """None when ``target`` reports ``service`` SERVING; otherwise what went wrong."""
    with open_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the health stubs are untyped
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            return f"{target}: {exc.code().name}: {exc.details()}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return f"{target}: {status}"
    return None


def main(argv: list[str]) -> int:
    target = argv[0] if argv else os.environ.get(_ENV + "TARGET", DEFAULT_TARGET)
    service = argv[1] if len(argv) > 1 else ""
    try:
        problem = check(target, service)
    except OSError as exc:
        problem = f"cannot read a TLS file: {exc}"
    if problem is not None:
        sys.stderr.write(f"unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
