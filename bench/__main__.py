"""`python -m bench`: the tickmesh benchmark (DESIGN.md §8, issue 9).

Starts the mesh (each service in its own process by default), registers a chain of
no-op task/plan steps, runs lifetimes at each concurrency M, reads the stored records
back to measure the per-step orchestration gap, samples CPU and RSS per process, runs
the unbatched floor at the same M, times guardrail evaluation, and writes
bench/results/<timestamp>.json and .png. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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
from .cluster import REPO, Cluster, Layout, read_line
from .hops import Tap
from .load import LoadGenerator
from .machine import describe
from .monitor import Monitor, machine_busy_seconds
from .records import StoreRef, gaps, max_seq, read_records
from .report import render, write

LAYOUTS: dict[str, str] = {
    "processes": "router, guardrail, state, executor pool: one `tickmesh serve` process each; "
    "nats-server; one worker process; load generator in the bench process",
    "in-process": "router, guardrail, state, executor pool in one process "
    "(tickmesh.embedded.Mesh); nats-server; one worker process; load generator in the bench "
    "process",
}
MESH_EXCLUDED = ("load-generator", "floor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,100,1000", help="comma-separated M values")
    p.add_argument("--steps", type=int, default=20, help="steps per lifetime N (even)")
    p.add_argument("--profile", default="embedded", choices=["embedded"], help="deployment profile")
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
        help="comma-separated lifetimes per M (default: 20 for M=1, else max(M, --min-lifetimes))",
    )
    p.add_argument("--min-lifetimes", type=int, default=300)
    p.add_argument("--sequential-lifetimes", type=int, default=20, help="lifetimes run at M=1")
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
            args.sequential_lifetimes if m == 1 else max(m, args.min_lifetimes)
            for m in args.concurrency_list
        ]
    return args


def run_floor(
    nats_url: str, nats_proc: psutil.Process, work_dir: Path, m: int, steps: int, lifetimes: int
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "bench.floor",
        "--nats-url",
        nats_url,
        "--db",
        str(work_dir / f"floor-{m}.db"),
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
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        if read_line(proc.stdout, 60, proc).strip() != "ready":
            raise RuntimeError("floor did not get ready")
        monitor = Monitor({"floor": psutil.Process(proc.pid), "nats-server": nats_proc}).start()
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


async def run_layout(layout: Layout, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    if args.wait_idle:
        await wait_idle(args.wait_idle)
    max_m = max(args.concurrency_list)
    cluster = Cluster(
        layout=layout,
        work_dir=work_dir,
        worker_concurrency=max(max_m, 16),
        workers=args.workers,
        log_level=args.log_level,
    )
    print(f"[{layout}] starting the mesh in {work_dir} ...", flush=True)
    await asyncio.to_thread(cluster.start)
    out: dict[str, Any] = {"description": LAYOUTS[layout], "phases": []}
    monitor = Monitor(cluster.processes)
    monitor.add("load-generator", psutil.Process())
    monitor.start()
    load = LoadGenerator(
        cluster.router_target, cluster.nats_url, "default", max_starting=args.max_starting
    )
    try:
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
            print(f"[{layout}] warm-up: {args.warmup} lifetimes in {warm.wall_s:.2f}s", flush=True)
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
                    f"[{layout}] pids: "
                    + ", ".join(f"{n}={p.pid}" for n, p in cluster.processes.items())
                )
                await asyncio.to_thread(input, f"[{layout}] Enter runs M={m} ... ")
            watermark = await asyncio.to_thread(max_seq, cluster.state_db)
            print(f"[{layout}] M={m}: {lifetimes} lifetimes x {args.steps} steps ...", flush=True)
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
            }
            nan = float("nan")
            print(
                f"[{layout}] M={m}: {stored} stored in {run.wall_s:.2f}s = "
                f"{phase['steps_per_s']:.0f} steps/s, gap p50 {g['gap_ms'].get('p50', nan):.2f} "
                f"p99 {g['gap_ms'].get('p99', nan):.2f} ms"
                + (f"; then {drain_s:.2f}s to drain {backlog}" if backlog else "")
                + (f"; NOT COMPLETED: {dict(run.states)} {run.errors}" if phase["failed"] else ""),
                flush=True,
            )
            if not args.no_floor and layout == args.floor_layout:
                print(f"[{layout}] M={m}: floor ...", flush=True)
                fl = await asyncio.to_thread(
                    run_floor,
                    cluster.nats_url,
                    cluster.processes["nats-server"],
                    work_dir,
                    m,
                    args.steps,
                    lifetimes,
                )
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
                    f"[{layout}] M={m}: floor {fl['steps_per_s']:.0f} steps/s, gap p50 "
                    f"{fl['gap_ms']['p50']:.2f} p99 {fl['gap_ms']['p99']:.2f} ms",
                    flush=True,
                )
            out["phases"].append(phase)
            if m == 1 and args.hop_lifetimes:
                out["hops"] = await measure_hops(load, cluster.state_db, args)
        out["processes"] = [*cluster.processes, "load-generator"]
    except BaseException:
        print(f"[{layout}] failed; {cluster.health_report()}", file=sys.stderr, flush=True)
        raise
    finally:
        await load.close()
        monitor.stop()
        await asyncio.to_thread(cluster.stop)
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


def _summ(values: list[float]) -> dict[str, float]:
    from .stats import summarize

    return summarize(values)


async def main_async(args: argparse.Namespace) -> int:
    layouts: list[Layout] = ["processes", "in-process"] if args.layout == "both" else [args.layout]
    args.floor_layout = layouts[0]
    base = Path(tempfile.mkdtemp(prefix="tickmesh-bench-"))
    result: dict[str, Any] = {
        "machine": describe(base),
        "config": {
            "profile": args.profile,
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
        "layouts": {},
    }
    started = time.perf_counter()
    try:
        if not args.no_guardrail:
            print("guardrail: timing PolicyEngine.evaluate in process ...", flush=True)
            result["guardrail"] = {
                "in_process": guardrail_bench.in_process(max(1, args.policy_rules or 20))
            }
        for layout in layouts:
            data = await run_layout(layout, args, base / layout)
            rpc = data.pop("guardrail_rpc", None)
            if rpc and "guardrail" in result:
                result["guardrail"].update(rpc)
            result["layouts"][layout] = data
    finally:
        if args.keep:
            print(f"data kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if args.control:
        print("lifetime control: signal and fork latency (in-process mesh) ...", flush=True)
        result["lifetime_control"] = await control_bench.run()
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
    failed = sum(ph["failed"] for d in result["layouts"].values() for ph in d["phases"])
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
