"""`sagakit demo` counts unexpected dead letters as violations.

The demo sends no poison messages and its crash faults are far too rare to exhaust a
consumer's redeliveries, so a parked command, reply or fact means a handler or the
runtime failed on a legitimate message: the run fails. An event nobody subscribes to
is parked by design and is not counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sagakit_checkout import demo
from sagakit_checkout.demo import (
    EXPECTED_PARKED,
    check_dead_letters,
    make_orders,
    render,
    run_demo,
)
from sagakit_checkout.invariants import InvariantReport

from sagakit.stores.sqlite import SQLiteStore

ORDERS = 5
QUICK = {"success", "card_declined", "out_of_stock", "last_item_race"}
"""Scenarios that settle in milliseconds (no timeouts, no waiting on a provider)."""


def quick_seed() -> int:
    """A seed whose orders all settle at once: the test is about the report."""
    return next(
        seed for seed in range(1000) if {o.scenario for o in make_orders(ORDERS, seed)[0]} <= QUICK
    )


async def test_only_unexpected_dead_letters_are_violations(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "payment.db", name="payment", synchronous="NORMAL")
    await store.open()
    try:
        async with store.transaction() as tx:
            await tx.dead_letter("", "ev-1", "{}", f"{EXPECTED_PARKED} 'OrderArchived'", 1.0)
        report = InvariantReport()
        await check_dead_letters(report, [store, store])
        assert report.ok and report.violations == []

        async with store.transaction() as tx:
            await tx.dead_letter("payment", "cmd-7", "{}", "KeyError('amount')", 2.0)
        await check_dead_letters(report, [store])
        assert report.invariants["dead_letters"] is False
        (violation,) = report.violations
        assert violation.startswith("dead_letters: payment (payment) parked message cmd-7")
        assert "KeyError" in violation
    finally:
        await store.close()


async def test_a_parked_message_fails_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clean run passes; the same run with one message a consumer parked fails, and
    # the report says which.
    seed = quick_seed()
    clean = await run_demo(orders=ORDERS, faults="none", seed=seed, data_dir=tmp_path / "clean")
    assert clean.ok, clean.report.violations
    assert "dead_letters" not in clean.report.invariants

    audit = demo.check_event_delivery

    async def then_park(report: InvariantReport, endpoints: Any, routes: Any) -> None:
        await audit(report, endpoints, routes)
        # As the consumer does when a handler fails on a message for good.
        async with endpoints["inventory"].transaction() as tx:
            await tx.dead_letter("inventory", "m-1", "{}", "handler raised ValueError", 9.0)

    monkeypatch.setattr(demo, "check_event_delivery", then_park)
    broken = await run_demo(orders=ORDERS, faults="none", seed=seed, data_dir=tmp_path / "broken")
    assert not broken.ok
    assert broken.report.invariants["dead_letters"] is False
    assert any("parked message m-1" in v for v in broken.report.violations)
    assert "dead_letters          VIOLATED" in render(broken)
