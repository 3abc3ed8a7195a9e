"""A nats-server configured with rendered tenant accounts, and clients that log in as
a tenant's users.

``start_accounts_server`` registers tenants in a tenant directory, renders its
``accounts.conf`` (optionally with test-only "probe" users that hold no permissions,
to show what the account boundary alone does), and starts a server that includes it.
:class:`Login` is a plain nats-py connection that records the errors the server sends,
so a test can assert the exact permission violation an attempt produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from tests.support.nats_configs import NatsServerProcess, NatsServers, new_user_nkey, server_config
from tests.support.ports import free_port
from tickmesh.cli.main import main
from tickmesh.runtime.tenancy import Limits, Registry, Tenant, TenantDirectory, render_document
from tickmesh.runtime.tenancy.accounts import HEADER, format_document
from tickmesh.runtime.tenancy.provision import provision_streams
from tickmesh.runtime.tenancy.registry import ROLES, now_iso, write_atomic

PROBE = "probe"
VIOLATION_WAIT_S = 2.0
DENIED_REQUEST_TIMEOUT_S = 0.5
"""A request the server drops for a permission violation gets no answer: this long."""


def register(directory: TenantDirectory, limits: Mapping[str, Limits]) -> Registry:
    """Add tenants (id -> limits) to the directory's registry, generating their users."""
    registry = directory.load_or_init()
    for tenant_id, tenant_limits in limits.items():
        users = {role: directory.new_user(tenant_id, role) for role in ROLES}
        registry = registry.with_tenant(Tenant(tenant_id, tenant_limits, users, now_iso()))
    directory.save(registry)
    return registry


def render_with_probes(registry: Registry, probes: Mapping[str, str]) -> str:
    """The rendered accounts config plus, in each given tenant's account, a user (public
    NKey) with no permissions block: it may use everything its account has."""
    document = render_document(registry)
    for tenant_id, public_key in probes.items():
        document["accounts"][tenant_id]["users"].append(
            {"#": "test probe: no permissions, only the account's boundary", "nkey": public_key}
        )
    return HEADER + "\n" + format_document(document)


@dataclass
class AccountsServer:
    """A running server whose accounts come from a tenant directory."""

    directory: TenantDirectory
    process: NatsServerProcess
    http_port: int
    probe_seeds: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def seed(self, tenant: str, role: str) -> Path:
        return self.directory.seed_path(tenant, role)

    def violations(self) -> list[str]:
        """Permission violations the server logged."""
        return [line for line in self.process.log().splitlines() if "Violation" in line]


def start_accounts_server(
    servers: NatsServers,
    root: Path,
    limits: Mapping[str, Limits],
    *,
    probes: tuple[str, ...] = (),
    extra_blocks: tuple[str, ...] = (),
) -> AccountsServer:
    """Register ``limits``' tenants in ``tenants/`` next to the server's config, render
    the accounts (with a probe user in each of ``probes``' accounts) and start a server
    (JetStream store under ``root``) that includes them."""
    directory = TenantDirectory(servers.directory / "tenants")
    registry = register(directory, limits)
    probe_keys = {tenant: new_user_nkey() for tenant in probes}
    write_atomic(
        directory.accounts_path,
        render_with_probes(registry, {t: k.public_key for t, k in probe_keys.items()}),
    )
    process, http_port = start_including(servers, root, extra_blocks=extra_blocks)
    return AccountsServer(directory, process, http_port, {t: k.seed for t, k in probe_keys.items()})


def start_including(
    servers: NatsServers, root: Path, *, extra_blocks: tuple[str, ...] = ()
) -> tuple[NatsServerProcess, int]:
    """A server (JetStream store under ``root``, monitoring on a free port) whose config
    includes ``tenants/accounts.conf`` next to it; returns it and its monitoring port."""
    http_port = free_port()
    config = server_config(
        "accounts",
        jetstream_dir=root / "js",
        blocks=(f"http: 127.0.0.1:{http_port}", "include tenants/accounts.conf", *extra_blocks),
    )
    return servers.start("accounts", config), http_port


class Login:
    """A connection as one user that keeps every error the server sent it."""

    def __init__(self) -> None:
        self.nc = NatsClient()
        self.errors: list[str] = []

    async def connect(self, url: str, **options: Any) -> Login:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        await self.nc.connect(
            servers=[url],
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=2,
            **options,
        )
        return self

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream(timeout=2)

    async def violation(self, kind: str, subject: str) -> str:
        """Wait for the server's ``Permissions Violation for <kind> to "<subject>"``.

        ``kind`` is ``Publish`` or ``Subscription``. Returns the error text.
        """
        pattern = re.compile(
            rf'permissions violation for {kind} to "{re.escape(subject)}"', re.IGNORECASE
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VIOLATION_WAIT_S
        while True:
            for error in self.errors:
                if pattern.search(error):
                    return error
            if loop.time() >= deadline:
                raise AssertionError(
                    f"no permission violation for {kind} to {subject!r}; errors: {self.errors}"
                )
            await asyncio.sleep(0.02)

    async def denied_requests(self, subjects: Sequence[str], payload: bytes = b"{}") -> None:
        """Requests the server must refuse to forward (sent together): each gets no
        answer and a publish violation for its subject."""
        answers = await asyncio.gather(
            *(
                self.nc.request(subject, payload, timeout=DENIED_REQUEST_TIMEOUT_S)
                for subject in subjects
            ),
            return_exceptions=True,
        )
        for subject, answer in zip(subjects, answers, strict=True):
            if not isinstance(answer, NatsTimeoutError):
                raise AssertionError(f"{subject} was not refused: {answer!r}")
            await self.violation("Publish", subject)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()


@contextlib.asynccontextmanager
async def login(url: str, **options: Any) -> AsyncIterator[Login]:
    """``async with login(url, nkeys_seed=...) as user:``"""
    user = Login()
    await user.connect(url, **options)
    try:
        yield user
    finally:
        await user.close()


async def provision(server: AccountsServer, tenant: str) -> None:
    """Create the tenant's streams and buckets as its service user (as `tenant create` does)."""
    nc = await nats.connect(
        server.url, nkeys_seed=str(server.seed(tenant, "service")), allow_reconnect=False
    )
    try:
        await provision_streams(nc.jetstream(timeout=5), tenant)
    finally:
        await nc.close()


@dataclass(frozen=True, slots=True)
class CliResult:
    code: int
    out: str
    err: str


async def tenant_cli(*argv: str) -> CliResult:
    """Run ``tickmesh tenant ARGV`` through the CLI's ``main`` (in a thread: it runs its
    own event loop), capturing what it prints."""

    def run() -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["tenant", *argv], out=out)
        return CliResult(code, out.getvalue(), err.getvalue())

    return await asyncio.to_thread(run)


async def jsz_accounts(monitor_url: str) -> dict[str, list[str]]:
    """Account name -> its stream names, from the monitoring endpoint's /jsz."""

    def fetch() -> Any:
        url = f"{monitor_url}/jsz?accounts=true&streams=true"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    report = await asyncio.to_thread(fetch)
    return {
        account["name"]: sorted(stream["name"] for stream in account.get("stream_detail") or [])
        for account in report.get("account_details") or []
    }
