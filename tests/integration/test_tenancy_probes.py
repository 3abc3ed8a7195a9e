"""Probes of tenant isolation at its edges: the tenant a call acts for, on a real service
over real NATS, and the tenant registry and CLI fed what an operator may get wrong."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.support.nats_configs import TlsFiles, make_tls_files
from tests.support.nats_server import new_tenant
from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.guardrail.server import GuardrailService, build
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.grpc_security import hash_key
from tickmesh.sdk import ChannelSecurity
from tickmesh.sdk._transport import create_channel
from tickmesh.v1 import guardrail_service_pb2, guardrail_service_pb2_grpc

KEY_A = "tm_probe_key_of_tenant_a"
KEY_B = "tm_probe_key_of_tenant_b"
POLICY = """\
policy: only-b-has-this
rules:
  - id: too-many-calls
    scope: execution
    when: tool_calls > 3
    action: abort_lifetime
"""


class Guardrail:
    def __init__(self, service: GuardrailService, tls: TlsFiles, a: str, b: str) -> None:
        self.service, self.a, self.b = service, a, b
        self._tls = tls

    def channel(self, key: str) -> grpc.aio.Channel:
        security = ChannelSecurity(
            api_key=key,
            root_certificates=self._tls.ca_cert.read_bytes(),
            certificate_chain=self._tls.client_cert.read_bytes(),
            private_key=self._tls.client_key.read_bytes(),
        )
        return create_channel(f"localhost:{self.service.grpc.port}", security=security)


@pytest.fixture
async def guardrail(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Guardrail]:
    a, b = new_tenant("pa"), new_tenant("pb")
    keys = tmp_path / "api-keys.yaml"
    keys.write_text(f'{a}: ["{hash_key(KEY_A)}"]\n{b}: ["{hash_key(KEY_B)}"]\n')
    tls = make_tls_files(tmp_path / "tls")
    settings = GuardrailSettings(
        nats_url=nats_server.url,
        tenants=[a, b],
        grpc_listen="127.0.0.1:0",
        log_json=False,
        grpc_tls_cert=str(tls.server_cert),
        grpc_tls_key=str(tls.server_key),
        grpc_tls_client_ca=str(tls.ca_cert),
        grpc_api_keys_file=str(keys),
    )
    nc = await runtime_nats.connect(nats_server.url, name="tenancy-probes")
    service = await build(settings, nc=nc)
    await service.start()
    try:
        yield Guardrail(service, tls, a, b)
    finally:
        await service.stop()
        await nc.close()


async def test_a_key_cannot_reach_another_tenant_by_naming_two_tenants(
    guardrail: Guardrail,
) -> None:
    a, b = guardrail.a, guardrail.b
    async with guardrail.channel(KEY_B) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        await stub.PutPolicy(
            guardrail_service_pb2.PutPolicyRequest(source=POLICY),
            metadata=(("x-tickmesh-tenant", b),),
            timeout=10,
        )
    # Tenant A's key, with B's name first and A's last: the key check and the servicer
    # must not read different entries.
    for names in ((b, a), (a, b)):
        async with guardrail.channel(KEY_A) as channel:
            stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
            call = stub.ListPolicies(
                guardrail_service_pb2.ListPoliciesRequest(),
                metadata=tuple(("x-tickmesh-tenant", name) for name in names),
                timeout=10,
            )
            try:
                listed = await call
            except grpc.aio.AioRpcError as exc:
                code, answer = exc.code(), exc.details()
            else:
                code, answer = grpc.StatusCode.OK, str([p.policy_id for p in listed.policies])
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), (
            names,
            code,
            answer,
        )
    # One name, A's own: served, and B's policy is not in it.
    async with guardrail.channel(KEY_A) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        own = await stub.ListPolicies(
            guardrail_service_pb2.ListPoliciesRequest(),
            metadata=(("x-tickmesh-tenant", a),),
            timeout=10,
        )
    assert [p.policy_id for p in own.policies] == []
