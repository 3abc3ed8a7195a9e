"""Prometheus metrics of the services, and the HTTP endpoint that serves them.

**Registries.** Every :class:`Metrics` object holds its own ``CollectorRegistry`` (never
prometheus_client's global one) with every tickmesh metric family registered once. A
service started on its own (``tickmesh serve``, ``python -m tickmesh.<service>``) makes one
when ``metrics_listen`` is set and serves it on that address. The embedded mesh, which runs
the four services in one process, makes a single :class:`Metrics` and hands it to all four
(``MeshConfig.metrics_listen``), so one endpoint shows the whole mesh and no family is
registered twice. No ``service`` label is needed to tell the services apart: each family
is fed by one service, or (consumers, dead letters) carries a label that names the source.
``tickmesh_service_info{service, version}`` says which services feed an endpoint.

**Labels.** Only low-cardinality values: tenant, graph id, node kind, handler, status,
guardrail phase and action, consumer (the durable consumer's name), dead-letter kind.
Never a lifetime, execution or envelope id. Labeled children are cached per label tuple,
so a step costs dict lookups and counter increments, never string formatting.

**Metrics** (each fed by exactly one place, so nothing is counted twice):

* ``tickmesh_steps_total{tenant, graph, kind, handler, status}`` and
  ``tickmesh_input_tokens_total`` / ``tickmesh_output_tokens_total`` /
  ``tickmesh_cost_micros_total{tenant, graph}``: the state service, when it newly stores an
  execution record (duplicates are not counted). The pool records only the attempt that
  ends a step, so this counts finished steps. Cost is in millionths of the telemetry's
  currency (exact integers; USD unless the handlers report another currency).
* ``tickmesh_step_overhead_seconds{tenant, graph}``: the router, once per execution ref
  that changed its lifetime: from the record's ``finished_at`` (stamped when the handler
  returned) until the router has durably applied it and published what follows (the next
  requests, or nothing when the lifetime ends). It covers the pool's record publish, the
  state service's insert and ref, and the router's decision, compare-and-set and publish;
  the handler's own run time is not in it. ``finished_at`` is the executor's clock, so
  hosts must keep their clocks in step (a negative gap counts as 0).
* ``tickmesh_guardrail_decisions_total{tenant, graph, phase, action}``: the router's
  in-process guard, once per evaluation (a compare-and-set conflict evaluates again).
* ``tickmesh_consumer_pending_messages`` / ``tickmesh_consumer_ack_pending_messages``
  ``{tenant, consumer}``: JetStream's ``consumer_info`` for every durable consumer a service
  reads, polled every ``consumer_poll_s`` (5 s) while the endpoint is up, never per message.
* ``tickmesh_redeliveries_total{tenant, consumer}``: messages delivered with
  ``num_delivered > 1`` (in the pool this includes retries, which JetStream redelivers).
* ``tickmesh_dead_letters_total{tenant, kind}``: ``ref`` (router), ``exec`` (state),
  ``work`` (executor pool).
* ``tickmesh_executors_connected{tenant}``: executor sessions the pool holds.
* The process (``process_*``), platform and GC collectors of prometheus_client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from wsgiref.simple_server import WSGIServer

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from tickmesh.sdk import ConfigError
from tickmesh.v1 import envelope_pb2, guardrail_pb2, result_pb2

from .delivery import delivery_of
from .settings import split_listen

logger = logging.getLogger(__name__)

CONSUMER_POLL_S = 5.0
"""How often consumer queue depths are read from JetStream."""
OVERHEAD_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)

ConsumerSource = Callable[[], Iterable[tuple[str, str, str]]]
JetStreamOf = Callable[[str], JetStreamContext | None]
"""A tenant's JetStream context (None: the tenant has no link yet)."""
"""Lists the durable consumers to watch, as (tenant, stream, durable name)."""

_TASK_STATUS: dict[int, str] = {
    result_pb2.TASK_STATUS_UNSPECIFIED: "unspecified",
    result_pb2.TASK_STATUS_SUCCEEDED: "succeeded",
    result_pb2.TASK_STATUS_FAILED: "failed",
    result_pb2.TASK_STATUS_TIMED_OUT: "timed_out",
    result_pb2.TASK_STATUS_CANCELLED: "cancelled",
}
_PLAN_CANCELLED_ERROR = "CancelledError"
_PHASES: dict[int, str] = {
    value: name.removeprefix("GUARDRAIL_PHASE_").lower()
    for name, value in guardrail_pb2.GuardrailPhase.items()
}
_ACTIONS: dict[int, str] = {
    value: name.removeprefix("GUARDRAIL_ACTION_").lower()
    for name, value in guardrail_pb2.GuardrailAction.items()
}


def step_status(envelope: envelope_pb2.ExecutionEnvelope) -> tuple[str, str]:
    """(node kind, status) of an execution record, as the steps counter labels them.

    Tasks carry their TaskStatus (``succeeded``, ``failed``, ``timed_out``, ``cancelled``);
    plans are ``succeeded`` when they decided, ``cancelled`` or ``failed`` otherwise.
    """
    if envelope.HasField("task_execution"):
        return "task", _TASK_STATUS.get(envelope.task_execution.result.status, "unspecified")
    result = envelope.plan_execution.result
    if result.WhichOneof("decision") is not None:
        return "plan", "succeeded"
    if result.error.type == _PLAN_CANCELLED_ERROR:
        return "plan", "cancelled"
    return "plan", "failed"


def num_delivered(reply: str | None) -> int:
    """How often JetStream delivered the message whose ack subject is ``reply`` (0 when it
    is not one). Runs on every message of a batch when metrics are on."""
    delivery = delivery_of(reply)
    return 0 if delivery is None else delivery.delivered


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port).

    Raises:
        ConfigError: ``listen`` is not of that form.
    """
    parsed = split_listen(listen)
    if parsed is None:
        raise ConfigError(f"metrics_listen={listen!r}: expected host:port (port 0: a free one)")
    return parsed


class _UsageChildren:
    """The token and cost counters of one (tenant, graph)."""

    __slots__ = ("cost", "input", "output")

    def __init__(self, metrics: Metrics, tenant: str, graph: str) -> None:
        self.input = metrics.input_tokens.labels(tenant, graph)
        self.output = metrics.output_tokens.labels(tenant, graph)
        self.cost = metrics.cost_micros.labels(tenant, graph)


class Metrics:
    """Every tickmesh metric family on one registry, and the endpoint serving it."""

    def __init__(self, *, consumer_poll_s: float = CONSUMER_POLL_S) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.consumer_poll_s = consumer_poll_s
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.service_info = Gauge(
            "tickmesh_service_info",
            "Services feeding this endpoint (always 1).",
            ["service", "version"],
            registry=registry,
        )
        self.steps = Counter(
            "tickmesh_steps",
            "Steps finished: execution records newly stored by the state service.",
            ["tenant", "graph", "kind", "handler", "status"],
            registry=registry,
        )
        self.input_tokens = Counter(
            "tickmesh_input_tokens",
            "Input tokens the stored steps reported.",
            ["tenant", "graph"],
            registry=registry,
        )
        self.output_tokens = Counter(
            "tickmesh_output_tokens",
            "Output tokens the stored steps reported.",
            ["tenant", "graph"],
            registry=registry,
        )
        self.cost_micros = Counter(
            "tickmesh_cost_micros",
            "Cost the stored steps reported, in millionths of the currency (USD by default).",
            ["tenant", "graph"],
            registry=registry,
        )
        self.step_overhead = Histogram(
            "tickmesh_step_overhead_seconds",
            "From a step's finish (its record's finished_at) until the router has applied "
            "it and published what follows.",
            ["tenant", "graph"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.guardrail_decisions = Counter(
            "tickmesh_guardrail_decisions",
            "Guardrail evaluations of the router's in-process guard, by outcome.",
            ["tenant", "graph", "phase", "action"],
            registry=registry,
        )
        self.consumer_pending = Gauge(
            "tickmesh_consumer_pending_messages",
            "Messages waiting in the stream for a durable consumer (JetStream num_pending).",
            ["tenant", "consumer"],
            registry=registry,
        )
        self.consumer_ack_pending = Gauge(
            "tickmesh_consumer_ack_pending_messages",
            "Messages delivered to a durable consumer and not yet acknowledged.",
            ["tenant", "consumer"],
            registry=registry,
        )
        self.redeliveries = Counter(
            "tickmesh_redeliveries",
            "Messages delivered more than once (num_delivered > 1).",
            ["tenant", "consumer"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "tickmesh_dead_letters",
            "Messages copied to the dead-letter stream, by kind (ref, exec, work).",
            ["tenant", "kind"],
            registry=registry,
        )
        self.executors_connected = Gauge(
            "tickmesh_executors_connected",
            "Executor sessions connected to the executor pool.",
            ["tenant"],
            registry=registry,
        )
        self._steps: dict[tuple[str, str, str, str, str], Counter] = {}
        self._usage: dict[tuple[str, str], _UsageChildren] = {}
        self._overhead: dict[tuple[str, str], Histogram] = {}
        self._decisions: dict[tuple[str, str, int, int], Counter] = {}
        self._redeliveries: dict[tuple[str, str], Counter] = {}
        self._sources: list[tuple[JetStreamOf, ConsumerSource]] = []
        self._watched: set[tuple[str, str]] = set()
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._poll_now = asyncio.Event()
        self.host = ""
        self.port = 0

    # --- the endpoint ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://host:port/metrics`` (after :meth:`start`)."""
        assert self._http is not None, "start() first"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self, listen: str) -> None:
        """Serve the registry on ``listen`` (``host:port``; port 0 picks a free one) and
        start polling the watched consumers.

        Raises:
            ConfigError: ``listen`` is malformed or cannot be bound.
        """
        if self._http is not None:
            return
        host, port = parse_listen(listen)
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {listen}: {exc}") from exc
        self._http = (server, thread)
        self.host, self.port = host, server.server_port
        self._poller = asyncio.create_task(self._poll_loop(), name="metrics:consumers")
        logger.info("metrics on %s", self.url)

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        http, self._http = self._http, None
        if http is not None:
            server, thread = http
            # shutdown() waits for serve_forever's next poll (up to 0.5 s): off the loop.
            await asyncio.to_thread(server.shutdown)
            server.server_close()
            await asyncio.to_thread(thread.join, 1.0)

    # --- what services report ----------------------------------------------------------------

    def service_started(self, service: str, version: str) -> None:
        self.service_info.labels(service, version).set(1)

    def record_stored(self, tenant: str, envelope: envelope_pb2.ExecutionEnvelope) -> None:
        """Count one newly stored execution record: its step and its usage."""
        header = envelope.header
        graph = header.graph.id
        kind, status = step_status(envelope)
        handler = header.node.handler
        key = (tenant, graph, kind, handler, status)
        steps = self._steps.get(key)
        if steps is None:
            steps = self._steps[key] = self.steps.labels(*key)
        steps.inc()
        record = envelope.task_execution if kind == "task" else envelope.plan_execution
        telemetry = record.result.telemetry
        if telemetry.input_tokens or telemetry.output_tokens or telemetry.cost_micros:
            usage = self._usage.get((tenant, graph))
            if usage is None:
                usage = self._usage[(tenant, graph)] = _UsageChildren(self, tenant, graph)
            if telemetry.input_tokens:
                usage.input.inc(telemetry.input_tokens)
            if telemetry.output_tokens:
                usage.output.inc(telemetry.output_tokens)
            if telemetry.cost_micros:
                usage.cost.inc(telemetry.cost_micros)

    def step_applied(self, tenant: str, graph: str, finished_at_ns: int) -> None:
        """A step's result was applied and what follows published, now."""
        histogram = self._overhead.get((tenant, graph))
        if histogram is None:
            histogram = self._overhead[(tenant, graph)] = self.step_overhead.labels(tenant, graph)
        histogram.observe(max(0.0, (time.time_ns() - finished_at_ns) / 1e9))

    def guardrail_decision(self, tenant: str, graph: str, phase: int, action: int) -> None:
        key = (tenant, graph, phase, action)
        counter = self._decisions.get(key)
        if counter is None:
            counter = self._decisions[key] = self.guardrail_decisions.labels(
                tenant, graph, _PHASES.get(phase, str(phase)), _ACTIONS.get(action, str(action))
            )
        counter.inc()

    def redelivered(self, tenant: str, consumer: str, count: int = 1) -> None:
        counter = self._redeliveries.get((tenant, consumer))
        if counter is None:
            counter = self._redeliveries[(tenant, consumer)] = self.redeliveries.labels(
                tenant, consumer
            )
        counter.inc(count)

    def count_redeliveries(self, tenant: str, consumer: str, batch: Sequence[Msg]) -> None:
        """Count the messages of ``batch`` that JetStream delivered before."""
        again = sum(1 for msg in batch if num_delivered(msg.reply) > 1)
        if again:
            self.redelivered(tenant, consumer, again)

    def dead_lettered(self, tenant: str, kind: str, count: int = 1) -> None:
        if count:
            self.dead_letters.labels(tenant, kind).inc(count)

    def executor_joined(self, tenant: str) -> None:
        self.executors_connected.labels(tenant).inc()

    def executor_left(self, tenant: str) -> None:
        self.executors_connected.labels(tenant).dec()

    # --- consumer queue depths -------------------------------------------------------------

    def watch_consumers(self, js: JetStreamContext | JetStreamOf, source: ConsumerSource) -> None:
        """Poll the consumers ``source`` lists (asked again on every poll) through ``js``:
        one context for every tenant, or a function giving each tenant's own."""
        if isinstance(js, JetStreamContext):
            shared = js
            self._sources.append((lambda _tenant: shared, source))
        else:
            self._sources.append((js, source))

    def consumers_changed(self) -> None:
        """A service added consumers: poll now rather than at the next round."""
        self._poll_now.set()

    async def poll_consumers(self) -> None:
        """Read every watched consumer's pending counts once; drop the ones that are gone.

        The reads run concurrently: a tenant whose link is down (each read waits for its
        timeout) must not hold back the others' gauges."""
        seen: set[tuple[str, str]] = set()

        async def poll(js: JetStreamContext, tenant: str, stream: str, durable: str) -> None:
            key = (tenant, durable)
            try:
                info = await js.consumer_info(stream, durable)
            except NotFoundError:
                return
            except Exception as exc:  # disconnected: keep the last values until next time
                logger.debug("consumer_info %s/%s: %s", stream, durable, exc)
                seen.add(key)
                return
            seen.add(key)
            self.consumer_pending.labels(tenant, durable).set(info.num_pending or 0)
            self.consumer_ack_pending.labels(tenant, durable).set(info.num_ack_pending or 0)

        polls = []
        for js_of, source in self._sources:
            for tenant, stream, durable in list(source()):
                js = js_of(tenant)
                if js is None:
                    seen.add((tenant, durable))
                    continue
                polls.append(poll(js, tenant, stream, durable))
        await asyncio.gather(*polls)
        for tenant, durable in self._watched - seen:
            with contextlib.suppress(KeyError):
                self.consumer_pending.remove(tenant, durable)
            with contextlib.suppress(KeyError):
                self.consumer_ack_pending.remove(tenant, durable)
        self._watched = seen

    async def _poll_loop(self) -> None:
        while True:
            self._poll_now.clear()
            try:
                await self.poll_consumers()
            except Exception:  # never let the metrics stop; the next round tries again
                logger.exception("polling consumer queue depths failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.consumer_poll_s):
                    await self._poll_now.wait()
