"""Deployment configuration files are valid for the software they configure."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tickmesh.runtime.embedded_nats import nats_server_path

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"


def test_nats_configs_pass_nats_server_check() -> None:
    configs = sorted(DEPLOY.glob("nats/*.conf"))
    assert configs, "no NATS configs under deploy/nats"
    for config in configs:
        result = subprocess.run(
            [str(nats_server_path()), "-c", str(config), "-t"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"{config}: {result.stdout}{result.stderr}"


def test_single_node_config_fsyncs_every_write() -> None:
    text = (DEPLOY / "nats" / "nats-server.conf").read_text()
    assert "sync_interval: always" in text
    assert "http: 127.0.0.1:" in text
