"""The app's invariants, read from the services' own ledgers: what the providers
delivered, what the orders service placed and holds.

At every moment (:func:`watch`; the simulator checks after each of its steps, the
demo every fraction of a second):

* ``at_most_once``: no customer ever got two of the same notification for an order
  (read from the fake providers' delivery logs, which is what a retry without the
  idempotency key breaks: the engine's own "effect once per key" check cannot see it);
* ``only_placed``: nothing is sent for an order that was not placed;
* ``stock``: the orders service's counters match its holds and sales.

At the end of a run (:func:`invariants`), saga by saga:

* ``notified``: a SUCCEEDED saga's order is placed and its customer got exactly one
  e-mail and one SMS;
* ``undone``: a compensated or timed-out saga placed nothing, holds nothing and sent
  nothing;
* ``orphan``: every placed order has its saga.

A saga in the manual queue, or one a person decided on (marked a step done, undid it,
accepted it as it stands), is the person's: the end-of-run checks leave it out, but the
checks of every moment hold for it too (it sent at most one of each).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from sagakit import SagaInstance, SagaState
from sagakit.testing.app_checks import sagas_by_key

from .sagas import NAME

if TYPE_CHECKING:
    from sagakit import Deployment

CHANNELS = {"email": "confirmation e-mail", "sms": "SMS"}
"""The notification services and what their messages are."""

AUTOMATIC = frozenset({"retry"})
"""A person's decisions after which the engine carries on by itself (the books must
then match the saga's end as if nobody had stepped in)."""


async def _deliveries(dep: Deployment) -> dict[str, list[tuple[str, str, str]]]:
    """Channel -> ``(order, customer, message id)`` of every message that reached a
    customer, each service read in one transaction."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for channel in CHANNELS:
        async with dep.store(channel).snapshot() as tx:
            rows = await tx.fetchall(
                "SELECT order_id, customer, message_id FROM provider_deliveries "
                "ORDER BY order_id, message_id"
            )
        out[channel] = [(str(o), str(c), str(m)) for o, c, m in rows]
    return out


async def _orders(dep: Deployment) -> tuple[dict[str, str], list[str]]:
    """The placed orders (order -> customer) and the broken stock counters, read in one
    transaction of the orders service."""
    async with dep.store("orders").snapshot() as tx:
        placed = await tx.fetchall("SELECT order_id, customer FROM orders")
        stock = await tx.fetchall("SELECT sku, total, held, sold FROM stock ORDER BY sku")
        holds = await tx.fetchall(
            "SELECT sku, status, SUM(qty) FROM reservations GROUP BY sku, status"
        )
        unsold = await tx.fetchall(
            "SELECT o.order_id FROM orders o LEFT JOIN reservations r "
            "ON r.order_id = o.order_id AND r.status = 'SOLD' WHERE r.order_id IS NULL"
        )
    by_status: dict[tuple[str, str], int] = {(s, st): int(q) for s, st, q in holds}
    problems = []
    for sku, total, held, sold in stock:
        want_held, want_sold = by_status.get((sku, "HELD"), 0), by_status.get((sku, "SOLD"), 0)
        if (int(held), int(sold)) != (want_held, want_sold) or int(held) + int(sold) > int(total):
            problems.append(
                f"stock: {sku} counts {held} held and {sold} sold of {total}; its "
                f"reservations say {want_held} held and {want_sold} sold"
            )
    problems += [f"stock: order {o} is placed without the sale of its hold" for (o,) in unsold]
    return {str(o): str(c) for o, c in placed}, problems


async def decided_by_person(dep: Deployment, sagas: dict[str, SagaInstance]) -> set[str]:
    """The orders whose saga a person decided on other than by a plain retry."""
    store = dep.store("orchestrator")
    keys = set()
    for key, inst in sagas.items():
        for entry in await store.history(inst.saga_id):
            if entry.event == "manual.resolved" and entry.detail.get("action") not in AUTOMATIC:
                keys.add(key)
                break
    return keys


# --8<-- [start:watch]
async def watch(dep: Deployment) -> list[str]:
    """The checks that hold at every moment (see the module docstring)."""
    # Downstream first: a message goes out only after its order was placed, so the
    # deliveries read before the orders can only show orders already placed.
    sent = await _deliveries(dep)
    placed, problems = await _orders(dep)
    for channel, rows in sent.items():
        what = CHANNELS[channel]
        per_order = Counter(order for order, _, _ in rows)
        # One message per order, however often it happens: the demo keeps each distinct
        # message once.
        problems += [
            f"at_most_once: the customer of {order} got the {what} more than once"
            for order, n in sorted(per_order.items())
            if n > 1
        ]
        stray = sorted(o for o in per_order if o not in placed)
        if stray:
            # Unless a person marked the placement done by hand (and sent it on).
            by_hand = await decided_by_person(dep, await sagas_by_key(dep, NAME))
            problems += [
                f"only_placed: a {what} was sent for {order}, which is not placed"
                for order in stray
                if order not in by_hand
            ]
    return problems


# --8<-- [end:watch]


async def invariants(dep: Deployment) -> list[str]:
    """The checks of a finished run, saga by saga (see the module docstring)."""
    sagas = await sagas_by_key(dep, NAME)
    person = await decided_by_person(dep, sagas)
    sent = await _deliveries(dep)
    placed, _ = await _orders(dep)
    async with dep.store("orders").snapshot() as tx:
        held = {
            str(o)
            for (o,) in await tx.fetchall("SELECT order_id FROM reservations WHERE status = 'HELD'")
        }
    received: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for channel, rows in sent.items():
        for order, customer, _ in rows:
            received[order][channel].append(customer)
    problems: list[str] = []
    for key, inst in sorted(sagas.items()):
        if inst.state is SagaState.FAILED_NEEDS_MANUAL or key in person:
            continue
        got = received.get(key, {})
        state = inst.state.value
        if inst.state is SagaState.SUCCEEDED:
            if key not in placed:
                problems.append(f"notified: {key} is {state} but its order is not placed")
            for channel, what in CHANNELS.items():
                to = got.get(channel, [])
                if to != [inst.data["customer"]]:
                    problems.append(
                        f"notified: {key} is {state} and its customer got {len(to)} {what}s"
                        + ("" if set(to) <= {inst.data["customer"]} else " (to someone else)")
                    )
        elif inst.state in (SagaState.COMPENSATED, SagaState.TIMED_OUT):
            if key in placed:
                problems.append(f"undone: {key} is {state} but its order is placed")
            if key in held:
                problems.append(f"undone: {key} is {state} but still holds stock")
            for channel, what in CHANNELS.items():
                if got.get(channel):
                    problems.append(f"undone: {key} is {state} but a {what} was sent")
    problems += [
        f"orphan: order {o} is placed without a saga" for o in sorted(placed) if o not in sagas
    ]
    return problems
