"""Blob storage for payloads over the inline limit, shared by the state service and the pool.

Blobs are immutable and content-addressed by their SHA-256, so a put is
idempotent and a reader can always check what it got. Every object lies under
its tenant's prefix, and a store refuses a URI outside the caller's prefix (or
of a scheme it does not serve) before touching anything.

``LocalBlobStore`` is the embedded profile's store: a folder, with objects at
``<root>/<tenant>/<sha[:2]>/<sha>`` and URIs ``file://<absolute path>``. The
cloud profile's S3 store implements the same ``BlobStore`` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from tickmesh.sdk.errors import NotFoundError, ValidationError
from tickmesh.sdk.ids import TENANT_ID_PATTERN
from tickmesh.v1 import payload_pb2

DEFAULT_INLINE_LIMIT = 256 * 1024
"""Payloads larger than this many bytes travel as a ``BlobRef`` (DESIGN.md §3)."""
MIN_OFFLOAD_BYTES = 1024
"""Payloads this small stay inline under any budget: a reference would be about as large."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Hashing this much on the event loop costs well under a millisecond; more goes to a thread.
_HASH_ON_LOOP_MAX = 256 * 1024


class BlobStore(Protocol):
    """Where payloads over the inline limit are kept, per tenant, by content."""

    async def put(self, tenant: str, data: bytes, content_type: str) -> payload_pb2.BlobRef:
        """Store ``data`` under ``tenant`` and return its reference (idempotent)."""
        ...

    async def get(self, tenant: str, uri: str) -> bytes:
        """Return the bytes at ``uri``, verified against their SHA-256.

        Raises:
            ValidationError: the URI is not one of ``tenant``'s, or the bytes fail
                their SHA-256 check.
            NotFoundError: nothing is stored at ``uri``.
        """
        ...

    async def exists(self, tenant: str, uri: str) -> bool:
        """Whether an object is stored at ``uri`` (which must be one of ``tenant``'s)."""
        ...

    async def close(self) -> None:
        """Release the store's resources."""
        ...


def payload_sha256(data: bytes) -> str:
    """Return the lowercase hex SHA-256 of ``data``, as ``Payload.sha256`` carries it."""
    return hashlib.sha256(data).hexdigest()


def _check_tenant(tenant: str) -> None:
    if TENANT_ID_PATTERN.fullmatch(tenant) is None:
        raise ValidationError(f"invalid tenant id {tenant!r}")


class LocalBlobStore:
    """A ``BlobStore`` on a local folder (the embedded profile).

    Writes go to a temporary file in the object's own directory, are fsynced
    (unless ``fsync=False``), and are moved into place with ``os.replace``, so a
    reader never sees a partial object and a crash leaves at most a stray
    temporary file. All file I/O runs off the event loop.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._root = Path(root).resolve()
        self._fsync = fsync

    @property
    def root(self) -> Path:
        """The folder objects are kept under (absolute, symlinks resolved)."""
        return self._root

    def path_for(self, tenant: str, sha256: str) -> Path:
        """Where the object with digest ``sha256`` of ``tenant`` is kept."""
        _check_tenant(tenant)
        if _SHA256_HEX.fullmatch(sha256) is None:
            raise ValidationError(f"invalid sha256 {sha256!r}")
        return self._root / tenant / sha256[:2] / sha256

    async def put(self, tenant: str, data: bytes, content_type: str) -> payload_pb2.BlobRef:
        _check_tenant(tenant)
        return await asyncio.to_thread(self._put_sync, tenant, data, content_type)

    async def get(self, tenant: str, uri: str) -> bytes:
        path, expected = self._path_from_uri(tenant, uri)
        return await asyncio.to_thread(self._get_sync, uri, path, expected)

    async def exists(self, tenant: str, uri: str) -> bool:
        path, _ = self._path_from_uri(tenant, uri)
        return await asyncio.to_thread(path.is_file)

    async def close(self) -> None:
        """Nothing to release: every operation opens and closes its own files."""

    def _put_sync(self, tenant: str, data: bytes, content_type: str) -> payload_pb2.BlobRef:
        digest = payload_sha256(data)
        path = self.path_for(tenant, digest)
        if not self._intact(path, digest):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_atomically(path, data)
        return payload_pb2.BlobRef(
            uri=path.as_uri(), sha256=digest, size=len(data), content_type=content_type
        )

    @staticmethod
    def _intact(path: Path, digest: str) -> bool:
        """Whether ``path`` already holds the object (a damaged copy is rewritten)."""
        try:
            return payload_sha256(path.read_bytes()) == digest
        except FileNotFoundError:
            return False

    def _write_atomically(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self._fsync:
            # The rename is durable only once the directory entry is.
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @staticmethod
    def _get_sync(uri: str, path: Path, expected: str) -> bytes:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {uri} does not exist") from None
        actual = payload_sha256(data)
        if actual != expected:
            raise ValidationError(
                f"blob {uri} failed its sha256 check: the stored bytes hash to {actual}"
            )
        return data

    def _path_from_uri(self, tenant: str, uri: str) -> tuple[Path, str]:
        """Map ``uri`` to a path under ``tenant``'s prefix, or refuse it."""
        _check_tenant(tenant)
        parts = urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise ValidationError(f"blob URI {uri!r} is not a file:// URI of this store")
        if parts.query or parts.fragment:
            raise ValidationError(f"blob URI {uri!r} has a query or fragment")
        raw = unquote(parts.path)
        segments = raw.split("/")
        # Reject traversal and anything not in canonical form before comparing prefixes.
        if segments[0] != "" or any(s in ("", ".", "..") or "\0" in s for s in segments[1:]):
            raise ValidationError(f"blob URI {uri!r} is not a canonical absolute path")
        path = Path(raw)
        prefix = self._root / tenant
        if path.parts[: len(prefix.parts)] != prefix.parts:
            raise ValidationError(f"blob URI {uri!r} lies outside tenant {tenant!r}'s prefix")
        rest = path.parts[len(prefix.parts) :]
        if len(rest) != 2 or _SHA256_HEX.fullmatch(rest[1]) is None or rest[0] != rest[1][:2]:
            raise ValidationError(f"blob URI {uri!r} does not name a stored object")
        return path, rest[1]


async def _sha256_off_loop(data: bytes) -> str:
    if len(data) <= _HASH_ON_LOOP_MAX:
        return payload_sha256(data)
    return await asyncio.to_thread(payload_sha256, data)


async def offload_payload(
    store: BlobStore, tenant: str, payload: payload_pb2.Payload, *, inline_limit: int
) -> payload_pb2.Payload:
    """Move an inline payload larger than ``inline_limit`` bytes to the blob store.

    Returns a payload with ``blob`` set and the same content type, size and
    SHA-256 (filled in when the original left them unset), or ``payload``
    itself when it is small enough or not inline.

    Raises:
        ValidationError: the payload's ``size`` or ``sha256`` does not match its bytes.
    """
    if payload.WhichOneof("data") != "inline" or len(payload.inline) <= inline_limit:
        return payload
    data = payload.inline
    if payload.size and payload.size != len(data):
        raise ValidationError(f"payload size {payload.size} != {len(data)} inline bytes")
    ref = await store.put(tenant, data, payload.content_type)
    if payload.sha256 and payload.sha256 != ref.sha256:
        raise ValidationError(f"payload sha256 {payload.sha256} != {ref.sha256} of its bytes")
    return payload_pb2.Payload(
        content_type=payload.content_type, blob=ref, size=len(data), sha256=ref.sha256
    )


async def offload_to_budget(
    store: BlobStore, tenant: str, payloads: Sequence[payload_pb2.Payload], *, budget: int
) -> None:
    """Move the largest of ``payloads`` to the blob store, in place, until those left
    inline hold at most ``budget`` bytes in all (or are all ``MIN_OFFLOAD_BYTES`` or less).

    Payloads that travel together (the inputs of a fan-out, the outputs a join gathers)
    share one budget, so that together they fit one message.

    Raises:
        ValidationError: as :func:`offload_payload`.
    """
    inline = [p for p in payloads if p.WhichOneof("data") == "inline"]
    total = sum(len(p.inline) for p in inline)
    leaving: list[payload_pb2.Payload] = []
    for payload in sorted(inline, key=lambda p: len(p.inline), reverse=True):
        size = len(payload.inline)
        if total <= budget or size <= MIN_OFFLOAD_BYTES:
            break
        leaving.append(payload)
        total -= size
    # Stored together: a fan-out of hundreds would otherwise wait for each write in turn.
    stored = await asyncio.gather(
        *(offload_payload(store, tenant, p, inline_limit=0) for p in leaving),
        return_exceptions=True,
    )
    for ref in stored:
        if isinstance(ref, BaseException):
            raise ref  # nothing replaced yet: the payloads stay as they came
    for payload, ref in zip(leaving, stored, strict=True):
        assert isinstance(ref, payload_pb2.Payload)
        payload.CopyFrom(ref)


async def resolve_payload(store: BlobStore, tenant: str, payload: payload_pb2.Payload) -> bytes:
    """Return a payload's bytes, inline or fetched from the blob store.

    The bytes are checked against ``payload.sha256`` (and ``payload.size``) when set.

    Raises:
        ValidationError: the bytes do not match the payload's digest or size, or
            the blob URI is not one of ``tenant``'s.
        NotFoundError: the blob does not exist.
    """
    kind = payload.WhichOneof("data")
    if kind == "blob":
        data = await store.get(tenant, payload.blob.uri)
    elif kind == "inline":
        data = payload.inline
    else:
        data = b""
    if payload.size and payload.size != len(data):
        raise ValidationError(f"payload size {payload.size} != {len(data)} bytes resolved")
    if payload.sha256:
        actual = await _sha256_off_loop(data)
        if actual != payload.sha256:
            raise ValidationError(f"payload sha256 {payload.sha256} != {actual} of its bytes")
    return data
