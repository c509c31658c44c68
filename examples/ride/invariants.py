"""The ride's invariants, read from the services' own ledgers.

At every moment (:func:`watch`, after every step of ``sagakit simulate``):

* ``started-never-cancelled``: a trip that started is never cancelled nor withdrawn;
* ``charged-once``: a ride is captured at most once, never above its hold, and a
  hold is never both released and captured;
* ``capture-needs-hold``: no capture without a hold placed first;
* ``capture-after-trip``: a ride is captured only once its trip ended, for the fare
  the trip ended with;
* ``drivers``: a driver serves at most one ride, and a ride a driver was taken for
  (accepted or on its trip) holds its driver.

At the end of a run (:func:`invariants`), once every saga ended:

* ``paid``: a ride whose saga succeeded ended its trip, and its fare was captured;
* ``every-trip-paid``: every trip that started ends with its fare captured;
* ``nothing-left-behind``: a ride whose saga was compensated keeps no hold on the
  card and no driver, and its offer is closed.

The end checks compare a saga's end with the books, so they leave out the rides a
person owns: sagas still in the manual queue, and those a person vouched for (see
:func:`sagakit.testing.app_checks.settled_by_hand`). The checks of every moment hold
whatever the sagas' states.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from sagakit import SagaState
from sagakit.testing.app_checks import sagas_by_key, settled_by_hand

from .sagas import RIDE

if TYPE_CHECKING:
    from sagakit import Deployment


async def _payments(dep: Deployment) -> tuple[dict[str, tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(ride -> (amount, status, captured), the card ledger's (ride, op, amount) rows).

    One statement, so one snapshot: on PostgreSQL each statement of a transaction sees
    what committed before it started, and a release landing between two statements
    would show a hold and a ledger that never existed together.
    """
    async with dep.store("payments").snapshot() as tx:
        rows = await tx.fetchall(
            "SELECT 'hold', ride, status, amount, captured FROM holds "
            "UNION ALL SELECT 'ledger', ride, op, amount, NULL FROM card_ledger"
        )
    holds = {r[1]: (r[3], r[2], r[4]) for r in rows if r[0] == "hold"}
    ledger = [(r[1], r[2], r[3]) for r in rows if r[0] == "ledger"]
    return holds, ledger


async def _dispatch(
    dep: Deployment,
) -> tuple[dict[str, tuple[Any, ...]], list[tuple[Any, ...]], set[str]]:
    """(ride -> (status, driver, started_at, fare), the drivers' (driver, ride) rows,
    the rides whose offer waits), in one statement (one snapshot, see
    :func:`_payments`)."""
    async with dep.store("dispatch").snapshot() as tx:
        rows = await tx.fetchall(
            "SELECT 'ride', ride, status, driver, started_at, fare FROM rides "
            "UNION ALL SELECT 'driver', driver_id, NULL, ride, NULL, NULL FROM drivers "
            "UNION ALL SELECT 'waiting', ride, command, NULL, NULL, NULL FROM waiting"
        )
    rides = {r[1]: (r[2], r[3], r[4], r[5]) for r in rows if r[0] == "ride"}
    drivers = [(r[1], r[3]) for r in rows if r[0] == "driver"]
    waiting = {r[1] for r in rows if r[0] == "waiting" and r[2] == "FindDriver"}
    return rides, drivers, waiting


async def watch(dep: Deployment) -> list[str]:
    """The checks that hold at every moment (see the module docstring)."""
    # The payments ledger follows dispatch (a capture comes after the trip's end), so it
    # is read first: what it shows already happened at dispatch.
    holds, ledger = await _payments(dep)
    rides, drivers, _ = await _dispatch(dep)
    problems: list[str] = []

    for ride, (status, _driver, started_at, _fare) in sorted(rides.items()):
        if started_at is not None and status in ("CANCELLED", "WITHDRAWN"):
            problems.append(
                f"started-never-cancelled: ride {ride} started its trip and was then "
                f"{status.lower()}"
            )

    ops: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for ride, op, amount in ledger:
        ops[ride].append((op, int(amount)))
    for ride, rows in sorted(ops.items()):
        kinds = [op for op, _ in rows]
        held = sum(a for op, a in rows if op == "hold")
        captured = [a for op, a in rows if op == "capture"]
        if "capture" in kinds and "hold" not in kinds:
            problems.append(f"capture-needs-hold: ride {ride} was captured without a hold")
        if len(captured) > 1 or kinds.count("hold") > 1:
            problems.append(
                f"charged-once: ride {ride} has {kinds.count('hold')} holds and "
                f"{len(captured)} captures"
            )
        if captured and sum(captured) > held:
            problems.append(
                f"charged-once: ride {ride} was captured {sum(captured)} cents, above its "
                f"hold of {held}"
            )
        if "capture" in kinds and "release" in kinds:
            problems.append(f"charged-once: the hold of ride {ride} was released and captured")
        hold = holds.get(ride)
        expected = (
            "CAPTURED" if "capture" in kinds else "RELEASED" if "release" in kinds else "HELD"
        )
        if hold is None or hold[1] != expected:
            problems.append(
                f"charged-once: the hold of ride {ride} is {None if hold is None else hold[1]}, "
                f"its card ledger says {expected}"
            )
        if captured:
            fare = rides.get(ride, (None, None, None, None))
            if fare[0] != "ENDED" or fare[3] != captured[0]:
                problems.append(
                    f"capture-after-trip: ride {ride} was captured {captured[0]} cents; at "
                    f"dispatch it is {fare[0]} with fare {fare[3]}"
                )

    serving: dict[str, str] = {}
    for driver, ride in drivers:
        if ride is None:
            continue
        serving[ride] = driver
        status, assigned = rides.get(ride, (None, None, None, None))[:2]
        if status not in ("ACCEPTED", "STARTED") or assigned != driver:
            problems.append(
                f"drivers: driver {driver} is held by ride {ride}, which is {status} "
                f"with driver {assigned}"
            )
    for ride, (status, driver, _, _) in sorted(rides.items()):
        if status in ("ACCEPTED", "STARTED") and serving.get(ride) != driver:
            problems.append(
                f"drivers: ride {ride} is {status} with driver {driver}, who serves "
                f"{next((r for r, d in serving.items() if d == driver), None)}"
            )
    return problems


async def invariants(dep: Deployment) -> list[str]:
    """The checks at the end of a run (see the module docstring)."""
    sagas = await sagas_by_key(dep, RIDE)
    by_hand = await settled_by_hand(dep, RIDE)
    holds, _ = await _payments(dep)
    rides, _, waiting = await _dispatch(dep)
    problems: list[str] = []
    persons = {
        key
        for key, inst in sagas.items()
        if inst.state is SagaState.FAILED_NEEDS_MANUAL or key in by_hand
    }
    for key, inst in sorted(sagas.items()):
        if key in persons:
            continue
        state = inst.state.value
        hold = holds.get(key)
        ride = rides.get(key)
        if inst.state is SagaState.SUCCEEDED:
            if ride is None or ride[0] != "ENDED":
                problems.append(
                    f"paid: ride {key} is {state} but its trip is "
                    f"{None if ride is None else ride[0]}"
                )
            elif hold is None or hold[1] != "CAPTURED" or hold[2] != ride[3]:
                problems.append(
                    f"paid: ride {key} is {state} with fare {ride[3]}, its hold is "
                    f"{None if hold is None else hold[1:]}"
                )
        elif inst.state in (SagaState.COMPENSATED, SagaState.TIMED_OUT):
            if hold is not None and hold[1] != "RELEASED":
                problems.append(
                    f"nothing-left-behind: ride {key} is {state}, its hold is {hold[1]}"
                )
            if ride is not None and ride[0] not in ("CANCELLED", "WITHDRAWN"):
                problems.append(
                    f"nothing-left-behind: ride {key} is {state}, at dispatch it is {ride[0]}"
                )
            if key in waiting:
                problems.append(f"nothing-left-behind: ride {key} is {state}, its offer waits")
        else:
            problems.append(f"paid: ride {key} ended {state}, which no ride should")
    for key, (_status, _driver, started_at, _fare) in sorted(rides.items()):
        if started_at is None or key in persons:
            continue
        hold = holds.get(key)
        if hold is None or hold[1] != "CAPTURED":
            problems.append(
                f"every-trip-paid: the trip of ride {key} started, its fare is not captured "
                f"(hold {None if hold is None else hold[1]}, saga "
                f"{sagas[key].state.value if key in sagas else None})"
            )
    return problems
