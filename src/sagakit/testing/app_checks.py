"""Helpers for an app's own invariants (``App(invariants=..., watch=...)``).

An app checks its ledgers; what the sagas say about them is read here, the same way in
``sagakit demo``, ``sagakit simulate`` and the testing kit:

* :func:`sagas_by_key`: every saga of the deployment, by business key;
* :func:`settled_by_hand`: the business keys of the sagas a person vouched for (marked
  done, marked compensated, or accepted as they stand, from the manual queue). The
  person did by hand what the books now show, or accepted them: checks that compare a
  saga's end with its ledgers leave those to the person, as they leave a saga that still
  waits in the manual queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagakit.core.instance import SagaInstance

if TYPE_CHECKING:
    from sagakit.deployment import Deployment

VOUCHING = frozenset({"mark_done", "mark_compensated", "accept_partial"})
"""The manual actions by which a person vouches for the books of a saga."""

_PAGE = 1000


async def sagas_by_key(dep: Deployment, definition: str | None = None) -> dict[str, SagaInstance]:
    """Every saga in ``dep``'s orchestrator store (of ``definition`` if given), by
    business key (the latest started, should a key have several)."""
    store = dep.store("orchestrator")
    found: dict[str, SagaInstance] = {}
    offset = 0
    while True:
        page = await store.list_sagas(definition=definition, limit=_PAGE, offset=offset)
        for inst in sorted(page, key=lambda s: s.created_at):
            found[inst.business_key] = inst
        if len(page) < _PAGE:
            return found
        offset += _PAGE


async def settled_by_hand(dep: Deployment, definition: str | None = None) -> set[str]:
    """The business keys of the sagas (of ``definition`` if given) a person vouched for
    with one of :data:`VOUCHING` (see the module docstring)."""
    store = dep.store("orchestrator")
    keys: set[str] = set()
    for key, inst in (await sagas_by_key(dep, definition)).items():
        for entry in await store.history(inst.saga_id):
            if entry.event == "manual.resolved" and entry.detail.get("action") in VOUCHING:
                keys.add(key)
                break
    return keys
