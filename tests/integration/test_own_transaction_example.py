"""examples/own_transaction/bookings_api.py, driven through Starlette's TestClient.

The booking row and its saga commit together: a booking is created with its saga,
which runs to its end (the hotel's reservation row written in the hotel's own
transaction); the same booking posted again is the same booking and the same saga;
one the database refuses leaves no saga behind.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("starlette", reason="needs the sagakit[api] extra")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")

from starlette.testclient import TestClient

EXAMPLE = Path(__file__).parents[2] / "examples" / "own_transaction" / "bookings_api.py"


def load_example() -> ModuleType:
    """Import the example from its file, as it is (not installed)."""
    spec = importlib.util.spec_from_file_location("own_transaction_bookings_api", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_done(client: TestClient, booking_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/bookings/{booking_id}").json()
        if body["state"] != "RUNNING" or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_bookings_and_their_sagas_commit_together(tmp_path: Path) -> None:
    app = load_example().create_app(tmp_path)
    with TestClient(app) as client:
        created = client.post("/bookings", json={"booking_id": "b-1", "hotel": "ritz", "nights": 2})
        assert created.status_code == 201, created.text
        saga_id = created.json()["saga_id"]

        done = wait_done(client, "b-1")
        assert (done["state"], done["status"]) == ("SUCCEEDED", "COMPLETED")
        assert done["saga_id"] == saga_id

        again = client.post("/bookings", json={"booking_id": "b-1", "hotel": "ritz", "nights": 2})
        assert again.status_code == 200 and again.json()["saga_id"] == saga_id

        refused = client.post("/bookings", json={"booking_id": "b-2", "hotel": "ritz", "nights": 0})
        assert refused.status_code == 422, refused.text
        assert client.get("/bookings/b-2").status_code == 404

        bad = client.post("/bookings", json={"booking_id": "b-3", "hotel": "ritz"})
        assert bad.status_code == 400

    orchestrator = tmp_path / "orchestrator.db"
    assert rows(orchestrator, "SELECT business_key FROM sagas") == [("b-1",)]
    assert rows(orchestrator, "SELECT id, saga_id FROM bookings") == [("b-1", saga_id)]
    commands = rows(orchestrator, "SELECT destination FROM outbox ORDER BY id")
    assert commands.count(("hotel",)) == 1  # ReserveRoom, published once
    assert rows(tmp_path / "hotel.db", "SELECT booking_id, hotel, nights FROM reservations") == [
        ("b-1", "ritz", 2)
    ]
