"""Starts the mesh for the benchmark: an embedded nats-server, the services (one process
each, or all four in one process) and the worker process(es); each under its own name so
the monitor can measure it."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tickmesh.runtime.embedded_nats import EmbeddedNats

Layout = Literal["processes", "in-process"]
REPO = Path(__file__).resolve().parent.parent

# name, `tickmesh serve` argument, environment prefix
SERVICES: tuple[tuple[str, str, str], ...] = (
    ("guardrail", "guardrail", "TICKMESH_GUARDRAIL_"),
    ("state", "state", "TICKMESH_STATE_"),
    ("router", "router", "TICKMESH_ROUTER_"),
    ("executor-pool", "executor-pool", "TICKMESH_EXECUTOR_POOL_"),
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tickmesh_command() -> list[str]:
    script = Path(sys.executable).with_name("tickmesh")
    if script.is_file():
        return [str(script)]
    found = shutil.which("tickmesh")
    return [found] if found else [sys.executable, "-m", "tickmesh.cli.main"]


def wait_serving(
    target: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll the standard gRPC health service until it says SERVING."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the service at {target} exited with {proc.returncode}")
            try:
                reply = stub.Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{target} not SERVING within {timeout}s ({last})")


def read_line(stream: IO[bytes], timeout: float, proc: subprocess.Popen[bytes]) -> str:
    """One line of a child's stdout, waiting at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 1)
            if not chunk:
                break
            if chunk == b"\n":
                return buf.decode()
            buf += chunk
        elif proc.poll() is not None:
            break
    raise RuntimeError(f"child {proc.args!r} gave no line within {timeout}s (exit {proc.poll()})")


@dataclass
class Cluster:
    layout: Layout
    work_dir: Path
    tenant: str = "default"
    worker_concurrency: int = 1000
    workers: int = 1
    log_level: str = "INFO"
    uvloop: bool = True
    store_url: str | None = None
    """The cloud profile's PostgreSQL DSN; None keeps SQLite in ``work_dir``."""
    blob_url: str | None = None
    """The cloud profile's ``s3://`` blob URL; None keeps a folder in ``work_dir``."""
    usage_counter_url: str | None = None
    """The cloud profile's ``redis://`` usage counters; None reads the state store."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to every child's environment (the cloud profile's S3 credentials)."""

    nats: EmbeddedNats | None = None
    nats_url: str = ""
    router_target: str = ""
    pool_target: str = ""
    state_target: str = ""
    guardrail_target: str = ""
    state_db: Path | str = Path()
    """Where the records are read back: the SQLite file or the PostgreSQL DSN."""
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    processes: dict[str, psutil.Process] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    def start(self) -> Cluster:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.nats = EmbeddedNats(data_dir=self.work_dir / "nats").start()
        self.nats_url = self.nats.url
        assert self.nats.process is not None
        self.processes["nats-server"] = psutil.Process(self.nats.process.pid)
        try:
            if self.layout == "processes":
                self._start_services()
            else:
                self._start_mesh_process()
            for i in range(self.workers):
                self._start_worker(i)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, *, pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**(env or os.environ), **self.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else log,
            stderr=log,
        )
        self.children[name] = proc
        self.processes[name] = psutil.Process(proc.pid)
        return proc

    def _start_services(self) -> None:
        data = self.work_dir
        self.state_db = self.store_url or data / "state.db"
        blobs = self.blob_url or str(data / "blobs")
        for name, arg, prefix in SERVICES:
            port = free_port()
            env = dict(os.environ)
            env.update(
                {
                    f"{prefix}NATS_URL": self.nats_url,
                    # A JSON list: a comma-separated value is refused (README, known issues).
                    f"{prefix}TENANTS": json.dumps([self.tenant]),
                    f"{prefix}GRPC_LISTEN": f"127.0.0.1:{port}",
                    f"{prefix}LOG_LEVEL": self.log_level,
                    f"{prefix}LOG_JSON": "true",
                    f"{prefix}INSTANCE": f"bench-{name}",
                }
            )
            if name == "state":
                env[f"{prefix}STORE_URL"] = self.store_url or f"sqlite:///{self.state_db}"
                env[f"{prefix}BLOB_URL"] = blobs
                env[f"{prefix}SQLITE_SYNCHRONOUS"] = "FULL"
            if name == "executor-pool":
                env[f"{prefix}BLOB_URL"] = blobs
            if name == "router":
                # As deployed (deploy/): fork, replay and expired lifetimes' records, and
                # without a usage counter URL the tenant usage, come from the state service.
                env[f"{prefix}STATE_TARGET"] = self.state_target
            if self.usage_counter_url and name in ("state", "router", "guardrail"):
                env[f"{prefix}USAGE_COUNTER_URL"] = self.usage_counter_url
            proc = self._spawn(name, [*tickmesh_command(), "serve", arg], env)
            target = f"127.0.0.1:{port}"
            wait_serving(target, proc=proc)
            setattr(self, f"{name.replace('executor-', '')}_target", target)

    def _start_mesh_process(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "bench.meshproc",
            "--nats-url",
            self.nats_url,
            "--data-dir",
            str(self.work_dir / "mesh"),
            "--tenant",
            self.tenant,
        ]
        if not self.uvloop:
            argv.append("--no-uvloop")
        for flag, value in (
            ("--store-url", self.store_url),
            ("--blob-url", self.blob_url),
            ("--usage-counter-url", self.usage_counter_url),
        ):
            if value:
                argv += [flag, value]
        proc = self._spawn("mesh", argv, pipe=True)
        assert proc.stdout is not None
        info = json.loads(read_line(proc.stdout, 60.0, proc))
        self.router_target = info["router"]
        self.pool_target = info["pool"]
        self.state_target = info["state"]
        self.guardrail_target = info["guardrail"]
        self.state_db = self.store_url or Path(info["state_db"])

    def _start_worker(self, index: int) -> None:
        name = "worker" if self.workers == 1 else f"worker-{index + 1}"
        per_worker = max(1, -(-self.worker_concurrency // self.workers))
        argv = [
            sys.executable,
            "-m",
            "bench.worker",
            "--pool",
            self.pool_target,
            "--tenant",
            self.tenant,
            "--concurrency",
            str(per_worker),
        ]
        if not self.uvloop:
            argv.append("--no-uvloop")
        proc = self._spawn(name, argv, pipe=True)
        assert proc.stdout is not None
        line = read_line(proc.stdout, 60.0, proc)
        if line.strip() != "ready":
            raise RuntimeError(f"{name} said {line!r} instead of ready")

    def service_names(self) -> list[str]:
        return list(self.processes)

    def health_report(self) -> str:
        """Which children have exited, with the end of their logs (for a failed run)."""
        lines = []
        for name, proc in self.children.items():
            code = proc.poll()
            if code is None:
                continue
            lines.append(f"{name} exited with {code}; its log ends:")
            log = self.log_dir / f"{name}.log"
            if log.exists():
                lines.extend("    " + line for line in log.read_text().splitlines()[-15:])
        if self.nats is not None and self.nats.process is not None and self.nats.process.poll():
            lines.append(f"nats-server exited with {self.nats.process.returncode}")
        return "\n".join(lines) or "every child process is still running"

    def stop(self) -> None:
        # Workers first (they drain), then services, then the broker.
        order = sorted(self.children, key=lambda n: (not n.startswith("worker"), n))
        for name in order:
            proc = self.children[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in order:
            proc = self.children[name]
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.children.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        for log in self._logs:
            with contextlib.suppress(OSError):
                log.close()
        self._logs.clear()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
