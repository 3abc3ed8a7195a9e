"""The CLI given files that are not there or ports that cannot be: a clear message and
an exit code, never a traceback, and never another port than the one asked for."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from tickmesh.cli.main import build_parser, main

HELLO = Path(__file__).resolve().parents[3] / "examples" / "hello" / "graph.yaml"


@pytest.mark.parametrize("option", ["--router-port", "--pool-port"])
@pytest.mark.parametrize("command", ["dev", "run"])
@pytest.mark.parametrize("port", ["65536", "99999", "-1"])
def test_a_port_out_of_range_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], command: str, option: str, port: str
) -> None:
    argv = [command, *(["graph.yaml"] if command == "run" else []), f"{option}={port}"]
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert f"{option}: expected a port from 0 to 65535" in capsys.readouterr().err


def test_graph_validate_reports_a_missing_file_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    missing, folder = tmp_path / "missing.yaml", tmp_path / "folder"
    folder.mkdir()
    assert main(["graph", "validate", str(missing), str(folder), str(HELLO)], out=out) == 1
    text = out.getvalue()
    assert f"{missing}: cannot read the file: No such file or directory" in text
    assert f"{folder}: cannot read the file: Is a directory" in text
    assert f"{HELLO}: ok" in text
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "cannot import handlers from {dir}/handlers.py"),
        (("--handlers", "{dir}/gone.py"), "cannot import handlers from {dir}/gone.py"),
        (("--handlers", "no_such_module_here"), "cannot import handlers from no_such_module_here"),
    ],
)
def test_run_reports_handlers_it_cannot_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    graph = tmp_path / "graph.yaml"
    shutil.copy(HELLO, graph)
    argv = ["run", str(graph), *(e.format(dir=tmp_path) for e in extra)]
    assert main(argv, out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert message.format(dir=tmp_path) in err
    assert "Traceback" not in err


def test_run_reports_a_missing_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")], out=io.StringIO()) == 1
    assert f"{tmp_path / 'nope.yaml'}: cannot read the file" in capsys.readouterr().err
