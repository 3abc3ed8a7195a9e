"""`python -m bench`: the tickmesh benchmark (DESIGN.md §8, issue 9).

Starts the mesh (each service in its own process by default) in each deployment profile
(embedded: SQLite and a blob folder; cloud: PostgreSQL, S3 and Redis, throwaway servers
started here unless --store-url/--redis-url/--blob-url name others), registers a chain of
no-op task/plan steps, runs lifetimes at each concurrency M, reads the stored records
back to measure the per-step orchestration gap, samples CPU and RSS per process, runs
the unbatched floor at the same M on the profile's store, times guardrail evaluation, and
writes bench/results/<timestamp>.json and .png. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from . import control as control_bench
from . import guardrail as guardrail_bench
from .cloud import CloudServers, CloudSetupError, finish_in_thread
from .cluster import REPO, Cluster, Layout, read_line
from .hops import Tap
from .invocation import invocation
from .load import LoadGenerator
from .machine import describe, speed_probe
from .monitor import Monitor, Monitored, machine_busy_seconds
from .records import StoreRef, gaps, max_seq, read_records, steps_per_s_within
from .report import render, write

LAYOUTS: dict[str, str] = {
    "processes": "router, guardrail, state, executor pool: one `tickmesh serve` process each; "
    "nats-server; one worker process; load generator in the bench process",
    "in-process": "router, guardrail, state, executor pool in one process "
    "(tickmesh.embedded.Mesh); nats-server; one worker process; load generator in the bench "
    "process",
}
PROFILES: dict[str, str] = {
    "embedded": "state in SQLite (WAL, synchronous=FULL) in the data folder, blobs in a "
    "folder, usage counters read from the state store",
    "cloud": "state in PostgreSQL (asyncpg pool, fsync=on, default synchronous_commit), "
    "blobs in S3, usage counters in Redis",
}
MESH_EXCLUDED = ("load-generator", "floor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    prog, argv = invocation(argv, "python -m bench")
    p = argparse.ArgumentParser(
        prog=prog, description="The tickmesh benchmark (DESIGN.md §8). See bench/README.md."
    )
    p.add_argument("--concurrency", default="1,100,1000", help="comma-separated M values")
    p.add_argument("--steps", type=int, default=20, help="steps per lifetime N (even)")
    p.add_argument(
        "--profile",
        default="both",
        choices=["embedded", "cloud", "both"],
        help="deployment profile: embedded (SQLite, blob folder), cloud (PostgreSQL, S3, "
        "Redis) or both, one after the other (default)",
    )
    p.add_argument(
        "--store-url",
        help="cloud profile: an external PostgreSQL database (postgresql://...) instead of a "
        "throwaway cluster; the bench writes its records there and a floor table it drops",
    )
    p.add_argument(
        "--redis-url",
        help="cloud profile: an external Redis (redis://host:port/db) instead of a throwaway one",
    )
    p.add_argument(
        "--blob-url",
        help="cloud profile: an external S3 location (s3://bucket/prefix?endpoint_url=..&"
        "region=..; credentials from the AWS environment) instead of moto",
    )
    p.add_argument(
        "--layout",
        default="processes",
        choices=["processes", "in-process", "both"],
        help="services in separate processes (default), in one process, or both",
    )
    p.add_argument("--in-process", action="store_true", help="same as --layout in-process")
    p.add_argument(
        "--lifetimes",
        default="",
        help="comma-separated lifetimes per M (default: --sequential-lifetimes for M=1, else "
        "max(3 x M, --min-lifetimes): three per lane, so that a stretch of the phase has all "
        "M in flight)",
    )
    p.add_argument("--min-lifetimes", type=int, default=300)
    # 100 lifetimes are 1,900 gaps: the p99 at M = 1 is then the 19th-largest gap, not the
    # 4th-largest of 380, which one garbage collection or commit stall could move.
    p.add_argument("--sequential-lifetimes", type=int, default=100, help="lifetimes run at M=1")
    p.add_argument("--warmup", type=int, default=20, help="lifetimes run before measuring")
    p.add_argument(
        "--hop-lifetimes",
        type=int,
        default=10,
        help="after M=1, lifetimes run with a tap on the bus to split the gap into hops (0: skip)",
    )
    p.add_argument(
        "--max-starting",
        type=int,
        default=64,
        help="StartLifetime calls in flight at once (over ~1,000 on one channel fail)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument(
        "--policy-rules", type=int, default=20, help="rules of the enforced policy (0: none)"
    )
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--no-guardrail", action="store_true", help="skip the guardrail timing")
    p.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure signal → next dispatch and fork latency (bench/control.py)",
    )
    p.add_argument("--log-level", default="INFO", help="services' log level")
    p.add_argument("--timeout", type=float, default=600.0, help="per-lifetime timeout, s")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--keep", action="store_true", help="keep the data dir (logs, state.db)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each layout, wait up to this long for other load to drop below 10%% "
        "of the machine",
    )
    p.add_argument(
        "--pause", action="store_true", help="wait for Enter before each phase (to attach py-spy)"
    )
    args = p.parse_args(argv)
    if args.in_process:
        args.layout = "in-process"
    args.profiles = ["embedded", "cloud"] if args.profile == "both" else [args.profile]
    if "cloud" not in args.profiles and (args.store_url or args.redis_url or args.blob_url):
        p.error("--store-url, --redis-url and --blob-url are for --profile cloud or both")
    if args.steps < 2 or args.steps % 2:
        p.error("--steps must be an even number ≥ 2 (task + plan per round)")
    args.concurrency_list = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.lifetimes:
        lt = [int(x) for x in args.lifetimes.split(",") if x.strip()]
        if len(lt) != len(args.concurrency_list):
            p.error("--lifetimes needs one value per --concurrency value")
        args.lifetimes_list = lt
    else:
        args.lifetimes_list = [
            args.sequential_lifetimes if m == 1 else max(3 * m, args.min_lifetimes)
            for m in args.concurrency_list
        ]
    return args


def run_floor(
    nats_url: str,
    watched: dict[str, Monitored],
    work_dir: Path,
    m: int,
    steps: int,
    lifetimes: int,
    dsn: str | None = None,
    started: list[subprocess.Popen[bytes]] | None = None,
) -> dict[str, Any]:
    """The floor at M = ``m``: SQLite in ``work_dir``, or a table in the ``dsn`` database.

    ``watched`` are the servers it uses (nats-server, PostgreSQL), measured with it. The
    floor's process is appended to ``started``, so an interrupted run can kill it."""
    where = ["--dsn", dsn] if dsn else ["--db", str(work_dir / f"floor-{m}.db")]
    argv = [
        sys.executable,
        "-m",
        "bench.floor",
        "--nats-url",
        nats_url,
        *where,
        "--concurrency",
        str(m),
        "--steps",
        str(steps),
        "--lifetimes",
        str(lifetimes),
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if started is not None:
        started.append(proc)
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        if read_line(proc.stdout, 60, proc).strip() != "ready":
            raise RuntimeError("floor did not get ready")
        monitor = Monitor({"floor": psutil.Process(proc.pid), **watched}).start()
        monitor.begin()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        line = read_line(proc.stdout, 900, proc)
        window = monitor.end()
        monitor.stop()
        result: dict[str, Any] = json.loads(line)
        proc.wait(timeout=30)
    except BaseException:
        proc.kill()
        err = proc.stderr.read().decode() if proc.stderr else ""
        print(f"floor failed: {err[-2000:]}", file=sys.stderr)
        raise
    finally:
        for s in (proc.stdin, proc.stdout, proc.stderr):
            if s is not None:
                s.close()
    used = window.cpu_used()
    n = max(1, result["stored"])
    result["cpu_s_per_1000_steps"] = {k: v / n * 1000 for k, v in used.items()}
    result["cpu_ms_per_step"] = sum(used.values()) / n * 1000
    result["peak_rss_mb"] = {k: v / 2**20 for k, v in window.peak_rss.items()}
    result["foreign_cpu_share"] = window.foreign_cpu() / (result["wall_s"] * (os.cpu_count() or 1))
    return result


async def wait_idle(limit_s: float, threshold: float = 0.10) -> float:
    """Wait (at most ``limit_s``) until the machine is mostly idle; return the busy share seen."""
    deadline = time.perf_counter() + limit_s
    cores = os.cpu_count() or 1
    share = 1.0
    while True:
        b0, t0 = machine_busy_seconds(), time.perf_counter()
        await asyncio.sleep(2.0)
        share = (machine_busy_seconds() - b0) / ((time.perf_counter() - t0) * cores)
        if share < threshold or time.perf_counter() > deadline:
            return share
        print(f"(machine {share * 100:.0f}% busy with other work; waiting)", flush=True)


async def run_layout(
    layout: Layout,
    args: argparse.Namespace,
    work_dir: Path,
    profile: str = "embedded",
    cloud: CloudServers | None = None,
) -> dict[str, Any]:
    """Every phase of one layout in one profile (``cloud`` holds the cloud profile's servers)."""
    if args.wait_idle:
        await wait_idle(args.wait_idle)
    max_m = max(args.concurrency_list)
    stores = await cloud.stores(layout) if cloud is not None else None
    servers: dict[str, Monitored] = dict(cloud.processes) if cloud is not None else {}
    cluster = Cluster(
        layout=layout,
        work_dir=work_dir,
        worker_concurrency=max(max_m, 16),
        workers=args.workers,
        log_level=args.log_level,
        store_url=stores.store_url if stores else None,
        blob_url=stores.blob_url if stores else None,
        usage_counter_url=stores.usage_counter_url if stores else None,
        env=dict(cloud.env) if cloud is not None else {},
    )
    tag = f"{profile}/{layout}"
    print(f"[{tag}] starting the mesh in {work_dir} ...", flush=True)
    try:
        await finish_in_thread(cluster.start)
    except BaseException:
        print(f"[{tag}] did not start; {cluster.health_report()}", file=sys.stderr, flush=True)
        await finish_in_thread(cluster.stop)
        raise
    out: dict[str, Any] = {"description": LAYOUTS[layout], "phases": []}
    monitor = Monitor({**cluster.processes, **servers})
    monitor.add("load-generator", psutil.Process())
    monitor.start()
    load = LoadGenerator(
        cluster.router_target, cluster.nats_url, "default", max_starting=args.max_starting
    )
    try:
        if cloud is not None and stores is not None:
            out["stores"] = await cloud.describe(stores)
        if args.policy_rules:
            await guardrail_bench.put_policy(cluster.guardrail_target, "default", args.policy_rules)
            await asyncio.sleep(0.5)  # the router picks the new snapshot up from the KV watch
        rounds = args.steps // 2
        await load.open(rounds)
        if args.warmup:
            warm = await load.run(
                concurrency=min(10, args.warmup), lifetimes=args.warmup, rounds=rounds, limit_s=60
            )
            if warm.states.get("completed", 0) != args.warmup:
                raise RuntimeError(
                    f"warm-up lifetimes did not complete: {dict(warm.states)} {warm.errors}"
                )
            await load.drain()
            print(f"[{tag}] warm-up: {args.warmup} lifetimes in {warm.wall_s:.2f}s", flush=True)
        if not args.no_guardrail and args.policy_rules and layout == "processes":
            rpc = await guardrail_bench.over_rpc(cluster.guardrail_target, "default")
            rpc_lt = await guardrail_bench.over_rpc(
                cluster.guardrail_target,
                "default",
                lifetime_id=warm.lifetime_ids[0] if args.warmup else "",
            )
            out["guardrail_rpc"] = {"rpc": rpc, "rpc_lifetime": rpc_lt}
        for m, lifetimes in zip(args.concurrency_list, args.lifetimes_list, strict=True):
            if args.pause:
                print(
                    f"[{tag}] pids: "
                    + ", ".join(f"{n}={p.pid}" for n, p in {**cluster.processes, **servers}.items())
                )
                await asyncio.to_thread(input, f"[{tag}] Enter runs M={m} ... ")
            watermark = await asyncio.to_thread(max_seq, cluster.state_db)
            probe_us = speed_probe()
            print(f"[{tag}] M={m}: {lifetimes} lifetimes x {args.steps} steps ...", flush=True)
            monitor.begin()
            run = await load.run(
                concurrency=m, lifetimes=lifetimes, rounds=rounds, limit_s=args.timeout
            )
            # Everything the phase caused (lifetime events, lifetime rows) must be stored
            # before its CPU is read and the next phase starts.
            drain_s, backlog = await load.drain()
            window = monitor.end()
            records = await asyncio.to_thread(
                read_records, cluster.state_db, "default", run.lifetime_ids, watermark
            )
            g = gaps(records)
            stored = len(records)
            used = window.cpu_used()
            mesh_cpu = sum(
                v for k, v in used.items() if k not in MESH_EXCLUDED and not k.startswith("worker")
            )
            all_cpu = sum(used.values())
            n = max(1, stored)
            phase: dict[str, Any] = {
                "concurrency": m,
                "lifetimes": lifetimes,
                "completed": run.states.get("completed", 0),
                "failed": lifetimes - run.states.get("completed", 0),
                "states": dict(run.states),
                "errors": run.errors,
                "expected_executions": lifetimes * args.steps,
                "stored_executions": stored,
                "wall_s": run.wall_s,
                "steps_per_s": stored / run.wall_s if run.wall_s > 0 else 0.0,
                # Steps finished while every lane was busy (None: never all at once).
                "steps_per_s_all_in_flight": steps_per_s_within(records, run.full_window()),
                "all_in_flight_s": _span(run.full_window()),
                "drain_s": drain_s,
                "backlog_at_end": backlog,
                "steps_per_s_incl_drain": stored / (run.wall_s + drain_s)
                if run.wall_s > 0
                else 0.0,
                "gap_ms": g["gap_ms"],
                "gap_parts_ms": g["parts_ms"],
                "lifetime_s": _summ(run.lifetime_s),
                "cpu_s": used,
                "cpu_s_per_1000_steps": {k: v / n * 1000 for k, v in used.items()},
                "cpu_ms_per_step": {"mesh": mesh_cpu / n * 1000, "all": all_cpu / n * 1000},
                "peak_rss_mb": {k: v / 2**20 for k, v in window.peak_rss.items()},
                # CPU the machine spent on anything else meanwhile (other users' jobs): when it
                # is large, the figures are pessimistic.
                "foreign_cpu_s": window.foreign_cpu(),
                "foreign_cpu_share": window.foreign_cpu()
                / ((run.wall_s + drain_s) * (os.cpu_count() or 1)),
                "load_average_after": list(os.getloadavg()),
                # The machine's speed just before the phase (machine.speed_probe).
                "speed_probe_us": probe_us,
            }
            nan = float("nan")
            print(
                f"[{tag}] M={m}: {stored} stored in {run.wall_s:.2f}s = "
                f"{phase['steps_per_s']:.0f} steps/s"
                + (
                    f" ({phase['steps_per_s_all_in_flight']:.0f} with all {m} in flight"
                    f" for {phase['all_in_flight_s']:.1f}s)"
                    if phase["steps_per_s_all_in_flight"] is not None
                    else ""
                )
                + f", gap p50 {g['gap_ms'].get('p50', nan):.2f} "
                f"p99 {g['gap_ms'].get('p99', nan):.2f} ms"
                + (f"; then {drain_s:.2f}s to drain {backlog}" if backlog else "")
                + (f"; NOT COMPLETED: {dict(run.states)} {run.errors}" if phase["failed"] else ""),
                flush=True,
            )
            if not args.no_floor and layout == args.floor_layout:
                print(f"[{tag}] M={m}: floor ...", flush=True)
                watched: dict[str, Monitored] = {"nats-server": cluster.processes["nats-server"]}
                if "postgres" in servers:
                    watched["postgres"] = servers["postgres"]
                floor_procs: list[subprocess.Popen[bytes]] = []
                # The floor runs after the phase, and this machine's speed can move between
                # the two: the ratio means little unless both probes agree.
                floor_probe_us = speed_probe()
                try:
                    fl = await asyncio.to_thread(
                        run_floor,
                        cluster.nats_url,
                        watched,
                        work_dir,
                        m,
                        args.steps,
                        lifetimes,
                        stores.store_url if stores else None,
                        floor_procs,
                    )
                except asyncio.CancelledError:
                    for proc in floor_procs:  # its thread then sees it exit and ends
                        proc.kill()
                    raise
                fl["speed_probe_us"] = floor_probe_us
                phase["floor"] = fl
                phase["ratio"] = {
                    "throughput": phase["steps_per_s"] / fl["steps_per_s"]
                    if fl["steps_per_s"]
                    else None,
                    "gap_p50": g["gap_ms"].get("p50", 0) / fl["gap_ms"]["p50"]
                    if fl["gap_ms"].get("p50")
                    else None,
                    "gap_p99": g["gap_ms"].get("p99", 0) / fl["gap_ms"]["p99"]
                    if fl["gap_ms"].get("p99")
                    else None,
                }
                print(
                    f"[{tag}] M={m}: floor {fl['steps_per_s']:.0f} steps/s, gap p50 "
                    f"{fl['gap_ms']['p50']:.2f} p99 {fl['gap_ms']['p99']:.2f} ms "
                    f"(probe {floor_probe_us:.1f} µs, {probe_us:.1f} before the phase)",
                    flush=True,
                )
            out["phases"].append(phase)
            if m == 1 and args.hop_lifetimes:
                out["hops"] = await measure_hops(load, cluster.state_db, args)
        out["processes"] = [*cluster.processes, *servers, "load-generator"]
    except BaseException:
        print(f"[{tag}] failed; {cluster.health_report()}", file=sys.stderr, flush=True)
        raise
    finally:
        with contextlib.suppress(Exception):
            await load.close()
        monitor.stop()
        await finish_in_thread(cluster.stop)
    return out


async def measure_hops(
    load: LoadGenerator, db: StoreRef, args: argparse.Namespace
) -> dict[str, Any]:
    """Sequential lifetimes with a tap on the bus: where a step's time goes at M = 1."""
    tap = Tap("default")
    subs = await load.tap(tap)
    watermark = await asyncio.to_thread(max_seq, db)
    try:
        run = await load.run(
            concurrency=1, lifetimes=args.hop_lifetimes, rounds=args.steps // 2, limit_s=60
        )
        await load.drain()
    finally:
        for sub in subs:
            await sub.unsubscribe()
    records = await asyncio.to_thread(read_records, db, "default", run.lifetime_ids, watermark)
    return {
        "lifetimes": args.hop_lifetimes,
        "gap_ms": gaps(records)["gap_ms"],
        "segments_ms": tap.segments(records),
    }


def _span(window: tuple[float, float] | None) -> float | None:
    return None if window is None else window[1] - window[0]


def _summ(values: list[float]) -> dict[str, float]:
    from .stats import summarize

    return summarize(values)


async def run_profile(
    profile: str, layouts: list[Layout], args: argparse.Namespace, base: Path
) -> dict[str, Any]:
    """Every layout in one profile; the cloud profile's servers live as long as this call."""
    started = time.perf_counter()
    out: dict[str, Any] = {"description": PROFILES[profile], "layouts": {}}
    async with contextlib.AsyncExitStack() as stack:
        cloud: CloudServers | None = None
        if profile == "cloud":
            print(f"[{profile}] starting PostgreSQL, Redis and S3 ...", flush=True)
            cloud = await stack.enter_async_context(
                CloudServers(
                    base / "cloud-servers",
                    store_url=args.store_url,
                    redis_url=args.redis_url,
                    blob_url=args.blob_url,
                )
            )
            print(f"[{profile}] {cloud.summary()}", flush=True)
        for layout in layouts:
            data = await run_layout(layout, args, base / layout, profile, cloud)
            rpc = data.pop("guardrail_rpc", None)
            if rpc:
                out["guardrail_rpc"] = rpc
            out["layouts"][layout] = data
    out["duration_s"] = time.perf_counter() - started
    return out


async def main_async(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM ends the run the way Ctrl-C does: cancelled, so every server is stopped.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    layouts: list[Layout] = ["processes", "in-process"] if args.layout == "both" else [args.layout]
    args.floor_layout = layouts[0]
    base = Path(tempfile.mkdtemp(prefix="tickmesh-bench-"))
    result: dict[str, Any] = {
        "machine": describe(base),
        "config": {
            "profile": args.profile,
            "profiles": args.profiles,
            "steps": args.steps,
            "concurrency": args.concurrency_list,
            "lifetimes": args.lifetimes_list,
            "warmup_lifetimes": args.warmup,
            "workers": args.workers,
            "max_starting": args.max_starting,
            "policy_rules": args.policy_rules,
            "log_level": args.log_level,
            "layouts": layouts,
            "argv": sys.argv[1:],
        },
        "profiles": {},
    }
    started = time.perf_counter()
    try:
        if not args.no_guardrail:
            print("guardrail: timing PolicyEngine.evaluate in process ...", flush=True)
            result["guardrail"] = {
                "in_process": guardrail_bench.in_process(max(1, args.policy_rules or 20))
            }
        for profile in args.profiles:
            result["profiles"][profile] = await run_profile(profile, layouts, args, base / profile)
    finally:
        if args.keep:
            print(f"data kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if args.control:
        print("lifetime control: signal and fork latency (in-process mesh) ...", flush=True)
        control_started = time.perf_counter()
        result["lifetime_control"] = await control_bench.run()
        result["lifetime_control"]["duration_s"] = time.perf_counter() - control_started
    result["duration_s"] = time.perf_counter() - started
    print()
    print(render(result))
    if "lifetime_control" in result:
        print()
        print(control_bench.render(result["lifetime_control"]))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path, png = write(result, args.out, stamp)
    print()
    print(f"results: {json_path}" + (f", plot: {png}" if png else ""))
    failed = sum(
        ph["failed"]
        for prof in result["profiles"].values()
        for d in prof["layouts"].values()
        for ph in d["phases"]
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    except CloudSetupError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
