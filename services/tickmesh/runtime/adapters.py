"""Opens the storage adapters a URL names, importing cloud drivers only when used.

The embedded profile needs nothing beyond the package: folders, SQLite and
in-process counters. ``s3://`` and ``redis://`` URLs load aioboto3 and redis-py
(the ``cloud`` extra) on first use, and each adapter is checked before a service
starts serving, so a wrong URL or a missing bucket stops the start with a clear
message instead of failing the first step.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from tickmesh.sdk.errors import ConfigError

from .blobs import BlobStore, LocalBlobStore
from .counters import UsageCounter

REDIS_SCHEMES = ("redis", "rediss", "unix")


async def open_blob_store(
    url: str,
    *,
    fsync: bool = True,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> BlobStore:
    """A blob store for ``url``: a folder (a path or ``file://``) or ``s3://bucket/prefix``.

    S3 credentials are ``access_key_id`` and ``secret_access_key`` when both are given,
    else whatever the standard AWS chain provides.

    Raises:
        ConfigError: the scheme is unknown, the cloud extra is missing, or the bucket
            cannot be reached.
    """
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        try:
            from .blobs_s3 import S3BlobStore
        except ImportError as exc:
            raise ConfigError(
                f"{url}: S3 blobs need the cloud extra (pip install 'tickmesh[cloud]'): {exc}"
            ) from exc
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigError("give both s3_access_key_id and s3_secret_access_key, or neither")
        credentials = (
            {"access_key_id": access_key_id, "secret_access_key": secret_access_key}
            if access_key_id is not None
            else {}
        )
        store = S3BlobStore.from_url(url, **credentials)
        try:
            await store.check()
        except BaseException:
            await store.close()
            raise
        return store
    if scheme == "file":
        return LocalBlobStore(Path(unquote(urlsplit(url).path)), fsync=fsync)
    if scheme == "":
        return LocalBlobStore(Path(url), fsync=fsync)
    raise ConfigError(f"unsupported blob URL {url!r}: expected a folder, file:// or s3://")


async def open_usage_counter(url: str) -> UsageCounter:
    """Tenant usage counters at ``url`` (``redis://``, ``rediss://`` or ``unix://``).

    Raises:
        ConfigError: the scheme is unknown, the cloud extra is missing, or Redis does
            not answer.
    """
    scheme = urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES:
        raise ConfigError(f"unsupported usage counter URL {url!r}: expected redis://")
    try:
        from .counters_redis import RedisUsageCounter
    except ImportError as exc:
        raise ConfigError(
            f"Redis counters need the cloud extra (pip install 'tickmesh[cloud]'): {exc}"
        ) from exc
    return await RedisUsageCounter.open(url)
