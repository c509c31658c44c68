"""Wake-ups that carry what they are about: timer due times and finished sagas.

The timer loop skips its read when a commit's new timers are all due no sooner than
the one it already waits for, and :meth:`Engine.wait` gets the terminal instance from
this process's orchestrator instead of reading the saga after every transition. Both
must still see work they were not told about (other processes, earlier timers).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sagakit import Engine, SagaDefinition, SagaState, Step, StepContext, embedded
from sagakit.core.instance import Timer
from sagakit.runtime.wakeup import Wakeups
from sagakit.stores.sqlite import SQLiteStore


def two_steps() -> SagaDefinition:
    def act(ctx: StepContext) -> dict[str, Any]:
        return {"ok": ctx.business_key}

    return SagaDefinition("two", steps=[Step("a", act, timeout=30), Step("b", act)])


def test_wakeups_keep_the_earliest_due_until_taken() -> None:
    w = Wakeups()
    assert w.take_due("timers:x") is None  # no wake-up at all
    w.notify("timers:x", 5.0)
    w.notify("timers:x", 3.0)
    w.notify("timers:x", 9.0)
    assert w.take_due("timers:x") == 3.0
    assert w.take_due("timers:x") is None  # taken
    w.notify("timers:x", 3.0)
    w.notify("timers:x")  # one wake-up that names no time: the waiter must look
    w.notify("timers:x", 1.0)
    assert w.take_due("timers:x") is None
    w.notify("timers:x", 2.0)
    w.notify_all("timers:")  # e.g. a reconnect: anything may have been missed
    assert w.take_due("timers:x") is None


async def test_a_waiter_waiting_until_a_time_is_not_woken_for_later_work() -> None:
    w = Wakeups()
    waiting = asyncio.create_task(w.wait("timers:x", 5.0, until=10.0))
    await asyncio.sleep(0.01)
    w.notify("timers:x", 12.0)  # later than what it waits for: it looks by then anyway
    w.notify("timers:x", 10.0)
    await asyncio.sleep(0.05)
    assert not waiting.done()
    w.notify("timers:x", 9.5)  # sooner: woken
    assert await asyncio.wait_for(waiting, 1.0) is True
    assert w.take_due("timers:x") == 9.5
    # Once it waits no more, or for nothing in particular, every notification wakes.
    w.notify("timers:x", 50.0)
    assert await w.wait("timers:x", 0.5, until=10.0) is True
    waiting = asyncio.create_task(w.wait("timers:x", 5.0, until=10.0))
    await asyncio.sleep(0.01)
    w.notify("timers:x")  # names no time: the waiter must look
    assert await asyncio.wait_for(waiting, 1.0) is True


async def test_wait_returns_the_instance_as_committed(tmp_path: Path) -> None:
    async with embedded(tmp_path / "e.db", [two_steps()]) as engine:
        inst = await engine.start("two", "k1", {})
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.SUCCEEDED
        stored = await engine.get(inst.saga_id)
        assert done == stored
        assert not engine.orchestrator._watchers  # nothing left registered


async def test_wait_sees_a_saga_finished_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    # The waiter runs no workers: only another engine (process) moves the saga.
    waiter = Engine(SQLiteStore(path, name="orchestrator"), [two_steps()], roles=set())
    worker = embedded(path, [two_steps()])
    async with waiter:
        inst = await waiter.start("two", "k2", {})
        waiting = asyncio.create_task(waiter.wait(inst.saga_id, timeout=10))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        async with worker:
            done = await asyncio.wait_for(waiting, 5)
        assert done.state is SagaState.SUCCEEDED


async def test_an_earlier_timer_wakes_the_loop_a_later_one_does_not(tmp_path: Path) -> None:
    # A long idle poll: only wake-ups can make the loop look in time.
    async with embedded(tmp_path / "e.db", [two_steps()], idle_poll=5.0) as engine:
        store = engine.store
        reads = 0
        real = store.next_timer_due

        async def counted() -> float | None:
            nonlocal reads
            reads += 1
            return await real()

        store.next_timer_due = counted  # type: ignore[method-assign]
        channel = f"timers:{store.name}"

        async def set_timer(saga_id: str, due: float) -> None:
            async with store.transaction() as tx:
                await tx.timers_set([Timer(saga_id, "t", due, "f")])
            engine.wakeups.notify(channel, due)

        await set_timer("far", time.time() + 60)
        await asyncio.sleep(0.1)
        before = reads
        await set_timer("farther", time.time() + 120)  # later than the awaited one
        await asyncio.sleep(0.1)
        assert reads == before
        # An earlier one is read and fired on time (the saga is unknown: the timer is
        # taken and dropped), far sooner than the idle poll.
        await set_timer("soon", time.time() + 0.2)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            due = await real()
            if due is not None and due > time.time() + 30:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the earlier timer did not fire")
        assert reads > before
