"""`tickmesh migrate` against a real PostgreSQL, and a state store that will not run on an
old schema when told not to migrate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tickmesh.sdk.errors import ConfigError
from tickmesh.state.postgres import MIGRATIONS
from tickmesh.state.server import open_store

TICKMESH = Path(sys.executable).with_name("tickmesh")


def _migrate(dsn: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TICKMESH_STATE_STORE_URL": dsn}
    return subprocess.run(
        [str(TICKMESH), "migrate"], env=env, capture_output=True, text=True, timeout=60
    )


async def test_migrate_applies_every_migration_once(postgres_dsn: str) -> None:
    with pytest.raises(ConfigError, match="tickmesh migrate"):
        await open_store(postgres_dsn, migrate=False)

    first = _migrate(postgres_dsn)
    assert first.returncode == 0, first.stderr
    assert f"from version 0 to {len(MIGRATIONS)}" in first.stdout

    again = _migrate(postgres_dsn)
    assert again.returncode == 0, again.stderr
    assert f"up to date (version {len(MIGRATIONS)})" in again.stdout

    store = await open_store(postgres_dsn, migrate=False)
    await store.close()


def test_migrate_names_an_unreachable_server_without_its_password() -> None:
    done = _migrate("postgresql://tm:hunter2@127.0.0.1:1/state")
    assert done.returncode == 1
    assert "cannot reach PostgreSQL at 127.0.0.1:1" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
