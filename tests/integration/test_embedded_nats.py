"""The embedded nats-server: its Go runtime settings, read from the running process, and
its end with the process that started it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.nats_configs import require_nats_server
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.settings import child_environment
from tickmesh.runtime.tied import spawn_tied


def _environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key: value for key, value in pairs}


def _gomaxprocs(server: EmbeddedNats) -> str | None:
    assert server.process is not None
    return _environment_of(server.process.pid).get("GOMAXPROCS")


def test_the_embedded_server_runs_on_one_core_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_nats_server()
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    with EmbeddedNats(data_dir=tmp_path / "nats") as server:
        assert _gomaxprocs(server) == "1"


def test_max_procs_none_leaves_go_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_nats_server()
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    with EmbeddedNats(data_dir=tmp_path / "nats", max_procs=None) as server:
        assert _gomaxprocs(server) is None


def test_a_gomaxprocs_in_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_nats_server()
    monkeypatch.setenv("GOMAXPROCS", "3")
    with EmbeddedNats(data_dir=tmp_path / "nats", max_procs=2) as server:
        assert _gomaxprocs(server) == "3"


# --- the server ends with the process that started it --------------------------------

_PARENT = """
import sys, time
from pathlib import Path
from tickmesh.runtime.embedded_nats import EmbeddedNats
server = EmbeddedNats(data_dir=Path(sys.argv[1])).start()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that is gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_sigkilled_parent_takes_its_embedded_server_with_it(tmp_path: Path) -> None:
    """SIGKILL runs no code in the parent: the kernel's parent-death signal (SIGTERM) ends
    the server, which would otherwise keep its ports and files for ever."""
    require_nats_server()
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path / "nats")],
        stdout=subprocess.PIPE,
        env=child_environment(),
    )
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert _alive(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _gone_within(server_pid, 10), f"nats-server {server_pid} outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if "server_pid" in locals() and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
    # It shut down on SIGTERM, as on a clean stop (its log says so).
    assert "Server Exiting" in (tmp_path / "nats" / "nats-server.log").read_text()


def test_a_server_started_from_a_thread_that_ends_keeps_running(tmp_path: Path) -> None:
    """The parent-death signal follows the thread that forked the child: a server started
    from a short-lived thread must not end with it (tied children are forked by one
    thread that lives as long as the process)."""
    require_nats_server()
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join()
    try:
        assert server.process is not None
        time.sleep(0.5)
        assert server.process.poll() is None, "the server ended with the thread that started it"
        with socket.create_connection((server.host, server.client_port), timeout=5) as conn:
            assert conn.recv(4096).startswith(b"INFO ")
    finally:
        server.cleanup()


def test_a_tied_child_that_cannot_start_raises_in_the_caller(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        spawn_tied([str(tmp_path / "no-such-program")])
