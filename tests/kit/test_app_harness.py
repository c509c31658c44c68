"""A whole app under the testing kit: ``SagaHarness.for_app`` (no sagakit internals).

The app: a desk holds a seat for a minute, then a clerk must confirm within two minutes
(the request is withdrawn if the booking is undone), and never does. The desk's
sweeper (a service job whose ``due`` is the earliest hold expiry) releases the hold at
its expiry, on the virtual clock; the confirmation times out, the saga compensates
(nothing left to release), and the app's own invariants hold.
All of it in well under a second of real time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sagakit import (
    DEFER,
    App,
    Deployment,
    RetryPolicy,
    SagaDefinition,
    SagaState,
    Service,
    Step,
    command,
    now,
)
from sagakit.testing.kit import SagaHarness

HOLD_FOR = 60.0
CONFIRM_WITHIN = 120.0


def build_app() -> App:
    booking = SagaDefinition(
        "booking",
        [
            Step("hold", command("desk", "Hold"), command("desk", "Release")),
            Step(
                "confirm",
                command("clerk", "Confirm"),
                command("clerk", "Withdraw"),
                timeout=CONFIRM_WITHIN,
                retry=RetryPolicy(max_attempts=1),
            ),
        ],
    )
    desk = Service(
        "desk",
        migrations=[
            "CREATE TABLE holds (booking TEXT NOT NULL PRIMARY KEY, state TEXT NOT NULL, "
            "expires_at DOUBLE PRECISION NOT NULL, changed_at DOUBLE PRECISION NOT NULL)"
        ],
    )
    clerk = Service("clerk")

    @desk.handles("Hold")
    async def hold(tx: Any, env: Any) -> None:
        await tx.execute(
            "INSERT INTO holds (booking, state, expires_at, changed_at) VALUES (?, 'held', ?, ?)",
            (env.business_key, now() + HOLD_FOR, now()),
        )

    @desk.handles("Release")
    async def release(tx: Any, env: Any) -> None:
        await tx.execute(
            "UPDATE holds SET state = 'released', changed_at = ? "
            "WHERE booking = ? AND state = 'held'",
            (now(), env.business_key),
        )

    async def next_expiry(store: Any) -> float | None:
        async with store.transaction() as tx:
            rows = await tx.fetchall("SELECT min(expires_at) FROM holds WHERE state = 'held'")
        return None if rows[0][0] is None else float(rows[0][0])

    @desk.every(30.0, "sweep", due=next_expiry)
    async def sweep(store: Any) -> None:
        async with store.transaction() as tx:
            await tx.execute(
                "UPDATE holds SET state = 'expired', changed_at = ? "
                "WHERE state = 'held' AND expires_at <= ?",
                (now(), now()),
            )

    @clerk.handles("Confirm")
    async def confirm(tx: Any, env: Any) -> object:
        return DEFER  # a person confirms later; in this story, never

    @clerk.handles("Withdraw")
    async def withdraw(tx: Any, env: Any) -> None:
        return None  # the request to the clerk is withdrawn: nothing was confirmed

    async def invariants(dep: Deployment) -> Sequence[str]:
        async with dep.store("desk").transaction() as tx:
            held = await tx.fetchall("SELECT booking FROM holds WHERE state = 'held'")
        return [f"booking {b} still holds a seat" for (b,) in held]

    return App(
        "desk",
        [booking],
        services=[desk, clerk],
        invariants=invariants,
    )


async def test_an_app_runs_whole_on_the_virtual_clock() -> None:
    started = time.monotonic()
    async with SagaHarness.for_app(build_app()) as h:
        t0 = h.clock()
        saga = await h.start("booking", "b-1")
        await h.advance(HOLD_FOR)  # the sweeper runs exactly at the hold's expiry
        assert h.deployment is not None
        async with h.deployment.store("desk").transaction() as tx:
            rows = await tx.fetchall("SELECT state, changed_at FROM holds")
        assert rows == [("expired", t0 + HOLD_FOR)]
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED
        assert "step.timed_out" in await h.events(saga.saga_id)
        assert h.clock() - t0 >= CONFIRM_WITHIN
        assert await h.check() == []
    assert time.monotonic() - started < 10  # minutes of virtual time, not of real time


async def test_check_reports_the_apps_broken_invariants() -> None:
    async with SagaHarness.for_app(build_app()) as h:
        await h.start("booking", "b-2")
        assert await h.check() == ["booking b-2 still holds a seat"]


def test_a_harness_for_an_app_takes_no_other_participants() -> None:
    import asyncio

    import pytest

    from sagakit import Participant

    h = SagaHarness.for_app(build_app())
    h.add(Participant("extra", h.store("extra")))

    async def enter() -> None:
        async with h:
            pass

    with pytest.raises(RuntimeError, match="runs the app's services only"):
        asyncio.run(enter())
