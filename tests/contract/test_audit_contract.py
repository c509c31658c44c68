"""The audit trail's table on every store (engine migration step 7): rows written in a
transaction commit and roll back with it, a saga's ``manual.resolved`` history row is
copied into the trail by the database itself, and the filters read it back."""

from __future__ import annotations

import pytest
from test_store_contract import Boom, OpenStore, open_store

from sagakit.core.instance import HistoryEntry, SagaState
from sagakit.runtime.audit import AuditQuery, AuditRecord, append, find

__all__ = ["open_store"]  # the adapters' fixture, shared with the store contract


def decision(saga_id: str, version: int, at: float, actor: str) -> list[HistoryEntry]:
    """The history rows of one manual decision, as the engine writes them."""
    detail = {
        "action": "mark_compensated",
        "actor": actor,
        "reason": "refunded by phone",
        "rung": None,
        "previous_reason": "refund refused",
    }
    return [
        HistoryEntry(
            saga_id,
            version,
            at,
            "manual.resolved",
            SagaState.COMPENSATED,
            "CANCELLED",
            "payment",
            detail,
        ),
        HistoryEntry(
            saga_id,
            version,
            at,
            "saga.finished",
            SagaState.COMPENSATED,
            "CANCELLED",
            None,
            {"outcome": "COMPENSATED"},
        ),
    ]


async def test_a_manual_decision_in_history_is_in_the_trail(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            await tx.history_add(decision("s-1", 5, 10.0, "bob"))
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await tx.history_add(decision("s-2", 3, 11.0, "eve"))
                raise Boom
        [row] = await find([store], AuditQuery(), limit=10)
        assert (row.actor, row.action, row.outcome, row.saga_id, row.reason) == (
            "bob",
            "mark_compensated",
            "applied",
            "s-1",
            "refunded by phone",
        )
        assert (row.version_before, row.version_after, row.at) == (4, 5, 10.0)
        assert row.detail == {"step": "payment"}
        assert row.store == store.name and row.role is None
        forced = {
            "action": "accept_partial",
            "actor": "ada",
            "reason": "customer agreed",
            "forced": True,
            "holds_left_open": ["payment hold"],
        }
        async with store.transaction() as tx:
            await tx.history_add(
                [
                    HistoryEntry(
                        "s-3",
                        8,
                        12.0,
                        "manual.resolved",
                        SagaState.PARTIAL_ACCEPTED,
                        "P",
                        None,
                        forced,
                    )
                ]
            )
        [row] = await find([store], AuditQuery(actor="ada"), limit=10)
        assert (row.action, row.version_before) == ("accept_partial", 7)
        assert row.detail == {"forced": True, "holds_left_open": ["payment hold"]}


async def test_rows_filter_and_page_newest_first(open_store: OpenStore) -> None:
    async with open_store() as store:
        async with store.transaction() as tx:
            for i, (actor, action, saga) in enumerate(
                [
                    ("ada", "retry", "s-1"),
                    ("bob", "retry", "s-2"),
                    ("ada", "dead_letter.discard", None),
                ]
            ):
                await append(
                    tx,
                    AuditRecord(
                        at=100.0 + i,
                        actor=actor,
                        role="operator",
                        action=action,
                        saga_id=saga,
                        dead_letter_id=None if saga else 7,
                        detail={"n": i},
                    ),
                )
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                await append(tx, AuditRecord(at=200.0, actor="ada", action="lost"))
                raise Boom

        async def actions(query: AuditQuery, limit: int = 10, offset: int = 0) -> list[str]:
            return [
                f"{r.actor}:{r.action}"
                for r in await find([store], query, limit=limit, offset=offset)
            ]

        assert await actions(AuditQuery()) == ["ada:dead_letter.discard", "bob:retry", "ada:retry"]
        assert await actions(AuditQuery(actor="ada")) == ["ada:dead_letter.discard", "ada:retry"]
        assert await actions(AuditQuery(action="retry", saga_id="s-2")) == ["bob:retry"]
        assert await actions(AuditQuery(since=101.0, until=102.0)) == ["bob:retry"]
        assert await actions(AuditQuery(), limit=1, offset=1) == ["bob:retry"]
        [letter] = await find([store], AuditQuery(action="dead_letter.discard"), limit=5)
        assert (letter.dead_letter_id, letter.detail, letter.role) == (7, {"n": 2}, "operator")


def test_a_query_refuses_times_that_are_no_range() -> None:
    with pytest.raises(ValueError, match="until must not be before since"):
        AuditQuery(since=5.0, until=4.0)
    with pytest.raises(ValueError, match="finite"):
        AuditQuery(since=float("nan"))
