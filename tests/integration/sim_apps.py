"""Small apps for the simulator's ``--app`` path (tests/integration/test_simulator_apps.py).

``tally``: a purchase debits a customer's account, then the shop sells (and refuses
amounts over 100: the debit is refunded). The shop prints a receipt for each sale by a
periodic job, ten seconds after the sale (its ``due`` says when). Invariants: every
account's balance is its opening balance minus its net entries and never negative (at
every moment: ``watch``); at the end, a sale for every SUCCEEDED purchase, a refund for
every COMPENSATED one that was debited, and a receipt for every sale.

Each planted bug is a flag of the same code: ``double_refund`` (the refund credits the
amount twice), ``negative`` (the debit does not check the balance), ``no_receipts``
(the receipt job prints nothing).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from sagakit import App, RetryPolicy, SagaDefinition, Step, StepFailed, command, now
from sagakit.deployment import Deployment
from sagakit.testing.app_checks import settled_by_hand

OPENING = 300
ACCOUNTS = ("acct-a", "acct-b")


def build(bug: str | None = None) -> App:
    """The tally app, with ``bug`` planted (None: correct)."""
    purchase = SagaDefinition(
        "purchase",
        [
            Step(
                "debit",
                command("account", "Debit", lambda v: {**v.data}),
                command("account", "Refund", lambda v: {**v.data}),
                retry=RetryPolicy(max_attempts=3, initial_backoff=0.5),
                timeout=2.0,
                status="PAYING",
            ),
            Step(
                "sell",
                command("shop", "Sell", lambda v: {**v.data}),
                kind="pivot",
                retry=RetryPolicy(max_attempts=3, initial_backoff=0.5),
                timeout=2.0,
                status="SELLING",
            ),
        ],
        deadline=120.0,
    )
    account = _account(bug)
    shop = _shop(bug)
    return App(
        "tally",
        [purchase],
        services=[account, shop],
        load=load,
        setup=setup,
        invariants=invariants,
        watch=watch,
    )


def _account(bug: str | None) -> Any:
    from sagakit import Service

    svc = Service(
        "account",
        migrations=[
            "CREATE TABLE accounts (id TEXT NOT NULL PRIMARY KEY, opening BIGINT NOT NULL, "
            "balance BIGINT NOT NULL)",
            "CREATE TABLE entries (key TEXT NOT NULL PRIMARY KEY, account TEXT NOT NULL, "
            "purchase TEXT NOT NULL, amount BIGINT NOT NULL, kind TEXT NOT NULL)",
        ],
    )

    @svc.handles("Debit")
    async def debit(tx: Any, env: Any) -> dict[str, Any]:
        p = env.payload
        cond = "" if bug == "negative" else " AND balance >= ?"
        args: tuple[Any, ...] = (p["amount"], p["account"])
        if bug != "negative":
            args += (p["amount"],)
        changed = await tx.execute(
            f"UPDATE accounts SET balance = balance - ? WHERE id = ?{cond}", args
        )
        if not changed:
            raise StepFailed("insufficient funds")
        await tx.execute(
            "INSERT INTO entries (key, account, purchase, amount, kind) "
            "VALUES (?, ?, ?, ?, 'debit')",
            (env.idempotency_key, p["account"], env.business_key, p["amount"]),
        )
        return {}

    @svc.handles("Refund")
    async def refund(tx: Any, env: Any) -> dict[str, Any]:
        rows = await tx.fetchall(
            "SELECT account, amount FROM entries WHERE key = ? AND kind = 'debit'",
            (env.compensates,),
        )
        if not rows:
            return {}  # the debit never happened: nothing to give back
        account, amount = rows[0]
        times = 2 if bug == "double_refund" else 1
        await tx.execute(
            "UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount * times, account)
        )
        await tx.execute(
            "INSERT INTO entries (key, account, purchase, amount, kind) "
            "VALUES (?, ?, ?, ?, 'refund')",
            (env.idempotency_key, account, env.business_key, -amount),
        )
        return {}

    return svc


def _shop(bug: str | None) -> Any:
    from sagakit import Service

    svc = Service(
        "shop",
        migrations=[
            "CREATE TABLE sales (purchase TEXT NOT NULL PRIMARY KEY, amount BIGINT NOT NULL, "
            "sold_at DOUBLE PRECISION NOT NULL, receipt_at DOUBLE PRECISION)",
        ],
    )

    @svc.handles("Sell")
    async def sell(tx: Any, env: Any) -> dict[str, Any]:
        if env.payload["amount"] > 100:
            raise StepFailed("the shop sells nothing over 100")
        await tx.execute(
            "INSERT INTO sales (purchase, amount, sold_at) VALUES (?, ?, ?)",
            (env.business_key, env.payload["amount"], now()),
        )
        return {}

    async def next_receipt(store: Any) -> float | None:
        async with store.transaction() as tx:
            rows = await tx.fetchall("SELECT min(sold_at) FROM sales WHERE receipt_at IS NULL")
        return None if rows[0][0] is None else float(rows[0][0]) + 10.0

    @svc.every(60.0, "receipts", due=next_receipt)
    async def receipts(store: Any) -> int:
        if bug == "no_receipts":
            return 0
        async with store.transaction() as tx:
            return int(
                await tx.execute(
                    "UPDATE sales SET receipt_at = ? WHERE receipt_at IS NULL AND sold_at <= ?",
                    (now(), now() - 10.0),
                )
            )

    return svc


def load(count: int, seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    """``count`` purchases from the two accounts, some over 100 (refused by the shop),
    together more than an account holds (some are refused for funds)."""
    rng = random.Random(seed)
    return [
        (
            "purchase",
            f"p-{seed}-{i}",
            {"account": rng.choice(ACCOUNTS), "amount": rng.choice([40, 90, 120, 250])},
        )
        for i in range(count)
    ]


async def setup(dep: Deployment) -> None:
    """Open the accounts (idempotently)."""
    async with dep.store("account").transaction() as tx:
        for a in ACCOUNTS:
            await tx.execute(
                "INSERT INTO accounts (id, opening, balance) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (a, OPENING, OPENING),
            )


async def watch(dep: Deployment) -> Sequence[str]:
    """Balances agree with the entries and are never negative."""
    problems: list[str] = []
    async with dep.store("account").transaction() as tx:
        accounts = await tx.fetchall("SELECT id, opening, balance FROM accounts")
        net = dict(await tx.fetchall("SELECT account, sum(amount) FROM entries GROUP BY account"))
    for a, opening, balance in accounts:
        if balance < 0:
            problems.append(f"account {a} is negative: {balance}")
        if balance != opening - int(net.get(a, 0)):
            problems.append(
                f"account {a}: balance {balance} but opening {opening} minus entries "
                f"{int(net.get(a, 0))}"
            )
    return problems


async def invariants(dep: Deployment) -> Sequence[str]:
    """A sale per SUCCEEDED purchase, a receipt per sale, no debit kept by a purchase
    that was compensated."""
    from sagakit.testing.app_checks import sagas_by_key

    problems: list[str] = []
    sagas = await sagas_by_key(dep, "purchase")
    by_hand = await settled_by_hand(dep, "purchase")
    async with dep.store("shop").transaction() as tx:
        sales = {r[0]: r[1] for r in await tx.fetchall("SELECT purchase, receipt_at FROM sales")}
    async with dep.store("account").transaction() as tx:
        net = dict(await tx.fetchall("SELECT purchase, sum(amount) FROM entries GROUP BY purchase"))
    for key, saga in sagas.items():
        if key in by_hand or saga.state.value == "FAILED_NEEDS_MANUAL":
            continue
        if saga.state.value == "SUCCEEDED" and key not in sales:
            problems.append(f"purchase {key} SUCCEEDED without a sale")
        if saga.state.value in ("COMPENSATED", "TIMED_OUT") and net.get(key, 0):
            problems.append(f"purchase {key} {saga.state.value} but keeps {net[key]} debited")
    for key, receipt_at in sales.items():
        if receipt_at is None:
            problems.append(f"sale {key} has no receipt")
    return problems


app = build()
double_refund = build("double_refund")
negative = build("negative")
no_receipts = build("no_receipts")
