"""The API-key check against the tenant a call names, on every tenant entry it carries."""

from __future__ import annotations

import grpc

from tickmesh.runtime.auth import TENANT_METADATA_KEY
from tickmesh.runtime.grpc_security import AUTHORIZATION_KEY, ApiKeys, CallGuard, hash_key

METHOD = "/tickmesh.v1.GuardrailService/ListPolicies"


def guard() -> CallGuard:
    return CallGuard(ApiKeys({hash_key("key-of-a"): "a"}), require_deadline=False)


def test_a_key_names_its_own_tenant() -> None:
    metadata = ((AUTHORIZATION_KEY, "Bearer key-of-a"), (TENANT_METADATA_KEY, "a"))
    assert guard()._authenticate(METHOD, metadata) is None


def test_a_key_is_refused_when_any_tenant_entry_names_another_tenant() -> None:
    # The services take the first entry; the key must not pass on the last one.
    for entries in (("b", "a"), ("a", "b")):
        metadata = (
            (AUTHORIZATION_KEY, "Bearer key-of-a"),
            *((TENANT_METADATA_KEY, tenant) for tenant in entries),
        )
        rejection = guard()._authenticate(METHOD, metadata)
        assert rejection is not None, entries
        assert rejection[0] == grpc.StatusCode.PERMISSION_DENIED
        assert "'b'" in rejection[1]
