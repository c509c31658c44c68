"""The loops an open :class:`~sagakit.runtime.engine.Engine` runs in the background.

Each runs while ``engine.running``, is started by :meth:`Engine.open` for the roles
that need it, and survives its own failures (logged, tried again): relays, timers,
PostgreSQL notifications turned into wake-ups, inputs set aside for this process's
definition versions, periodic jobs and housekeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sagakit.clock import using
from sagakit.runtime.relay import Relay

if TYPE_CHECKING:
    from sagakit.runtime.engine import Engine

log = logging.getLogger("sagakit.runtime.engine")  # the records keep the engine's logger


async def relay_loop(engine: Engine, relay: Relay) -> None:
    """Publish ``relay``'s store's outbox, woken by commits, else every idle poll."""
    channel = f"outbox:{relay.store.name}"
    while engine.running:
        try:
            n = await relay.relay_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("relay of %s failed; retrying", relay.store.name)
            n = 0
            await asyncio.sleep(0.05)
        if n == 0:
            await engine.wakeups.wait(channel, min(engine.idle_poll, relay.lease))


async def timer_loop(engine: Engine) -> None:
    """Fire the orchestrator store's due timers, sleeping until the earliest one."""
    channel = f"timers:{engine.store.name}"
    look = True
    due: float | None = None
    while engine.running:
        if look:
            try:
                # Read first (no write lock): most wake-ups find nothing due yet.
                due = await engine.store.next_timer_due()
                if due is not None and due <= engine.clock():
                    await engine.orchestrator.fire_due_timers(engine.batch_size)
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer loop failed; retrying")
                await asyncio.sleep(0.05)
                continue
        timeout = engine.idle_poll if due is None else min(engine.idle_poll, due - engine.clock())
        woken = await engine.wakeups.wait(channel, max(timeout, 0.001), until=due)
        hinted = engine.wakeups.take_due(channel)
        # Woken only by commits that named their earliest new timer, none sooner than
        # the one already waited for (most step timeouts): keep waiting, without a
        # read. A cancelled timer only makes the loop look once for nothing; a timer
        # set without any wake-up is found at the next idle poll, as before.
        if woken and hinted is not None and (due is None or hinted >= due):
            due = hinted if due is None else due
            look = False
        else:
            look = True


async def listen_loop(engine: Engine, store: Any) -> None:
    """Turn a store's commit notifications (PostgreSQL NOTIFY) into wake-ups.

    Work committed by other processes then wakes this one at once; the loops' idle
    poll stays only as a safety net.
    """
    local = {
        store.outbox_channel: f"outbox:{store.name}",
        store.timers_channel: f"timers:{store.name}",
    }
    channels = [store.outbox_channel, store.timers_channel, store.queue_channel]
    aside: str = store.aside_channel
    if store is engine.store and engine.resumes_set_aside:  # inputs set aside for its versions
        local[aside] = f"aside:{engine.store.name}"
        channels.append(aside)
    async with contextlib.aclosing(store.listen(*channels)) as notes:
        async for channel, payload in notes:
            if channel == store.queue_channel:
                if payload:
                    engine.wakeups.notify(f"queue:{payload}")
                else:  # (re)connected: anything sent meanwhile was lost, look everywhere
                    engine.wakeups.notify_all("queue:")
            elif channel == store.timers_channel:
                engine.wakeups.notify(local[channel], _due_of(payload))
                engine.wakeups.notify(f"sagas:{store.name}")
            elif channel in local:
                engine.wakeups.notify(local[channel])


async def set_aside_loop(engine: Engine) -> None:
    """Apply inputs set aside for this engine's definition versions: at once, when a
    commit somewhere set one aside (notified), and every ``set_aside_poll`` seconds."""
    channel = f"aside:{engine.store.name}"
    failing = False
    while engine.running:
        try:
            claimed = await engine.orchestrator.aside.resume(engine.batch_size)
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception:
            # Once per outage, not once per poll.
            if not failing:
                log.exception("resuming inputs set aside failed; retrying")
            failing, claimed = True, 0
        if claimed < engine.batch_size:
            await engine.wakeups.wait(channel, engine.set_aside_poll)


async def periodic_loop(
    engine: Engine, name: str, seconds: float, job: Callable[[], Awaitable[object]]
) -> None:
    """Run ``job`` every ``seconds`` (:meth:`Engine.every`); a failure waits for the next."""
    while engine.running:
        await asyncio.sleep(seconds)
        try:
            with using(engine.clock):  # sagakit.now() in the job reads the engine's clock
                await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic job %s failed; it runs again in %.1fs", name, seconds)


async def housekeeping_loop(engine: Engine) -> None:
    """:meth:`Engine.housekeeping` every ``housekeeping_every`` seconds."""
    while engine.running:
        try:
            removed = await engine.housekeeping()
            if removed:
                log.info("purged %d inbox and outbox rows older than the retention", removed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("housekeeping failed; will try again")
        await asyncio.sleep(engine.housekeeping_every)


def _due_of(payload: str) -> float | None:
    """The earliest due time a timers notification names (None: it names none)."""
    try:
        return float(payload) if payload else None
    except ValueError:
        return None
