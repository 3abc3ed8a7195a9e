"""The local blob store keeps objects by content, per tenant, and refuses foreign URIs."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from tickmesh.runtime.blobs import (
    DEFAULT_INLINE_LIMIT,
    MIN_OFFLOAD_BYTES,
    LocalBlobStore,
    offload_payload,
    offload_to_budget,
    payload_sha256,
    resolve_payload,
)
from tickmesh.sdk.errors import NotFoundError, ValidationError
from tickmesh.v1 import payload_pb2

A = "acme"
B = "globex"
BIG = os.urandom(5 * 1024 * 1024)


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _inline(data: bytes, content_type: str = "application/octet-stream") -> payload_pb2.Payload:
    return payload_pb2.Payload(
        content_type=content_type, inline=data, size=len(data), sha256=payload_sha256(data)
    )


async def test_blob_store_round_trips_5_mib_by_sha256(blobs: LocalBlobStore) -> None:
    ref = await blobs.put(A, BIG, "application/x-tar")

    digest = hashlib.sha256(BIG).hexdigest()
    assert ref.sha256 == digest
    assert ref.size == len(BIG)
    assert ref.content_type == "application/x-tar"
    assert ref.uri == (blobs.root / A / digest[:2] / digest).as_uri()
    assert ref.uri.startswith("file:///")
    assert await blobs.get(A, ref.uri) == BIG
    assert await blobs.exists(A, ref.uri)


async def test_blob_store_put_is_idempotent(blobs: LocalBlobStore) -> None:
    first = await blobs.put(A, b"same bytes", "text/plain")
    second = await blobs.put(A, b"same bytes", "text/plain")

    assert first == second
    assert _files(blobs.root) == [blobs.path_for(A, first.sha256)], "no temporary files left"


async def test_blob_store_keeps_tenants_apart(blobs: LocalBlobStore) -> None:
    ours = await blobs.put(A, b"data", "text/plain")
    theirs = await blobs.put(B, b"data", "text/plain")

    assert ours.uri != theirs.uri
    assert ours.sha256 == theirs.sha256
    with pytest.raises(ValidationError, match="outside tenant"):
        await blobs.get(B, ours.uri)
    with pytest.raises(ValidationError, match="outside tenant"):
        await blobs.exists(B, ours.uri)


async def test_blob_store_detects_a_corrupted_object(blobs: LocalBlobStore) -> None:
    ref = await blobs.put(A, b"precious bytes", "text/plain")
    blobs.path_for(A, ref.sha256).write_bytes(b"precious bytez")

    with pytest.raises(ValidationError, match="sha256"):
        await blobs.get(A, ref.uri)

    # Putting the same content again repairs it.
    await blobs.put(A, b"precious bytes", "text/plain")
    assert await blobs.get(A, ref.uri) == b"precious bytes"


async def test_blob_store_reports_a_missing_object(blobs: LocalBlobStore) -> None:
    digest = "0" * 64
    uri = (blobs.root / A / digest[:2] / digest).as_uri()

    assert not await blobs.exists(A, uri)
    with pytest.raises(NotFoundError):
        await blobs.get(A, uri)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/acme/ab/" + "ab" * 32,
        "http://example.com/acme/ab/" + "ab" * 32,
        "https://example.com/acme/ab/" + "ab" * 32,
        "file://otherhost/acme/ab/" + "ab" * 32,
        "/acme/ab/" + "ab" * 32,
        "",
    ],
)
async def test_blob_store_refuses_other_schemes(blobs: LocalBlobStore, uri: str) -> None:
    with pytest.raises(ValidationError):
        await blobs.get(A, uri)


async def test_blob_store_refuses_path_traversal(blobs: LocalBlobStore) -> None:
    theirs = await blobs.put(B, b"secret", "text/plain")
    digest = theirs.sha256
    root = blobs.root.as_uri()
    attempts = [
        f"{root}/{A}/../{B}/{digest[:2]}/{digest}",
        f"{root}/{A}/%2e%2e/{B}/{digest[:2]}/{digest}",
        f"{root}/{A}/{digest[:2]}/../../{B}/{digest[:2]}/{digest}",
        f"{root}/{A}/./{digest[:2]}/{digest}",
        f"{root}/{A}//{digest[:2]}/{digest}",
        f"{root}/../{blobs.root.name}/{B}/{digest[:2]}/{digest}",
    ]
    for uri in attempts:
        with pytest.raises(ValidationError):
            await blobs.get(A, uri)


async def test_blob_store_refuses_uris_that_name_no_object(blobs: LocalBlobStore) -> None:
    root = blobs.root.as_uri()
    digest = "ab" * 32
    for uri in (
        f"{root}/{A}",
        f"{root}/{A}/ab",
        f"{root}/{A}/cd/{digest}",
        f"{root}/{A}/ab/{digest}/extra",
        f"{root}/{A}/ab/{digest.upper()}",
        f"{root}/{A}/ab/{digest}?x=1",
    ):
        with pytest.raises(ValidationError):
            await blobs.get(A, uri)


async def test_blob_store_refuses_a_malformed_tenant(blobs: LocalBlobStore) -> None:
    with pytest.raises(ValidationError, match="tenant"):
        await blobs.put("../etc", b"x", "text/plain")
    with pytest.raises(ValidationError, match="tenant"):
        await blobs.put("Acme", b"x", "text/plain")


async def test_offload_keeps_a_payload_at_or_below_the_limit_inline(
    blobs: LocalBlobStore,
) -> None:
    payload = _inline(b"x" * 1024)

    assert await offload_payload(blobs, A, payload, inline_limit=1024) is payload
    assert _files(blobs.root) == []


async def test_offload_moves_a_payload_over_the_limit_to_a_blob(blobs: LocalBlobStore) -> None:
    payload = _inline(BIG, "application/json")

    offloaded = await offload_payload(blobs, A, payload, inline_limit=DEFAULT_INLINE_LIMIT)

    assert offloaded.WhichOneof("data") == "blob"
    assert offloaded.content_type == "application/json"
    assert offloaded.size == len(BIG)
    assert offloaded.sha256 == payload.sha256
    assert offloaded.blob.sha256 == payload.sha256
    assert offloaded.blob.size == len(BIG)
    assert offloaded.blob.content_type == "application/json"
    assert await blobs.get(A, offloaded.blob.uri) == BIG


async def test_offload_fills_in_a_missing_digest_and_refuses_a_wrong_one(
    blobs: LocalBlobStore,
) -> None:
    bare = payload_pb2.Payload(content_type="text/plain", inline=b"y" * 100)
    offloaded = await offload_payload(blobs, A, bare, inline_limit=10)
    assert offloaded.sha256 == payload_sha256(b"y" * 100)
    assert offloaded.size == 100

    lying = payload_pb2.Payload(content_type="text/plain", inline=b"y" * 100, sha256="0" * 64)
    with pytest.raises(ValidationError, match="sha256"):
        await offload_payload(blobs, A, lying, inline_limit=10)


async def test_resolve_returns_inline_bytes(blobs: LocalBlobStore) -> None:
    assert await resolve_payload(blobs, A, _inline(b"hello")) == b"hello"
    assert await resolve_payload(blobs, A, payload_pb2.Payload()) == b""

    tampered = _inline(b"hello")
    tampered.inline = b"jello"
    tampered.ClearField("size")
    with pytest.raises(ValidationError, match="sha256"):
        await resolve_payload(blobs, A, tampered)


async def test_resolve_fetches_blob_bytes(blobs: LocalBlobStore) -> None:
    offloaded = await offload_payload(blobs, A, _inline(BIG), inline_limit=DEFAULT_INLINE_LIMIT)

    assert await resolve_payload(blobs, A, offloaded) == BIG

    wrong = payload_pb2.Payload()
    wrong.CopyFrom(offloaded)
    wrong.sha256 = "0" * 64
    with pytest.raises(ValidationError, match="sha256"):
        await resolve_payload(blobs, A, wrong)
    with pytest.raises(ValidationError, match="outside tenant"):
        await resolve_payload(blobs, B, offloaded)


async def test_payloads_sharing_a_budget_go_to_blobs_largest_first(blobs: LocalBlobStore) -> None:
    """The largest leave until what stays inline fits the budget; payloads of 1 KiB or
    less never leave (a reference would be as large); a blob already out counts nothing."""
    sizes = [200_000, 150_000, 120_000, 900, 1_000]
    payloads = [_inline(bytes([i]) * n) for i, n in enumerate(sizes)]
    already = await offload_payload(blobs, A, _inline(b"b" * 5_000), inline_limit=0)
    await offload_to_budget(blobs, A, [*payloads, already], budget=150_000)
    kinds = [p.WhichOneof("data") for p in payloads]
    assert kinds == ["blob", "blob", "inline", "inline", "inline"]
    assert sum(len(p.inline) for p in payloads if p.inline) <= 150_000
    for i, (payload, size) in enumerate(zip(payloads, sizes, strict=True)):
        assert await resolve_payload(blobs, A, payload) == bytes([i]) * size
        assert (payload.size, payload.sha256) == (size, payload_sha256(bytes([i]) * size))

    tiny = [_inline(b"t" * MIN_OFFLOAD_BYTES) for _ in range(10)]
    await offload_to_budget(blobs, A, tiny, budget=100)
    assert {p.WhichOneof("data") for p in tiny} == {"inline"}


class _SlowStore(LocalBlobStore):
    """A local store whose writes take a while, counting those in flight."""

    in_flight = 0
    most = 0

    async def put(self, tenant: str, data: bytes, content_type: str) -> payload_pb2.BlobRef:
        _SlowStore.in_flight += 1
        _SlowStore.most = max(_SlowStore.most, _SlowStore.in_flight)
        try:
            await asyncio.sleep(0.05)
            return await super().put(tenant, data, content_type)
        finally:
            _SlowStore.in_flight -= 1


async def test_payloads_leaving_a_budget_are_stored_together_or_not_at_all(
    tmp_path: Path,
) -> None:
    """Hundreds of a fan-out's inputs do not wait for each other's write; one that cannot
    be stored (its digest wrong) leaves every payload as it came."""
    store = _SlowStore(tmp_path / "blobs")
    payloads = [_inline(bytes([i]) * 4_000) for i in range(20)]
    await offload_to_budget(store, A, payloads, budget=10_000)
    assert _SlowStore.most >= 10  # in flight at once (one after the other: 1), whatever the load
    assert [p.WhichOneof("data") for p in payloads].count("blob") == 18

    bad = [_inline(bytes([i]) * 4_000) for i in range(3)]
    bad[1].sha256 = "0" * 64
    with pytest.raises(ValidationError, match="payload sha256"):
        await offload_to_budget(store, A, bad, budget=0)
    assert {p.WhichOneof("data") for p in bad} == {"inline"}
