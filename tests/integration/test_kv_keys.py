"""keys_matching against a real bucket: every key, past the server's page of 100,000."""

from __future__ import annotations

from nats.js.api import KeyValueConfig

from tests.support.nats_server import new_tenant
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.kv import keys_matching
from tickmesh.runtime.nats import Outgoing, publish_batch

PAGE = 100_000
"""The most subjects nats-server lists in one stream info answer."""


async def test_every_key_is_listed_past_the_first_page(nats_server: EmbeddedNats) -> None:
    nc = await tm_nats.connect(nats_server.url, name="kv-keys-test")
    js = tm_nats.jetstream(nc)
    bucket = new_tenant("keys").upper()
    kv = await js.create_key_value(KeyValueConfig(bucket=bucket))
    try:
        count = PAGE + 7
        # Written as the bucket's stream stores them (one message per key), in batches.
        for start in range(0, count, 5_000):
            await publish_batch(
                js,
                [
                    Outgoing(f"$KV.{bucket}.lt.{i:06d}", b"x", {})
                    for i in range(start, min(count, start + 5_000))
                ],
            )
        await kv.put("graph.g.latest", b"g")
        keys = await keys_matching(kv, "lt.*")
        assert len(keys) == count
        assert keys[0] == "lt.000000"
        assert keys[-1] == f"lt.{count - 1:06d}"
        assert await keys_matching(kv, "graph.*.latest") == ["graph.g.latest"]
        assert await keys_matching(kv, "wt.*") == []
    finally:
        await js.delete_key_value(bucket)
        await nc.close()
