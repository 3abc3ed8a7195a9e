"""The cloud profile's servers for the benchmark: PostgreSQL, Redis and an S3 endpoint.

By default each one is a throwaway server on a free loopback port, started for the run and
removed after it, through the test harnesses in ``tests/support``: a fresh ``initdb``
cluster (fsync=on, default synchronous_commit; as root it runs as the ``postgres`` user), a
redis-server without persistence, and moto's S3 server with one bucket. ``--store-url``,
``--redis-url`` and ``--blob-url`` name external servers instead, which the bench only uses.

Each layout gets stores of its own on the throwaway servers: a database, a Redis database
number and a blob prefix. External URLs are used as given, by every layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg
import psutil
import pytest
import redis

from tests.support.postgres import PostgresServer, PostgresStartError, postgres_bindir
from tests.support.redis_server import RedisServer
from tests.support.s3_server import MotoServer, S3Endpoint

from .monitor import Monitored, ProcessTree

BUCKET = "tickmesh-bench"
_T = TypeVar("_T")


class CloudSetupError(RuntimeError):
    """A server of the cloud profile could not be started or reached."""


@dataclass(frozen=True, slots=True)
class CloudStores:
    """The stores one layout's services are given."""

    store_url: str
    """The state service's PostgreSQL DSN (the floor's table goes there too)."""
    blob_url: str
    usage_counter_url: str


async def finish_in_thread(fn: Callable[[], _T]) -> _T:
    """Run blocking ``fn`` in a thread. When cancelled (Ctrl-C), still wait for it to end,
    so a server it was starting is known and can be stopped, then re-raise."""
    future = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await future
        raise


def _child_pid(marker: str, known: set[int]) -> int | None:
    """The pid of a new child of this process whose command line contains ``marker``."""
    for child in psutil.Process().children():
        if child.pid in known:
            continue
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in child.cmdline()):
                return child.pid
    return None


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children()}


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class CloudServers:
    """The PostgreSQL, Redis and S3 servers of one cloud-profile run.

    Example:
        async with CloudServers(work_dir) as cloud:
            stores = await cloud.stores("processes")
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        store_url: str | None = None,
        redis_url: str | None = None,
        blob_url: str | None = None,
    ) -> None:
        self.work_dir = work_dir
        self._store_url = store_url
        self._redis_url = redis_url
        self._blob_url = blob_url
        self._postgres: PostgresServer | None = None
        self._redis: RedisServer | None = None
        self._moto: MotoServer | None = None
        self._s3: S3Endpoint | None = None
        self._databases = 0
        self.processes: dict[str, Monitored] = {}
        """The throwaway servers, by name, for the CPU and RSS monitor."""
        self.env: dict[str, str] = {}
        """What the services' environment needs (moto's credentials)."""

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    async def __aenter__(self) -> CloudServers:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self._store_url is None:
            await self._start_postgres()
        else:
            await self._check_postgres(self._store_url)
        if self._redis_url is None:
            await finish_in_thread(self._start_redis)
        else:
            await finish_in_thread(lambda: self._ping_redis(str(self._redis_url)))
        if self._blob_url is None:
            await self._start_s3()

    async def _start_postgres(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise CloudSetupError(
                "the cloud profile needs PostgreSQL: install it (initdb and pg_ctl on PATH or "
                "under /usr/lib/postgresql/<version>/bin, e.g. apt-get install postgresql) or "
                "pass --store-url postgresql://user:password@host:port/database"
            )
        self._postgres = server = PostgresServer.throwaway(bindir)
        try:
            await finish_in_thread(server.start)
        except PostgresStartError as exc:
            raise CloudSetupError(f"PostgreSQL did not start: {exc}") from exc
        pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        self.processes["postgres"] = ProcessTree(psutil.Process(pid))

    async def _check_postgres(self, dsn: str) -> None:
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise CloudSetupError(f"--store-url {_masked(dsn)}: cannot connect: {exc}") from exc
        await conn.close()

    def _start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise CloudSetupError(
                "the cloud profile needs redis-server on PATH (apt-get install redis-server) "
                "or --redis-url redis://host:port/db"
            )
        known = _children()
        self._redis = server = RedisServer(binary=binary, directory=self.work_dir / "redis")
        (self.work_dir / "redis").mkdir(exist_ok=True)
        try:
            server.start()
        except pytest.fail.Exception as exc:  # the harness fails the way a test does
            raise CloudSetupError(f"redis-server did not start: {exc}") from None
        pid = _child_pid(str(server.port), known)
        if pid is not None:
            self.processes["redis"] = psutil.Process(pid)

    def _ping_redis(self, url: str) -> None:
        client = redis.Redis.from_url(url)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise CloudSetupError(f"--redis-url {_masked(url)}: {exc}") from exc
        finally:
            client.close()

    async def _start_s3(self) -> None:
        known = _children()
        self._moto = server = MotoServer()
        try:
            await finish_in_thread(server.start)
        except (OSError, RuntimeError, ValueError) as exc:
            raise CloudSetupError(
                f"moto's S3 server did not start ({exc}); install the dev extra "
                "(pip install -e '.[dev]') or pass --blob-url s3://bucket/prefix?endpoint_url=.."
            ) from exc
        pid = _child_pid("ThreadedMotoServer", known)
        if pid is not None:
            self.processes["s3 (moto)"] = psutil.Process(pid)
        self._s3 = endpoint = S3Endpoint(endpoint_url=server.endpoint_url)
        async with endpoint.client() as s3:
            await s3.create_bucket(Bucket=BUCKET)
        # The services read S3 credentials from the standard AWS chain, as deployed.
        self.env = {
            "AWS_ACCESS_KEY_ID": endpoint.access_key_id,
            "AWS_SECRET_ACCESS_KEY": endpoint.secret_access_key,
        }

    def summary(self) -> str:
        """One line naming the servers (and the throwaway cluster's folder)."""
        parts = []
        if self._postgres is not None:
            parts.append(
                f"PostgreSQL on 127.0.0.1:{self._postgres.port} (data {self._postgres.data_dir})"
            )
        else:
            parts.append(f"PostgreSQL {_masked(str(self._store_url))}")
        if self._redis is not None:
            parts.append(f"Redis {self._redis.url}")
        else:
            parts.append(f"Redis {_masked(str(self._redis_url))}")
        parts.append(f"S3 {self._s3.endpoint_url}" if self._s3 else f"S3 {self._blob_url}")
        return ", ".join(parts)

    async def stores(self, name: str) -> CloudStores:
        """Fresh stores for the layout ``name`` (external servers: the URLs as given)."""
        self._databases += 1
        if self._postgres is not None:
            store_url = await self._postgres.create_database("bench_" + name.replace("-", "_"))
        else:
            assert self._store_url is not None
            store_url = self._store_url
        if self._redis is not None:
            counter_url = _with_path(self._redis.url, f"/{self._databases}")
        else:
            assert self._redis_url is not None
            counter_url = self._redis_url
        if self._s3 is not None:
            query = urlencode({"endpoint_url": self._s3.endpoint_url, "region": self._s3.region})
            blob_url = f"s3://{BUCKET}/{name}?{query}"
        else:
            assert self._blob_url is not None
            blob_url = self._blob_url
        return CloudStores(store_url, blob_url, counter_url)

    async def describe(self, stores: CloudStores) -> dict[str, Any]:
        """What the stores run on, for the report."""
        conn = await asyncpg.connect(stores.store_url, timeout=10)
        try:
            settings = {
                name: await conn.fetchval(f"SHOW {name}")
                for name in (
                    "server_version",
                    "fsync",
                    "synchronous_commit",
                    "wal_sync_method",
                    "shared_buffers",
                )
            }
        finally:
            await conn.close()
        redis_version = await asyncio.to_thread(self._redis_version, stores.usage_counter_url)
        return {
            "postgres": {
                "where": "throwaway cluster on this machine"
                if self._postgres is not None
                else "external (--store-url)",
                "data_dir": str(self._postgres.data_dir) if self._postgres else None,
                **settings,
            },
            "redis": {
                "where": "throwaway redis-server on this machine, no persistence"
                if self._redis is not None
                else "external (--redis-url)",
                "version": redis_version,
            },
            "s3": "moto's S3 server on this machine"
            if self._s3 is not None
            else "external (--blob-url)",
            "store_url": _masked(stores.store_url),
            "blob_url": stores.blob_url,
            "usage_counter_url": _masked(stores.usage_counter_url),
        }

    @staticmethod
    def _redis_version(url: str) -> str:
        client = redis.Redis.from_url(url)
        try:
            info: dict[str, Any] = client.info("server")
            return str(info.get("redis_version", "?"))
        except redis.RedisError:
            return "?"
        finally:
            client.close()

    async def close(self) -> None:
        """Stop and remove every throwaway server (their logs are copied to ``log_dir``)."""
        await finish_in_thread(self._close)

    def _close(self) -> None:
        moto, self._moto = self._moto, None
        if moto is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(moto.log_path, self.log_dir / "s3-moto.log")
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                moto.stop()
        server, self._redis = self._redis, None
        if server is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                server.stop()
        postgres, self._postgres = self._postgres, None
        if postgres is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(postgres.log_path, self.log_dir / "postgres.log")
            postgres.cleanup()
        self.processes.clear()
