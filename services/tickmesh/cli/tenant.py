"""`tickmesh tenant ...`: provision tenants as NATS accounts.

tickmesh tenant create TENANT [--max-memory S] [--max-storage S] [--max-streams N]
                              [--max-consumers N] [--replicas N]
tickmesh tenant list [--json]
tickmesh tenant limits TENANT [--max-memory S] [--max-storage S] [--max-streams N]
                              [--max-consumers N]
tickmesh tenant disable|enable TENANT
tickmesh tenant delete TENANT [--force]
tickmesh tenant rotate TENANT [--role service|executor|all]
tickmesh tenant rotate --finish TENANT [--role service|executor|all] [--force]
tickmesh tenant render [--out FILE]

Every command takes ``--dir`` (the tenant directory: registry, rendered
``accounts.conf``, NKey seeds) and ``--server-config`` (the nats-server config that
includes ``accounts.conf``, checked with ``nats-server -t`` after rendering). With
``--nats-url``, a command also acts on the running NATS through the system account:
it checks that the limits fit the servers' JetStream, reloads every server, creates
the tenant's streams (``create``), reads back the applied limits, finds out
whether a tenant's streams hold data (``delete``, ``list``), and which connections
still use a key being rotated out (``rotate --finish``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import nats.errors

from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.lifecycle import nats_tls
from tickmesh.runtime.settings import DEFAULT_DATA_DIR, ServiceSettings
from tickmesh.runtime.subjects import check_tenant
from tickmesh.runtime.tenancy import (
    EXECUTOR,
    EXECUTOR_INBOX_PREFIX,
    SERVICE,
    Limits,
    Registry,
    Tenant,
    TenantDirectory,
    commit,
    format_size,
    parse_size,
)
from tickmesh.runtime.tenancy.provision import (
    Connection,
    NatsAccess,
    StreamUsage,
    SystemAccount,
    check_capacity,
    connected,
    fit_event_limit,
    provision_streams,
    verify_limits,
)
from tickmesh.runtime.tenancy.registry import ROLES, now_iso
from tickmesh.sdk import ConfigError, TransportError, ValidationError

DEFAULT_DIR = DEFAULT_DATA_DIR / "tenants"
PURGE_WAIT_S = 10.0
ALL_ROLES = "all"
MAX_REPLICAS = 5
"""JetStream's most replicas of a stream."""


# argparse turns only ArgumentTypeError, TypeError and ValueError into a usage error
# (exit 2); anything else a type raises escapes as a traceback.
def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _replicas_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_REPLICAS}, got {value}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """Register ``tenant`` and its actions on the command's subparsers."""
    tenant = sub.add_parser("tenant", help="provision tenants as NATS accounts")
    actions = tenant.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)

    create = actions.add_parser(
        "create", help="add a tenant: its account, users and (with --nats-url) streams"
    )
    create.add_argument("tenant")
    _limit_args(create)
    create.add_argument(
        "--replicas",
        type=_replicas_arg,
        default=1,
        help=f"JetStream replicas of the tenant's streams (1 to {MAX_REPLICAS})",
    )
    _common_args(create)

    listing = actions.add_parser("list", help="list the tenants and their limits")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    _common_args(listing)

    limits = actions.add_parser("limits", help="show or change a tenant's JetStream limits")
    limits.add_argument("tenant")
    _limit_args(limits)
    _common_args(limits)

    for name, text in (
        ("disable", "refuse every login of a tenant's users (its data is kept)"),
        ("enable", "let a disabled tenant's users log in again"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("tenant")
        _common_args(action)

    delete = actions.add_parser(
        "delete", help="remove a tenant (refused while its streams hold data, unless --force)"
    )
    delete.add_argument("tenant")
    delete.add_argument(
        "--force", action="store_true", help="delete the tenant's streams and what they hold"
    )
    _common_args(delete)

    rotate = actions.add_parser(
        "rotate",
        help="give a tenant's users new NKeys; the previous ones stay authorised until --finish",
    )
    rotate.add_argument("tenant")
    rotate.add_argument(
        "--role",
        choices=(*ROLES, ALL_ROLES),
        default=ALL_ROLES,
        help="the user whose key is rotated (default: both)",
    )
    rotate.add_argument(
        "--finish",
        action="store_true",
        help="end a pending rotation: remove the previous keys (their connections are closed)",
    )
    rotate.add_argument(
        "--force",
        action="store_true",
        help="with --finish: even while connections still use a previous key",
    )
    _common_args(rotate)

    render = actions.add_parser("render", help="render and check accounts.conf again")
    render.add_argument(
        "--out", type=Path, help="write the rendered file here instead (the directory is kept)"
    )
    _common_args(render)


def _limit_args(parser: argparse.ArgumentParser) -> None:
    defaults = Limits()
    parser.add_argument(
        "--max-memory",
        type=_size_arg,
        help=f"memory-backed stream bytes (default {format_size(defaults.max_memory)}; "
        "units are binary: 64MB = 64MiB)",
    )
    parser.add_argument(
        "--max-storage",
        type=_size_arg,
        help=f"file-backed stream bytes (default {format_size(defaults.max_storage)})",
    )
    parser.add_argument("--max-streams", type=int, help=f"streams (default {defaults.max_streams})")
    parser.add_argument(
        "--max-consumers", type=int, help=f"consumers (default {defaults.max_consumers})"
    )


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help=f"the tenant directory: registry, accounts.conf, seeds (default {DEFAULT_DIR})",
    )
    parser.add_argument(
        "--server-config",
        type=Path,
        help="the nats-server config that includes accounts.conf: checked after rendering",
    )
    parser.add_argument(
        "--nats-url", help="act on this NATS too (as the system account's admin user)"
    )
    parser.add_argument("--nats-tls-ca", help="CA that signs the NATS servers' certificates")
    parser.add_argument("--nats-tls-cert", help="client certificate for NATS mutual TLS")
    parser.add_argument("--nats-tls-key", help="its key")
    parser.add_argument(
        "--connect-timeout", type=_seconds_arg, default=10.0, help="seconds to wait for NATS"
    )


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run the ``tenant`` action in ``args``; returns the exit code."""
    if args.tenant_command == "render":
        return cmd_render(args, out)
    commands = {
        "create": cmd_create,
        "list": cmd_list,
        "limits": cmd_limits,
        "disable": cmd_disable,
        "enable": cmd_enable,
        "delete": cmd_delete,
        "rotate": cmd_rotate,
    }
    try:
        result: int = asyncio.run(commands[args.tenant_command](args, out))
    except nats.errors.Error as exc:
        raise TransportError(f"NATS: {exc}") from exc
    return result


# --- helpers ------------------------------------------------------------------------


def _access(args: argparse.Namespace) -> NatsAccess:
    # nats_tls reads only the three TLS fields; model_construct skips the settings sources.
    tls = nats_tls(
        ServiceSettings.model_construct(
            nats_tls_ca=args.nats_tls_ca,
            nats_tls_cert=args.nats_tls_cert,
            nats_tls_key=args.nats_tls_key,
        )
    )
    return NatsAccess(url=args.nats_url, tls=tls, connect_timeout_s=args.connect_timeout)


@contextlib.asynccontextmanager
async def _system(
    args: argparse.Namespace, directory: TenantDirectory
) -> AsyncIterator[SystemAccount | None]:
    """The system account's admin, or None without ``--nats-url``."""
    if not args.nats_url:
        yield None
        return
    if not directory.exists():
        raise ConfigError(
            f"{directory.path} has no tenant registry yet, so no NATS server knows its system "
            "account: run `tickmesh tenant render` there, include accounts.conf in the "
            "server's config, (re)start the server, then run this again"
        )
    async with connected(_access(args), directory.system_seed_path, "tickmesh tenant") as nc:
        yield SystemAccount(nc)


def _limits(args: argparse.Namespace, base: Limits) -> Limits:
    changes = {
        name: value
        for name in ("max_memory", "max_storage", "max_streams", "max_consumers")
        if (value := getattr(args, name)) is not None
    }
    return replace(base, **changes)


def _limits_given(args: argparse.Namespace) -> bool:
    names = ("max_memory", "max_storage", "max_streams", "max_consumers")
    return any(getattr(args, name) is not None for name in names)


def _describe(limits: Limits) -> str:
    return (
        f"{format_size(limits.max_storage)} on disk, {format_size(limits.max_memory)} in memory, "
        f"{limits.max_streams} streams, {limits.max_consumers} consumers"
    )


def _commit(args: argparse.Namespace, directory: TenantDirectory, registry: Registry) -> Path:
    return commit(directory, registry, server_config=args.server_config)


async def _reload(system: SystemAccount | None, out: TextIO) -> None:
    if system is None:
        print("reload the NATS servers to apply it (nats-server --signal reload)", file=out)
        return
    servers = await system.reload()
    print(f"reloaded NATS server(s): {', '.join(servers)}", file=out)


async def _verify(
    args: argparse.Namespace, directory: TenantDirectory, tenant: Tenant, out: TextIO
) -> None:
    """Read the tenant's limits back as its service user sees them, and fit its event
    stream's byte limit to the storage."""
    seed = directory.seed_path(tenant.id, SERVICE)
    async with connected(_access(args), seed, f"tickmesh tenant {tenant.id}") as nc:
        js = tm_nats.jetstream(nc)
        await verify_limits(js, tenant.id, tenant.limits)
        print(f"the server applies the limits of {tenant.id}", file=out)
        print(f"  events    {await fit_event_limit(js, tenant.id)}", file=out)


# --- create ---------------------------------------------------------------------------


async def cmd_create(args: argparse.Namespace, out: TextIO) -> int:
    tenant_id = check_tenant(args.tenant)
    directory = TenantDirectory(args.dir)
    with directory.locked():
        fresh = not directory.exists()
        async with _system(args, directory) as system:
            registry = directory.load_or_init()
            existing = registry.tenants.get(tenant_id)
            if existing is not None:
                tenant = existing
                if _limits_given(args) and _limits(args, existing.limits) != existing.limits:
                    raise ConfigError(
                        f"tenant {tenant_id} exists with other limits "
                        f"({_describe(existing.limits)}): use `tickmesh tenant limits`"
                    )
                if existing.disabled:
                    raise ConfigError(
                        f"tenant {tenant_id} exists and is disabled: `tickmesh tenant enable`"
                    )
                print(f"tenant {tenant_id} exists; its account is rendered again", file=out)
            else:
                limits = _limits(args, Limits())
                if system is not None:
                    check_capacity(
                        registry.with_tenant(_placeholder(tenant_id, limits)),
                        await system.capacity(),
                    )
                users = {role: directory.new_user(tenant_id, role) for role in ROLES}
                tenant = Tenant(tenant_id, limits, users, created=now_iso())
            try:
                path = _commit(args, directory, registry.with_tenant(tenant))
            except BaseException:
                if existing is None:
                    directory.remove_seeds(tenant_id)
                raise
            if existing is None:
                print(f"tenant {tenant_id} created: account {tenant_id}", file=out)
            print(f"  limits    {_describe(tenant.limits)}", file=out)
            for role, text in (
                (SERVICE, "router, state, guardrail (nats_nkey_seed)"),
                (EXECUTOR, f"executor pool (nats_nkey_seed, inbox prefix {EXECUTOR_INBOX_PREFIX})"),
            ):
                seed = directory.seed_path(tenant_id, role)
                print(f"  {role:<9} {tenant.users[role]}  seed {seed}: {text}", file=out)
            print(f"  rendered  {path} (nats-server -t: valid)", file=out)
            if fresh:
                print(
                    f"  system    seed {directory.system_seed_path}: include {path.name} in the "
                    "server's config and restart it; later commands reload it with --nats-url",
                    file=out,
                )
            if system is None:
                if not fresh:
                    await _reload(None, out)
                print(
                    "the tenant's streams are created by its services when they start, or by "
                    "`tickmesh tenant create` again with --nats-url",
                    file=out,
                )
                return 0
            await _reload(system, out)
            seed = directory.seed_path(tenant_id, SERVICE)
            async with connected(_access(args), seed, f"tickmesh tenant {tenant_id}") as nc:
                js = tm_nats.jetstream(nc)
                await verify_limits(js, tenant_id, tenant.limits)
                result = await provision_streams(js, tenant_id, replicas=args.replicas)
            if result.created:
                print(f"  created   {', '.join(result.created)}", file=out)
            if result.existing:
                print(f"  existing  {', '.join(result.existing)}", file=out)
            if result.without_deny_purge:
                print(
                    f"  warning   {', '.join(result.without_deny_purge)} predate provisioning "
                    "and can be purged (deny_purge is set only when a stream is created)",
                    file=out,
                )
    return 0


def _placeholder(tenant_id: str, limits: Limits) -> Tenant:
    """A tenant with made-up keys: enough to add up limits before keys are generated."""
    key = "U" + "A" * 55
    return Tenant(tenant_id, limits, {role: key for role in ROLES})


# --- list -------------------------------------------------------------------------------


async def cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    directory = TenantDirectory(args.dir)
    registry = directory.load()
    usage: dict[str, list[StreamUsage]] = {}
    async with _system(args, directory) as system:
        if system is not None:
            for tenant_id in registry.tenants:
                usage[tenant_id] = await system.streams(tenant_id)
    tenants = [registry.tenants[t] for t in sorted(registry.tenants)]
    if args.json:
        rows = []
        for tenant in tenants:
            row: dict[str, Any] = {"tenant": tenant.id, **tenant.to_json()}
            if tenant.id in usage:
                row["streams"] = {
                    s.name: {"messages": s.messages, "bytes": s.bytes} for s in usage[tenant.id]
                }
            rows.append(row)
        print(json.dumps(rows, indent=2), file=out)
        return 0
    header = [
        "TENANT",
        "STATE",
        "STORAGE",
        "MEMORY",
        "STREAMS",
        "CONSUMERS",
        "CREATED",
        "ROTATING",
    ]
    if usage:
        header += ["USED", "MESSAGES"]
    table = [header]
    for tenant in tenants:
        limits = tenant.limits
        row_text = [
            tenant.id,
            "disabled" if tenant.disabled else "enabled",
            format_size(limits.max_storage),
            format_size(limits.max_memory),
            str(limits.max_streams),
            str(limits.max_consumers),
            tenant.created or "-",
            _rotation(tenant),
        ]
        if usage:
            streams = usage.get(tenant.id, [])
            row_text += [
                format_size(sum(s.bytes for s in streams)),
                str(sum(s.messages for s in streams)),
            ]
        table.append(row_text)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row_text in table:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row_text, widths, strict=True)).rstrip(),
            file=out,
        )
    return 0


def _rotation(tenant: Tenant) -> str:
    """``service,executor since <time>`` for a pending rotation, else ``-``."""
    if not tenant.rotating:
        return "-"
    since = min(tenant.previous[role].since for role in tenant.rotating)
    return ",".join(tenant.rotating) + (f" since {since}" if since else "")


# --- limits -----------------------------------------------------------------------------


async def cmd_limits(args: argparse.Namespace, out: TextIO) -> int:
    tenant_id = check_tenant(args.tenant)
    directory = TenantDirectory(args.dir)
    if not _limits_given(args):
        tenant = directory.load().get(tenant_id)
        print(f"{tenant_id}: {_describe(tenant.limits)}", file=out)
        return 0
    with directory.locked():
        async with _system(args, directory) as system:
            registry = directory.load()
            tenant = registry.get(tenant_id)
            updated = replace(tenant, limits=_limits(args, tenant.limits))
            new = registry.with_tenant(updated)
            if system is not None:
                check_capacity(new, await system.capacity())
            _commit(args, directory, new)
            print(f"{tenant_id}: {_describe(updated.limits)}", file=out)
            await _reload(system, out)
            if system is not None and not updated.disabled:
                await _verify(args, directory, updated, out)
    return 0


# --- disable / enable -------------------------------------------------------------------


async def cmd_disable(args: argparse.Namespace, out: TextIO) -> int:
    return await _set_disabled(args, out, disabled=True)


async def cmd_enable(args: argparse.Namespace, out: TextIO) -> int:
    return await _set_disabled(args, out, disabled=False)


async def _set_disabled(args: argparse.Namespace, out: TextIO, *, disabled: bool) -> int:
    tenant_id = check_tenant(args.tenant)
    directory = TenantDirectory(args.dir)
    with directory.locked():
        async with _system(args, directory) as system:
            registry = directory.load()
            tenant = registry.get(tenant_id)
            word = "disabled" if disabled else "enabled"
            if tenant.disabled == disabled:
                print(f"tenant {tenant_id} is already {word}", file=out)
            else:
                _commit(args, directory, registry.with_tenant(replace(tenant, disabled=disabled)))
                print(
                    f"tenant {tenant_id} {word}: "
                    + (
                        "its users are gone from accounts.conf (connections are closed on reload); "
                        "its streams are kept"
                        if disabled
                        else "its users may log in again"
                    ),
                    file=out,
                )
            await _reload(system, out)
    return 0


# --- delete -------------------------------------------------------------------------------


async def cmd_delete(args: argparse.Namespace, out: TextIO) -> int:
    tenant_id = check_tenant(args.tenant)
    directory = TenantDirectory(args.dir)
    with directory.locked():
        async with _system(args, directory) as system:
            registry = directory.load()
            tenant = registry.get(tenant_id)
            if system is None:
                if not args.force:
                    raise ConfigError(
                        f"without --nats-url there is no telling whether the streams of "
                        f"{tenant_id} hold data: give --nats-url, or --force to remove the "
                        "account anyway"
                    )
                _commit(args, directory, registry.without(tenant_id))
                directory.remove_seeds(tenant_id)
                print(
                    f"tenant {tenant_id} deleted from the registry and accounts.conf; its "
                    f"JetStream data stays on the servers (<store_dir>/jetstream/{tenant_id}) "
                    "until purged",
                    file=out,
                )
                await _reload(None, out)
                return 0
            streams = await system.streams(tenant_id)
            holding = [s for s in streams if s.messages]
            if holding and not args.force:
                held = ", ".join(f"{s.name} {s.messages} message(s)" for s in holding)
                raise ConfigError(
                    f"the streams of tenant {tenant_id} hold data ({held}): "
                    "refusing to delete it; --force deletes the streams too"
                )
            if not tenant.disabled:
                # Nobody may write while the data goes.
                registry = registry.with_tenant(replace(tenant, disabled=True))
                _commit(args, directory, registry)
                await system.reload()
            if streams:
                await system.purge(tenant_id)
                await _wait_purged(system, tenant_id)
                print(
                    f"deleted the streams of {tenant_id}: {', '.join(s.name for s in streams)}",
                    file=out,
                )
            _commit(args, directory, registry.without(tenant_id))
            directory.remove_seeds(tenant_id)
            print(f"tenant {tenant_id} deleted", file=out)
            await _reload(system, out)
    return 0


async def _wait_purged(system: SystemAccount, tenant_id: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PURGE_WAIT_S
    while await system.streams(tenant_id):
        if loop.time() >= deadline:
            raise ConfigError(
                f"the streams of {tenant_id} were still there {PURGE_WAIT_S:g} s after the purge"
            )
        await asyncio.sleep(0.1)


# --- rotate -------------------------------------------------------------------------------


async def cmd_rotate(args: argparse.Namespace, out: TextIO) -> int:
    tenant_id = check_tenant(args.tenant)
    roles: tuple[str, ...] = ROLES if args.role == ALL_ROLES else (args.role,)
    if args.force and not args.finish:
        raise ConfigError("--force goes with --finish")
    directory = TenantDirectory(args.dir)
    with directory.locked():
        async with _system(args, directory) as system:
            registry = directory.load()
            tenant = registry.get(tenant_id)
            if args.finish:
                await _finish_rotation(args, directory, registry, tenant, roles, system, out)
            else:
                await _start_rotation(args, directory, registry, tenant, roles, system, out)
    return 0


async def _start_rotation(
    args: argparse.Namespace,
    directory: TenantDirectory,
    registry: Registry,
    tenant: Tenant,
    roles: tuple[str, ...],
    system: SystemAccount | None,
    out: TextIO,
) -> None:
    tenant_id = tenant.id
    pending = [role for role in roles if role in tenant.previous]
    if pending:
        since = tenant.previous[pending[0]].since or "an unknown time"
        raise ConfigError(
            f"tenant {tenant_id}: a rotation of its {' and '.join(pending)} key is pending "
            f"since {since}; roll the services onto the new seed, then finish it "
            f"(`tickmesh tenant rotate --finish {tenant_id}`) before rotating again"
        )
    since = now_iso()
    rotated = tenant
    staged: list[str] = []
    try:
        for role in roles:
            staged.append(role)
            rotated = rotated.rotated(role, directory.stage_user(tenant_id, role), since)
        _commit(args, directory, registry.with_tenant(rotated))
    except BaseException:
        for role in staged:
            directory.discard_staged(tenant_id, role)
        raise
    print(
        f"tenant {tenant_id}: new keys for {', '.join(roles)}; the previous ones stay "
        "authorised until the rotation is finished",
        file=out,
    )
    try:
        # Reload before the new seeds replace the old ones, so a service restarted from
        # here on is accepted; the seeds are installed even if the reload fails, as the
        # registry and accounts.conf already name the new keys.
        if system is None:
            print(
                "reload the NATS servers (nats-server --signal reload) before restarting any "
                "service: until then they refuse the new keys",
                file=out,
            )
        else:
            await _reload(system, out)
    finally:
        for role in roles:
            directory.install_staged(tenant_id, role)
    for role in roles:
        seed = directory.seed_path(tenant_id, role)
        print(f"  {role:<9} {rotated.users[role]}  seed {seed}", file=out)
        print(f"  {'previous':<9} {rotated.previous[role].nkey}", file=out)
    if system is not None and not rotated.disabled:
        for role in roles:
            seed = directory.seed_path(tenant_id, role)
            async with connected(_access(args), seed, f"tickmesh tenant {tenant_id}"):
                pass
        print(f"the server accepts the new key(s) of {tenant_id}", file=out)
    print(
        "next: hand the new seed(s) to the services and restart them (a rolling restart); "
        f"then `tickmesh tenant rotate --finish {tenant_id}` removes the previous key(s)",
        file=out,
    )


async def _finish_rotation(
    args: argparse.Namespace,
    directory: TenantDirectory,
    registry: Registry,
    tenant: Tenant,
    roles: tuple[str, ...],
    system: SystemAccount | None,
    out: TextIO,
) -> None:
    tenant_id = tenant.id
    finishing = tuple(role for role in roles if role in tenant.previous)
    if not finishing:
        raise ConfigError(
            f"tenant {tenant_id}: no rotation of its {' or '.join(roles)} key is pending"
        )
    previous = {tenant.previous[role].nkey: role for role in finishing}
    if system is not None and not tenant.disabled:
        still = [c for c in await system.connections(tenant_id) if c.user in previous]
        if still and not args.force:
            raise ConfigError(
                f"tenant {tenant_id}: {len(still)} connection(s) still use a previous key "
                f"({_connections(still, previous)}): restart them with the new seed first, "
                "or give --force to close them"
            )
        if still:
            print(f"closing {_connections(still, previous)}", file=out)
    _commit(args, directory, registry.with_tenant(tenant.finished(finishing)))
    print(
        f"tenant {tenant_id}: the previous {' and '.join(finishing)} key(s) are removed; "
        "connections still using them are closed on reload",
        file=out,
    )
    await _reload(system, out)


def _connections(connections: list[Connection], previous: dict[str, str]) -> str:
    shown = [
        f"{previous[c.user]} {c.name or 'unnamed'!r} on {c.server} (cid {c.cid})"
        for c in connections[:10]
    ]
    more = f" and {len(connections) - 10} more" if len(connections) > 10 else ""
    return ", ".join(shown) + more


# --- render -------------------------------------------------------------------------------


def cmd_render(args: argparse.Namespace, out: TextIO) -> int:
    directory = TenantDirectory(args.dir)
    if args.out is not None:
        # Reads the registry only: the directory is left exactly as it is (no lock file).
        registry = directory.load()
        path = commit(directory, registry, server_config=args.server_config, out=args.out)
        print(
            f"rendered {path} ({len(registry.tenants)} tenant(s); nats-server -t: valid)", file=out
        )
        return 0
    with directory.locked():
        fresh = not directory.exists()
        registry = directory.load_or_init()
        path = commit(directory, registry, server_config=args.server_config)
    print(f"rendered {path} ({len(registry.tenants)} tenant(s); nats-server -t: valid)", file=out)
    if fresh:
        print(
            f"new tenant directory {directory.path}: the system account's admin seed is "
            f"{directory.system_seed_path}; include {path.name} in the server's config",
            file=out,
        )
    return 0
