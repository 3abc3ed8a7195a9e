"""`tickmesh tenant` given bad arguments: exit code 2 and a message naming the option,
never a traceback, and nothing written."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tickmesh.cli.main import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("create", "acme", "--max-memory", "bogus"), "--max-memory: invalid size 'bogus'"),
        (("create", "acme", "--max-storage", "-5"), "--max-storage: invalid size '-5'"),
        (("limits", "acme", "--max-storage", "10 parsecs"), "--max-storage: invalid size"),
        (("create", "acme", "--replicas", "0"), "--replicas: expected 1 to 5, got 0"),
        (("create", "acme", "--replicas", "6"), "--replicas: expected 1 to 5, got 6"),
        (("list", "--connect-timeout", "-1"), "--connect-timeout: expected a positive"),
        (("list", "--connect-timeout", "0"), "--connect-timeout: expected a positive"),
        (("list", "--connect-timeout", "nan"), "--connect-timeout: expected a positive"),
    ],
)
def test_a_bad_option_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["tenant", *argv, "--dir", str(tmp_path / "tenants")], out=io.StringIO())
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "tenants").exists()
