"""The SQLite store's SQL: its named queries and migrations (files in ``stores/sql/``),
splitting a script into statements, its errors, and the row helpers its transaction
and its own statements share (see :mod:`sagakit.stores.sqlite`)."""

from __future__ import annotations

import sqlite3
from typing import Any, NoReturn

from sagakit.core.instance import SagaInstance
from sagakit.errors import StoreError
from sagakit.stores.rows import (
    saga_insert_params,
    saga_update_params,
)
from sagakit.stores.sql import engine_migrations, named_queries


def _queries() -> dict[str, str]:
    return named_queries("sqlite")


def _engine_migrations() -> tuple[str, ...]:
    return engine_migrations("sqlite")


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


def _saga_update_params(i: SagaInstance, expected_version: int) -> tuple[Any, ...]:
    return saga_update_params(i, expected_version, int)
