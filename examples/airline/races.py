"""The seats service's transactions side by side, for ``sagakit check``::

    sagakit check sagakit_airline.sagas:booking --races sagakit_airline.races:races

Each race runs the real seats service (its handlers, the participant runtime's inbox
and idempotency records, the sweeper) in every interleaving of its transactions'
statements on SQLite, as two seats processes on PostgreSQL under READ COMMITTED could
run them, and checks the seats' books afterwards:

* ``last-seat``: two bookings hold the one seat left; one wins, the other is told
  "sold out";
* ``hold-beside-sweeper``: a booking takes the seat of a lapsed hold while the sweeper
  gives it back;
* ``confirm-beside-sweeper``: a lapsed hold is confirmed while the sweeper expires it
  (refused either way: a lapsed hold is never sold);
* ``release-beside-confirm``: the compensation of a confirmation handled beside it.

Every run must keep the flight's counters equal to its holds and within its seats.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from sagakit import App, Outcome
from sagakit.clock import using
from sagakit.core.envelope import Envelope
from sagakit.runtime.participant import Participant
from sagakit.stores.sqlite import SQLiteStore
from sagakit.testing.races import Actor, Race, command, delivering

from . import seats

NOW = 1_000_000.0
"""The clock of every race (fixed: a race must replay the same way)."""
FLIGHT = "LS1"


def races_of(app: App) -> list[Race]:
    """The races of ``app``'s seats service (the real one, or a planted bug's)."""
    service = app.get_service(seats.NAME)

    def seats_process(store: Any) -> Participant:
        return service.participant(store, app.context())

    def handled(cmd: Envelope, at: float = NOW) -> Actor:
        return delivering(seats_process, cmd, now=at)

    def setup(*, lapsed: str | None = None, live: str | None = None) -> Any:
        async def run(store: SQLiteStore) -> None:
            await service.migrate(store)
            await seats.add_flights(store, {FLIGHT: (1, 9_000)})
            before = NOW - seats.HOLD_TTL - 1.0
            for quoted in ("bk-0", "bk-1", "bk-2"):  # each quoted the one seat
                await _seed(handled(quote(quoted), before)(store), f"the quote of {quoted}")
            for holder, at in ((lapsed, before), (live, NOW)):
                if holder is not None:
                    await _seed(handled(hold(holder), at)(store), f"the hold of {holder}")

        return run

    return [
        Race(
            "last-seat",
            setup(),
            [("bk-1", handled(hold("bk-1"))), ("bk-2", handled(hold("bk-2")))],
            one_winner,
            about="two bookings hold the last seat",
        ),
        Race(
            "hold-beside-sweeper",
            setup(lapsed="bk-0"),
            [("bk-1", handled(hold("bk-1"))), ("sweeper", sweeper)],
            new_hold_wins,
            about="a booking takes a lapsed hold's seat while the sweeper gives it back",
        ),
        Race(
            "confirm-beside-sweeper",
            setup(lapsed="bk-0"),
            [("confirm", handled(confirm("bk-0"))), ("sweeper", sweeper)],
            lapsed_never_sold,
            about="a lapsed hold is confirmed while the sweeper expires it",
        ),
        Race(
            "release-beside-confirm",
            setup(live="bk-0"),
            [("confirm", handled(confirm("bk-0"))), ("release", handled(release("bk-0")))],
            released,
            about="a confirmation and its compensation side by side",
        ),
    ]


def races() -> list[Race]:
    """The races of the airline as shipped (``--races sagakit_airline.races:races``)."""
    from .app import app

    return races_of(app)


def _cmd(type_: str, booking: str, step: str, payload: dict[str, Any], **kw: Any) -> Envelope:
    return command(seats.NAME, type_, payload, saga_id=f"saga-{booking}", step=step, **kw)


async def _seed(outcome: Awaitable[object], what: str) -> None:
    done = await outcome
    if not (isinstance(done, Outcome) and done.ok):
        raise RuntimeError(f"seeding {what}: {done}")


def quote(booking: str) -> Envelope:
    """The booking's QuoteFare."""
    return _cmd("QuoteFare", booking, "quote", {"booking": booking, "flight": FLIGHT})


def hold(booking: str) -> Envelope:
    """The booking's HoldSeat."""
    return _cmd("HoldSeat", booking, "hold_seat", {"booking": booking, "flight": FLIGHT})


def confirm(booking: str) -> Envelope:
    """The booking's ConfirmSeat."""
    return _cmd("ConfirmSeat", booking, "confirm_seat", {"booking": booking})


def release(booking: str) -> Envelope:
    """ReleaseSeat, the compensation of the booking's confirmation."""
    return _cmd("ReleaseSeat", booking, "confirm_seat", {"booking": booking}, rung=0)


async def sweeper(store: Any) -> int:
    """An actor: the sweeper, run once at :data:`NOW`."""
    with using(lambda: NOW):
        return await seats.sweep(store)


async def books(store: SQLiteStore) -> tuple[list[str], dict[str, str]]:
    """The flight's broken rules, and every booking's hold status."""
    async with store.transaction() as tx:
        row = await tx.fetchone(
            "SELECT capacity, held, sold FROM flights WHERE flight = ?", (FLIGHT,)
        )
        statuses = {
            str(b): str(s) for b, s in await tx.fetchall("SELECT booking, status FROM holds")
        }
    assert row is not None
    capacity, held, sold = (int(x) for x in row)
    rows = (
        sum(1 for s in statuses.values() if s == "HELD"),
        sum(1 for s in statuses.values() if s == "SOLD"),
    )
    problems = []
    if held + sold > capacity:
        problems.append(f"oversold: {held} held + {sold} sold > {capacity} seats")
    if (held, sold) != rows:
        problems.append(f"counters: {held} held, {sold} sold; the holds say {rows}")
    return problems, statuses


def _ok(outcome: object) -> bool:
    return isinstance(outcome, Outcome) and outcome.ok


async def one_winner(store: SQLiteStore, outcomes: Sequence[object]) -> list[str]:
    """One hold wins the last seat; the other is refused for good."""
    problems, statuses = await books(store)
    winners = [o for o in outcomes if _ok(o)]
    if len(winners) != 1:
        problems.append(f"{len(winners)} bookings hold the one seat: {list(outcomes)}")
    if sorted(statuses.values()) != ["HELD"]:
        problems.append(f"holds: {statuses}")
    return problems


async def new_hold_wins(store: SQLiteStore, outcomes: Sequence[object]) -> list[str]:
    """The lapsed hold is expired once and the new booking gets its seat."""
    problems, statuses = await books(store)
    if not _ok(outcomes[0]):
        problems.append(f"bk-1 was refused the seat a lapsed hold left: {outcomes[0]}")
    if statuses.get("bk-0") != "EXPIRED":
        problems.append(f"the lapsed hold is {statuses.get('bk-0')}, not EXPIRED")
    return problems


async def lapsed_never_sold(store: SQLiteStore, outcomes: Sequence[object]) -> list[str]:
    """The confirmation of a lapsed hold is refused; the hold ends EXPIRED."""
    problems, statuses = await books(store)
    if _ok(outcomes[0]):
        problems.append("a lapsed hold was confirmed")
    if statuses.get("bk-0") != "EXPIRED":
        problems.append(f"the lapsed hold is {statuses.get('bk-0')}, not EXPIRED")
    return problems


async def released(store: SQLiteStore, outcomes: Sequence[object]) -> list[str]:
    """Whichever runs first, the seat is given back once."""
    problems, statuses = await books(store)
    if statuses.get("bk-0") != "RELEASED":
        problems.append(f"the hold is {statuses.get('bk-0')}, not RELEASED")
    if not _ok(outcomes[1]):
        problems.append(f"the compensation failed: {outcomes[1]}")
    return problems
