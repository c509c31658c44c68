"""The SQLite store's SQL: its named queries and migrations (files in ``stores/sql/``),
splitting a script into statements, its errors, and the row helpers its transaction
and its own statements share (see :mod:`sagakit.stores.sqlite`)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, NoReturn

from sagakit.core.instance import SagaInstance
from sagakit.errors import ConfigurationError, StoreError
from sagakit.stores.base import (
    SetAside,
)
from sagakit.stores.rows import (
    saga_insert_params,
    saga_update_params,
)

_MIGRATION_FILE = re.compile(r"sqlite_(\d{4})_\w+\.sql")


@cache
def _queries() -> dict[str, str]:
    text = _sql_dir().joinpath("sqlite_queries.sql").read_text(encoding="utf-8")
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, sql = block.partition("\n")
        queries[name.strip()] = sql.strip()
    return queries


@cache
def _engine_migrations() -> tuple[str, ...]:
    found = sorted(
        (int(match[1]), entry.name)
        for entry in _sql_dir().iterdir()
        if (match := _MIGRATION_FILE.fullmatch(entry.name))
    )
    # Step numbers are positions in the sequence, so the files must number 1..n.
    if [number for number, _ in found] != list(range(1, len(found) + 1)):
        raise ConfigurationError(f"sagakit's SQLite migrations are not numbered 1..n: {found}")
    return tuple(_sql_dir().joinpath(name).read_text(encoding="utf-8") for _, name in found)


def _sql_dir() -> Traversable:
    return resources.files("sagakit.stores").joinpath("sql")


def split_statements(script: str) -> list[str]:
    """Split an SQL script into single statements (triggers and quoted ``;`` included).

    ``sqlite3.executescript`` would commit any open transaction first, so migrations run
    statement by statement inside their own transaction instead.
    """
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        # complete_statement knows about string literals, comments and BEGIN...END of
        # triggers: a ";" inside them does not end the statement.
        if sqlite3.complete_statement(pending):
            statement = pending.strip()
            if statement != ";":
                statements.append(statement)
            pending = ""
    if pending.strip(" \n\t;"):
        statements.append(pending.strip())  # unterminated: let SQLite report it
    return statements


def _fail(store: str, what: str, exc: sqlite3.Error) -> StoreError:
    code = getattr(exc, "sqlite_errorname", None)
    detail = f"{exc} ({code})" if code else str(exc)
    return StoreError(f"SQLite store {store!r} could not {what}: {detail}")


def _finished() -> NoReturn:
    raise StoreError(
        "this transaction has ended; use the Tx only inside its `async with "
        "store.transaction()` block"
    )


def _rollback(conn: sqlite3.Connection, store: str) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise _fail(store, "roll back a failed transaction", exc) from exc


def _saga_insert_params(i: SagaInstance) -> tuple[Any, ...]:
    return saga_insert_params(i, int)


def _set_aside_from_row(r: Sequence[Any]) -> SetAside:
    # float(): RETURNING may report a whole REAL as an int.
    return SetAside(r[0], r[1], r[2], r[3], r[4], r[5], float(r[6]))


def _saga_update_params(i: SagaInstance, expected_version: int) -> tuple[Any, ...]:
    return saga_update_params(i, expected_version, int)
