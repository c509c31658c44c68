"""An in-memory store for tests: the SQLite store on a database that lives in memory.

Use it in tests of your sagas and participants, those with tables of their own
included: its transactions run SQL like any SQLite store's::

    store = MemoryStore("payments")
    await store.open()
    await store.apply_migrations("payments", ["CREATE TABLE cards (id TEXT PRIMARY KEY)"])
    async with store.transaction() as tx:
        await tx.execute("INSERT INTO cards VALUES (?)", ("c-1",))
        await tx.inbox_add("payments", "m-1", now=0.0)

It *is* :class:`~sagakit.stores.sqlite.SQLiteStore` (the same tables, statements and
contract) on a private in-memory database instead of a file, so a test on it says
what a deployment on SQLite files would do, and there is one store implementation to
keep right, not two. Nothing is written to disk; the data outlives :meth:`close`
(``open`` again finds it, as with a file) but not the store object.

Two differences from a file, both from SQLite's in-memory databases having no WAL:

- The reader connection reads uncommitted rows (in memory it could otherwise not read
  at all while a transaction holds a table). So while a transaction is suspended at an
  ``await``, a plain read in another task can see its writes. The engine awaits
  nothing but the store inside a transaction, so this only matters to handlers that do.
- Reads cannot move to worker threads (:meth:`read_in_threads` is refused).

The simulator does not use this store: it runs every service on SQLite files in
``/dev/shm`` (a file system in memory), which is what production runs.
"""

from __future__ import annotations

import sqlite3
import uuid

from sagakit.errors import ConfigurationError
from sagakit.stores.sqlite.sql import _fail
from sagakit.stores.sqlite.store import SQLiteStore
from sagakit.stores.sqlite.tx import SQLiteTx

__all__ = ["MemoryStore", "MemoryTx"]

MemoryTx = SQLiteTx
"""A transaction of a :class:`MemoryStore`: a :class:`~sagakit.stores.sqlite.SQLiteTx`."""


class MemoryStore(SQLiteStore):
    """A :class:`~sagakit.stores.sqlite.SQLiteStore` on a private in-memory database.

    Each store has a database of its own; ``name`` names it in errors and metrics,
    like any store's name. Call :meth:`open` before use and :meth:`close` after.
    """

    def __init__(self, name: str = "memory") -> None:
        # A shared-cache in-memory database, named uniquely: the writer and the reader
        # are two connections to it, and no other store (or test) can reach it.
        super().__init__(
            f"file:sagakit-memory-{uuid.uuid4().hex}?mode=memory&cache=shared", name=name
        )
        self._image: bytes | None = None

    def __repr__(self) -> str:
        return f"MemoryStore(name={self.name!r})"

    def read_in_threads(self, threads: int) -> None:
        """Refused unless 0: an in-memory database is reached by this store's own
        connections only, on the event loop."""
        if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0:
            raise ConfigurationError(
                f"MemoryStore {self.name!r} reads on the event loop only; use a SQLiteStore "
                "on a file to read in worker threads"
            )
        super().read_in_threads(threads)  # 0 is accepted; anything else is refused there

    async def open(self) -> None:
        """Create the database (or bring back what it held at :meth:`close`) and apply
        sagakit's pending migrations."""
        if self._writer is not None:
            return
        await super().open()
        image, self._image = self._image, None
        if image is not None and self._writer is not None:
            # Reopened: copy the rows it held back in (the database was freed with its
            # last connection at close).
            try:
                saved = sqlite3.connect(":memory:")
                try:
                    saved.deserialize(image)
                    saved.backup(self._writer)
                finally:
                    saved.close()
            except sqlite3.Error as exc:
                raise _fail(self.name, "restore the rows kept at close", exc) from exc

    def _closing(self, writer: sqlite3.Connection) -> None:
        """Keep the rows for a later :meth:`open`: the database goes with its last
        connection."""
        try:
            self._image = writer.serialize()
        except sqlite3.Error as exc:
            raise _fail(self.name, "keep the rows at close", exc) from exc

    def _create_owner_only(self) -> None:
        """No file to create."""

    def _set_journal(self, writer: sqlite3.Connection) -> None:
        """An in-memory database keeps its rollback journal in memory; no WAL, no fsync."""

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, uri=True, isolation_level=None, cached_statements=512)
            # Shared cache locks tables instead of waiting on a busy timeout: the reader
            # reads uncommitted rows rather than fail while a transaction holds a table.
            conn.execute("PRAGMA read_uncommitted=1")
        except sqlite3.Error as exc:
            raise _fail(self.name, "open an in-memory database", exc) from exc
        return conn
