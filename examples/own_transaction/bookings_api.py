"""``POST /bookings``: the booking row and its saga, in one transaction of yours.

The handler opens its own sqlite3 connection to the orchestrator's database file,
starts the ``booking`` saga in it (``engine.start(..., tx=conn)``), inserts the
booking row (which keeps the saga's id) and commits: both exist, or neither does. A
booking the database refuses (a night count out of range) leaves no saga behind; the
same booking posted twice finds its saga and its row.

The hotel service runs in its own transactions too: ``Participant(...,
transaction=...)`` gives its handler a connection of its own (``tx.connection``), and
the reservation row commits with the inbox record and the reply.

Run it (SQLite files in the data directory, every role of the engine in this process)::

    python examples/own_transaction/bookings_api.py --data /tmp/bookings --port 8000
    curl -s -X POST localhost:8000/bookings \\
         -d '{"booking_id": "b-1", "hotel": "ritz", "nights": 2}'
    curl -s localhost:8000/bookings/b-1

Needs ``sagakit[api]`` (Starlette, uvicorn). Importable without being installed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sagakit import (
    Engine,
    Envelope,
    OwnTx,
    Participant,
    SagaDefinition,
    Step,
    StepContext,
    command,
    local,
)
from sagakit.runtime.lockfile import private_dir
from sagakit.stores.base import Tx
from sagakit.stores.sqlite import SQLiteStore

BOOKINGS = """
CREATE TABLE bookings (
    id TEXT PRIMARY KEY,
    hotel TEXT NOT NULL,
    nights INTEGER NOT NULL CHECK (nights BETWEEN 1 AND 30),
    saga_id TEXT NOT NULL
)
"""
RESERVATIONS = "CREATE TABLE reservations (booking_id TEXT PRIMARY KEY, hotel TEXT, nights INTEGER)"


def confirm(ctx: StepContext) -> dict[str, Any]:
    """The last step: a confirmation (an e-mail in a real service)."""
    return {"confirmed": ctx.business_key}


BOOKING = SagaDefinition(
    "booking",
    [
        Step(
            "reserve",
            command("hotel", "ReserveRoom"),  # the saga's data: hotel, nights
            command("hotel", "ReleaseRoom"),
            status="RESERVING",
        ),
        Step("confirm", local(confirm), status="CONFIRMING"),
    ],
)


def hotel_service(store: SQLiteStore) -> Participant:
    """The hotel: its reservation row commits in its own transaction with the reply."""
    hotel = Participant("hotel", store, transaction=functools.partial(sqlite3.connect, store.path))

    @hotel.handles("ReserveRoom")
    async def reserve(tx: Tx, env: Envelope) -> dict[str, Any]:
        assert isinstance(tx, OwnTx)  # tx.connection: the sqlite3 connection of the factory
        tx.connection.execute(
            "INSERT INTO reservations VALUES (?, ?, ?)",
            (env.business_key, env.payload["hotel"], env.payload["nights"]),
        )
        return {"room": f"{env.payload['hotel']}-{env.business_key}"}

    @hotel.handles("ReleaseRoom")
    async def release(tx: Tx, env: Envelope) -> dict[str, Any]:
        assert isinstance(tx, OwnTx)
        tx.connection.execute("DELETE FROM reservations WHERE booking_id = ?", (env.business_key,))
        return {}

    return hotel


def create_app(data_dir: Path) -> Starlette:
    """The API, with an embedded engine (every role) over SQLite files in ``data_dir``."""
    private_dir(data_dir)  # 0700: the databases are the owner's
    hotel_store = SQLiteStore(data_dir / "hotel.db", name="hotel")
    hotel = hotel_service(hotel_store)
    orchestrator = SQLiteStore(data_dir / "orchestrator.db", name="orchestrator")
    engine = Engine(orchestrator, [BOOKING], participants=[hotel])
    # Your tables live in the stores' files: the bookings next to the sagas.
    engine.before_start(lambda: orchestrator.apply_migrations("bookings_api", [BOOKINGS]))
    engine.before_start(lambda: hotel_store.apply_migrations("hotel", [RESERVATIONS]))

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(orchestrator.path)
        conn.row_factory = sqlite3.Row
        return conn

    async def create_booking(request: Request) -> JSONResponse:
        # Read the request before the transaction: on SQLite, awaiting anything else
        # while it is open would keep the engine in this process from writing.
        body = await request.json()
        booking_id, hotel_name, nights = (
            body.get("booking_id"),
            body.get("hotel"),
            body.get("nights"),
        )
        if not (isinstance(booking_id, str) and booking_id and isinstance(hotel_name, str)):
            return JSONResponse({"error": "booking_id and hotel must be strings"}, 400)
        if not isinstance(nights, int):
            return JSONResponse({"error": "nights must be a whole number"}, 400)
        conn = connect()
        try:
            saga = await engine.start(
                "booking", booking_id, {"hotel": hotel_name, "nights": nights}, tx=conn
            )
            conn.execute(
                "INSERT INTO bookings (id, hotel, nights, saga_id) VALUES (?, ?, ?, ?)",
                (booking_id, hotel_name, nights, saga.saga_id),
            )
            conn.commit()
        except sqlite3.IntegrityError as exc:
            conn.rollback()  # the saga written above goes with it
            row = conn.execute("SELECT * FROM bookings WHERE id = ?", (booking_id,)).fetchone()
            if row is not None:  # posted before: the same booking, the same saga
                return JSONResponse(dict(row), 200)
            return JSONResponse({"error": f"booking refused: {exc}"}, 422)
        finally:
            conn.close()
        return JSONResponse(
            {"id": booking_id, "hotel": hotel_name, "nights": nights, "saga_id": saga.saga_id},
            201,
        )

    async def get_booking(request: Request) -> JSONResponse:
        conn = connect()
        try:
            row = conn.execute(
                "SELECT * FROM bookings WHERE id = ?", (request.path_params["booking_id"],)
            ).fetchone()
        finally:
            conn.close()
        if row is None:
            return JSONResponse({"error": "no such booking"}, 404)
        saga = await engine.get(row["saga_id"])
        return JSONResponse({**dict(row), "state": saga.state.value, "status": saga.status})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with engine:
            yield

    return Starlette(
        routes=[
            Route("/bookings", create_booking, methods=["POST"]),
            Route("/bookings/{booking_id}", get_booking, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=Path("bookings-data"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(create_app(args.data), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
