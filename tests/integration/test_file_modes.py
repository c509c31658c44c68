"""Data files are readable by their owner only (0600): the databases with their -wal and
-shm files, ``tokens.json``, the lock file and the log, whatever the process's umask;
data directories sagakit creates are its owner's only (0700)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from sagakit.api.serve import serve
from sagakit.cli import _configure_logging
from sagakit.stores.sqlite import SQLiteStore


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def modes(directory: Path) -> dict[str, str]:
    """The mode of every file in ``directory``, by name."""
    return {p.name: mode(p) for p in directory.iterdir() if p.is_file()}


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    # A lax umask for the test's duration (it is process-wide): the modes must come from
    # the code that creates the files, not from a strict umask of the machine.
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


async def test_a_new_sqlite_store_and_its_wal_files_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with umask(0o002):
        store = SQLiteStore(path)
        await store.open()
        try:
            await store.apply_migrations("t", ["CREATE TABLE t (x TEXT)"])
            files = ["o.db", "o.db-shm", "o.db-wal"]
            assert modes(tmp_path) == dict.fromkeys(files, "0o600")
        finally:
            await store.close()
        # Reopened: still one file, still 0600.
        await SQLiteStore(path).open()
        assert mode(path) == "0o600"


async def test_an_existing_database_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.touch()
    path.chmod(0o640)
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    assert mode(path) == "0o640"


async def test_every_file_serve_writes_in_its_data_directory_is_owner_only(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    stop = asyncio.Event()
    out = io.StringIO()
    with umask(0o002):
        task = asyncio.create_task(
            serve(
                "127.0.0.1",
                0,
                data,
                out=out,
                json_output=True,
                stop=stop,
                on_ready=lambda url: stop.set(),
                log_level="warning",
                orders=2,
            )
        )
        await asyncio.wait_for(task, 60)
    assert json.loads(out.getvalue().splitlines()[0])["token"]
    found = modes(data)
    assert {"tokens.json", ".lock", "orchestrator.db", "payment.db"} <= set(found)
    assert found == dict.fromkeys(found, "0o600")
    assert mode(data) == "0o700"


def test_the_cli_log_file_is_owner_only(tmp_path: Path, sagakit_logger: logging.Logger) -> None:
    with umask(0o002):
        _configure_logging(tmp_path / "logs", "INFO")
    sagakit_logger.warning("a line")
    assert mode(tmp_path / "logs" / "sagakit.log") == "0o600"
    assert mode(tmp_path / "logs") == "0o700"
    assert "a line" in (tmp_path / "logs" / "sagakit.log").read_text()
