"""Which tenant a call acts for.

The tenant comes from the caller's credentials, never from a request field.
Here the credential is the ``x-tickmesh-tenant`` metadata entry checked against
the tenants this process serves; authenticated tokens bind a caller to a tenant
in deployments that configure them.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import grpc

from tickmesh.sdk.errors import StatusCode
from tickmesh.sdk.ids import TENANT_ID_PATTERN

from .errors import StatusError

TENANT_METADATA_KEY = "x-tickmesh-tenant"


def tenant_from_metadata(metadata: Any, served: Collection[str]) -> str:
    """Return the caller's tenant, or raise a StatusError saying what is wrong."""
    named = [
        value.decode() if isinstance(value, bytes) else str(value)
        for key, value in metadata or ()
        if key == TENANT_METADATA_KEY
    ]
    if not named:
        raise StatusError(
            StatusCode.UNAUTHENTICATED,
            f"no tenant credentials: send the '{TENANT_METADATA_KEY}' metadata entry",
        )
    if len(named) > 1:
        # The API-key check reads one of the entries and this another: a key of one
        # tenant would act for the other.
        raise StatusError(
            StatusCode.INVALID_ARGUMENT,
            f"{len(named)} '{TENANT_METADATA_KEY}' metadata entries: send exactly one",
        )
    tenant = named[0]
    if not TENANT_ID_PATTERN.fullmatch(tenant):
        raise StatusError(StatusCode.INVALID_ARGUMENT, f"malformed tenant id {tenant!r}")
    if tenant not in served:
        raise StatusError(StatusCode.PERMISSION_DENIED, f"unknown tenant {tenant!r}")
    return tenant


def tenant_of(context: grpc.aio.ServicerContext[Any, Any], served: Collection[str]) -> str:
    return tenant_from_metadata(context.invocation_metadata(), served)
