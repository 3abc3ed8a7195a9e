"""The tenant registry and the NATS accounts rendered from it (no server here: see
tests/integration/test_tenant_isolation.py for what the server makes of them)."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]
import pytest

from tickmesh.runtime.subjects import TenantNames
from tickmesh.runtime.tenancy import (
    EXECUTOR,
    EXECUTOR_INBOX_PREFIX,
    MIN_STREAMS,
    SERVICE,
    SYSTEM_ACCOUNT,
    Limits,
    Registry,
    Tenant,
    TenantDirectory,
    executor_permissions,
    format_size,
    parse_size,
    render,
    render_document,
    service_permissions,
    tenant_streams,
)
from tickmesh.runtime.tenancy.registry import ROLES
from tickmesh.sdk import ConfigError, ValidationError

KEY = "U" + "A" * 55


def _tenant(tenant_id: str, **fields: Any) -> Tenant:
    return Tenant(
        tenant_id, fields.pop("limits", Limits()), {SERVICE: KEY, EXECUTOR: KEY}, **fields
    )


def _registry(*tenants: Tenant) -> Registry:
    registry = Registry(system_key=KEY)
    for tenant in tenants:
        registry = registry.with_tenant(tenant)
    return registry


def _users(document: Mapping[str, Any], account: str) -> list[Mapping[str, Any]]:
    users: list[Mapping[str, Any]] = document["accounts"][account]["users"]
    return users


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield key, item
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


# --- tenant ids, sizes, limits --------------------------------------------------------------


@pytest.mark.parametrize("tenant_id", ["a", "acme", "0x", "a_b", "t_1f2e", "a" * 63])
def test_tenant_ids_that_are_subject_safe_are_accepted(tenant_id: str) -> None:
    assert _tenant(tenant_id).id == tenant_id


@pytest.mark.parametrize(
    "tenant_id",
    ["", "A", "Acme", "_a", "a.b", "a>", "a*", "a-b", "a b", "a" * 64, "sys ", "$G", "é"],
)
def test_tenant_ids_that_could_escape_a_subject_are_refused(tenant_id: str) -> None:
    with pytest.raises(ValidationError, match="invalid tenant id"):
        _tenant(tenant_id)
    with pytest.raises(ValidationError, match="invalid tenant id"):
        TenantDirectory(Path("/nonexistent")).seed_path(tenant_id, SERVICE)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1 << 20),
        ("64MB", 64 << 20),
        ("64MiB", 64 << 20),
        ("1G", 1 << 30),
        ("10gib", 10 << 30),
        ("2T", 2 << 40),
        ("512K", 512 << 10),
    ],
)
def test_sizes_are_binary_like_nats_servers(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "ten", "1P", "1 G B"])
def test_sizes_that_are_not_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="invalid size"):
        parse_size(text)


def test_sizes_print_in_whole_units() -> None:
    assert [format_size(s) for s in (1 << 30, 64 << 20, 1536 << 20, 1000)] == [
        "1GiB",
        "64MiB",
        "1536MiB",
        "1000B",
    ]


def test_limits_leave_room_for_the_tenants_own_streams() -> None:
    assert MIN_STREAMS == len(tenant_streams(TenantNames("x"))) == 7
    with pytest.raises(ValidationError, match="max_streams must be at least 7"):
        Limits(max_streams=6)
    with pytest.raises(ValidationError, match="max_memory must be positive"):
        Limits(max_memory=0)
    with pytest.raises(ValidationError, match="max_storage must be at least 1MiB"):
        Limits(max_storage=-1)
    with pytest.raises(ValidationError, match="max_consumers"):
        Limits(max_consumers=1)


# --- rendering ------------------------------------------------------------------------------


def test_every_tenant_is_an_account_with_jetstream_limits() -> None:
    small = Limits(max_memory=1 << 20, max_storage=2 << 20, max_streams=7, max_consumers=9)
    document = render_document(_registry(_tenant("a", limits=small), _tenant("b")))
    assert set(document["accounts"]) == {SYSTEM_ACCOUNT, "a", "b"}
    assert document["system_account"] == SYSTEM_ACCOUNT
    assert document["accounts"]["a"]["jetstream"] == {
        "max_memory": 1 << 20,
        "max_file": 2 << 20,
        "max_streams": 7,
        "max_consumers": 9,
    }
    for account in ("a", "b"):
        limits = document["accounts"][account]["jetstream"]
        assert all(value > 0 for value in limits.values()), account
        assert len(_users(document, account)) == 2
    assert "jetstream" not in document["accounts"][SYSTEM_ACCOUNT]


def test_no_user_is_granted_everything_and_nothing_is_exported() -> None:
    document = render_document(_registry(_tenant("a"), _tenant("b")))
    keys = {key for key, _ in _walk(document)}
    assert not keys & {"exports", "imports", "mappings", "default_permissions"}
    for account in document["accounts"]:
        for user in _users(document, account):
            assert "permissions" in user, f"a user of {account} has no permissions"
            grants = [*user["permissions"]["publish"]["allow"]]
            grants += user["permissions"]["subscribe"]["allow"]
            assert ">" not in grants
            assert all(not g.startswith(">") and not g.startswith("*") for g in grants)
            assert "deny" not in user["permissions"]["publish"]
    assert '">"' not in render(_registry(_tenant("a")))


def test_a_tenants_grants_name_only_its_own_subjects_and_streams() -> None:
    for tenant_id in ("a", "acme"):
        names = TenantNames(tenant_id)
        own = (
            f"tm.{tenant_id}.",
            f"$KV.TM_{tenant_id.upper()}_",
            "_INBOX.",
        )
        streams = tenant_streams(names)
        for permissions in (service_permissions(names), executor_permissions(names)):
            for grant in (*permissions.publish, *permissions.subscribe):
                if grant.startswith(("$JS.API.", "$JS.ACK.", "$JS.FC.")):
                    if grant in ("$JS.API.INFO", "$JS.API.STREAM.NAMES"):
                        continue  # about the caller's own account only
                    # The stream is named before any wildcard: never "any stream".
                    tokens = grant.split(".")
                    at = next((i for i, t in enumerate(tokens) if t in streams), None)
                    assert at is not None, grant
                    assert not {"*", ">"} & set(tokens[:at]), grant
                else:
                    assert grant.startswith(own), grant


def test_neither_user_may_delete_or_purge_and_only_the_service_updates_the_event_stream() -> None:
    names = TenantNames("acme")
    service, executor = service_permissions(names), executor_permissions(names)
    for permissions in (service, executor):
        for grant in permissions.publish:
            for verb in (".DELETE.", ".PURGE.", "ACCOUNT.", ".SNAPSHOT.", ".RESTORE."):
                assert verb not in grant, grant
    # The event stream's byte limit follows the account's storage; no other stream may
    # change (a republish added to the record stream would copy records out).
    assert [g for g in service.publish if ".UPDATE." in g] == [
        f"$JS.API.STREAM.UPDATE.{names.evt_stream}"
    ]
    assert not [g for g in executor.publish if ".UPDATE." in g]


def test_the_executor_reads_only_the_work_stream() -> None:
    names = TenantNames("acme")
    executor = executor_permissions(names)
    api = [g for g in executor.publish if g.startswith("$JS.")]
    assert all(names.work_stream in grant for grant in api), api
    assert not any(".STREAM." in g or ".DIRECT." in g for g in api)
    assert set(executor.subscribe) == {f"{EXECUTOR_INBOX_PREFIX}.>", names.cancel}
    assert set(g for g in executor.publish if g.startswith("tm.")) == {
        names.exec_all,
        names.dlq_all,
    }
    service = service_permissions(names)
    assert f"$JS.API.CONSUMER.CREATE.{names.exec_stream}.>" in service.publish


def test_a_disabled_tenant_keeps_its_account_and_limits_but_no_user() -> None:
    document = render_document(_registry(_tenant("a", disabled=True), _tenant("b")))
    assert _users(document, "a") == []
    assert document["accounts"]["a"]["jetstream"]["max_streams"] == Limits().max_streams
    assert len(_users(document, "b")) == 2


def test_rendering_is_deterministic() -> None:
    one = render(_registry(_tenant("b"), _tenant("a"), _tenant("c")))
    two = render(_registry(_tenant("c"), _tenant("a"), _tenant("b")))
    assert one == two
    assert one.index("\n  a {") < one.index("\n  b {") < one.index("\n  c {")


def test_strings_are_quoted_and_digit_led_names_too() -> None:
    text = render(_registry(_tenant("0x")))
    assert '\n  "0x" {' in text
    assert '"$JS.API.INFO"' in text
    assert f'nkey: "{KEY}"' in text


# --- the registry on disk -------------------------------------------------------------------


def test_the_registry_round_trips_and_keeps_no_secret(tmp_path: Path) -> None:
    directory = TenantDirectory(tmp_path / "tenants")
    registry = directory.load_or_init()
    users = {role: directory.new_user("acme", role) for role in ROLES}
    tenant = Tenant("acme", Limits(max_streams=9), users, created="2026-01-01T00:00:00Z")
    registry = registry.with_tenant(tenant)
    directory.save(registry)
    assert directory.load() == registry
    text = directory.registry_path.read_text()
    assert '"SU' not in text  # seeds stay in creds/
    for role in ROLES:
        seed_path = directory.seed_path("acme", role)
        assert stat.S_IMODE(seed_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(seed_path.parent.stat().st_mode) == 0o700
        pair = nkeys.from_seed(bytearray(seed_path.read_text().strip().encode()))
        assert pair.public_key.decode() == users[role]
    system = nkeys.from_seed(bytearray(directory.system_seed_path.read_text().strip().encode()))
    assert system.public_key.decode() == registry.system_key
    assert stat.S_IMODE((directory.path / "creds").stat().st_mode) == 0o700


def test_a_registry_that_cannot_be_read_says_so(tmp_path: Path) -> None:
    directory = TenantDirectory(tmp_path)
    with pytest.raises(ConfigError, match="no tenant registry at"):
        directory.load()
    directory.registry_path.write_text(json.dumps({"version": 2}))
    with pytest.raises(ConfigError, match="unsupported tenant registry version 2"):
        directory.load()
    bad = _registry(_tenant("a")).to_json()
    bad["tenants"]["a"]["limits"]["max_streams"] = "many"
    directory.registry_path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="max_streams must be an integer"):
        directory.load()
    bad["tenants"]["a"]["limits"]["max_streams"] = 16
    bad["tenants"]["a"]["users"] = {SERVICE: KEY}
    directory.registry_path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="must have exactly the users"):
        directory.load()


def test_tenants_are_looked_up_by_valid_id() -> None:
    registry = _registry(_tenant("a"))
    assert registry.get("a").id == "a"
    with pytest.raises(ConfigError, match="no tenant 'b'"):
        registry.get("b")
    assert registry.without("a").tenants == {}
    assert registry.reserved() == (Limits().max_memory, Limits().max_storage)
    disabled = registry.with_tenant(replace(registry.get("a"), disabled=True))
    assert disabled.reserved() == registry.reserved()  # a disabled account keeps its reservation


# --- rotating keys ---------------------------------------------------------------------------

EXECUTOR_KEY = "U" + "E" * 55
NEW_KEY = "U" + "B" * 55
NEWER_KEY = "U" + "C" * 55


def _keyed(tenant_id: str = "acme") -> Tenant:
    """A tenant whose two users have different keys (``KEY`` and ``EXECUTOR_KEY``)."""
    return Tenant(tenant_id, Limits(), {SERVICE: KEY, EXECUTOR: EXECUTOR_KEY})


def _nkeys(document: Mapping[str, Any], account: str) -> list[str]:
    return [user["nkey"] for user in _users(document, account)]


def test_a_pending_rotation_renders_the_previous_key_as_a_second_user() -> None:
    tenant = _keyed().rotated(SERVICE, NEW_KEY, "2026-01-01T00:00:00Z")
    assert tenant.users[SERVICE] == NEW_KEY
    assert tenant.previous[SERVICE].nkey == KEY
    assert tenant.rotating == (SERVICE,)
    document = render_document(_registry(tenant))
    users = _users(document, "acme")
    assert [user["nkey"] for user in users] == [NEW_KEY, KEY, EXECUTOR_KEY]
    new, previous, executor = users
    assert previous["permissions"] == new["permissions"]
    assert previous["permissions"] != executor["permissions"]
    assert "rotate --finish acme" in previous["#"]


def test_finishing_a_rotation_removes_only_the_previous_keys() -> None:
    tenant = (
        _keyed()
        .rotated(SERVICE, NEW_KEY, "2026-01-01T00:00:00Z")
        .rotated(EXECUTOR, NEWER_KEY, "2026-01-01T00:00:00Z")
    )
    assert tenant.rotating == ROLES
    rendered = _nkeys(render_document(_registry(tenant)), "acme")
    assert rendered == [NEW_KEY, KEY, NEWER_KEY, EXECUTOR_KEY]
    half = tenant.finished((EXECUTOR,))
    assert half.rotating == (SERVICE,)
    assert _nkeys(render_document(_registry(half)), "acme") == [NEW_KEY, KEY, NEWER_KEY]
    done = half.finished(ROLES)
    assert done.previous == {}
    assert done.users == {SERVICE: NEW_KEY, EXECUTOR: NEWER_KEY}
    # Finished, the tenant renders exactly as one created with the new keys.
    created = Tenant("acme", Limits(), {SERVICE: NEW_KEY, EXECUTOR: NEWER_KEY})
    assert render(_registry(done)) == render(_registry(created))
    assert done.to_json() == created.to_json()


def test_a_second_rotation_of_a_pending_key_is_refused() -> None:
    tenant = _keyed().rotated(SERVICE, NEW_KEY, "2026-01-01T00:00:00Z")
    with pytest.raises(ConfigError, match="rotation of the service key is pending") as caught:
        tenant.rotated(SERVICE, NEWER_KEY, "2026-01-02T00:00:00Z")
    assert "rotate --finish acme --role service" in str(caught.value)
    assert tenant.rotated(EXECUTOR, NEWER_KEY, "2026-01-02T00:00:00Z").rotating == ROLES


def test_rendering_a_rotation_is_deterministic() -> None:
    since = "2026-01-01T00:00:00Z"
    one = _keyed().rotated(SERVICE, NEW_KEY, since).rotated(EXECUTOR, NEWER_KEY, since)
    other = _keyed().rotated(EXECUTOR, NEWER_KEY, since).rotated(SERVICE, NEW_KEY, since)
    assert render(_registry(one)) == render(_registry(other))
    assert json.dumps(one.to_json()) == json.dumps(other.to_json())
    assert list(one.to_json()["previous"]) == list(ROLES)


def test_a_disabled_tenant_with_a_pending_rotation_has_no_user() -> None:
    tenant = replace(_keyed().rotated(SERVICE, NEW_KEY, "t"), disabled=True)
    assert _users(render_document(_registry(tenant)), "acme") == []


def test_a_registry_without_rotations_loads_and_saves_unchanged(tmp_path: Path) -> None:
    example = Path(__file__).parents[3] / "deploy/nats/tenants.example/tenants.json"
    directory = TenantDirectory(tmp_path)
    directory.registry_path.write_text(example.read_text())
    registry = directory.load()
    assert registry.tenants
    assert all(
        tenant.previous == {} and not tenant.rotating for tenant in registry.tenants.values()
    )
    directory.save(registry)
    assert directory.registry_path.read_text() == example.read_text()


def test_a_pending_rotation_round_trips(tmp_path: Path) -> None:
    directory = TenantDirectory(tmp_path)
    tenant = _keyed().rotated(EXECUTOR, NEW_KEY, "2026-01-01T00:00:00Z")
    registry = _registry(tenant)
    directory.save(registry)
    assert directory.load() == registry
    data = json.loads(directory.registry_path.read_text())
    assert data["tenants"]["acme"]["previous"] == {
        EXECUTOR: {"nkey": EXECUTOR_KEY, "since": "2026-01-01T00:00:00Z"}
    }


@pytest.mark.parametrize(
    ("previous", "message"),
    [
        ({"admin": {"nkey": NEW_KEY}}, "previous keys of unknown roles"),
        ({SERVICE: {"nkey": KEY}}, "the previous service key is a current key"),
        ({SERVICE: {"nkey": "nope"}}, "not a public user NKey"),
        ({SERVICE: NEW_KEY}, "a previous key is"),
        ([NEW_KEY], "previous must map roles to keys"),
    ],
)
def test_bad_previous_keys_are_refused(tmp_path: Path, previous: Any, message: str) -> None:
    data = _registry(_keyed()).to_json()
    data["tenants"]["acme"]["previous"] = previous
    directory = TenantDirectory(tmp_path)
    directory.registry_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        directory.load()


def test_a_staged_seed_replaces_the_current_one_only_when_installed(tmp_path: Path) -> None:
    directory = TenantDirectory(tmp_path / "tenants")
    current = directory.new_user("acme", SERVICE)
    seed_path = directory.seed_path("acme", SERVICE)
    before = seed_path.read_text()
    staged = directory.stage_user("acme", SERVICE)
    assert staged != current
    assert seed_path.read_text() == before
    assert stat.S_IMODE(directory.staged_seed_path("acme", SERVICE).stat().st_mode) == 0o600
    directory.install_staged("acme", SERVICE)
    pair = nkeys.from_seed(bytearray(seed_path.read_text().strip().encode()))
    assert pair.public_key.decode() == staged
    assert stat.S_IMODE(seed_path.stat().st_mode) == 0o600
    assert not directory.staged_seed_path("acme", SERVICE).exists()
    directory.stage_user("acme", SERVICE)
    directory.discard_staged("acme", SERVICE)
    assert not directory.staged_seed_path("acme", SERVICE).exists()
    assert sorted(p.name for p in seed_path.parent.iterdir()) == ["service.nk"]
