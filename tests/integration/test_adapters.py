"""Opening the storage adapters a URL names, as services do at start."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.support.s3_server import S3Bucket
from tickmesh.runtime.adapters import open_blob_store, open_usage_counter
from tickmesh.runtime.blobs import LocalBlobStore
from tickmesh.sdk.errors import ConfigError

AWS_CHAIN = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _s3_url(bucket: S3Bucket) -> str:
    endpoint = bucket.endpoint
    query = urlencode({"endpoint_url": endpoint.endpoint_url, "region": endpoint.region})
    return f"s3://{bucket.name}/svc?{query}"


@pytest.fixture
def no_aws_chain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing in the environment or the shared files gives S3 credentials."""
    for name in AWS_CHAIN:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.usefixtures("no_aws_chain")
async def test_s3_credentials_from_settings_open_the_store(s3_bucket: S3Bucket) -> None:
    endpoint = s3_bucket.endpoint
    store = await open_blob_store(
        _s3_url(s3_bucket),
        access_key_id=endpoint.access_key_id,
        secret_access_key=endpoint.secret_access_key,
    )
    try:
        ref = await store.put("acme", b"settings credentials", "text/plain")
        assert await store.get("acme", ref.uri) == b"settings credentials"
    finally:
        await store.close()


async def test_s3_credentials_from_the_aws_chain_open_the_store(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.endpoint.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket.endpoint.secret_access_key)
    store = await open_blob_store(_s3_url(s3_bucket))
    try:
        ref = await store.put("acme", b"chain credentials", "text/plain")
        assert await store.get("acme", ref.uri) == b"chain credentials"
    finally:
        await store.close()


@pytest.mark.usefixtures("no_aws_chain")
async def test_s3_without_credentials_refuses_to_start(s3_bucket: S3Bucket) -> None:
    with pytest.raises(ConfigError, match=s3_bucket.name):
        await open_blob_store(_s3_url(s3_bucket))


async def test_half_a_pair_of_s3_credentials_is_refused(s3_bucket: S3Bucket) -> None:
    with pytest.raises(ConfigError, match="both s3_access_key_id and s3_secret_access_key"):
        await open_blob_store(_s3_url(s3_bucket), access_key_id="only-the-id")


async def test_a_folder_or_file_url_opens_a_local_store(tmp_path: Path) -> None:
    for url in (str(tmp_path / "a"), f"file://{tmp_path / 'b'}"):
        store = await open_blob_store(url)
        assert isinstance(store, LocalBlobStore)
        ref = await store.put("acme", b"local", "text/plain")
        assert await store.get("acme", ref.uri) == b"local"
        await store.close()


async def test_unknown_blob_and_counter_schemes_are_refused() -> None:
    with pytest.raises(ConfigError, match="unsupported blob URL 'gs://b/p'"):
        await open_blob_store("gs://b/p")
    with pytest.raises(ConfigError, match="unsupported usage counter URL 'memcached://x'"):
        await open_usage_counter("memcached://x")
