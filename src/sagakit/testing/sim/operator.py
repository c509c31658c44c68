"""What an orchestrated simulator world offers the scheduler: customers who cancel and
a person who decides on the manual queue, through one of its orchestrator workers.

Shared by the checkout's orchestrated worlds (:mod:`sagakit.testing.sim.checkout`) and
any app's world (:mod:`sagakit.testing.sim.app_world`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from sagakit.core.instance import MANUAL_STATES, SagaState
from sagakit.core.machine import ManualAction
from sagakit.errors import ManualActionRefused
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.testing.sim.network import VirtualClock
from sagakit.testing.sim.world import OPERATOR, RETRY_THEN_CANCEL
from sagakit.transports.base import BatchHandler, Delivery, Settle


class OrchestratorControls:
    """The customer's cancel and the person's decisions of an orchestrated world: its
    ``orchestrator`` (the first of its ``workers``), ``pick`` (the seeded choice of a
    worker) and ``clock``."""

    orchestrator: Orchestrator
    workers: list[Orchestrator]
    pick: random.Random
    clock: VirtualClock

    async def running(self) -> list[str]:
        """The running sagas, by id."""
        running = await self.orchestrator.store.list_sagas(states=[SagaState.RUNNING], limit=1000)
        return sorted(s.saga_id for s in running)

    async def cancel(self, saga_id: str, reason: str) -> str:
        """Cancel through the orchestrator (it writes to the saga store)."""
        await self.orchestrator.cancel(saga_id, reason)
        return self.orchestrator.store.name

    async def manual(self) -> list[str]:
        """The sagas in the manual queue (:meth:`Orchestrator.manual_cases`), by id."""
        cases = await self.orchestrator.manual_cases(limit=1000)
        return sorted(s.saga_id for s in cases)

    async def manual_options(self, saga_id: str) -> list[tuple[str, int | None]]:
        """What the machine would accept for the saga now: each action tried on its pure
        transition function (nothing is written); and :data:`RETRY_THEN_CANCEL` when a
        retry sends the saga forward before its pivot, where a customer's cancel
        compensates the step whose retry is then on its way."""
        inst = await self.orchestrator.store.get_saga(saga_id)
        if inst is None or inst.state not in MANUAL_STATES:
            return []
        machine = self.orchestrator.machine_for(inst)
        rungs = len(machine.definition.steps[inst.cursor].ladder)
        options: list[tuple[str, int | None]] = []
        retry_then_cancel: tuple[str, int | None] | None = None
        now = self.clock()
        for action in ManualAction:
            for rung in range(rungs) if action is ManualAction.USE_RUNG else [None]:
                try:
                    decided = machine.on_manual(
                        inst, action, reason="?", actor="?", now=now, rung=rung
                    )
                except ManualActionRefused:
                    continue
                options.append((action.value, rung))
                if action is ManualAction.RETRY and decided.instance.state is SagaState.RUNNING:
                    cancel = machine.on_cancel(decided.instance, "?", now)
                    if cancel.changed and cancel.instance.state is SagaState.COMPENSATING:
                        retry_then_cancel = (RETRY_THEN_CANCEL, None)
        if retry_then_cancel is not None:
            options.append(retry_then_cancel)
        return options

    async def resolve(self, saga_id: str, action: str, rung: int | None, reason: str) -> str:
        """A person's decision, through one worker's :meth:`Orchestrator.resolve`."""
        worker = self.pick.choice(self.workers)
        await worker.resolve(saga_id, action, reason=reason, actor=OPERATOR, rung=rung)
        return worker.store.name


class AnyWorker:
    """The consumer of one orchestrator endpoint: each batch is handled by one of the
    workers, chosen by the world's seeded generator (as a broker hands each delivery
    to one of the processes consuming a queue)."""

    def __init__(
        self,
        workers: Sequence[Orchestrator],
        pick: random.Random,
        consumer: Any,
    ) -> None:
        self.consumers: list[BatchHandler] = [consumer(w) for w in workers]
        self.pick = pick

    async def __call__(self, deliveries: Sequence[Delivery]) -> Sequence[Settle]:
        return await self.pick.choice(self.consumers)(deliveries)
