"""The shipped examples, end to end on the embedded mesh."""

from __future__ import annotations

import asyncio
from pathlib import Path

import examples.coding_agent.handlers as coding
import examples.hello.handlers as hello
from tests.support.audit import record_of
from tests.support.mesh import Handler, MeshFactory
from tickmesh.sdk import load_graph_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def test_hello_greets_ada(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    await h.worker([hello.greet, hello.decide, hello.shout])
    graph = await h.register(load_graph_file(EXAMPLES / "hello" / "graph.yaml"))

    output = await h.client.run_lifetime(graph.id, {"name": "ada"}, version=graph.version)

    assert output == {"greeting": "HELLO, ADA!"}
    [lifetime_id] = await h.lifetime_ids()
    report = await h.audit(lifetime_id)
    assert report.state == "completed"
    assert report.by_node == {"greet": 1, "decide": 2, "shout": 1}
    assert report.dispatched == report.stored == 4


async def test_coding_agent_refines_once_and_its_totals_add_up(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    handlers: list[Handler] = [
        coding.parse_request,
        coding.coding_planner,
        coding.llm_codegen,
        coding.assembler,
        coding.validate_code,
        coding.reviewer,
    ]
    await h.worker(handlers)
    graph = await h.register(load_graph_file(EXAMPLES / "coding_agent" / "graph.yaml"))

    handle = await h.start(graph, {"task": "add numbers", "modules": ["parser", "lexer"]})
    output = await handle.result(within=10)

    assert output["rounds"] == 2
    assert sorted(output["files"]) == ["lexer.py", "parser.py"]
    report = await h.audit(handle.id)
    # intake, plan, 2 x generate, assemble, validate, review, 2 x generate, assemble,
    # validate, review.
    assert report.by_node == {
        "intake": 1,
        "plan": 1,
        "generate": 4,
        "assemble": 2,
        "validate": 2,
        "review": 2,
    }
    telemetry = [record_of(r).result.telemetry for r in report.records]
    info = await h.client.get_lifetime(handle.id)
    assert info.input_tokens == sum(t.input_tokens for t in telemetry) > 0
    assert info.output_tokens == sum(t.output_tokens for t in telemetry) > 0
    assert info.cost_micros == sum(t.cost_micros for t in telemetry) > 0
    assert info.execution_count == report.stored == 12


async def test_a_finished_lifetime_leaves_nothing_behind_in_the_router(
    start_mesh: MeshFactory,
) -> None:
    """The router remembers which outbox entries it published until the lifetime's next
    write prunes them; a finished lifetime is never written again, so nothing may be
    remembered for it (it was: one entry per lifetime ever run). Its cache of lifetimes
    keeps only those still being decided on."""
    h = await start_mesh()
    await h.worker([hello.greet, hello.decide, hello.shout])
    graph = await h.register(load_graph_file(EXAMPLES / "hello" / "graph.yaml"))
    handles = [await h.start(graph, {"name": str(n)}) for n in range(5)]
    for handle in handles:
        await handle.result(within=10)
    assert h.mesh.router is not None
    tenant = h.mesh.router.processor.tenants[h.tenant]
    for _ in range(50):  # the last ref's apply finishes just after the result is visible
        if not {h.id for h in handles} & set(tenant.published):
            break
        await asyncio.sleep(0.05)
    assert {h.id for h in handles} & set(tenant.published) == set()
    # ... nor in its cache of lifetimes (a finished one is read from the KV if ever asked)
    assert tenant.store.cached_lifetimes == 0
    info = await h.client.get_lifetime(handles[0].id)
    assert info.state == "completed"
    assert tenant.store.cached_lifetimes == 0
