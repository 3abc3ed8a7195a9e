"""The chaos harness: a nats-server and the four services as real processes (RELIABILITY.md §4.1).

:class:`Cluster` starts its own nats-server (JetStream on a store directory of its
own, so it can be restarted on the same data) and any of the four services as
``tickmesh serve <service>`` subprocesses on fixed loopback ports, one fresh tenant,
SQLite (or a PostgreSQL DSN for the cloud profile). A test can then:

* ``await c.kill("state")`` (SIGKILL by default, any signal), ``await c.restart("state",
  env={...})`` (returns the seconds until it serves again), ``c.stop("router")`` /
  ``c.cont("router")`` (SIGSTOP / SIGCONT), ``await c.wait_exit("state")`` after a crash
  point fired;
* ``await c.restart_nats(kill=True)`` (same ports and store directory);
* drive load with ``await c.worker([...])`` and ``await c.client()`` (in this process);
* read consumers with ``await c.consumer_info(stream, durable)`` and wait for a backlog to
  drain with ``await c.wait_drained(stream, durable)``;
* read the peak RSS of the services (sampled every 0.25 s with psutil) with
  ``c.peak_rss_mib()``.

Use it through the ``start_cluster`` fixture (tests/chaos/conftest.py), which stops
everything at teardown and fails (never skips) when a binary is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from tests.support.nats_server import new_tenant
from tests.support.ports import free_port
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import Client, Plan, Task, Worker

ServiceName = Literal["router", "guardrail", "state", "executor-pool"]

SERVICES: tuple[ServiceName, ...] = ("guardrail", "state", "router", "executor-pool")
"""Every service, in start order (the state service first of those that call it)."""

PREFIX: dict[ServiceName, str] = {
    "router": "TICKMESH_ROUTER_",
    "guardrail": "TICKMESH_GUARDRAIL_",
    "state": "TICKMESH_STATE_",
    "executor-pool": "TICKMESH_EXECUTOR_POOL_",
}

SERVING_WITHIN_S = 30.0
"""How long a started service may take to report SERVING before the test fails."""
ACK_WAIT_S = 2.0
"""The services' consumer ack wait in the harness: what a crashed service left
unacked comes back after this, not after the production 30 s."""
RSS_SAMPLE_S = 0.25

Handler = Task[Any, Any] | Plan[Any]


def figure(line: str) -> None:
    """Print a test's measured figure (RELIABILITY.md §4.2: each test prints what it measures;
    shown with ``pytest -s`` or ``-rP``, and in the summary table through its row)."""
    print(f"\n{line}", flush=True)  # noqa: T201


TERMINAL_STATES = ("completed", "failed", "aborted")


async def wait_terminal(client: Client, ids: list[str], within: float) -> dict[str, str]:
    """The state of every lifetime, once each is terminal (or ``within`` has passed).

    Reads that fail (a service down in a fault) are retried on the next round."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    states: dict[str, str] = {}
    pending = list(ids)
    gate = asyncio.Semaphore(8)

    async def read(lifetime_id: str) -> None:
        async with gate:
            with contextlib.suppress(Exception):
                states[lifetime_id] = (await client.get_lifetime(lifetime_id)).state

    while pending:
        await asyncio.gather(*(read(lt) for lt in pending))
        pending = [lt for lt in pending if states.get(lt) not in TERMINAL_STATES]
        if not pending or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)
    return states


class HarnessError(AssertionError):
    """The harness could not do what the test asked (a service did not start, exit, ...)."""


@dataclass
class Service:
    """One service: its fixed port and environment, and its current process (if any)."""

    name: ServiceName
    port: int
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)
    """Exit status of every process of this service that ended (137: a crash point)."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class Cluster:
    """A nats-server and some of the four services as subprocesses, for one tenant."""

    work_dir: Path
    store_url: str | None = None
    """The state store: a PostgreSQL DSN, or None for SQLite in ``work_dir``."""
    tenant: str = field(default_factory=lambda: new_tenant("chaos"))
    env: dict[str, str] = field(default_factory=dict)
    """Added to every service's environment (unprefixed names, e.g. TICKMESH_CRASH_AT)."""
    ack_wait_s: float = ACK_WAIT_S
    log_level: str = "INFO"

    nats: EmbeddedNats = field(init=False)
    services: dict[ServiceName, Service] = field(default_factory=dict, init=False)
    nc: NatsClient | None = field(default=None, init=False)
    js: JetStreamContext = field(init=False)
    workers: list[Worker] = field(default_factory=list, init=False)
    clients: list[Client] = field(default_factory=list, init=False)
    _logs: list[IO[bytes]] = field(default_factory=list, init=False)
    _sampler: asyncio.Task[None] | None = field(default=None, init=False)
    _peak: dict[str, float] = field(default_factory=dict, init=False)
    _peak_total: float = field(default=0.0, init=False)

    # --- start and stop --------------------------------------------------------------------

    async def start(self, services: Sequence[ServiceName] = SERVICES) -> Cluster:
        """Start nats-server, then ``services`` (all at once, each waited for until
        SERVING); then connect the test's own NATS client."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "logs").mkdir(exist_ok=True)
        self.nats = EmbeddedNats(data_dir=self.work_dir / "nats")
        await asyncio.to_thread(self.nats.start)
        ports = {name: free_port() for name in SERVICES}
        for name in SERVICES:
            self.services[name] = Service(
                name, ports[name], self._env(name, ports), self.work_dir / "logs" / f"{name}.log"
            )
        # Concurrently: each provisions the tenant's streams idempotently.
        await asyncio.gather(*(self.start_service(n) for n in SERVICES if n in services))
        self.nc = await tm_nats.connect(self.nats.url, name="chaos-test")
        self.js = self.nc.jetstream()
        self._sampler = asyncio.create_task(self._sample_rss())
        return self

    def _env(self, name: ServiceName, ports: Mapping[ServiceName, int]) -> dict[str, str]:
        p = PREFIX[name]
        env = {
            f"{p}NATS_URL": self.nats.url,
            f"{p}TENANTS": json.dumps([self.tenant]),
            f"{p}GRPC_LISTEN": f"127.0.0.1:{ports[name]}",
            f"{p}LOG_LEVEL": self.log_level,
            f"{p}INSTANCE": f"chaos-{name}",
        }
        if name in ("state", "router", "executor-pool"):
            env[f"{p}ACK_WAIT_S"] = str(self.ack_wait_s)
        if name == "state":
            env[f"{p}STORE_URL"] = self.store_url or f"sqlite:///{self.work_dir / 'state.db'}"
            env[f"{p}SQLITE_SYNCHRONOUS"] = "FULL"
        if name in ("state", "executor-pool"):
            env[f"{p}BLOB_URL"] = str(self.work_dir / "blobs")
        if name in ("router", "guardrail"):
            env[f"{p}STATE_TARGET"] = f"127.0.0.1:{ports['state']}"
        return env

    async def close(self) -> None:
        """Stop workers, clients, services (SIGTERM, then SIGKILL) and nats-server."""
        for worker in reversed(self.workers):
            with contextlib.suppress(Exception):
                await worker.__aexit__(None, None, None)
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        for service in self.services.values():
            if service.process is not None and service.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    service.process.send_signal(signal.SIGCONT)
                    service.process.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(10):
                        await service.process.wait()
                except TimeoutError:
                    service.process.kill()
                    await service.process.wait()
        for log in self._logs:
            log.close()
        if hasattr(self, "nats"):
            await asyncio.to_thread(self.nats.cleanup)

    # --- one service -----------------------------------------------------------------------

    def target(self, name: ServiceName) -> str:
        """``127.0.0.1:<port>`` of a service (the same across restarts)."""
        return self.services[name].target

    @property
    def router_target(self) -> str:
        return self.target("router")

    @property
    def state_target(self) -> str:
        return self.target("state")

    @property
    def pool_target(self) -> str:
        return self.target("executor-pool")

    @property
    def guardrail_target(self) -> str:
        return self.target("guardrail")

    @property
    def names(self) -> TenantNames:
        """The tenant's stream, consumer and subject names."""
        return TenantNames(self.tenant)

    async def start_service(
        self,
        name: ServiceName,
        env: Mapping[str, str] | None = None,
        *,
        wait: bool = True,
    ) -> float:
        """Start ``name`` (not running) with ``env`` added for this process only.

        Args:
            wait: Wait until it reports SERVING (else return at once; a crash point
                may end it before it ever serves).

        Returns:
            Seconds from the start until SERVING (0 when not waited for).
        """
        service = self.services[name]
        if service.running:
            raise HarnessError(f"{name} is already running (pid {service.pid})")
        log = open(service.log_path, "ab")  # noqa: SIM115, ASYNC230 - closed in close()
        self._logs.append(log)
        service.starts += 1
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        log.write(f"\n===== start {service.starts} at {stamp} env={dict(env or {})}\n".encode())
        log.flush()
        tickmesh = Path(sys.executable).with_name("tickmesh")
        loop = asyncio.get_running_loop()
        began = loop.time()
        service.process = await asyncio.create_subprocess_exec(
            str(tickmesh),
            "serve",
            name,
            env={**os.environ, **self.env, **service.env, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        if not wait:
            return 0.0
        await self.wait_serving(name)
        return loop.time() - began

    async def wait_serving(self, name: ServiceName, within: float = SERVING_WITHIN_S) -> None:
        """Poll the gRPC health service of ``name`` until SERVING; fail if it exits first."""
        service = self.services[name]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # the health stubs are untyped
            while loop.time() < deadline:
                if service.process is None or service.process.returncode is not None:
                    raise HarnessError(
                        f"{name} exited ({self._returncode(service)}) before serving; "
                        f"log:\n{self.log_tail(name)}"
                    )
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.05)
        raise HarnessError(f"{name} not SERVING within {within}s; log:\n{self.log_tail(name)}")

    async def kill(self, name: ServiceName, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send ``sig`` (default SIGKILL) to ``name`` and wait for it to exit.

        Returns:
            The exit status (negative: the signal's number, as asyncio reports it).
        """
        service = self.services[name]
        if service.process is None or service.process.returncode is not None:
            raise HarnessError(f"{name} is not running")
        if sig != signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                service.process.send_signal(signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            service.process.send_signal(sig)
        return await self.wait_exit(name, within=20.0)

    async def wait_exit(self, name: ServiceName, within: float = 30.0) -> int:
        """Wait for ``name``'s process to end (e.g. at a crash point); return its status."""
        service = self.services[name]
        if service.process is None:
            raise HarnessError(f"{name} was never started")
        try:
            async with asyncio.timeout(within):
                code = await service.process.wait()
        except TimeoutError:
            raise HarnessError(
                f"{name} still running after {within}s; log:\n{self.log_tail(name)}"
            ) from None
        if len(service.exits) < service.starts:
            service.exits.append(code)
        return code

    async def restart(
        self,
        name: ServiceName,
        env: Mapping[str, str] | None = None,
        sig: signal.Signals | None = signal.SIGKILL,
    ) -> float:
        """Stop ``name`` with ``sig`` (if running), start it again with ``env`` added.

        Returns:
            Seconds from the new process's start until it serves.
        """
        if self.services[name].running and sig is not None:
            await self.kill(name, sig)
        elif self.services[name].process is not None:
            await self.wait_exit(name)
        return await self.start_service(name, env)

    def stop(self, name: ServiceName) -> None:
        """SIGSTOP ``name`` (a pause: it keeps its connections, answers nothing)."""
        self._signal(name, signal.SIGSTOP)

    def cont(self, name: ServiceName) -> None:
        """SIGCONT ``name`` after :meth:`stop`."""
        self._signal(name, signal.SIGCONT)

    def _signal(self, name: ServiceName, sig: signal.Signals) -> None:
        service = self.services[name]
        if service.process is None or service.process.returncode is not None:
            raise HarnessError(f"{name} is not running")
        service.process.send_signal(sig)

    async def restart_nats(self, *, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop nats-server (SIGKILL when ``kill``, else SIGTERM), stay down ``down_s``
        seconds, and start it again on the same ports and store directory."""
        ports = self.nats.client_port, self.nats.monitor_port
        await asyncio.to_thread(self.nats.stop, kill=kill)
        if down_s:
            await asyncio.sleep(down_s)
        self.nats.port, self.nats.http_port = ports
        await asyncio.to_thread(self.nats.start)

    def log_tail(self, name: ServiceName, chars: int = 3000) -> str:
        path = self.services[name].log_path
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    @staticmethod
    def _returncode(service: Service) -> str:
        if service.process is None:
            return "never started"
        return f"status {service.process.returncode}"

    # --- load ------------------------------------------------------------------------------

    async def worker(self, handlers: Sequence[Handler], **kwargs: Any) -> Worker:
        """An in-process Worker on the pool, connected (stopped at close)."""
        worker = Worker(self.pool_target, tenant=self.tenant, tasks=list(handlers), **kwargs)
        self.workers.append(worker)
        await worker.__aenter__()
        async with asyncio.timeout(10):
            await worker.wait_connected()
        return worker

    async def client(self) -> Client:
        """A Client on the router for the tenant (closed at close)."""
        client = await Client.connect(self.router_target, tenant=self.tenant)
        self.clients.append(client)
        return client

    # --- observation -----------------------------------------------------------------------

    async def consumer_info(self, stream: str, durable: str) -> ConsumerInfo:
        info: ConsumerInfo = await self.js.consumer_info(stream, durable)
        return info

    async def wait_drained(self, stream: str, durable: str, within: float = 30.0) -> float:
        """Wait until ``durable`` has nothing pending and nothing unacked.

        Returns:
            The seconds it took.
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        info: ConsumerInfo | None = None
        while loop.time() - began < within:
            with contextlib.suppress(Exception):
                info = await self.js.consumer_info(stream, durable)
                if not info.num_pending and not info.num_ack_pending:
                    return loop.time() - began
            await asyncio.sleep(0.05)
        pending = None if info is None else (info.num_pending, info.num_ack_pending)
        raise HarnessError(
            f"{stream}/{durable} not drained within {within}s (pending, ack pending: {pending})"
        )

    async def wait_quiet(self, within: float = 30.0) -> float:
        """Wait until the state service's records and events consumers and the router's
        records and refs consumers (those whose services are running) have nothing pending
        or unacked.

        Returns:
            The seconds it took.
        """
        names = self.names
        durables = []
        if self.services["state"].running:
            durables.append((names.exec_stream, names.state_consumer))
            durables.append((names.evt_stream, f"{names.state_consumer}_events"))
        if self.services["router"].running:
            durables.append((names.exec_stream, names.router_record_consumer))
            durables.append((names.ref_stream, names.router_consumer))
        loop = asyncio.get_running_loop()
        began = loop.time()
        for stream, durable in durables:
            await self.wait_drained(
                stream, durable, within=max(0.1, within - (loop.time() - began))
            )
        return loop.time() - began

    def peak_rss_mib(self, name: ServiceName | None = None) -> float:
        """Peak resident memory (MiB) of one service, or of all services together."""
        return self._peak.get(name, 0.0) if name is not None else self._peak_total

    async def _sample_rss(self) -> None:
        procs: dict[int, psutil.Process] = {}
        while True:
            total = 0.0
            for name, service in self.services.items():
                pid = service.pid
                if pid is None or not service.running:
                    continue
                try:
                    proc = procs.get(pid) or procs.setdefault(pid, psutil.Process(pid))
                    rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                total += rss
                self._peak[name] = max(self._peak.get(name, 0.0), rss)
            self._peak_total = max(self._peak_total, total)
            await asyncio.sleep(RSS_SAMPLE_S)


__all__ = [
    "ACK_WAIT_S",
    "SERVICES",
    "Cluster",
    "HarnessError",
    "Service",
    "ServiceName",
    "figure",
]
