"""Helpers for NATS KV buckets."""

from __future__ import annotations

from nats.js.kv import KeyValue


async def keys_matching(kv: KeyValue, pattern: str) -> list[str]:
    """Keys matching a NATS subject pattern such as ``graph.*.latest`` or ``lt.>``.

    nats-py's ``KeyValue.keys(filters=...)`` matches substrings, not subject
    wildcards, so listing goes through a metadata-only watch that ends once the
    current values have been delivered.
    """
    watcher = await kv.watch(pattern, ignore_deletes=True, meta_only=True)
    keys: list[str] = []
    try:
        async for entry in watcher:
            if entry is None:
                break
            keys.append(entry.key)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
    return keys
