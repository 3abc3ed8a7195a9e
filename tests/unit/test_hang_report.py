"""tests/support/hangs.py: a test that times out says what its event loop was waiting for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

HANGING = """
import asyncio
from collections.abc import AsyncIterator

import pytest


async def stop_that_never_returns(event: asyncio.Event) -> None:
    await event.wait()


@pytest.fixture
async def service() -> AsyncIterator[None]:
    yield
    await stop_that_never_returns(asyncio.Event())


@pytest.mark.timeout(1)
async def test_whose_teardown_hangs(service: None) -> None:
    '''Nothing to do here: its fixture's teardown is what hangs.'''
"""


def test_a_timed_out_teardown_names_the_await_it_hung_at(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_hanging=HANGING)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    )
    result = pytester.runpytest_subprocess("-p", "tests.support.hangs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*asyncio: what was waiting at the timeout*",
            "async generator service",
            "*test_hanging.py:14 in service",
            "*test_hanging.py:8 in stop_that_never_returns",
            "*asyncio/locks.py:* in wait",
        ]
    )
