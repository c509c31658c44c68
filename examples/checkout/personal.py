"""Personal data lives only in the service that owns it; everything else carries tokens.

The order service keeps ``customers`` (token -> name, e-mail, postal address), the
payment service keeps ``card_vault`` (token -> card number). Commands, events,
replies, saga data, history and logs carry the opaque tokens ``cust-...``,
``addr-...`` and ``card-...``, which the message schemas require (an e-mail or a card
number does not match them). Tokens are random: they reveal nothing and cannot be
reversed without the owning service's table. The saga definitions declare those three
fields personal (``sagas.PERSONAL``: ``"refuse"``), so the engine itself refuses a
start that holds anything but a token there, whoever calls it.

A card token's middle words are the fake provider's behaviour flags (``card-ok-...``,
``card-decline-...``), as for the demo's made-up tokens.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

CUSTOMERS_NAMESPACE = "checkout.order.customers"
CUSTOMERS_MIGRATIONS: list[str] = [
    """
    CREATE TABLE customers (
        customer_token TEXT NOT NULL PRIMARY KEY,
        address_token  TEXT NOT NULL UNIQUE,
        name           TEXT NOT NULL,
        email          TEXT NOT NULL,
        address        TEXT NOT NULL,
        created_at     DOUBLE PRECISION NOT NULL
    );
    """,
]
"""The order service's table of customers (apply to the order store)."""

VAULT_NAMESPACE = "checkout.payment.vault"
VAULT_MIGRATIONS: list[str] = [
    """
    CREATE TABLE card_vault (
        card_token TEXT NOT NULL PRIMARY KEY,
        number     TEXT NOT NULL,
        last4      TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
]
"""The payment service's card vault (apply to the payment store)."""


@dataclass(frozen=True, slots=True)
class Customer:
    """What a customer types in at checkout: personal data."""

    name: str
    email: str
    address: str

    def __repr__(self) -> str:  # never print personal data by accident
        return "Customer(<personal data>)"


async def migrate_personal(order_store: Any, payment_store: Any) -> None:
    """Create the customers table (order) and the card vault (payment)."""
    await order_store.apply_migrations(CUSTOMERS_NAMESPACE, CUSTOMERS_MIGRATIONS)
    await payment_store.apply_migrations(VAULT_NAMESPACE, VAULT_MIGRATIONS)


async def register_customer(order_store: Any, customer: Customer, now: float) -> tuple[str, str]:
    """Keep the customer in the order service; return ``(customer_token, address_token)``."""
    # "addr-ok-": a bare hex token starts with "bad" once in 4,096, and the fake carrier
    # refuses every address starting "addr-bad" (the demo's behaviour flags).
    token, address = f"cust-{secrets.token_hex(8)}", f"addr-ok-{secrets.token_hex(8)}"
    async with order_store.transaction() as tx:
        await tx.execute(
            "INSERT INTO customers (customer_token, address_token, name, email, address, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (token, address, customer.name, customer.email, customer.address, now),
        )
    return token, address


async def vault_card(payment_store: Any, number: str, now: float, *, flags: str = "ok") -> str:
    """Keep the card number in the payment service's vault; return its token."""
    digits = "".join(ch for ch in number if ch.isdigit())
    if not 12 <= len(digits) <= 19:
        raise ValueError("a card number has 12 to 19 digits")
    token = f"card-{flags}-{secrets.token_hex(8)}"
    async with payment_store.transaction() as tx:
        await tx.execute(
            "INSERT INTO card_vault (card_token, number, last4, created_at) VALUES (?, ?, ?, ?)",
            (token, digits, digits[-4:], now),
        )
    return token


OWNED_TABLES = {"order": ("customers",), "payment": ("card_vault",)}
"""Where personal data may be, by service store: nowhere else."""
