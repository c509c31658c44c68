"""The notifications example app (examples/notifications): its sagas on the testing
kit's virtual clock at the story's real durations, its demo under chaos, and the
simulator on its real handlers, with and without the planted bug."""

from __future__ import annotations

import json
from typing import Any

import pytest
from example_support import chaos_demo, sagakit
from sagakit_notifications import app
from sagakit_notifications.planted import retry_without_key
from sagakit_notifications.sagas import DEADLINE, NAME

from sagakit import SagaState
from sagakit.testing.kit import SagaHarness

STORY = {"time_scale": 1.0}
"""Run the story at its real durations (a 20-minute deadline, a 3-hour outage): the
kit's clock is virtual."""


def order(n: int, **changes: Any) -> dict[str, Any]:
    """An order's data: plenty of stock, a good card, both providers fine."""
    data: dict[str, Any] = {
        "customer": f"cus-{n}",
        "sku": "sku-plenty-1",
        "qty": 1,
        "amount": 4_200,
        "card": f"card-ok-{n}",
        "email_route": "ok",
        "sms_route": "ok",
    }
    data.update(changes)
    return data


async def delivered(h: SagaHarness, channel: str, order_id: str) -> list[str]:
    """The message ids the fake provider of ``channel`` delivered for ``order_id``."""
    assert h.deployment is not None
    async with h.deployment.store(channel).transaction() as tx:
        rows = await tx.fetchall(
            "SELECT message_id FROM provider_deliveries WHERE order_id = ? ORDER BY message_id",
            (order_id,),
        )
    return [str(r[0]) for r in rows]


async def requests_seen(h: SagaHarness, channel: str, order_id: str) -> int:
    """How many requests the fake provider of ``channel`` got for ``order_id``."""
    assert h.deployment is not None
    async with h.deployment.store(channel).transaction() as tx:
        row = await tx.fetchone(
            "SELECT requests FROM provider_contacts WHERE order_id = ?", (order_id,)
        )
    return 0 if row is None else int(row[0])


async def orders_row(h: SagaHarness, order_id: str) -> tuple[str | None, str | None]:
    """(the order's status, its hold's status) in the orders service."""
    assert h.deployment is not None
    async with h.deployment.store("orders").transaction() as tx:
        placed = await tx.fetchone("SELECT status FROM orders WHERE order_id = ?", (order_id,))
        hold = await tx.fetchone("SELECT status FROM reservations WHERE order_id = ?", (order_id,))
    return (None if placed is None else str(placed[0]), None if hold is None else str(hold[0]))


async def test_a_placed_order_is_confirmed_by_email_then_sms() -> None:
    async with SagaHarness.for_app(app, options=STORY) as h:
        saga = await h.start(NAME, "ord-1", order(1))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED and done.status == "NOTIFIED"
        events = await h.events(saga.saga_id)
        succeeded = [e.step for e in await h.history(saga.saga_id) if e.event == "step.succeeded"]
        assert succeeded == ["reserve", "place", "email", "sms"]
        assert "compensation.started" not in events
        assert await orders_row(h, "ord-1") == ("PLACED", "SOLD")
        assert await delivered(h, "email", "ord-1") == ["email-ord-1-1"]
        assert await delivered(h, "sms", "ord-1") == ["sms-ord-1-1"]
        assert await h.check() == []


async def test_a_declined_card_releases_the_hold_and_sends_nothing() -> None:
    async with SagaHarness.for_app(app, options=STORY) as h:
        saga = await h.start(NAME, "ord-2", order(2, card="card-declined-2"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED
        history = await h.history(saga.saga_id)
        assert [(e.event, e.step) for e in history if e.event.startswith("compensation")] == [
            ("compensation.started", None),
            ("compensation.sent", "reserve"),
            ("compensation.succeeded", "reserve"),
        ]
        assert "card declined" in (done.reason or "")
        assert await orders_row(h, "ord-2") == (None, "RELEASED")
        assert await delivered(h, "email", "ord-2") == []
        assert await delivered(h, "sms", "ord-2") == []
        assert await h.check() == []


async def test_three_orders_race_for_two_units_and_the_loser_is_undone() -> None:
    async with SagaHarness.for_app(app, options=STORY) as h:
        sagas = [
            (await h.engine.start(NAME, f"ord-{n}", order(n, sku="sku-limited-1"))).saga_id
            for n in (3, 4, 5)
        ]
        ends = [await h.run_to_end(s) for s in sagas]
        states = sorted(e.state.value for e in ends)
        assert states == ["COMPENSATED", "SUCCEEDED", "SUCCEEDED"]
        (loser,) = [e for e in ends if e.state is SagaState.COMPENSATED]
        assert "sold out" in (loser.reason or "")
        assert await delivered(h, "email", loser.business_key) == []
        assert await h.check() == []


async def test_a_short_outage_is_retried_with_backoff_and_sends_once() -> None:
    async with SagaHarness.for_app(app, options=STORY) as h:
        saga = await h.start(NAME, "ord-6", order(6, sms_route="down"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        waits = [
            e.detail["delay"]
            for e in await h.history(saga.saga_id)
            if e.event == "retry.scheduled" and e.step == "sms"
        ]
        # Four minutes of outage: 10 s, 20 s, 40 s, 80 s, then two minutes at most.
        assert len(waits) >= 4
        assert waits[1] > waits[0] and waits[2] > waits[1]
        assert max(waits) <= 120 * 1.2  # the cap, with its jitter
        assert await delivered(h, "sms", "ord-6") == ["sms-ord-6-1"]
        assert await requests_seen(h, "sms", "ord-6") == len(waits) + 1
        assert await h.check() == []


async def test_a_late_answer_is_retried_under_the_same_key_and_sent_once() -> None:
    async with SagaHarness.for_app(app, options=STORY) as h:
        saga = await h.start(NAME, "ord-7", order(7, email_route="slow"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        # Sent on the first try; every try in the slow two minutes timed out at the
        # service, and the provider deduplicated them by the step's key.
        assert await requests_seen(h, "email", "ord-7") > 1
        assert await delivered(h, "email", "ord-7") == ["email-ord-7-1"]
        assert done.steps[2].result == {"message": "email-ord-7-1", "duplicate": True}
        assert await h.check() == []


async def test_an_outage_past_the_deadline_goes_to_a_person_who_retries() -> None:
    async with SagaHarness.for_app(app, options=STORY) as h:
        saga = await h.start(NAME, "ord-8", order(8, email_route="outage"))
        start = h.clock()
        stuck = await h.run_to_end(saga.saga_id)
        # The deadline, on the virtual clock: 20 minutes of tries, in real milliseconds.
        assert stuck.state is SagaState.FAILED_NEEDS_MANUAL
        assert h.clock() - start == pytest.approx(DEADLINE, abs=1.0)
        assert "deadline passed" in (stuck.reason or "") and "'email'" in (stuck.reason or "")
        events = await h.events(saga.saga_id)
        assert "deadline.passed" in events and "compensation.started" not in events
        assert events.count("retry.scheduled") >= 10
        assert await orders_row(h, "ord-8") == ("PLACED", "SOLD")  # never undone
        assert await delivered(h, "email", "ord-8") == []
        assert await h.check() == []  # the person's now; at most one of each holds

        await h.advance(3 * 3600.0)  # the provider is back
        await h.engine.resolve(
            saga.saga_id, "retry", reason="the provider is back up", actor="ops-1"
        )
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        assert await delivered(h, "email", "ord-8") == ["email-ord-8-1"]
        assert await delivered(h, "sms", "ord-8") == ["sms-ord-8-1"]
        assert await h.check() == []


async def test_the_planted_bug_sends_a_second_email_and_is_caught() -> None:
    async with SagaHarness.for_app(retry_without_key(), options=STORY) as h:
        saga = await h.start(NAME, "ord-9", order(9, email_route="slow"))
        done = await h.run_to_end(saga.saga_id)
        # The saga looks fine: every try was a retry of one step.
        assert done.state is SagaState.SUCCEEDED
        assert len(await delivered(h, "email", "ord-9")) > 1
        problems = await h.check()
        assert "at_most_once: the customer of ord-9 got the confirmation e-mail more than once" in (
            problems
        )
        assert any(p.startswith("notified: ord-9") for p in problems)


def test_the_demo_under_chaos_ends_every_saga_with_every_invariant_holding() -> None:
    outcomes = chaos_demo("sagakit_notifications:app")["outcomes"]
    # The mix: notified, undone before the pivot, and left to a person after it.
    assert outcomes.get("SUCCEEDED", 0) > 30
    assert outcomes.get("COMPENSATED", 0) > 0
    assert outcomes.get("FAILED_NEEDS_MANUAL", 0) > 0


def test_the_simulator_finds_no_violation() -> None:
    done = sagakit(
        "simulate", "--app", "sagakit_notifications:app", "--seeds", "40", "--json",
        "--jobs", "1",
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["seeds"] == 40 and report["violations"] == 0
    # The paths the app is about were taken: retries after the pivot, the deadline,
    # the manual queue.
    exercised = report["exercised"]
    assert exercised["post_pivot_failure"] > 0 and exercised["deadline"] > 0
    assert exercised["manual_escalation"] > 0 and exercised["compensation"] > 0


def test_the_simulator_catches_the_planted_retry_without_key() -> None:
    done = sagakit(
        "simulate", "--app", "sagakit_notifications.planted:retry_without_key",
        "--seeds", "20", "--json", "--jobs", "1",
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["violations"] > 0
    # Only the app's own checks of the provider's books see it; the engine's "effect
    # once per idempotency key" holds (each try was an attempt under one key).
    shrunk = report["shrunk"]
    assert set(shrunk["invariants"]) <= {"app", "app_watch"}
    assert any("at_most_once" in v for v in shrunk["violations"])
