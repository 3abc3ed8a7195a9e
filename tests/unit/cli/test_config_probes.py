"""Settings an operator gets wrong in ``tickmesh.yaml`` or the environment are refused
with the key, and for the file its line: a key written twice, a value of the wrong type,
a size or duration out of range, an unknown log level."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tickmesh.cli.main import main
from tickmesh.router.config import RouterSettings
from tickmesh.sdk.errors import ConfigError
from tickmesh.state.config import StateSettings


def _write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "tickmesh.yaml"
    path.write_text(text)
    monkeypatch.setenv("TICKMESH_CONFIG", str(path))
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nats_url: nats://a:4222\nnats_url: nats://b:4222\n", ":2: 'nats_url' is set twice"),
        (
            "nats:\n  url: nats://a:4222\nnats_url: nats://b:4222\n",
            ":3: 'nats_url' is set twice (first at line 2 as 'nats.url')",
        ),
        ("state:\n  max_batch: 1\n  max_batch: 2\n", ":3: 'state.max_batch' is set twice"),
        (
            "state:\n  max_batch: 1\nstate:\n  store_pool_max: 3\n",
            ":3: 'state' is set twice (first at line 1)",
        ),
    ],
)
def test_a_key_written_twice_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    _write(tmp_path, monkeypatch, text)
    with pytest.raises(ConfigError) as refused:
        StateSettings()
    assert message in str(refused.value)


def test_a_section_still_overrides_a_shared_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, monkeypatch, "nats_url: nats://a:4222\nstate:\n  nats_url: nats://s:4222\n")
    assert StateSettings().nats_url == "nats://s:4222"
    assert RouterSettings().nats_url == "nats://a:4222"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("tenants: [acme]\nstate:\n  max_batch: lots\n", "tickmesh.yaml:3 (state.max_batch)"),
        ("log_json: true\nshutdown_grace_s: 5s\n", "tickmesh.yaml:2 (shutdown_grace_s)"),
        ("nats:\n  replicas: 7\n", "tickmesh.yaml:2 (nats.replicas)"),
    ],
)
def test_a_bad_value_in_the_file_names_its_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    where: str,
) -> None:
    _write(tmp_path, monkeypatch, text)
    assert main(["config", "show", "--service", "state"], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert where in err
    assert "Traceback" not in err


def test_a_bad_value_in_the_environment_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The file sets it too, but the environment's value is the one refused.
    _write(tmp_path, monkeypatch, "shutdown_grace_s: 3\n")
    monkeypatch.setenv("TICKMESH_STATE_SHUTDOWN_GRACE_S", "5s")
    assert main(["config", "show", "--service", "state"], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert "TICKMESH_STATE_SHUTDOWN_GRACE_S (shutdown_grace_s)" in err
    assert "tickmesh.yaml" not in err


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("max_message_bytes: -1\n", "max_message_bytes"),
        ("max_message_bytes: 0\n", "max_message_bytes"),
        ("nats_connect_timeout_s: 0\n", "nats_connect_timeout_s"),
        ("nats_connect_timeout_s: -5\n", "nats_connect_timeout_s"),
        ("shutdown_grace_s: -1\n", "shutdown_grace_s"),
        ("log_level: LOUD\n", "log_level"),
    ],
)
def test_out_of_range_shared_settings_are_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    field: str,
) -> None:
    _write(tmp_path, monkeypatch, text)
    assert main(["config", "show", "--service", "router"], out=io.StringIO()) == 1
    assert f"tickmesh.yaml:1 ({field})" in capsys.readouterr().err


def test_a_log_level_in_any_case_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, monkeypatch, "log_level: debug\nshutdown_grace_s: 0\n")
    settings = StateSettings()
    assert settings.log_level.upper() == "DEBUG"
    assert settings.shutdown_grace_s == 0


@pytest.mark.parametrize(
    ("service", "text", "field"),
    [
        ("router", "router:\n  max_batch: 0\n", "router.max_batch"),
        ("router", "router:\n  ack_wait_s: 0\n", "router.ack_wait_s"),
        ("router", "router:\n  lifetime_cache_size: 0\n", "router.lifetime_cache_size"),
        # Entries older than a negative retention would be dropped before they are out.
        ("router", "router:\n  outbox_retention_s: -1\n", "router.outbox_retention_s"),
        ("router", "router:\n  tenant_usage_refresh_s: 0\n", "router.tenant_usage_refresh_s"),
        ("state", "state:\n  max_batch: -5\n", "state.max_batch"),
        ("state", "state:\n  ack_wait_s: 0\n", "state.ack_wait_s"),
        ("guardrail", "guardrail:\n  snapshot_lease_s: 0\n", "guardrail.snapshot_lease_s"),
        ("guardrail", "guardrail:\n  refresh_fraction: 1.5\n", "guardrail.refresh_fraction"),
    ],
)
def test_out_of_range_service_settings_are_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    service: str,
    text: str,
    field: str,
) -> None:
    _write(tmp_path, monkeypatch, text)
    assert main(["config", "show", "--service", service], out=io.StringIO()) == 1
    assert f"tickmesh.yaml:2 ({field})" in capsys.readouterr().err
