"""`tickmesh bench` finds the benchmark of the checkout it is installed from, or says why not."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tickmesh.cli import bench

REPO = Path(__file__).resolve().parents[3]


def test_a_checkout_install_finds_its_benchmark() -> None:
    assert bench.checkout() == REPO
    assert (REPO / "bench" / "__main__.py").is_file()


def test_an_install_outside_a_checkout_says_where_the_benchmark_runs(tmp_path: Path) -> None:
    package = tmp_path / "site-packages" / "tickmesh"
    package.mkdir(parents=True)
    err = io.StringIO()

    assert bench.checkout(package) is None
    assert bench.run(["--help"], err, package_dir=package) == 2
    assert "runs from a source checkout" in err.getvalue()
    assert "make install" in err.getvalue()


def test_a_services_folder_without_the_benchmark_is_not_a_checkout(tmp_path: Path) -> None:
    package = tmp_path / "services" / "tickmesh"
    package.mkdir(parents=True)

    assert bench.checkout(package) is None


def test_its_help_names_the_command_the_user_typed(capfd: pytest.CaptureFixture[str]) -> None:
    err = io.StringIO()
    assert bench.run(["--help"], err) == 0
    assert bench.run(["parked", "--help"], err) == 0
    out = capfd.readouterr().out
    assert "usage: tickmesh bench [-h]" in out
    assert "usage: tickmesh bench parked [-h]" in out
    assert "python -m bench" not in out
