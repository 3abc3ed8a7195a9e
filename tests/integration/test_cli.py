"""The `tickmesh` command: graph validation, the README's `tickmesh run` example, --version.

`tickmesh run` starts its own embedded mesh (nats-server included), exactly as
a user's shell would; it runs in a worker thread because the command calls
``asyncio.run`` itself.
"""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tickmesh.cli.main import main

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello" / "graph.yaml"
CODING_AGENT = REPO / "examples" / "coding_agent" / "graph.yaml"
TICKMESH = Path(sys.executable).with_name("tickmesh")

BAD_GRAPH = """\
graph: broken
entry: nowhere
nodes:
  - id: a
    kind: task
  - id: b
    kind: widget
edges:
  - {from: a, to: b}
"""


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = main(argv, out=out)
    return code, out.getvalue()


# --- graph validate -----------------------------------------------------------------------


def test_graph_validate_reports_ok_for_good_files() -> None:
    code, text = _run(["graph", "validate", str(HELLO), str(CODING_AGENT)])
    assert code == 0, text
    lines = text.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        rf"{re.escape(str(HELLO))}: ok \(graph hello, 3 nodes, digest [0-9a-f]{{12}}\)", lines[0]
    )
    assert lines[1].startswith(f"{CODING_AGENT}: ok (graph coding_agent, 6 nodes, digest ")


def test_graph_validate_prints_file_line_column_field_for_each_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_GRAPH)
    code, text = _run(["graph", "validate", str(bad), str(HELLO)])
    assert code == 1
    lines = text.splitlines()
    assert lines[-1].startswith(f"{HELLO}: ok ")
    problems = lines[:-1]
    assert problems, text
    for line in problems:
        assert re.fullmatch(rf"{re.escape(str(bad))}:\d+:\d+ [\w.\[\]]+: .+", line), line
    assert f'{bad}:7:11 nodes[1].kind: expected task or plan, got "widget"' in problems


def test_graph_validate_of_a_file_that_is_not_yaml_fails(tmp_path: Path) -> None:
    bad = tmp_path / "tabs.yaml"
    bad.write_text("graph: x\nnodes: [\n")
    code, text = _run(["graph", "validate", str(bad)])
    assert code == 1
    assert text.startswith(f"{bad}:")


# --- run ------------------------------------------------------------------------------------


async def test_run_hello_prints_the_trace_and_the_output() -> None:
    """The README's example: tickmesh run examples/hello/graph.yaml --input '{"name":"ada"}'."""
    code, text = await asyncio.to_thread(
        _run, ["run", str(HELLO), "--input", '{"name":"ada"}', "--timeout", "20"]
    )
    assert code == 0, text
    assert re.search(r"^embedded mesh: router 127\.0\.0\.1:\d+, executor pool", text, re.M)
    assert re.search(r"^lifetime \S+ started \(graph hello v1\)$", text, re.M)
    tree = [line for line in text.splitlines() if "─ " in line]
    shapes = [re.sub(r" [\d.]+ ms", " _ ms", line) for line in tree]
    assert shapes == [
        "└─ greet #1 [task greet] succeeded _ ms",
        "   └─ decide #1 [plan decide] dispatch _ ms  → shout",
        "      └─ shout #1 [task shout] succeeded _ ms",
        "         └─ decide #2 [plan decide] complete _ ms  loud enough",
    ]
    assert re.search(
        r"^lifetime \S+ COMPLETED in [\d.]+s — graph hello v1, 4 executions, 0 tokens, \$0\.0000$",
        text,
        re.M,
    )
    assert text.endswith('output: {\n  "greeting": "HELLO, ADA!"\n}\n')


def test_run_refuses_input_that_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _run(["run", str(HELLO), "--input", "{name: ada"])
    assert code == 1
    assert text == ""
    assert capsys.readouterr().err.startswith("tickmesh: --input is not JSON:")


# --- version ------------------------------------------------------------------------------


def test_version_prints_the_installed_version() -> None:
    done = subprocess.run(
        [str(TICKMESH), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"tickmesh {metadata.version('tickmesh')}\n"


# --- bench ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["bench"], "usage: tickmesh bench [-h]"),
        (["bench", "parked"], "usage: tickmesh bench parked [-h]"),
    ],
)
def test_bench_runs_the_checkouts_benchmark_with_its_options_from_any_directory(
    tmp_path: Path, argv: list[str], usage: str
) -> None:
    done = subprocess.run(
        [str(TICKMESH), *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage)


def test_bench_passes_the_benchmarks_exit_code_on(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(TICKMESH), "bench", "--no-such-option"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )

    assert done.returncode == 2
    assert "unrecognized arguments: --no-such-option" in done.stderr


CODING_AGENT = Path(__file__).resolve().parents[2] / "examples" / "coding_agent" / "graph.yaml"
TS_VALIDATE = (
    Path(__file__).resolve().parents[2] / "sdk/typescript/dist/examples/coding_agent/ts/validate.js"
)


async def test_run_serves_a_handler_with_a_typescript_executor() -> None:
    """`make demo-ts`: validate_code runs in a Node process, the rest in Python."""
    assert TS_VALIDATE.exists(), "build the TypeScript SDK first: npm run build (make test does)"
    code, text = await asyncio.to_thread(
        _run,
        [
            "run",
            str(CODING_AGENT),
            "--executor",
            f"validate_code=node {TS_VALIDATE}",
            "--input",
            '{"task": "adder", "modules": ["parser", "lexer"]}',
            "--timeout",
            "30",
        ],
    )
    assert code == 0, text
    validate_lines = [line for line in text.splitlines() if "[task validate_code]" in line]
    assert len(validate_lines) == 2, text
    assert all("(node " in line for line in validate_lines), validate_lines
    python_lines = [line for line in text.splitlines() if "[task llm_codegen]" in line]
    assert python_lines
    assert not any("(node " in line for line in python_lines)
    assert '"rounds": 2' in text


async def test_run_refuses_a_malformed_executor_option() -> None:
    code, _ = await asyncio.to_thread(
        _run, ["run", str(HELLO), "--executor", "no-equals-sign", "--timeout", "5"]
    )
    assert code == 1
