"""The wallet example app (examples/wallet): its transfers on the testing kit's virtual
clock, its demo under chaos, and the simulator on its real handlers, with and without
the planted bug."""

from __future__ import annotations

import json
from typing import Any

import pytest
from example_support import chaos_demo, sagakit, steps
from sagakit_wallet import app
from sagakit_wallet.load import OPENING, SHOP
from sagakit_wallet.planted import double_credit
from sagakit_wallet.sagas import DEADLINE, TRANSFER

from sagakit import SagaState
from sagakit.testing.kit import SagaHarness


def transfer(n: int, **changes: Any) -> dict[str, Any]:
    """A transfer's data: 40.00 from a full wallet to the open merchant, a good account."""
    data: dict[str, Any] = {
        "wallet": "wal-001",
        "merchant": SHOP,
        "account": f"acct-ok-{n}",
        "amount": 4_000,
        "currency": "EUR",
    }
    data.update(changes)
    return data


async def rows(h: SagaHarness, store: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` in a service's own store."""
    assert h.deployment is not None
    async with h.deployment.store(store).transaction() as tx:
        found: list[tuple[Any, ...]] = await tx.fetchall(sql, params)
    return found


async def balances(h: SagaHarness, wallet: str = "wal-001") -> tuple[int, int]:
    """(the wallet's balance, the open merchant's balance)."""
    (w,) = await rows(h, "wallet", "SELECT balance FROM wallets WHERE wallet_id = ?", wallet)
    (m,) = await rows(h, "merchant", "SELECT balance FROM merchants WHERE merchant_id = ?", SHOP)
    return int(w[0]), int(m[0])


async def entries(h: SagaHarness, store: str, payment: str) -> list[str]:
    """The kinds of the payment's ledger rows in the wallet or the merchant service."""
    table = "wallet_entries" if store == "wallet" else "merchant_entries"
    found = await rows(
        h, store, f"SELECT kind FROM {table} WHERE payment = ? ORDER BY kind", payment
    )
    return [str(r[0]) for r in found]


async def bank_row(h: SagaHarness, payment: str) -> tuple[str, int, int] | None:
    """(state, settlement requests, settlements) of the payment's transfer at the bank."""
    found = await rows(
        h,
        "bank",
        "SELECT state, settle_requests, settlements FROM transfers WHERE payment = ?",
        payment,
    )
    return None if not found else (str(found[0][0]), int(found[0][1]), int(found[0][2]))


async def test_a_transfer_is_debited_credited_sent_and_settled() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(TRANSFER, "pay-1", transfer(1))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED and done.status == "SETTLED"
        assert await steps(h, saga.saga_id, "step.succeeded") == [
            "debit_wallet",
            "credit_merchant",
            "order_transfer",
            "initiate_transfer",
            "confirm_settlement",
        ]
        assert "compensation.started" not in await h.events(saga.saga_id)
        assert await balances(h) == (OPENING - 4_000, 4_000)
        assert await entries(h, "wallet", "pay-1") == ["debit"]
        assert await entries(h, "merchant", "pay-1") == ["credit"]
        assert await bank_row(h, "pay-1") == ("settled", 1, 1)
        assert await h.check() == []


async def test_a_frozen_account_is_rejected_before_the_money_leaves() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(TRANSFER, "pay-2", transfer(2, account="acct-frozen-2"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED and done.status == "CANCELLED"
        assert "rejected" in (done.reason or "")
        # Undone in reverse order: the order at the bank, the credit, the debit.
        assert await steps(h, saga.saga_id, "compensation.succeeded") == [
            "order_transfer",
            "credit_merchant",
            "debit_wallet",
        ]
        assert await balances(h) == (OPENING, 0)  # both as they were
        assert await entries(h, "wallet", "pay-2") == ["debit", "refund"]
        assert await entries(h, "merchant", "pay-2") == ["credit", "reversal"]
        assert await bank_row(h, "pay-2") == ("rejected", 0, 0)
        assert await h.check() == []


async def test_a_closed_merchant_takes_nothing_and_the_wallet_is_refunded() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(TRANSFER, "pay-3", transfer(3, merchant="m-closed"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED
        assert await steps(h, saga.saga_id, "step.failed") == ["credit_merchant"]
        assert await steps(h, saga.saga_id, "compensation.succeeded") == ["debit_wallet"]
        assert await balances(h) == (OPENING, 0)
        assert await entries(h, "wallet", "pay-3") == ["debit", "refund"]
        assert await entries(h, "merchant", "pay-3") == []
        assert await bank_row(h, "pay-3") is None
        assert await h.check() == []


async def test_three_transfers_race_for_a_wallet_that_covers_two() -> None:
    async with SagaHarness.for_app(app) as h:
        sagas = [await h.start(TRANSFER, f"pay-r{i}", transfer(10 + i)) for i in range(3)]
        done = [await h.run_to_end(s.saga_id) for s in sagas]
        states = sorted(d.state.value for d in done)
        assert states == ["COMPENSATED", "SUCCEEDED", "SUCCEEDED"]
        (loser,) = [d for d in done if d.state is SagaState.COMPENSATED]
        assert "insufficient funds" in (loser.reason or "")
        # The refused debit had no effect: nothing to give back, no refund in the ledger.
        assert await entries(h, "wallet", loser.business_key) == []
        assert await balances(h) == (OPENING - 8_000, 8_000)
        assert await h.check() == []


async def test_a_settlement_whose_answer_never_comes_is_found_by_the_status_query() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(TRANSFER, "pay-4", transfer(4, account="acct-slow-4"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        events = await h.events(saga.saga_id)
        assert "outcome.unknown" in events and "status.answered" in events
        assert await steps(h, saga.saga_id, "status.queried") == ["confirm_settlement"]
        state, requests, settlements = await bank_row(h, "pay-4") or ("", 0, 0)
        assert (state, settlements) == ("settled", 1)  # booked once, asked four times
        assert requests == 4
        assert await h.check() == []


async def test_a_stuck_settlement_goes_to_a_person_whose_retry_settles_it() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(TRANSFER, "pay-5", transfer(5, account="acct-stuck-5"))
        stuck = await h.run_to_end(saga.saga_id)
        assert stuck.state is SagaState.FAILED_NEEDS_MANUAL
        assert stuck.status == "NEEDS_ATTENTION"
        assert "confirm_settlement" in (stuck.reason or "")
        assert await bank_row(h, "pay-5") == ("initiated", 4, 0)
        # Past the pivot nothing is undone: the money stays with the merchant.
        assert await balances(h) == (OPENING - 4_000, 4_000)
        assert await h.check() == []
        await h.engine.resolve(
            saga.saga_id, "retry", reason="the settlement network is back", actor="ops-1"
        )
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        assert await bank_row(h, "pay-5") == ("settled", 7, 1)
        assert await h.check() == []


async def test_a_screening_longer_than_a_command_timeout_is_waited_for() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(TRANSFER, "pay-6", transfer(6, account="acct-review-6"))
        assert (await h.saga(saga.saga_id)).status == "SCREENING"
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.SUCCEEDED
        # The bank answered nothing for 3 s: the order step timed out and was sent again
        # under the same key, and the bank's screening job answered it.
        assert "order_transfer" in await steps(h, saga.saga_id, "step.timed_out")
        assert await bank_row(h, "pay-6") == ("settled", 1, 1)
        assert await h.check() == []


async def test_a_hold_past_the_deadline_times_the_transfer_out() -> None:
    async with SagaHarness.for_app(app) as h:
        saga = await h.start(TRANSFER, "pay-7", transfer(7, account="acct-hold-7"))
        await h.advance(DEADLINE - 1)
        assert (await h.saga(saga.saga_id)).state is SagaState.RUNNING
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.TIMED_OUT
        assert "deadline.passed" in await h.events(saga.saga_id)
        assert await balances(h) == (OPENING, 0)
        assert await bank_row(h, "pay-7") == ("cancelled", 0, 0)
        # The hold ends an hour later: the cancelled order is never booked.
        await h.advance(3_600)
        assert await bank_row(h, "pay-7") == ("cancelled", 0, 0)
        assert await h.check() == []


async def test_the_planted_double_refund_is_caught_by_the_checks() -> None:
    async with SagaHarness.for_app(double_credit()) as h:
        saga = await h.start(TRANSFER, "pay-8", transfer(8, merchant="m-closed"))
        done = await h.run_to_end(saga.saga_id)
        assert done.state is SagaState.COMPENSATED  # the saga cannot tell
        problems = await h.check()
        assert any(p.startswith("conservation:") for p in problems), problems
        assert any("wal-001 holds 14000, its ledger says 10000" in p for p in problems)


def test_the_demo_under_chaos_ends_every_saga_with_every_invariant_holding() -> None:
    report = chaos_demo("sagakit_wallet:app")
    assert report["outcomes"].get("SUCCEEDED", 0) > 0
    assert report["outcomes"].get("COMPENSATED", 0) > 0


@pytest.mark.slow
def test_the_simulator_finds_no_violation() -> None:
    done = sagakit("simulate", "--app", "sagakit_wallet:app", "--seeds", "40", "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["violations"] == 0 and report["failing_seeds"] == []
    for kind in ("compensation", "status_query", "manual_escalation", "deadline"):
        assert report["exercised"][kind] > 0, kind


@pytest.mark.slow
def test_the_simulator_catches_the_planted_double_refund() -> None:
    done = sagakit(
        "simulate", "--app", "sagakit_wallet.planted:double_credit", "--seeds", "20", "--json"
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["failing_seeds"]
    assert any("conservation:" in v for v in report["shrunk"]["violations"])
