"""A real S3 HTTP endpoint for tests: moto's server mode in a child process.

The child runs ``moto.server.ThreadedMotoServer`` on an ephemeral loopback port
and reports the port on stdout; it stops when its stdin closes, so it cannot
outlive the test session. Clients get dummy credentials explicitly, and the
child gets them in its own environment, so the test session's environment is
left as it was.

When moto cannot start, ``TICKMESH_TEST_S3_URL`` may name another S3 endpoint
(credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` when set).
Without either, the fixture fails: these tests never skip.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import selectors
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from tickmesh.runtime.blobs_s3 import S3BlobStore

if TYPE_CHECKING:
    from aiobotocore.session import ClientCreatorContext
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import ObjectIdentifierTypeDef

S3_URL_ENV = "TICKMESH_TEST_S3_URL"
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_TIMEOUT = 60.0
"""Importing moto takes a few seconds, more on a busy two-core machine."""

_CHILD = """\
import sys
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s %d" % server.get_host_and_port(), flush=True)
sys.stdin.read()
server.stop()
"""


@dataclass(frozen=True)
class S3Endpoint:
    """Where the test S3 service answers, and the credentials it accepts."""

    endpoint_url: str
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    region: str = "us-east-1"

    def client(self) -> ClientCreatorContext[S3Client]:
        """A raw S3 client (``async with``), for setting up and tampering in tests."""
        # Imported here so that test folders that never touch S3 load without the cloud extra.
        import aioboto3

        session = aioboto3.Session(
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )
        return session.client("s3", endpoint_url=self.endpoint_url)

    def store(self, bucket: str, **options: Any) -> S3BlobStore:
        """An ``S3BlobStore`` on ``bucket`` of this endpoint (not opened yet)."""
        return S3BlobStore(
            bucket,
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            **options,
        )


@dataclass(frozen=True)
class S3Bucket:
    """A bucket made for one test, on the session's S3 endpoint."""

    name: str
    endpoint: S3Endpoint

    def store(self, **options: Any) -> S3BlobStore:
        return self.endpoint.store(self.name, **options)


class MotoServer:
    """moto's S3 server in a child process on an ephemeral loopback port."""

    def __init__(self) -> None:
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open while it runs
            prefix="moto-server-", suffix=".log", delete=False
        )
        self._process: subprocess.Popen[str] | None = None
        self.endpoint_url = ""

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def start(self) -> None:
        env = {**os.environ, **DUMMY_CREDENTIALS}
        self._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._read_line(self._process.stdout, START_TIMEOUT)
        host, port = line.split()
        self.endpoint_url = f"http://{host}:{port}"
        _wait_until_answering(self.endpoint_url, START_TIMEOUT)

    def _read_line(self, stream: IO[str], timeout: float) -> str:
        with selectors.DefaultSelector() as selector:
            selector.register(stream, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise RuntimeError(f"moto did not report its port within {timeout:.0f} s")
        line = stream.readline()
        if not line:
            raise RuntimeError(f"moto exited with code {self._process_code()} before starting")
        return line

    def _process_code(self) -> int | None:
        return None if self._process is None else self._process.wait(timeout=5)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        self._log.close()
        self.log_path.unlink(missing_ok=True)


def _wait_until_answering(endpoint_url: str, timeout: float) -> None:
    """Return once ``endpoint_url`` answers HTTP at all (any status will do)."""
    parts = urlsplit(endpoint_url)
    deadline = time.monotonic() + timeout
    while True:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=2)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{endpoint_url} did not answer within {timeout:.0f} s") from exc
            time.sleep(0.05)
        finally:
            connection.close()


def _endpoint_from_env(url: str) -> S3Endpoint:
    return S3Endpoint(
        endpoint_url=url,
        access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    """One S3 endpoint for the session: moto in a child process, else ``TICKMESH_TEST_S3_URL``."""
    server = MotoServer()
    try:
        server.start()
    except (OSError, RuntimeError, ValueError) as exc:
        detail = f"{exc}\n{server.log_tail()}"
        server.stop()
        fallback = os.environ.get(S3_URL_ENV)
        if not fallback:
            pytest.fail(
                f"could not start moto's S3 server: {detail}\nInstall the dev dependencies "
                f"(make install, or pip install -e '.[dev]', which bring moto[server]) or set "
                f"{S3_URL_ENV} to the URL of a running S3-compatible endpoint.",
                pytrace=False,
            )
        _wait_until_answering(fallback, 10)
        yield _endpoint_from_env(fallback)
        return
    try:
        yield S3Endpoint(endpoint_url=server.endpoint_url)
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def temporary_bucket(endpoint: S3Endpoint) -> AsyncIterator[S3Bucket]:
    """A fresh, uniquely named bucket, emptied and removed on exit."""
    name = f"tm-test-{uuid.uuid4().hex[:16]}"
    async with endpoint.client() as s3:
        await s3.create_bucket(Bucket=name)
    try:
        yield S3Bucket(name=name, endpoint=endpoint)
    finally:
        async with endpoint.client() as s3:
            await _empty_bucket(s3, name)
            await s3.delete_bucket(Bucket=name)


@pytest.fixture
async def s3_bucket(s3_server: S3Endpoint) -> AsyncIterator[S3Bucket]:
    """A fresh bucket for one test, emptied and removed afterwards."""
    async with temporary_bucket(s3_server) as bucket:
        yield bucket


async def _empty_bucket(s3: S3Client, bucket: str) -> None:
    uploads = await s3.list_multipart_uploads(Bucket=bucket)
    for upload in uploads.get("Uploads", []):
        await s3.abort_multipart_upload(
            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
        )
    async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys: list[ObjectIdentifierTypeDef] = [
            {"Key": item["Key"]} for item in page.get("Contents", [])
        ]
        if keys:
            await s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
