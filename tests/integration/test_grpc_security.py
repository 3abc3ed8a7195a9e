"""The gRPC security matrix: each way a call can be wrong gets its documented status code
(docs/operators.md, "Securing the RPCs"), on a real service over mutual TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.nats_configs import TlsFiles, make_tls_files
from tests.support.nats_server import new_tenant
from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.guardrail.server import GuardrailService, build
from tickmesh.router.config import RouterSettings
from tickmesh.router.replay import StateRpcHistorySource
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.adapters import open_blob_store
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.grpc_security import ApiKeys, client_security, hash_key
from tickmesh.sdk import ChannelSecurity, ConfigError, TransportError
from tickmesh.sdk._transport import create_channel
from tickmesh.state import server as state_server
from tickmesh.state.config import StateSettings
from tickmesh.v1 import (
    guardrail_pb2,
    guardrail_service_pb2,
    guardrail_service_pb2_grpc,
    header_pb2,
)

KEY_A = "tm_key_of_tenant_a"
KEY_B = "tm_key_of_tenant_b"
SERVICE_KEY = "tm_key_of_the_services"
MAX_MESSAGE = 64 * 1024


@dataclass
class Secured:
    service: GuardrailService
    tls: TlsFiles
    other_ca: TlsFiles
    tenant_a: str
    tenant_b: str

    def channel(
        self, *, cert: bool = True, other_ca: bool = False, key: str | None = None
    ) -> grpc.aio.Channel:
        client = self.other_ca if other_ca else self.tls
        security = ChannelSecurity(
            api_key=key,
            root_certificates=self.tls.ca_cert.read_bytes(),
            certificate_chain=client.client_cert.read_bytes() if cert else None,
            private_key=client.client_key.read_bytes() if cert else None,
        )
        return create_channel(
            f"localhost:{self.service.grpc.port}",
            security=security,
            options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE)],
        )


@pytest.fixture
async def secured(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Secured]:
    tls = make_tls_files(tmp_path / "tls")
    other = make_tls_files(tmp_path / "other-ca")
    a, b = new_tenant("sa"), new_tenant("sb")
    keys = tmp_path / "api-keys.yaml"
    keys.write_text(
        f'{a}: ["{hash_key(KEY_A)}"]\n'
        f'{b}: ["{hash_key(KEY_B)}"]\n'
        f'"*": ["{hash_key(SERVICE_KEY)}"]\n'
    )
    settings = GuardrailSettings(
        nats_url=nats_server.url,
        tenants=[a, b],
        grpc_listen="127.0.0.1:0",
        log_json=False,
        grpc_tls_cert=str(tls.server_cert),
        grpc_tls_key=str(tls.server_key),
        grpc_tls_client_ca=str(tls.ca_cert),
        grpc_api_keys_file=str(keys),
        grpc_require_deadline=True,
        grpc_max_concurrent_rpcs=4,
        max_message_bytes=MAX_MESSAGE,
    )
    nc = await runtime_nats.connect(nats_server.url, name="security-matrix")
    service = await build(settings, nc=nc)
    await service.start()
    try:
        yield Secured(service, tls, other, a, b)
    finally:
        await service.stop()
        await nc.close()


async def _list(
    channel: grpc.aio.Channel, tenant: str, *, deadline_s: float | None = 5.0
) -> guardrail_service_pb2.ListPoliciesResponse:
    stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
    response: guardrail_service_pb2.ListPoliciesResponse = await stub.ListPolicies(
        guardrail_service_pb2.ListPoliciesRequest(),
        metadata=(("x-tickmesh-tenant", tenant),),
        timeout=deadline_s,
    )
    return response


async def _code(call: asyncio.Future[object] | object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_the_security_matrix(secured: Secured, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = secured.tenant_a, secured.tenant_b
    cases: list[tuple[str, grpc.StatusCode, grpc.StatusCode]] = []

    async def case(
        name: str, expected: grpc.StatusCode, channel: grpc.aio.Channel, **kw: object
    ) -> None:
        async with channel:
            tenant = str(kw.pop("tenant", a))
            got = await _code(_list(channel, tenant, **kw))  # type: ignore[arg-type]
        cases.append((name, expected, got))

    await case("valid cert, key and tenant", grpc.StatusCode.OK, secured.channel(key=KEY_A))
    await case(
        "no client certificate", grpc.StatusCode.UNAVAILABLE, secured.channel(cert=False, key=KEY_A)
    )
    await case(
        "certificate from another CA",
        grpc.StatusCode.UNAVAILABLE,
        secured.channel(other_ca=True, key=KEY_A),
    )
    await case("missing API key", grpc.StatusCode.UNAUTHENTICATED, secured.channel())
    await case("unknown API key", grpc.StatusCode.UNAUTHENTICATED, secured.channel(key="tm_forged"))
    await case(
        "key of tenant A, call for tenant B",
        grpc.StatusCode.PERMISSION_DENIED,
        secured.channel(key=KEY_A),
        tenant=b,
    )
    await case(
        "service key, any served tenant",
        grpc.StatusCode.OK,
        secured.channel(key=SERVICE_KEY),
        tenant=b,
    )
    await case(
        "service key, a tenant not served here",
        grpc.StatusCode.PERMISSION_DENIED,
        secured.channel(key=SERVICE_KEY),
        tenant="nobody",
    )
    await case(
        "missing deadline",
        grpc.StatusCode.INVALID_ARGUMENT,
        secured.channel(key=KEY_A),
        deadline_s=None,
    )

    # a request over max_message_bytes
    async with secured.channel(key=KEY_A) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        huge = guardrail_service_pb2.ValidatePolicyRequest(source="x" * (2 * MAX_MESSAGE))
        got = await _code(
            stub.ValidatePolicy(huge, metadata=(("x-tickmesh-tenant", a),), timeout=5)
        )
        cases.append(("oversized request", grpc.StatusCode.RESOURCE_EXHAUSTED, got))

    # a step of tenant B evaluated with tenant A's credentials
    async with secured.channel(key=KEY_A) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        item = guardrail_service_pb2.EvaluationItem(
            header=header_pb2.EnvelopeHeader(tenant_id=b, lifetime_id="x"),
            phase=guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH,
        )
        got = await _code(
            stub.Evaluate(
                guardrail_service_pb2.EvaluateRequest(items=[item]),
                metadata=(("x-tickmesh-tenant", a),),
                timeout=5,
            )
        )
        cases.append(("body names another tenant", grpc.StatusCode.PERMISSION_DENIED, got))

    # more calls at once than grpc_max_concurrent_rpcs: watches hold their slots
    async with secured.channel(key=KEY_A) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        watches = [
            stub.WatchPolicies(
                guardrail_service_pb2.WatchPoliciesRequest(), metadata=(("x-tickmesh-tenant", a),)
            )
            for _ in range(4)
        ]
        for watch in watches:
            await watch.read()  # the current snapshot: the watch is being served
        got = await _code(_list(channel, a))
        for watch in watches:
            watch.cancel()
        cases.append(("over the concurrency limit", grpc.StatusCode.RESOURCE_EXHAUSTED, got))

    # no reflection; health answers probes without a key or a deadline
    async with secured.channel() as channel:
        reflection: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        cases.append(
            (
                "server reflection",
                grpc.StatusCode.UNIMPLEMENTED,
                await _code(reflection(b"", timeout=5)),
            )
        )
        health: Any = health_pb2_grpc.HealthStub(channel)  # the health stubs are untyped
        status = await health.Check(health_pb2.HealthCheckRequest())
        cases.append(
            (
                "health probe without key or deadline",
                grpc.StatusCode.OK,
                grpc.StatusCode.OK
                if status.status == health_pb2.HealthCheckResponse.SERVING
                else grpc.StatusCode.UNKNOWN,
            )
        )

    with capsys.disabled():
        width = max(len(name) for name, _, _ in cases)
        print()  # noqa: T201 - the matrix is a figure worth seeing
        for name, expected, got in cases:
            print(f"  {name:<{width}}  expected {expected.name:<18} got {got.name}")  # noqa: T201
    assert [(name, got) for name, _, got in cases] == [(name, want) for name, want, _ in cases]


def test_a_keys_file_holds_hashes_of_known_tenants_only(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(f'acme: ["{hash_key("k1")}"]\n')
    keys = ApiKeys.load(good)
    assert keys.tenant_for("k1") == "acme"
    assert keys.tenant_for("k2") is None
    for text, message in [
        ('acme: ["k1"]\n', "not a SHA-256 hash"),
        (f'"Not A Tenant": ["{hash_key("k")}"]\n', "not a tenant id"),
        (f'a: ["{hash_key("k")}"]\nb: ["{hash_key("k")}"]\n', "two tenants"),
        ("- just a list\n", "mapping of tenant"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            ApiKeys.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        ApiKeys.load(tmp_path / "missing.yaml")


async def test_services_call_a_secured_state_service_with_their_own_credentials(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """The router reads fork/replay history from the state service: over mutual TLS with
    a service key when the state service requires them, and only then."""
    tls = make_tls_files(tmp_path / "tls")
    tenant = new_tenant("ss")
    keys = tmp_path / "api-keys.yaml"
    keys.write_text(f'"*": ["{hash_key(SERVICE_KEY)}"]\n')
    settings = StateSettings(
        nats_url=nats_server.url,
        tenants=[tenant],
        grpc_listen="127.0.0.1:0",
        log_json=False,
        store_url=f"sqlite:///{tmp_path / 'state.db'}",
        blob_url=str(tmp_path / "blobs"),
        grpc_tls_cert=str(tls.server_cert),
        grpc_tls_key=str(tls.server_key),
        grpc_tls_client_ca=str(tls.ca_cert),
        grpc_api_keys_file=str(keys),
        grpc_require_deadline=True,
    )
    nc = await runtime_nats.connect(nats_server.url, name="secured-state")
    store = await state_server.open_settings_store(settings)
    blobs = await open_blob_store(settings.blob_url)
    state = await state_server.build(settings, nc=nc, store=store, blobs=blobs)
    await state.start()
    target = f"localhost:{state.grpc.port}"
    router = RouterSettings(
        tenants=[tenant],
        state_target=target,
        grpc_client_api_key=SERVICE_KEY,
        grpc_client_tls_ca=str(tls.ca_cert),
        grpc_client_tls_cert=str(tls.client_cert),
        grpc_client_tls_key=str(tls.client_key),
    )
    with_credentials = StateRpcHistorySource(target, security=client_security(router))
    without = StateRpcHistorySource(target)
    plain_tls_no_key = StateRpcHistorySource(
        target,
        security=ChannelSecurity(
            root_certificates=tls.ca_cert.read_bytes(),
            certificate_chain=tls.client_cert.read_bytes(),
            private_key=tls.client_key.read_bytes(),
        ),
    )
    try:
        assert await with_credentials.executions(tenant, "no-such-lifetime") == []
        # A plaintext channel to a TLS server gets no answer: UNAVAILABLE to the router's callers.
        with pytest.raises(TransportError, match=target) as plaintext:
            await without.executions(tenant, "no-such-lifetime")
        cause = plaintext.value.__cause__
        assert isinstance(cause, grpc.aio.AioRpcError)
        assert cause.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as keyless:
            await plain_tls_no_key.executions(tenant, "no-such-lifetime")
        assert keyless.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for source in (with_credentials, without, plain_tls_no_key):
            await source.close()
        await state.stop()
        await nc.close()
