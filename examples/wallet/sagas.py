"""The transfer saga: a customer pays a merchant from a wallet; the bank pays it on.

debit_wallet -> credit_merchant -> order_transfer -> initiate_transfer (the pivot: the
money leaves the bank) -> confirm_settlement.

Before the pivot each step has a compensation: RefundWallet, ReverseCredit,
CancelTransfer. The payment order is booked before it is released so that an undo
reaches the bank too: once an order is cancelled, no release can send it, and once it
is released, its cancellation is refused for good and the saga stops for a person
instead of giving the money back while it left. After the pivot the settlement is
retried until it is booked, and when its answer does not come the saga asks the bank
with a status query; then a person decides.
"""

from __future__ import annotations

from typing import Any

from sagakit import PersonalField, RetryPolicy, SagaDefinition, SagaView, Step, StepKind, command

TRANSFER = "transfer"
"""The saga's name."""

COMMAND_TIMEOUT = 2.0
"""Seconds the first try of a command waits for its answer; later tries wait longer."""
DEADLINE = 15.0
"""The payment's SLA in seconds, as for an instant payment: past it before the money
left, the transfer is called off (TIMED_OUT); after, a person looks."""

RETRY = RetryPolicy(
    max_attempts=5,
    initial_backoff=0.1,
    max_backoff=2.0,
    timeout_multiplier=2.0,
    max_timeout=16.0,
)
"""Steps before the pivot and the compensations."""
FORWARD = RetryPolicy(
    max_attempts=6,
    initial_backoff=0.2,
    max_backoff=4.0,
    timeout_multiplier=2.0,
    max_timeout=16.0,
)
"""The release of the transfer: patient, and asked about when its answer never comes."""
SETTLE = RetryPolicy(
    max_attempts=4,
    initial_backoff=0.2,
    max_backoff=2.0,
    timeout_multiplier=2.0,
    max_timeout=16.0,
)
"""The settlement: a few tries, then the status query, then a person."""


def _debit(v: SagaView) -> dict[str, Any]:
    return {"payment": v.business_key, "wallet": v.data["wallet"], "amount": v.data["amount"]}


def _credit(v: SagaView) -> dict[str, Any]:
    return {"payment": v.business_key, "merchant": v.data["merchant"], "amount": v.data["amount"]}


def _order(v: SagaView) -> dict[str, Any]:
    return {
        "payment": v.business_key,
        "merchant": v.data["merchant"],
        "account": v.data["account"],
        "amount": v.data["amount"],
    }


def _ref(v: SagaView) -> dict[str, Any]:
    return {"payment": v.business_key}


# --8<-- [start:definition]
def transfer_definition(
    *, deadline: float = DEADLINE, timeout: float = COMMAND_TIMEOUT
) -> SagaDefinition:
    """The transfer saga, version 1."""
    return SagaDefinition(
        TRANSFER,
        version=1,
        deadline=deadline,
        started_status="PENDING",
        completed_status="SETTLED",
        # The wallet and the merchant's bank account are tokens of the services that own
        # the customer's and the merchant's details.
        personal={
            "wallet": PersonalField("refuse", kind="wal"),
            "account": PersonalField("refuse", kind="acct"),
        },
        steps=[
            Step(
                "debit_wallet",
                command("wallet", "DebitWallet", _debit),
                command("wallet", "RefundWallet", _ref),
                timeout=timeout,
                retry=RETRY,
            ),
            Step(
                "credit_merchant",
                command("merchant", "CreditMerchant", _credit),
                command("merchant", "ReverseCredit", _ref),
                timeout=timeout,
                retry=RETRY,
            ),
            Step(
                "order_transfer",
                command("bank", "OrderTransfer", _order),
                command("bank", "CancelTransfer", _order),
                status="SCREENING",
                timeout=timeout,
                retry=RETRY,
            ),
            Step(
                "initiate_transfer",
                command("bank", "InitiateTransfer", _ref),
                kind=StepKind.PIVOT,
                status="SENDING",
                status_query=command("bank", "GetTransferStatus", _ref),
                timeout=timeout,
                retry=FORWARD,
            ),
            Step(
                "confirm_settlement",
                command("bank", "ConfirmSettlement", _ref),
                kind=StepKind.RETRIABLE,
                status="SETTLING",
                status_query=command("bank", "GetSettlementStatus", _ref),
                timeout=timeout,
                retry=SETTLE,
            ),
        ],
    )


# --8<-- [end:definition]
