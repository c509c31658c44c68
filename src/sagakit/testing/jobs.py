"""A service's periodic jobs on a virtual clock: how the testing kit and the simulator
run them (the engine runs them every ``seconds`` of real time instead).

A job runs when it is due: at the time its ``due`` function gives
(``Service.every(..., due=...)``), else ``seconds`` after its last run. A job whose
``due`` still lies at or before its last run has nothing it can do now: it waits its
interval, so it never runs twice at one virtual instant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sagakit.clock import using

if TYPE_CHECKING:
    from sagakit.app import App
    from sagakit.service import Job, JobDue
    from sagakit.stores.base import SQLStore


@dataclass(slots=True)
class VirtualJob:
    """One periodic job of a service, on ``clock`` (see the module docstring)."""

    name: str
    seconds: float
    fn: Job
    due_fn: JobDue | None
    store: SQLStore
    clock: Callable[[], float]
    last: float
    """When it last ran (at first: when the clock started it)."""
    ran_at: float | None = None

    async def due(self) -> float | None:
        """When it next runs; None when its ``due`` says nothing waits."""
        if self.due_fn is None:
            return self.last + self.seconds
        with using(self.clock):
            due = await self.due_fn(self.store)
        if due is None:
            return None
        if self.ran_at is not None and due <= self.ran_at:
            return self.ran_at + self.seconds
        return float(due)

    async def run(self) -> None:
        """Run it now, with :func:`sagakit.now` reading the virtual clock."""
        self.ran_at = self.last = self.clock()
        with using(self.clock):
            await self.fn(self.store)


def app_jobs(
    app: App, stores: Mapping[str, SQLStore], clock: Callable[[], float]
) -> list[VirtualJob]:
    """Every periodic job of ``app``'s services, each on its service's store."""
    now = clock()
    return [
        VirtualJob(f"{s.name}:{name}", seconds, fn, s.job_due.get(name), stores[s.name], clock, now)
        for s in app.services.values()
        for seconds, name, fn in s.jobs
    ]
