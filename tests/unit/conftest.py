"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from xlat import compiled, eventloop


@pytest.fixture(params=["asyncio", "uvloop"])
def run_loop(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine to completion on each event loop the daemon may use
    (xlat/eventloop.py), so the asyncio edges are tested on both. uvloop is a
    dependency: missing, it fails the test rather than skipping it."""
    choice = str(request.param)
    assert eventloop.resolve(choice)[0] == choice
    return lambda main: eventloop.run(main, choice)


def pytest_report_header() -> str:
    """Which cores this run tests: compiled (mypyc) or the pure Python fallback."""
    return f"xlat: {compiled.describe()}"
