"""Service settings come from the environment, with the documented forms."""

from __future__ import annotations

import pytest

from tickmesh.router.config import RouterSettings
from tickmesh.runtime.settings import child_environment
from tickmesh.state.config import StateSettings


@pytest.mark.parametrize(
    ("value", "expected"),
    [("default", ["default"]), ("acme, beta", ["acme", "beta"]), ('["a","b"]', ["a", "b"])],
)
def test_tenants_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("TICKMESH_ROUTER_TENANTS", value)
    assert RouterSettings().tenants == expected


def test_bad_tenant_ids_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKMESH_STATE_TENANTS", "acme,Bad.Tenant")
    with pytest.raises(ValueError, match=r"Bad\.Tenant"):
        StateSettings()


def test_each_service_reads_its_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKMESH_ROUTER_NATS_URL", "nats://router:4222")
    monkeypatch.setenv("TICKMESH_STATE_NATS_URL", "nats://state:4222")
    assert RouterSettings().nats_url == "nats://router:4222"
    assert StateSettings().nats_url == "nats://state:4222"
    assert RouterSettings().nats_servers == ["nats://router:4222"]


def test_a_child_environment_takes_defaults_only_where_nothing_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TM_TEST_SET", "mine")
    monkeypatch.setenv("TM_TEST_EMPTY", "")
    monkeypatch.delenv("TM_TEST_UNSET", raising=False)
    env = child_environment(
        {"TM_TEST_SET": "default", "TM_TEST_EMPTY": "default", "TM_TEST_UNSET": "default"},
        TM_TEST_EXTRA="extra",
    )
    assert env["TM_TEST_SET"] == "mine"
    assert env["TM_TEST_EMPTY"] == "default"
    assert env["TM_TEST_UNSET"] == "default"
    assert env["TM_TEST_EXTRA"] == "extra"


def test_extra_variables_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TM_TEST_SET", "mine")
    assert child_environment(TM_TEST_SET="extra")["TM_TEST_SET"] == "extra"
