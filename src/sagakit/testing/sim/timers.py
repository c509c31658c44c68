"""What the scheduler's ticks fire: the orchestrator's saga timers, or periodic jobs.

An orchestrated world has timers in its saga store (step timeouts, retries, deadlines);
a choreographed one has none, only the periodic jobs an engine runs with
``Engine.every`` (the tracker's "is any saga stuck" check, the order service's
announcing again of unanswered orders). Both look the same to the
:class:`~sagakit.testing.sim.Scheduler`: a time when firing could change something, a
firing that may crash before its commit, and the stores whose outboxes a firing writes
to.

An orchestrated world may run several orchestrator workers on its saga store, as
several ``sagakit worker`` processes would: each firing is done by one of them (chosen
by the world's seeded generator), and every timer that fired is remembered so that the
``stale_timer`` fault can apply it again, with its old fence, as a second worker that
read the timer row before the first one deleted it would. The ``late_timer`` fault
applies a timer the saga replaced or cancelled before it fired (a reply came first), as
a worker that took it just before and applied it late would.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sagakit.core.instance import SagaState, Timer
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

    async def due_after_end(self) -> float | None:
        """When firing could still change something once every saga ended (a job that
        says what waits for it, e.g. a sweeper's next expiry); None when nothing does."""
        ...

    async def fire(self) -> int:
        """Fire what is due; how many fired. A crash raises
        :class:`~sagakit.testing.faults.InjectedCrash` and commits nothing."""
        ...

    @property
    def fenced(self) -> bool:
        """True when the timers carry fences (a stale or late one must be found stale):
        the ``stale_timer`` and ``late_timer`` faults apply."""
        ...

    async def fired(self) -> list[tuple[str, ...]]:
        """The timers that fired so far, as ``stale_timer`` targets: the ones whose
        saga still waits at the timer's step last (there only the finer checks of the
        fence stand between a stale firing and a transition), else oldest first. None
        for timers without fences, such as periodic jobs."""
        ...

    async def fire_again(self, target: Sequence[str]) -> bool:
        """Apply a timer of :meth:`fired` again; False if it never fired in this run."""
        ...

    async def superseded(self) -> list[tuple[str, ...]]:
        """Timers of the step each running saga is at that it replaced or cancelled
        before they fired, newest last, as ``late_timer`` targets (none without fences)."""
        ...

    async def fire_late(self, target: Sequence[str]) -> bool:
        """Apply a timer that never fired, late; False if its saga does not exist."""
        ...


class _Peeked(Exception):
    """Rolls back the transaction that read which timers are due."""


class OrchestratorTimers:
    """The orchestrator's saga timers (timeouts, retries, deadlines), fired by one of
    the workers (orchestrators on the one saga store) at a time."""

    def __init__(
        self, workers: Orchestrator | Sequence[Orchestrator], rng: random.Random | None = None
    ) -> None:
        self.workers = [workers] if isinstance(workers, Orchestrator) else list(workers)
        self.orchestrator = self.workers[0]
        self.rng = rng or random.Random(0)
        self.point = f"{self.orchestrator.endpoint}.timers"
        self.stores = (self.orchestrator.store.name,)
        self._fired: dict[tuple[str, ...], Timer] = {}
        self.fenced = True

    async def fired(self) -> list[tuple[str, ...]]:
        """``(saga id, timer name, fence)`` of every timer that fired, oldest first,
        except that those whose saga still runs at the fenced step come last, and last
        of all those whose fence names the try of that step the saga is on now."""
        keys = list(self._fired)
        if not keys:
            return keys
        sagas = await self.orchestrator.store.list_sagas(
            states=[SagaState.RUNNING, SagaState.COMPENSATING], limit=10_000
        )
        running = {s.saga_id: s for s in sagas}

        def closeness(key: tuple[str, ...]) -> int:
            inst = running.get(key[0])
            parts = key[2].split(":")
            if inst is None or len(parts) not in (5, 6) or parts[1] != str(inst.cursor):
                return 0
            st = inst.steps[inst.cursor]
            now = {"action": st.attempt, "comp": st.rung_attempt, "query": st.queries}
            return 2 if str(now.get(parts[2])) == parts[4] else 1

        return sorted(keys, key=closeness)  # stable: oldest first within each class

    def _worker(self) -> Orchestrator:
        return self.workers[0] if len(self.workers) == 1 else self.rng.choice(self.workers)

    async def next_due(self) -> float | None:
        """The earliest timer in the saga store."""
        return await self.orchestrator.store.next_timer_due()

    async def due_after_end(self) -> float | None:
        """None: the timers of sagas that ended change nothing."""
        return None

    async def fire(self) -> int:
        """:meth:`Orchestrator.fire_due_timers` of one worker (it crashes at the armed
        point itself); what it fired is remembered for :meth:`fire_again`."""
        worker = self._worker()
        due = await self._due(worker)
        fired = await worker.fire_due_timers()
        for timer in due[:fired]:
            key = (timer.saga_id, timer.name, timer.fence)
            self._fired.pop(key, None)  # set again since: the newest firing counts
            self._fired[key] = timer
        return fired

    async def _due(self, worker: Orchestrator) -> list[Timer]:
        """The timers the firing will take, read as another worker could read them."""
        taken: list[Timer] = []
        try:
            async with worker.store.transaction() as tx:
                taken = await tx.timers_take_due(worker.clock(), 512)
                raise _Peeked
        except _Peeked:
            pass
        return taken

    async def fire_again(self, target: Sequence[str]) -> bool:
        """Apply a timer that already fired, with its old fence, through the path
        :meth:`Orchestrator.fire_due_timers` applies each timer by (the machine's fence
        checks must find it stale, or act on it as the first firing would)."""
        timer = self._fired.get(tuple(target))
        if timer is None:
            return False
        return await self._apply(timer)

    async def superseded(self) -> list[tuple[str, ...]]:
        """The step timers each running saga set for its current step and then replaced
        or cancelled, read from its history (each try's timeout, each retry's wait, by
        the fences :meth:`Machine <sagakit.core.machine.Machine>` gives them); the one
        still set is left out (firing it early is the ``timeout`` fault)."""
        store = self.orchestrator.store
        sagas = await store.list_sagas(
            states=[SagaState.RUNNING, SagaState.COMPENSATING], limit=10_000
        )
        out: list[tuple[str, ...]] = []
        for inst in sorted(sagas, key=lambda s: s.saga_id):
            machine = self.orchestrator.machine_for(inst)
            step = machine.step_names[inst.cursor]
            fences: list[str] = []
            rung = 0
            for e in await store.history(inst.saga_id):
                if e.step != step:
                    continue
                d, i = e.detail, inst.cursor
                if e.event == "step.started":
                    fences.append(f"timeout:{i}:action:0:{d.get('attempt')}")
                elif e.event == "compensation.sent":
                    rung = int(d.get("rung", 0))
                    fences.append(f"timeout:{i}:comp:{rung}:{d.get('attempt')}")
                elif e.event == "status.queried":
                    fences.append(f"timeout:{i}:query:0:{d.get('query')}")
                elif e.event == "retry.scheduled":
                    phase = d.get("phase")
                    r = rung if phase == "comp" else 0
                    fences.append(f"retry:{i}:{phase}:{r}:{d.get('attempt')}")
            out += [(inst.saga_id, "step", f) for f in dict.fromkeys(fences[:-1])]
        return out

    async def fire_late(self, target: Sequence[str]) -> bool:
        """Apply the step timer ``target`` (saga id, name, fence) names, now."""
        if len(target) != 3:
            return False
        saga_id, name, fence = target
        if await self.orchestrator.store.get_saga(saga_id) is None:
            return False
        return await self._apply(Timer(saga_id, name, self.orchestrator.clock(), fence))

    async def _apply(self, timer: Timer) -> bool:
        worker = self._worker()
        now = worker.clock()
        async with worker.transaction() as tx:
            loaded = await tx.saga_get_many([timer.saga_id])
            # Private, but this module belongs to the engine: the orchestrator offers no
            # way to apply a timer it did not take from the store.
            await worker._apply_timer(tx, timer, now, loaded)
        worker.after_commit()
        return True


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
        self.fenced = False

    async def _due(self, job: Job) -> float | None:
        due = await job.next_due()
        return None if due is None else due + DUE_MARGIN

    async def next_due(self) -> float | None:
        """The earliest time a job could do something."""
        times = [t for j in self.jobs if (t := await self._due(j)) is not None]
        return min(times, default=None)

    async def due_after_end(self) -> float | None:
        """None: these jobs serve running sagas (the tracker's SLA check, announcing
        unanswered orders again)."""
        return None

    async def fired(self) -> list[tuple[str, ...]]:
        """None: a periodic job has no fence, firing it again is just running it."""
        return []

    async def fire_again(self, target: Sequence[str]) -> bool:
        """Never (see :meth:`fired`)."""
        return False

    async def superseded(self) -> list[tuple[str, ...]]:
        """None (see :meth:`fired`)."""
        return []

    async def fire_late(self, target: Sequence[str]) -> bool:
        """Never (see :meth:`fired`)."""
        return False

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
