"""The NATS accounts configuration rendered from the tenant registry, and its check.

One account per tenant (named by the tenant id) with JetStream limits and two users,
plus the system account. Permissions are allow-lists, so anything not listed is
denied; they name the tenant's own subjects and streams (from
:mod:`tickmesh.runtime.subjects`), never ``>``. The account is what keeps tenants
apart: a user of one account cannot reach another account's subjects or JetStream
API whatever its permissions, and no account exports or imports anything. The
permissions inside an account are least privilege on top of that: neither user may
delete or purge a stream, the service user may update only the event stream (its byte
limit), and the executor user may not read any stream but the work queue it consumes
(RELIABILITY §0.5: holding ``$JS.API.CONSUMER.>`` reads any stream, so consumer creation
is granted per stream).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tickmesh.sdk import ConfigError

from ..embedded_nats import nats_server_path
from ..subjects import TenantNames
from .registry import (
    EXECUTOR,
    KV_STREAM_PREFIX,
    REGISTRY_FILE,
    SERVICE,
    SYSTEM_ACCOUNT,
    SYSTEM_USER,
    Registry,
    Tenant,
    TenantDirectory,
    format_size,
    tenant_streams,
    write_atomic,
)

EXECUTOR_INBOX_PREFIX: Final = "_INBOX.executor"
"""The executor user's reply subjects (nats-py ``inbox_prefix``). It may subscribe to
these only: with all of ``_INBOX.>`` it could read the replies the service user gets,
which carry the records and KV values it is not allowed to read."""
CHECK_TIMEOUT_S: Final = 30.0

Document = Mapping[str, Any]
"""A NATS configuration as nested mappings and lists; the key ``#`` renders as a comment."""


@dataclass(frozen=True, slots=True)
class Permissions:
    """A user's allow-lists (everything else is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def to_document(self) -> dict[str, Any]:
        return {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": list(self.subscribe)},
        }


def service_permissions(names: TenantNames) -> Permissions:
    """What the router, state and guardrail services do on their tenant's account.

    Publish anything under ``tm.<tenant>.``; put into the tenant's KV buckets; create
    (if missing) and read the tenant's streams and buckets, create and read consumers
    on them, pull and acknowledge; update the event stream, whose byte limit follows the
    account's storage (an update cannot lift ``deny_delete`` or ``deny_purge``);
    subscribe to cancellations and to lifetimes' live events (a watch). Not
    granted: updating any other stream (a republish or source added to the record stream
    would copy records out), stream delete and purge, consumer delete, or any stream not
    named here.
    """
    buckets = (names.router_bucket, names.policy_bucket)
    publish = [
        f"{names.root}.>",
        *(f"$KV.{bucket}.>" for bucket in buckets),
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
    ]
    for stream in tenant_streams(names):
        publish += [
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.*",
            f"$JS.API.CONSUMER.INFO.{stream}.*",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    publish.append(f"$JS.API.STREAM.UPDATE.{names.evt_stream}")
    subscribe = ["_INBOX.>", f"{names.root}.ctl.>", names.evt_all]
    return Permissions(tuple(publish), tuple(subscribe))


def executor_permissions(names: TenantNames) -> Permissions:
    """What the executor pool does: take work, publish results, hear cancellations.

    It creates its durable consumers on the work stream only (filtered to work
    subjects), pulls and acknowledges them, publishes execution records and dead
    letters, and subscribes to cancellations and its own reply subjects. It cannot
    read or consume the execution, ref, event or dead-letter streams, touch the KV
    buckets, create, delete or purge streams, or delete consumers.
    """
    work = names.work_stream
    publish = [
        names.exec_all,
        names.dlq_all,
        f"$JS.API.CONSUMER.DURABLE.CREATE.{work}.*",
        f"$JS.API.CONSUMER.CREATE.{work}.*.{names.work_all}",
        f"$JS.API.CONSUMER.INFO.{work}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{work}.*",
        f"$JS.ACK.{work}.>",
    ]
    subscribe = [f"{EXECUTOR_INBOX_PREFIX}.>", names.cancel]
    return Permissions(tuple(publish), tuple(subscribe))


def system_permissions() -> Permissions:
    """The system account's admin user: server pings, reloads and account reports, and
    purging a deleted tenant's JetStream data."""
    publish = (
        "$SYS.REQ.SERVER.PING",
        "$SYS.REQ.SERVER.PING.*",
        "$SYS.REQ.SERVER.*.*",
        "$SYS.REQ.ACCOUNT.*.*",
        "$JS.API.ACCOUNT.PURGE.*",
    )
    return Permissions(publish, ("_INBOX.>",))


def _tenant_account(tenant: Tenant) -> dict[str, Any]:
    names = tenant.names
    limits = tenant.limits
    jetstream = {
        "max_memory": limits.max_memory,
        "max_file": limits.max_storage,
        "max_streams": limits.max_streams,
        "max_consumers": limits.max_consumers,
    }
    if tenant.disabled:
        users: list[Any] = []
        comment = "disabled: no user may connect; its streams are kept"
    else:
        roles = (
            (
                SERVICE,
                "router, state and guardrail services",
                service_permissions(names),
            ),
            (
                EXECUTOR,
                f"executor pool, inbox prefix {EXECUTOR_INBOX_PREFIX}",
                executor_permissions(names),
            ),
        )
        users = []
        for role, what, permissions in roles:
            users.append(
                {
                    "#": f"{role}: {what} (creds/{tenant.id}/{role}.nk)",
                    "nkey": tenant.users[role],
                    "permissions": permissions.to_document(),
                }
            )
            previous = tenant.previous.get(role)
            if previous is not None:
                # The key a pending rotation replaced: the same user, until the rotation
                # is finished, so connections made with the old seed keep working.
                users.append(
                    {
                        "#": f"{role}, previous key (rotated {previous.since or 'earlier'}; "
                        f"removed by `tickmesh tenant rotate --finish {tenant.id}`)",
                        "nkey": previous.nkey,
                        "permissions": permissions.to_document(),
                    }
                )
        comment = (
            f"{format_size(limits.max_storage)} on disk, {format_size(limits.max_memory)} in "
            f"memory, {limits.max_streams} streams, {limits.max_consumers} consumers"
        )
    return {"#": f"tenant {tenant.id}: {comment}", "jetstream": jetstream, "users": users}


def render_document(registry: Registry) -> dict[str, Any]:
    """The accounts configuration as data (see :data:`Document`)."""
    accounts: dict[str, Any] = {
        SYSTEM_ACCOUNT: {
            "users": [
                {
                    "#": f"{SYSTEM_USER}: tickmesh tenant (creds/_system/{SYSTEM_USER}.nk)",
                    "nkey": registry.system_key,
                    "permissions": system_permissions().to_document(),
                }
            ]
        }
    }
    for tenant_id in sorted(registry.tenants):
        accounts[tenant_id] = _tenant_account(registry.tenants[tenant_id])
    return {"accounts": accounts, "system_account": SYSTEM_ACCOUNT}


HEADER: Final = f"""\
# NATS accounts of the tickmesh tenants: rendered by `tickmesh tenant` from {REGISTRY_FILE}.
# Do not edit: change the registry with `tickmesh tenant ...` and this file is rendered again.
# Include it in nats-server.conf (`include accounts.conf`) and reload the server.
# One account per tenant, with JetStream limits (max_file is storage on disk) and two
# users authenticated by NKey; no account exports or imports anything.
"""


def render(registry: Registry) -> str:
    """The accounts configuration file for ``registry``: deterministic (same registry,
    same bytes), so the rendered file can be kept in version control and diffed."""
    return HEADER + "\n" + format_document(render_document(registry))


def format_document(document: Document) -> str:
    """Write nested mappings, lists, strings and integers in nats-server's config syntax.

    Strings are always quoted (an unquoted ``$`` would be a variable reference), and
    a ``#`` key becomes a comment line.
    """
    lines: list[str] = []
    _format_mapping(document, 0, lines)
    return "\n".join(lines) + "\n"


def _format_mapping(mapping: Document, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for key, value in mapping.items():
        if key == "#":
            lines.append(f"{pad}# {value}")
            continue
        name = key if key.replace("_", "a").isalnum() and not key[0].isdigit() else _quote(key)
        if isinstance(value, Mapping):
            lines.append(f"{pad}{name} {{")
            _format_mapping(value, depth + 1, lines)
            lines.append(f"{pad}}}")
        elif isinstance(value, list):
            _format_list(name, value, depth, lines)
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")


def _format_list(name: str, items: Sequence[Any], depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    if not items:
        lines.append(f"{pad}{name}: []")
        return
    lines.append(f"{pad}{name}: [")
    for item in items:
        if isinstance(item, Mapping):
            lines.append(f"{pad}  {{")
            _format_mapping(item, depth + 2, lines)
            lines.append(f"{pad}  }}")
        else:
            lines.append(f"{pad}  {_scalar(item)}")
    lines.append(f"{pad}]")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"cannot render {value!r} in a NATS config")


def _quote(text: str) -> str:
    return json.dumps(text)


def check_config(text: str, *, label: str = "accounts.conf") -> None:
    """Check an accounts configuration with ``nats-server -t``, as included by a server
    with JetStream enabled.

    Raises:
        ConfigError: nats-server rejects it (its message, with line and column, is in
            the error; paths name ``label``), or nats-server cannot be run.
    """
    with tempfile.TemporaryDirectory(prefix="tickmesh-accounts-") as tmp:
        directory = Path(tmp)
        (directory / "accounts.conf").write_text(text)
        store = json.dumps((directory / "js").as_posix())
        (directory / "server.conf").write_text(
            f"host: 127.0.0.1\nport: -1\njetstream {{ store_dir: {store} }}\n"
            "include accounts.conf\n"
        )
        output = _nats_server_check(directory / "server.conf")
    if output is not None:
        output = output.replace(str(directory / "accounts.conf"), label)
        output = output.replace(str(directory) + "/", "")
        raise ConfigError(f"nats-server rejects the accounts configuration {label}: {output}")


def commit(
    directory: TenantDirectory,
    registry: Registry,
    *,
    server_config: Path | None = None,
    out: Path | None = None,
) -> Path:
    """Render ``registry``, check it, write it, then save the registry.

    Nothing is written unless nats-server accepts the rendered file. With
    ``server_config``, the server's own configuration (which includes the file) is
    checked too, and the previous file is put back if it fails. ``out`` writes the
    rendered file elsewhere and leaves the directory as it is. Returns the path written.

    Raises:
        ConfigError: nats-server rejects the configuration.
    """
    target = out or directory.accounts_path
    text = render(registry)
    check_config(text, label=str(target))
    previous = target.read_text() if target.is_file() else None
    write_atomic(target, text)
    if server_config is not None:
        try:
            check_server_config(server_config)
        except ConfigError:
            if previous is None:
                target.unlink()
            else:
                write_atomic(target, previous)
            raise
    if out is None:
        directory.save(registry)
    return target


def check_server_config(path: Path) -> None:
    """Check a server's whole configuration (which includes the rendered accounts).

    Raises:
        ConfigError: nats-server rejects it, or nats-server cannot be run.
    """
    output = _nats_server_check(path)
    if output is not None:
        raise ConfigError(f"nats-server rejects the server configuration {path}: {output}")


def _nats_server_check(config: Path) -> str | None:
    """nats-server's complaint about ``config``, or None when it is valid."""
    try:
        result = subprocess.run(
            [str(nats_server_path()), "-t", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot run nats-server to check {config}: {exc}") from exc
    if result.returncode == 0:
        return None
    text = (result.stderr + result.stdout).strip()
    return text.removeprefix("nats-server: ") or f"exit status {result.returncode}"


__all__ = [
    "EXECUTOR_INBOX_PREFIX",
    "KV_STREAM_PREFIX",
    "Permissions",
    "check_config",
    "check_server_config",
    "commit",
    "executor_permissions",
    "format_document",
    "render",
    "render_document",
    "service_permissions",
    "system_permissions",
]
