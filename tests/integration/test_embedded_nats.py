"""The embedded nats-server's Go runtime settings, read from the running process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.nats_configs import require_nats_server
from tickmesh.runtime.embedded_nats import EmbeddedNats


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
