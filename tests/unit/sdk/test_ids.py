"""UUIDv7 ids are well-formed and ordered; execution ids are deterministic."""

from __future__ import annotations

import uuid

from tickmesh.sdk import execution_id, uuid7
from tickmesh.sdk.ids import is_valid_tenant_id


def test_uuid7_is_version_7_rfc_variant() -> None:
    value = uuid.UUID(uuid7())
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_uuid7_sorts_in_creation_order() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_execution_id_ignores_parent_order() -> None:
    a = execution_id("acme", "l1", ["b", "a"], "plan", 2)
    assert a == execution_id("acme", "l1", ["a", "b"], "plan", 2)
    assert len(a) == 32
    int(a, 16)


def test_execution_id_changes_with_each_input() -> None:
    base = execution_id("acme", "l1", ["p"], "n", 1)
    variants = {
        execution_id("acme2", "l1", ["p"], "n", 1),
        execution_id("acme", "l2", ["p"], "n", 1),
        execution_id("acme", "l1", ["q"], "n", 1),
        execution_id("acme", "l1", ["p"], "m", 1),
        execution_id("acme", "l1", ["p"], "n", 2),
        execution_id("acme", "l1", [], "n", 1),
    }
    assert base not in variants
    assert len(variants) == 6


def test_field_boundaries_cannot_be_shifted() -> None:
    assert execution_id("ab", "c", [], "n", 1) != execution_id("a", "bc", [], "n", 1)


def test_tenant_id_rules() -> None:
    assert is_valid_tenant_id("acme")
    assert is_valid_tenant_id("t_2")
    assert not is_valid_tenant_id("Acme")
    assert not is_valid_tenant_id("a-b")
    assert not is_valid_tenant_id("")
