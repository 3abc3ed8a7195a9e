"""`tickmesh usage`: a tenant's tokens, cost and steps per graph (and node), from the state store.

tickmesh usage --state HOST:PORT [--tenant T] [--since 7d|24h|30m|ISO-8601] [--until ...]
               [--graph G] [--by graph|node] [--json]

The report comes from the state service's ``GetUsage`` RPC: one GROUP BY over the
stored execution records, so a redelivered record counts once and a retried step
counts once per attempt. ``--since``/``--until`` take a duration back from now
(``90s``, ``30m``, ``24h``, ``7d``, ``2w``) or an ISO-8601 time (UTC unless it
carries an offset); ``since`` is inclusive, ``until`` exclusive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, TextIO

import grpc

from tickmesh.sdk._transport import create_channel, map_rpc_error
from tickmesh.v1 import state_service_pb2, state_service_pb2_grpc, telemetry_pb2

from .auth import client_security

TENANT_METADATA_KEY: Final = "x-tickmesh-tenant"
CALL_TIMEOUT_S: Final = 60.0
_DURATION: Final = re.compile(r"(\d+)([smhdw])")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
HEADER: Final = [
    "GRAPH",
    "NODE",
    "STEPS",
    "INPUT TOKENS",
    "OUTPUT TOKENS",
    "COST",
    "MODEL CALLS",
    "TOOL CALLS",
]
_GROUPING: Final = {
    "graph": state_service_pb2.USAGE_GROUPING_GRAPH,
    "node": state_service_pb2.USAGE_GROUPING_NODE,
}


def add_parser(sub: Any) -> None:
    """Register ``usage`` on the command's subparsers."""
    usage = sub.add_parser(
        "usage", help="tokens, cost and steps per graph and node, from the state store"
    )
    usage.add_argument("--state", required=True, help="state service host:port")
    usage.add_argument("--tenant", default="default")
    usage.add_argument(
        "--since",
        type=point_in_time,
        help="count executions stored at or after this: a duration back from now "
        "(30m, 24h, 7d) or an ISO-8601 time (default: from the first)",
    )
    usage.add_argument(
        "--until",
        type=point_in_time,
        help="count executions stored before this (same forms; default: now)",
    )
    usage.add_argument("--graph", default="", help="only this graph id (every version)")
    usage.add_argument(
        "--by", choices=sorted(_GROUPING), default="node", help="one row per graph version or node"
    )
    usage.add_argument("--json", action="store_true", help="print the report as JSON")


def point_in_time(text: str, *, now: datetime | None = None) -> datetime:
    """``7d``/``24h``/``30m``/``90s``/``2w`` before ``now``, or an ISO-8601 time (naive = UTC).

    Raises:
        argparse.ArgumentTypeError: neither form (argparse reports it and exits 2).
    """
    match = _DURATION.fullmatch(text.strip())
    if match:
        amount, unit = match.groups()
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 24h, 7d, 2w) nor an ISO-8601 time "
            "(2026-05-01 or 2026-05-01T12:00:00+02:00)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``usage``; returns the exit code."""
    if args.since is not None and args.until is not None and args.until < args.since:
        sys.stderr.write(
            f"tickmesh usage: error: --until ({args.until.isoformat()}) is before "
            f"--since ({args.since.isoformat()})\n"
        )
        return 2
    request = state_service_pb2.GetUsageRequest(graph_id=args.graph, group_by=_GROUPING[args.by])
    if args.since is not None:
        request.since.FromDatetime(args.since)
    if args.until is not None:
        request.until.FromDatetime(args.until)
    response = asyncio.run(_get_usage(args.state, args.tenant, request))
    if args.json:
        json.dump(_document(args, response), out, indent=2)
        out.write("\n")
    else:
        _print_table(response, out, by_node=args.by == "node")
    return 0


async def _get_usage(
    target: str, tenant: str, request: state_service_pb2.GetUsageRequest
) -> state_service_pb2.GetUsageResponse:
    async with create_channel(target, security=client_security()) as channel:
        stub = state_service_pb2_grpc.StateServiceStub(channel)
        try:
            response: state_service_pb2.GetUsageResponse = await stub.GetUsage(
                request, metadata=((TENANT_METADATA_KEY, tenant),), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc
    return response


def _figures(executions: int, totals: telemetry_pb2.Telemetry) -> dict[str, int]:
    return {
        "executions": executions,
        "input_tokens": totals.input_tokens,
        "output_tokens": totals.output_tokens,
        "cost_micros": totals.cost_micros,
        "model_calls": totals.model_calls,
        "tool_calls": totals.tool_calls,
    }


def _document(args: argparse.Namespace, response: state_service_pb2.GetUsageResponse) -> Any:
    return {
        "tenant": args.tenant,
        "since": args.since.isoformat() if args.since else None,
        "until": args.until.isoformat() if args.until else None,
        "graph_id": args.graph or None,
        "group_by": args.by,
        "rows": [
            {
                "graph_id": row.graph_id,
                "graph_version": row.graph_version,
                **({"node_id": row.node_id, "handler": row.handler} if args.by == "node" else {}),
                **_figures(row.executions, row.totals),
            }
            for row in response.rows
        ],
        "total": _figures(response.executions, response.totals),
    }


def dollars(micros: int) -> str:
    """Millionths of a dollar as an exact amount: 1234500 -> ``$1.234500``."""
    return f"${Decimal(micros).scaleb(-6):,.6f}"


def _cells(graph: str, node: str, executions: int, t: telemetry_pb2.Telemetry) -> list[str]:
    return [
        graph,
        node,
        f"{executions:,}",
        f"{t.input_tokens:,}",
        f"{t.output_tokens:,}",
        dollars(t.cost_micros),
        f"{t.model_calls:,}",
        f"{t.tool_calls:,}",
    ]


def _print_table(
    response: state_service_pb2.GetUsageResponse, out: TextIO, *, by_node: bool
) -> None:
    if not response.rows:
        print("no executions in this range", file=out)
        return
    table = [list(HEADER)]
    for usage in response.rows:
        graph = f"{usage.graph_id} v{usage.graph_version}" if usage.graph_id else "(unknown)"
        table.append(_cells(graph, usage.node_id, usage.executions, usage.totals))
    table.append(_cells("TOTAL", "", response.executions, response.totals))
    if not by_node:
        table = [row[:1] + row[2:] for row in table]
    text_columns = 2 if by_node else 1  # left-aligned; the figures are right-aligned
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        if n == len(table) - 1:
            print("  ".join("-" * w for w in widths), file=out)
        cells = [
            cell.ljust(w) if i < text_columns else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)
