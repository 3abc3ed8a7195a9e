"""Every blob store keeps the same contract: LocalBlobStore on a folder, S3BlobStore on moto.

The shared tests run against both stores through a small ``Backend`` harness
(how to build a URI, how to tamper with a stored object behind the store's
back). S3-only behaviour (encryption headers, multipart uploads, the startup
check, URL parsing) follows.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.s3_server import S3Bucket, S3Endpoint, temporary_bucket
from tickmesh.runtime.blobs import (
    DEFAULT_INLINE_LIMIT,
    BlobStore,
    LocalBlobStore,
    offload_payload,
    payload_sha256,
    resolve_payload,
)
from tickmesh.runtime.blobs_s3 import S3BlobStore, blob_store_from_url
from tickmesh.sdk.errors import ConfigError, NotFoundError, ValidationError
from tickmesh.v1 import payload_pb2

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

A = "acme"
B = "globex"
MIB = 1024 * 1024
# Just over 5 MiB: with the S3 store's threshold lowered, two parts, the last one short.
BIG = os.urandom(5 * MIB + 17)
S3_PREFIX = "blobs/v1"


@dataclass
class Backend:
    """One store under test, plus what a test needs to reach around it."""

    store: BlobStore
    base: str
    """The URI that tenant prefixes lie directly under."""
    overwrite: Callable[[str, str, bytes], Awaitable[None]]
    """Replace the stored bytes of (tenant, sha256) without going through the store."""
    stored_keys: Callable[[], Awaitable[list[str]]]
    """Every object the backend holds, temporary files included."""
    foreign_uris: Callable[[str], list[str]]
    """URIs of other stores for a relative key ``tenant/ab/<sha>``."""

    def uri_for(self, tenant: str, sha256: str) -> str:
        return f"{self.base}/{tenant}/{sha256[:2]}/{sha256}"


def _local_backend(root: Path) -> Backend:
    store = LocalBlobStore(root)

    async def overwrite(tenant: str, sha256: str, data: bytes) -> None:
        await asyncio.to_thread(store.path_for(tenant, sha256).write_bytes, data)

    def list_files() -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    async def stored_keys() -> list[str]:
        return await asyncio.to_thread(list_files)

    def foreign_uris(key: str) -> list[str]:
        return [
            f"s3://bucket/{key}",
            f"file://otherhost{store.root}/{key}",
            f"{store.root.parent.as_uri()}/elsewhere/{key}",
        ]

    return Backend(store, store.root.as_uri(), overwrite, stored_keys, foreign_uris)


def _s3_backend(bucket: S3Bucket, store: S3BlobStore) -> Backend:
    async def overwrite(tenant: str, sha256: str, data: bytes) -> None:
        async with bucket.endpoint.client() as s3:
            await s3.put_object(Bucket=bucket.name, Key=store.key_for(tenant, sha256), Body=data)

    async def stored_keys() -> list[str]:
        async with bucket.endpoint.client() as s3:
            listed = await s3.list_objects_v2(Bucket=bucket.name)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    def foreign_uris(key: str) -> list[str]:
        return [
            f"file:///{S3_PREFIX}/{key}",
            f"s3://other-bucket/{S3_PREFIX}/{key}",
            f"s3://{bucket.name}/{key}",
            f"s3://{bucket.name}/other/{key}",
            f"s3://{bucket.name}/{S3_PREFIX}/extra/{key}",
            f"s3://{bucket.name}:443/{S3_PREFIX}/{key}",
            f"s3://user@{bucket.name}/{S3_PREFIX}/{key}",
            f"s3:///{S3_PREFIX}/{key}",
        ]

    return Backend(store, f"s3://{bucket.name}/{S3_PREFIX}", overwrite, stored_keys, foreign_uris)


@pytest.fixture(params=["local", "s3"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "local":
        yield _local_backend(tmp_path / "blobs")
        return
    endpoint: S3Endpoint = request.getfixturevalue("s3_server")
    async with temporary_bucket(endpoint) as bucket:
        # The threshold is lowered so that the ~5 MiB tests take the multipart path.
        store = bucket.store(prefix=S3_PREFIX, multipart_threshold=1 * MIB, part_size=5 * MIB)
        async with store:
            yield _s3_backend(bucket, store)


def _inline(data: bytes, content_type: str = "application/octet-stream") -> payload_pb2.Payload:
    return payload_pb2.Payload(
        content_type=content_type, inline=data, size=len(data), sha256=payload_sha256(data)
    )


async def test_blob_store_round_trips_5_mib_by_sha256(backend: Backend) -> None:
    ref = await backend.store.put(A, BIG, "application/x-tar")

    digest = hashlib.sha256(BIG).hexdigest()
    assert ref.sha256 == digest
    assert ref.size == len(BIG)
    assert ref.content_type == "application/x-tar"
    assert ref.uri == backend.uri_for(A, digest)
    assert await backend.store.get(A, ref.uri) == BIG
    assert await backend.store.exists(A, ref.uri)


@pytest.mark.parametrize("data", [b"", b"x", b"small object \x00\xff" * 64])
async def test_blob_store_round_trips_small_objects(backend: Backend, data: bytes) -> None:
    ref = await backend.store.put(A, data, "text/plain")

    assert ref.uri == backend.uri_for(A, payload_sha256(data))
    assert ref.size == len(data)
    assert await backend.store.get(A, ref.uri) == data


async def test_blob_store_put_is_idempotent(backend: Backend) -> None:
    first = await backend.store.put(A, b"same bytes", "text/plain")
    second = await backend.store.put(A, b"same bytes", "text/plain")
    big_first = await backend.store.put(A, BIG, "application/octet-stream")
    big_second = await backend.store.put(A, BIG, "application/octet-stream")

    assert first == second
    assert big_first == big_second
    keys = await backend.stored_keys()
    assert len(keys) == 2, f"one object per content, nothing temporary left: {keys}"


async def test_blob_store_keeps_tenants_apart(backend: Backend) -> None:
    ours = await backend.store.put(A, b"data", "text/plain")
    theirs = await backend.store.put(B, b"data", "text/plain")

    assert ours.uri != theirs.uri
    assert ours.sha256 == theirs.sha256
    with pytest.raises(ValidationError, match="outside tenant"):
        await backend.store.get(B, ours.uri)
    with pytest.raises(ValidationError, match="outside tenant"):
        await backend.store.exists(B, ours.uri)


@pytest.mark.parametrize("size", [14, 5 * MIB + 17])
async def test_blob_store_detects_a_corrupted_object(backend: Backend, size: int) -> None:
    original = os.urandom(size)
    ref = await backend.store.put(A, original, "application/octet-stream")
    damaged = bytes([original[0] ^ 1]) + original[1:]
    await backend.overwrite(A, ref.sha256, damaged)

    with pytest.raises(ValidationError, match="sha256"):
        await backend.store.get(A, ref.uri)

    # Putting the same content again repairs it, though the size is unchanged.
    await backend.store.put(A, original, "application/octet-stream")
    assert await backend.store.get(A, ref.uri) == original


async def test_blob_store_reports_a_missing_object(backend: Backend) -> None:
    uri = backend.uri_for(A, "0" * 64)

    assert not await backend.store.exists(A, uri)
    with pytest.raises(NotFoundError):
        await backend.store.get(A, uri)


async def test_blob_store_refuses_foreign_schemes_stores_and_prefixes(backend: Backend) -> None:
    ref = await backend.store.put(A, b"ours", "text/plain")
    key = f"{A}/{ref.sha256[:2]}/{ref.sha256}"
    attempts = [
        *backend.foreign_uris(key),
        f"http://example.com/{key}",
        f"https://example.com/{key}",
        f"/{key}",
        "",
    ]
    for uri in attempts:
        with pytest.raises(ValidationError):
            await backend.store.get(A, uri)
        with pytest.raises(ValidationError):
            await backend.store.exists(A, uri)


async def test_blob_store_refuses_path_traversal(backend: Backend) -> None:
    theirs = await backend.store.put(B, b"secret", "text/plain")
    digest = theirs.sha256
    base = backend.base
    last = base.rsplit("/", 1)[-1]
    attempts = [
        f"{base}/{A}/../{B}/{digest[:2]}/{digest}",
        f"{base}/{A}/%2e%2e/{B}/{digest[:2]}/{digest}",
        f"{base}/{A}/{digest[:2]}/../../{B}/{digest[:2]}/{digest}",
        f"{base}/{A}/./{digest[:2]}/{digest}",
        f"{base}/{A}//{digest[:2]}/{digest}",
        f"{base}/../{last}/{B}/{digest[:2]}/{digest}",
        f"{base}/{A}/{digest[:2]}/{digest}/../../../{B}/{digest[:2]}/{digest}",
    ]
    for uri in attempts:
        with pytest.raises(ValidationError):
            await backend.store.get(A, uri)


async def test_blob_store_refuses_uris_that_name_no_object(backend: Backend) -> None:
    base = backend.base
    digest = "ab" * 32
    for uri in (
        f"{base}/{A}",
        f"{base}/{A}/ab",
        f"{base}/{A}/cd/{digest}",
        f"{base}/{A}/ab/{digest}/extra",
        f"{base}/{A}/ab/{digest.upper()}",
        f"{base}/{A}/ab/{digest}?x=1",
        f"{base}/{A}/ab/{digest}#frag",
    ):
        with pytest.raises(ValidationError):
            await backend.store.get(A, uri)


async def test_blob_store_refuses_a_malformed_tenant(backend: Backend) -> None:
    for tenant in ("../etc", "Acme", "", "a/b"):
        with pytest.raises(ValidationError, match="tenant"):
            await backend.store.put(tenant, b"x", "text/plain")
        with pytest.raises(ValidationError, match="tenant"):
            await backend.store.get(tenant, backend.uri_for(A, "ab" * 32))
    assert await backend.stored_keys() == []


async def test_offload_and_resolve_go_through_the_store(backend: Backend) -> None:
    payload = _inline(BIG, "application/json")

    offloaded = await offload_payload(backend.store, A, payload, inline_limit=DEFAULT_INLINE_LIMIT)

    assert offloaded.WhichOneof("data") == "blob"
    assert offloaded.blob.uri == backend.uri_for(A, payload.sha256)
    assert offloaded.sha256 == payload.sha256
    assert offloaded.size == len(BIG)
    assert await resolve_payload(backend.store, A, offloaded) == BIG
    small = _inline(b"tiny")
    assert await offload_payload(backend.store, A, small, inline_limit=1024) is small
    with pytest.raises(ValidationError, match="outside tenant"):
        await resolve_payload(backend.store, B, offloaded)


# --- S3 only -------------------------------------------------------------------------------


async def _head(
    bucket: S3Bucket, store: S3BlobStore, ref: payload_pb2.BlobRef
) -> dict[str, object]:
    async with bucket.endpoint.client() as s3:
        head = await s3.head_object(Bucket=bucket.name, Key=store.key_for(A, ref.sha256))
    return dict(head)


@pytest.mark.parametrize("data", [b"encrypted", BIG], ids=["single", "multipart"])
async def test_s3_sends_the_server_side_encryption_header(s3_bucket: S3Bucket, data: bytes) -> None:
    plain = s3_bucket.store(multipart_threshold=1 * MIB, part_size=5 * MIB)
    sse = s3_bucket.store(
        prefix="sse",
        server_side_encryption="AES256",
        multipart_threshold=1 * MIB,
        part_size=5 * MIB,
    )
    key_id = "arn:aws:kms:us-east-1:123456789012:key/tickmesh-test"
    kms = s3_bucket.store(
        prefix="kms",
        server_side_encryption="aws:kms",
        kms_key_id=key_id,
        multipart_threshold=1 * MIB,
        part_size=5 * MIB,
    )
    async with plain, sse, kms:
        plain_head = await _head(s3_bucket, plain, await plain.put(A, data, "text/plain"))
        sse_head = await _head(s3_bucket, sse, await sse.put(A, data, "text/plain"))
        kms_head = await _head(s3_bucket, kms, await kms.put(A, data, "text/plain"))

    assert "ServerSideEncryption" not in plain_head
    assert sse_head["ServerSideEncryption"] == "AES256"
    assert kms_head["ServerSideEncryption"] == "aws:kms"
    assert kms_head["SSEKMSKeyId"] == key_id


async def test_s3_uses_multipart_above_the_threshold_only(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store(multipart_threshold=8 * MIB, part_size=5 * MIB)
    over = os.urandom(11 * MIB)
    at = os.urandom(8 * MIB)
    async with store:
        over_ref = await store.put(A, over, "application/octet-stream")
        at_ref = await store.put(A, at, "application/octet-stream")
        over_head = await _head(s3_bucket, store, over_ref)
        at_head = await _head(s3_bucket, store, at_ref)
        assert await store.get(A, over_ref.uri) == over

    # An S3 multipart ETag ends in "-<number of parts>": 11 MiB in 5 MiB parts is 3.
    assert str(over_head["ETag"]).strip('"').endswith("-3")
    assert "-" not in str(at_head["ETag"])
    assert over_head["ContentLength"] == len(over)


async def _stored_parts(s3: S3Client, bucket: str) -> int:
    uploads = (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads", [])
    parts = 0
    for upload in uploads:
        listed = await s3.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        parts += len(listed.get("Parts", []))
    return parts


async def test_s3_aborts_a_multipart_upload_that_does_not_finish(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store(multipart_threshold=1 * MIB, part_size=5 * MIB)
    data = os.urandom(64 * MIB)
    async with store, s3_bucket.endpoint.client() as s3:
        upload = asyncio.create_task(store.put(A, data, "application/octet-stream"))
        # Interrupt it once a part is stored: the store has its upload id by then.
        async with asyncio.timeout(30):
            while not await _stored_parts(s3, s3_bucket.name):
                assert not upload.done(), "the upload finished before it could be interrupted"
                await asyncio.sleep(0.005)
        assert not upload.done(), "the upload finished before it could be interrupted"
        upload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await upload

        left = await s3.list_multipart_uploads(Bucket=s3_bucket.name)
        listed = await s3.list_objects_v2(Bucket=s3_bucket.name)
    assert left.get("Uploads", []) == [], "the interrupted upload was aborted"
    assert listed.get("KeyCount") == 0


async def test_s3_put_skips_an_object_already_stored(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store()
    async with store, s3_bucket.endpoint.client() as s3:
        ref = await store.put(A, b"stored once", "text/plain")
        key = store.key_for(A, ref.sha256)
        # Mark the stored copy; a second put that wrote again would drop the mark.
        await s3.put_object(
            Bucket=s3_bucket.name,
            Key=key,
            Body=b"stored once",
            Metadata={"sha256": ref.sha256, "mark": "kept"},
        )
        assert await store.put(A, b"stored once", "text/plain") == ref
        head = await s3.head_object(Bucket=s3_bucket.name, Key=key)
    assert head["Metadata"]["mark"] == "kept"


async def test_s3_refuses_foreign_uris_before_any_request(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store(prefix=S3_PREFIX)
    digest = "ab" * 32
    await store.close()  # a closed store fails any request with RuntimeError

    for uri in (
        f"s3://other-bucket/{S3_PREFIX}/{A}/ab/{digest}",
        f"s3://{s3_bucket.name}/{A}/ab/{digest}",
        f"s3://{s3_bucket.name}/{S3_PREFIX}/{A}/../{B}/ab/{digest}",
        f"s3://{s3_bucket.name}/{S3_PREFIX}/{A}/ab/{digest}?versionId=1",
        f"s3://{s3_bucket.name}/{S3_PREFIX}/{A}/ab/{digest}?",
        f"s3://{s3_bucket.name}/{S3_PREFIX}/{A}/ab",
    ):
        with pytest.raises(ValidationError):
            await store.get(A, uri)
    with pytest.raises(RuntimeError, match="closed"):
        await store.get(A, f"s3://{s3_bucket.name}/{S3_PREFIX}/{A}/ab/{digest}")


async def test_s3_check_passes_for_a_reachable_bucket(s3_bucket: S3Bucket) -> None:
    async with s3_bucket.store() as store:
        await store.check()


async def test_s3_check_names_a_missing_bucket(s3_server: S3Endpoint) -> None:
    async with s3_server.store("tm-test-no-such-bucket") as store:
        with pytest.raises(ConfigError, match=r"bucket tm-test-no-such-bucket does not exist") as e:
            await store.check()
    assert s3_server.endpoint_url in str(e.value)


async def test_s3_check_reports_an_unreachable_endpoint() -> None:
    unreachable = S3Endpoint(endpoint_url="http://127.0.0.1:9")  # discard port: nothing listens
    async with unreachable.store("tm-test-bucket") as store:
        with pytest.raises(
            ConfigError, match=r"bucket tm-test-bucket .* at http://127\.0\.0\.1:9: "
        ):
            await store.check()


def test_s3_from_url_reads_bucket_prefix_and_options() -> None:
    store = S3BlobStore.from_url(
        "s3://tickmesh-blobs/prod/eu/?region=eu-west-1"
        "&endpoint_url=http%3A%2F%2F127.0.0.1%3A9000&sse=aws:kms&kms_key_id=alias/blobs"
    )

    assert store.bucket == "tickmesh-blobs"
    assert store.prefix == "prod/eu"
    assert store.uri_for(A, "ab" * 32) == f"s3://tickmesh-blobs/prod/eu/{A}/ab/{'ab' * 32}"
    bare = S3BlobStore.from_url("s3://tickmesh-blobs")
    assert bare.prefix == ""
    assert bare.uri_for(A, "ab" * 32) == f"s3://tickmesh-blobs/{A}/ab/{'ab' * 32}"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://tickmesh-blobs/prod", "s3://"),
        ("s3://Tickmesh_Blobs/prod", "bucket name"),
        ("s3://tickmesh-blobs/prod?colour=blue", "unknown option"),
        ("s3://tickmesh-blobs/prod?region=a&region=b", "once"),
        ("s3://tickmesh-blobs/prod?sse=DES", "server-side encryption"),
        ("s3://tickmesh-blobs/prod?kms_key_id=k", "aws:kms"),
        ("s3://tickmesh-blobs/prod?endpoint_url=ftp://host", "http"),
        ("s3://key:secret@tickmesh-blobs/prod", "credentials"),
        ("s3://tickmesh-blobs/../prod", "segment"),
        ("s3://tickmesh-blobs/prod#x", "fragment"),
    ],
)
def test_s3_from_url_refuses_bad_settings(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        S3BlobStore.from_url(url)


def test_blob_store_from_url_picks_the_store_by_scheme(tmp_path: Path) -> None:
    by_file_url = blob_store_from_url(tmp_path.as_uri(), local_fsync=False)
    by_path = blob_store_from_url(str(tmp_path / "plain"))
    by_s3 = blob_store_from_url("s3://tickmesh-blobs/prod?region=eu-west-1")

    assert isinstance(by_file_url, LocalBlobStore)
    assert by_file_url.root == tmp_path.resolve()
    assert isinstance(by_path, LocalBlobStore)
    assert by_path.root == (tmp_path / "plain").resolve()
    assert isinstance(by_s3, S3BlobStore)
    assert by_s3.prefix == "prod"
    for bad in ("redis://localhost/0", "file://otherhost/blobs", ""):
        with pytest.raises(ConfigError):
            blob_store_from_url(bad)
