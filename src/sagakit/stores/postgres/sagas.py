"""The saga rows of a PostgreSQL transaction: instances loaded and locked, inserted
and updated (buffered, version-checked), their history and their timers.
:class:`PostgresSagaStatements` is part of :class:`~sagakit.stores.postgres.PostgresTx`."""

from __future__ import annotations

from collections.abc import Sequence

from sagakit.core.instance import HistoryEntry, SagaInstance, Timer
from sagakit.errors import ConcurrencyError
from sagakit.stores.postgres.buffer import PostgresTxBuffer
from sagakit.stores.postgres.queries import _saga_insert_params
from sagakit.stores.rows import saga_from_row as _saga_from_row


class PostgresSagaStatements(PostgresTxBuffer):
    """The saga, history and timer methods of :class:`~sagakit.stores.postgres.PostgresTx`."""

    __slots__ = ()

    # -- sagas ------------------------------------------------------------------------
    async def saga_get(self, saga_id: str) -> SagaInstance | None:
        """Load an instance and lock its row until the transaction ends (FOR UPDATE).

        Another transaction loading it waits, then reads the version committed here.
        """
        row = await self._one(f"load saga {saga_id}", self._q["saga_get"], (saga_id,))
        return None if row is None else _saga_from_row(row)

    async def saga_get_many(self, saga_ids: Sequence[str]) -> dict[str, SagaInstance]:
        """Load and lock several instances in one statement, in ``saga_id`` order."""
        if not saga_ids:
            return {}
        rows = await self._all(
            f"load {len(saga_ids)} saga(s)", self._q["saga_get_many"], {"ids": list(saga_ids)}
        )
        return {r[0]: _saga_from_row(r) for r in rows}

    async def saga_get_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` (any version) started for ``business_key``."""
        row = await self._one(
            f"load the {definition} saga of {business_key!r}",
            self._q["saga_get_by_key"],
            (definition, business_key),
        )
        return None if row is None else _saga_from_row(row)

    async def saga_get_by_keys(
        self, definition: str, business_keys: Sequence[str]
    ) -> dict[str, SagaInstance]:
        """The instances of ``definition`` started for any of ``business_keys``, by key."""
        if not business_keys:
            return {}
        rows = await self._all(
            f"load the {definition} sagas of {len(business_keys)} key(s)",
            self._q["saga_get_by_keys"],
            {"definition": definition, "keys": list(business_keys)},
        )
        return {r[3]: _saga_from_row(r) for r in rows}

    async def saga_insert(self, instance: SagaInstance) -> None:
        """Insert a new instance; ``ConcurrencyError`` if its id or (definition, key) exists.

        The refusal leaves the transaction usable (nothing is aborted).
        """
        what = f"insert saga {instance.saga_id}"
        row = await self._one(what, self._q["saga_insert"], _saga_insert_params(instance))
        if row is not None:
            return
        await self._refuse_insert(instance)

    async def saga_insert_many(self, instances: Sequence[SagaInstance]) -> None:
        """Insert new instances; ``ConcurrencyError`` if an id or (definition, key) exists.

        The inserts are buffered and sent as one statement with the transaction's other
        writes (see ``__init__``); a refusal is raised by the next statement that waits
        for an answer or when the block ends, before COMMIT (the transaction then
        rolls back).
        """
        self._check_open()
        for instance in instances:
            if instance.saga_id in self._new or instance.saga_id in self._inserted:
                raise ConcurrencyError(f"saga {instance.saga_id} already exists")
            self._new[instance.saga_id] = instance

    async def saga_update(self, instance: SagaInstance, expected_version: int) -> None:
        """Write ``instance`` if the stored version is still ``expected_version``.

        Raises :class:`~sagakit.errors.ConcurrencyError` otherwise: another worker
        applied a transition first, and this one must be recomputed. A concurrent
        writer of the same row makes this wait for its commit, then re-check. In
        pipeline mode the update is sent without waiting, and the error is raised by
        the next statement that waits for an answer or when the block ends, before
        COMMIT is sent (the transaction then rolls back).

        Buffered (see ``__init__``): several updates of one saga in a transaction are
        sent as one, checked against the version the first one expected.
        """
        self._check_open()
        saga_id = instance.saga_id
        pending = self._new.get(saga_id)
        if pending is not None:  # inserted in this transaction, not yet sent
            if pending.version != expected_version:
                await self._refuse_update(saga_id, expected_version)
            self._new[saga_id] = instance
            return
        earlier = self._updates.get(saga_id)
        if earlier is None:
            self._updates[saga_id] = (instance, expected_version)
        elif earlier[0].version == expected_version:
            self._updates[saga_id] = (instance, earlier[1])
        else:
            await self._refuse_update(saga_id, expected_version)

    async def history_add(self, entries: Sequence[HistoryEntry]) -> None:
        """Append history rows (never updated, never deleted)."""
        self._check_open()
        self._history.extend(entries)

    async def timers_set(self, timers: Sequence[Timer]) -> None:
        """Set timers; one with the same (saga_id, name) is replaced."""
        if not timers:
            return
        self._check_open()
        for t in timers:
            self._timers[(t.saga_id, t.name)] = t
        due = min(t.due_at for t in timers)
        self._timers_due = due if self._timers_due is None else min(due, self._timers_due)

    async def timers_cancel(self, saga_id: str, names: Sequence[str]) -> None:
        """Delete the named timers of one saga (missing ones are ignored)."""
        self._check_open()
        for name in names:
            self._timers[(saga_id, name)] = None

    async def timers_take_due(self, now: float, limit: int) -> list[Timer]:
        """Remove and return up to ``limit`` timers due at ``now``, earliest first.

        Taken inside the transaction that applies them: if it rolls back, they stay.
        Timers another open transaction took are skipped (SKIP LOCKED), not waited for,
        so concurrent workers never take the same timer. ``now`` is the caller's clock,
        the clock ``due_at`` was computed with (see the module docstring).
        """
        if limit <= 0:
            return []
        rows = await self._all("take due timers", self._q["timers_take_due"], (now, limit))
        if len(rows) < limit:
            # Timers whose saga row is gone lock no saga: take them on their own.
            rows += await self._all(
                "take due orphan timers",
                self._q["timers_take_due_orphans"],
                (now, limit - len(rows)),
            )
        rows.sort(key=lambda r: (r[2], r[0], r[1]))
        return [Timer(saga_id=r[0], name=r[1], due_at=r[2], fence=r[3]) for r in rows]
