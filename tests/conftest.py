"""Shared test plumbing: run ``async def`` tests on a fresh event loop each."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import pytest

# The fault catalogue: checks every @pytest.mark.fault id, and writes the report of
# SAGAKIT_FAULT_REPORT (tests/fault_report.py).
pytest_plugins = ["fault_report"]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {n: pyfuncitem.funcargs[n] for n in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


@pytest.fixture
def sagakit_logger() -> Iterator[logging.Logger]:
    """The ``sagakit`` logger, put back as it was afterwards: the handlers a test's
    ``_configure_logging`` adds closed and removed, its level and propagation restored
    (an INFO level left behind would let later tests' records through)."""
    root = logging.getLogger("sagakit")
    before, level, propagate = list(root.handlers), root.level, root.propagate
    try:
        yield root
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
        root.propagate = propagate
