"""Identifiers: UUIDv7 for lifetimes and envelopes, deterministic execution ids.

An execution id is a hash of what makes a step the same step: tenant, lifetime,
the sorted ids of the executions that led to it, the node and the iteration.
Redelivery, replay and fork therefore reproduce it, and any language can compute
it (docs/contracts.md gives the recipe; tests/vectors/execution_ids.json pins it).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Iterable

TENANT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_]{0,62}")
"""Tenant ids are subject-safe: they appear in every NATS subject and stream name."""

_EXECUTION_ID_PREFIX = b"tickmesh.execution.v1"

_lock = threading.Lock()
_last_ms = 0
_last_seq = 0

_RANDOM_POOL_BYTES = 4096
"""Random bytes read from the OS at once: one getrandom syscall per 500 ids, not two per id."""
_pool = b""
_pool_at = 0


def _reset_pool() -> None:
    # A forked child must never hand out the random bytes its parent also holds.
    global _pool, _pool_at
    _pool = b""
    _pool_at = 0


os.register_at_fork(after_in_child=_reset_pool)


def _random(n: int) -> int:
    """``n`` bytes from the OS's CSPRNG, as an int (call with ``_lock`` held)."""
    global _pool, _pool_at
    at = _pool_at
    if at + n > len(_pool):
        _pool = os.urandom(_RANDOM_POOL_BYTES)
        at = 0
    _pool_at = at + n
    return int.from_bytes(_pool[at : at + n], "big")


def uuid7() -> str:
    """Return a new time-ordered UUIDv7 (RFC 9562) as a string.

    Ids made within the same millisecond by this process stay ordered: a 12-bit
    counter in ``rand_a`` is seeded randomly each millisecond and incremented.
    """
    global _last_ms, _last_seq
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _last_seq = _random(2) & 0x7FF
        else:
            # Same (or earlier, if the clock stepped back) millisecond: keep order.
            _last_seq += 1
            if _last_seq > 0xFFF:
                _last_ms += 1
                _last_seq = 0
            ms = _last_ms
        seq = _last_seq
        rand_b = _random(8) & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand_b
    # The canonical 8-4-4-4-12 form, without building a uuid.UUID.
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def execution_id(
    tenant_id: str,
    lifetime_id: str,
    parent_execution_ids: Iterable[str],
    node_id: str,
    iteration: int,
) -> str:
    """Return the deterministic id of one step of a lifetime.

    The id is the first 32 hex digits of SHA-256 over the NUL-separated fields
    ``tickmesh.execution.v1, tenant, lifetime, sorted parents joined by ",", node,
    iteration (decimal)``.
    """
    parents = ",".join(sorted(parent_execution_ids))
    material = b"\0".join(
        [
            _EXECUTION_ID_PREFIX,
            tenant_id.encode(),
            lifetime_id.encode(),
            parents.encode(),
            node_id.encode(),
            str(iteration).encode(),
        ]
    )
    return hashlib.sha256(material).hexdigest()[:32]


def is_valid_tenant_id(tenant_id: str) -> bool:
    """Whether ``tenant_id`` is a well-formed, subject-safe tenant id."""
    return TENANT_ID_PATTERN.fullmatch(tenant_id) is not None
