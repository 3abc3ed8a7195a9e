"""Tenant provisioning for a shared NATS: one account per tenant.

A tenant directory (chosen by the operator) holds the registry of tenants
(``tenants.json``), the NATS accounts configuration rendered from it
(``accounts.conf``, included by the server's config) and the users' NKey seeds
(``creds/``). Each tenant is a NATS account with JetStream limits and two users:

* ``service``: the router, state and guardrail services (its tenant's subjects, and
  the JetStream API on its tenant's streams and buckets, without delete or purge);
* ``executor``: the executor pool (takes work from the work stream, publishes
  execution records and dead letters, hears cancellations; nothing else).

The system account holds one ``admin`` user, which ``tickmesh tenant`` uses to
reload the servers, read an account's JetStream usage and purge a deleted tenant's
data. Accounts, not subject permissions, keep tenants apart: no export or import
is rendered, and no user is granted ``>``.

A user's key is rotated with an overlap: while a rotation is pending, the replaced
key (:class:`PreviousKey`) is rendered as a second user with the same permissions,
so connections made with the old seed keep working until the rotation is finished.
"""

from .accounts import (
    EXECUTOR_INBOX_PREFIX,
    Permissions,
    check_config,
    check_server_config,
    commit,
    executor_permissions,
    render,
    render_document,
    service_permissions,
    system_permissions,
)
from .registry import (
    EXECUTOR,
    MIN_CONSUMERS,
    MIN_STREAMS,
    SERVICE,
    SYSTEM_ACCOUNT,
    SYSTEM_USER,
    Limits,
    PreviousKey,
    Registry,
    Tenant,
    TenantDirectory,
    format_size,
    parse_size,
    tenant_streams,
)

__all__ = [
    "EXECUTOR",
    "EXECUTOR_INBOX_PREFIX",
    "MIN_CONSUMERS",
    "MIN_STREAMS",
    "SERVICE",
    "SYSTEM_ACCOUNT",
    "SYSTEM_USER",
    "Limits",
    "Permissions",
    "PreviousKey",
    "Registry",
    "Tenant",
    "TenantDirectory",
    "check_config",
    "check_server_config",
    "commit",
    "executor_permissions",
    "format_size",
    "parse_size",
    "render",
    "render_document",
    "service_permissions",
    "system_permissions",
    "tenant_streams",
]
