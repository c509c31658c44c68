"""The sagas an orchestrator committed last, kept so that the next transition of a saga
need not read it back first.

A saga's steps follow one another through the process that committed the step before
(its local commands are handed to this process's runner; the replies of its remote
steps usually reach the process that sent the command). Each transition used to begin
by loading the saga it changes: on PostgreSQL a round trip of its own, before the one
that writes and commits. With the copy kept here the transition writes at once, and the
write it makes anyway checks the version: if another process moved the saga meanwhile,
the version no longer matches, the transaction fails with
:class:`~sagakit.errors.ConcurrencyError`, the copy is dropped and the transition is
computed again from a fresh load. A copy can be stale, never wrong: it is put here only
after its transaction committed, and a saga's version only grows.

A copy is the instance as a load would read it back (its data through JSON, as the
store keeps it), so a transition computed from it is the one computed from a load.
Making one costs about 10 us; the load it saves is a round trip per transaction, worth
far more to a transaction of a few sagas, and far less to one of hundreds (their load
is one statement for all of them). So only transactions that wrote at most
``batch_limit`` sagas leave copies: under a burst the batches grow and load, as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence

from sagakit.core.instance import SagaInstance
from sagakit.stores.rows import saga_from_row, saga_insert_params
from sagakit.stores.tx import Tx

__all__ = ["SagaCache", "check_copies"]


class SagaCache:
    """Bounded, least recently used first out; sagas leave it when they end.

    ``capacity`` bounds the memory: about 2 KB a saga of modest data, so the default
    is a few tens of MB at most. 0 turns it off. ``batch_limit``: see the module.
    """

    __slots__ = ("_items", "batch_limit", "capacity", "hits", "misses")

    def __init__(self, capacity: int = 10_000, *, batch_limit: int = 32) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if batch_limit < 1:
            raise ValueError(f"batch_limit must be >= 1, got {batch_limit}")
        self.capacity = capacity
        self.batch_limit = batch_limit
        self._items: OrderedDict[str, SagaInstance] = OrderedDict()
        self.hits = 0
        """Transitions that wrote without loading first."""
        self.misses = 0
        """Transitions that had to load (no copy, or it was stale)."""

    def __len__(self) -> int:
        return len(self._items)

    def take(self, saga_ids: Sequence[str]) -> dict[str, SagaInstance] | None:
        """Copies of all of ``saga_ids``, or None if any is missing (the caller loads)."""
        items = self._items
        found: dict[str, SagaInstance] = {}
        for saga_id in saga_ids:
            inst = items.get(saga_id)
            if inst is None:
                self.misses += 1
                return None
            found[saga_id] = inst
        for saga_id in saga_ids:
            items.move_to_end(saga_id)
        self.hits += 1
        return found

    def peek(self, saga_id: str) -> SagaInstance | None:
        """The copy of ``saga_id``, if any (not counted, not moved: a look, not a use)."""
        return self._items.get(saga_id)

    def committed(self, instances: Collection[SagaInstance]) -> None:
        """Keep the instances a transaction just committed (a terminal one is dropped:
        nothing but duplicates comes for it any more; more than ``batch_limit``, all)."""
        items = self._items
        if not self.capacity or len(instances) > self.batch_limit:
            if items:
                self.forget(inst.saga_id for inst in instances)
            return
        for inst in instances:
            if inst.terminal:
                items.pop(inst.saga_id, None)
                continue
            # Through the row form: what a load would return (JSON-normalised data).
            items[inst.saga_id] = saga_from_row(saga_insert_params(inst))
            items.move_to_end(inst.saga_id)
        while len(items) > self.capacity:
            items.popitem(last=False)

    def forget(self, saga_ids: Iterable[str]) -> None:
        """Drop copies that may be stale (their transaction failed, or lost a race)."""
        for saga_id in saga_ids:
            self._items.pop(saga_id, None)

    def clear(self) -> None:
        """Drop every copy (the store was closed, or restored)."""
        self._items.clear()


async def check_copies(
    tx: Tx,
    copies: Mapping[str, SagaInstance],
    written: Mapping[str, SagaInstance],
    checked: set[str],
) -> None:
    """Have the commit check every copy used and not written (the version-checked
    write of a transition checks the others). Else a reply that a stale copy found
    stale would be recorded as handled without being applied."""
    for saga_id, copy in copies.items():
        if saga_id not in written and saga_id not in checked:
            await tx.saga_update(copy, copy.version)  # the very same row, if current
            checked.add(saga_id)
