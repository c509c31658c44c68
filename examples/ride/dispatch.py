"""The dispatch service: drivers, rides, and the people who act on them.

Its own database holds the drivers of each zone, one row per ride, the riders' cancel
requests, and the commands that wait for a person. Three of the saga's steps are human
steps, which the engine sees as ordinary commands answered late:

* ``FindDriver``: a driver accepts the offer (or none does in time);
* ``StartTrip`` (the saga's pivot): the driver picks the rider up;
* ``EndTrip``: the driver ends the trip, minutes to an hour later.

Each handler records the request, keeps the command (``Envelope.to_json``) in the
``waiting`` table and returns :data:`~sagakit.runtime.participant.DEFER`: no answer yet.
When the person acts, the service answers it with :meth:`Service.answer
<sagakit.Service.answer>`, in the same transaction as the ride's new state. A retry of
the command (the step's timeout ran out while the driver was still thinking) runs the
handler again, which finds the ride and defers again, keeping the newest copy.

The people are a fake external system played by the service's job ``people``, from
times derived from the ride itself (``random.Random(ride id)``, so a seed replays
exactly): the driver pool accepts an offer when a driver of the ride's zone is free,
drives to the pickup, and ends the trip; the rider app sends the rider's cancel at the
minute the ride's data says. The job runs when the next of those moments comes
(``due``): exactly then under the simulator and the testing kit, on their virtual
clock.

A rider's cancel is honoured only before the pickup: the service turns it into a
failure of the step that waits (``FindDriver`` or ``StartTrip``), and the saga
compensates (the driver is released, the hold on the card too). Once the trip started
(the pivot), the cancel is refused: the rider is driven and the fare is captured.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

from sagakit import (
    AppContext,
    Envelope,
    Outcome,
    Participant,
    Service,
    StepFailed,
    failure,
    success,
)
from sagakit import now as clock_now
from sagakit.runtime.participant import DEFER, HandlerResult
from sagakit.stores.base import SQLStore, Tx

from .fares import fare_for
from .timing import minute_of

NAME = "dispatch"
"""The service's endpoint name."""

JOB_EVERY = 0.1
"""Seconds between two runs of the ``people`` job in a real process (under the
simulator and the testing kit it runs exactly when its ``due`` says)."""

MIGRATIONS = [
    """
    CREATE TABLE drivers (
        driver_id TEXT NOT NULL PRIMARY KEY,
        zone      TEXT NOT NULL,
        ride      TEXT
    );
    CREATE TABLE rides (
        ride         TEXT NOT NULL PRIMARY KEY,
        rider        TEXT NOT NULL,
        zone         TEXT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN
                     ('REQUESTED', 'ACCEPTED', 'STARTED', 'ENDED', 'CANCELLED', 'WITHDRAWN')),
        driver       TEXT,
        minutes      BIGINT NOT NULL,
        requested_at DOUBLE PRECISION NOT NULL,
        accept_at    DOUBLE PRECISION NOT NULL,
        eta_s        DOUBLE PRECISION NOT NULL,
        trip_s       DOUBLE PRECISION NOT NULL,
        accepted_at  DOUBLE PRECISION,
        pickup_at    DOUBLE PRECISION,
        started_at   DOUBLE PRECISION,
        ends_at      DOUBLE PRECISION,
        ended_at     DOUBLE PRECISION,
        fare         BIGINT,
        why          TEXT
    );
    CREATE TABLE rider_cancels (
        ride       TEXT NOT NULL PRIMARY KEY,
        at         DOUBLE PRECISION NOT NULL,
        status     TEXT NOT NULL CHECK (status IN ('WAITING', 'ACCEPTED', 'REFUSED')),
        decided_at DOUBLE PRECISION,
        why        TEXT
    );
    CREATE TABLE waiting (
        ride    TEXT NOT NULL,
        command TEXT NOT NULL,
        fence   BIGINT NOT NULL,
        attempt BIGINT NOT NULL,
        message TEXT NOT NULL,
        PRIMARY KEY (ride, command)
    );
    """,
]
"""Schema steps (append new ones, never edit these).

``drivers.ride`` is the ride a driver serves now (NULL: free). ``rides`` keeps the
times the people act at: ``accept_at`` (a driver looks at the offer), ``eta_s`` and
``trip_s`` (seconds from accepting to the pickup, and of the trip), set when the ride
is requested; ``minutes`` is the trip's length, the basis of its fare. ``waiting``
holds the newest copy of each command a person has yet to answer."""

RIDER_CANCELLED = "the rider cancelled"
"""The reason of a step that fails because the rider cancelled."""


def plan(ride: str, minutes: int, detour: bool, minute: float) -> tuple[float, float, float, int]:
    """When the people act on ``ride``: (seconds until a driver looks at the offer,
    seconds from accepting to the pickup, seconds of the trip, the trip's minutes), with
    ``minute`` seconds to a story minute.

    Drawn from ``random.Random(ride)``: the same ride always plays the same way.
    """
    rng = random.Random(ride)
    accept = rng.uniform(0.2, 1.5) * minute
    eta = rng.uniform(2.0, 8.0) * minute
    stretch = 2.0 if detour else rng.uniform(0.85, 1.15)
    return accept, eta, minutes * stretch * minute, max(1, round(minutes * stretch))


# -- the commands a person answers later ------------------------------------------------


async def keep_waiting(tx: Tx, ride: str, env: Envelope) -> None:
    """Keep ``env`` as the copy to answer, unless a newer one is kept already.

    The newest copy (highest fence, then attempt) is the try the saga waits on: a
    failure answering an older try would be stale, and the saga would learn of it only
    at its next retry.
    """
    row = await tx.fetchone(
        "SELECT fence, attempt FROM waiting WHERE ride = ? AND command = ?", (ride, env.type)
    )
    if row is None:
        await tx.execute(
            "INSERT INTO waiting (ride, command, fence, attempt, message) VALUES (?, ?, ?, ?, ?)",
            (ride, env.type, env.fence, env.attempt, env.to_json()),
        )
    elif (env.fence, env.attempt) > (int(row[0]), int(row[1])):
        await tx.execute(
            "UPDATE waiting SET fence = ?, attempt = ?, message = ? WHERE ride = ? AND command = ?",
            (env.fence, env.attempt, env.to_json(), ride, env.type),
        )


async def is_waiting(tx: Tx, ride: str, command: str) -> bool:
    """True when a ``command`` of ``ride`` waits for a person's answer."""
    row = await tx.fetchone("SELECT 1 FROM waiting WHERE ride = ? AND command = ?", (ride, command))
    return row is not None


async def forget_waiting(tx: Tx, ride: str, command: str) -> None:
    """Drop the kept ``command`` of ``ride`` (it will never be answered by a person)."""
    await tx.execute("DELETE FROM waiting WHERE ride = ? AND command = ?", (ride, command))


# -- the service ------------------------------------------------------------------------


class Dispatch:
    """The dispatch service's handlers and its people, for one app.

    ``bug``: ``"cancel_after_start"`` plants the bug the simulator must catch (a rider's
    cancel accepted after the trip started); None in the real app.
    """

    def __init__(self, *, bug: str | None = None) -> None:
        self.bug = bug
        self.service = Service(NAME, migrations=MIGRATIONS, build=self._build)
        self.service.every(JOB_EVERY, "people", due=self.next_move)(self.people)
        # The people's moves, in the order they win a tie (see :func:`_moves`).
        self._play: tuple[Callable[[Tx, str, float], Awaitable[None]], ...] = (
            self._rider_cancels,
            self._driver_accepts,
            self._driver_picks_up,
            self._driver_drops_off,
        )

    # The participant is built in the process that runs the service, with its options:
    # the handlers need the length of a story minute (``--minute-seconds``).
    def _build(self, store: SQLStore, ctx: AppContext) -> Participant:
        minute = minute_of(ctx)
        p = Participant(NAME, store)
        handlers: dict[str, Callable[[Tx, Envelope], Awaitable[HandlerResult]]] = {
            "FindDriver": lambda tx, env: self.find_driver(tx, env, minute),
            "ReleaseDriver": self.release_driver,
            "StartTrip": self.start_trip,
            "GetTrip": self.get_trip,
            "EndTrip": self.end_trip,
        }
        for message_type, handler in handlers.items():
            p.add_handler(message_type, handler)
        return p

    async def answer(self, tx: Tx, ride: str, command: str, outcome: Outcome) -> bool:
        """Answer the kept ``command`` of ``ride`` (and forget it); False when none is
        kept, or when its key already has an answer (a compensation came first)."""
        row = await tx.fetchone(
            "SELECT message FROM waiting WHERE ride = ? AND command = ?", (ride, command)
        )
        if row is None:
            return False
        # The row is claimed by deleting it: of two processes playing the same move,
        # one deletes it and answers, the other finds nothing to delete.
        if not await tx.execute(
            "DELETE FROM waiting WHERE ride = ? AND command = ?", (ride, command)
        ):
            return False
        return await self.service.answer(tx, Envelope.from_json(row[0]), outcome, clock_now())

    # -- handlers -----------------------------------------------------------------------
    # --8<-- [start:find_driver]
    async def find_driver(self, tx: Tx, env: Envelope, minute: float) -> HandlerResult:
        """Offer the ride to the drivers of its zone; answered when one accepts."""
        ride = _text(env, "ride")
        row = await tx.fetchone("SELECT status, driver, why FROM rides WHERE ride = ?", (ride,))
        if row is None:
            at = clock_now()
            minutes = _whole(env, "minutes")
            detour = bool(env.payload.get("detour"))
            accept, eta, trip, actual = plan(ride, minutes, detour, minute)
            await tx.execute(
                "INSERT INTO rides (ride, rider, zone, status, minutes, requested_at, "
                "accept_at, eta_s, trip_s) VALUES (?, ?, ?, 'REQUESTED', ?, ?, ?, ?, ?)",
                (ride, _text(env, "rider"), _text(env, "zone"), actual, at, at + accept, eta, trip),
            )
            cancel_after = env.payload.get("cancel_after")
            if isinstance(cancel_after, int | float) and not isinstance(cancel_after, bool):
                # The rider app: this rider presses "cancel" that many minutes from now.
                await tx.execute(
                    "INSERT INTO rider_cancels (ride, at, status) VALUES (?, ?, 'WAITING')",
                    (ride, at + float(cancel_after) * minute),
                )
            await keep_waiting(tx, ride, env)
            return DEFER
        status, driver, why = row
        if status == "REQUESTED":  # a retry while the drivers think: wait on
            await keep_waiting(tx, ride, env)
            return DEFER
        if status in ("CANCELLED", "WITHDRAWN"):
            raise StepFailed(why or f"the ride was {status.lower()}")
        # Accepted already. (A repeat gets the answer recorded under its key without
        # reaching this handler: a safety net only.)
        return {"driver": driver}

    # --8<-- [end:find_driver]
    async def release_driver(self, tx: Tx, env: Envelope) -> dict[str, Any]:
        """The compensation of FindDriver: withdraw the offer, free the driver if one
        accepted. Accepts "nothing to release" (no offer arrived: the runtime then
        tombstones the FindDriver's key, and a late one is refused)."""
        ride = _text(env, "ride")
        row = await tx.fetchone("SELECT status, driver FROM rides WHERE ride = ?", (ride,))
        if row is None or row[0] in ("CANCELLED", "WITHDRAWN"):
            return {"released": False}
        status, driver = row
        if status in ("STARTED", "ENDED"):
            # Only a person's "compensate" on a pivot whose outcome was unknown gets here:
            # the rider is (or was) on board, so nothing is undone. The ladder stops here,
            # before the hold is released, and the person decides.
            raise StepFailed(f"the trip of ride {ride} has started; it cannot be withdrawn")
        await tx.execute(
            "UPDATE rides SET status = 'WITHDRAWN', why = ? WHERE ride = ?",
            ("no driver in time" if status == "REQUESTED" else "withdrawn by the saga", ride),
        )
        if driver is not None:
            await tx.execute(
                "UPDATE drivers SET ride = NULL WHERE driver_id = ? AND ride = ?", (driver, ride)
            )
        await forget_waiting(tx, ride, "FindDriver")
        await forget_waiting(tx, ride, "StartTrip")
        return {"released": True, "driver": driver}

    async def start_trip(self, tx: Tx, env: Envelope) -> HandlerResult:
        """The pivot: answered when the driver picks the rider up (or the rider cancels
        first)."""
        ride = _text(env, "ride")
        row = await tx.fetchone(
            "SELECT status, driver, started_at, why FROM rides WHERE ride = ?", (ride,)
        )
        if row is None:
            raise StepFailed(f"dispatch knows no ride {ride}")
        status, driver, started_at, why = row
        if status == "ACCEPTED":
            await keep_waiting(tx, ride, env)
            return DEFER
        if status in ("STARTED", "ENDED"):
            return {"driver": driver, "started_at": started_at}
        if status == "REQUESTED":
            raise StepFailed("no driver has accepted the ride yet", retryable=True)
        raise StepFailed(why or f"the ride was {status.lower()}")

    async def get_trip(self, tx: Tx, env: Envelope) -> dict[str, Any]:
        """The pivot's status query: did the trip start? (Asked when its answer is late.)"""
        ride = _text(env, "ride")
        row = await tx.fetchone(
            "SELECT status, driver, started_at, why FROM rides WHERE ride = ?", (ride,)
        )
        if row is None or row[0] == "REQUESTED":
            return {"state": "not_found"}
        status, driver, started_at, why = row
        if status in ("STARTED", "ENDED"):
            return {"state": "done", "result": {"driver": driver, "started_at": started_at}}
        if status == "ACCEPTED":
            # Waiting for the pickup, or the StartTrip never arrived (send it again).
            pending = await is_waiting(tx, ride, "StartTrip")
            return {"state": "pending" if pending else "not_found"}
        return {"state": "failed", "reason": why or f"the ride was {status.lower()}"}

    async def end_trip(self, tx: Tx, env: Envelope) -> HandlerResult:
        """After the pivot: answered with the fare when the driver ends the trip."""
        ride = _text(env, "ride")
        row = await tx.fetchone(
            "SELECT status, driver, minutes, fare, why FROM rides WHERE ride = ?", (ride,)
        )
        if row is None:
            raise StepFailed(f"dispatch knows no ride {ride}")
        status, driver, minutes, fare, why = row
        if status == "STARTED":
            await keep_waiting(tx, ride, env)
            return DEFER
        if status == "ENDED":
            return {"driver": driver, "minutes": int(minutes), "fare": int(fare)}
        raise StepFailed(why or f"the trip did not happen: the ride is {status.lower()}")

    # -- the people -----------------------------------------------------------------------
    # --8<-- [start:people]
    async def next_move(self, store: SQLStore) -> float | None:
        """When a person next acts (the ``people`` job's ``due``), None if nobody will."""
        async with store.transaction() as tx:
            moves = await _moves(tx, None)
        return min((m[0] for m in moves), default=None)

    async def people(self, store: SQLStore) -> int:
        """Play every person's move that is due, in the order they come; how many."""
        done = 0
        async with store.transaction() as tx:
            at = clock_now()
            for _ in range(10_000):  # a bound, far above what one run meets
                moves = await _moves(tx, at)
                if not moves:
                    break
                _, rank, ride = min(moves)
                await self._play[rank](tx, ride, at)
                done += 1
        return done

    # --8<-- [end:people]
    # --8<-- [start:rider_cancel]
    async def _rider_cancels(self, tx: Tx, ride: str, at: float) -> None:
        """The rider presses "cancel"."""
        row = await tx.fetchone("SELECT status, driver FROM rides WHERE ride = ?", (ride,))
        status, driver = (None, None) if row is None else row
        why: str | None = None
        if status == "REQUESTED":
            await self._cancel_ride(tx, ride, None)
            await self.answer(tx, ride, "FindDriver", failure(RIDER_CANCELLED))
        elif status == "ACCEPTED":
            await self._cancel_ride(tx, ride, driver)
            # The StartTrip may not have arrived yet: its handler then finds the ride
            # cancelled and fails on its own.
            await self.answer(tx, ride, "StartTrip", failure(RIDER_CANCELLED))
        elif status == "STARTED" and self.bug == "cancel_after_start":
            # PLANTED BUG: the cancel is honoured although the rider is on board.
            await self._cancel_ride(tx, ride, driver)
            await self.answer(tx, ride, "EndTrip", failure(RIDER_CANCELLED))
        elif status == "STARTED":
            why = "the trip has started: past the point of no return"
        else:
            why = f"nothing to cancel: the ride is {(status or 'unknown').lower()}"
        await tx.execute(
            "UPDATE rider_cancels SET status = ?, decided_at = ?, why = ? WHERE ride = ?",
            ("ACCEPTED" if why is None else "REFUSED", at, why, ride),
        )

    # --8<-- [end:rider_cancel]
    async def _cancel_ride(self, tx: Tx, ride: str, driver: str | None) -> None:
        """Cancel the ride for its rider, freeing its driver if one was taken."""
        await tx.execute(
            "UPDATE rides SET status = 'CANCELLED', why = ? WHERE ride = ?", (RIDER_CANCELLED, ride)
        )
        if driver is not None:
            await tx.execute(
                "UPDATE drivers SET ride = NULL WHERE driver_id = ? AND ride = ?", (driver, ride)
            )

    async def _driver_accepts(self, tx: Tx, ride: str, at: float) -> None:
        """A free driver of the ride's zone accepts the offer."""
        row = await tx.fetchone("SELECT zone, eta_s FROM rides WHERE ride = ?", (ride,))
        assert row is not None  # _moves found it
        zone, eta = row
        found = await tx.fetchone(
            "SELECT driver_id FROM drivers WHERE zone = ? AND ride IS NULL "
            "ORDER BY driver_id LIMIT 1",
            (zone,),
        )
        assert found is not None  # _moves found one
        driver = found[0]
        # Take the driver first, by a conditional update: two processes playing this
        # move cannot both take the driver (the loser looks again at its next run).
        if not await tx.execute(
            "UPDATE drivers SET ride = ? WHERE driver_id = ? AND ride IS NULL", (ride, driver)
        ):
            return
        if not await self.answer(tx, ride, "FindDriver", success({"driver": driver})):
            # The offer was answered or withdrawn first: nobody drives.
            await tx.execute(
                "UPDATE drivers SET ride = NULL WHERE driver_id = ? AND ride = ?", (driver, ride)
            )
            await tx.execute(
                "UPDATE rides SET status = 'WITHDRAWN', why = ? WHERE ride = ? "
                "AND status = 'REQUESTED'",
                ("the offer was withdrawn", ride),
            )
            return
        await tx.execute(
            "UPDATE rides SET status = 'ACCEPTED', driver = ?, accepted_at = ?, pickup_at = ? "
            "WHERE ride = ? AND status = 'REQUESTED'",
            (driver, at, at + float(eta), ride),
        )

    async def _driver_picks_up(self, tx: Tx, ride: str, at: float) -> None:
        """The driver picks the rider up: the trip starts (the pivot's answer)."""
        row = await tx.fetchone("SELECT driver, trip_s FROM rides WHERE ride = ?", (ride,))
        assert row is not None
        driver, trip = row
        if not await self.answer(
            tx, ride, "StartTrip", success({"driver": driver, "started_at": at})
        ):
            return
        await tx.execute(
            "UPDATE rides SET status = 'STARTED', started_at = ?, ends_at = ? "
            "WHERE ride = ? AND status = 'ACCEPTED'",
            (at, at + float(trip), ride),
        )

    async def _driver_drops_off(self, tx: Tx, ride: str, at: float) -> None:
        """The driver ends the trip: the fare is known, the driver is free again."""
        row = await tx.fetchone("SELECT driver, minutes FROM rides WHERE ride = ?", (ride,))
        assert row is not None
        driver, minutes = row
        fare = fare_for(int(minutes))
        await tx.execute(
            "UPDATE rides SET status = 'ENDED', ended_at = ?, fare = ? "
            "WHERE ride = ? AND status = 'STARTED'",
            (at, fare, ride),
        )
        await tx.execute(
            "UPDATE drivers SET ride = NULL WHERE driver_id = ? AND ride = ?", (driver, ride)
        )
        # The EndTrip may not have arrived yet: its handler then answers from the ride.
        await self.answer(
            tx, ride, "EndTrip", success({"driver": driver, "minutes": int(minutes), "fare": fare})
        )


async def _moves(tx: Tx, until: float | None) -> list[tuple[float, int, str]]:
    """The people's next moves: ``(time, rank, ride)``, the earliest of each kind (due
    by ``until``, or at any time when None). The rank is the kind's place in
    :attr:`Dispatch._play`, the order in which kinds win a tie: a cancel pressed at the
    very moment of the pickup counts."""
    bound = "" if until is None else " AND {t} <= ?"
    args: tuple[Any, ...] = () if until is None else (until,)
    queries = (
        # The rider presses "cancel".
        "SELECT at, ride FROM rider_cancels WHERE status = 'WAITING'"
        + bound.format(t="at")
        + " ORDER BY at, ride LIMIT 1",
        # A driver accepts. An offer waits while every driver of its zone is busy: it
        # is a move only once one is free (a trip ends, a driver is released).
        "SELECT r.accept_at, r.ride FROM rides r WHERE r.status = 'REQUESTED'"
        + bound.format(t="r.accept_at")
        + " AND EXISTS (SELECT 1 FROM drivers d WHERE d.zone = r.zone AND d.ride IS NULL)"
        " AND EXISTS (SELECT 1 FROM waiting w WHERE w.ride = r.ride"
        " AND w.command = 'FindDriver') ORDER BY r.accept_at, r.ride LIMIT 1",
        # The driver picks the rider up: it takes the StartTrip (the driver's app).
        "SELECT r.pickup_at, r.ride FROM rides r WHERE r.status = 'ACCEPTED'"
        + bound.format(t="r.pickup_at")
        + " AND EXISTS (SELECT 1 FROM waiting w WHERE w.ride = r.ride"
        " AND w.command = 'StartTrip') ORDER BY r.pickup_at, r.ride LIMIT 1",
        # The driver drops the rider off.
        "SELECT ends_at, ride FROM rides WHERE status = 'STARTED'"
        + bound.format(t="ends_at")
        + " ORDER BY ends_at, ride LIMIT 1",
    )
    moves: list[tuple[float, int, str]] = []
    for rank, sql in enumerate(queries):
        row = await tx.fetchone(sql, args)
        if row is not None:
            moves.append((float(row[0]), rank, str(row[1])))
    return moves


def _text(env: Envelope, name: str) -> str:
    value = env.payload.get(name)
    if not isinstance(value, str) or not value:
        raise StepFailed(f"{env.type}: payload field {name!r} must be a non-empty string")
    return value


def _whole(env: Envelope, name: str) -> int:
    value = env.payload.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise StepFailed(f"{env.type}: payload field {name!r} must be a positive whole number")
    return value
