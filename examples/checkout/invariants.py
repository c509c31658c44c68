"""The six invariants of the design (docs/design.md), checked from the services' own ledgers.

Nothing here trusts the orchestrator's view of what happened: money is read from the
payment ledger and the provider's effects, stock from the inventory tables, shipments
from shipping, order status from the order service. The orchestrator store supplies
the saga list (order id == business key), the history of statuses a user saw, and the
message plumbing (outboxes, inboxes, mailboxes, dead letters).

Run it when the system is quiet (every saga settled): a saga still running is itself
a violation of ``terminal``, and its half-done effects show up elsewhere too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sagakit import SagaInstance, SagaState
from sagakit.core.instance import MANUAL_STATES
from sagakit.transports.base import Backlog

from . import inventory, order, payment, shipping
from .provider import Authorization, Effect, FakeCardProvider

INVARIANTS = ("money", "stock", "terminal", "effect_once", "honest_status", "nothing_lost")
"""The invariant names, in the order of docs/design.md."""

FORWARD_STATUSES = (
    "PENDING_PAYMENT",
    "PENDING_INVENTORY",
    "PENDING_SHIPMENT",
    "COMPLETING",
    "COMPLETED",
)
CANCELLING, CANCELLED, NEEDS_ATTENTION = "CANCELLING", "CANCELLED", "NEEDS_ATTENTION"
PARTIALLY_COMPLETED = "PARTIALLY_COMPLETED"
MANUAL_RESOLVED = "manual.resolved"
"""The history event of a person's decision on a saga in the manual queue."""
ORCHESTRATOR = "orchestrator"
"""The orchestrator's endpoint (its local steps run at ``orchestrator.local``)."""
_PAGE = 500


@dataclass(slots=True)
class InvariantReport:
    """Which invariants hold, and every violation found (each names its order/sku/message)."""

    invariants: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(INVARIANTS, True))
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Not violations, but worth a look: sagas in the manual queue, dead letters."""
    broker: Backlog | None = None
    """What the broker still held when the check ran (with NATS or RabbitMQ)."""
    in_broker: list[str] = field(default_factory=list)
    """Published messages not yet processed that the broker still holds: late, not lost."""

    def held_by_broker(self, message_id: str, endpoint: str, what: str) -> bool:
        """True (and noted in :attr:`in_broker`) when the broker still holds the message.

        A broker that names what it holds (NATS) must name this message; one that can
        only count (RabbitMQ's ready queues) must hold at least as many unnamed
        messages as are taken to be there -- each matched once.
        """
        broker = self.broker
        if broker is None:
            return False
        if (message_id, endpoint) in broker.message_ids:
            self.in_broker.append(what)
            return True
        unnamed = broker.total - len(broker.message_ids)
        taken = sum(1 for w in self.in_broker if w.endswith(_UNNAMED))
        if unnamed - taken > 0:
            self.in_broker.append(what + _UNNAMED)
            return True
        return False

    @property
    def ok(self) -> bool:
        """True when every invariant holds."""
        return all(self.invariants.values())

    def fail(self, invariant: str, message: str) -> None:
        """Record a violation of ``invariant``."""
        self.invariants[invariant] = False
        self.violations.append(f"{invariant}: {message}")

    def __str__(self) -> str:
        lines = [f"{name}: {'ok' if ok else 'VIOLATED'}" for name, ok in self.invariants.items()]
        return "\n".join(lines + [f"  - {v}" for v in self.violations])


_UNNAMED = " (counted: the broker holds messages it cannot name)"


def in_manual_queue(saga: SagaInstance) -> bool:
    """True when a person owns the saga: FAILED_NEEDS_MANUAL, with a reason."""
    return saga.state in MANUAL_STATES and bool(saga.reason and saga.reason.strip())


async def check_invariants(
    *,
    orchestrator_store: Any,
    order_store: Any,
    payment_store: Any,
    inventory_store: Any,
    shipping_store: Any,
    provider: FakeCardProvider,
    initial_stock: Mapping[str, int],
    settled_by_hand: Iterable[str] = (),
    broker: Backlog | None = None,
    messages: bool = True,
) -> InvariantReport:
    """Check the design's six invariants; the stores must be open.

    ``messages=False`` leaves "nothing lost" out, for a caller that accounts for the
    messages itself (the simulator knows which ones its network dropped on purpose).

    ``settled_by_hand``: orders a person vouched for (marked a step done or compensated
    by hand, or accepted the saga as it stood): like orders in the manual queue, their
    books are the person's to square, so the money and stock checks and the "COMPLETED
    only when every effect happened" check leave them out. ``broker``: what the broker
    still held after the run (:func:`sagakit.transports.base.backlog_of`); a message it
    holds is reported apart (:attr:`InvariantReport.in_broker`), not as lost.
    """
    report = InvariantReport(broker=broker)
    sagas = await _all_sagas(orchestrator_store)
    by_order: dict[str, list[SagaInstance]] = defaultdict(list)
    for s in sagas:
        by_order[s.business_key].append(s)
    data = _Ledgers(
        orders={
            r[0]: (str(r[1]), int(r[2]))
            for r in await _rows(order_store, "SELECT order_id, status, amount FROM orders")
        },
        order_history=await _rows(
            order_store,
            "SELECT order_id, seq, status FROM order_status_history ORDER BY order_id, seq",
        ),
        ledger=await _rows(
            payment_store,
            "SELECT order_id, op, amount FROM payment_ledger ORDER BY order_id, op",
        ),
        stock=await _rows(
            inventory_store, "SELECT sku, initial, available, reserved, shipped FROM stock"
        ),
        reservations=await _rows(
            inventory_store, "SELECT order_id, sku, qty, status FROM reservations"
        ),
        shipments=await _rows(shipping_store, "SELECT order_id, status FROM shipments"),
    )
    effects = await provider.effects()
    auths = await provider.authorizations()

    manual = {key for key, ss in by_order.items() if any(in_manual_queue(s) for s in ss)}
    manual |= set(settled_by_hand)
    for s in sagas:
        if in_manual_queue(s):
            report.notes.append(
                f"order {s.business_key}: saga {s.saga_id} in the manual queue "
                f"({s.state.value}: {s.reason})"
            )

    await _money(report, data, effects, auths, by_order, manual, orchestrator_store)
    _stock(report, data, by_order, manual, initial_stock)
    _terminal(report, sagas)
    _effect_once(report, data, effects)
    await _honest_status(report, data, sagas, orchestrator_store, set(settled_by_hand))
    if not messages:
        return report
    await _nothing_lost(
        report,
        {
            ORCHESTRATOR: orchestrator_store,
            f"{ORCHESTRATOR}.local": orchestrator_store,
            order.NAME: order_store,
            payment.NAME: payment_store,
            inventory.NAME: inventory_store,
            shipping.NAME: shipping_store,
        },
    )
    return report


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ledgers:
    orders: dict[str, tuple[str, int]]  # order_id -> (status, amount)
    order_history: list[tuple[Any, ...]]
    ledger: list[tuple[Any, ...]]
    stock: list[tuple[Any, ...]]
    reservations: list[tuple[Any, ...]]
    shipments: list[tuple[Any, ...]]

    def ledger_sum(self, order_id: str, op: str) -> int:
        return sum(int(r[2]) for r in self.ledger if r[0] == order_id and r[1] == op)


async def _rows(store: Any, sql: str) -> list[tuple[Any, ...]]:
    # A transaction is the one read path the Store port offers for business tables; it is
    # short and read-only, so holding the writer for it costs nothing at quiescence.
    async with store.transaction() as tx:
        rows: list[tuple[Any, ...]] = await tx.fetchall(sql)
    return rows


async def _all_sagas(store: Any) -> list[SagaInstance]:
    out: list[SagaInstance] = []
    offset = 0
    while True:
        page: list[SagaInstance] = await store.list_sagas(limit=_PAGE, offset=offset)
        out.extend(page)
        if len(page) < _PAGE:
            return out
        offset += _PAGE


def _describe(sagas: Iterable[SagaInstance]) -> str:
    return ", ".join(f"saga {s.saga_id} {s.state.value}" for s in sagas) or "no saga"


# -- 1. money --------------------------------------------------------------------------


PIVOT_AT_CAPTURE = frozenset({"checkout", "checkout-hybrid", "checkout-choreography"})
"""The checkout's definitions (orchestrated, hybrid, the choreography tracker's views):
in each the capture is the pivot (:mod:`.sagas`, :mod:`.hybrid`, :mod:`.choreography`)."""

PROVIDER_OPS = ("authorize", "capture", "void", "refund")
"""The payment ledger's operations that the card provider carries out (a credit note
is the payment service's own)."""


async def _money(
    report: InvariantReport,
    data: _Ledgers,
    effects: list[Effect],
    auths: list[Authorization],
    by_order: Mapping[str, list[SagaInstance]],
    manual: set[str],
    orchestrator_store: Any,
) -> None:
    """What was taken and given back adds up, and the books agree with the provider.

    Accepted only while a person owns the order (:func:`in_manual_queue`): a balance
    that is not the order's, an open hold, and books that disagree with the provider.
    The last is also accepted once a person decided on the order (a ``manual.resolved``
    row in its saga's history): a call whose every answer was lost (a void, a capture
    the provider never answered, nor told about when asked) may have happened or not,
    and the payment ledger does not show an effect it never heard of; only a person can
    find out, and reconcile the books outside the saga. Such a void is not money lost:
    the hold it released is not counted anywhere. Anywhere else, a disagreement is a
    violation: in particular a saga that moved on from a void of unknown outcome to a
    refund (the ladder's rule: unknown goes to a person) leaves a void at the provider
    that the books never recorded, under a saga that ended without a person.

    Captured money is never given back (refunded or credited) unless a person decided
    on the order: the capture is the checkout's pivot, and after it a failure goes to a
    person, never to a compensation. (A refund that balances the capture of a cancelled
    order adds up, so the sums alone would not see a compensation after the pivot.) An
    order of another saga definition on the same services (one without that pivot) is
    left out of this rule.
    """
    provider_sum: Counter[tuple[str, str]] = Counter()
    for e in effects:
        provider_sum[(e.order_id, e.op)] += e.amount
    open_auths: dict[str, list[str]] = defaultdict(list)
    for a in auths:
        if a.open:
            open_auths[a.order_id].append(a.authorization)
    order_ids = (
        set(data.orders)
        | {r[0] for r in data.ledger}
        | {e.order_id for e in effects}
        | set(by_order)
    )
    for oid in sorted(order_ids):
        status, amount = data.orders.get(oid, ("NONE", 0))
        books = {op: data.ledger_sum(oid, op) for op in PROVIDER_OPS}
        at_provider = {op: provider_sum[(oid, op)] for op in PROVIDER_OPS}
        credited = data.ledger_sum(oid, "credit")
        p_captured, p_refunded = at_provider["capture"], at_provider["refund"]
        problems: list[str] = []
        sagas = by_order.get(oid, [])
        if (
            p_captured
            and (p_refunded or credited)
            and all(s.definition in PIVOT_AT_CAPTURE for s in sagas)
            and not await _resolved_by_person(orchestrator_store, sagas)
        ):
            report.fail(
                "money",
                f"order {oid}: captured {p_captured}, then refunded {p_refunded} and credited "
                f"{credited} without a person's decision: a compensation after the pivot "
                f"[{_describe(by_order.get(oid, []))}]",
            )
        if books != at_provider:
            differ = [op for op in PROVIDER_OPS if books[op] != at_provider[op]]
            disagreement = (
                "payment ledger ("
                + ", ".join(f"{op} {books[op]}" for op in differ)
                + ") disagrees with the provider ("
                + ", ".join(f"{op} {at_provider[op]}" for op in differ)
                + ")"
            )
            if oid not in manual and await _resolved_by_person(
                orchestrator_store, by_order.get(oid, [])
            ):
                report.notes.append(
                    f"order {oid}: {disagreement}; a person decided on the order, the books "
                    "are theirs to reconcile"
                )
            else:
                problems.append(disagreement)
        # The provider's effects are the money that really moved; credits exist only in
        # the payment service.
        balance = p_captured - p_refunded - credited
        expected = amount if status == "COMPLETED" else 0
        if balance != expected:
            problems.append(
                f"captured {p_captured} - refunded {p_refunded} - credited {credited} = {balance}, "
                f"expected {expected} (order {status})"
            )
        if open_auths.get(oid):
            problems.append(
                f"authorization {', '.join(open_auths[oid])} still holds money (order {status})"
            )
        if problems and oid not in manual:
            for p in problems:
                report.fail("money", f"order {oid}: {p} [{_describe(by_order.get(oid, []))}]")
        elif problems:
            report.notes.append(f"order {oid}: left to the person on duty: {'; '.join(problems)}")


async def _resolved_by_person(store: Any, sagas: Iterable[SagaInstance]) -> bool:
    """True when a person decided on one of ``sagas`` (a ``manual.resolved`` history row)."""
    for s in sagas:
        if any(h.event == MANUAL_RESOLVED for h in await store.history(s.saga_id)):
            return True
    return False


# -- 2. stock --------------------------------------------------------------------------


def _stock(
    report: InvariantReport,
    data: _Ledgers,
    by_order: Mapping[str, list[SagaInstance]],
    manual: set[str],
    initial_stock: Mapping[str, int],
) -> None:
    # RESERVED units are held (counted in ``reserved``), COMMITTED ones left (``shipped``);
    # RELEASED and EXPIRED reservations gave their units back to ``available``.
    reserved: Counter[str] = Counter()
    shipped: Counter[str] = Counter()
    expired = 0
    for oid, sku, qty, status in data.reservations:
        sagas = by_order.get(oid, [])
        if status == "RESERVED":
            reserved[sku] += int(qty)
            if oid not in manual and (not sagas or all(s.terminal for s in sagas)):
                report.fail(
                    "stock",
                    f"order {oid}: reservation of {qty} x {sku} outlives its "
                    f"saga [{_describe(sagas)}]",
                )
        elif status == "COMMITTED":
            shipped[sku] += int(qty)
        elif status == "EXPIRED":
            expired += 1
            # Its units went back to stock (and maybe to another order): an order that
            # completed on it sold goods it did not hold.
            if oid not in manual and any(s.state is SagaState.SUCCEEDED for s in sagas):
                report.fail(
                    "stock",
                    f"order {oid}: completed although its reservation of {qty} x {sku} "
                    f"expired [{_describe(sagas)}]",
                )
        elif status != "RELEASED":
            report.fail("stock", f"order {oid}: reservation in unknown status {status!r}")
    if expired:
        report.notes.append(f"{expired} reservation(s) expired and went back to stock")
    known = set()
    for sku, initial, available, res, ship in data.stock:
        known.add(sku)
        if min(available, res, ship) < 0:
            report.fail(
                "stock",
                f"sku {sku}: negative stock (available {available}, reserved "
                f"{res}, shipped {ship})",
            )
        if initial != available + res + ship:
            report.fail(
                "stock",
                f"sku {sku}: initial {initial} != available {available} + "
                f"reserved {res} + shipped {ship}",
            )
        if res != reserved[sku]:
            report.fail(
                "stock", f"sku {sku}: reserved {res} but RESERVED reservations hold {reserved[sku]}"
            )
        if ship != shipped[sku]:
            report.fail(
                "stock", f"sku {sku}: shipped {ship} but COMMITTED reservations hold {shipped[sku]}"
            )
        if sku in initial_stock and initial != initial_stock[sku]:
            report.fail(
                "stock", f"sku {sku}: initial {initial} but {initial_stock[sku]} was seeded"
            )
    for sku in sorted(set(initial_stock) - known):
        report.fail("stock", f"sku {sku}: seeded with {initial_stock[sku]} but has no stock row")
    for sku in sorted((set(reserved) | set(shipped)) - known):
        report.fail("stock", f"sku {sku}: reservations exist for a sku with no stock row")


# -- 3. terminal -----------------------------------------------------------------------


def _terminal(report: InvariantReport, sagas: list[SagaInstance]) -> None:
    for s in sagas:
        if not s.terminal:
            report.fail(
                "terminal",
                f"order {s.business_key}: saga {s.saga_id} is still "
                f"{s.state.value} (status {s.status})",
            )
        elif s.state in MANUAL_STATES and not in_manual_queue(s):
            report.fail(
                "terminal",
                f"order {s.business_key}: saga {s.saga_id} is "
                f"{s.state.value} without a reason for the person on duty",
            )


# -- 4. effect once --------------------------------------------------------------------


def _effect_once(report: InvariantReport, data: _Ledgers, effects: list[Effect]) -> None:
    def once(where: str, keys: Iterable[tuple[str, ...]]) -> None:
        for key, n in sorted(Counter(keys).items()):
            if n > 1:
                report.fail(
                    "effect_once", f"order {key[0]}: {n} {' '.join(key[1:])} effects in {where}"
                )

    once("the payment ledger", ((r[0], r[1]) for r in data.ledger))
    once("the provider's ledger", ((e.order_id, e.op) for e in effects))
    once("inventory reservations", ((r[0], "reservation") for r in data.reservations))
    once("shipments", ((r[0], "shipment") for r in data.shipments))


# -- 5. honest status ------------------------------------------------------------------


def status_step_allowed(prev: str, nxt: str) -> bool:
    """True when a user who saw ``prev`` may see ``nxt`` next.

    Nothing leaves NEEDS_ATTENTION on its own; :func:`status_path_violation` lets a
    saga that a person resumed (a ``manual.resolved`` history row) move on from it.
    """
    if nxt == prev:
        return True
    if prev == NEEDS_ATTENTION:
        return False
    if nxt == NEEDS_ATTENTION:
        return True
    if prev == CANCELLING:
        return nxt == CANCELLED
    if nxt == CANCELLING:
        return prev in FORWARD_STATUSES[:-1]
    if prev in FORWARD_STATUSES and nxt in FORWARD_STATUSES:
        return FORWARD_STATUSES.index(nxt) > FORWARD_STATUSES.index(prev)
    return False


def status_path_violation(path: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """The first status change a user should not have seen, as ``(prev, next)``; or None.

    ``path`` is a saga's history as ``(event, status)`` pairs, oldest first. Every change
    must pass :func:`status_step_allowed`, except one: a saga in NEEDS_ATTENTION that a
    person resumed (a ``manual.resolved`` row while it showed NEEDS_ATTENTION) may show
    a status again. Even then it may not go back past what the user saw before the
    saga needed attention: it shows that status again, one allowed after it, or
    the partial status (the person accepted it as it stands).
    """
    prev: str | None = None
    before_attention: str | None = None
    resumed = False
    for event, status in path:
        if prev is None:
            prev = status
            continue
        if event == MANUAL_RESOLVED and prev == NEEDS_ATTENTION:
            resumed = True
        if status == prev:
            continue
        if prev == NEEDS_ATTENTION and resumed:
            resumed = False
            ok = status in (NEEDS_ATTENTION, PARTIALLY_COMPLETED) or (
                before_attention is not None
                and (status == before_attention or status_step_allowed(before_attention, status))
            )
        else:
            ok = status_step_allowed(prev, status)
        if not ok:
            return prev, status
        if status == NEEDS_ATTENTION:
            before_attention = prev
        prev = status
    return None


async def _honest_status(
    report: InvariantReport,
    data: _Ledgers,
    sagas: list[SagaInstance],
    orchestrator_store: Any,
    by_hand: set[str],
) -> None:
    captured = {r[0] for r in data.ledger if r[1] == "capture"}
    committed = {r[0] for r in data.reservations if r[3] == "COMMITTED"}
    shipped = {r[0] for r in data.shipments if r[1] == "CREATED"}
    for s in sagas:
        history = await orchestrator_store.history(s.saga_id)
        path = [(h.event, h.status) for h in history]
        if not path or path[-1][1] != s.status:
            path.append(("", s.status))
        seen = [status for _, status in path]
        bad = status_path_violation(path)
        if bad is not None:
            report.fail(
                "honest_status",
                f"order {s.business_key}: saga {s.saga_id} showed {bad[1]} after {bad[0]}",
            )
        if s.status == CANCELLED and data.orders.get(s.business_key, ("",))[0] == "COMPLETED":
            # A saga view (a tracker's, in a choreography) that tells the user the order
            # was cancelled while the order service completed it: money taken, "cancelled".
            report.fail(
                "honest_status",
                f"order {s.business_key}: saga {s.saga_id} showed CANCELLED but the order "
                "service completed the order",
            )
        if "COMPLETED" in seen and s.business_key not in by_hand:
            oid = s.business_key
            missing = [
                what
                for what, ok in (
                    ("order COMPLETED", data.orders.get(oid, ("",))[0] == "COMPLETED"),
                    ("payment captured", oid in captured),
                    ("inventory committed", oid in committed),
                    ("shipment created", oid in shipped),
                )
                if not ok
            ]
            if missing:
                report.fail(
                    "honest_status",
                    f"order {oid}: saga {s.saga_id} showed COMPLETED without {', '.join(missing)}",
                )
    statuses: dict[str, list[str]] = defaultdict(list)
    for oid, _seq, status in data.order_history:
        statuses[oid].append(status)
    for oid, seen in sorted(statuses.items()):
        if seen[0] != "CREATED" or len(seen) > 2 or any(x == "CREATED" for x in seen[1:]):
            report.fail("honest_status", f"order {oid}: order service showed {' -> '.join(seen)}")


# -- 6. nothing lost -------------------------------------------------------------------


async def _nothing_lost(report: InvariantReport, routes: Mapping[str, Any]) -> None:
    stores = list({id(s): s for s in routes.values()}.values())
    dead: dict[int, set[str]] = {}
    for s in stores:
        letters = await s.dead_letters()
        dead[id(s)] = {d.message_id for d in letters if d.message_id}
        for d in letters:
            report.notes.append(
                f"dead letter in {s.name} ({d.endpoint}): message {d.message_id}: {d.reason}"
            )
    inboxes: dict[str, set[str]] = {}
    for s in stores:
        for env, published_at in await s.outbox_all():
            what = f"message {env.message_id} ({env.type}) from {s.name} to {env.destination}"
            if published_at is None:
                report.fail("nothing_lost", f"{what} was never published")
                continue
            if env.destination is None:
                continue  # broadcast events: no single inbox to look in
            if env.message_id in dead[id(s)]:
                continue  # unroutable, parked by the producer's relay
            target = routes.get(env.destination)
            if target is None:
                report.fail("nothing_lost", f"{what}: no such endpoint, and not dead-lettered")
                continue
            if env.destination not in inboxes:
                inboxes[env.destination] = await target.inbox_ids(env.destination)
            handled = (
                env.message_id in inboxes[env.destination] or env.message_id in dead[id(target)]
            )
            if not handled and not report.held_by_broker(env.message_id, env.destination, what):
                report.fail(
                    "nothing_lost",
                    f"{what} was published but neither processed, dead-lettered nor held "
                    "by the broker",
                )
        depth = await s.queue_depth()
        if depth:
            report.fail(
                "nothing_lost", f"store {s.name}: {depth} messages still wait in its mailboxes"
            )
