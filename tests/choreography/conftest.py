"""The ``backend`` fixture: end-to-end tests run on SQLite files and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from choreo_support import Backend


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Stores on SQLite, or in uniquely named PostgreSQL schemas dropped afterwards."""
    if request.param == "postgres":
        pytest.importorskip("psycopg", reason="needs the sagakit[postgres] extra")
    b = Backend(request.param, tmp_path)
    try:
        yield b
    finally:
        b.drop()
