"""A throwaway redis-server for the tests, started once per session on a free loopback port.

Without a ``redis-server`` binary on PATH the tests use the server that
``TICKMESH_TEST_REDIS_URL`` names instead, and fail (never skip) when neither is there.
Tests isolate themselves by database: :func:`redis_url` hands each test a database of
its own and empties it first, so an external server given to the tests must be a
disposable one that no other test session uses at the same time.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.support.ports import free_port

REDIS_URL_ENV: Final = "TICKMESH_TEST_REDIS_URL"
_DATABASES: Final = 64
_START_TIMEOUT_S: Final = 10.0


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server the tests own (``binary`` set), or an external one they only use.

    Owned servers keep no data on disk (``--save '' --appendonly no``), so a restart
    empties them, as a crash of a Redis without persistence would.
    """

    def __init__(self, *, url: str = "", binary: str = "", directory: Path | None = None) -> None:
        self._binary = binary
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None
        self.port = (urlsplit(url).port or 6379) if url else free_port()
        self.url = url or f"redis://127.0.0.1:{self.port}"
        """The server's URL (database 0); tests take theirs from the ``redis_url`` fixture."""
        self.databases = _DATABASES if binary else _external_databases(self.url)

    @property
    def owned(self) -> bool:
        """Whether the tests started this server (and so can stop and restart it)."""
        return bool(self._binary)

    def _require_owned(self) -> None:
        if not self.owned:
            pytest.fail(
                f"the Redis server at {self.url} comes from {REDIS_URL_ENV}; stopping and "
                "restarting it needs a redis-server binary on PATH (apt-get install redis-server)",
                pytrace=False,
            )

    def start(self) -> None:
        """Start the server on its port and wait until it answers PING."""
        self._require_owned()
        assert self._directory is not None
        if self._process is not None:
            return  # running already
        log = self._directory / "redis.log"
        self._process = subprocess.Popen(
            [
                self._binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
                *("--dir", str(self._directory), "--logfile", str(log)),
                *("--databases", str(_DATABASES)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _answers_ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                pytest.fail(
                    f"redis-server did not start on port {self.port}:\n{detail}", pytrace=False
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (its data is lost); ``start()`` brings it back on the same port."""
        self._require_owned()
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _external_databases(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        found = client.config_get("databases").get("databases")
    except redis.RedisError:
        found = None  # managed servers may refuse CONFIG; 16 is Redis's default
    finally:
        client.close()
    return int(found) if found else 16


def _with_database(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis for the session: a fresh redis-server, else ``TICKMESH_TEST_REDIS_URL``."""
    binary = shutil.which("redis-server")
    if binary is None:
        external = os.environ.get(REDIS_URL_ENV)
        if not external:
            pytest.fail(
                "these tests need Redis: install redis-server on PATH (e.g. apt-get install "
                f"redis-server), or set {REDIS_URL_ENV} to a disposable Redis "
                "(its databases are emptied)",
                pytrace=False,
            )
        yield RedisServer(url=external)
        return
    server = RedisServer(binary=binary, directory=tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


_next_database = itertools.count(1)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a Redis database no other test is using, emptied for this test."""
    db = next(_next_database) % (redis_server.databases - 1) + 1  # database 0 stays unused
    url = _with_database(redis_server.url, db)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url
