"""The bench report shows the machine's speed before each phase and before its floor."""

from __future__ import annotations

from typing import Any

from bench import report


def _phase(probe_us: float, floor: dict[str, Any] | None) -> dict[str, Any]:
    gaps = {"p50": 250.0, "p95": 300.0, "p99": 330.0}
    phase: dict[str, Any] = {
        "concurrency": 1000,
        "lifetimes": 3000,
        "stored_executions": 60_000,
        "wall_s": 18.0,
        "steps_per_s": 3333.0,
        "steps_per_s_all_in_flight": 3400.0,
        "drain_s": 0.2,
        "steps_per_s_incl_drain": 3300.0,
        "gap_ms": gaps,
        "gap_parts_ms": {
            k: {"p50": 1.0, "p99": 2.0}
            for k in ("finished_to_stored", "stored_to_dispatched", "dispatched_to_started")
        },
        "cpu_ms_per_step": {"mesh": 0.46, "all": 0.54},
        "cpu_s_per_1000_steps": {"router": 0.215},
        "peak_rss_mb": {"router": 80.0},
        "foreign_cpu_share": 0.01,
        "speed_probe_us": probe_us,
        "failed": 0,
    }
    if floor is not None:
        phase["floor"] = floor
        phase["ratio"] = {"throughput": 1.1, "gap_p50": 0.5}
    return phase


def _result(phase: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": {
            "date": "2026-12-07T05:00:00+00:00",
            "cores": 2,
            "ram_gib": 23.5,
            "cpu_model": "AMD EPYC",
            "python": "3.11.7",
            "nats_server": "nats-server: v2.15.1",
            "tickmesh_commit": "abc1234",
            "data_dir_filesystem": "ext4 on /dev/vda (/)",
        },
        "config": {"steps": 20, "policy_rules": 20},
        "profiles": {
            "embedded": {
                "description": "SQLite",
                "layouts": {
                    "processes": {
                        "description": "one process each",
                        "processes": ["router"],
                        "phases": [phase],
                    }
                },
            }
        },
    }


def _row(text: str) -> str:
    """The phase's row of the throughput table (3,333 steps/s)."""
    [row] = [line for line in text.splitlines() if line.startswith("1000 ") and "3,333" in line]
    return row


def test_a_phase_row_shows_the_probe_before_the_phase_and_before_its_floor() -> None:
    floor = {"steps_per_s": 3000.0, "gap_ms": {"p50": 400.0, "p99": 500.0}, "speed_probe_us": 4.4}
    text = report.render(_result(_phase(3.1, floor)))
    assert _row(text).endswith("3.1 / 4.4")
    assert "probe µs (floor)" in text


def test_a_result_written_before_the_floor_had_its_probe_shows_the_phase_probe_alone() -> None:
    floor = {"steps_per_s": 3000.0, "gap_ms": {"p50": 400.0, "p99": 500.0}}
    assert _row(report.render(_result(_phase(3.1, floor)))).endswith(" 3.1")
    assert _row(report.render(_result(_phase(3.1, None)))).endswith(" 3.1")
