"""The executor conformance checker: drives any executor binary through the protocol's scenarios.

    python -m tests.conformance.check [--json] [--only NAME ...] -- <command to start an executor>

It starts an embedded mesh (``tickmesh.embedded.Mesh``, with its own nats-server) for one tenant,
and a recording gRPC proxy in front of the executor pool: the executor under test connects to
the proxy, which forwards every frame both ways and keeps a log of them, so the checker can see
what the executor said (hello, heartbeats, completions, rejections) and inject a ``Drain``.

The executor is started with ``TICKMESH_POOL`` (the proxy's host:port), ``TICKMESH_TENANT`` and
``TICKMESH_CONCURRENCY`` in its environment and must serve the conformance handlers
(tests/conformance/PROTOCOL.md): ``conf_echo``, ``conf_sleep``, ``conf_fail``, ``conf_big`` and
the plan ``conf_plan``.

Prints PASS/FAIL per scenario and exits 1 if any scenario failed (2 on a setup error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from tests.support.audit import list_executions, record_of
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.subjects import HDR_REASON, TenantNames
from tickmesh.sdk import Client, GraphBuilder, Retry
from tickmesh.v1 import execution_pb2, executor_pool_service_pb2, graph_pb2, result_pb2

CONNECT = "/tickmesh.v1.ExecutorPoolService/Connect"
TENANT = "conformance"
CONCURRENCY = 2
ACK_WAIT_S = 2.0
HEARTBEAT_INTERVAL_S = 0.5
INLINE_LIMIT = 256 * 1024
CONNECT_TIMEOUT_S = 20.0
HANDLERS = {
    ("conf_echo", graph_pb2.NODE_KIND_TASK),
    ("conf_sleep", graph_pb2.NODE_KIND_TASK),
    ("conf_fail", graph_pb2.NODE_KIND_TASK),
    ("conf_big", graph_pb2.NODE_KIND_TASK),
    ("conf_plan", graph_pb2.NODE_KIND_PLAN),
}

Request = executor_pool_service_pb2.ConnectRequest
Response = executor_pool_service_pb2.ConnectResponse


class ScenarioFailedError(AssertionError):
    """A scenario's expectation did not hold."""


def say(*parts: object, file: IO[str] | None = None, flush: bool = True) -> None:
    """Write a line of the report (stdout unless ``file``)."""
    stream = file or sys.stdout
    stream.write(" ".join(str(p) for p in parts) + "\n")
    if flush:
        stream.flush()


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailedError(message)


# --- the recording proxy ---------------------------------------------------------------------


@dataclass
class Frame:
    at: float
    session: int
    direction: str
    """"up": executor -> pool; "down": pool -> executor; "inject": checker -> executor."""
    message: Any
    """A ConnectRequest (up) or ConnectResponse (down, inject)."""

    @property
    def kind(self) -> str:
        return self.message.WhichOneof("message") or ""


@dataclass
class ProxySession:
    number: int
    queue: asyncio.Queue[bytes | BaseException | None]
    opened_at: float
    half_closed_at: float | None = None
    ended_at: float | None = None


class RecordingProxy:
    """A transparent gRPC proxy for ``ExecutorPoolService.Connect`` that logs every frame."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.frames: list[Frame] = []
        self.sessions: list[ProxySession] = []
        self.changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self.target = ""

    async def start(self) -> None:
        opts = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        self._channel = grpc.aio.insecure_channel(self.upstream, options=opts)
        self._server = grpc.aio.server(options=opts)
        handler = grpc.method_handlers_generic_handler(
            "tickmesh.v1.ExecutorPoolService",
            {"Connect": grpc.stream_stream_rpc_method_handler(self._connect)},
        )
        self._server.add_generic_rpc_handlers((handler,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.target = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0.5)
        if self._channel is not None:
            await self._channel.close()

    async def _note(self, frame: Frame) -> None:
        self.frames.append(frame)
        async with self.changed:
            self.changed.notify_all()

    async def _connect(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        assert self._channel is not None
        session = ProxySession(len(self.sessions) + 1, asyncio.Queue(), time.monotonic())
        self.sessions.append(session)
        metadata = tuple(
            (k, v) for k, v in context.invocation_metadata() or () if k.startswith("x-tickmesh")
        )
        call: Any = self._channel.stream_stream(CONNECT)(metadata=metadata)

        async def pump_up() -> None:
            try:
                async for data in requests:
                    await self._note(
                        Frame(time.monotonic(), session.number, "up", Request.FromString(data))
                    )
                    await call.write(data)
                session.half_closed_at = time.monotonic()
                await self._note_change()
                await call.done_writing()
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                pass

        async def pump_down() -> None:
            try:
                async for data in call:
                    await self._note(
                        Frame(time.monotonic(), session.number, "down", Response.FromString(data))
                    )
                    await session.queue.put(data)
                await session.queue.put(None)
            except grpc.aio.AioRpcError as exc:
                await session.queue.put(exc)

        up = asyncio.create_task(pump_up())
        down = asyncio.create_task(pump_down())
        try:
            while True:
                item = await session.queue.get()
                if item is None:
                    return
                if isinstance(item, grpc.aio.AioRpcError):
                    await context.abort(item.code(), item.details() or "")
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            session.ended_at = time.monotonic()
            call.cancel()
            for task in (up, down):
                task.cancel()
            await self._note_change()

    async def _note_change(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def inject(self, session: ProxySession, response: Response) -> None:
        """Send ``response`` to the executor as if the pool had sent it."""
        await self._note(Frame(time.monotonic(), session.number, "inject", response))
        await session.queue.put(response.SerializeToString())

    async def wait_for(self, predicate: Callable[[], Any], within: float, what: str) -> Any:
        """Wait until ``predicate()`` is truthy; return its value."""
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        async with self.changed:
            while not (value := predicate()):
                remaining = until - loop.time()
                if remaining <= 0:
                    raise ScenarioFailedError(f"timed out after {within:.1f}s waiting for {what}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 0.25)):
                        await self.changed.wait()
            return value

    # --- queries ---

    def of(self, kind: str, direction: str | None = None, since: float = 0.0) -> list[Frame]:
        return [
            f
            for f in self.frames
            if f.kind == kind and f.at >= since and (direction is None or f.direction == direction)
        ]

    def assignments(self, since: float = 0.0) -> list[tuple[Frame, Any]]:
        return [
            (f, a) for f in self.of("assignments", since=since) for a in f.message.assignments.items
        ]

    def completions(self, since: float = 0.0) -> list[tuple[Frame, Any]]:
        return [
            (f, c) for f in self.of("completions", since=since) for c in f.message.completions.items
        ]

    def welcomed_sessions(self) -> list[ProxySession]:
        numbers = {f.session for f in self.of("welcome")}
        return [s for s in self.sessions if s.number in numbers and s.ended_at is None]

    def assignments_of(
        self, lifetime_id: str, handler: str, since: float = 0.0
    ) -> list[tuple[Frame, Any]]:
        return [
            (f, a)
            for f, a in self.assignments(since)
            if a.envelope.header.lifetime_id == lifetime_id
            and a.envelope.header.node.handler == handler
        ]

    def completion_of(self, assignment_id: str) -> Any:
        for _, c in self.completions():
            if c.assignment_id == assignment_id:
                return c
        return None


# --- the executor under test -----------------------------------------------------------------


class Executor:
    """The executor process: started, killed and restarted by scenarios."""

    def __init__(self, command: Sequence[str], env: dict[str, str], log: IO[bytes]) -> None:
        self.command = list(command)
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        self.log.write(f"\n--- start #{self.starts}: {shlex.join(self.command)}\n".encode())
        self.log.flush()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, env=self.env, stdout=self.log, stderr=self.log
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def terminate(self, within: float = 10.0) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(within):
                return await self.proc.wait()
        except TimeoutError:
            await self.kill()
            return None


# --- the harness -----------------------------------------------------------------------------


@dataclass
class Harness:
    mesh: Mesh
    proxy: RecordingProxy
    client: Client
    executor: Executor
    graphs: dict[str, graph_pb2.AgentGraph] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> TenantNames:
        return TenantNames(TENANT)

    async def connected(self, within: float = CONNECT_TIMEOUT_S) -> ProxySession:
        def ready() -> ProxySession | None:
            sessions = self.proxy.welcomed_sessions()
            return sessions[-1] if sessions else None

        session: ProxySession = await self.proxy.wait_for(ready, within, "the executor to connect")
        return session

    async def start(self, graph: str, input: Any) -> str:
        handle = await self.client.start_lifetime(
            self.graphs[graph].id, input, version=self.graphs[graph].version
        )
        return handle.id

    async def result(self, lifetime_id: str, within: float = 20.0) -> Any:
        return await self.client.handle(lifetime_id).result(within=within)

    async def records(self, lifetime_id: str) -> list[execution_pb2.ExecutionRef]:
        return await list_executions(self.mesh.state_target, TENANT, lifetime_id)

    async def records_of(
        self, lifetime_id: str, node: str, *, count: int, within: float = 10.0
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        while True:
            found = [
                record_of(r)
                for r in await self.records(lifetime_id)
                if record_of(r).header.node.id == node
            ]
            if len(found) >= count or loop.time() > until:
                return found
            await asyncio.sleep(0.1)


def _graph(
    name: str, handler: str, *, timeout: float = 30.0, attempts: int = 3
) -> graph_pb2.AgentGraph:
    return (
        GraphBuilder(name, description=f"conformance: {handler}")
        .plan("plan", "conf_plan")
        .task(
            "work",
            handler,
            timeout=timeout,
            retry=Retry(max_attempts=attempts, initial_backoff=0.05, max_backoff=0.2),
        )
        .edge("plan", "work")
        .edge("work", "plan")
        .final("plan")
        .build()
    )


def big_bytes(n: int) -> bytes:
    return bytes(i % 256 for i in range(n))


# --- scenarios -------------------------------------------------------------------------------


async def scenario_handshake(h: Harness) -> str:
    await h.connected()
    hellos = h.proxy.of("hello")
    expect(bool(hellos), "the executor never sent hello")
    first_up = next(f for f in h.proxy.frames if f.direction == "up")
    expect(first_up.kind == "hello", f"the first frame was {first_up.kind}, not hello")
    hello = hellos[-1].message.hello
    expect(hello.protocol_version == 1, f"protocol_version is {hello.protocol_version}, not 1")
    announced = {(s.name, s.kind) for s in hello.handlers}
    expect(announced >= HANDLERS, f"missing handlers: {sorted(HANDLERS - announced)}")
    expect(all(s.code_digest for s in hello.handlers), "a handler has no code_digest")
    expect(hello.concurrency == CONCURRENCY, f"concurrency {hello.concurrency}, not {CONCURRENCY}")
    expect(bool(hello.runtime), "hello.runtime is empty")
    expect(bool(hello.sdk_version), "hello.sdk_version is empty")
    return f"runtime={hello.runtime!r} sdk={hello.sdk_version!r} id={hello.executor_id!r}"


async def scenario_assignment(h: Harness) -> str:
    goal = {"hello": "wörld", "n": [1, 2, 3], "nested": {"ok": True}}
    lifetime = await h.start("conf_echo", goal)
    output = await h.result(lifetime)
    expect(output == goal, f"lifetime output {output!r} != input {goal!r}")
    echoes = h.proxy.assignments_of(lifetime, "conf_echo")
    expect(len(echoes) == 1, f"conf_echo was assigned {len(echoes)} times")
    c = h.proxy.completion_of(echoes[0][1].assignment_id)
    expect(c is not None and c.HasField("task_result"), "no task completion for conf_echo")
    r = c.task_result
    expect(r.status == result_pb2.TASK_STATUS_SUCCEEDED, f"status {r.status}")
    expect(r.output.content_type == "application/json", f"content type {r.output.content_type!r}")
    data = r.output.inline
    expect(r.output.size == len(data), "output.size does not match the data")
    expect(r.output.sha256 == hashlib.sha256(data).hexdigest(), "output.sha256 does not match")
    expect(c.HasField("started_at") and c.HasField("finished_at"), "no started_at/finished_at")
    expect(bool(c.code_digest), "completion has no code_digest")
    plans = h.proxy.assignments_of(lifetime, "conf_plan")
    expect(len(plans) == 2, f"conf_plan was assigned {len(plans)} times, not 2")
    return "echo round trip and plan dispatch/complete"


async def scenario_structured_error(h: Harness) -> str:
    lifetime = await h.start("conf_fail", {"why": "testing"})
    output = await h.result(lifetime)
    expect(
        isinstance(output, dict) and output.get("error_type") == "ConformanceError",
        f"the plan saw {output!r}",
    )
    [record] = await h.records_of(lifetime, "work", count=1)
    err = record.result.error
    expect(record.result.status == result_pb2.TASK_STATUS_FAILED, f"status {record.result.status}")
    expect(err.type == "ConformanceError", f"error.type {err.type!r}")
    expect(not err.retryable, "error.retryable is true")
    expect(err.message == "conformance failure", f"error.message {err.message!r}")
    return "TaskError -> ErrorInfo{type, message, retryable=false}"


async def scenario_concurrency_limit(h: Harness) -> str:
    since = time.monotonic()
    n = CONCURRENCY * 3
    lifetimes = [await h.start("conf_sleep", {"ms": 600}) for _ in range(n)]
    outputs = await asyncio.gather(*(h.result(lt, within=30) for lt in lifetimes))
    expect(all(o.get("slept") == 600 for o in outputs), f"outputs {outputs!r}")
    # Replay the frame log: in-flight = assigned and not yet completed nor rejected.
    in_flight: set[str] = set()
    peak = 0
    for f in h.proxy.frames:
        if f.at < since:
            continue
        if f.direction == "down" and f.kind == "assignments":
            for a in f.message.assignments.items:
                if a.envelope.header.node.handler == "conf_sleep":
                    in_flight.add(a.assignment_id)
        elif f.direction == "up" and f.kind == "completions":
            for c in f.message.completions.items:
                in_flight.discard(c.assignment_id)
        elif f.direction == "up" and f.kind == "rejections":
            for r in f.message.rejections.items:
                in_flight.discard(r.assignment_id)
        peak = max(peak, len(in_flight))
    expect(
        peak <= CONCURRENCY, f"{peak} sleeps in flight at once, over the concurrency {CONCURRENCY}"
    )
    expect(peak == CONCURRENCY, f"never ran {CONCURRENCY} at once (peak {peak})")
    busy = [r for f in h.proxy.of("rejections", "up", since) for r in f.message.rejections.items]
    frames = len(h.proxy.of("completions", "up", since))
    items = len(h.proxy.completions(since))
    return (
        f"peak {peak} of {CONCURRENCY}; {items} completions in {frames} frames; "
        f"{len(busy)} rejections"
    )


async def scenario_batching(h: Harness) -> str:
    """Results finishing together travel in one Completions frame."""
    since = time.monotonic()
    lifetimes = [await h.start("conf_echo", {"i": i}) for i in range(20)]
    await asyncio.gather(*(h.result(lt) for lt in lifetimes))
    frames = h.proxy.of("completions", "up", since)
    items = sum(len(f.message.completions.items) for f in frames)
    expect(items >= 40, f"only {items} completions seen")
    expect(
        all(f.message.completions.items for f in frames),
        "an empty Completions frame was sent",
    )
    # Echoes handed over in the same Assignments frame finish in the same tick: they must share
    # a Completions frame (DESIGN §8).
    frame_of = {c.assignment_id: id(f) for f, c in h.proxy.completions(since)}
    together = split = 0
    for f in h.proxy.of("assignments", "down", since):
        ids = [
            a.assignment_id
            for a in f.message.assignments.items
            if a.envelope.header.node.handler == "conf_echo"
        ]
        if len(ids) >= 2:
            if len({frame_of.get(i) for i in ids}) == 1:
                together += 1
            else:
                split += 1
    expect(
        split == 0 or together > 0,
        f"echoes assigned together were never completed together ({split} batches split)",
    )
    biggest = max(len(f.message.completions.items) for f in frames)
    return (
        f"{items} completions in {len(frames)} frames (largest {biggest}); "
        f"co-assigned echoes completed together {together}x, split {split}x"
    )


async def scenario_heartbeat_extension(h: Harness) -> str:
    ms = int(ACK_WAIT_S * 2.5 * 1000)
    lifetime = await h.start("conf_sleep", {"ms": ms})
    output = await h.result(lifetime, within=30)
    expect(output.get("slept") == ms and output.get("attempt") == 1, f"output {output!r}")
    sleeps = h.proxy.assignments_of(lifetime, "conf_sleep")
    expect(len(sleeps) == 1, f"assigned {len(sleeps)} times: the ack wait expired (no heartbeats?)")
    assignment_id = sleeps[0][1].assignment_id
    beats = [
        f
        for f in h.proxy.of("heartbeat", "up")
        if assignment_id in f.message.heartbeat.assignment_ids
    ]
    expect(len(beats) >= 2, f"only {len(beats)} heartbeats named the running assignment")
    stamps = [f.at for f in beats]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    expect(max(gaps, default=0) < ACK_WAIT_S, f"heartbeat gap {max(gaps):.2f}s >= ack wait")
    [record] = await h.records_of(lifetime, "work", count=1)
    expect(record.header.attempt == 1, f"recorded attempt {record.header.attempt}")
    return f"{ms} ms task with ack wait {ACK_WAIT_S}s: {len(beats)} heartbeats, ran once"


async def scenario_cancel(h: Harness) -> str:
    since = time.monotonic()
    lifetime = await h.start("conf_sleep", {"ms": 30_000})
    [(_, assignment)] = await h.proxy.wait_for(
        lambda: h.proxy.assignments_of(lifetime, "conf_sleep", since), 10, "the sleep's assignment"
    )
    await asyncio.sleep(0.2)
    aborted_at = time.monotonic()
    await h.client.abort(lifetime, "conformance cancel")
    c = await h.proxy.wait_for(
        lambda: h.proxy.completion_of(assignment.assignment_id), 5, "the cancelled completion"
    )
    took = (
        max(f.at for f, x in h.proxy.completions() if x.assignment_id == c.assignment_id)
        - aborted_at
    )
    cancels = [
        f
        for f in h.proxy.of("cancellations", "down", since)
        if any(x.assignment_id == assignment.assignment_id for x in f.message.cancellations.items)
    ]
    expect(bool(cancels), "the pool never sent a cancellation (mesh problem?)")
    expect(
        c.task_result.status == result_pb2.TASK_STATUS_CANCELLED,
        f"status {c.task_result.status}, not CANCELLED",
    )
    expect(took <= 1.0, f"the CANCELLED completion came {took:.2f}s after the abort (> 1s)")
    [record] = await h.records_of(lifetime, "work", count=1)
    expect(
        record.result.status == result_pb2.TASK_STATUS_CANCELLED,
        f"recorded status {record.result.status}",
    )
    return f"CANCELLED {took * 1000:.0f} ms after the abort"


async def scenario_drain(h: Harness) -> str:
    session = await h.connected()
    since = time.monotonic()
    lifetime = await h.start("conf_sleep", {"ms": 1000})
    [(_, assignment)] = await h.proxy.wait_for(
        lambda: h.proxy.assignments_of(lifetime, "conf_sleep", since), 10, "the sleep's assignment"
    )
    drain = Response(drain=executor_pool_service_pb2.Drain(reason="conformance drain"))
    drain.drain.grace.FromMilliseconds(5000)
    drained_at = time.monotonic()
    await h.proxy.inject(session, drain)
    await h.proxy.wait_for(
        lambda: session.half_closed_at or session.ended_at, 8, "the executor to close its side"
    )
    closed_at = session.half_closed_at or session.ended_at or 0.0
    c = h.proxy.completion_of(assignment.assignment_id)
    expect(c is not None, "the running task was not reported before the executor closed")
    expect(
        c.task_result.status == result_pb2.TASK_STATUS_SUCCEEDED,
        f"the drained task ended {c.task_result.status}, not SUCCEEDED",
    )
    expect(
        session.half_closed_at is not None,
        "the executor dropped the stream instead of half-closing",
    )
    took_new = [
        a
        for f, a in h.proxy.assignments(drained_at)
        if f.session == session.number
        and (cc := h.proxy.completion_of(a.assignment_id)) is not None
        and cc.HasField("task_result")
        and cc.task_result.status == result_pb2.TASK_STATUS_SUCCEEDED
        and cc.started_at.ToDatetime().timestamp() > 0
        and a.assignment_id != assignment.assignment_id
    ]
    expect(not took_new, f"the executor ran {len(took_new)} new assignment(s) while draining")
    output = await h.result(lifetime)
    expect(output.get("slept") == 1000, f"output {output!r}")
    # The executor reconnects (it was the pool's drain, not a shutdown) or exits cleanly.
    note = "and exited"
    if h.executor.alive():
        await h.proxy.wait_for(
            lambda: any(s.number > session.number for s in h.proxy.welcomed_sessions()),
            10,
            "the executor to reconnect after the drain",
        )
        note = "and reconnected"
    else:
        await h.executor.start()
        await h.connected()
    return f"finished in-flight work, closed {closed_at - drained_at:.2f}s after Drain, {note}"


async def scenario_malformed_work_item(h: Harness) -> str:
    before = len(h.proxy.assignments())
    nc = await tm_nats.connect(h.mesh.nats_url, name="conformance")
    try:
        js = tm_nats.jetstream(nc)
        await js.publish(
            h.names.work("task", "conf_echo"),
            b"\xff\x00 this is not an ExecutionEnvelope",
            headers={"Tickmesh-Type": "task_request", "Nats-Msg-Id": f"garbage-{time.time_ns()}"},
        )
        sub = await js.pull_subscribe(h.names.dlq("work"), stream=h.names.dlq_stream)
        garbage: list[Any] = []
        loop = asyncio.get_running_loop()
        until = loop.time() + 10
        while not garbage and loop.time() < until:
            with contextlib.suppress(TimeoutError):
                letters = await sub.fetch(10, timeout=0.5)
                garbage.extend(m for m in letters if m.data.startswith(b"\xff\x00"))
        expect(bool(garbage), "the malformed item never reached the dead-letter subject")
        reason = (garbage[0].headers or {}).get(HDR_REASON, "")
    finally:
        await nc.close()
    expect(h.executor.alive(), "the executor died")
    lifetime = await h.start("conf_echo", {"after": "garbage"})
    expect(await h.result(lifetime) == {"after": "garbage"}, "echo failed after the malformed item")
    leaked = [a for _, a in h.proxy.assignments()[before:] if not a.envelope.header.lifetime_id]
    expect(not leaked, "the malformed item was handed to the executor")
    return f"dead-lettered ({reason[:60]!r}); executor unaffected"


async def scenario_oversized_result(h: Harness) -> str:
    n = INLINE_LIMIT + 4096
    lifetime = await h.start("conf_big", {"bytes": n})
    await h.client.handle(lifetime).result(within=30)
    expected = hashlib.sha256(big_bytes(n)).hexdigest()
    [record] = await h.records_of(lifetime, "work", count=1)
    out = record.result.output
    expect(
        record.result.status == result_pb2.TASK_STATUS_SUCCEEDED, f"status {record.result.status}"
    )
    expect(out.WhichOneof("data") == "blob", f"the output was stored {out.WhichOneof('data')}")
    expect(out.size == n and out.blob.size == n, f"size {out.size}/{out.blob.size}, not {n}")
    expect(out.sha256 == expected, "the stored blob's sha256 is not the expected bytes'")
    plans = await h.records_of(lifetime, "plan", count=2)
    completed = [p for p in plans if p.result.WhichOneof("decision") == "complete"]
    expect(bool(completed), "the plan never completed")
    final = completed[-1].result.complete.output
    expect(final.sha256 == expected, "the plan did not read the blob back byte for byte")
    return f"{n} bytes stored as {out.blob.uri.split('/')[-1][:12]}…; plan read it back"


async def scenario_crash_mid_task(h: Harness) -> str:
    since = time.monotonic()
    lifetime = await h.start("conf_sleep", {"ms": 1500})
    await h.proxy.wait_for(
        lambda: h.proxy.assignments_of(lifetime, "conf_sleep", since), 10, "the sleep's assignment"
    )
    await asyncio.sleep(0.3)
    await h.executor.kill()
    await h.executor.start()
    output = await h.result(lifetime, within=30)
    expect(output.get("slept") == 1500, f"output {output!r}")
    expect(output.get("attempt") == 2, f"finished at attempt {output.get('attempt')}, not 2")
    records = await h.records_of(lifetime, "work", count=1)
    await asyncio.sleep(0.5)
    records = await h.records_of(lifetime, "work", count=1)
    expect(len(records) == 1, f"{len(records)} records of the task")
    expect(records[0].header.attempt == 2, f"recorded attempt {records[0].header.attempt}")
    return "SIGKILLed mid-task; the restarted executor completed it once (attempt 2)"


SCENARIOS: list[tuple[str, Callable[[Harness], Awaitable[str]]]] = [
    ("handshake", scenario_handshake),
    ("assignment", scenario_assignment),
    ("structured_error", scenario_structured_error),
    ("concurrency_limit", scenario_concurrency_limit),
    ("batching", scenario_batching),
    ("heartbeat_extension", scenario_heartbeat_extension),
    ("cancel", scenario_cancel),
    ("drain", scenario_drain),
    ("malformed_work_item", scenario_malformed_work_item),
    ("oversized_result", scenario_oversized_result),
    ("crash_mid_task", scenario_crash_mid_task),
]


@dataclass
class Outcome:
    name: str
    passed: bool
    seconds: float
    detail: str


async def run(command: Sequence[str], only: Sequence[str], log_path: Path | None) -> list[Outcome]:
    # The pool reads its heartbeat interval from the environment (ExecutorPoolSettings).
    os.environ["TICKMESH_EXECUTOR_POOL_HEARTBEAT_INTERVAL_S"] = str(HEARTBEAT_INTERVAL_S)
    os.environ["TICKMESH_EXECUTOR_POOL_INLINE_LIMIT"] = str(INLINE_LIMIT)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="tickmesh-conformance-") as tmp:
        data_dir = Path(tmp)
        log_file = log_path or data_dir / "executor.log"
        async with contextlib.AsyncExitStack() as stack:
            mesh = Mesh(
                MeshConfig(tenants=(TENANT,), data_dir=data_dir / "mesh", ack_wait_s=ACK_WAIT_S)
            )
            await mesh.start()
            stack.push_async_callback(mesh.stop)
            proxy = RecordingProxy(mesh.pool_target)
            await proxy.start()
            stack.push_async_callback(proxy.stop)
            client = await Client.connect(mesh.router_target, tenant=TENANT)
            stack.push_async_callback(client.close)
            log = stack.enter_context(log_file.open("ab"))
            env = dict(os.environ)
            env.update(
                TICKMESH_POOL=proxy.target,
                TICKMESH_TENANT=TENANT,
                TICKMESH_CONCURRENCY=str(CONCURRENCY),
            )
            executor = Executor(command, env, log)
            h = Harness(mesh, proxy, client, executor)
            for name, handler, kwargs in [
                ("conf_echo", "conf_echo", {}),
                ("conf_sleep", "conf_sleep", {"attempts": 3}),
                ("conf_fail", "conf_fail", {"attempts": 1}),
                ("conf_big", "conf_big", {}),
            ]:
                h.graphs[name] = await client.register_graph(_graph(name, handler, **kwargs))
            await executor.start()

            async def stop_executor() -> None:
                await executor.terminate()

            stack.push_async_callback(stop_executor)
            for name, scenario in SCENARIOS:
                if only and name not in only:
                    continue
                started = time.monotonic()
                try:
                    if not executor.alive():
                        await executor.start()
                    await h.connected()
                    async with asyncio.timeout(60):
                        detail = await scenario(h)
                    outcome = Outcome(name, True, time.monotonic() - started, detail)
                except ScenarioFailedError as exc:
                    outcome = Outcome(name, False, time.monotonic() - started, str(exc))
                except Exception as exc:
                    outcome = Outcome(
                        name,
                        False,
                        time.monotonic() - started,
                        f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}",
                    )
                outcomes.append(outcome)
                mark = "PASS" if outcome.passed else "FAIL"
                say(f"{mark} {name:<22} {outcome.seconds:6.2f}s  {outcome.detail}", flush=True)
            if not all(o.passed for o in outcomes) and log_path is None:
                tail = log_file.read_bytes()[-4000:].decode(errors="replace")
                say(f"--- executor output (tail) ---\n{tail}", flush=True)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        split = args.index("--")
        options, command = args[:split], args[split + 1 :]
    else:
        options, command = [], args
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.check")
    parser.add_argument("--only", action="append", default=[], help="run only this scenario")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    parser.add_argument("--log", type=Path, help="append the executor's output to this file")
    opts = parser.parse_args(options)
    if not command:
        parser.error("give the command that starts the executor after --")
    unknown = set(opts.only) - {n for n, _ in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {[n for n, _ in SCENARIOS]}")
    try:
        outcomes = asyncio.run(run(command, opts.only, opts.log))
    except Exception as exc:
        say(f"ERROR setting up the conformance run: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 2
    failed = [o.name for o in outcomes if not o.passed]
    say(
        f"{len(outcomes) - len(failed)}/{len(outcomes)} scenarios passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    if opts.json:
        say(json.dumps([o.__dict__ for o in outcomes]))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
