"""The live console against a real embedded mesh: its HTTP API, and the page in Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.audit import closing
from tests.support.nats_server import new_tenant
from tickmesh.console.app import running
from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    LifetimeHandle,
    PlanContext,
    PlanInputView,
    TaskContext,
    Worker,
    complete,
    dispatch,
    plan,
    step,
    task,
)
from tickmesh.sdk.approvals import approval, approval_of

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / ".build" / "artifacts"
TOKENS_PER_STEP = (100, 50)
MICROS_PER_STEP = 1500


@plan(name="loop")
async def loop_plan(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    """Run ``work`` ``goal["rounds"]`` times, one after the other."""
    if ctx.iteration > goal["rounds"]:
        return complete({"rounds": goal["rounds"]})
    return dispatch(step("work", {"round": ctx.iteration, "sleep": goal["sleep"]}))


ROUNDS_LET_GO: dict[str, asyncio.Semaphore] = {}
"""A lifetime's rounds of ``work`` wait for a permit here when a test holds it (each
permit lets one round run), so a test sees it progress when it asks, whatever the speed
of the machine. Lifetimes not named here run freely."""


@task
async def work(ctx: TaskContext, value: Any) -> Any:
    held = ROUNDS_LET_GO.get(ctx.lifetime_id)
    if held is not None:
        await held.acquire()
    await asyncio.sleep(value["sleep"])
    ctx.report(
        input_tokens=TOKENS_PER_STEP[0],
        output_tokens=TOKENS_PER_STEP[1],
        cost_micros=MICROS_PER_STEP,
        model="fake-llm",
    )
    return value["round"]


@dataclass
class Console:
    """An embedded mesh with a worker for the looping graph, and the console in front of it."""

    url: str
    client: Client
    graph_id: str
    graph_version: int
    http: aiohttp.ClientSession
    pool: str
    """The executor pool's address, for tests that serve more handlers."""

    async def start(self, rounds: int, sleep: float) -> LifetimeHandle:
        return await self.client.start_lifetime(
            self.graph_id, {"rounds": rounds, "sleep": sleep}, version=self.graph_version
        )

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as response:
            return response.status, await response.json()

    async def post(self, path: str, body: Any = None, *, raw: str | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body if body is not None else {})
        async with self.http.post(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        ) as response:
            return response.status, await response.json()

    async def events(
        self, lifetime_id: str, query: str = "", headers: dict[str, str] | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Read a lifetime's SSE stream to its end: (lifetime events, SSE event names)."""
        path = f"{self.url}/api/lifetimes/{lifetime_id}/events{query}"
        found: list[dict[str, Any]] = []
        names: list[str] = []
        async with self.http.get(path, headers=headers or {}) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            async for line in response.content:
                text = line.decode().rstrip("\n")
                if text:
                    if not text.startswith(":"):
                        key, _, value = text.partition(":")
                        fields[key] = value.removeprefix(" ")
                    continue
                if "data" in fields:
                    name = fields.get("event", "message")
                    names.append(name)
                    if name == "lifetime":
                        event = json.loads(fields["data"])
                        assert fields["id"] == str(event["sequence"])
                        found.append(event)
                    if name in ("end", "failure"):
                        break
                fields = {}
        return found, names


@pytest.fixture
async def console(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Console]:
    tenant = new_tenant("console")
    async with contextlib.AsyncExitStack() as stack:
        mesh = Mesh(
            MeshConfig(nats_url=nats_server.url, tenants=(tenant,), data_dir=tmp_path / "mesh")
        )
        await mesh.start()
        stack.push_async_callback(mesh.stop)
        client = await Client.connect(mesh.router_target, tenant=tenant)
        stack.push_async_callback(client.close)
        worker = Worker(mesh.pool_target, tenant=tenant, tasks=[loop_plan, work])
        await worker.__aenter__()
        stack.push_async_callback(worker.shutdown, 1.0)
        async with asyncio.timeout(5):
            await worker.wait_connected()
        graph = await client.register_graph(
            GraphBuilder("console-loop", max_iterations=200)
            .plan("loop")
            .task("work")
            .edge("loop", "work")
            .edge("work", "loop")
            .final("loop")
            .build()
        )
        url = await stack.enter_async_context(running(client, "127.0.0.1", 0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Console(url, client, graph.id, graph.version, http, mesh.pool_target)


async def wait_for_state(client: Client, lifetime_id: str, state: str, within: float) -> None:
    async with asyncio.timeout(within), closing(client.watch(lifetime_id)) as events:
        async for event in events:
            if event.state == state:
                return


# --- the HTTP API ---------------------------------------------------------------------


async def test_console_lists_and_describes_lifetimes(console: Console) -> None:
    handle = await console.start(rounds=2, sleep=0.01)
    assert await handle.result(within=10) == {"rounds": 2}

    status, listed = await console.get("/api/lifetimes")
    assert status == 200
    assert listed["tenant"] == console.client.tenant
    [row] = [lt for lt in listed["lifetimes"] if lt["id"] == handle.id]
    assert row["state"] == "completed"
    assert row["graph"] == {"id": "console-loop", "version": console.graph_version}
    assert row["usage"]["tokens"] == 2 * sum(TOKENS_PER_STEP)
    assert row["usage"]["cost_micros"] == 2 * MICROS_PER_STEP

    status, detail = await console.get(f"/api/lifetimes/{handle.id}")
    assert status == 200
    assert detail["state"] == "completed"
    assert detail["output"] == {"rounds": 2}
    assert detail["usage"]["input_tokens"] == 2 * TOKENS_PER_STEP[0]
    assert detail["execution_count"] == 5  # loop, work, loop, work, loop
    assert detail["created_at"]
    assert detail["finished_at"]

    status, missing = await console.get("/api/lifetimes/no-such-lifetime")
    assert status == 404
    assert "no-such-lifetime" in missing["error"]
    async with console.http.get(console.url + "/api/lifetimes/no-such-lifetime/events") as r:
        assert r.status == 404

    async with console.http.get(console.url + "/") as page:
        assert page.status == 200
        assert "tickmesh console" in await page.text()
    async with console.http.get(console.url + "/static/console.js") as script:
        assert script.status == 200


async def test_console_streams_events_in_order_and_resumes(console: Console) -> None:
    handle = await console.start(rounds=4, sleep=0.05)
    # Connected while the lifetime runs: history first, then live events, then "end".
    async with asyncio.timeout(15):
        live, names = await console.events(handle.id)
    assert names[-1] == "end"
    sequences = [e["sequence"] for e in live]
    assert sequences == list(range(1, len(live) + 1))
    assert live[0]["kind"] == "started"
    assert live[-1]["kind"] == "state_changed"
    assert live[-1]["state"] == "completed"
    finished = [e for e in live if e["kind"] == "step_finished" and e["node_id"] == "work"]
    assert len(finished) == 4
    assert finished[0]["telemetry"]["input_tokens"] == TOKENS_PER_STEP[0]
    assert finished[0]["telemetry"]["run_time_ms"] >= 40

    after_query, _ = await console.events(handle.id, "?after=3")
    assert after_query == live[3:]
    after_header, _ = await console.events(handle.id, headers={"Last-Event-ID": "5"})
    assert after_header == live[5:]

    async with console.http.get(f"{console.url}/api/lifetimes/{handle.id}/events?after=x") as r:
        assert r.status == 400
        assert "after" in (await r.json())["error"]


async def test_console_pauses_resumes_signals_and_aborts(console: Console) -> None:
    handle = await console.start(rounds=50, sleep=0.05)
    ROUNDS_LET_GO[handle.id] = asyncio.Semaphore(0)  # running until aborted, however slow
    await wait_for_state(console.client, handle.id, "running", 5)
    base = f"/api/lifetimes/{handle.id}"

    status, paused = await console.post(f"{base}/pause", {"reason": "a look"})
    assert (status, paused["state"]) == (200, "paused")
    assert (await handle.describe()).state == "paused"
    status, resumed = await console.post(f"{base}/resume")
    assert (status, resumed["state"]) == (200, "running")

    status, bad = await console.post(f"{base}/signal", raw="{not json")
    assert status == 400
    assert "not JSON" in bad["error"]
    status, bad = await console.post(f"{base}/signal", {"data": 1})
    assert status == 400
    assert "name" in bad["error"]
    # The lifetime is running, not waiting: the router refuses the signal.
    status, refused = await console.post(f"{base}/signal", {"name": "poke", "data": {"x": 1}})
    assert status == 409
    assert "not waiting" in refused["error"]
    status, _ = await console.post("/api/lifetimes/no-such-lifetime/signal", {"name": "poke"})
    assert status == 404

    status, aborted = await console.post(f"{base}/abort", {"reason": "enough"})
    assert (status, aborted["state"]) == (200, "aborted")
    assert (await handle.describe()).state == "aborted"
    status, _ = await console.post("/api/lifetimes/no-such-lifetime/pause")
    assert status == 404
    del ROUNDS_LET_GO[handle.id]


@plan(name="review")
async def review(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    """Wait for an approval; complete with what it said."""
    decided = approval_of(ctx)
    if decided is None:
        return approval(prompt="ship it?")
    return complete({"approved": decided.approved, "by": decided.approver})


async def test_console_signal_resumes_a_waiting_lifetime(console: Console) -> None:
    worker = Worker(console.pool, tenant=console.client.tenant, tasks=[review])
    await worker.__aenter__()
    try:
        async with asyncio.timeout(5):
            await worker.wait_connected()
        graph = await console.client.register_graph(
            GraphBuilder("console-approval").plan("review").final("review").build()
        )
        handle = await console.client.start_lifetime(graph.id, {}, version=graph.version)
        await wait_for_state(console.client, handle.id, "waiting", 10)

        status, detail = await console.get(f"/api/lifetimes/{handle.id}")
        assert (status, detail["state"]) == (200, "waiting")
        status, signalled = await console.post(
            f"/api/lifetimes/{handle.id}/signal",
            {"name": "approval", "data": {"approved": True}, "approver": "ada"},
        )
        assert status == 200, signalled
        assert await handle.result(within=10) == {"approved": True, "by": "ada"}
        events, _ = await console.events(handle.id)
        assert [e["kind"] for e in events].count("signal_received") == 1
    finally:
        await worker.shutdown(grace=1.0)


# --- the page in Chromium ------------------------------------------------------------


@pytest.fixture
def chromium() -> Path:
    """Debian's chromium; the test fails (never skips) without it."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run `make browser` (apt-get install -y chromium) "
            "to run the console's browser test"
        )
    return CHROMIUM


def keep_screenshot(shot: Path) -> None:
    """Check the screenshot is a PNG and keep a copy in .build/artifacts/."""
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), "the screenshot is not a PNG"
    assert len(data) > 1000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "console.png")


async def test_console_page_follows_and_steers_a_lifetime(
    console: Console, chromium: Path, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    handle = await console.start(rounds=25, sleep=0.01)
    # Held from here: nothing can run before this line (the worker shares this event
    # loop), and the page sees the lifetime move only when the test lets a round go, so
    # a slow browser start cannot find it finished already.
    rounds = ROUNDS_LET_GO[handle.id] = asyncio.Semaphore(1)
    await wait_for_state(console.client, handle.id, "running", 5)
    shot = tmp_path / "console.png"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(console.url + "/")
            row = page.locator(f'[data-testid="lifetime-row"][data-lifetime-id="{handle.id}"]')
            await expect(row.get_by_test_id("lifetime-state")).to_have_text("running")

            await row.click()
            await expect(page.get_by_test_id("detail-id")).to_have_text(handle.id)
            steps = page.locator('[data-testid="event"][data-kind="step_finished"]')
            await expect(steps.nth(1)).to_be_attached()  # the plan's and the first round's
            seen = await steps.count()
            rounds.release()  # one more round
            await expect(steps.nth(seen)).to_be_attached()  # still growing, live

            await page.get_by_test_id("btn-pause").click()
            await expect(page.get_by_test_id("detail-state")).to_have_text("paused")
            assert (await handle.describe()).state == "paused"
            await expect(row.get_by_test_id("lifetime-state")).to_have_text("paused")
            paused_events = page.locator('[data-testid="event"][data-kind="state_changed"]')
            await expect(paused_events.last).to_contain_text("paused")

            for _ in range(25):
                rounds.release()  # the rest run freely once resumed
            await page.get_by_test_id("btn-resume").click()
            await expect(page.get_by_test_id("detail-state")).to_have_text(
                "completed", timeout=15_000
            )
            assert (await handle.describe()).state == "completed"
            await expect(row.get_by_test_id("lifetime-state")).to_have_text("completed")
            await expect(page.get_by_test_id("detail-tokens")).to_contain_text(
                f"{25 * sum(TOKENS_PER_STEP):,}"
            )
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
            del ROUNDS_LET_GO[handle.id]

    await asyncio.to_thread(keep_screenshot, shot)
