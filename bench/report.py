"""The printed table, the JSON file and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TARGETS = {
    "gap_p50_ms_m1": 2.5,
    "gap_p99_ms_m1": 6.0,
    "steps_per_s_m1000": 3000.0,
    "cpu_ms_per_step": 0.5,
    "guardrail_us_per_step": 50.0,
}


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(
        h.rjust(w) if i else h.ljust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(out)


def profiles(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``result["profiles"]``; a result written before the cloud profile had only
    ``result["layouts"]``, all embedded."""
    if "profiles" in result:
        found: dict[str, dict[str, Any]] = result["profiles"]
        return found
    return {"embedded": {"description": "SQLite, blob folder", "layouts": result["layouts"]}}


def _stores_line(profile: str, data: dict[str, Any], machine: dict[str, Any]) -> str:
    """Where the profile's state lives, as printed under its heading."""
    if profile != "cloud":
        return f"  store: SQLite, WAL, synchronous=FULL, on {machine['data_dir_filesystem']}"
    for layout in data["layouts"].values():
        st = layout.get("stores")
        if st:
            pg, rd = st["postgres"], st["redis"]
            return (
                f"  store: PostgreSQL {pg['server_version']} ({pg['where']}; fsync={pg['fsync']},"
                f" synchronous_commit={pg['synchronous_commit']},"
                f" wal_sync_method={pg['wal_sync_method']}, shared_buffers={pg['shared_buffers']})"
                f"\n  usage counters: Redis {rd['version']} ({rd['where']}); blobs: {st['s3']}"
                f"\n  floor: one INSERT per step, own transaction, through an asyncpg pool"
            )
    return "  store: PostgreSQL"


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    parts = [
        f"tickmesh bench — {m['date']}  {m['cores']} cores, {m['ram_gib']} GiB, {m['cpu_model']}, "
        f"python {m['python']}, {m['nats_server']}, commit {m['tickmesh_commit']}",
        f"lifetimes of {cfg['steps']} steps (no-op task ⇄ plan); "
        + (
            f"{cfg['policy_rules']}-rule guardrail policy enforced by the router"
            if cfg["policy_rules"]
            else "no guardrail policy"
        )
        + f"; data folder on {m['data_dir_filesystem']}",
    ]
    for profile, prof in profiles(result).items():
        parts.append("")
        parts.append(
            f"==== profile: {profile} ({prof['description']})"
            + (f" — {prof['duration_s']:.0f} s" if "duration_s" in prof else "")
        )
        parts.append(_stores_line(profile, prof, m))
        parts.extend(_render_layouts(profile, prof))
        rpc = prof.get("guardrail_rpc")
        if rpc:
            parts.append("")
            parts.append(f"  guardrail Evaluate RPC ({profile}):")
            parts.extend(_rpc_lines(rpc))
    g = result.get("guardrail")
    if g:
        parts.append("")
        parts.append("== guardrail evaluation (20 rules, post_result, none firing)")
        ip = g["in_process"]["us"]
        parts.append(
            f"  in process PolicyEngine.evaluate: p50 {_f(ip['p50'])} µs, p99 {_f(ip['p99'])} µs, "
            f"mean {_f(ip['mean'])} µs over {ip['n']:,} calls (target ≤ 50 µs per step)"
        )
        parts.extend(_rpc_lines(g))  # results written before the cloud profile
    if "duration_s" in result:
        parts.append("")
        parts.append(f"run took {result['duration_s']:.0f} s")
    return "\n".join(parts)


def _rpc_lines(g: dict[str, Any]) -> list[str]:
    lines = []
    for key, label in (
        ("rpc", "usage from the request only"),
        ("rpc_lifetime", "with lifetime usage"),
    ):
        r = g.get(key)
        if r:
            lines.append(
                f"  Evaluate RPC, batch {r['batch']} ({label}): "
                f"{_f(r['us_per_item']['p50'])} µs/item p50, {_f(r['us_per_item']['p99'])} p99 "
                f"(call {_f(r['call_ms']['p50'])} ms p50)"
            )
    return lines


def _render_layouts(profile: str, prof: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    for layout, data in prof["layouts"].items():
        parts.append("")
        parts.append(f"== {profile} / {layout} ({data['description']})")
        rows = []
        for ph in data["phases"]:
            fl = ph.get("floor") or {}
            rows.append(
                [
                    str(ph["concurrency"]),
                    _f(ph["lifetimes"]),
                    _f(ph["stored_executions"]),
                    _f(ph["wall_s"]),
                    _f(ph["steps_per_s"], 0),
                    _f(ph.get("steps_per_s_all_in_flight"), 0),
                    _f(ph.get("drain_s"), 1),
                    _f(ph.get("steps_per_s_incl_drain"), 0),
                    _f(ph["gap_ms"].get("p50")),
                    _f(ph["gap_ms"].get("p95")),
                    _f(ph["gap_ms"].get("p99")),
                    _f(ph["cpu_ms_per_step"]["mesh"], 3),
                    _f(ph["cpu_ms_per_step"]["all"], 3),
                    _f(fl.get("steps_per_s"), 0),
                    _f((fl.get("gap_ms") or {}).get("p50")),
                    _f((fl.get("gap_ms") or {}).get("p99")),
                    _f(ph.get("ratio", {}).get("throughput")),
                    _f(ph.get("ratio", {}).get("gap_p50")),
                    f"{ph['foreign_cpu_share'] * 100:.0f}%",
                    _f(ph.get("speed_probe_us"), 1)
                    + (f" / {_f(fl['speed_probe_us'], 1)}" if "speed_probe_us" in fl else "")
                    + ("" if not ph["failed"] else f"  {ph['failed']} NOT COMPLETED"),
                ]
            )
        parts.append(
            _table(
                [
                    "M",
                    "lifetimes",
                    "steps",
                    "wall s",
                    "steps/s",
                    "all M in flight",
                    "drain s",
                    "incl. drain",
                    "gap p50",
                    "p95",
                    "p99 ms",
                    "CPU ms/step mesh",
                    "all",
                    "floor steps/s",
                    "floor p50",
                    "p99 ms",
                    "x floor thr",
                    "x floor p50",
                    "other load",
                    "probe µs (floor)",
                ],
                rows,
            )
        )
        parts.append(
            "  (CPU 'mesh' = services + nats-server"
            + (" + PostgreSQL, Redis and S3 (moto)" if profile == "cloud" else "")
            + "; 'all' adds the worker and the load generator;"
            " 'other load' = share of the machine's CPU used by other processes meanwhile;"
            "\n   'all M in flight' = steps/s from the last lane's first start until the first"
            " lane ran out of work (the phase without its ramp up and ramp down);"
            "\n   'drain s' = time after the last lifetime ended until every consumer"
            " (lifetime events included) had caught up: CPU is counted over wall + drain;"
            "\n   'probe µs' = a fixed piece of work timed just before the phase (and before its"
            " floor, after the slash): higher means the machine was slower then)"
        )
        names = data["processes"]
        rows = []
        for name in names:
            row = [name]
            for ph in data["phases"]:
                row.append(_f(ph["cpu_s_per_1000_steps"].get(name), 3))
                row.append(_f(ph["peak_rss_mb"].get(name), 0))
            rows.append(row)
        headers = ["process"]
        for ph in data["phases"]:
            headers += [f"CPU s/1k steps M={ph['concurrency']}", "peak RSS MB"]
        parts.append("")
        parts.append(_table(headers, rows))
        rows = []
        for ph in data["phases"]:
            p = ph["gap_parts_ms"]
            rows.append(
                [str(ph["concurrency"])]
                + [
                    f"{_f(p[k].get('p50'))} / {_f(p[k].get('p99'))}"
                    for k in ("finished_to_stored", "stored_to_dispatched", "dispatched_to_started")
                ]
            )
        parts.append("")
        parts.append(
            _table(
                ["M", "finished→stored p50/p99 ms", "stored→dispatched", "dispatched→started"],
                rows,
            )
        )
        hops = data.get("hops")
        if hops:
            parts.append("")
            parts.append(
                f"  where a step's time goes at M=1 ({hops['lifetimes']} lifetimes with a tap on"
                f" the bus; gap p50 {_f(hops['gap_ms'].get('p50'))} ms):"
            )
            parts.append(
                _table(
                    ["  hop", "p50 ms", "p95 ms", "p99 ms"],
                    [
                        [f"  {k}", _f(v.get("p50")), _f(v.get("p95")), _f(v.get("p99"))]
                        for k, v in hops["segments_ms"].items()
                    ],
                )
            )
        for ph in data["phases"]:
            fl = ph.get("floor")
            if fl and fl.get("cpu_s_per_1000_steps"):
                c = fl["cpu_s_per_1000_steps"]
                parts.append(
                    f"  floor M={ph['concurrency']}: CPU s/1k steps "
                    + ", ".join(f"{k} {_f(v, 3)}" for k, v in c.items())
                    + f" (CPU ms/step {_f(fl.get('cpu_ms_per_step'), 3)},"
                    f" other load {fl.get('foreign_cpu_share', 0.0) * 100:.0f}%)"
                )
    return parts


def write(result: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    png = out_dir / f"{stamp}.png"
    try:
        plot(result, png)
    except Exception as exc:  # the figures matter more than the picture
        print(f"(no plot: {exc})")
        return json_path, None
    return json_path, png


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    markers = {"embedded": "o", "cloud": "^"}
    floor_colors = {"embedded": "gray", "cloud": "black"}
    i = 0
    for profile, prof in profiles(result).items():
        mark = markers.get(profile, "o")
        floor_done = False
        for layout, data in prof["layouts"].items():
            c = colors[i % len(colors)]
            i += 1
            name = f"{profile}/{layout}"
            phases = data["phases"]
            ms = [ph["concurrency"] for ph in phases]
            ax1.plot(
                ms,
                [ph["steps_per_s"] for ph in phases],
                f"{mark}-",
                color=c,
                label=f"tickmesh ({name})",
            )
            ax2.plot(
                ms,
                [ph["gap_ms"]["p50"] for ph in phases],
                f"{mark}-",
                color=c,
                label=f"p50 ({name})",
            )
            ax2.plot(
                ms,
                [ph["gap_ms"]["p99"] for ph in phases],
                f"{mark}--",
                color=c,
                label=f"p99 ({name})",
            )
            floors = [ph for ph in phases if ph.get("floor")]
            if floors and not floor_done:
                fc = floor_colors.get(profile, "gray")
                fm = [ph["concurrency"] for ph in floors]
                ax1.plot(
                    fm,
                    [ph["floor"]["steps_per_s"] for ph in floors],
                    "s:",
                    color=fc,
                    label=f"floor ({profile})",
                )
                ax2.plot(
                    fm,
                    [ph["floor"]["gap_ms"]["p50"] for ph in floors],
                    "s-",
                    color=fc,
                    label=f"floor p50 ({profile})",
                )
                ax2.plot(
                    fm,
                    [ph["floor"]["gap_ms"]["p99"] for ph in floors],
                    "s--",
                    color=fc,
                    label=f"floor p99 ({profile})",
                )
                floor_done = True
    ax2.plot([1], [TARGETS["gap_p50_ms_m1"]], "g*", markersize=10, label="target p50 at M=1")
    ax2.plot([1], [TARGETS["gap_p99_ms_m1"]], "gx", markersize=8, label="target p99 at M=1")
    ax1.axhline(
        TARGETS["steps_per_s_m1000"], color="green", lw=0.8, ls="--", label="target at M=1000"
    )
    ax1.set_xscale("log")
    ax1.set_xlabel("concurrent lifetimes M")
    ax1.set_ylabel("durable steps/s")
    ax1.set_title("throughput")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent lifetimes M")
    ax2.set_ylabel("per-step gap, ms")
    ax2.set_title("orchestration gap (finished → next started)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(
        f"tickmesh bench {m['date']} — {m['cores']} cores, {m['cpu_model']}, "
        f"{result['config']['steps']} steps/lifetime; profiles " + ", ".join(profiles(result)),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
