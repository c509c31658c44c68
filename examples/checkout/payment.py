"""The payment service: holds, takes and gives back money through the card provider.

Its own database keeps a *payment ledger*: one row per (order, operation) for
authorize, capture, void, refund and credit (a credit note). A UNIQUE constraint makes
a second row for the same operation impossible, and every handler reads the ledger
first, so a repeated command returns the recorded answer instead of hitting it.

Calls to the provider carry the command's idempotency key (``saga:step:action`` or
``saga:step:comp:rung``), so a retry after a provider timeout gets the effect that
already happened rather than a second one. The provider is external: its effects do
not roll back with this service's transaction, which is why the key, not the
transaction, is what keeps them single.

Amounts are integers in minor units (cents). The SQL is portable: the same statements
run on SQLiteStore and PostgresStore.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sagakit import Envelope, Outcome, Participant, StepFailed
from sagakit.stores.base import Tx

from .provider import (
    CardDeclined,
    FakeCardProvider,
    OperationRefused,
    ProviderTimeout,
    ProviderUnavailable,
    Receipt,
)

NAME = "payment"
"""The participant's endpoint name."""

NAMESPACE = "checkout.payment"
"""The ``schema_migrations`` namespace of the payment tables."""

MIGRATIONS: list[str] = [
    # The primary key (order_id, op) is the UNIQUE constraint that makes a second row
    # for the same operation, and so a second effect recorded, impossible.
    """
    CREATE TABLE payment_ledger (
        order_id     TEXT NOT NULL,
        op           TEXT NOT NULL
                     CHECK (op IN ('authorize', 'capture', 'void', 'refund', 'credit')),
        amount       BIGINT NOT NULL CHECK (amount >= 0),
        provider_ref TEXT NOT NULL,
        at           DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (order_id, op)
    );
    """,
]
"""Schema steps for ``apply_migrations`` (append, never edit).

Portable SQL, the same text on SQLite and PostgreSQL: a natural primary key instead
of an auto-increment id, ``BIGINT`` minor units, ``DOUBLE PRECISION`` epoch seconds.
"""

COMPENSATED_FIRST = "the action was compensated before it arrived; it is refused"
"""The status answer for an action whose key carries a tombstone."""

_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One operation of one order in the payment ledger."""

    order_id: str
    op: str
    amount: int
    provider_ref: str
    at: float


async def ledger(tx: Tx, order_id: str) -> dict[str, LedgerRow]:
    """The ledger rows of ``order_id``, by operation."""
    rows = await tx.fetchall(
        "SELECT order_id, op, amount, provider_ref, at FROM payment_ledger WHERE order_id = ?",
        (order_id,),
    )
    return {r[1]: LedgerRow(r[0], r[1], int(r[2]), r[3], float(r[4])) for r in rows}


class PaymentOps:
    """The payment service's business operations on its ledger and the provider.

    Shared by the orchestrated handlers (commands) and the choreographed ones (events).
    Each reads the ledger first, so a repeat returns the recorded answer; provider calls
    carry ``key``, so a retry after a timeout gets the effect that already happened.
    Failures raise :class:`StepFailed` (``retryable`` when the provider did not answer).
    """

    def __init__(self, provider: FakeCardProvider, clock: Callable[[], float]) -> None:
        self.provider = provider
        self.clock = clock

    async def record(self, tx: Tx, order_id: str, op: str, amount: int, ref: str) -> None:
        """Write one ledger row (callers looked the operation up first in ``tx``)."""
        # If this ever conflicted (a concurrent transaction on PostgreSQL recorded the
        # same operation first), the primary key fails the transaction loudly and the
        # message is delivered again, to find the row.
        await tx.execute(
            "INSERT INTO payment_ledger (order_id, op, amount, provider_ref, at) "
            "VALUES (?, ?, ?, ?, ?)",
            (order_id, op, amount, ref, self.clock()),
        )

    async def authorization(
        self, tx: Tx, rows: dict[str, LedgerRow], compensates: str | None
    ) -> LedgerRow | None:
        """The order's authorization: from the ledger, or learned from the provider.

        A provider timeout can leave an authorization the ledger never recorded; the
        provider remembers it under the action's key (``compensates``), so a
        compensation asks for it instead of concluding there is nothing to undo.
        """
        if "authorize" in rows:
            return rows["authorize"]
        if compensates is None:
            return None
        try:
            receipt = await self.provider.lookup(compensates)
        except (ProviderTimeout, ProviderUnavailable) as exc:
            # Whether there is a hold to release is unknown: try again later, never
            # conclude there is nothing to undo.
            raise _transient(exc) from exc
        if receipt is None or receipt.op != "authorize":
            return None
        await self.record(tx, receipt.order_id, "authorize", receipt.amount, receipt.authorization)
        row = LedgerRow(
            receipt.order_id, "authorize", receipt.amount, receipt.authorization, self.clock()
        )
        rows["authorize"] = row
        return row

    async def learn(self, tx: Tx, order_id: str, op: str, key: str) -> LedgerRow | None:
        """What the provider did under ``key``, an ``op`` whose answer never came.

        The provider keeps each key's effect, so asking it is how a caller whose calls all
        went unanswered finds out. An effect found is written to the ledger (bookkeeping
        of what already happened, not a new effect); ``None``: nothing happened under the
        key. :class:`ProviderTimeout` when the provider does not answer the question
        either: then only a person can find out.
        """
        rows = await ledger(tx, order_id)
        if op in rows:
            return rows[op]
        receipt = await self.provider.lookup(key)
        if receipt is None or receipt.order_id != order_id or receipt.op != op:
            return None
        await self.record(tx, order_id, op, receipt.amount, receipt.authorization)
        return LedgerRow(order_id, op, receipt.amount, receipt.authorization, self.clock())

    async def authorize(
        self, tx: Tx, order_id: str, *, amount: int, currency: str, card: str, key: str
    ) -> dict[str, Any]:
        """Hold ``amount`` on the card (once per order)."""
        rows = await ledger(tx, order_id)
        if "authorize" in rows:
            row = rows["authorize"]
            return {"authorization": row.provider_ref, "amount": row.amount}
        try:
            receipt = await self.provider.authorize(
                key, order_id=order_id, card=card, amount=amount, currency=currency
            )
        except CardDeclined as exc:
            raise StepFailed("card declined") from exc
        except OperationRefused as exc:
            raise StepFailed(f"authorization refused: {exc}") from exc
        except (ProviderTimeout, ProviderUnavailable) as exc:
            raise _transient(exc) from exc
        await self.record(tx, order_id, "authorize", receipt.amount, receipt.authorization)
        return {"authorization": receipt.authorization, "amount": receipt.amount}

    async def capture(self, tx: Tx, order_id: str, *, key: str) -> dict[str, Any]:
        """Take the authorized money (the point of no return)."""
        rows = await ledger(tx, order_id)
        if "capture" in rows:
            return {"captured": rows["capture"].amount}
        auth = rows.get("authorize")
        if auth is None:
            raise StepFailed(f"order {order_id} has no authorization to capture")
        if "void" in rows or "refund" in rows:
            raise StepFailed(f"the authorization of order {order_id} was released; cannot capture")
        receipt = await _call(self.provider.capture(key, authorization=auth.provider_ref))
        await self.record(tx, order_id, "capture", receipt.amount, receipt.authorization)
        return {"captured": receipt.amount}

    async def void(
        self, tx: Tx, order_id: str, *, key: str, compensates: str | None
    ) -> dict[str, Any]:
        """Release an uncaptured authorization; fails for good once captured."""
        rows = await ledger(tx, order_id)
        if "void" in rows:
            return {"voided": rows["void"].amount}
        auth = await self.authorization(tx, rows, compensates)
        if auth is None or "refund" in rows:
            return {"voided": 0}
        if "capture" in rows:
            # A definitive failure: the saga's ladder moves on to RefundPayment.
            raise StepFailed("authorization already captured; cannot void")
        receipt = await _call(self.provider.void(key, authorization=auth.provider_ref))
        await self.record(tx, order_id, "void", receipt.amount, receipt.authorization)
        return {"voided": receipt.amount}

    async def refund(
        self, tx: Tx, order_id: str, *, key: str, compensates: str | None
    ) -> dict[str, Any]:
        """Give captured money back (or release an uncaptured hold)."""
        rows = await ledger(tx, order_id)
        if "refund" in rows:
            return {"refunded": rows["refund"].amount}
        auth = await self.authorization(tx, rows, compensates)
        if auth is None or "void" in rows:
            return {"refunded": 0}
        # Even with nothing captured this goes to the provider: refunding an uncaptured
        # authorization releases the hold (the route when a void was refused).
        receipt = await _call(self.provider.refund(key, authorization=auth.provider_ref))
        await self.record(tx, order_id, "refund", receipt.amount, receipt.authorization)
        return {"refunded": receipt.amount}

    async def credit_note(
        self, tx: Tx, order_id: str, *, compensates: str | None
    ) -> dict[str, Any]:
        """Credit what was taken and not given back (the last rung before a person)."""
        rows = await ledger(tx, order_id)
        if "credit" in rows:
            return {"credited": rows["credit"].amount, "credit_note": rows["credit"].provider_ref}
        auth = await self.authorization(tx, rows, compensates)
        if auth is None:
            return {"credited": 0}
        if not rows.keys() & {"capture", "void", "refund"}:
            # Money is still held on the card and only the provider can release it; a
            # credit note would pay the customer while the hold stays: a person decides.
            raise StepFailed(
                f"the card hold of order {order_id} is still open at the provider "
                "(void and refund refused); it needs a person"
            )
        taken = rows["capture"].amount if "capture" in rows else 0
        given_back = rows["refund"].amount if "refund" in rows else 0
        owed = taken - given_back
        if owed <= 0:
            return {"credited": 0}
        ref = f"credit-note-{order_id}"
        await self.record(tx, order_id, "credit", owed, ref)
        return {"credited": owed, "credit_note": ref}


def build_payment(store: Any, provider: FakeCardProvider) -> Participant:
    """The payment participant on ``store`` (its tables: :data:`MIGRATIONS`)."""
    p = Participant(NAME, store)
    ops = PaymentOps(provider, lambda: p.clock())
    record = ops.record

    @p.handles("AuthorizePayment")
    async def authorize(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        amount = _amount(cmd)
        currency = _text(cmd, "currency")
        card = _token(cmd, "card")
        return await ops.authorize(
            tx,
            order_id,
            amount=amount,
            currency=currency,
            card=card,
            key=_key(cmd, order_id, "authorize"),
        )

    @p.handles("CapturePayment")
    async def capture(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        return await ops.capture(tx, order_id, key=_key(cmd, order_id, "capture"))

    @p.handles("VoidAuthorization")
    async def void(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        return await ops.void(
            tx, order_id, key=_key(cmd, order_id, "void"), compensates=cmd.compensates
        )

    @p.handles("RefundPayment")
    async def refund(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        order_id = _text(cmd, "order_id")
        return await ops.refund(
            tx, order_id, key=_key(cmd, order_id, "refund"), compensates=cmd.compensates
        )

    @p.handles("IssueCreditNote")
    async def credit_note(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        return await ops.credit_note(tx, _text(cmd, "order_id"), compensates=cmd.compensates)

    @p.handles("GetPaymentStatus")
    async def status(tx: Tx, cmd: Envelope) -> dict[str, Any]:
        """A query: what became of the action under the payload's ``action_key``.

        The saga asks when an action's outcome is unknown. The answer follows sagakit's
        status protocol: ``{"state": "done", "result": {...}}`` (with the result the
        action itself would have returned), ``{"state": "failed", "reason": ...}`` or
        ``{"state": "not_found"}``. The answer recorded under the key comes first; with
        none, the provider is asked, because it keeps what it did under the key even
        when this service never recorded it (a provider timeout after it succeeded:
        the handler failed and its transaction kept no ledger row). Such an effect is
        written to the ledger now, so that the next steps (a capture, a void) find it:
        that is bookkeeping of what already happened, not a new effect.

        Without ``action_key`` it answers what the ledger holds for the order, by
        operation (an operator's view).
        """
        order_id = _text(cmd, "order_id")
        action_key = cmd.payload.get("action_key")
        if action_key is None:
            rows = await ledger(tx, order_id)
            return {op: {"amount": r.amount, "ref": r.provider_ref} for op, r in rows.items()}
        if not isinstance(action_key, str) or not action_key:
            raise StepFailed(f"GetPaymentStatus: 'action_key' must be a key, got {action_key!r}")
        recorded = await tx.idempotency_get(p.name, action_key)
        if recorded is not None:
            if recorded.tombstone:
                # Compensated before it arrived: the action is refused whenever it comes.
                return {"state": "failed", "reason": COMPENSATED_FIRST}
            outcome = Outcome.from_payload(recorded.outcome)
            if outcome.ok:
                return {"state": "done", "result": outcome.result}
            return {"state": "failed", "reason": outcome.reason}
        try:
            receipt = await provider.lookup(action_key)
        except (ProviderTimeout, ProviderUnavailable) as exc:
            # The question went unanswered too: the saga asks again, then a person decides.
            raise _transient(exc) from exc
        if receipt is None or receipt.order_id != order_id:
            # Never reached the provider, or only met transient failures there: nothing
            # happened. (A definite refusal is recorded under the key, found above.)
            return {"state": "not_found"}
        rows = await ledger(tx, order_id)
        if receipt.op == "authorize":
            if "authorize" not in rows:
                await record(tx, order_id, "authorize", receipt.amount, receipt.authorization)
            return {
                "state": "done",
                "result": {"authorization": receipt.authorization, "amount": receipt.amount},
            }
        if receipt.op == "capture":
            if "capture" not in rows:
                await record(tx, order_id, "capture", receipt.amount, receipt.authorization)
            return {"state": "done", "result": {"captured": receipt.amount}}
        raise StepFailed(f"GetPaymentStatus: key {action_key!r} is a {receipt.op}, not an action")

    return p


async def _call(request: Awaitable[Receipt]) -> Receipt:
    """Await a provider request, turning its errors into step outcomes."""
    try:
        receipt = await request
    except OperationRefused as exc:
        raise StepFailed(str(exc)) from exc
    except (ProviderTimeout, ProviderUnavailable) as exc:
        raise _transient(exc) from exc
    return receipt


def _transient(exc: Exception) -> StepFailed:
    # Retryable: the runtime records no answer, so the next attempt calls the provider
    # again with the same key and gets the recorded effect (or the first real one).
    return StepFailed(f"card provider did not answer: {exc}", retryable=True)


def _key(cmd: Envelope, order_id: str, op: str) -> str:
    return cmd.idempotency_key or f"payment:{order_id}:{op}"


def _text(cmd: Envelope, name: str) -> str:
    value = cmd.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{cmd.type}: {name!r} must be a non-empty string, got {value!r}")
    return value


def _token(cmd: Envelope, name: str) -> str:
    value = _text(cmd, name)
    if not _TOKEN.match(value):
        raise StepFailed(f"{cmd.type}: {name!r} must be a token, never personal data")
    return value


def _amount(cmd: Envelope) -> int:
    value = cmd.payload.get("amount")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise StepFailed(
            f"{cmd.type}: 'amount' must be a positive integer in minor units, got {value!r}"
        )
    return value
