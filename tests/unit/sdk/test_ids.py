"""UUIDv7 ids are well-formed and ordered; execution ids are deterministic."""

from __future__ import annotations

import os
import uuid

from tickmesh.sdk import execution_id, ids, uuid7
from tickmesh.sdk.ids import is_valid_tenant_id


def test_uuid7_is_version_7_rfc_variant() -> None:
    value = uuid.UUID(uuid7())
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_uuid7_sorts_in_creation_order() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_uuid7_stays_unique_and_ordered_across_random_pool_refills() -> None:
    # Each id takes 8 or 10 bytes of the pool: 20,000 ids refill it dozens of times.
    ids_ = [uuid7() for _ in range(20_000)]
    assert ids_ == sorted(ids_)
    assert len(set(ids_)) == len(ids_)
    for text in ids_[::997]:
        value = uuid.UUID(text)
        assert str(value) == text  # canonical lowercase 8-4-4-4-12 form
        assert value.version == 7
        assert value.variant == uuid.RFC_4122


def test_uuid7_random_bits_differ_between_ids() -> None:
    rand_b = {uuid.UUID(uuid7()).int & ((1 << 62) - 1) for _ in range(2000)}
    assert len(rand_b) == 2000


def test_uuid7_embeds_the_current_millisecond() -> None:
    import time

    before = time.time_ns() // 1_000_000
    value = uuid.UUID(uuid7()).int >> 80
    after = time.time_ns() // 1_000_000
    # Ids may run ahead of the clock by a millisecond when the counter overflows.
    assert before <= value <= after + 1


def test_forked_child_does_not_reuse_the_parents_random_pool() -> None:
    uuid7()  # the parent holds a partly used pool
    with ids._lock:
        parent_next = ids._pool[ids._pool_at : ids._pool_at + 8]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            with ids._lock:
                fresh = ids._pool == b"" and ids._pool_at == 0
            uuid7()
            with ids._lock:
                taken = ids._pool[:8]
            os.write(write, b"1" if fresh and taken != parent_next else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        answer = os.read(read, 1)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert answer == b"1"


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
