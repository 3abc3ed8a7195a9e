"""Wait timeouts: fire ``core.wait_timed_out`` when a waiting lifetime's deadline passes.

The deadline is part of the lifetime's stored state (``RouterLifetime.wait``), so
timers are only a cache of it:

* every write of a lifetime by this replica goes through :class:`ObservedRouterStore`,
  which (re)arms or disarms the lifetime's timer;
* on start, the tenant's lifetimes are scanned for WAITING ones with a deadline (so a
  restarted replica, or a replica whose peer died, takes the timers over). Every
  ``rescan_s`` after that only the index of waiting lifetimes is read (``wt.<id>`` keys,
  each written before the state that waits, so no such lifetime is missing from it):
  a rescan costs the lifetimes waiting, not every lifetime ever run. Every
  ``full_rescan_s`` the whole scan runs again (it also enters in the index the waits
  written by a version without one). An entry whose lifetime no longer waits is removed
  once it is ``STALE_INDEX_S`` old, unless it was written again meanwhile;
* firing goes through ``Processor.apply`` with the key ``timeout:<plan execution>``:
  compare-and-set with an outbox, so when two replicas fire the same timer the
  second one finds the lifetime no longer waiting (or republishes the first one's
  messages) and decides nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.runtime.logging import log_context
from tickmesh.sdk import NotFoundError

from . import core
from .processor import Processor
from .store import RouterStore

logger = logging.getLogger(__name__)

Observer = Callable[[rs.RouterLifetime], None]


STALE_INDEX_S = 300.0
"""How old an index entry of a lifetime that no longer waits must be before a rescan
removes it: far longer than an entry's write precedes its state's."""

INDEXED_REMEMBERED = 100_000
"""How many lifetimes a replica remembers having entered in the index (beyond that, the
oldest is entered again at its next write that waits)."""


class ObservedRouterStore(RouterStore):
    """A RouterStore that enters a lifetime in the index of waiting lifetimes before it
    writes a state that waits with a deadline, and reports every lifetime it writes to
    ``observer``."""

    observer: Observer | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._indexed: OrderedDict[str, datetime] = OrderedDict()
        """Lifetime → the deadline this replica last entered it in the index for."""

    async def create(self, state: rs.RouterLifetime) -> int:
        await self._index(state)
        revision = await super().create(state)
        self._observe(state)
        return revision

    async def update(self, state: rs.RouterLifetime, revision: int) -> int:
        await self._index(state)
        new_revision = await super().update(state, revision)
        self._observe(state)
        return new_revision

    async def update_many(
        self, writes: Sequence[tuple[rs.RouterLifetime, int]]
    ) -> list[int | Exception]:
        """As RouterStore's; a state whose index entry could not be written is not
        written either (its outcome is why)."""
        due = [
            (i, deadline)
            for i, (state, _) in enumerate(writes)
            if (deadline := self._due(state)) is not None
        ]
        unindexed: dict[int, Exception] = {}
        if due:
            entered = await asyncio.gather(
                *(self.index_wait(writes[i][0].lifetime.lifetime_id) for i, _ in due),
                return_exceptions=True,
            )
            for (i, deadline), result in zip(due, entered, strict=True):
                if isinstance(result, Exception):
                    unindexed[i] = result
                elif isinstance(result, BaseException):
                    raise result
                else:
                    self._entered(writes[i][0].lifetime.lifetime_id, deadline)
        if unindexed:
            kept = [i for i in range(len(writes)) if i not in unindexed]
            written = await super().update_many([writes[i] for i in kept]) if kept else []
            by_place = dict(zip(kept, written, strict=True)) | unindexed
            outcomes = [by_place[i] for i in range(len(writes))]
        else:
            outcomes = await super().update_many(writes)
        for (state, _), outcome in zip(writes, outcomes, strict=True):
            if isinstance(outcome, int):
                self._observe(state)
        return outcomes

    async def _index(self, state: rs.RouterLifetime) -> None:
        deadline = self._due(state)
        if deadline is not None:
            await self.index_wait(state.lifetime.lifetime_id)
            self._entered(state.lifetime.lifetime_id, deadline)

    def _due(self, state: rs.RouterLifetime) -> datetime | None:
        """The deadline ``state`` waits for, when the lifetime must be entered in the
        index for it first (not yet entered by this replica for this deadline)."""
        lifetime_id = state.lifetime.lifetime_id
        deadline = core.wait_deadline(state)
        if deadline is None:
            self._indexed.pop(lifetime_id, None)
            return None
        return None if self._indexed.get(lifetime_id) == deadline else deadline

    def _entered(self, lifetime_id: str, deadline: datetime) -> None:
        self._indexed[lifetime_id] = deadline
        self._indexed.move_to_end(lifetime_id)
        while len(self._indexed) > INDEXED_REMEMBERED:
            self._indexed.popitem(last=False)

    def _observe(self, state: rs.RouterLifetime) -> None:
        if self.observer is not None:
            try:
                self.observer(state)
            except Exception:  # pragma: no cover - a timer must never break a write
                logger.exception("wait timer observer failed")


class WaitTimers:
    """One asyncio timer per waiting lifetime with a deadline, per tenant."""

    def __init__(
        self, processor: Processor, *, rescan_s: float = 30.0, full_rescan_s: float = 1800.0
    ) -> None:
        self._processor = processor
        self._rescan_s = rescan_s
        self._full_rescan_s = full_rescan_s
        self._timers: dict[tuple[str, str], tuple[datetime, asyncio.TimerHandle]] = {}
        self._firing: set[asyncio.Task[None]] = set()
        self._scanners: dict[str, asyncio.Task[None]] = {}
        self.fired = 0
        """Timeouts this replica applied (for tests and metrics)."""

    def observer(self, tenant_id: str) -> Observer:
        return lambda state: self.observe(tenant_id, state)

    def observe(self, tenant_id: str, state: rs.RouterLifetime) -> None:
        """Arm, move or disarm the lifetime's timer after ``state`` was written."""
        key = (tenant_id, state.lifetime.lifetime_id)
        deadline = core.wait_deadline(state)
        current = self._timers.get(key)
        if current is not None and current[0] == deadline:
            return
        if current is not None:
            current[1].cancel()
            del self._timers[key]
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, (deadline - datetime.now(UTC)).total_seconds())
        handle = loop.call_at(loop.time() + delay, self._fire, tenant_id, key[1], deadline)
        self._timers[key] = (deadline, handle)

    def _fire(self, tenant_id: str, lifetime_id: str, deadline: datetime) -> None:
        self._timers.pop((tenant_id, lifetime_id), None)
        task = asyncio.get_running_loop().create_task(self._apply(tenant_id, lifetime_id, deadline))
        self._firing.add(task)
        task.add_done_callback(self._firing.discard)

    async def _apply(self, tenant_id: str, lifetime_id: str, deadline: datetime) -> None:
        with log_context(tenant=tenant_id, lifetime=lifetime_id):
            try:
                tenant = self._processor.tenant(tenant_id)
                loaded = await tenant.store.load(lifetime_id, fresh=True)
                if loaded is None or core.wait_deadline(loaded.state) is None:
                    return
                wait_id = loaded.state.wait.plan_execution_id
                fired = False

                def mutate(lt: core.Lifetime) -> bool:
                    nonlocal fired
                    due = core.wait_deadline(lt.state)
                    if due is None or lt.state.wait.plan_execution_id != wait_id:
                        return False  # woken (or fired by another replica) meanwhile
                    if due > lt.now:
                        return False  # early by clock skew: re-armed below
                    core.wait_timed_out(lt)
                    fired = True
                    return True

                applied = await self._processor.apply(
                    tenant, lifetime_id, mutate, [f"timeout:{wait_id}"]
                )
                if fired:
                    self.fired += 1
                    logger.info("wait %s of lifetime %s timed out", wait_id, lifetime_id)
                else:
                    self.observe(tenant_id, applied.lifetime.state)
            except NotFoundError:
                return
            except Exception:
                logger.exception("firing the wait timeout of %s failed; retrying", lifetime_id)
                await asyncio.sleep(1.0)
                if (tenant_id, lifetime_id) not in self._timers:
                    self._fire(tenant_id, lifetime_id, deadline)

    async def scan(self, tenant_id: str) -> int:
        """Arm timers for every waiting lifetime of the tenant, reading every lifetime,
        and enter each in the index of waiting lifetimes; returns how many wait."""
        tenant = self._processor.tenant(tenant_id)
        armed = 0
        for lifetime_id in await tenant.store.lifetime_ids():
            loaded = await tenant.store.load(lifetime_id, fresh=True)
            if loaded is not None and core.wait_deadline(loaded.state) is not None:
                # A wait written by a version without the index has no entry yet.
                await tenant.store.index_wait(lifetime_id)
                self.observe(tenant_id, loaded.state)
                armed += 1
        return armed

    async def scan_index(self, tenant_id: str) -> int:
        """Arm timers for the waiting lifetimes of the index, and remove the entries of
        lifetimes that stopped waiting a while ago; returns how many wait."""
        tenant = self._processor.tenant(tenant_id)
        armed = 0
        for entry in await tenant.store.wait_index():
            loaded = await tenant.store.load(entry.lifetime_id, fresh=True)
            if loaded is not None and core.wait_deadline(loaded.state) is not None:
                self.observe(tenant_id, loaded.state)
                armed += 1
            elif time.time() - entry.indexed_at > STALE_INDEX_S:
                # Unless entered again since it was read: a wait begun meanwhile keeps it.
                await tenant.store.unindex_wait(entry)
        return armed

    async def start(self, tenant_id: str) -> None:
        """Scan now, then every ``rescan_s``."""
        armed = await self.scan(tenant_id)
        if armed:
            logger.info("tenant %s: %d waiting lifetime(s) with a timeout", tenant_id, armed)
        if self._rescan_s > 0 and tenant_id not in self._scanners:
            self._scanners[tenant_id] = asyncio.create_task(self._rescan(tenant_id))

    async def _rescan(self, tenant_id: str) -> None:
        loop = asyncio.get_running_loop()
        full_at = loop.time() + self._full_rescan_s
        while True:
            await asyncio.sleep(self._rescan_s)
            try:
                if self._full_rescan_s > 0 and loop.time() >= full_at:
                    full_at = loop.time() + self._full_rescan_s
                    await self.scan(tenant_id)
                else:
                    await self.scan_index(tenant_id)
            except Exception:
                logger.exception("tenant %s: rescanning waiting lifetimes failed", tenant_id)

    async def stop_tenant(self, tenant_id: str) -> None:
        """Disarm the tenant's timers and stop rescanning it (it is no longer served)."""
        for key in [key for key in self._timers if key[0] == tenant_id]:
            self._timers.pop(key)[1].cancel()
        scanner = self._scanners.pop(tenant_id, None)
        if scanner is not None:
            scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await scanner

    async def stop(self) -> None:
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        tasks = [*self._scanners.values(), *self._firing]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._scanners.clear()
