"""An app of a user's own runs on a deployment: every role in one process on SQLite,
its service's migrations and jobs, and ``sagakit demo --app`` with its load driver and
invariants."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from sagakit import (
    App,
    Deployment,
    Envelope,
    SagaDefinition,
    SagaState,
    SagaView,
    Service,
    Step,
    StepContext,
    StepFailed,
    StepKind,
    command,
)
from sagakit.app_demo import DemoRequest, run_app_demo
from sagakit.errors import ConfigurationError
from sagakit.stores.base import SQLStore, Tx


def book_flight(ctx: StepContext) -> dict[str, str]:
    return {"flight": f"F-{ctx.business_key}"}


def cancel_flight(ctx: StepContext) -> None:
    return None


async def charge(ctx: StepContext) -> dict[str, int]:
    if ctx.data.get("card") == "declined":
        raise StepFailed("card declined")
    return {"charged": int(ctx.data["price"])}


def confirm(ctx: StepContext) -> dict[str, bool]:
    return {"sent": True}


def nights(v: SagaView) -> dict[str, Any]:
    return {"trip": v.business_key, "nights": v.data["nights"]}


def ref(v: SagaView) -> dict[str, Any]:
    return {"trip": v.business_key}


TRIP = SagaDefinition(
    "trip",
    version=1,
    deadline=60.0,
    started_status="BOOKING",
    steps=[
        Step("flight", book_flight, cancel_flight, timeout=5.0),
        Step(
            "hotel",
            command("hotel", "BookHotel", nights),
            command("hotel", "CancelHotel", ref),
            timeout=5.0,
        ),
        Step("charge", charge, kind=StepKind.PIVOT, status="CHARGING", timeout=5.0),
        Step("confirm", confirm, kind=StepKind.RETRIABLE, status="CONFIRMING", timeout=5.0),
    ],
)


def load(count: int, seed: int) -> Sequence[tuple[str, str, dict[str, Any]]]:
    out = []
    for i in range(count):
        data: dict[str, Any] = {"nights": 2 + i % 3, "price": 100 + i, "card": "ok"}
        if i % 5 == 3:
            data["nights"] = 30  # no hotel takes that: compensated before the pivot
        if i % 7 == 5:
            data["card"] = "declined"  # the pivot fails: compensated too
        out.append(("trip", f"trip-{seed}-{i:04d}", data))
    return out


async def hotel_invariants(dep: Deployment) -> list[str]:
    """A booking is kept exactly for the trips that succeeded."""
    store = dep.store("hotel")
    async with store.transaction() as tx:
        rows = await tx.fetchall("SELECT trip, status FROM bookings")
    kept = {trip for trip, status in rows if status == "booked"}
    orchestrator = dep.store("orchestrator")
    page = await orchestrator.list_sagas(states=[SagaState.SUCCEEDED], limit=10_000)
    succeeded = {inst.business_key for inst in page}
    problems = [f"{t}: booking kept but the trip did not succeed" for t in kept - succeeded]
    problems += [f"{t}: the trip succeeded without a booking" for t in succeeded - kept]
    return problems


travel = App("travel_test", [TRIP], load=load, invariants=hotel_invariants)
hotel = travel.service(
    "hotel",
    migrations=[
        "CREATE TABLE bookings (trip TEXT PRIMARY KEY, nights INTEGER NOT NULL,"
        " status TEXT NOT NULL)",
        "CREATE TABLE sweeps (n INTEGER NOT NULL)",
    ],
)


@hotel.handles("BookHotel")
async def book_hotel(tx: Tx, env: Envelope) -> dict[str, str]:
    trip, n = env.payload["trip"], env.payload["nights"]
    if n > 14:
        raise StepFailed(f"no room for {n} nights")
    await tx.execute(
        "INSERT INTO bookings (trip, nights, status) VALUES (?, ?, 'booked')", (trip, n)
    )
    return {"booking": f"H-{trip}"}


@hotel.handles("CancelHotel")
async def cancel_hotel(tx: Tx, env: Envelope) -> dict[str, int]:
    changed = await tx.execute(
        "UPDATE bookings SET status = 'cancelled' WHERE trip = ?", (env.payload["trip"],)
    )
    return {"cancelled": changed}


@hotel.every(0.05, "sweep")
async def sweep(store: SQLStore) -> None:
    async with store.transaction() as tx:
        await tx.execute("INSERT INTO sweeps (n) VALUES (1)")


async def test_every_role_of_an_app_in_one_process_on_sqlite(tmp_path: Path) -> None:
    dep = Deployment(travel, f"sqlite:///{tmp_path}")
    engine = dep.everything()
    async with engine:
        started = await engine.start_many(list(load(10, 1)))
        done = [await engine.wait(s.saga_id, timeout=30) for s in started]
        for _ in range(100):  # the service's job runs every 0.05 s
            async with dep.store("hotel").transaction() as tx:
                sweeps = await tx.fetchone("SELECT count(*) FROM sweeps")
            if sweeps is not None and sweeps[0]:
                break
            await asyncio.sleep(0.05)
        assert await hotel_invariants(dep) == []
    states = {s.business_key: s.state for s in done}
    assert states["trip-1-0000"] is SagaState.SUCCEEDED
    assert states["trip-1-0003"] is SagaState.COMPENSATED  # 30 nights: no hotel
    assert states["trip-1-0005"] is SagaState.COMPENSATED  # card declined at the pivot
    assert sweeps is not None and sweeps[0] >= 1  # the service's job ran
    assert (tmp_path / "orchestrator.db").exists() and (tmp_path / "hotel.db").exists()


async def test_the_generic_demo_runs_the_load_under_faults_and_checks_invariants(
    tmp_path: Path,
) -> None:
    request = DemoRequest(orders=40, faults="chaos", seed=3, data_dir=tmp_path, timeout=120)
    result = await run_app_demo(travel, request)
    report = result.to_json()
    assert result.ok, result.render()
    assert sum(report["outcomes"].values()) == 40
    assert report["outcomes"]["SUCCEEDED"] and report["outcomes"]["COMPENSATED"]
    assert report["violations"] == []
    assert "invariants: all hold" in result.render()


async def test_a_broken_invariant_fails_the_demo(tmp_path: Path) -> None:
    async def never(dep: Deployment) -> list[str]:
        return ["the ledger does not balance"]

    broken = App("travel_broken", [TRIP], load=load, invariants=never, services=[hotel])
    result = await run_app_demo(broken, DemoRequest(orders=5, faults="none", data_dir=tmp_path))
    assert not result.ok
    assert "the ledger does not balance" in result.render()


async def test_an_app_without_a_load_driver_says_so() -> None:
    with pytest.raises(ConfigurationError, match="ships no load driver"):
        await run_app_demo(App("quiet", [TRIP]), DemoRequest(orders=1))


def test_sagakit_demo_app_on_the_command_line(tmp_path: Path) -> None:
    from sagakit.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(
            [
                "demo",
                "--app",
                f"{__name__}:travel",
                "--orders",
                "12",
                "--faults",
                "none",
                "--data-dir",
                str(tmp_path),
                "--json",
            ]
        )
    report = json.loads(out.getvalue())
    assert code == 0, report
    assert report["app"] == "travel_test" and report["sagas"] == 12 and report["ok"]


def test_the_demo_refuses_a_second_run_on_the_same_data_dir(tmp_path: Path) -> None:
    from sagakit.runtime.lockfile import LockFile

    with (
        LockFile(tmp_path / ".lock", what="a data directory"),
        pytest.raises(ConfigurationError, match="in use by"),
    ):
        asyncio.run(run_app_demo(travel, DemoRequest(orders=1, data_dir=tmp_path)))


# -- starting a saga in your own transaction, with no engine in the process -------------


async def test_app_start_joins_your_sqlite_transaction(tmp_path: Path) -> None:
    import sqlite3

    dep = Deployment(travel, f"sqlite:///{tmp_path}")
    async with dep.everything():  # creates the tables; a worker process in production
        pass
    conn = sqlite3.connect(tmp_path / "orchestrator.db")
    conn.execute("CREATE TABLE my_trips (trip TEXT PRIMARY KEY)")
    conn.commit()

    conn.execute("INSERT INTO my_trips VALUES ('trip-rolled-back')")
    travel.start(conn, "trip", "trip-rolled-back", {"nights": 2, "price": 10, "card": "ok"})
    conn.rollback()

    conn.execute("INSERT INTO my_trips VALUES ('trip-kept')")
    inst = travel.start(conn, "trip", "trip-kept", {"nights": 2, "price": 10, "card": "ok"})
    again = travel.start(conn, "trip", "trip-kept", {"nights": 2, "price": 10, "card": "ok"})
    assert again.saga_id == inst.saga_id  # idempotent by business key
    conn.commit()
    conn.close()

    async with dep.everything() as engine:
        done = await engine.wait(inst.saga_id, timeout=30)
        assert done.state is SagaState.SUCCEEDED
        assert await engine.store.get_saga_by_key("trip", "trip-rolled-back") is None
        assert await engine.store.outbox_pending() == 0


@pytest.mark.postgres
async def test_app_start_joins_your_psycopg_transaction() -> None:
    import uuid

    import psycopg

    dsn = "postgresql://postgres@127.0.0.1:5432/test"
    prefix = f"tr_{uuid.uuid4().hex[:10]}"
    dep = Deployment(travel, f"{dsn}?prefix={prefix}")
    try:
        async with dep.everything():  # creates the schemas and tables
            pass
        with psycopg.connect(dsn) as conn:
            inst = travel.start(
                conn, "trip", "pg-1", {"nights": 2, "price": 10, "card": "ok"}, prefix=prefix
            )
            conn.rollback()
            kept = travel.start(
                conn, "trip", "pg-2", {"nights": 2, "price": 10, "card": "ok"}, prefix=prefix
            )
            conn.commit()
        async with dep.everything() as engine:
            assert await engine.store.get_saga(inst.saga_id) is None
            done = await engine.wait(kept.saga_id, timeout=30)
            assert done.state is SagaState.SUCCEEDED
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            for name in travel.store_names:
                admin.execute(f'DROP SCHEMA IF EXISTS "{prefix}_{name}" CASCADE')


async def test_a_service_handler_emits_events_other_services_react_to(tmp_path: Path) -> None:
    from sagakit import SagaDefinition as Definition

    stay = Definition("stay", steps=[Step("book", command("rooms", "BookRoom", ref))])
    events = App("events_test", [stay])
    rooms = events.service("rooms")
    loyalty = events.service(
        "loyalty", migrations=["CREATE TABLE points (trip TEXT PRIMARY KEY, n INTEGER)"]
    )

    @rooms.handles("BookRoom")
    async def book_room(tx: Tx, env: Envelope) -> dict[str, str]:
        await rooms.emit(tx, "RoomBooked", {"trip": env.payload["trip"]}, cause=env, now=0.0)
        return {"room": "101"}

    @loyalty.on_event("RoomBooked")
    async def add_points(tx: Tx, env: Envelope) -> None:
        await tx.execute("INSERT INTO points (trip, n) VALUES (?, 10)", (env.payload["trip"],))

    assert events.event_routes() == {"RoomBooked": ["loyalty"]}
    with pytest.raises(ConfigurationError, match="before its participant was built"):
        await Service("idle").emit(None, "X", {}, now=0.0)  # type: ignore[arg-type]
    dep = Deployment(events, f"sqlite:///{tmp_path}")
    async with dep.everything() as engine:
        inst = await engine.start("stay", "s-1")
        assert (await engine.wait(inst.saga_id, timeout=30)).state is SagaState.SUCCEEDED
        for _ in range(200):
            async with dep.store("loyalty").transaction() as tx:
                row = await tx.fetchone("SELECT n FROM points WHERE trip = 's-1'")
            if row is not None:
                break
            await asyncio.sleep(0.02)
    assert row == (10,)
