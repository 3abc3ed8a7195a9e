"""Named crash points at durability boundaries, for fault tests.

``TICKMESH_CRASH_AT=<name>[:n]`` makes the process ``os._exit(137)`` (as a
``SIGKILL`` would, without flushing or cleanup) the n-th time (default 1) it
reaches ``crash_point(name)``. The environment is read once, at import; when
the variable is unset every call is one comparison with None.

Points (see docs/configuration.md, "Crash points (testing)"):

* state: ``after_store_commit``, ``before_ack``; ``after_republish`` (appends through
  the state API only: records from the bus need no ref);
* router: ``router_after_dispatch_before_ack``;
* executor pool: ``pool_after_blob_put``, ``pool_after_record_publish``.
"""

from __future__ import annotations

import logging
import os
import sys

from .settings import CrashSettings

logger = logging.getLogger(__name__)

EXIT_STATUS = 137
"""The status a SIGKILLed process reports to a shell (128 + 9)."""


def parse(spec: str | None) -> tuple[str, int] | None:
    """``name[:n]`` as (name, n); None when unset or empty.

    Raises:
        ValueError: When ``n`` is not a positive integer.
    """
    if not spec or not spec.strip():
        return None
    name, sep, count = spec.strip().partition(":")
    hits = int(count) if sep else 1
    if hits < 1:
        raise ValueError(f"TICKMESH_CRASH_AT={spec!r}: the hit count must be >= 1")
    return name, hits


_armed = parse(CrashSettings().crash_at)
_hits = 0


def crash_point(name: str) -> None:
    """Exit the process with status 137 if ``name`` is the armed point and this is its n-th hit."""
    if _armed is None:
        return
    _hit(name)


def _hit(name: str) -> None:
    global _hits
    assert _armed is not None
    armed_name, at = _armed
    if name != armed_name:
        return
    _hits += 1
    if _hits >= at:
        logger.critical("crash point %s reached (hit %d): exit %d", name, _hits, EXIT_STATUS)
        sys.stderr.flush()
        os._exit(EXIT_STATUS)


__all__ = ["EXIT_STATUS", "crash_point", "parse"]
