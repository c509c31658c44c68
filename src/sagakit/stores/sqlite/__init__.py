"""The SQLite store: the embedded default, one database file per service.

WAL journal mode lets one writer and any number of readers work at once. The store
keeps two connections: a *writer*, used by transactions and by the few writes that
run on their own (relay claims, mailbox updates), serialised by an ``asyncio.Lock``
held for the whole ``async with store.transaction()`` block; and a *reader* for the
plain read methods, which never waits for the writer.

Calls run on the event loop's thread, with no hop to a worker thread: a statement
takes microseconds, and the price is that a commit holds the loop for its fsync. A
server may move the plain reads' SQL to worker threads (:meth:`SQLiteStore.read_in_threads`,
each thread with its own reader connection) and decode large pages in slices, so that
a page of hundreds of sagas does not hold the loop; transactions stay on the loop.
Every statement lives in ``stores/sql/sqlite_queries.sql``, the schema in
``stores/sql/sqlite_NNNN_*.sql`` (applied by :meth:`SQLiteStore.open`).

The modules: ``store`` (connections, the writer lock, migrations), ``tx`` (a
transaction and its statements), ``reads`` (the plain reads and the writes that run on
their own) and ``sql`` (loading the SQL files, errors). What the SQLite and PostgreSQL
stores share is in :mod:`sagakit.stores.shared`.
"""

from sagakit.stores.sqlite.sql import split_statements
from sagakit.stores.sqlite.store import ENGINE_NAMESPACE, SYNCHRONOUS_MODES, SQLiteStore
from sagakit.stores.sqlite.tx import SQLiteTx

__all__ = ["ENGINE_NAMESPACE", "SYNCHRONOUS_MODES", "SQLiteStore", "SQLiteTx", "split_statements"]
