"""The console against hostile or malformed requests, on a real embedded mesh."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.e2e import test_console
from tests.e2e.test_console import ROUNDS_LET_GO, Console, wait_for_state
from tickmesh.sdk import LifetimeHandle

console = test_console.console  # the embedded mesh, its worker and the console, as a fixture


@pytest.fixture
async def held(console: Console) -> AsyncIterator[LifetimeHandle]:
    """A lifetime that stays running (its rounds wait for permits that never come)."""
    handle = await console.start(rounds=50, sleep=0.01)
    ROUNDS_LET_GO[handle.id] = asyncio.Semaphore(0)
    await wait_for_state(console.client, handle.id, "running", 5)
    yield handle
    del ROUNDS_LET_GO[handle.id]
    if (await handle.describe()).state not in ("aborted", "completed", "failed"):
        await handle.abort("test over")


async def send(
    console: Console,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with console.http.request(
        method, console.url + path, data=body, headers=headers or {}
    ) as response:
        text = await response.text()
        is_json = response.content_type == "application/json"
        return response.status, json.loads(text) if is_json else text


# --- forged requests ---------------------------------------------------------------------

EVIL = "http://evil.example"


@pytest.mark.parametrize(
    ("action", "headers"),
    [
        # A hidden <form method=post enctype=text/plain> on another site.
        ("abort", {"Origin": EVIL, "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}),
        # A browser that does not send Sec-Fetch-* (plain http to a non-local name).
        ("pause", {"Origin": EVIL, "Content-Type": "text/plain"}),
        # A sandboxed iframe or a file:// page.
        ("abort", {"Origin": "null", "Content-Type": "text/plain"}),
        # Another local service (another port is the same site, not the same origin).
        ("abort", {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"}),
    ],
)
async def test_console_refuses_cross_site_state_changes(
    console: Console, held: LifetimeHandle, action: str, headers: dict[str, str]
) -> None:
    status, refused = await send(
        console, "POST", f"/api/lifetimes/{held.id}/{action}", b"", headers
    )
    assert status == 403, refused
    assert "cross-site" in refused["error"]
    assert (await held.describe()).state == "running"


async def test_console_still_takes_its_own_page_and_scripts(
    console: Console, held: LifetimeHandle
) -> None:
    base = f"/api/lifetimes/{held.id}"
    own = {
        "Origin": console.url,
        "Sec-Fetch-Site": "same-origin",
        "Content-Type": "application/json",
    }
    status, paused = await send(console, "POST", f"{base}/pause", b"{}", own)
    assert (status, paused["state"]) == (200, "paused")
    # The same page through a proxy that rewrites Host but says which host it was asked for.
    proxied = {"Origin": "https://console.example", "X-Forwarded-Host": "console.example"}
    status, resumed = await send(console, "POST", f"{base}/resume", b"", proxied)
    assert (status, resumed["state"]) == (200, "running")
    status, aborted = await send(console, "POST", f"{base}/abort")  # curl: no Origin
    assert (status, aborted["state"]) == (200, "aborted")


async def test_console_answers_only_to_loopback_host_names(
    console: Console, held: LifetimeHandle
) -> None:
    port = console.url.rpartition(":")[2]
    rebound = f"rebound.example:{port}"
    status, refused = await send(console, "GET", "/api/lifetimes", headers={"Host": rebound})
    assert status == 403
    assert "loopback" in refused["error"]
    status, page = await send(console, "GET", "/", headers={"Host": rebound})
    assert status == 403
    assert "tickmesh console" not in page
    # A DNS-rebinding page is "same-origin" to its browser: only the host name gives it away.
    status, refused = await send(
        console,
        "POST",
        f"/api/lifetimes/{held.id}/abort",
        headers={"Host": rebound, "Origin": f"http://{rebound}", "Sec-Fetch-Site": "same-origin"},
    )
    assert status == 403
    assert (await held.describe()).state == "running"

    for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}", "localhost"):
        status, listed = await send(console, "GET", "/api/lifetimes", headers={"Host": host})
        assert status == 200, (host, listed)
        assert held.id in [lt["id"] for lt in listed["lifetimes"]]


# --- headers ---------------------------------------------------------------------------


async def test_console_responses_forbid_framing_sniffing_and_foreign_scripts(
    console: Console,
) -> None:
    handle = await console.start(rounds=1, sleep=0.01)
    await handle.result(within=10)
    paths = [
        "/",
        "/static/console.js",
        "/api/lifetimes",
        f"/api/lifetimes/{handle.id}",
        f"/api/lifetimes/{handle.id}/events",
        "/api/lifetimes/no-such-lifetime",
        "/no-such-page",
    ]
    for path in paths:
        async with console.http.get(console.url + path) as response:
            await response.read()
            headers = response.headers
            assert headers.get("X-Content-Type-Options") == "nosniff", path
            assert headers.get("X-Frame-Options") == "DENY", path
            policy = headers.get("Content-Security-Policy", "")
            assert "frame-ancestors 'none'" in policy, path
            assert "script-src 'self'" in policy, path
            assert "unsafe-inline" not in policy, path


# --- malformed input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "body", "content_type", "complaint"),
    [
        ("pause", b'{"reason": "\xff\xfe"}', "application/json", "UTF-8"),
        ("pause", b"[" * 100_000, "application/json", "nested"),
        ("signal", b'{"name": "x", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}", "", "nested"),
        ("pause", b'{"reason": "\\ud800"}', "application/json", "Unicode"),
        ("signal", b'{"name": "\\udfff"}', "application/json", "Unicode"),
        ("signal", b'{"name": "go", "approver": "\\ud800x"}', "application/json", "Unicode"),
        ("signal", b'{"name": "go", "data": {"k": ["\\ud83d"]}}', "application/json", "Unicode"),
    ],
)
async def test_console_malformed_bodies_are_400s(
    console: Console,
    held: LifetimeHandle,
    action: str,
    body: bytes,
    content_type: str,
    complaint: str,
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    status, refused = await send(
        console, "POST", f"/api/lifetimes/{held.id}/{action}", body, headers
    )
    assert status == 400, refused
    assert refused["status"] == 400
    assert complaint in refused["error"]
    assert (await held.describe()).state == "running"


async def test_console_reads_json_bodies_as_utf8_whatever_charset_is_declared(
    console: Console, held: LifetimeHandle
) -> None:
    status, paused = await send(
        console,
        "POST",
        f"/api/lifetimes/{held.id}/pause",
        '{"reason": "café"}'.encode(),
        {"Content-Type": "application/json; charset=no-such-charset"},
    )
    assert status == 200, paused
    assert paused["state"] == "paused"


async def test_console_event_stream_refuses_an_after_beyond_a_sequence(
    console: Console,
) -> None:
    handle = await console.start(rounds=1, sleep=0.01)
    await handle.result(within=10)
    path = f"/api/lifetimes/{handle.id}/events"
    too_big = str(2**64)
    for query, headers in ((f"?after={too_big}", {}), ("", {"Last-Event-ID": too_big})):
        async with console.http.get(console.url + path + query, headers=headers) as response:
            assert response.status == 400, query or headers
            assert "after" in (await response.json())["error"]
    # The largest sequence is still a valid place to resume: nothing after it, then the end.
    events, names = await console.events(handle.id, f"?after={2**64 - 1}")
    assert (events, names) == ([], ["end"])
