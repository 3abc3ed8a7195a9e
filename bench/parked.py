"""`python -m bench.parked`: many concurrent lifetimes, most parked waiting for a signal.

The services run as separate processes (as ``make bench`` runs them). Each round starts
``--lifetimes`` lifetimes of a one-plan graph that waits for a ``go`` signal, waits until
every one of them is parked (WAITING, holding no executor slot and no message in flight),
reads each service's resident memory, signals them all, waits until all completed, and
reads the memory again. Two rounds: if nothing grows without bound, the second round ends
where the first did (what the first round allocated for good — caches, pools, the SQLite
page cache — is reused, not added to).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from tickmesh.sdk import Client, load_graph_yaml

from .cloud import finish_in_thread
from .cluster import Cluster
from .handlers import PARK_GRAPH_ID, PARK_GRAPH_YAML
from .invocation import invocation
from .machine import describe
from .monitor import rss_bytes

MIB = 1 << 20
SERVICES = ("router", "state", "guardrail", "executor-pool", "nats-server")
CHECKED = ("router", "state", "guardrail", "executor-pool")
"""Held to the flatness check. nats-server is reported, not checked: what it holds grows
with what it retains by design — the deduplication window of message ids (2 min), the
event stream (7 days) and one KV key per lifetime (a finished one for the router's
``finished_retention_s``, 7 days) — not with a leak."""


def _memory(cluster: Cluster) -> dict[str, float]:
    """Resident MiB of every service process (workers summed as ``workers``)."""
    out: dict[str, float] = {}
    for name, proc in cluster.processes.items():
        key = "workers" if name.startswith("worker") else name
        out[key] = out.get(key, 0.0) + rss_bytes(proc) / MIB
    return out


async def _bounded(
    items: Iterable[Any], call: Callable[[Any], Awaitable[Any]], limit: int
) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(item: Any) -> Any:
        async with gate:
            return await call(item)

    return await asyncio.gather(*(one(item) for item in items))


async def _count(client: Client, state: str) -> int:
    found = await client.list_lifetimes(states=[state], graph_id=PARK_GRAPH_ID, page_size=1000)
    return len(found)


async def _until(client: Client, state: str, expected: int, limit_s: float) -> float:
    """Seconds until ``expected`` lifetimes of the graph are in ``state``."""
    t0 = time.monotonic()
    while True:
        seen = await _count(client, state)
        if seen >= expected:
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit_s:
            raise RuntimeError(f"only {seen} of {expected} lifetimes {state} after {limit_s:g}s")
        await asyncio.sleep(0.5)


async def run_rounds(
    cluster: Cluster, lifetimes: int, rounds: int, concurrency: int, limit_s: float
) -> dict[str, Any]:
    async with await Client.connect(cluster.router_target, call_timeout=60) as client:
        graph = await client.register_graph(load_graph_yaml(PARK_GRAPH_YAML))
        result: dict[str, Any] = {"lifetimes": lifetimes, "before": _memory(cluster), "rounds": []}
        for number in range(1, rounds + 1):
            t0 = time.monotonic()
            handles = await _bounded(
                range(lifetimes),
                lambda _: client.start_lifetime(graph.id, None, version=graph.version),
                concurrency,
            )
            started_s = time.monotonic() - t0
            parked_s = await _until(client, "waiting", lifetimes, limit_s)
            parked = _memory(cluster)
            t1 = time.monotonic()
            await _bounded(handles, lambda h: client.signal(h.id, "go", None), concurrency)
            signalled_s = time.monotonic() - t1
            done_s = await _until(client, "completed", lifetimes * number, limit_s)
            await asyncio.sleep(2.0)  # let the last events be stored and buffers settle
            result["rounds"].append(
                {
                    "round": number,
                    "start_s": round(started_s, 2),
                    "all_parked_s": round(started_s + parked_s, 2),
                    "signal_s": round(signalled_s, 2),
                    "all_completed_s": round(signalled_s + done_s, 2),
                    "parked_mib": parked,
                    "after_mib": _memory(cluster),
                }
            )
            print(f"  round {number}: {_line(result['rounds'][-1])}", flush=True)
        return result


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['all_parked_s']:.1f}s to park all, {r['all_completed_s']:.1f}s to finish after "
        f"the signals; parked RSS "
        + ", ".join(f"{k} {v:.0f}" for k, v in r["parked_mib"].items() if k in SERVICES)
        + " MiB"
    )


def growth(result: dict[str, Any]) -> dict[str, float]:
    """Per service: MiB the second round left behind beyond the first (parked and after)."""
    first, last = result["rounds"][0], result["rounds"][-1]
    return {
        name: round(
            max(
                last["parked_mib"][name] - first["parked_mib"][name],
                last["after_mib"][name] - first["after_mib"][name],
            ),
            1,
        )
        for name in first["after_mib"]
    }


def render(result: dict[str, Any]) -> str:
    rows = [
        f"{result['lifetimes']:,} lifetimes parked at once, {len(result['rounds'])} rounds "
        "(services as processes, embedded profile)",
        f"  {'process':<16}{'idle MiB':>10}"
        + "".join(f"{f'parked {r}':>12}{f'after {r}':>10}" for r in range(1, 3))
        + f"{'growth':>9}",
    ]
    grown = growth(result)
    for name in result["before"]:
        line = f"  {name:<16}{result['before'][name]:>10.0f}"
        for r in result["rounds"][:2]:
            line += f"{r['parked_mib'][name]:>12.0f}{r['after_mib'][name]:>10.0f}"
        rows.append(line + f"{grown[name]:>+9.1f}")
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> int:
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="tickmesh-parked-"))
    cluster = Cluster(layout="processes", work_dir=work_dir, worker_concurrency=64)
    print(f"parked lifetimes: starting the mesh in {work_dir} ...", flush=True)
    await finish_in_thread(cluster.start)
    try:
        result = await run_rounds(
            cluster, args.lifetimes, args.rounds, args.concurrency, args.timeout
        )
    finally:
        await finish_in_thread(cluster.stop)
    result["machine"] = describe(work_dir)
    result["growth_mib"] = growth(result)
    print(render(result))
    if args.out:
        await asyncio.to_thread(Path(args.out).write_text, json.dumps(result, indent=2))
    limit = args.max_growth_mib
    over = {k: v for k, v in result["growth_mib"].items() if k in CHECKED and v > limit}
    if over:
        print(f"memory grew over {limit} MiB between rounds: {over}", file=sys.stderr)
        return 1
    print(
        f"flat: no tickmesh service grew more than {limit:g} MiB between rounds "
        "(nats-server holds the retained messages and keys: reported, not checked)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    prog, argv = invocation(argv, "python -m bench.parked")
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--lifetimes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64, help="RPCs in flight")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    parser.add_argument("--work-dir")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
