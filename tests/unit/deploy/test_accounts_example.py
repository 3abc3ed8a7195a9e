"""deploy/nats/accounts.example.conf is what `tickmesh tenant render` makes of the example
registry, and nats-server accepts it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tickmesh.runtime.embedded_nats import nats_server_path
from tickmesh.runtime.tenancy import TenantDirectory, render

NATS = Path(__file__).resolve().parents[3] / "deploy" / "nats"
EXAMPLE = NATS / "accounts.example.conf"
REGISTRY = NATS / "tenants.example"
REGENERATE = (
    "tickmesh tenant render --dir deploy/nats/tenants.example "
    "--out deploy/nats/accounts.example.conf"
)


def test_example_accounts_are_what_the_code_renders() -> None:
    registry = TenantDirectory(REGISTRY).load()
    assert sorted(registry.tenants) == ["acme", "globex"]
    assert EXAMPLE.read_text() == render(registry), f"out of date: run {REGENERATE}"


def test_example_accounts_pass_nats_server_check() -> None:
    result = subprocess.run(
        [str(nats_server_path()), "-t", "-c", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


def test_the_example_directory_holds_no_secret() -> None:
    assert [p.name for p in REGISTRY.iterdir()] == ["tenants.json"]
    assert '"SU' not in (REGISTRY / "tenants.json").read_text()
