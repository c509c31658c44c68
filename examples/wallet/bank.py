"""The bank: a fake external bank, kept in the ``bank`` service's own store.

It stands for the platform's bank, which pays each payment on to the merchant's bank
account. Like a real one it works in two moves, and keeps one row per payment
(``transfers``), in one of these states::

    review --> ordered --> initiated --> settled
       |          |    \\
       +----------+-----> cancelled      ordered --> rejected

* ``OrderTransfer`` books a payment order. The bank screens it first: at once for most
  accounts; ``acct-review-*`` accounts take :data:`REVIEW_SECONDS` and
  ``acct-hold-*`` :data:`HOLD_SECONDS` (longer than the saga's deadline). While it
  screens, the handler answers nothing (``DEFER``) and the ``screening`` job answers
  when the review ends.
* ``CancelTransfer`` cancels an order that has not left (the compensation); once the
  money left it is refused for good, so a saga undone by a person after its transfer
  left stops in the manual queue instead of giving the money back twice.
* ``InitiateTransfer`` releases an order: the money leaves, the point of no return.
  The bank rejects it for ``acct-frozen-*`` accounts (before anything left).
* ``ConfirmSettlement`` books the settlement, once (``settlements`` counts it). For
  ``acct-slow-*`` the bank books it but its answer never comes in time, so the saga
  asks ``GetSettlementStatus``; for ``acct-stuck-*`` the settlement network is down
  for the first :data:`STUCK_REQUESTS` requests (the saga's tries and a person's).

``GetTransferStatus`` and ``GetSettlementStatus`` are the status queries a saga asks
when an answer did not come: ``done``, ``failed``, ``not_found`` or ``pending``.
"""

from __future__ import annotations

from typing import Any

from sagakit import Envelope, Service, StepFailed, now
from sagakit.runtime.participant import DEFER, HandlerResult
from sagakit.stores.base import SQLStore, Tx

from .payloads import amount_of, text_of

REVIEW = "acct-review-"
"""Accounts whose payment orders the bank screens for :data:`REVIEW_SECONDS`."""
HOLD = "acct-hold-"
"""Accounts whose payment orders the bank holds for :data:`HOLD_SECONDS`."""
FROZEN = "acct-frozen-"
"""Accounts the bank refuses to pay: the release of the order is rejected."""
SLOW = "acct-slow-"
"""Accounts whose settlement the bank books without answering in time."""
STUCK = "acct-stuck-"
"""Accounts whose settlement fails for the first :data:`STUCK_REQUESTS` requests."""

REVIEW_SECONDS = 3.0
"""How long a screening takes for ``acct-review-*`` (longer than a command's first wait:
the saga sends the order again meanwhile, and the bank keeps screening)."""
HOLD_SECONDS = 3600.0
"""How long a compliance hold lasts for ``acct-hold-*``: past the saga's deadline."""
STUCK_REQUESTS = 6
"""Settlement requests that fail for ``acct-stuck-*``: more than the saga's tries, so a
person decides, and a person's retry then settles."""
SCREEN_EVERY = 0.25
"""Seconds between two runs of the screening job (in a real process)."""

LEFT = ("initiated", "settled")
"""The states of a transfer whose money left the bank."""

MIGRATIONS = [
    """
    CREATE TABLE transfers (
        payment         TEXT NOT NULL PRIMARY KEY,
        merchant_id     TEXT NOT NULL,
        account         TEXT NOT NULL,
        amount          BIGINT NOT NULL CHECK (amount > 0),
        state           TEXT NOT NULL CHECK (state IN
                        ('review', 'ordered', 'cancelled', 'rejected', 'initiated', 'settled')),
        review_until    DOUBLE PRECISION,
        review_command  TEXT,
        settle_requests BIGINT NOT NULL DEFAULT 0,
        settlements     BIGINT NOT NULL DEFAULT 0,
        updated_at      DOUBLE PRECISION NOT NULL
    );
    """,
]
"""The bank's table (portable SQL)."""


def bank_service() -> Service:
    """The bank service with its handlers and its screening job."""
    bank = Service("bank", migrations=MIGRATIONS)

    @bank.handles("OrderTransfer")
    async def order(tx: Tx, env: Envelope) -> HandlerResult:
        """Book the payment order, after screening it (see the module docstring)."""
        payment = text_of(env, "payment")
        merchant_id = text_of(env, "merchant")
        account = text_of(env, "account")
        amount = amount_of(env)
        row = await tx.fetchone("SELECT state FROM transfers WHERE payment = ?", (payment,))
        if row is not None:
            state = str(row[0])
            if state == "review":
                # Sent again while the bank screens: answer this latest try when it ends.
                waiting = await tx.execute(
                    "UPDATE transfers SET review_command = ? "
                    "WHERE payment = ? AND state = 'review'",
                    (env.to_json(), payment),
                )
                if not waiting:  # the screening ended meanwhile: its answer is recorded
                    raise StepFailed("the screening just ended", retryable=True)
                return DEFER
            if state == "cancelled":
                raise StepFailed(f"the payment order of {payment} was cancelled")
            return {"order": f"PO-{payment}"}
        screening = _screening(account)
        await tx.execute(
            "INSERT INTO transfers (payment, merchant_id, account, amount, state, "
            "review_until, review_command, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                payment,
                merchant_id,
                account,
                amount,
                "review" if screening else "ordered",
                now() + screening if screening else None,
                env.to_json() if screening else None,
                now(),
            ),
        )
        if screening:
            return DEFER
        return {"order": f"PO-{payment}"}

    @bank.handles("CancelTransfer")
    async def cancel(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Cancel the payment order (the compensation of OrderTransfer)."""
        payment = text_of(env, "payment")
        row = await tx.fetchone("SELECT state FROM transfers WHERE payment = ?", (payment,))
        if row is None:
            # Never ordered: keep a cancelled order, so that nothing can release it later.
            await tx.execute(
                "INSERT INTO transfers (payment, merchant_id, account, amount, state, "
                "updated_at) VALUES (?, ?, ?, ?, 'cancelled', ?)",
                (payment, text_of(env, "merchant"), text_of(env, "account"), amount_of(env), now()),
            )
            return {"cancelled": False}
        state = str(row[0])
        if state in LEFT:
            # A definite no: the money left. The saga stops for a person.
            raise StepFailed(
                f"the transfer of {payment} already left the bank: it cannot be undone"
            )
        changed = await tx.execute(
            "UPDATE transfers SET state = 'cancelled', review_command = NULL, updated_at = ? "
            "WHERE payment = ? AND state IN ('review', 'ordered')",
            (now(), payment),
        )
        if not changed and await _state(tx, payment) in LEFT:
            # Released by a concurrent transaction between the read and the update.
            raise StepFailed(
                f"the transfer of {payment} already left the bank: it cannot be undone"
            )
        return {"cancelled": bool(changed)}

    @bank.handles("InitiateTransfer")
    async def initiate(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Release the payment order: the money leaves (the pivot)."""
        payment = text_of(env, "payment")
        row = await tx.fetchone(
            "SELECT account, state FROM transfers WHERE payment = ?", (payment,)
        )
        if row is None:
            raise StepFailed(f"there is no payment order for {payment}")
        account, state = str(row[0]), str(row[1])
        if state in LEFT:
            return {"transfer": f"TR-{payment}"}
        if state == "review":
            raise StepFailed(f"the payment order of {payment} is still screened", retryable=True)
        if state == "cancelled":
            raise StepFailed(f"the payment order of {payment} was cancelled")
        if state == "rejected" or account.startswith(FROZEN):
            await tx.execute(
                "UPDATE transfers SET state = 'rejected', updated_at = ? "
                "WHERE payment = ? AND state = 'ordered'",
                (now(), payment),
            )
            raise StepFailed(f"the bank rejected the transfer of {payment}: account frozen")
        released = await tx.execute(
            "UPDATE transfers SET state = 'initiated', updated_at = ? "
            "WHERE payment = ? AND state = 'ordered'",
            (now(), payment),
        )
        if not released:
            # A concurrent transaction changed the order between the read and the update:
            # answer by what it made of it.
            now_state = await _state(tx, payment)
            if now_state not in LEFT:
                raise StepFailed(f"the payment order of {payment} was {now_state}")
        return {"transfer": f"TR-{payment}"}

    @bank.handles("GetTransferStatus")
    async def transfer_status(tx: Tx, env: Envelope) -> dict[str, Any]:
        """The status query of InitiateTransfer: did the money leave?"""
        payment = text_of(env, "payment")
        row = await tx.fetchone("SELECT state FROM transfers WHERE payment = ?", (payment,))
        state = None if row is None else str(row[0])
        if state in LEFT:
            return {"state": "done", "result": {"transfer": f"TR-{payment}"}}
        if state == "rejected":
            return {"state": "failed", "reason": "the bank rejected the transfer: account frozen"}
        if state == "cancelled":
            return {"state": "failed", "reason": "the payment order was cancelled"}
        return {"state": "not_found"}  # the release never arrived: the saga sends it again

    @bank.handles("ConfirmSettlement")
    async def settle(tx: Tx, env: Envelope) -> dict[str, Any]:
        """Book the settlement of a transfer that left (once)."""
        payment = text_of(env, "payment")
        row = await tx.fetchone(
            "SELECT account, state, settle_requests FROM transfers WHERE payment = ?", (payment,)
        )
        if row is None or str(row[1]) not in LEFT:
            state = "no order" if row is None else str(row[1])
            raise StepFailed(f"the transfer of {payment} never left the bank ({state})")
        account, state, requests = str(row[0]), str(row[1]), int(row[2]) + 1
        await tx.execute(
            "UPDATE transfers SET settle_requests = ? WHERE payment = ?", (requests, payment)
        )
        if state == "initiated":
            if account.startswith(STUCK) and requests <= STUCK_REQUESTS:
                raise StepFailed("the settlement network is down", retryable=True)
            await tx.execute(
                "UPDATE transfers SET state = 'settled', settlements = settlements + 1, "
                "updated_at = ? WHERE payment = ? AND state = 'initiated'",
                (now(), payment),
            )
        if account.startswith(SLOW):
            # Booked, but the answer does not come in time: only the status query tells.
            raise StepFailed("the bank did not confirm the settlement in time", retryable=True)
        return {"settled": f"ST-{payment}"}

    @bank.handles("GetSettlementStatus")
    async def settlement_status(tx: Tx, env: Envelope) -> dict[str, Any]:
        """The status query of ConfirmSettlement."""
        payment = text_of(env, "payment")
        row = await tx.fetchone(
            "SELECT state, settle_requests FROM transfers WHERE payment = ?", (payment,)
        )
        if row is None:
            return {"state": "not_found"}
        state, requests = str(row[0]), int(row[1])
        if state == "settled":
            return {"state": "done", "result": {"settled": f"ST-{payment}"}}
        if state == "initiated":
            # Asked and not settled: the bank is still trying. Never asked: send it again.
            return {"state": "pending" if requests else "not_found"}
        return {"state": "failed", "reason": f"the transfer never left the bank ({state})"}

    async def next_review(store: SQLStore) -> float | None:
        """When the screening job could next answer an order (None: nothing screened)."""
        async with store.transaction() as tx:
            row = await tx.fetchone(
                "SELECT MIN(review_until) FROM transfers WHERE state = 'review'"
            )
        return None if row is None or row[0] is None else float(row[0])

    @bank.every(SCREEN_EVERY, "screening", due=next_review)
    async def screening(store: SQLStore) -> None:
        """Answer the payment orders whose screening ended: they are booked."""
        async with store.transaction() as tx:
            t = now()
            rows = await tx.fetchall(
                "SELECT payment, review_command FROM transfers "
                "WHERE state = 'review' AND review_until <= ? ORDER BY payment",
                (t,),
            )
            for payment, command in rows:
                booked = await tx.execute(
                    "UPDATE transfers SET state = 'ordered', review_command = NULL, "
                    "updated_at = ? WHERE payment = ? AND state = 'review'",
                    (t, payment),
                )
                if not booked:
                    continue
                answered = await bank.answer(
                    tx, Envelope.from_json(command), {"order": f"PO-{payment}"}, t
                )
                if not answered:
                    # The saga undid the order first: it stays cancelled.
                    await tx.execute(
                        "UPDATE transfers SET state = 'cancelled' WHERE payment = ?", (payment,)
                    )

    return bank


async def _state(tx: Tx, payment: str) -> str | None:
    """The state of the payment's transfer (None: the bank has no order for it)."""
    row = await tx.fetchone("SELECT state FROM transfers WHERE payment = ?", (payment,))
    return None if row is None else str(row[0])


def _screening(account: str) -> float:
    """Seconds the bank screens a new payment order to ``account`` (0: at once)."""
    if account.startswith(HOLD):
        return HOLD_SECONDS
    if account.startswith(REVIEW):
        return REVIEW_SECONDS
    return 0.0
