"""Spans leave through OTLP: a mesh configured with ``trace_exporter="otlp"`` sends a
lifetime's spans, one trace under each service's name, to a real OTLP/gRPC endpoint."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

import examples.hello.handlers as hello
from tests.support.nats_server import new_tenant
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.sdk import Client, Worker, load_graph_file

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello" / "graph.yaml"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of OTLP/gRPC: keeps every export request."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, Any]]:
        """(service.name, span) of everything received."""
        out: list[tuple[str, Any]] = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope_spans in resource_spans.scope_spans:
                    out.extend((service, span) for span in scope_spans.spans)
        return out


async def test_a_mesh_exports_a_lifetimes_spans_over_otlp(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        collector, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tenant = new_tenant("otlp")
    try:
        mesh = Mesh(
            MeshConfig(
                nats_url=nats_server.url,
                tenants=(tenant,),
                data_dir=tmp_path,
                trace_exporter="otlp",
                trace_endpoint=f"http://127.0.0.1:{port}",
            )
        )
        async with (
            mesh,
            Worker(mesh.pool_target, tenant=tenant, tasks=[hello.greet, hello.decide, hello.shout]),
            await Client.connect(mesh.router_target, tenant=tenant) as client,
        ):
            graph = await client.register_graph(load_graph_file(HELLO))
            output = await client.run_lifetime(graph.id, {"name": "ada"}, version=graph.version)
            assert output == {"greeting": "HELLO, ADA!"}
            await asyncio.sleep(0.2)  # the last routing span ends just after the result
        # Stopping the mesh flushed every service's batch of spans.
    finally:
        await server.stop(None)

    spans = collector.spans()
    names = Counter(span.name for _, span in spans)
    assert names["tickmesh.lifetime"] == 1
    assert names["tickmesh.step task greet"] == 1
    assert names["tickmesh.step plan decide"] == 2
    assert names["tickmesh.state.append"] == 4
    assert names["tickmesh.router.route"] == 4
    services = {service for service, _ in spans}
    assert {"tickmesh-router", "tickmesh-state", "tickmesh-executor-pool"} <= services
    lifetime_traces = {span.trace_id for _, span in spans if not span.name.startswith("/")}
    assert len(lifetime_traces) == 1, names
