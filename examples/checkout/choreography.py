"""The checkout as a choreography: no orchestrator, each service reacts to facts.

::

    OrderCreated -> PaymentAuthorized -> InventoryReserved -> ShipmentCreated
                 -> PaymentCaptured -> InventoryCommitted -> OrderCompleted
    PaymentFailed -> OrderCancelled
    InventoryFailed -> PaymentVoided | PaymentRefunded -> OrderCancelled
    ShipmentFailed -> InventoryReleased -> PaymentVoided | PaymentRefunded -> OrderCancelled
    PaymentCaptureFailed, InventoryCommitFailed, OrderCompletionFailed,
    PaymentReleaseFailed -> a person

The services are the same four, on the same tables and ledger functions as the
orchestrated checkout (:mod:`.reactions` holds their event handlers). A passive
:class:`~sagakit.runtime.tracker.Tracker` follows the facts and keeps, per order, the
saga view an orchestrated checkout has (state, status, steps, history, manual queue).

:data:`FLOW` is the declaration table of who publishes what on which fact; ``sagakit
flows`` draws and lints it, and the tests check it against what the handlers emitted.

A fact that every one of its subscribers lost would leave an order that no one knows
is stuck: the tracker builds a view from the first fact it hears, so an order whose
``OrderCreated`` reached neither the payment service nor the tracker would stay CREATED,
with no view to time out. The order service therefore announces an order again (the
same fact, same message id: whoever has it already drops the copy in its inbox) until
the payment service's answer arrives, a few times at most (:func:`announce_again`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagakit import Engine, Participant, SagaState, StepStatus
from sagakit.flows import START, FlowSpec, Publishes
from sagakit.runtime.lockfile import private_dir
from sagakit.runtime.tracker import Fact, TrackedFlow, Tracker
from sagakit.stores.memory import MemoryStore
from sagakit.stores.sqlite import SQLiteStore

from . import inventory, order, payment, reactions, shipping
from .events import REGISTRY
from .personal import migrate_personal
from .provider import FakeCardProvider
from .sagas import DEADLINE

CHOREOGRAPHY = "checkout-choreography"
"""The definition name of the tracker's saga views."""
TRACKER = "tracker"
SERVICES = ("order", "payment", "inventory", "shipping")
ANNOUNCE_AFTER = 30.0
"""Seconds without the payment service's answer after which an order is announced again."""
ANNOUNCE_TIMES = 5
"""How many times, the first included, an order is announced at most."""
ANNOUNCE_NAMESPACE = "checkout.choreography.order"
ANNOUNCE_MIGRATIONS = [
    """
    CREATE TABLE order_announcements (
        order_id     TEXT NOT NULL PRIMARY KEY,
        payload      TEXT NOT NULL,
        announced_at DOUBLE PRECISION NOT NULL,
        times        INTEGER NOT NULL
    );
    """,
]
"""The order service's record of each ``OrderCreated`` it announced (payload: tokens only)."""

FLOW = FlowSpec(
    name="checkout-choreography",
    declarations=(
        Publishes("order", START, ("OrderCreated",)),
        Publishes("payment", "OrderCreated", ("PaymentAuthorized", "PaymentFailed")),
        Publishes("order", "PaymentAuthorized"),
        Publishes("inventory", "PaymentAuthorized", ("InventoryReserved", "InventoryFailed")),
        Publishes("order", "PaymentFailed", ("OrderCancelled",)),
        Publishes("shipping", "InventoryReserved", ("ShipmentCreated", "ShipmentFailed")),
        Publishes(
            "payment",
            "InventoryFailed",
            ("PaymentVoided", "PaymentRefunded", "PaymentReleaseFailed"),
        ),
        Publishes("payment", "ShipmentCreated", ("PaymentCaptured", "PaymentCaptureFailed")),
        Publishes("inventory", "ShipmentFailed", ("InventoryReleased",)),
        Publishes(
            "payment",
            "InventoryReleased",
            ("PaymentVoided", "PaymentRefunded", "PaymentReleaseFailed"),
        ),
        Publishes("inventory", "PaymentCaptured", ("InventoryCommitted", "InventoryCommitFailed")),
        Publishes("order", "InventoryCommitted", ("OrderCompleted", "OrderCompletionFailed")),
        Publishes("order", "PaymentVoided", ("OrderCancelled",)),
        Publishes("order", "PaymentRefunded", ("OrderCancelled",)),
    ),
    terminal=frozenset({"OrderCompleted", "OrderCancelled"}),
    escalated=frozenset(
        {
            "PaymentCaptureFailed",
            "InventoryCommitFailed",
            "OrderCompletionFailed",
            "PaymentReleaseFailed",
        }
    ),
    observers=frozenset({TRACKER}),
)
"""Who publishes what, on which fact (``sagakit flows`` reads it)."""

_OK, _FAILED = StepStatus.SUCCEEDED, StepStatus.FAILED
_UNDONE, _STUCK = StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED


def tracked_flow(sla: float = DEADLINE) -> TrackedFlow:
    """The tracker's view of the checkout: the orchestrated saga's steps and statuses."""
    return TrackedFlow(
        definition=CHOREOGRAPHY,
        steps=(
            "create_order",
            "authorize_payment",
            "reserve_inventory",
            "create_shipment",
            "capture_payment",
            "commit_inventory",
            "complete_order",
        ),
        forward=("PENDING_PAYMENT", "PENDING_INVENTORY", "PENDING_SHIPMENT", "COMPLETING"),
        sla=sla,
        facts={
            "OrderCreated": Fact("create_order", _OK, "PENDING_PAYMENT"),
            "PaymentAuthorized": Fact("authorize_payment", _OK, "PENDING_INVENTORY"),
            "PaymentFailed": Fact("authorize_payment", _FAILED),
            "InventoryReserved": Fact("reserve_inventory", _OK, "PENDING_SHIPMENT"),
            "InventoryFailed": Fact("reserve_inventory", _FAILED),
            "ShipmentCreated": Fact("create_shipment", _OK, "COMPLETING"),
            "ShipmentFailed": Fact("create_shipment", _FAILED),
            "PaymentCaptured": Fact("capture_payment", _OK, "COMPLETING"),
            "PaymentCaptureFailed": Fact("capture_payment", _FAILED, manual=True),
            "InventoryCommitted": Fact("commit_inventory", _OK, "COMPLETING"),
            "InventoryCommitFailed": Fact("commit_inventory", _FAILED, manual=True),
            "OrderCompleted": Fact("complete_order", _OK, ends=SagaState.SUCCEEDED),
            "OrderCompletionFailed": Fact("complete_order", _FAILED, manual=True),
            "InventoryReleased": Fact("reserve_inventory", _UNDONE),
            "PaymentVoided": Fact("authorize_payment", _UNDONE),
            "PaymentRefunded": Fact("authorize_payment", _UNDONE),
            "PaymentReleaseFailed": Fact("authorize_payment", _STUCK, manual=True),
            "OrderCancelled": Fact("create_order", _UNDONE, ends=SagaState.COMPENSATED),
        },
    )


@dataclass(slots=True)
class Choreography:
    """The choreographed checkout: five stores, the provider, five participants."""

    stores: dict[str, Any]
    """``order``, ``payment``, ``inventory``, ``shipping`` and ``tracker``."""
    provider: FakeCardProvider
    participants: list[Participant]
    tracker: Tracker

    @property
    def order(self) -> Participant:
        """The order service (it places orders: :func:`place_orders`)."""
        return self.participants[0]

    def invariant_stores(self) -> dict[str, Any]:
        """Keyword arguments of ``check_invariants``: the tracker's store holds the sagas."""
        return {
            "orchestrator_store": self.stores[TRACKER],
            "order_store": self.stores["order"],
            "payment_store": self.stores["payment"],
            "inventory_store": self.stores["inventory"],
            "shipping_store": self.stores["shipping"],
            "provider": self.provider,
        }

    def engine(self, *, sla_check_every: float = 5.0, **kwargs: Any) -> Engine:
        """An embedded engine: no saga definitions, the tracker's store as the saga store
        (so ``manual_cases`` shows stuck choreographies), the tables migrated before
        start, the tracker's SLA checked and unanswered orders announced again
        (:func:`announce_again`) every ``sla_check_every`` seconds."""
        engine = Engine(self.stores[TRACKER], [], participants=self.participants, **kwargs)
        engine.before_start(lambda: migrate(self))
        engine.every(sla_check_every, "tracker-sla", self.tracker.check_stuck)
        engine.every(sla_check_every, "order-announce", lambda: announce_again(self))
        return engine


def build_choreography(
    stores: Mapping[str, Any],
    provider: FakeCardProvider,
    *,
    sla: float = DEADLINE,
    carrier_down_fraction: float = 0.0,
) -> Choreography:
    """The participants on ``stores`` (not opened): four services and the tracker."""
    tracker = Tracker(TRACKER, stores[TRACKER], tracked_flow(sla), schemas=REGISTRY)
    return Choreography(
        stores=dict(stores),
        provider=provider,
        participants=[
            reactions.order_reactions(stores["order"], schemas=REGISTRY),
            reactions.payment_reactions(stores["payment"], provider, schemas=REGISTRY),
            reactions.inventory_reactions(stores["inventory"], schemas=REGISTRY),
            reactions.shipping_reactions(
                stores["shipping"], schemas=REGISTRY, carrier_down_fraction=carrier_down_fraction
            ),
            tracker,
        ],
        tracker=tracker,
    )


def open_choreography(
    data_dir: str | Path,
    *,
    synchronous: str = "FULL",
    sla: float = DEADLINE,
    carrier_down_fraction: float = 0.0,
) -> Choreography:
    """The choreographed checkout on SQLite files in ``data_dir`` (one per service)."""
    d = Path(data_dir)
    private_dir(d)  # 0700: the databases hold customers and cards
    stores = {
        name: SQLiteStore(d / f"{name}.db", name=name, synchronous=synchronous)
        for name in (*SERVICES, TRACKER)
    }
    return build_choreography(
        stores,
        FakeCardProvider(d / "provider.db"),
        sla=sla,
        carrier_down_fraction=carrier_down_fraction,
    )


async def migrate(ch: Choreography) -> None:
    """Create the business tables and every service's ``choreography_log`` (idempotent)."""
    for name, module in (
        ("order", order),
        ("payment", payment),
        ("inventory", inventory),
        ("shipping", shipping),
    ):
        store = ch.stores[name]
        await store.apply_migrations(module.NAMESPACE, module.MIGRATIONS)
        await store.apply_migrations(reactions.NAMESPACE, reactions.MIGRATIONS)
    await ch.stores["order"].apply_migrations(ANNOUNCE_NAMESPACE, ANNOUNCE_MIGRATIONS)
    await migrate_personal(ch.stores["order"], ch.stores["payment"])


async def place_orders(
    ch: Choreography,
    orders: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    channel: str = "web",
    now: float | None = None,
) -> int:
    """Place orders ``(order_id, data)`` in one order-service transaction; each new order
    emits ``OrderCreated``, which starts its flow. Idempotent by order id; returns how
    many were new. ``now`` (default: the wall clock) is when they were placed."""
    p, created = ch.order, 0
    now = time.time() if now is None else now
    async with p.store.transaction() as tx:
        for order_id, data in orders:
            _, new = await order.create_order(
                tx,
                order_id=order_id,
                customer=data["customer"],
                sku=data["sku"],
                qty=data["qty"],
                amount=data["amount"],
                now=now,
            )
            if not new:
                continue
            payload = {
                "order_id": order_id,
                **{k: data[k] for k in ("customer", "sku", "qty", "amount", "currency", "card")},
                "ship_to": data["ship_to"],
                "channel": channel,
            }
            await _announce(p, tx, order_id, payload, now)
            await tx.execute(
                "INSERT INTO order_announcements (order_id, payload, announced_at, times) "
                "VALUES (?, ?, ?, 1)",
                (order_id, json.dumps(payload, sort_keys=True), now),
            )
            created += 1
    p.after_commit()
    return created


async def _announce(
    p: Participant, tx: Any, order_id: str, payload: Mapping[str, Any], now: float
) -> None:
    # No cause: the message id is the order's own, the same at every announcement.
    await p.emit(
        tx, "OrderCreated", payload, correlation_id=order_id, business_key=order_id, now=now
    )


_UNANSWERED = """
    FROM order_announcements a JOIN orders o ON o.order_id = a.order_id
    WHERE o.status = 'CREATED' AND a.times < ?
      AND NOT EXISTS (SELECT 1 FROM choreography_log l
                      WHERE l.order_id = a.order_id AND l.event = 'PaymentAuthorized')
"""
"""Orders still waiting for the payment service's answer that may be announced again
(a PaymentFailed answer cancels the order; PaymentAuthorized is noted in the log)."""


async def announce_again(
    ch: Choreography,
    now: float | None = None,
    *,
    after: float = ANNOUNCE_AFTER,
    times: int = ANNOUNCE_TIMES,
) -> int:
    """Publish ``OrderCreated`` again for every order that got no answer from the payment
    service ``after`` seconds after its last announcement, ``times`` times at most.

    The fact goes out under its first message id, so a subscriber that handled it drops
    the copy in its inbox; one that never heard of the order (its copy was lost) starts
    the flow now. Run it periodically (``Choreography.engine`` does); returns how many
    orders were announced again.
    """
    p, now = ch.order, time.time() if now is None else now
    async with p.store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT a.order_id, a.payload {_UNANSWERED} AND a.announced_at <= ? "
            "ORDER BY a.order_id",
            (times, now - after),
        )
        for order_id, payload in rows:
            await _announce(p, tx, order_id, json.loads(payload), now)
            await tx.execute(
                "UPDATE order_announcements SET times = times + 1, announced_at = ? "
                "WHERE order_id = ?",
                (now, order_id),
            )
    if rows:
        p.after_commit()
    return len(rows)


async def next_announcement(
    ch: Choreography, *, after: float = ANNOUNCE_AFTER, times: int = ANNOUNCE_TIMES
) -> float | None:
    """When :func:`announce_again` will next have an order to announce (None: no order
    waits for an answer)."""
    async with ch.order.store.transaction() as tx:
        row = await tx.fetchone(f"SELECT MIN(a.announced_at) {_UNANSWERED}", (times,))
    return None if row is None or row[0] is None else float(row[0]) + after


def checkout_flow() -> tuple[FlowSpec, list[Participant]]:
    """The flow and its participants (on throwaway stores), for ``sagakit flows``."""
    stores = {name: MemoryStore(name) for name in (*SERVICES, TRACKER)}
    ch = build_choreography(stores, FakeCardProvider(Path("/nonexistent/provider.db")))
    return FLOW, ch.participants
