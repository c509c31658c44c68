"""The checkout's concurrent transactions, for ``sagakit check checkout``.

Each race runs the real inventory participant (:func:`sagakit_checkout.inventory.
build_inventory`, its handlers and the participant runtime's inbox and idempotency
records) and the reservation sweeper, side by side, in every interleaving that
:mod:`sagakit.testing.races` explores, and checks the stock afterwards:

* ``last-item``: two orders reserve the last unit; one wins, the other is told "out of
  stock" for good;
* ``same-command-twice``: one ReserveInventory delivered to two replicas at once;
* ``retry-beside-first-try``: a retry (attempt 2) handled while attempt 1 still runs;
* ``release-overtakes-reserve``: a reservation's release handled beside the reservation;
* ``release-beside-a-persons-retry``: the same with the try a person's retry started
  (after the release, its tombstone must refuse the retry too);
* ``sweeper-vs-commit`` and ``sweeper-vs-release``: an expired reservation committed
  (or released) while the sweeper returns it to stock.

Every run must keep the stock equation (``initial = available + reserved + shipped``,
none negative; ``reserved`` and ``shipped`` equal to the reservations that hold them)
and its race's own rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagakit_checkout import inventory

from sagakit.core.envelope import Envelope, Outcome
from sagakit.runtime.participant import Participant
from sagakit.stores.sqlite import SQLiteStore
from sagakit.testing.races import Actor, ActorFailed, Race, command, delivering

NOW = 1_000_000.0
"""The clock of every race (a fixed clock: a race must replay the same way)."""

SKU = "sku-last"
RESERVE_STEP = "reserve_inventory"
COMMIT_STEP = "commit_inventory"


def _saga(order_id: str) -> str:
    return f"saga-{order_id}"


def _inventory(store: Any) -> Participant:
    participant: Participant = inventory.build_inventory(store)
    return participant


def _to_inventory(type_: str, order_id: str, step: str, **extra: Any) -> Envelope:
    """A command of ``order_id``'s saga to the inventory, at :data:`NOW`."""
    payload = extra.pop("payload", {"order_id": order_id})
    return command(
        inventory.NAME, type_, payload, saga_id=_saga(order_id), step=step, now=NOW, **extra
    )


def reserve(
    order_id: str, *, attempt: int = 1, sku: str = SKU, manual_retries: int = 0
) -> Envelope:
    """ReserveInventory of one unit of ``sku`` for ``order_id`` (``manual_retries``: the
    try of a person's retry)."""
    payload = {"order_id": order_id, "sku": sku, "qty": 1}
    return _to_inventory(
        "ReserveInventory",
        order_id,
        RESERVE_STEP,
        payload=payload,
        attempt=attempt,
        manual_retries=manual_retries,
    )


def release(order_id: str) -> Envelope:
    """ReleaseInventory, the compensation of ``order_id``'s reservation."""
    return _to_inventory("ReleaseInventory", order_id, RESERVE_STEP, rung=0)


def commit(order_id: str) -> Envelope:
    """CommitReservation of ``order_id`` (past the pivot: the goods leave)."""
    return _to_inventory("CommitReservation", order_id, COMMIT_STEP)


def handled(cmd: Envelope, *, now: float = NOW) -> Actor:
    """An actor: a replica of the inventory service delivering ``cmd``."""
    return delivering(_inventory, cmd, now=now)


async def sweep(store: Any) -> int:
    """An actor: the reservation sweeper, run once at :data:`NOW`."""
    expired: int = await inventory.expire_reservations(store, NOW)
    return expired


def seeded(units: int, *, expired: str | None = None, live: str | None = None) -> Any:
    """A setup: the inventory's tables, ``units`` of :data:`SKU`, and optionally a
    reservation for order ``expired`` that expired before :data:`NOW` and one for order
    ``live`` that still holds its unit (so that a settlement that takes the wrong units
    shows in the stock rather than in a negative count the schema refuses)."""

    async def setup(store: SQLiteStore) -> None:
        await store.apply_migrations(inventory.NAMESPACE, inventory.MIGRATIONS)
        await inventory.seed_stock(store, {SKU: units})
        for order_id, at in ((expired, NOW - inventory.RESERVATION_TTL - 60.0), (live, NOW)):
            if order_id is not None:
                outcome = await handled(reserve(order_id), now=at)(store)
                if not (isinstance(outcome, Outcome) and outcome.ok):
                    raise RuntimeError(f"seeding the reservation of {order_id}: {outcome}")

    return setup


async def stock_violations(store: SQLiteStore) -> list[str]:
    """The stock equation, from the inventory's own tables."""
    async with store.transaction() as tx:
        row = await tx.fetchone(
            "SELECT initial, available, reserved, shipped FROM stock WHERE sku = ?", (SKU,)
        )
        held = await tx.fetchall(
            "SELECT status, COALESCE(SUM(qty), 0) FROM reservations WHERE sku = ? GROUP BY status",
            (SKU,),
        )
    assert row is not None
    initial, available, reserved, shipped = map(int, row)
    by_status = {str(s): int(q) for s, q in held}
    out = []
    if min(available, reserved, shipped) < 0 or initial != available + reserved + shipped:
        out.append(
            f"stock equation broken: initial {initial} != available {available} + reserved "
            f"{reserved} + shipped {shipped} (or one is negative)"
        )
    if reserved != by_status.get("RESERVED", 0):
        out.append(
            f"stock says {reserved} reserved but RESERVED reservations hold "
            f"{by_status.get('RESERVED', 0)}"
        )
    if shipped != by_status.get("COMMITTED", 0):
        out.append(
            f"stock says {shipped} shipped but COMMITTED reservations hold "
            f"{by_status.get('COMMITTED', 0)}"
        )
    return out


async def _statuses(store: SQLiteStore) -> dict[str, str]:
    async with store.transaction() as tx:
        rows = await tx.fetchall("SELECT order_id, status FROM reservations")
    return {str(o): str(s) for o, s in rows}


async def _replies(store: SQLiteStore) -> int:
    async with store.transaction() as tx:
        row = await tx.fetchone("SELECT COUNT(*) FROM outbox")
    return 0 if row is None else int(row[0])


def _outcomes(results: Sequence[object]) -> list[Outcome]:
    return [r for r in results if isinstance(r, Outcome)]


async def _last_item(store: SQLiteStore, results: Sequence[object]) -> list[str]:
    out = await stock_violations(store)
    outcomes = _outcomes(results)
    won = [o for o in outcomes if o.ok]
    if len(won) != 1:
        out.append(f"{len(won)} orders got the last unit (outcomes {outcomes})")
    lost = [o for o in outcomes if not o.ok]
    if any(o.reason != inventory.OUT_OF_STOCK or o.retryable for o in lost):
        out.append(f"the other order was not told 'out of stock' for good: {lost}")
    return out


async def _once(store: SQLiteStore, results: Sequence[object]) -> list[str]:
    out = await stock_violations(store)
    outcomes = _outcomes(results)
    if len(outcomes) != len(results) or not all(o.ok for o in outcomes):
        out.append(f"a delivery of the reservation was not answered with success: {results}")
    elif len({str(o.to_payload()) for o in outcomes}) != 1:
        out.append(f"deliveries of one command got different answers: {outcomes}")
    statuses = await _statuses(store)
    if statuses != {"order-1": "RESERVED"}:
        out.append(f"one reservation expected, found {statuses}")
    return out


def _replied(count: int) -> Any:
    async def check(store: SQLiteStore, results: Sequence[object]) -> list[str]:
        out = await _once(store, results)
        replies = await _replies(store)
        if replies != count:
            out.append(f"{replies} replies in the outbox, {count} expected")
        return out

    return check


def _release_beside_reserve(release_first: bool) -> Any:
    """The check of a reservation (or a person's retry of it) beside its release."""

    async def check(store: SQLiteStore, results: Sequence[object]) -> list[str]:
        released, reserved = results if release_first else results[::-1]
        out = await stock_violations(store)
        statuses = await _statuses(store)
        if statuses.get("order-1", "RELEASED") != "RELEASED":
            out.append(f"the reservation is {statuses['order-1']} after its release was answered")
        if not isinstance(released, Outcome) or not released.ok:
            out.append(f"the release was not answered with success: {released}")
        if isinstance(reserved, Outcome) and reserved.ok and "order-1" not in statuses:
            out.append("the reservation was answered with success but holds nothing")
        return out

    return check


def _settled_once(action: str) -> Any:
    async def check(store: SQLiteStore, results: Sequence[object]) -> list[str]:
        out = await stock_violations(store)
        answer, expired = results
        status = (await _statuses(store)).get("order-1")
        if not isinstance(answer, Outcome):
            out.append(f"the {action} got no recorded answer: {answer}")
        elif status == "EXPIRED" and answer.ok and action == "commit":
            out.append("the commit was answered with success but the reservation expired")
        elif status not in ("EXPIRED", "COMMITTED" if action == "commit" else "RELEASED"):
            out.append(f"the reservation ended {status} after the {action} and the sweeper")
        if not isinstance(expired, ActorFailed) and expired not in (0, 1):
            out.append(f"the sweeper expired {expired} reservations of one")
        return out

    return check


def checkout_races() -> list[Race]:
    """The checkout's races (see the module docstring), cheapest first."""
    return [
        Race(
            "last-item",
            seeded(1),
            [("order-1", handled(reserve("order-1"))), ("order-2", handled(reserve("order-2")))],
            _last_item,
            about="two orders reserve the last unit",
        ),
        Race(
            "same-command-twice",
            seeded(2),
            [
                ("replica-1", handled(reserve("order-1"))),
                ("replica-2", handled(reserve("order-1"))),
            ],
            _replied(1),
            about="one ReserveInventory delivered to two replicas at once",
        ),
        Race(
            "retry-beside-first-try",
            seeded(2),
            [
                ("attempt-1", handled(reserve("order-1"))),
                ("attempt-2", handled(reserve("order-1", attempt=2))),
            ],
            _replied(2),
            about="attempt 2 of a reservation handled while attempt 1 runs",
        ),
        Race(
            "release-overtakes-reserve",
            seeded(1),
            [("reserve", handled(reserve("order-1"))), ("release", handled(release("order-1")))],
            _release_beside_reserve(release_first=False),
            about="a reservation and its release handled side by side",
        ),
        Race(
            "release-beside-a-persons-retry",
            seeded(1),
            [
                ("release", handled(release("order-1"))),
                ("retry", handled(reserve("order-1", attempt=3, manual_retries=1))),
            ],
            _release_beside_reserve(release_first=True),
            about="a person's retry of a reservation handled beside its release",
        ),
        Race(
            "sweeper-vs-commit",
            seeded(2, expired="order-1", live="order-2"),
            [("commit", handled(commit("order-1"))), ("sweeper", sweep)],
            _settled_once("commit"),
            about="an expired reservation committed while the sweeper returns it",
        ),
        Race(
            "sweeper-vs-release",
            seeded(2, expired="order-1", live="order-2"),
            [("release", handled(release("order-1"))), ("sweeper", sweep)],
            _settled_once("release"),
            about="an expired reservation released while the sweeper returns it",
        ),
    ]
