"""Helpers for NATS KV buckets."""

from __future__ import annotations

from nats.js.kv import KeyValue


async def keys_matching(kv: KeyValue, pattern: str) -> list[str]:
    """Keys matching a NATS subject pattern such as ``graph.*.latest`` or ``lt.*``.

    Asked of the bucket's stream (stream info with a subjects filter): one request,
    and exact. Two other ways are wrong: nats-py's ``KeyValue.keys(filters=...)``
    matches substrings, not wildcards, and its watcher can announce "no more
    values" before the values it should follow, so a listing could come back empty.
    A deleted key keeps its subject (a delete marker), so callers that delete keys
    must check the values they read.
    """
    # KeyValue keeps its stream name, subject prefix and JetStream context privately.
    prefix: str = kv._pre
    info = await kv._js.stream_info(kv._stream, subjects_filter=f"{prefix}{pattern}")
    subjects = info.state.subjects or {}
    return sorted(subject[len(prefix) :] for subject in subjects)
