"""What the scheduler's ticks fire: the orchestrator's saga timers, or periodic jobs.

An orchestrated world has timers in its saga store (step timeouts, retries, deadlines);
a choreographed one has none, only the periodic jobs an engine runs with
``Engine.every`` (the tracker's "is any saga stuck" check, the order service's
announcing again of unanswered orders). Both look the same to the
:class:`~sagakit.testing.sim.Scheduler`: a time when firing could change something, a
firing that may crash before its commit, and the stores whose outboxes a firing writes
to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sagakit.core.instance import SagaState
from sagakit.runtime.consumer import FaultHook
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.runtime.tracker import Tracker
from sagakit.testing.sim.network import VirtualClock

DUE_MARGIN = 1e-6
"""Virtual seconds a job is due after the moment it computed: ``last + period`` rounded
down would leave ``now - period`` a hair before ``last`` at that very instant, and the
job would find nothing to do, again and again."""


class Timers(Protocol):
    """The timers of a world, as ticks fire them."""

    @property
    def point(self) -> str:
        """The fault point (an endpoint name) a ``crash_before_commit`` on timers arms."""
        ...

    @property
    def stores(self) -> tuple[str, ...]:
        """The names of the stores a firing writes outbox rows to."""
        ...

    async def next_due(self) -> float | None:
        """When firing could next change something; None when nothing is waiting."""
        ...

    async def fire(self) -> int:
        """Fire what is due; how many fired. A crash raises
        :class:`~sagakit.testing.faults.InjectedCrash` and commits nothing."""
        ...


class OrchestratorTimers:
    """The orchestrator's saga timers (timeouts, retries, deadlines)."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self.point = f"{orchestrator.endpoint}.timers"
        self.stores = (orchestrator.store.name,)

    async def next_due(self) -> float | None:
        """The earliest timer in the saga store."""
        return await self.orchestrator.store.next_timer_due()

    async def fire(self) -> int:
        """:meth:`Orchestrator.fire_due_timers` (it crashes at the armed point itself)."""
        return await self.orchestrator.fire_due_timers()


@dataclass(frozen=True, slots=True)
class Job:
    """A periodic job, as the simulator runs it: exactly when it could change something
    (an engine runs it every few seconds; the ticks in between would find nothing)."""

    name: str
    store: str
    """The store whose outbox the job writes to."""
    next_due: Callable[[], Awaitable[float | None]]
    """When running the job could next change something (None: nothing waits)."""
    run: Callable[[], Awaitable[int]]
    """Run the job once; how many things it did."""


class JobTimers:
    """The timers of a world without saga timers: its periodic jobs."""

    def __init__(
        self, point: str, jobs: Sequence[Job], hook: FaultHook, clock: VirtualClock
    ) -> None:
        self.point = point
        self.jobs = list(jobs)
        self.stores = tuple(dict.fromkeys(j.store for j in jobs))
        self.hook = hook
        self.clock = clock

    async def _due(self, job: Job) -> float | None:
        due = await job.next_due()
        return None if due is None else due + DUE_MARGIN

    async def next_due(self) -> float | None:
        """The earliest time a job could do something."""
        times = [t for j in self.jobs if (t := await self._due(j)) is not None]
        return min(times, default=None)

    async def fire(self) -> int:
        """Run every job that is due; a crash is injected before the first one commits."""
        self.hook.point("before_commit", self.point)
        done = 0
        for job in self.jobs:
            due = await self._due(job)
            if due is not None and due <= self.clock.now:
                done += await job.run()
        return done


def tracker_sla(tracker: Tracker) -> Job:
    """The tracker's SLA check, due when the running view with the oldest progress has
    had none for ``sla`` seconds (the embedded engine runs :meth:`Tracker.check_stuck`
    every few seconds)."""
    flow = tracker.flow

    async def next_due() -> float | None:
        running = await tracker.store.list_sagas(
            states=[SagaState.RUNNING, SagaState.COMPENSATING],
            definition=flow.definition,
            limit=10_000,
        )
        if not running:
            return None
        return min(s.updated_at for s in running) + flow.sla

    return Job(f"{tracker.name}-sla", tracker.store.name, next_due, tracker.check_stuck)
