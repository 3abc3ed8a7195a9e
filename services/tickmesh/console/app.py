"""The console's aiohttp application: static page, JSON API and Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from tickmesh.sdk import (
    Client,
    LifetimeEvent,
    LifetimeInfo,
    NotFoundError,
    RPCError,
    StatusCode,
    TickmeshError,
    TransportError,
    ValidationError,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CLIENT_KEY = web.AppKey("client", Client)
LOOPBACK_ONLY_KEY = web.AppKey("loopback_only", bool)
# An SSE comment this often keeps proxies and the browser from timing an idle stream out.
HEARTBEAT_S = 15.0
LIST_LIMIT = 500
# WatchLifetimeRequest.after_sequence is a uint64.
MAX_SEQUENCE = 2**64 - 1
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Every response: no framing (clickjacking of the buttons), no sniffing, and the page may run
# only its own script and talk only to its own origin, so an injected string cannot act.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

# How an RPC status becomes an HTTP status (anything else is a bad gateway).
_HTTP_STATUS = {
    StatusCode.INVALID_ARGUMENT: 400,
    StatusCode.OUT_OF_RANGE: 400,
    StatusCode.NOT_FOUND: 404,
    StatusCode.ALREADY_EXISTS: 409,
    StatusCode.FAILED_PRECONDITION: 409,
    StatusCode.ABORTED: 409,
    StatusCode.PERMISSION_DENIED: 403,
    StatusCode.UNAUTHENTICATED: 401,
    StatusCode.RESOURCE_EXHAUSTED: 429,
    StatusCode.UNAVAILABLE: 503,
    StatusCode.DEADLINE_EXCEEDED: 504,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map SDK errors to HTTP statuses with a JSON body (the adapter boundary)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith("/api/"):
            raise
        return _error(exc.status, exc.reason)
    except NotFoundError as exc:
        return _error(404, exc.detail)
    except RPCError as exc:
        return _error(_HTTP_STATUS.get(exc.status, 502), exc.detail)
    except ValidationError as exc:
        return _error(400, str(exc))
    except TransportError as exc:
        return _error(503, str(exc))
    except TickmeshError as exc:
        return _error(502, str(exc))


def _is_loopback_name(host: str) -> bool:
    """Whether a Host header (``name[:port]``, ``[v6][:port]``) names this machine."""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    name = name.lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _cross_site(request: web.Request) -> bool:
    """Whether a browser sent this request from another site's page (a forged request)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        # "same-site" is another port or subdomain: still another application.
        return site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        # Browsers always send Origin on a cross-origin POST; curl and scripts send neither.
        return False
    _, sep, authority = origin.lower().partition("://")
    # A proxy may rewrite Host; X-Forwarded-Host cannot be set by a page without preflight.
    hosts = {request.headers.get(name, "").lower() for name in (hdrs.HOST, "X-Forwarded-Host")}
    hosts.discard("")
    return not sep or authority not in hosts


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse other sites' pages: forged state changes and DNS-rebound host names."""
    # Browsers always send Host; a request without one comes from no web page.
    host = request.headers.get(hdrs.HOST)
    if request.app[LOOPBACK_ONLY_KEY] and host is not None and not _is_loopback_name(host):
        # A name that resolves to 127.0.0.1 for an attacker's page makes the browser treat
        # the console as that site's own origin; only loopback names are this machine.
        # A body, not a reason phrase: the Host header is the client's text.
        return _error(403, f"the console answers only to loopback host names, not {host!r}")
    if request.method not in _SAFE_METHODS and _cross_site(request):
        return _error(403, "cross-site requests cannot change lifetimes")
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


# --- JSON views -------------------------------------------------------------------


def _time(ts: Timestamp) -> str | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=UTC).isoformat()


def lifetime_json(info: LifetimeInfo) -> dict[str, Any]:
    """A lifetime as the console's API shows it."""
    raw = info.raw
    data: dict[str, Any] = {
        "id": info.lifetime_id,
        "state": info.state,
        "graph": {"id": info.graph_id, "version": info.graph_version},
        "created_at": _time(raw.created_at),
        "updated_at": _time(raw.updated_at),
        "finished_at": _time(raw.finished_at),
        "execution_count": info.execution_count,
        "last_sequence": raw.last_sequence,
        "usage": {
            "input_tokens": info.input_tokens,
            "output_tokens": info.output_tokens,
            "tokens": info.input_tokens + info.output_tokens,
            "cost_micros": info.cost_micros,
            "cost": info.cost_micros / 1e6,
            "currency": raw.totals.currency or "USD",
        },
        "waiting_signal": raw.waiting_signal,
        "error": info.error,
    }
    return data


async def lifetime_detail(client: Client, info: LifetimeInfo) -> dict[str, Any]:
    """A lifetime with what only its detail view shows: labels, error type, output, origin."""
    raw = info.raw
    data = lifetime_json(info)
    data["labels"] = dict(raw.labels)
    data["error_type"] = raw.error.type
    data["output"] = None
    if raw.HasField("output"):
        try:
            value = await client.decode_payload(raw.output)
            json.dumps(value)
        except (TickmeshError, TypeError, ValueError, OSError):
            # Binary or unreadable outputs are described rather than shown.
            value = {"content_type": raw.output.content_type, "size": raw.output.size}
        data["output"] = value
    if raw.HasField("fork_origin"):
        data["fork_origin"] = {
            "lifetime_id": raw.fork_origin.lifetime_id,
            "execution_id": raw.fork_origin.execution_id,
        }
    return data


def event_json(event: LifetimeEvent) -> dict[str, Any]:
    """One lifetime event as the console's API and event stream show it."""
    raw = event.raw
    data: dict[str, Any] = {
        "sequence": event.sequence,
        "kind": event.kind,
        "state": event.state,
        "at": event.at.isoformat(),
        "execution_id": event.execution_id,
        "node_id": event.node_id,
        "attempt": raw.attempt,
        "message": event.message,
    }
    if raw.HasField("error"):
        data["error"] = {"type": raw.error.type, "message": raw.error.message}
    if raw.HasField("guardrail"):
        data["guardrail"] = json_format.MessageToDict(
            raw.guardrail, preserving_proto_field_name=True
        )
    if raw.HasField("signal"):
        data["signal"] = {"name": raw.signal.name, "approver": raw.signal.approver}
    if raw.HasField("telemetry"):
        t = raw.telemetry
        data["telemetry"] = {
            "input_tokens": t.input_tokens,
            "output_tokens": t.output_tokens,
            "cost_micros": t.cost_micros,
            "run_time_ms": round(t.run_time.ToMilliseconds()) if t.HasField("run_time") else None,
        }
    return data


# --- handlers ---------------------------------------------------------------------


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def list_lifetimes(request: web.Request) -> web.Response:
    client = request.app[CLIENT_KEY]
    found = await client.list_lifetimes(page_size=200)
    found.sort(key=lambda info: info.raw.created_at.ToNanoseconds(), reverse=True)
    return web.json_response(
        {
            "tenant": client.tenant,
            "lifetimes": [lifetime_json(info) for info in found[:LIST_LIMIT]],
        }
    )


async def get_lifetime(request: web.Request) -> web.Response:
    client = request.app[CLIENT_KEY]
    info = await client.get_lifetime(request.match_info["id"])
    return web.json_response(await lifetime_detail(client, info))


def _after(request: web.Request) -> int:
    text = request.query.get("after") or request.headers.get("Last-Event-ID") or "0"
    try:
        after = int(text)
    except ValueError:
        raise ValidationError(f"after must be an event sequence number, got {text!r}") from None
    if not 0 <= after <= MAX_SEQUENCE:
        raise ValidationError(f"after must be between 0 and {MAX_SEQUENCE}, got {after}")
    return after


async def lifetime_events(request: web.Request) -> web.StreamResponse:
    """Stream a lifetime's events as SSE (``id:`` is the sequence), then an ``end`` event."""
    client = request.app[CLIENT_KEY]
    lifetime_id = request.match_info["id"]
    after = _after(request)
    # Ask first, so an unknown lifetime is a 404 rather than a stream that breaks at once.
    await client.get_lifetime(lifetime_id)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    queue: asyncio.Queue[LifetimeEvent | BaseException | None] = asyncio.Queue(maxsize=256)

    async def pump() -> None:
        try:
            async for event in client.watch(lifetime_id, after_sequence=after):
                await queue.put(event)
        except Exception as exc:
            # Any failure must reach the stream as "failure": a dead pump would leave the
            # client waiting on keep-alives forever.
            await queue.put(exc)
        else:
            await queue.put(None)

    pumping = asyncio.create_task(pump(), name=f"console-watch-{lifetime_id}")
    try:
        await response.write(b"retry: 2000\n\n")
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_S):
                    item = await queue.get()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if item is None:
                await response.write(b"event: end\ndata: {}\n\n")
                break
            if isinstance(item, BaseException):
                body = json.dumps({"error": str(item)})
                await response.write(f"event: failure\ndata: {body}\n\n".encode())
                break
            body = json.dumps(event_json(item))
            await response.write(f"id: {item.sequence}\nevent: lifetime\ndata: {body}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        # The browser went away (or the server is stopping): just stop watching.
        logger.debug("event stream of %s closed by the client", lifetime_id)
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
    return response


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    # JSON is UTF-8 (RFC 8259): a declared charset is ignored rather than trusted.
    try:
        text = (await request.read()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"the request body is not UTF-8: {exc}") from exc
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
        # Lone surrogates ("\ud800") parse but cannot go into a protobuf string or payload.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        raise ValidationError(f"the request body is not JSON: {exc}") from exc
    except RecursionError:
        raise ValidationError("the request body is nested too deeply") from None
    except UnicodeEncodeError:
        raise ValidationError("the request body has text that is not valid Unicode") from None
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    return body


def _text_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string")
    return value


async def control(request: web.Request) -> web.Response:
    """POST /api/lifetimes/{id}/{pause|resume|abort}, with an optional {"reason": ...}."""
    client = request.app[CLIENT_KEY]
    lifetime_id = request.match_info["id"]
    action = request.match_info["action"]
    reason = _text_field(await _json_body(request), "reason") or "from the console"
    if action == "pause":
        info = await client.pause(lifetime_id, reason)
    elif action == "resume":
        info = await client.resume(lifetime_id, reason)
    else:
        info = await client.abort(lifetime_id, reason)
    logger.info("console: %s %s", action, lifetime_id)
    return web.json_response(await lifetime_detail(client, info))


async def send_signal(request: web.Request) -> web.Response:
    """POST /api/lifetimes/{id}/signal with {"name": ..., "data": ..., "approver": ...}."""
    client = request.app[CLIENT_KEY]
    body = await _json_body(request)
    name = _text_field(body, "name").strip()
    if not name:
        raise ValidationError("a signal needs a name")
    info = await client.signal(
        request.match_info["id"],
        name,
        body.get("data"),
        approver=_text_field(body, "approver") or "console",
        signal_id=_text_field(body, "signal_id"),
    )
    return web.json_response(await lifetime_detail(client, info))


def build_app(client: Client, *, loopback_only: bool = False) -> web.Application:
    """The console for ``client``'s router and tenant; the caller owns (and closes) the client.

    ``loopback_only``: answer only requests whose Host names this machine (for a console
    listening on loopback, so a DNS-rebinding page cannot reach it).
    """
    app = web.Application(middlewares=[_errors, _guard])
    app[CLIENT_KEY] = client
    app[LOOPBACK_ONLY_KEY] = loopback_only
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", index)
    app.router.add_get("/api/lifetimes", list_lifetimes)
    app.router.add_get("/api/lifetimes/{id}", get_lifetime)
    app.router.add_get("/api/lifetimes/{id}/events", lifetime_events)
    app.router.add_post("/api/lifetimes/{id}/{action:pause|resume|abort}", control)
    app.router.add_post("/api/lifetimes/{id}/signal", send_signal)
    app.router.add_static("/static/", STATIC_DIR)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValidationError(f"--listen expects HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@contextlib.asynccontextmanager
async def running(client: Client, host: str, port: int) -> AsyncIterator[str]:
    """Serve the console on ``host:port`` (0: any free port); yields its base URL."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    runner = web.AppRunner(
        build_app(client, loopback_only=loopback), handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        yield f"http://{shown}:{bound[1]}"
    finally:
        await runner.cleanup()


async def serve(
    router: str,
    *,
    tenant: str = "default",
    listen: str = "127.0.0.1:8080",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the console until SIGINT or SIGTERM; ``on_ready`` is given its URL once it listens."""
    host, port = parse_listen(listen)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(await Client.connect(router, tenant=tenant))
        url = await stack.enter_async_context(running(client, host, port))
        logger.info("console for tenant %s at %s", tenant, url)
        if on_ready is not None:
            on_ready(url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
