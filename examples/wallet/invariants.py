"""The wallet app's invariants, read from the services' own ledgers.

:func:`watch` holds at every moment, in the spirit of Jepsen's bank test: the money in
the wallets, at the merchants and in flight between them always adds up to what the
wallets and merchants opened with; no balance is negative; each balance is what its
ledger says; no transfer is settled twice; and what a downstream ledger shows happened
upstream first. :func:`invariants` checks the end of a run, saga by saga.

The stores are read one transaction each, so a check must hold whatever commits between
two reads (``sagakit demo`` runs it while the services work):

* each store's own facts (a balance is its opening minus its net entries) are read in
  one transaction and hold exactly;
* the sum over wallets, merchants and money in flight holds exactly too: it is the sum
  of two per-store identities (the wallets plus what they paid out equal their
  openings; the merchants minus what they took in equal theirs);
* a fact across stores is read downstream first: the bank, then the merchant, then the
  wallet (what the bank shows, the merchant had credited before; what the merchant
  shows, the wallet had debited before); an undo runs the other way, so "the wallet gave
  the money back" is compared with the merchant's ledger read *after* the wallet's.

In the simulator nothing moves between reads, so the same checks are exact there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagakit import SagaState
from sagakit.testing.app_checks import sagas_by_key, settled_by_hand

from .bank import LEFT
from .sagas import TRANSFER

if TYPE_CHECKING:
    from sagakit import Deployment


@dataclass(slots=True)
class Books:
    """One store's accounts and ledger, as one transaction read them."""

    opening: dict[str, int] = field(default_factory=dict)
    balance: dict[str, int] = field(default_factory=dict)
    entries: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    """(payment, kind) -> (account, amount)."""

    def amount(self, payment: str, kind: str) -> int:
        """The amount of the payment's entry of ``kind`` (0 when there is none)."""
        entry = self.entries.get((payment, kind))
        return 0 if entry is None else entry[1]

    def net(self, out: str, back: str) -> int:
        """Total of the ``out`` entries minus the ``back`` ones."""
        return sum(
            a if k == out else -a for (_, k), (_, a) in self.entries.items() if k in (out, back)
        )


@dataclass(frozen=True, slots=True)
class Transfer:
    """A row of the bank's ``transfers``."""

    payment: str
    amount: int
    state: str
    settlements: int


async def _books(dep: Deployment, store: str, table: str, key: str, entries: str) -> Books:
    books = Books()
    async with dep.store(store).snapshot() as tx:
        for account, opening, balance in await tx.fetchall(
            f"SELECT {key}, opening, balance FROM {table}"
        ):
            books.opening[account] = int(opening)
            books.balance[account] = int(balance)
        for payment, kind, account, amount in await tx.fetchall(
            f"SELECT payment, kind, {key}, amount FROM {entries}"
        ):
            books.entries[(payment, kind)] = (account, int(amount))
    return books


async def _wallets(dep: Deployment) -> Books:
    return await _books(dep, "wallet", "wallets", "wallet_id", "wallet_entries")


async def _merchants(dep: Deployment) -> Books:
    return await _books(dep, "merchant", "merchants", "merchant_id", "merchant_entries")


async def _transfers(dep: Deployment) -> dict[str, Transfer]:
    async with dep.store("bank").snapshot() as tx:
        rows = await tx.fetchall("SELECT payment, amount, state, settlements FROM transfers")
    return {r[0]: Transfer(r[0], int(r[1]), str(r[2]), int(r[3])) for r in rows}


def _ledger(books: Books, name: str, out: str, back: str, sign: int) -> list[str]:
    """A store's own facts: balances never negative and equal to the ledger's account
    (``sign``: what an ``out`` entry does to a balance, +1 or -1; a ``back`` one the
    opposite)."""
    problems: list[str] = []
    moved: dict[str, int] = {}
    for (payment, kind), (account, amount) in books.entries.items():
        moved[account] = moved.get(account, 0) + (sign if kind == out else -sign) * amount
        if kind == back:
            first = books.entries.get((payment, out))
            if first is None or first != (account, amount):
                problems.append(f"ledger: {name} booked a {back} of {payment} without its {out}")
    for account, balance in sorted(books.balance.items()):
        if balance < 0:
            problems.append(f"negative: {name} {account} has a balance of {balance}")
        expected = books.opening[account] + moved.get(account, 0)
        if balance != expected:
            problems.append(f"ledger: {name} {account} holds {balance}, its ledger says {expected}")
    return problems


# --8<-- [start:watch]
async def watch(dep: Deployment) -> list[str]:
    """The checks that hold at every moment (see the module docstring)."""
    transfers = await _transfers(dep)  # downstream first: the bank,
    merchants = await _merchants(dep)  # then the merchant,
    wallets = await _wallets(dep)  # then the wallet,
    after = await _merchants(dep)  # and the merchant again, for what was undone.
    problems = _ledger(wallets, "wallet", "debit", "refund", -1)
    problems += _ledger(merchants, "merchant", "credit", "reversal", +1)

    opening = sum(wallets.opening.values()) + sum(merchants.opening.values())
    held = sum(wallets.balance.values()) + sum(merchants.balance.values())
    in_flight = wallets.net("debit", "refund") - merchants.net("credit", "reversal")
    if held + in_flight != opening:
        problems.append(
            f"conservation: wallets and merchants hold {held} and {in_flight} is in flight, "
            f"but they opened with {opening}"
        )

    for t in sorted(transfers.values(), key=lambda t: t.payment):
        if t.settlements > 1:
            problems.append(
                f"settled twice: transfer {t.payment} was settled {t.settlements} times"
            )
        if (t.settlements == 1) != (t.state == "settled"):
            problems.append(
                f"settlement: transfer {t.payment} is {t.state} with {t.settlements} settlements"
            )
        if t.state in LEFT and merchants.amount(t.payment, "credit") != t.amount:
            problems.append(
                f"unbacked: {t.amount} left the bank for {t.payment}, which the merchant "
                f"credited {merchants.amount(t.payment, 'credit')}"
            )
    for (payment, kind), (_, amount) in sorted(merchants.entries.items()):
        if kind == "credit" and wallets.amount(payment, "debit") != amount:
            problems.append(
                f"unbacked: the merchant credited {amount} for {payment}, the wallet debited "
                f"{wallets.amount(payment, 'debit')}"
            )
    refunded = {p for (p, kind) in wallets.entries if kind == "refund"}
    doubled = sorted(p for p in refunded if _standing(after, p, "credit", "reversal"))
    if doubled:
        # Unless a person vouched for it (marked the reversal done by hand): read after
        # the ledgers, so a vouching that let the refund run is seen.
        by_hand = await settled_by_hand(dep, TRANSFER)
        problems += [
            f"given back twice: the wallet refunded {p} while the merchant keeps its credit"
            for p in doubled
            if p not in by_hand
        ]
    return problems


# --8<-- [end:watch]


def _standing(books: Books, payment: str, out: str, back: str) -> bool:
    """True when the payment's ``out`` entry is there and not undone."""
    return (payment, out) in books.entries and (payment, back) not in books.entries


async def invariants(dep: Deployment) -> list[str]:
    """The checks of a run's end, saga by saga, from the ledgers.

    A saga a person vouched for, or one waiting in the manual queue, is the person's:
    its books are left out here (the conservation checks of :func:`watch` hold for it
    too).
    """
    sagas = await sagas_by_key(dep, TRANSFER)
    by_hand = await settled_by_hand(dep, TRANSFER)
    transfers = await _transfers(dep)
    merchants = await _merchants(dep)
    wallets = await _wallets(dep)
    problems: list[str] = []
    payments = {p for p, _ in wallets.entries} | {p for p, _ in merchants.entries}
    problems += [
        f"books: {p} is in the ledgers but no saga paid it" for p in sorted(payments - set(sagas))
    ]
    for key, inst in sorted(sagas.items()):
        if inst.state is SagaState.FAILED_NEEDS_MANUAL or key in by_hand:
            continue
        problems += _saga_books(key, inst.state, inst.data, wallets, merchants, transfers)
    return problems


def _net(books: Books, payment: str, out: str, back: str) -> int:
    return books.amount(payment, out) - books.amount(payment, back)


def _saga_books(
    key: str,
    state: SagaState,
    data: Mapping[str, Any],
    wallets: Books,
    merchants: Books,
    transfers: Mapping[str, Transfer],
) -> Sequence[str]:
    """What the ledgers must show for a saga that ended ``state``."""
    debited = _net(wallets, key, "debit", "refund")
    credited = _net(merchants, key, "credit", "reversal")
    transfer = transfers.get(key)
    left = transfer is not None and transfer.state in LEFT
    if state is SagaState.SUCCEEDED:
        amount = int(data["amount"])
        found = []
        if debited != amount or credited != amount:
            found.append(
                f"books: {key} SUCCEEDED, debited {debited} and credited {credited}, not {amount}"
            )
        if transfer is None or transfer.state != "settled" or transfer.amount != amount:
            shown = "none" if transfer is None else f"{transfer.state} {transfer.amount}"
            found.append(f"books: {key} SUCCEEDED, its transfer is {shown}")
        return found
    if state in (SagaState.COMPENSATED, SagaState.TIMED_OUT):
        found = []
        if debited or credited:
            found.append(
                f"books: {key} {state.value} left its wallet debited {debited} and its "
                f"merchant credited {credited}"
            )
        if left or (transfer is not None and transfer.state in ("review", "ordered")):
            found.append(
                f"books: {key} {state.value}, its transfer is {transfer and transfer.state}"
            )
        return found
    return [f"books: {key} ended {state.value}, which a transfer never does by itself"]
