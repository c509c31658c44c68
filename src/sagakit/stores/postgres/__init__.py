"""The PostgreSQL store: one service's database (or schema) for production deployments.

::

    store = PostgresStore("postgresql://app@db/shop", name="payments", schema="payments")
    await store.open()          # creates the schema if missing, applies migrations
    async with store.transaction() as tx:
        await tx.execute("UPDATE stock SET available = available - ? WHERE sku = ?", (1, "A"))

Needs the ``sagakit[postgres]`` extra (psycopg 3 and psycopg-pool).

**Connections.** A pool (``min_size``..``max_size``) in autocommit mode; every pooled
connection gets ``search_path`` set to the store's ``schema``, so tables are never
qualified and no statement crosses into another service's schema. Each
``async with store.transaction()`` takes one connection for its whole block and runs
an explicit transaction (READ COMMITTED) in *pipeline mode*. The engine's writes
(saga inserts and version-checked updates, history, timers, outbox, mailbox
acknowledgements) are buffered in the transaction and sent as one statement per table,
each column a binary array, together with the next statement that must wait for an
answer, or with the COMMIT: a batch of hundreds of transitions costs a handful of
statements and round trips, not several per transition. An error in a buffered write
(a lost version race included) surfaces at that next statement or at commit, named as
such, before anything commits.
Transactions of different tasks run concurrently: row locks (``saga_get`` is
``SELECT ... FOR UPDATE``) and the version check order them, not a store-wide lock.

**Clocks.** Outbox leases are contended by every relay process, so by default
(``lease_clock="database"``) :meth:`PostgresStore.outbox_claim` stamps and compares
``claimed_until`` with the server's clock and ignores its ``now`` argument; a relay
host whose clock is off cannot steal a fresh claim. Timers keep the caller's clock:
``due_at`` is computed by the state machine from the runtime's clock, and the
runtime decides "something is due" with that same clock before it calls
``timers_take_due``; comparing on the server instead would let a worker whose clock
runs ahead spin on timers it sees due but cannot take. The mailbox queue keeps the
caller's clock too (its delays come from ``queue_push``/``queue_retry`` and it has a
single consumer per endpoint). To run *every* process on the database clock, pass
``clock=store.clock`` to the runtime: :meth:`PostgresStore.clock` is the local clock
corrected by the offset to the server's, measured at :meth:`~PostgresStore.open`.

**Notifications.** A commit that added outbox rows runs
``pg_notify('sagakit_outbox_<name>', '')`` in the same transaction (delivered on commit,
never for a rollback); one that set timers, ``sagakit_timers_<name>`` with the earliest
due time it set as payload (``repr`` of the float); ``queue_push``
notifies ``sagakit_queue_<name>`` with the endpoint as payload. Wake loops with
:meth:`PostgresStore.listen` instead of polling::

    async def wake_on_commits(store: PostgresStore, wakeups: Wakeups) -> None:
        local = {store.outbox_channel: f"outbox:{store.name}",
                 store.timers_channel: f"timers:{store.name}"}
        async for channel, payload in store.listen():
            if channel == store.queue_channel:
                wakeups.notify(f"queue:{payload}")   # "" (reconnected): wake every queue
            else:
                wakeups.notify(local[channel])

Every statement lives in ``stores/sql/postgres_queries.sql``, the schema in
``stores/sql/postgres_NNNN_*.sql``.

The modules: ``store`` (settings, the pool, opening, transactions, clock, LISTEN),
``reads`` (the reads, the relay's claims and the mailbox queue, outside a caller's
transaction), ``migrations``, ``transaction`` (the ``async with`` and the relay's
locked batch), ``tx`` and ``sagas`` (a transaction's statements), ``buffer`` (its
write buffer and connection helpers), ``queries`` (loading the SQL files) and
``driver`` (the optional psycopg import, qmark parameters, errors). What the SQLite
and PostgreSQL stores share is in :mod:`sagakit.stores.shared`.
"""

from sagakit.stores.postgres.driver import qmark_to_psycopg, translate_error
from sagakit.stores.postgres.migrations import ENGINE_NAMESPACE
from sagakit.stores.postgres.store import PostgresStore
from sagakit.stores.postgres.transaction import LockedOutbox
from sagakit.stores.postgres.tx import PostgresTx

__all__ = [
    "ENGINE_NAMESPACE",
    "LockedOutbox",
    "PostgresStore",
    "PostgresTx",
    "qmark_to_psycopg",
    "translate_error",
]
