"""The cloud profile's blob store: S3 (or any S3-compatible service) through aioboto3.

Objects are content-addressed like :class:`~tickmesh.runtime.blobs.LocalBlobStore`'s:
the key is ``<prefix>/<tenant>/<sha[:2]>/<sha>`` and the URI ``s3://<bucket>/<key>``.
A URI that is not exactly the canonical one of the caller's tenant is refused
before any request, so a crafted reference cannot reach another tenant's (or
another bucket's) objects.

aioboto3 and botocore (the ``cloud`` extra) are imported on first use, so
:func:`blob_store_from_url` also serves the embedded profile without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, cast
from urllib.parse import parse_qs, unquote, urlsplit

from tickmesh.sdk.errors import ConfigError, NotFoundError, TransportError, ValidationError
from tickmesh.sdk.ids import TENANT_ID_PATTERN
from tickmesh.v1 import payload_pb2

from .blobs import BlobStore, LocalBlobStore, payload_sha256

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 8 * MIB
DEFAULT_PART_SIZE = 8 * MIB
MIN_PART_SIZE = 5 * MIB
"""S3 refuses parts smaller than this, except the last one."""
MAX_PARTS = 10_000
"""S3's limit on parts per upload; larger objects get proportionally larger parts."""
PART_UPLOAD_CONCURRENCY = 4
"""Parts in flight at once: enough to fill a link, few enough to bound memory and sockets."""

CHECK_TIMEOUT = 15.0
"""Seconds :meth:`S3BlobStore.check` waits for the bucket to answer."""

SseMode = Literal["AES256", "aws:kms"]
_SSE_MODES: tuple[SseMode, ...] = ("AES256", "aws:kms")
_URL_OPTIONS = ("region", "endpoint_url", "sse", "kms_key_id")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# S3's bucket naming rules (lowercase letters, digits, dots and hyphens; 3-63 characters).
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_HASH_ON_LOOP_MAX = 256 * 1024
# Error codes that mean the store is misconfigured (credentials, bucket, policy),
# not that one object is missing or the service is briefly unreachable.
_CONFIG_ERROR_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
    }
)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _check_tenant(tenant: str) -> None:
    if TENANT_ID_PATTERN.fullmatch(tenant) is None:
        raise ValidationError(f"invalid tenant id {tenant!r}")


def _normalize_prefix(prefix: str) -> str:
    """Strip the slashes around ``prefix`` and refuse segments that are not plain names."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    for segment in stripped.split("/"):
        if _PREFIX_SEGMENT.fullmatch(segment) is None or segment in (".", ".."):
            raise ConfigError(
                f"S3 key prefix {prefix!r} has the segment {segment!r}: use names of "
                "letters, digits, '.', '_' and '-' separated by single slashes"
            )
    return stripped


async def _sha256_off_loop(data: bytes) -> str:
    if len(data) <= _HASH_ON_LOOP_MAX:
        return payload_sha256(data)
    return await asyncio.to_thread(payload_sha256, data)


@contextlib.contextmanager
def _s3_errors(action: str, where: str) -> Iterator[None]:
    """Map botocore's errors for ``action`` on ``where`` into tickmesh's error tree."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND_CODES:
            raise NotFoundError(f"blob {where} does not exist") from exc
        if code in _CONFIG_ERROR_CODES:
            raise ConfigError(
                f"S3 refused to {action} {where} ({code}): check the bucket, the "
                f"credentials and their permissions: {exc}"
            ) from exc
        raise TransportError(f"S3 failed to {action} {where}: {exc}") from exc
    except NoCredentialsError as exc:
        raise ConfigError(
            f"no AWS credentials to {action} {where}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, a profile, or an instance role"
        ) from exc
    except BotoCoreError as exc:
        raise TransportError(f"could not reach S3 to {action} {where}: {exc}") from exc


class S3BlobStore:
    """A ``BlobStore`` in an S3 bucket (the cloud profile).

    One client is created on :meth:`open` (or on first use) and kept until
    :meth:`close`. Credentials not given here come from the standard AWS chain
    (environment, profile, instance or task role). With ``endpoint_url`` set
    (MinIO, moto, other S3-compatible services) requests use path-style
    addressing, which those services expect.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        server_side_encryption: SseMode | None = None,
        kms_key_id: str | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        if _BUCKET_NAME.fullmatch(bucket) is None:
            raise ConfigError(
                f"invalid S3 bucket name {bucket!r}: use 3-63 lowercase letters, digits, "
                "dots and hyphens"
            )
        if server_side_encryption not in (None, *_SSE_MODES):
            raise ConfigError(
                f"unknown server-side encryption {server_side_encryption!r}: use AES256 or aws:kms"
            )
        if kms_key_id and server_side_encryption != "aws:kms":
            raise ConfigError("kms_key_id needs server_side_encryption='aws:kms'")
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigError("give both access_key_id and secret_access_key, or neither")
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"part_size {part_size} is below S3's minimum of {MIN_PART_SIZE}")
        if multipart_threshold < 1:
            raise ConfigError(f"multipart_threshold must be positive, not {multipart_threshold}")
        if endpoint_url is not None and urlsplit(endpoint_url).scheme not in ("http", "https"):
            raise ConfigError(f"S3 endpoint_url {endpoint_url!r} must be an http(s):// URL")
        self._bucket = bucket
        self._prefix = _normalize_prefix(prefix)
        self._endpoint_url = endpoint_url
        self._region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._sse = server_side_encryption
        self._kms_key_id = kms_key_id
        self._multipart_threshold = multipart_threshold
        self._part_size = part_size
        self._client: S3Client | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> S3BlobStore:
        """A store for ``s3://bucket/prefix?region=..&endpoint_url=..&sse=..&kms_key_id=..``.

        ``overrides`` are passed to the constructor (credentials, part sizes) and
        win over the URL. The store is not opened yet.

        Raises:
            ConfigError: the URL is not a well-formed ``s3://`` URL or has an
                unknown or repeated option.
        """
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise ConfigError(f"S3 blob URL {url!r} must start with s3://")
        if parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
            raise ConfigError(
                f"S3 blob URL {url!r} must be s3://bucket/prefix?options, without "
                "credentials, port or fragment (credentials come from the AWS chain)"
            )
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(query) - set(_URL_OPTIONS))
        if unknown:
            raise ConfigError(
                f"S3 blob URL {url!r} has unknown option(s) {', '.join(unknown)}: "
                f"use {', '.join(_URL_OPTIONS)}"
            )
        options: dict[str, str] = {}
        for name, values in query.items():
            if len(values) != 1 or not values[0]:
                raise ConfigError(f"S3 blob URL {url!r} must give option {name!r} once, non-empty")
            options[name] = values[0]
        settings: dict[str, Any] = {
            "prefix": unquote(parts.path),
            "endpoint_url": options.get("endpoint_url"),
            "region": options.get("region"),
            "server_side_encryption": options.get("sse"),
            "kms_key_id": options.get("kms_key_id"),
        }
        settings.update(overrides)
        return cls(parts.netloc, **settings)

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        """The key prefix, without leading or trailing slashes ('' for none)."""
        return self._prefix

    def key_for(self, tenant: str, sha256: str) -> str:
        """The key of the object with digest ``sha256`` of ``tenant``."""
        _check_tenant(tenant)
        if _SHA256_HEX.fullmatch(sha256) is None:
            raise ValidationError(f"invalid sha256 {sha256!r}")
        return f"{self._tenant_prefix(tenant)}{sha256[:2]}/{sha256}"

    def uri_for(self, tenant: str, sha256: str) -> str:
        """The ``s3://`` URI of the object with digest ``sha256`` of ``tenant``."""
        return f"s3://{self._bucket}/{self.key_for(tenant, sha256)}"

    async def open(self) -> Self:
        """Create the client (once); later calls return at once."""
        await self._s3()
        return self

    async def close(self) -> None:
        """Close the client; the store cannot be used afterwards."""
        self._closed = True
        stack, self._exit_stack, self._client = self._exit_stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def check(self) -> None:
        """Fail fast when the bucket cannot be used, so a service stops at startup.

        Raises:
            ConfigError: the bucket does not exist or is not accessible.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = await self._s3()
        where = self._endpoint_url or f"AWS S3 ({self._region or 'default region'})"
        try:
            # Retries are for steady-state blips; at startup a silent endpoint is an error.
            async with asyncio.timeout(CHECK_TIMEOUT):
                await s3.head_bucket(Bucket=self._bucket)
        except TimeoutError as exc:
            raise ConfigError(
                f"bucket {self._bucket} does not exist or is not accessible at {where}: "
                f"no answer within {CHECK_TIMEOUT:.0f} s"
            ) from exc
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(
                f"bucket {self._bucket} does not exist or is not accessible at {where}: {exc}"
            ) from exc

    async def put(self, tenant: str, data: bytes, content_type: str) -> payload_pb2.BlobRef:
        _check_tenant(tenant)
        digest = await _sha256_off_loop(data)
        key = self.key_for(tenant, digest)
        uri = f"s3://{self._bucket}/{key}"
        ref = payload_pb2.BlobRef(uri=uri, sha256=digest, size=len(data), content_type=content_type)
        if await self._holds(key, uri, digest, len(data)):
            return ref
        if len(data) > self._multipart_threshold:
            await self._put_multipart(key, uri, data, digest, content_type)
        else:
            s3 = await self._s3()
            with _s3_errors("write", uri):
                await s3.put_object(
                    Bucket=self._bucket,
                    Key=key,
                    Body=data,
                    ContentType=content_type,
                    Metadata={"sha256": digest},
                    **self._sse_args(),
                )
        return ref

    async def get(self, tenant: str, uri: str) -> bytes:
        key, expected = self._key_from_uri(tenant, uri)
        s3 = await self._s3()
        with _s3_errors("read", uri):
            response = await s3.get_object(Bucket=self._bucket, Key=key)
            async with response["Body"] as body:
                data = await body.read()
        actual = await _sha256_off_loop(data)
        if actual != expected:
            raise ValidationError(
                f"blob {uri} failed its sha256 check: the stored bytes hash to {actual}"
            )
        return data

    async def exists(self, tenant: str, uri: str) -> bool:
        key, _ = self._key_from_uri(tenant, uri)
        try:
            await self._head(key, uri)
        except NotFoundError:
            return False
        return True

    async def _s3(self) -> S3Client:
        if self._client is not None:
            return self._client
        async with self._open_lock:
            if self._closed:
                raise RuntimeError("this S3BlobStore is closed")
            if self._client is None:
                self._client = await self._create_client()
        return self._client

    async def _create_client(self) -> S3Client:
        try:
            import aioboto3
            from aiobotocore.config import AioConfig
        except ImportError as exc:
            raise ConfigError(
                f"S3 blobs need the cloud extra (pip install 'tickmesh[cloud]'): {exc}"
            ) from exc
        session = aioboto3.Session(
            aws_access_key_id=self._access_key_id,
            aws_secret_access_key=self._secret_access_key,
            region_name=self._region,
        )
        config = AioConfig(
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 5, "mode": "standard"},
            # Enough pooled connections for the parts of one upload plus concurrent gets.
            max_pool_connections=4 * PART_UPLOAD_CONCURRENCY,
            s3={"addressing_style": "path" if self._endpoint_url else "auto"},
        )
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            session.client("s3", endpoint_url=self._endpoint_url, config=config)
        )
        self._exit_stack = stack
        return client

    def _tenant_prefix(self, tenant: str) -> str:
        return f"{self._prefix}/{tenant}/" if self._prefix else f"{tenant}/"

    def _sse_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self._sse is not None:
            args["ServerSideEncryption"] = self._sse
        if self._kms_key_id:
            args["SSEKMSKeyId"] = self._kms_key_id
        return args

    async def _head(self, key: str, uri: str) -> dict[str, Any]:
        s3 = await self._s3()
        with _s3_errors("look up", uri):
            return cast(dict[str, Any], await s3.head_object(Bucket=self._bucket, Key=key))

    async def _holds(self, key: str, uri: str, digest: str, size: int) -> bool:
        """Whether ``key`` already holds these bytes, so the put can be skipped.

        The size and the digest recorded at write time must both match: an object
        replaced behind the store's back carries neither, and is rewritten.
        """
        try:
            head = await self._head(key, uri)
        except NotFoundError:
            return False
        return bool(
            head.get("ContentLength") == size and head.get("Metadata", {}).get("sha256") == digest
        )

    async def _put_multipart(
        self, key: str, uri: str, data: bytes, digest: str, content_type: str
    ) -> None:
        s3 = await self._s3()
        part_size = max(self._part_size, math.ceil(len(data) / MAX_PARTS))
        # Like boto3's transfer manager: when botocore adds checksums by default,
        # declare the algorithm up front and send each part's checksum on completion.
        checksum: dict[str, Any] = {}
        # (The setting is missing from botocore's stubs, hence getattr.)
        if getattr(s3.meta.config, "request_checksum_calculation", None) == "when_supported":
            checksum["ChecksumAlgorithm"] = "CRC32"
        with _s3_errors("start an upload of", uri):
            created = await s3.create_multipart_upload(
                Bucket=self._bucket,
                Key=key,
                ContentType=content_type,
                Metadata={"sha256": digest},
                **self._sse_args(),
                **checksum,
            )
        upload_id = created["UploadId"]
        view = memoryview(data)
        slots = asyncio.Semaphore(PART_UPLOAD_CONCURRENCY)

        async def upload_part(number: int, start: int) -> CompletedPartTypeDef:
            async with slots:
                with _s3_errors(f"upload part {number} of", uri):
                    answer = await s3.upload_part(
                        Bucket=self._bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=bytes(view[start : start + part_size]),
                        **checksum,
                    )
            part: CompletedPartTypeDef = {"ETag": answer["ETag"], "PartNumber": number}
            if "ChecksumCRC32" in answer:
                part["ChecksumCRC32"] = answer["ChecksumCRC32"]
            return part

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(upload_part(number, start))
                    for number, start in enumerate(range(0, len(data), part_size), start=1)
                ]
            with _s3_errors("complete the upload of", uri):
                await s3.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": [task.result() for task in tasks]},
                )
        except BaseException:
            await self._abort_upload(s3, key, uri, upload_id)
            raise

    async def _abort_upload(self, s3: S3Client, key: str, uri: str, upload_id: str) -> None:
        """Abort a failed upload, so its parts are not kept (and billed) forever."""
        try:
            with _s3_errors("abort the upload of", uri):
                await s3.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
        except (TransportError, ConfigError, NotFoundError):
            logger.warning(
                "could not abort multipart upload %s of %s; a bucket lifecycle rule for "
                "incomplete uploads will remove its parts",
                upload_id,
                uri,
                exc_info=True,
            )

    def _key_from_uri(self, tenant: str, uri: str) -> tuple[str, str]:
        """Map ``uri`` to a key under ``tenant``'s prefix, or refuse it."""
        _check_tenant(tenant)
        parts = urlsplit(uri)
        if parts.scheme != "s3" or parts.netloc != self._bucket:
            raise ValidationError(f"blob URI {uri!r} is not an s3:// URI of bucket {self._bucket}")
        if "?" in uri or "#" in uri:
            raise ValidationError(f"blob URI {uri!r} has a query or fragment")
        key = parts.path.removeprefix("/")
        segments = key.split("/")
        # Keys this store writes never hold escapes, empty or dot segments: anything
        # else is a traversal attempt or a foreign object, refused before comparing.
        if not parts.path.startswith("/") or any(
            s in ("", ".", "..") or "%" in s or "\\" in s for s in segments
        ):
            raise ValidationError(f"blob URI {uri!r} is not a canonical S3 key")
        tenant_prefix = self._tenant_prefix(tenant)
        if not key.startswith(tenant_prefix):
            raise ValidationError(f"blob URI {uri!r} lies outside tenant {tenant!r}'s prefix")
        rest = key[len(tenant_prefix) :].split("/")
        if len(rest) != 2 or _SHA256_HEX.fullmatch(rest[1]) is None or rest[0] != rest[1][:2]:
            raise ValidationError(f"blob URI {uri!r} does not name a stored object")
        return key, rest[1]


def blob_store_from_url(url: str, *, local_fsync: bool = True) -> BlobStore:
    """The blob store ``url`` names: a folder (a path or ``file://``) or ``s3://bucket/prefix``.

    An S3 store is returned unopened; call its ``check()`` before serving.

    Raises:
        ConfigError: the scheme is not one of these, or the URL is malformed.
    """
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return S3BlobStore.from_url(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ConfigError(f"blob URL {url!r} must be file:///absolute/path")
        return LocalBlobStore(Path(unquote(parts.path)), fsync=local_fsync)
    if parts.scheme == "" and url:
        return LocalBlobStore(Path(url), fsync=local_fsync)
    raise ConfigError(f"unsupported blob URL {url!r}: expected a folder, file:// or s3://")
