"""tickmesh.yaml configures every service; the environment wins; typos are errors with lines."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tickmesh.cli import config as config_cli
from tickmesh.cli.main import main
from tickmesh.executor_pool.config import ExecutorPoolSettings
from tickmesh.router.config import RouterSettings
from tickmesh.sdk.errors import ConfigError
from tickmesh.state.config import StateSettings
from tickmesh.state.store import MIGRATIONS

CONFIG = """\
nats:
  url: nats://n1:4222,nats://n2:4222
  password: hunter2
  tls:
    ca: /etc/tickmesh/ca.pem
tenants: [acme, globex]
log:
  level: DEBUG
usage_counter_url: redis://:redispw@cache:6379/0
state:
  store_url: postgresql://tickmesh:dbpw@db:5432/tickmesh
  blob_url: s3://blobs/prod?region=eu-west-1&secret_access_key=abc
  store_pool_max: 16
router:
  nats:
    url: nats://router-only:4222
  lifetime_cache_size: 5000
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "tickmesh.yaml"
    path.write_text(CONFIG)
    monkeypatch.setenv("TICKMESH_CONFIG", str(path))
    return path


def test_shared_values_reach_every_service_and_sections_override(config_file: Path) -> None:
    state = StateSettings()
    router = RouterSettings()
    pool = ExecutorPoolSettings()
    assert state.nats_servers == ["nats://n1:4222", "nats://n2:4222"]
    assert state.nats_tls_ca == "/etc/tickmesh/ca.pem"
    assert state.tenants == pool.tenants == ["acme", "globex"]
    assert state.log_level == "DEBUG"
    assert state.store_url == "postgresql://tickmesh:dbpw@db:5432/tickmesh"
    assert state.store_pool_max == 16
    assert state.usage_counter_url == "redis://:redispw@cache:6379/0"
    # The router's own section overrides the shared NATS URL for the router only.
    assert router.nats_url == "nats://router-only:4222"
    assert router.lifetime_cache_size == 5000
    assert pool.nats_url == "nats://n1:4222,nats://n2:4222"


def test_the_environment_wins_over_the_file(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TICKMESH_STATE_STORE_POOL_MAX", "3")
    monkeypatch.setenv("TICKMESH_ROUTER_NATS_URL", "nats://from-env:4222")
    assert StateSettings().store_pool_max == 3
    assert RouterSettings().nats_url == "nats://from-env:4222"


def test_a_default_file_in_the_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TICKMESH_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert StateSettings().tenants == ["default"]
    (tmp_path / "tickmesh.yaml").write_text("tenants: [initech]\n")
    assert StateSettings().tenants == ["initech"]


def test_an_unknown_setting_names_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tickmesh.yaml"
    path.write_text("tenants: [acme]\nstate:\n  store_ur: sqlite:///x.db\n")
    monkeypatch.setenv("TICKMESH_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"tickmesh\.yaml:3: 'state\.store_ur' is not a setting"):
        StateSettings()


def test_a_service_setting_at_the_top_level_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Valid for the state service only; at the top level every service would read it.
    path = tmp_path / "tickmesh.yaml"
    path.write_text("store_url: sqlite:///x.db\n")
    monkeypatch.setenv("TICKMESH_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r":1: 'store_url' is not a setting shared by every"):
        RouterSettings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenants: [acme\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("state: 3\n", "state must be a mapping"),
    ],
)
def test_a_malformed_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    path = tmp_path / "tickmesh.yaml"
    path.write_text(text)
    monkeypatch.setenv("TICKMESH_CONFIG", str(path))
    with pytest.raises(ConfigError, match=message):
        StateSettings()


def test_a_named_file_that_does_not_exist_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKMESH_CONFIG", "/nonexistent/tickmesh.yaml")
    with pytest.raises(ConfigError, match="no such file"):
        StateSettings()


def test_config_show_prints_every_service_with_secrets_masked(config_file: Path) -> None:
    out = io.StringIO()
    assert main(["config", "show"], out=out) == 0
    text = out.getvalue()
    for section in ("router:", "guardrail:", "state:", "executor-pool:"):
        assert section in text
    for secret in ("hunter2", "dbpw", "redispw", "secret_access_key=abc"):
        assert secret not in text, secret
    assert "postgresql://tickmesh:***@db:5432/tickmesh" in text
    assert "redis://:***@cache:6379/0" in text
    assert "nats_password: '***'" in text
    assert "store_pool_max: 16" in text
    assert "nats://router-only:4222" in text


def test_config_show_reports_an_invalid_value_by_name(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TICKMESH_STATE_STORE_POOL_MAX", "zero")
    assert main(["config", "show", "--service", "state"], out=io.StringIO()) == 1
    assert "store_pool_max" in capsys.readouterr().err


def test_mask_url_keeps_what_is_not_secret() -> None:
    assert config_cli.mask_url("nats://n1:4222") == "nats://n1:4222"
    assert config_cli.mask_url("postgresql://u:p@h/db") == "postgresql://u:***@h/db"
    assert (
        config_cli.mask_url("s3://b/p?region=x&access_key_id=AK")
        == "s3://b/p?region=x&access_key_id=***"
    )


def test_migrate_brings_a_sqlite_store_up_to_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TICKMESH_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TICKMESH_STATE_STORE_URL", f"sqlite:///{tmp_path / 'state.db'}")
    first, second = io.StringIO(), io.StringIO()
    assert main(["migrate"], out=first) == 0
    assert f"from version 0 to {len(MIGRATIONS)}" in first.getvalue()
    assert main(["migrate"], out=second) == 0
    assert f"up to date (version {len(MIGRATIONS)})" in second.getvalue()


def test_the_deploy_example_configures_every_service(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parents[3] / "deploy" / "tickmesh.yaml"
    monkeypatch.setenv("TICKMESH_CONFIG", str(example))
    for service in config_cli.SETTINGS:
        settings = config_cli.load_settings(service)
        assert settings.nats_url.count("nats://") == 3
        assert settings.tenants == ["acme", "globex"]
        assert settings.usage_counter_url == "redis://redis:6379/0"
    state = config_cli.load_settings("state")
    assert isinstance(state, StateSettings)
    assert state.store_url.startswith("postgresql://")
    assert state.blob_url.startswith("s3://tickmesh-blobs/prod")
    assert not state.migrate_on_start
