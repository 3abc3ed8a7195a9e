"""PostgreSQL servers for tests: a throwaway cluster from the local binaries, or an external one.

The session's server is a fresh cluster (``initdb`` + ``pg_ctl``) in a temporary
folder, listening on a free loopback port with trust authentication and
``fsync=on``; each test that needs a database gets its own (``postgres_dsn``).
Without the binaries, ``TICKMESH_TEST_POSTGRES_URL`` names a server to use
instead; with neither, the fixtures fail (never skip) and say how to get one.

A test that stops or restarts PostgreSQL starts a *dedicated* cluster
(``start_postgres``), so it never disturbs the others. PostgreSQL refuses to run
as root: as root, every command runs as the ``postgres`` OS user (``runuser``).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support.ports import free_port

ENV_URL = "TICKMESH_TEST_POSTGRES_URL"
"""Names a server to use when the PostgreSQL binaries are not installed."""

StopMode = Literal["smart", "fast", "immediate"]

_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_OS_USER = "postgres"
_START_TIMEOUT_S = 30
_HOW_TO_GET_ONE = (
    "install PostgreSQL (initdb and pg_ctl on PATH or under /usr/lib/postgresql/<version>/bin, "
    f"e.g. apt-get install postgresql), or set {ENV_URL}="
    "postgresql://user:password@host:port/postgres to a server where that user may create "
    "databases"
)


class PostgresStartError(RuntimeError):
    """A throwaway cluster could not be created or started (the message has the log)."""


def postgres_bindir() -> Path | None:
    """The folder with ``initdb`` and ``pg_ctl``: PATH first, then the newest Debian one."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _check_database_name(name: str) -> None:
    if _DATABASE_NAME.fullmatch(name) is None:
        raise ValueError(f"database names here are lowercase identifiers, not {name!r}")


class PostgresServer:
    """One PostgreSQL server: a throwaway cluster this process owns, or an external one.

    Example:
        server = PostgresServer.throwaway(postgres_bindir())
        server.start()
        dsn = await server.create_database("scratch")
        ...
        server.cleanup()
    """

    def __init__(self, url: str, *, bindir: Path | None = None, base: Path | None = None) -> None:
        """Use :meth:`throwaway` or :meth:`external`."""
        self._url = url
        self._bindir = bindir
        self._base = base
        self._running = bindir is None  # an external server is someone else's to run
        self.started_in_s = 0.0
        """How long the last :meth:`start` took (initdb included the first time)."""

    @classmethod
    def throwaway(cls, bindir: Path) -> PostgresServer:
        """A new, not yet started cluster in a fresh temporary folder on a free port.

        The folder is made under the system's temporary directory rather than
        pytest's, whose per-user 0700 folders the ``postgres`` user cannot enter.
        """
        base = Path(tempfile.mkdtemp(prefix="tickmesh-pg-"))
        # No TLS on a throwaway cluster: sslmode=disable also spares asyncpg's TLS probe.
        url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?sslmode=disable"
        return cls(url, bindir=bindir, base=base)

    @classmethod
    def external(cls, url: str) -> PostgresServer:
        """A server someone else runs; ``url`` names a database to connect to for admin work."""
        return cls(url)

    @property
    def url(self) -> str:
        """The maintenance database's URL (where databases are created and dropped)."""
        return self._url

    @property
    def owned(self) -> bool:
        """True for a throwaway cluster (it can be stopped and restarted)."""
        return self._bindir is not None

    @property
    def running(self) -> bool:
        return self._running

    @property
    def port(self) -> int:
        return urlsplit(self._url).port or 5432

    @property
    def data_dir(self) -> Path:
        return self._owned_base() / "data"

    @property
    def log_path(self) -> Path:
        return self._owned_base() / "server.log"

    def dsn_for(self, database: str) -> str:
        """The URL of ``database`` on this server."""
        return urlunsplit(urlsplit(self._url)._replace(path=f"/{database}"))

    # -- lifecycle (throwaway clusters only) --------------------------------------------

    def start(self) -> None:
        """Start the cluster (creating it the first time); keeps data and port across stops.

        Raises:
            PostgresStartError: initdb or pg_ctl failed; the message has the server's log.
        """
        if not self.owned:
            self._check_reachable()
            return
        if self._running:
            return
        started = time.monotonic()
        first = not (self.data_dir / "PG_VERSION").exists()
        if first:
            self._initdb()
        for tries_left in reversed(range(3)):
            try:
                self._pg_ctl("start", "-w", "-t", str(_START_TIMEOUT_S), "-l", str(self.log_path))
                break
            except PostgresStartError as exc:
                # The free port was taken between picking and binding: pick another.
                if not first or not tries_left or "Address already in use" not in str(exc):
                    raise
                self._set_port(free_port())
        self._running = True
        self.started_in_s = time.monotonic() - started

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the cluster: ``fast`` ends sessions cleanly, ``immediate`` is a crash."""
        self._owned_base()
        if not self._running:
            return
        self._pg_ctl("stop", "-w", "-t", str(_START_TIMEOUT_S), "-m", mode)
        self._running = False

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop and start again on the same data and port."""
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        """Stop a throwaway cluster and delete its folder (an external server is left alone)."""
        if not self.owned:
            return
        with contextlib.suppress(PostgresStartError):
            self.stop("immediate")
        shutil.rmtree(self._owned_base(), ignore_errors=True)

    def _owned_base(self) -> Path:
        if self._base is None:
            raise RuntimeError(
                f"{self._url} is an external server ({ENV_URL}): tests cannot stop or "
                "restart it; this test needs the PostgreSQL binaries"
            )
        return self._base

    def _command(self, tool: str, *args: str) -> list[str]:
        assert self._bindir is not None
        command = [str(self._bindir / tool), *args]
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root.
            return ["runuser", "-u", _OS_USER, "--", *command]
        return command

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            self._command(tool, *args), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise PostgresStartError(
                f"{tool} {' '.join(args[:1])} failed ({result.returncode}):"
                f" {result.stderr.strip() or result.stdout.strip()}\n{log[-2000:]}"
            )

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run("pg_ctl", action, "-D", str(self.data_dir), *args)

    def _initdb(self) -> None:
        base = self._owned_base()
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(_OS_USER)
            except KeyError:
                raise PostgresStartError(
                    f"running as root needs the {_OS_USER!r} OS user to run PostgreSQL as"
                ) from None
            os.chown(base, user.pw_uid, user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",  # trust on the local socket and loopback only: initdb's pg_hba.conf
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",  # a throwaway cluster; the server itself runs with fsync=on
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            # Inside the data folder: short, private, and never /var/run/postgresql.
            "unix_socket_directories": f"'{self.data_dir}'",
            "fsync": "on",
            "max_connections": "200",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# tickmesh test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._set_port(self.port)

    def _set_port(self, port: int) -> None:
        """Listen on ``port`` from the next start (the last setting in the file wins)."""
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {port}\n")
        parts = urlsplit(self._url)
        self._url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))

    def _check_reachable(self) -> None:
        parts = urlsplit(self._url)
        host, port = parts.hostname or "localhost", parts.port or 5432
        try:
            with socket.create_connection((host, port), timeout=3):
                pass
        except OSError as exc:
            raise PostgresStartError(f"{ENV_URL} names {host}:{port}, unreachable: {exc}") from exc

    # -- databases ----------------------------------------------------------------------

    async def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its URL."""
        _check_database_name(name)
        conn = await asyncpg.connect(self._url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.dsn_for(name)

    async def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, ending any sessions still connected to it."""
        _check_database_name(name)
        conn = await asyncpg.connect(self._url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def unique_database_name(prefix: str = "tm") -> str:
    """A fresh database name."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def _session_server() -> PostgresServer:
    """The binaries' throwaway cluster, else the env URL's server, else a failed test."""
    tried: list[str] = []
    bindir = postgres_bindir()
    if bindir is not None:
        server = PostgresServer.throwaway(bindir)
        try:
            server.start()
        except PostgresStartError as exc:
            server.cleanup()
            tried.append(f"the binaries in {bindir}: {exc}")
        else:
            return server
    else:
        tried.append("no initdb/pg_ctl found on PATH or under /usr/lib/postgresql/*/bin")
    url = os.environ.get(ENV_URL)
    if url:
        server = PostgresServer.external(url)
        try:
            server.start()
        except PostgresStartError as exc:
            tried.append(str(exc))
        else:
            return server
    else:
        tried.append(f"{ENV_URL} is not set")
    pytest.fail(
        f"these tests need PostgreSQL: {_HOW_TO_GET_ONE}. Tried: " + "; ".join(tried),
        pytrace=False,
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; tests isolate by database (``postgres_dsn``)."""
    server = _session_server()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def postgres_dsn(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    name = unique_database_name()
    dsn = await postgres_server.create_database(name)
    try:
        yield dsn
    finally:
        await postgres_server.drop_database(name)


PostgresFactory = Callable[[], PostgresServer]


@pytest.fixture
def start_postgres() -> Iterator[PostgresFactory]:
    """``start_postgres()`` -> a started cluster of the test's own, free to stop and restart."""
    servers: list[PostgresServer] = []

    def start() -> PostgresServer:
        bindir = postgres_bindir()
        if bindir is None:
            pytest.fail(
                "this test stops and restarts PostgreSQL, so it needs a server of its own: "
                "install PostgreSQL (initdb and pg_ctl on PATH or under "
                "/usr/lib/postgresql/<version>/bin); an external server will not do",
                pytrace=False,
            )
        server = PostgresServer.throwaway(bindir)
        servers.append(server)
        try:
            server.start()
        except PostgresStartError as exc:
            pytest.fail(f"could not start a PostgreSQL cluster as {getpass.getuser()}: {exc}")
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.cleanup()


__all__ = [
    "ENV_URL",
    "PostgresFactory",
    "PostgresServer",
    "PostgresStartError",
    "postgres_bindir",
    "postgres_dsn",
    "postgres_server",
    "start_postgres",
    "unique_database_name",
]
