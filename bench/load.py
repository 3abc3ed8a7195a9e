"""The load generator: starts lifetimes through the router's public API, keeps M of them
in flight, and learns that each ended from its lifetime events on the bus (a core NATS
subscription to the tenant's event subjects, so waiting costs the router nothing)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime import nats_wire as tm_nats_wire
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import Client, TickmeshError, events_of
from tickmesh.v1 import envelope_pb2, graph_pb2, lifetime_pb2

from .handlers import graph_yaml
from .hops import Tap

TERMINAL = {
    lifetime_pb2.LIFETIME_STATE_COMPLETED: "completed",
    lifetime_pb2.LIFETIME_STATE_FAILED: "failed",
    lifetime_pb2.LIFETIME_STATE_ABORTED: "aborted",
}


class EndWatcher:
    """Resolves a future per lifetime when an event reports a terminal state."""

    def __init__(self) -> None:
        self._ended: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self.events = 0

    def take(self, msg: Msg) -> None:
        """One lifetime events message (called from the client's read loop)."""
        env = envelope_pb2.ExecutionEnvelope.FromString(msg.data)
        events = events_of(env)
        self.events += len(events)
        ended = [e for e in events if e.state in TERMINAL]
        if not ended:
            return
        event = ended[-1]
        state = TERMINAL[event.state]
        lifetime_id = env.header.lifetime_id or msg.subject.rsplit(".", 1)[-1]
        if event.error.message:
            self._errors[lifetime_id] = event.error.message
        waiter = self._waiters.pop(lifetime_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(state)
        else:
            self._ended[lifetime_id] = state

    async def on_msg(self, msg: Msg) -> None:
        """The subscription's callback, where the client cannot deliver inline."""
        self.take(msg)

    async def subscribe(self, nc: NatsClient, subject: str) -> bool:
        """Watch ``subject`` (a tenant's event subjects) on ``nc``; True when its messages
        are taken straight from the client's read loop, as the services take theirs. The
        watcher sees every step's events message; nats-py's callback path (a queue and a
        task switch per message) cost the load generator, whose CPU counts in the bench's
        "all", about an eighth more."""
        sub = await nc.subscribe(
            subject,
            cb=self.on_msg,
            pending_msgs_limit=10_000_000,
            pending_bytes_limit=1 << 30,
        )
        return tm_nats_wire.deliver_inline(nc, sub, self.take)

    async def wait(self, lifetime_id: str, limit_s: float) -> str:
        state = self._ended.pop(lifetime_id, None)
        if state is not None:
            return state
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[lifetime_id] = waiter
        try:
            return await asyncio.wait_for(waiter, limit_s)
        except TimeoutError:
            self._waiters.pop(lifetime_id, None)
            return "timeout"

    def error_of(self, lifetime_id: str) -> str:
        return self._errors.get(lifetime_id, "")


@dataclass
class PhaseRun:
    concurrency: int
    lifetimes: int
    wall_s: float
    lifetime_ids: list[str] = field(default_factory=list)
    states: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lifetime_s: list[float] = field(default_factory=list)
    full_from: float | None = None
    """When the last lane's first lifetime had started (epoch seconds): from then on every
    lane is running a lifetime or starting its next one."""
    full_until: float | None = None
    """When the first lane found no lifetime left to start, so that fewer than
    ``concurrency`` were in flight from then on (epoch seconds)."""

    def full_window(self) -> tuple[float, float] | None:
        """The time every lane was busy, running a lifetime or starting its next (start,
        end), if there was one."""
        if self.full_from is None or self.full_until is None:
            return None
        if self.full_until <= self.full_from:
            return None
        return self.full_from, self.full_until


class LoadGenerator:
    def __init__(self, router: str, nats_url: str, tenant: str, *, max_starting: int = 64) -> None:
        self._router = router
        self._nats_url = nats_url
        self.tenant = tenant
        self.client: Client | None = None
        self._nc: NatsClient | None = None
        self.watcher = EndWatcher()
        self.graph: graph_pb2.AgentGraph | None = None
        # StartLifetime calls in flight at once. Over ~1,000 concurrent unary calls on one
        # grpc.aio channel, the excess fail with CANCELLED (README, known issues), so the
        # lanes queue here; every lifetime still runs concurrently once started.
        self.max_starting = max_starting

    async def open(self, rounds: int) -> None:
        self.client = await Client.connect(self._router, tenant=self.tenant, call_timeout=120)
        self._nc = await tm_nats.connect(self._nats_url, name="bench-load")
        await self.watcher.subscribe(self._nc, TenantNames(self.tenant).evt_all)
        await self._nc.flush()
        self.graph = await self.client.register_graph(graph_yaml(rounds))

    async def tap(self, tap: Tap) -> list[Any]:
        """Subscribe ``tap`` to the tenant's subjects; returns the subscriptions."""
        assert self._nc is not None
        subs = [
            await self._nc.subscribe(s, cb=tap.on_msg, pending_msgs_limit=10_000_000)
            for s in tap.subjects
        ]
        await self._nc.flush()
        return subs

    async def backlog(self) -> dict[str, int]:
        """Messages not yet consumed and acked, per durable consumer of the tenant's streams."""
        assert self._nc is not None
        js = self._nc.jetstream()
        names = TenantNames(self.tenant)
        out: dict[str, int] = {}
        for stream in (names.work_stream, names.exec_stream, names.ref_stream, names.evt_stream):
            for info in await js.consumers_info(stream):
                if not info.config.durable_name:
                    continue  # ephemeral watchers (e.g. WatchLifetime) do not hold work back
                out[f"{stream}/{info.name}"] = int(info.num_pending or 0) + int(
                    info.num_ack_pending or 0
                )
        return out

    async def drain(self, limit_s: float = 300.0) -> tuple[float, dict[str, int]]:
        """Wait until every consumer is caught up; return (seconds waited, backlog at start)."""
        start = time.perf_counter()
        first = await self.backlog()
        current = first
        while sum(current.values()) and time.perf_counter() - start < limit_s:
            await asyncio.sleep(0.1)
            current = await self.backlog()
        return time.perf_counter() - start, {k: v for k, v in first.items() if v}

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self._nc is not None:
            await self._nc.close()

    async def run(
        self, *, concurrency: int, lifetimes: int, rounds: int, limit_s: float = 600.0
    ) -> PhaseRun:
        """Run ``lifetimes`` lifetimes, ``concurrency`` at a time (closed loop)."""
        client, graph = self.client, self.graph
        assert client is not None
        assert graph is not None
        result = PhaseRun(concurrency=concurrency, lifetimes=lifetimes, wall_s=0.0)
        todo = iter(range(lifetimes))
        value = {"rounds": rounds}
        starting = asyncio.Semaphore(self.max_starting)
        lanes = max(1, min(concurrency, lifetimes))
        lanes_started = 0  # lanes whose first lifetime has started

        async def one(task: asyncio.Task[None] | None, *, first: bool) -> bool:
            """Start one lifetime and wait for its end; False if it did not start."""
            nonlocal lanes_started
            t0 = time.perf_counter()
            try:
                async with starting:
                    handle = await client.start_lifetime(graph.id, value, version=graph.version)
            except TickmeshError as exc:
                if task is not None and task.cancelling():
                    # Interrupted (Ctrl-C): the call failed as CANCELLED, so the error, not
                    # the cancellation, reached here. Stop, or the lane starts the rest.
                    raise asyncio.CancelledError from exc
                result.states["start_failed"] += 1
                if len(result.errors) < 5:
                    result.errors.append(
                        f"StartLifetime failed after {time.perf_counter() - t0:.2f}s: {exc}"
                    )
                return False
            if first:
                # Not "M in flight at one instant": a lane between two lifetimes is still
                # busy (its next start is queued), and at M = 1,000 the first lifetimes
                # can end before the last lane's first one has started.
                lanes_started += 1
                if lanes_started == lanes:
                    result.full_from = time.time()
            state = await self.watcher.wait(handle.id, limit_s)
            result.lifetime_s.append(time.perf_counter() - t0)
            result.lifetime_ids.append(handle.id)
            result.states[state] += 1
            if state != "completed" and len(result.errors) < 5:
                result.errors.append(
                    f"{handle.id}: {state} {self.watcher.error_of(handle.id)}".strip()
                )
            return True

        async def lane() -> None:
            task = asyncio.current_task()
            first = True
            for _ in todo:  # shared: each lane takes the next lifetime when its own ended
                if await one(task, first=first):
                    first = False
            # The first lane out of work ends the time every lane was busy.
            if result.full_until is None:
                result.full_until = time.time()

        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(lanes)))
        result.wall_s = time.perf_counter() - start
        return result
