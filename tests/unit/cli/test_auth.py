"""`tickmesh auth`: keys are shown once and stored as hashes; the CLI's client commands
take their credentials from the environment."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from tickmesh.cli.auth import client_security
from tickmesh.cli.main import main
from tickmesh.runtime.grpc_security import ApiKeys, hash_key


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return main(argv, out), out.getvalue()


def test_new_key_prints_the_key_once_and_the_entry_a_keys_file_takes(tmp_path: Path) -> None:
    code, text = _run(["auth", "new-key", "acme"])
    assert code == 0
    key = re.search(r"^key \(shown once; give it to the client\): (tm_\S+)$", text, re.M)
    entry = re.search(r'^("acme": \["[0-9a-f]{64}"\])$', text, re.M)
    assert key is not None, text
    assert entry is not None, text
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(entry.group(1) + "\n")
    assert ApiKeys.load(keys_file).tenant_for(key.group(1)) == "acme"
    assert _run(["auth", "new-key", "acme"])[1] != text  # a new random key each time


def test_hash_key_and_a_bad_tenant() -> None:
    assert _run(["auth", "hash-key", "secret"]) == (0, hash_key("secret") + "\n")
    code, text = _run(["auth", "new-key", "Not A Tenant"])
    assert code == 2
    assert "is not a tenant id" in text


def test_client_commands_take_credentials_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("TICKMESH_API_KEY", "TICKMESH_TLS_CA", "TICKMESH_TLS_CERT", "TICKMESH_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert client_security() is None
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("TICKMESH_API_KEY", "tm_k")
    monkeypatch.setenv("TICKMESH_TLS_CA", str(ca))
    security = client_security()
    assert security is not None
    assert security.api_key == "tm_k"
    assert security.root_certificates == ca.read_bytes()
    assert security.tls
