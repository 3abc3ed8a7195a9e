"""A tenant registry that is valid JSON but not a registry (a bad merge, a hand edit) is
refused with the file's name and what is wrong: never a traceback, never read as
something else."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from tickmesh.cli.main import main
from tickmesh.runtime.tenancy import TenantDirectory
from tickmesh.sdk import ConfigError


@pytest.fixture
def registry(tmp_path: Path) -> tuple[TenantDirectory, dict[str, Any]]:
    directory = TenantDirectory(tmp_path / "tenants")
    assert main(["tenant", "create", "acme", "--dir", str(directory.path)], out=io.StringIO()) == 0
    return directory, json.loads(directory.registry_path.read_text())


def _acme(good: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**good, "tenants": {"acme": {**good["tenants"]["acme"], **changes}}}


CASES: list[tuple[str, Any, str]] = [
    ("a list", lambda g: [g], "must be a JSON object"),
    ("tenants a list", lambda g: {**g, "tenants": []}, "tenants must map tenant ids"),
    ("tenants null", lambda g: {**g, "tenants": None}, "tenants must map tenant ids"),
    ("a tenant a string", lambda g: {**g, "tenants": {"acme": "x"}}, "tenant 'acme' must be"),
    ("limits a number", lambda g: _acme(g, limits=5), "tenant 'acme': limits must be"),
    ("users a list", lambda g: _acme(g, users=["a"]), "tenant 'acme': users must map"),
    (
        "a key a number",
        lambda g: _acme(g, users={"service": 5, "executor": 6}),
        "not a public user NKey: 5",
    ),
    ("the system key a number", lambda g: {**g, "system": {"users": {"admin": 5}}}, "NKey: 5"),
    ("disabled a string", lambda g: _acme(g, disabled="false"), "disabled must be true or false"),
]


@pytest.mark.parametrize(("name", "change", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_malformed_registry_is_refused_by_name(
    registry: tuple[TenantDirectory, dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    name: str,
    change: Any,
    message: str,
) -> None:
    directory, good = registry
    directory.registry_path.write_text(json.dumps(change(good)))
    with pytest.raises(ConfigError, match="cannot read the tenant registry") as refused:
        directory.load()
    assert message in str(refused.value)
    assert str(directory.registry_path) in str(refused.value)
    capsys.readouterr()
    assert main(["tenant", "list", "--dir", str(directory.path)], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
