"""sagakit's pytest plugin: fixtures for testing your own sagas (installed with sagakit,
registered under the ``pytest11`` entry point, so there is nothing to configure).

``saga_harness``
    A factory: ``saga_harness(definitions, **engine_options)`` makes a
    :class:`~sagakit.testing.kit.SagaHarness` whose SQLite files live in the test's
    ``tmp_path`` (kept by pytest for a failed test). Add your participants with
    ``h.add(...)`` on stores from ``h.store(name)``, then ``async with h:``.
``saga_app``
    A factory: ``saga_app(app, options=None, **engine_options)`` makes a harness that
    runs a whole :class:`~sagakit.app.App` (:meth:`SagaHarness.for_app
    <sagakit.testing.kit.SagaHarness.for_app>`: every service on its own SQLite file,
    the app's setup, its periodic jobs on the virtual clock, ``h.check()`` for its
    invariants), in the test's ``tmp_path``.
``saga_clock``
    The :class:`~sagakit.testing.kit.VirtualClock` the harnesses of the test share.

An ``async def`` test that uses one of them is run on a fresh event loop by the plugin
itself (unless another plugin -- pytest-asyncio, anyio -- claims it with its marker)::

    async def test_a_silent_hotel_is_compensated(saga_harness):
        h = saga_harness([trip])
        h.add(build_hotel(h.store("hotel")))
        async with h:
            saga = await h.start("trip", "trip-1", {"price": 420})
            await h.advance(120)
            done = await h.run_to_end(saga.saga_id)
            assert done.state is SagaState.COMPENSATED
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sagakit.app import App
from sagakit.core.definition import SagaDefinition
from sagakit.testing.kit import SagaHarness, VirtualClock

FIXTURES = frozenset({"saga_harness", "saga_app", "saga_clock"})
"""The plugin runs an ``async def`` test that uses one of these."""
OTHER_RUNNERS = frozenset({"asyncio", "anyio", "trio"})
"""Markers of other plugins that run ``async def`` tests: theirs, then."""


@pytest.fixture
def saga_clock() -> VirtualClock:
    """A virtual clock, shared by the test's harnesses."""
    return VirtualClock()


@pytest.fixture
def saga_harness(tmp_path: Path, saga_clock: VirtualClock) -> Callable[..., SagaHarness]:
    """``saga_harness(definitions, **engine_options)``: a harness in the test's tmp_path."""
    made = 0

    def make(definitions: Sequence[SagaDefinition], **options: Any) -> SagaHarness:
        nonlocal made
        made += 1
        options.setdefault("clock", saga_clock)
        return SagaHarness(definitions, directory=tmp_path / f"sagakit-{made}", **options)

    return make


@pytest.fixture
def saga_app(tmp_path: Path, saga_clock: VirtualClock) -> Callable[..., SagaHarness]:
    """``saga_app(app, options=None, **engine_options)``: a harness running ``app`` whole,
    in the test's tmp_path."""
    made = 0

    def make(
        app: App, options: Mapping[str, Any] | None = None, **engine_options: Any
    ) -> SagaHarness:
        nonlocal made
        made += 1
        engine_options.setdefault("clock", saga_clock)
        return SagaHarness.for_app(
            app, options=options, directory=tmp_path / f"sagakit-app-{made}", **engine_options
        )

    return make


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``async def`` test that uses the fixtures, unless another runner claims it."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    if not FIXTURES & set(pyfuncitem.fixturenames):
        return None
    if any(pyfuncitem.get_closest_marker(m) for m in OTHER_RUNNERS):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True
