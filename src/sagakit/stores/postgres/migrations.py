"""Schema migrations of the PostgreSQL store: sagakit's own steps, applied by
:meth:`~sagakit.stores.postgres.PostgresStore.open`, and a service's, by
:meth:`~sagakit.stores.postgres.PostgresStore.apply_migrations`; each step in its own
transaction under an advisory lock. :class:`PostgresMigrations` is part of
:class:`~sagakit.stores.postgres.PostgresStore`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from sagakit.errors import ConfigurationError
from sagakit.stores.postgres.driver import psycopg, sql, translate_error

if TYPE_CHECKING:
    from sagakit.stores.postgres.driver import _Conn, _Pool

__all__ = ["ENGINE_NAMESPACE", "PostgresMigrations"]

ENGINE_NAMESPACE = "sagakit"
"""The ``schema_migrations`` namespace of sagakit's own tables."""


def _lock_key(schema: str | None) -> int:
    digest = hashlib.blake2b(f"sagakit migrate {schema or ''}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresMigrations:
    """The migration methods of :class:`~sagakit.stores.postgres.PostgresStore`."""

    name: str
    schema: str | None
    _q: dict[str, str]
    _pool: _Pool | None

    if TYPE_CHECKING:

        def _not_open(self) -> NoReturn: ...

        def _check_no_tx(self) -> None: ...

    async def apply_migrations(self, namespace: str, steps: Sequence[str]) -> None:
        """Apply the SQL scripts of ``steps`` not yet applied for ``namespace``, in order.

        Step *n* is ``steps[n - 1]``: append new steps, never edit or reorder applied
        ones. Each step runs in its own transaction, under the advisory lock, together
        with its record in ``schema_migrations``; PostgreSQL's DDL is transactional,
        so a step that fails leaves nothing behind. Scripts may hold many statements
        (no parameters; no BEGIN/COMMIT). Participant services call this after
        :meth:`open` for their business tables.
        """
        if not namespace:
            raise ConfigurationError("apply_migrations needs a non-empty namespace")
        if isinstance(steps, str):
            raise ConfigurationError(
                "apply_migrations takes a sequence of SQL scripts (one per step), not one string"
            )
        pool = self._pool or self._not_open()
        self._check_no_tx()
        try:
            async with pool.connection() as conn:
                await self._migrate(conn, namespace, steps, bootstrap=False)
        except psycopg.Error as exc:
            raise translate_error(self.name, f"apply migrations of {namespace!r}", exc) from exc

    async def _migrate(
        self, conn: _Conn, namespace: str, steps: Sequence[str], *, bootstrap: bool
    ) -> None:
        q = self._q
        try:
            cursor = await conn.execute(q["migration_steps"], (namespace,))
            done: set[int] = {r[0] for r in await cursor.fetchall()}
        except psycopg.errors.UndefinedTable:
            done = set()  # a new database (or schema): bootstrapped below, under the lock
        for number, script in enumerate(steps, start=1):
            if number in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(q["migration_lock"], (_lock_key(self.schema),))
                    if bootstrap:
                        await self._bootstrap(conn)
                    # Another process may have applied it while this one waited.
                    cursor = await conn.execute(q["migration_steps"], (namespace,))
                    if number not in {r[0] for r in await cursor.fetchall()}:
                        await conn.execute(script)  # no parameters: no %-parsing
                        await conn.execute(q["migration_record"], (namespace, number))
            except psycopg.Error as exc:
                raise translate_error(
                    self.name,
                    f"apply migration step {number} of {namespace!r} (rolled back; fix the "
                    "script and open again)",
                    exc,
                ) from exc

    async def _bootstrap(self, conn: _Conn) -> None:
        # Created only when missing: CREATE ... IF NOT EXISTS would need the CREATE
        # privilege even when there is nothing to create.
        if self.schema is not None:
            cursor = await conn.execute(self._q["schema_exists"], (self.schema,))
            if await cursor.fetchone() is None:
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
        cursor = await conn.execute(self._q["schema_migrations_exists"])
        row = await cursor.fetchone()
        if row is None or not row[0]:
            await conn.execute(self._q["schema_migrations_create"])
