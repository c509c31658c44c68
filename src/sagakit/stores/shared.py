"""The store methods that read the same on every SQL backend: one named query, through
the backend's own ``_read`` (a plain read) or ``_write`` (a statement of its own, on
the writer), with its rows decoded the same way. :class:`SharedStatements` is part of
:class:`~sagakit.stores.sqlite.SQLiteStore` and
:class:`~sagakit.stores.postgres.PostgresStore`; a backend's ``_q`` holds its dialect's
text of each query (``stores/sql/*_queries.sql``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sagakit.core.envelope import Envelope
from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState
from sagakit.stores.base import DeadLetter, QueuedMessage, SetAside
from sagakit.stores.rows import (
    dead_letter_from_row,
    dead_letter_where,
    history_from_row,
    saga_from_row,
    set_aside_from_row,
)

_T = TypeVar("_T")


class SharedStatements:
    """Methods of :class:`~sagakit.stores.base.Store` written once for every SQL backend."""

    name: str
    _q: dict[str, str]
    _mark: str
    """The dialect's query parameter mark: ``?`` or ``%s``."""
    _no_limit: Any
    """What a query's LIMIT takes for "no limit": -1 on SQLite, NULL on PostgreSQL."""

    if TYPE_CHECKING:

        async def _read(self, what: str, sql: str, params: Any = (), /) -> list[Any]: ...

        async def _write(self, what: str, sql: str, params: Any, /) -> tuple[int, list[Any]]: ...

    @staticmethod
    def _array(values: Sequence[Any]) -> Any:
        """A list as one query parameter: an array on PostgreSQL, JSON text on SQLite."""
        return list(values)

    async def _decoded(self, rows: list[Any], decode: Callable[[Any], _T]) -> list[_T]:
        """``[decode(row) for row in rows]`` (a backend may decode large pages in slices)."""
        return [decode(r) for r in rows]

    async def list_sagas(
        self,
        *,
        states: Sequence[SagaState] | None = None,
        definition: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SagaInstance]:
        """Instances, newest first (ties in insertion order), optionally filtered."""
        params = {
            "states": None if states is None else self._array([s.value for s in states]),
            "definition": definition,
            "limit": max(limit, 0),
            "offset": max(offset, 0),
        }
        rows = await self._read("list sagas", self._q["saga_list"], params)
        return await self._decoded(rows, saga_from_row)

    async def oldest_update(self, states: Sequence[SagaState]) -> float | None:
        """``updated_at`` of the saga in any of ``states`` that changed least recently."""
        params = {"states": self._array([s.value for s in states])}
        rows = await self._read("find the oldest saga", self._q["saga_oldest_update"], params)
        oldest: float | None = rows[0][0] if rows else None
        return oldest

    async def get_saga(self, saga_id: str) -> SagaInstance | None:
        """An instance by id (no lock)."""
        rows = await self._read(f"read saga {saga_id}", self._q["saga_read"], (saga_id,))
        return saga_from_row(rows[0]) if rows else None

    async def get_saga_by_key(self, definition: str, business_key: str) -> SagaInstance | None:
        """The instance of ``definition`` started for ``business_key`` (no lock)."""
        rows = await self._read(
            f"read the {definition} saga of {business_key!r}",
            self._q["saga_get_by_key"],
            (definition, business_key),
        )
        return saga_from_row(rows[0]) if rows else None

    async def history(self, saga_id: str) -> list[HistoryEntry]:
        """A saga's history in the order it was written."""
        rows = await self._read(
            f"read the history of saga {saga_id}", self._q["history"], (saga_id,)
        )
        return await self._decoded(rows, history_from_row)

    async def next_timer_due(self) -> float | None:
        """When the earliest timer is due, or ``None`` when there is none."""
        rows = await self._read("read the next timer", self._q["timer_next_due"])
        due: float | None = rows[0][0]
        return due

    async def outbox_pending(self) -> int:
        """How many rows are not yet published."""
        rows = await self._read("count pending outbox rows", self._q["outbox_pending"])
        count: int = rows[0][0]
        return count

    async def dead_letters(
        self,
        endpoint: str | None = None,
        *,
        settled: bool | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally of one endpoint, open or settled, a page."""
        where, params = dead_letter_where(endpoint, settled, self._mark)
        rows = await self._read(
            "read dead letters",
            self._q["dead_letters_page"].replace("{where}", where),
            (*params, self._no_limit if limit is None else max(limit, 0), max(offset, 0)),
        )
        return await self._decoded(rows, dead_letter_from_row)

    async def dead_letter_count(
        self, endpoint: str | None = None, *, settled: bool | None = False
    ) -> int:
        """How many dead letters there are (by default the open ones), without reading them."""
        where, params = dead_letter_where(endpoint, settled, self._mark)
        rows = await self._read(
            "count dead letters", self._q["dead_letter_count"].replace("{where}", where), params
        )
        count: int = rows[0][0]
        return count

    async def count_sagas_by_version(self) -> dict[tuple[str, int, SagaState], int]:
        """How many instances there are per (definition, version, state) (a scan)."""
        rows = await self._read("count sagas by version", self._q["saga_count_by_version"])
        return {(d, v, SagaState(s)): n for d, v, s, n in rows}

    async def set_aside_counts(self) -> dict[tuple[str, int], int]:
        """How many inputs wait per (definition, version)."""
        rows = await self._read("count the inputs set aside", self._q["set_aside_counts"])
        return {(d, v): n for d, v, n in rows}

    async def outbox_all(self) -> list[tuple[Envelope, float | None]]:
        """Every outbox row with its published time (for audits and invariant checks)."""
        rows = await self._read("read the outbox", self._q["outbox_all"])
        return [(Envelope.from_json(body), published) for body, published in rows]

    async def outbox_of_saga(self, saga_id: str) -> list[tuple[Envelope, float | None]]:
        """The outbox rows whose envelope carries ``saga_id``, in write order (indexed)."""
        rows = await self._read(
            f"read the outbox of saga {saga_id}", self._q["outbox_of_saga"], (saga_id,)
        )
        return [(Envelope.from_json(body), published) for body, published in rows]

    async def inbox_ids(self, consumer: str) -> set[str]:
        """Message ids ``consumer`` has handled (for audits and invariant checks)."""
        rows = await self._read(
            f"read the inbox of {consumer!r}", self._q["inbox_ids"], (consumer,)
        )
        return {r[0] for r in rows}

    async def inbox_has(self, consumer: str, message_id: str) -> bool:
        """Whether ``consumer`` recorded ``message_id`` as handled."""
        rows = await self._read(
            f"look up {message_id} in the inbox of {consumer!r}",
            self._q["inbox_has"],
            (consumer, message_id),
        )
        return bool(rows)

    async def inbox_purge(self, older_than: float) -> int:
        """Delete inbox rows recorded before ``older_than``; return how many."""
        purged, _ = await self._write("purge the inbox", self._q["inbox_purge"], (older_than,))
        return purged

    async def queue_retry(self, id: int, available_at: float, error: str) -> None:
        """Make a message visible again at ``available_at`` (a failed delivery)."""
        await self._write(
            f"reschedule message {id}", self._q["queue_retry"], (available_at, error, id)
        )

    async def queue_reset_leases(self, endpoint: str) -> int:
        """Make every leased message of ``endpoint`` visible now (the sole consumer restarted).

        A message counts as leased once it was handed out; messages delayed at push
        time and never delivered keep their delay.
        """
        reset, _ = await self._write(
            f"reset the leases of {endpoint!r}", self._q["queue_reset_leases"], (endpoint,)
        )
        return reset

    async def queue_depth(self, endpoint: str | None = None) -> int:
        """How many messages wait in a mailbox (all mailboxes when ``endpoint`` is None)."""
        if endpoint is None:
            rows = await self._read("count queued messages", self._q["queue_depth"])
        else:
            rows = await self._read(
                f"count the mailbox of {endpoint!r}", self._q["queue_depth_of"], (endpoint,)
            )
        depth: int = rows[0][0]
        return depth

    async def next_queue_visible(self, endpoint: str) -> float | None:
        """When the next hidden or delayed message of ``endpoint`` becomes visible.

        This is the smallest ``available_at`` of the mailbox, which is in the past when
        a message is visible already; ``None`` when the mailbox is empty.
        """
        rows = await self._read(
            f"read the mailbox of {endpoint!r}", self._q["queue_next_visible"], (endpoint,)
        )
        at: float | None = rows[0][0]
        return at

    async def get_dead_letter(self, id: int) -> DeadLetter | None:
        """A dead letter by id, settled or not."""
        rows = await self._read(f"read dead letter {id}", self._q["dead_letter_get"], (id,))
        return dead_letter_from_row(rows[0]) if rows else None

    async def set_aside_of_saga(self, saga_id: str) -> list[SetAside]:
        """The inputs of ``saga_id`` set aside, oldest first."""
        rows = await self._read(
            f"read the inputs of saga {saga_id} set aside", self._q["set_aside_of_saga"], (saga_id,)
        )
        return [set_aside_from_row(r) for r in rows]

    async def outbox_mark_published(self, ids: Sequence[int], now: float) -> None:
        """Mark rows as published (acknowledged by the transport); ``now`` is recorded."""
        if ids:
            await self._write(
                f"mark {len(ids)} outbox row(s) published",
                self._q["outbox_mark_published"],
                (now, self._array(ids)),
            )

    async def outbox_purge(self, published_before: float, *, batch: int = 1000) -> int:
        """Delete rows published before ``published_before``, ``batch`` rows per write
        transaction (short ones, never waiting on a relay's rows); return how many."""
        purged = 0
        while True:
            n, _ = await self._write(
                "purge published outbox rows",
                self._q["outbox_purge"],
                (published_before, published_before, batch),
            )
            purged += n
            if n < batch:
                return purged

    async def outbox_oldest_pending(self) -> float | None:
        """``created_at`` of the oldest unpublished row, or ``None`` when all are published."""
        rows = await self._read(
            "read the oldest pending outbox row", self._q["outbox_oldest_pending"]
        )
        oldest = rows[0][0] if rows else None
        return None if oldest is None else float(oldest)

    async def queue_fetch(
        self, endpoint: str, limit: int, now: float, lease: float
    ) -> list[QueuedMessage]:
        """Hand out up to ``limit`` visible messages, oldest first, hidden for ``lease`` s.

        Each counts one more delivery. A message not acknowledged before its lease
        ends is handed out again (at-least-once). On PostgreSQL concurrent fetches skip
        each other's rows (SKIP LOCKED). Uses the caller's clock, like the push delays.
        """
        if limit <= 0:
            return []
        _, rows = await self._write(
            f"fetch from the mailbox of {endpoint!r}",
            self._q["queue_fetch"],
            (now + lease, endpoint, now, limit),
        )
        rows.sort()
        return [
            # float(): SQLite's UPDATE ... RETURNING reports a whole REAL as an int.
            QueuedMessage(
                id=r[0], endpoint=r[1], body=r[2], deliveries=r[3], enqueued_at=float(r[4])
            )
            for r in rows
        ]

    async def queue_ack(self, ids: Sequence[int]) -> None:
        """Remove handled messages from the mailbox."""
        if ids:
            await self._write(
                f"acknowledge {len(ids)} message(s)", self._q["queue_ack"], (self._array(ids),)
            )
