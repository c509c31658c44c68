"""A kit for testing your own sagas: a real engine on a temporary SQLite file, driven by
a virtual clock.

Everything runs as in production -- the engine's loops, the outbox and inbox, your
participants' SQL on SQLite -- except time: the engine, its timers, leases and retry
delays read :class:`VirtualClock`, which moves only when the test says so.
:meth:`SagaHarness.advance` moves it and fires what became due at once, so a saga with
a two-minute timeout is tested in milliseconds::

    h = SagaHarness([trip])
    h.add(build_hotel(h.store("hotel")))         # your participant, on its own SQLite file
    async with h:
        saga = await h.start("trip", "trip-1", {"price": 420})
        await h.advance(120)                      # the hotel never answered
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED
        assert "step.timed_out" in await h.events(saga.saga_id)

A whole app (:class:`~sagakit.app.App`: its definitions, every service with its
migrations, its setup and periodic jobs) runs the same way with
:meth:`SagaHarness.for_app`; its jobs run on the virtual clock too, and
:meth:`SagaHarness.check` runs the app's own invariants::

    async with SagaHarness.for_app(app) as h:
        saga = await h.start("transfer", "t-1", {"wallet": "w-1", "amount": 500})
        await h.run_to_end(saga.saga_id)
        assert await h.check() == []

The pytest plugin (:mod:`sagakit.testing.pytest_plugin`, installed with sagakit) offers
the same as fixtures.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from sagakit.app import App
from sagakit.clock import using
from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState
from sagakit.deployment import Deployment
from sagakit.runtime.engine import Engine, embedded
from sagakit.runtime.participant import Participant
from sagakit.stores.sqlite import SQLiteStore
from sagakit.testing.jobs import VirtualJob, app_jobs

START = 1_767_225_600.0
"""Where a virtual clock starts (2026-01-01T00:00:00Z): fixed, so runs repeat."""


class VirtualClock:
    """A clock that moves only when told; call it for the time (a ``time.time`` stand-in)."""

    def __init__(self, start: float = START) -> None:
        self._now = float(start)

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock ``seconds`` forward (never back); return the new time."""
        if not seconds >= 0:  # also refuses NaN
            raise ValueError(f"a clock only moves forward, not by {seconds!r} seconds")
        self._now += seconds
        return self._now


class SagaHarness:
    """An engine on a temporary SQLite file with a :class:`VirtualClock`.

    ``definitions`` and ``participants`` are yours, as you give them to
    :func:`~sagakit.embedded`; ``engine_options`` go to it too (``retry``,
    ``faults``, ...). Use it as ``async with``: the engine and its temporary directory
    live for the block. ``settle_for`` is how long, in real seconds, nothing may move
    before the harness calls the system quiet.
    """

    def __init__(
        self,
        definitions: Sequence[SagaDefinition],
        *,
        participants: Sequence[Participant] = (),
        clock: VirtualClock | None = None,
        directory: str | Path | None = None,
        settle_for: float = 0.03,
        **engine_options: Any,
    ) -> None:
        self.clock = clock or VirtualClock()
        self._definitions = list(definitions)
        self._participants = list(participants)
        self._options = dict(engine_options)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sagakit-test-")
            directory = self._tmp.name
        self.directory = Path(directory)
        """Where the engine's and the participants' SQLite files are."""
        self._engine: Engine | None = None
        self.settle_for = settle_for
        self.deployment: Deployment | None = None
        """The app's deployment on :attr:`directory` (:meth:`for_app` only)."""
        self._jobs: list[VirtualJob] = []

    @classmethod
    def for_app(
        cls,
        app: App,
        *,
        options: Mapping[str, Any] | None = None,
        clock: VirtualClock | None = None,
        directory: str | Path | None = None,
        settle_for: float = 0.03,
        **engine_options: Any,
    ) -> SagaHarness:
        """A harness running all of ``app``: its definitions, every service on its own
        SQLite file in :attr:`directory` (migrated before anything runs), its ``setup``
        once the engine is open, and its services' periodic jobs on the virtual clock
        (at the time their ``due`` function gives, else every ``seconds``).
        ``options``: the app's options (see :class:`~sagakit.app.AppOption`)."""
        h = cls([], clock=clock, directory=directory, settle_for=settle_for, **engine_options)
        h.deployment = Deployment(
            app,
            f"sqlite:///{h.directory}?synchronous=NORMAL",
            options=options,
            data_dir=h.directory,
        )
        return h

    def store(self, name: str) -> SQLiteStore:
        """A SQLite store for a participant of yours, in :attr:`directory` (not opened:
        the engine opens it with the participant)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return SQLiteStore(self.directory / f"{name}.db", name=name, synchronous="NORMAL")

    def add(self, participant: Participant) -> Participant:
        """Run ``participant`` with the engine (before the ``async with`` block)."""
        if self._engine is not None:
            raise RuntimeError("add participants before the harness starts")
        self._participants.append(participant)
        return participant

    @property
    def engine(self) -> Engine:
        """The running engine (inside the ``async with`` block only)."""
        if self._engine is None:
            raise RuntimeError("the harness is not running: use it as `async with`")
        return self._engine

    async def __aenter__(self) -> SagaHarness:
        base = self.directory
        base.mkdir(parents=True, exist_ok=True)
        dep = self.deployment
        if dep is not None:
            if self._participants:
                raise RuntimeError("a harness for an app runs the app's services only")
            engine = dep.everything(jobs=False, clock=self.clock, **self._options)
        else:
            self._options.setdefault("synchronous", "NORMAL")  # no need to survive power loss
            engine = embedded(
                base / "saga.db",
                self._definitions,
                participants=self._participants,
                clock=self.clock,
                **self._options,
            )
        await engine.__aenter__()
        self._engine = engine
        if dep is not None:
            try:
                if dep.app.setup is not None:
                    with using(self.clock):
                        await dep.app.setup(dep)
                stores = {name: dep.store(name) for name in dep.app.services}
                self._jobs = app_jobs(dep.app, stores, self.clock)
            except BaseException:
                self._engine = None
                await engine.__aexit__(None, None, None)
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        engine, self._engine = self._engine, None
        try:
            if engine is not None:
                await engine.__aexit__(exc_type, exc, tb)
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    async def start(
        self, definition: str, business_key: str, data: dict[str, Any] | None = None
    ) -> SagaInstance:
        """Start a saga (as :meth:`Engine.start`) and let it run as far as it can now."""
        saga = await self.engine.start(definition, business_key, data or {})
        await self.settle()
        return saga

    async def settle(self, limit: float = 10.0) -> None:
        """Wait (in real time, at most ``limit`` seconds) until nothing is left to do at
        the current virtual time: every due timer fired, no outbox row or mailbox
        message that can be taken now, and nothing changing for ``settle_for`` seconds.
        Rows and messages that wait for the clock (a retry's delay, the lease of a
        consumer or relay that failed midway) wait for :meth:`advance`."""
        engine = self.engine
        end = time.monotonic() + limit
        calm_since: float | None = None
        last: tuple[float, ...] | None = None
        while True:
            now = self.clock()
            busy = float(await engine.orchestrator.fire_due_timers())
            busy += await self._run_due_jobs(now)
            seen: list[float] = []
            for store in engine.stores:
                ready, *shape = await _work(store, now)
                busy += ready
                seen += shape
            if busy or tuple(seen) != last:
                calm_since = None
                last = tuple(seen)
                engine.wakeups.notify_all("")  # what became due: look now, not at the poll
            elif calm_since is None:
                calm_since = time.monotonic()
            elif time.monotonic() - calm_since >= self.settle_for:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"the saga engine was still busy after {limit}s of real time")
            await asyncio.sleep(0.002)

    async def next_due(self) -> float | None:
        """The earliest virtual time at which something waits to happen: a timer, a
        redelivery, or the end of a lease; None when nothing waits."""
        engine = self.engine
        now = self.clock()
        found = [await engine.store.next_timer_due(), await self._next_job()]
        for store in engine.stores:
            found.append(await _next_after(store, now))
        due = [d for d in found if d is not None]
        return min(due) if due else None

    async def advance(self, seconds: float) -> None:
        """Move the virtual clock ``seconds`` forward, stopping at each timer that falls
        due on the way, in order, and settle at each stop. (Redeliveries and leases that
        end on the way are taken at the next stop: stopping at each of a failing
        consumer's backoffs would cost real time and show nothing more.)"""
        if not seconds >= 0:
            raise ValueError(f"a clock only moves forward, not by {seconds!r} seconds")
        target = self.clock() + seconds
        await self.settle()
        while True:
            due = await self._next_timer_or_job()
            if due is None or due > target:
                break
            self.clock.advance(max(0.0, due - self.clock()))
            await self.settle()
        self.clock.advance(max(0.0, target - self.clock()))
        await self.settle()

    async def run_to_end(
        self, saga_id: str, *, within: float = 86_400.0, resolution: float = 1.0
    ) -> SagaInstance:
        """Advance the virtual clock from one due thing to the next until the saga is
        terminal (at most ``within`` virtual seconds); return it. ``AssertionError``
        when it is not and nothing more is due (it waits for a person or a signal).

        Timers fire at their own time; redeliveries and leases that end less than
        ``resolution`` seconds apart are taken together (a failing consumer's backoffs
        would otherwise cost a stop each).
        """
        deadline = self.clock() + within
        await self.settle()
        while True:
            saga = await self.engine.get(saga_id)
            if saga.terminal:
                return saga
            due = await self.next_due()
            if due is None or due > deadline:
                raise AssertionError(
                    f"saga {saga_id} is {saga.state.value} and nothing is due within "
                    f"{within:.0f} virtual seconds (waiting for a person or a signal?)"
                )
            timer = await self._next_timer_or_job()
            step = max(due, self.clock() + resolution)
            if timer is not None:
                step = min(step, timer)
            self.clock.advance(max(0.0, step - self.clock()))
            await self.settle()

    async def check(self) -> list[str]:
        """The app's own invariants (``App(invariants=..., watch=...)``) now: one message
        per broken one, none when all hold (:meth:`for_app` only)."""
        dep = self.deployment
        if dep is None:
            raise RuntimeError("check() runs an app's invariants: use SagaHarness.for_app")
        found: list[str] = []
        if dep.app.invariants is not None:
            found += await dep.app.invariants(dep)
        if dep.app.watch is not None:
            found += await dep.app.watch(dep)
        return found

    async def _run_due_jobs(self, now: float) -> int:
        """Run every job due at ``now`` (see :mod:`sagakit.testing.jobs`); how many ran."""
        ran = 0
        for job in self._jobs:
            due = await job.due()
            if due is not None and due <= now:
                await job.run()
                ran += 1
        return ran

    async def _next_job(self) -> float | None:
        now = self.clock()
        times = [max(due, now) for job in self._jobs if (due := await job.due()) is not None]
        return min(times) if times else None

    async def _next_timer_or_job(self) -> float | None:
        found = [await self.engine.store.next_timer_due(), await self._next_job()]
        due = [d for d in found if d is not None]
        return min(due) if due else None

    async def saga(self, saga_id: str) -> SagaInstance:
        """The saga as stored now."""
        return await self.engine.get(saga_id)

    async def history(self, saga_id: str) -> list[HistoryEntry]:
        """The saga's history, oldest first."""
        return await self.engine.store.history(saga_id)

    async def events(self, saga_id: str) -> list[str]:
        """The names of the saga's history events, oldest first (``step.timed_out``, ...)."""
        return [h.event for h in await self.history(saga_id)]

    async def assert_state(self, saga_id: str, state: SagaState) -> SagaInstance:
        """The saga, after checking it is in ``state`` (the message shows its history)."""
        saga = await self.engine.get(saga_id)
        if saga.state is not state:
            events = ", ".join(await self.events(saga_id))
            raise AssertionError(
                f"saga {saga_id} is {saga.state.value}, expected {state.value}; history: {events}"
            )
        return saga


async def _work(store: Any, now: float) -> tuple[float, ...]:
    """(outbox rows and mailbox messages that can be taken now, then numbers that change
    whenever a row or a message is taken or settled) of one store."""
    if not isinstance(store, SQLiteStore):  # no SQL to look closer: counts only
        pending, depth = await store.outbox_pending(), await store.queue_depth()
        return (pending, depth)
    rows = await store._read(
        "look at the outbox and the mailboxes",
        "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL"
        "        AND (claimed_until IS NULL OR claimed_until <= ?)),"
        " (SELECT count(*) FROM queue WHERE available_at <= ?),"
        " (SELECT count(*) FROM outbox WHERE published_at IS NULL),"
        " (SELECT coalesce(sum(claimed_until), 0) FROM outbox WHERE published_at IS NULL),"
        " (SELECT count(*) FROM queue),"
        " (SELECT coalesce(sum(available_at), 0) FROM queue)",
        (now, now),
    )
    outbox_ready, queue_ready, *shape = rows[0]
    return (int(outbox_ready) + int(queue_ready), *(float(x) for x in shape))


async def _next_after(store: Any, now: float) -> float | None:
    """When the next outbox row or mailbox message of ``store`` waiting for the clock
    can be taken (a claim or lease ending, a redelivery due)."""
    if not isinstance(store, SQLiteStore):
        return None
    rows = await store._read(
        "look for what waits for the clock",
        "SELECT min(t) FROM ("
        " SELECT claimed_until AS t FROM outbox WHERE published_at IS NULL AND claimed_until > ?"
        " UNION ALL SELECT available_at FROM queue WHERE available_at > ?)",
        (now, now),
    )
    due = rows[0][0]
    return None if due is None else float(due)
