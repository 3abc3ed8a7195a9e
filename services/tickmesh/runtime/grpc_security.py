"""Who may call a service, and on what terms: TLS, API keys bound to tenants, deadlines.

Every gRPC server a service runs applies the same rules (documented in
docs/operators.md, "Securing the RPCs"):

* **TLS** with ``grpc_tls_cert``/``grpc_tls_key``; with ``grpc_tls_client_ca``
  too, clients must present a certificate that CA signed (mutual TLS). A client
  without one, or with one from another CA, fails the handshake (the caller sees
  UNAVAILABLE) and never reaches a handler.
* **API keys** with ``grpc_api_keys_file``: each call sends
  ``authorization: Bearer <key>``. The file maps tenants to the SHA-256 of their
  keys (never the keys themselves); ``"*"`` lists keys of tickmesh's own
  services, which may act for any tenant this process serves. A call with no
  key, or an unknown one, is UNAUTHENTICATED; a key of tenant A on a call that
  names tenant B (``x-tickmesh-tenant``) is PERMISSION_DENIED — and logged, since
  it is either a bug or an attack.
* **Deadlines** (``grpc_require_deadline``; off by default, on in the deployment
  examples): a unary call without a deadline is INVALID_ARGUMENT — a call that can
  wait forever holds a slot forever. Streams (watches, the executor session) are
  long-lived by nature and exempt, as is the health service (probes).
* Limits set elsewhere: message size (``max_message_bytes``, RESOURCE_EXHAUSTED
  past it) and concurrency (``grpc_max_concurrent_rpcs``, RESOURCE_EXHAUSTED
  past it). No server reflection is registered.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from tickmesh.sdk import ChannelSecurity, ConfigError
from tickmesh.sdk.ids import TENANT_ID_PATTERN

from .auth import TENANT_METADATA_KEY

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
ANY_TENANT = "*"
"""Keys listed under this name belong to tickmesh services: any tenant served here."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UNCHECKED_PREFIXES = ("/grpc.health.v1.Health/",)


def hash_key(key: str) -> str:
    """What the keys file stores for ``key``: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeys:
    """The API keys a server accepts: key hash -> tenant (or ``*``)."""

    tenant_by_hash: Mapping[str, str]

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        """Read a keys file: ``{tenant: [sha256 hex, ...]}``.

        Raises:
            ConfigError: The file is missing, not YAML, or names a malformed tenant or hash.
        """
        try:
            document = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the API keys file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not YAML: {exc}") from exc
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: expected a mapping of tenant to key hashes")
        by_hash: dict[str, str] = {}
        for tenant, hashes in document.items():
            if tenant != ANY_TENANT and not (
                isinstance(tenant, str) and TENANT_ID_PATTERN.fullmatch(tenant)
            ):
                raise ConfigError(f"{path}: {tenant!r} is not a tenant id (or '*')")
            if not isinstance(hashes, list):
                raise ConfigError(f"{path}: {tenant}: expected a list of SHA-256 hashes")
            for value in hashes:
                if not (isinstance(value, str) and _SHA256.fullmatch(value)):
                    raise ConfigError(
                        f"{path}: {tenant}: {value!r} is not a SHA-256 hash (64 lowercase hex "
                        "digits); store `tickmesh auth hash-key` output, never the key"
                    )
                if by_hash.setdefault(value, tenant) != tenant:
                    raise ConfigError(f"{path}: one key is listed under two tenants")
        return cls(by_hash)

    def tenant_for(self, key: str) -> str | None:
        """The tenant ``key`` acts for (``*``: any), or None for an unknown key."""
        digest = hash_key(key)
        for known, tenant in self.tenant_by_hash.items():
            if hmac.compare_digest(known, digest):
                return tenant
        return None


@dataclass(frozen=True)
class ServerSecurity:
    """A server's TLS material and call rules, from a service's settings."""

    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    client_ca: bytes | None = None
    api_keys: ApiKeys | None = None
    require_deadline: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> ServerSecurity:
        """Raises ConfigError for half a key pair or files that cannot be read."""
        cert, key, client_ca = (
            settings.grpc_tls_cert,
            settings.grpc_tls_key,
            settings.grpc_tls_client_ca,
        )
        if bool(cert) != bool(key):
            raise ConfigError("grpc_tls_cert and grpc_tls_key go together")
        if client_ca and not cert:
            raise ConfigError("grpc_tls_client_ca needs grpc_tls_cert and grpc_tls_key")
        return cls(
            tls_cert=_read(cert, "grpc_tls_cert"),
            tls_key=_read(key, "grpc_tls_key"),
            client_ca=_read(client_ca, "grpc_tls_client_ca"),
            api_keys=ApiKeys.load(settings.grpc_api_keys_file)
            if settings.grpc_api_keys_file
            else None,
            require_deadline=settings.grpc_require_deadline,
        )

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS server credentials, or None for a plaintext port."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.api_keys is None and not self.require_deadline:
            return []
        return [CallGuard(self.api_keys, require_deadline=self.require_deadline)]


def _read(path: str | None, setting: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {setting} {path}: {exc}") from exc


def client_security(settings: Any) -> ChannelSecurity | None:
    """How a service calls another (``grpc_client_*`` settings); None: plaintext, no key.

    Raises:
        ConfigError: A file cannot be read, or a certificate comes without its key.
    """
    key, ca = settings.grpc_client_api_key, settings.grpc_client_tls_ca
    cert, private = settings.grpc_client_tls_cert, settings.grpc_client_tls_key
    if not any((key, ca, cert, private)):
        return None
    return ChannelSecurity.from_files(api_key=key, ca=ca, cert=cert, key=private)


Rejection = tuple[grpc.StatusCode, str]
Handler = Any
"""A grpc.aio method handler (grpc's type stubs describe only the sync server's)."""


class CallGuard(grpc.aio.ServerInterceptor):
    """Checks each call's key against its tenant, and that unary calls carry a deadline."""

    def __init__(self, api_keys: ApiKeys | None, *, require_deadline: bool) -> None:
        self._keys = api_keys
        self._require_deadline = require_deadline

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(_UNCHECKED_PREFIXES):
            return handler
        rejection = self._authenticate(method, details.invocation_metadata or ())
        unary = not handler.request_streaming and not handler.response_streaming
        return _guarded(handler, rejection, deadline=unary and self._require_deadline)

    def _authenticate(self, method: str, metadata: Any) -> Rejection | None:
        if self._keys is None:
            return None
        values = {key: value for key, value in metadata}
        token = str(values.get(AUTHORIZATION_KEY, ""))
        if not token.startswith("Bearer ") or not token.removeprefix("Bearer ").strip():
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"no API key: send '{AUTHORIZATION_KEY}: Bearer <key>'"
            )
        owner = self._keys.tenant_for(token.removeprefix("Bearer ").strip())
        if owner is None:
            logger.warning("rejected %s: unknown API key", method)
            return grpc.StatusCode.UNAUTHENTICATED, "unknown API key"
        # Every tenant entry is checked, not the one a dict keeps: the services refuse a
        # call naming several, and a key must not pass on the strength of one of them.
        claims = [value for key, value in metadata if key == TENANT_METADATA_KEY]
        claimed = next((c for c in claims if c != owner), None)
        if owner != ANY_TENANT and claimed is not None:
            # Either a misconfigured client or one trying another tenant's data: recorded.
            logger.warning(
                "rejected %s: a key of tenant %r used for tenant %r", method, owner, claimed
            )
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"this API key belongs to another tenant than {claimed!r}"
            )
        return None


def _guarded(handler: Handler, rejection: Rejection | None, *, deadline: bool) -> Handler:
    """``handler`` with ``rejection`` (if any) answered before it runs, and the deadline
    checked for unary calls."""
    if rejection is None and not deadline:
        return handler

    async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if rejection is not None:
            await context.abort(*rejection)
        if deadline and context.time_remaining() is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the call has no deadline: set a timeout on every call",
            )

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            await check(context)
            async for item in _responses(inner_us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **serializers)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)
    inner_ss = handler.stream_stream

    async def stream_stream(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await check(context)
        async for item in _responses(inner_ss(requests, context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **serializers)


async def _responses(result: Any) -> AsyncIterator[Any]:
    """The responses of a streaming handler, whether it yields them or writes them
    itself (``context.write``) and returns."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    else:
        await result
