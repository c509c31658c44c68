"""The embedded engine end to end with local steps, on SQLite."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from sagakit import (
    Envelope,
    MessageKind,
    SagaDefinition,
    SagaState,
    Step,
    StepContext,
    StepFailed,
    StepKind,
    StepStatus,
    embedded,
)


def trip(
    calls: list[tuple[str, str]], fail_at: str | None = None, flaky: dict[str, int] | None = None
) -> SagaDefinition:
    flaky = flaky if flaky is not None else {}

    def act(name: str) -> Any:
        def fn(ctx: StepContext) -> dict[str, Any]:
            calls.append((name, ctx.idempotency_key))
            if flaky.get(name, 0) > 0:
                flaky[name] -= 1
                raise StepFailed(f"{name} busy", retryable=True)
            if name == fail_at:
                raise StepFailed(f"{name} refused")
            return {"ref": f"{name}-{ctx.business_key}"}

        fn.__name__ = name
        return fn

    return SagaDefinition(
        "trip",
        steps=[
            Step("hotel", act("book_hotel"), act("cancel_hotel"), status="BOOKING"),
            Step("flight", act("book_flight"), act("cancel_flight"), timeout=5),
            Step("charge", act("charge_card"), kind=StepKind.PIVOT, status="CHARGING"),
            Step("email", act("send_email"), kind=StepKind.RETRIABLE),
        ],
    )


async def test_happy_path_reaches_succeeded(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    async with embedded(tmp_path / "trip.db", [trip(calls)]) as engine:
        inst = await engine.start("trip", "trip-1", {"city": "Oslo"})
        done = await engine.wait(inst.saga_id, timeout=10)
        history = await engine.store.history(inst.saga_id)
    assert done.state is SagaState.SUCCEEDED
    assert done.status == "COMPLETED"
    assert [c[0] for c in calls] == ["book_hotel", "book_flight", "charge_card", "send_email"]
    assert done.steps[0].result == {"ref": "book_hotel-trip-1"}
    assert history[0].event == "saga.started" and history[-1].event == "saga.finished"


async def test_failure_compensates_in_reverse_order(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    async with embedded(tmp_path / "trip.db", [trip(calls, fail_at="charge_card")]) as engine:
        inst = await engine.start("trip", "trip-2")
        done = await engine.wait(inst.saga_id, timeout=10)
    assert done.state is SagaState.COMPENSATED
    assert done.status == "CANCELLED"
    assert [c[0] for c in calls] == [
        "book_hotel",
        "book_flight",
        "charge_card",
        "cancel_flight",
        "cancel_hotel",
    ]
    assert [s.status for s in done.steps[:2]] == [StepStatus.COMPENSATED] * 2
    # Compensations receive their own key; the action's key is stable across retries.
    assert calls[3][1].endswith(":flight:comp:0")


async def test_retryable_failure_is_retried_with_the_same_key(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    definition = trip(calls, flaky={"book_flight": 2})
    async with embedded(tmp_path / "trip.db", [definition]) as engine:
        inst = await engine.start("trip", "trip-3")
        done = await engine.wait(inst.saga_id, timeout=20)
    assert done.state is SagaState.SUCCEEDED
    flight_keys = {k for name, k in calls if name == "book_flight"}
    assert len([1 for name, _ in calls if name == "book_flight"]) == 3
    assert len(flight_keys) == 1
    assert done.steps[1].attempt == 3


async def test_start_is_idempotent_by_business_key(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    async with embedded(tmp_path / "trip.db", [trip(calls)]) as engine:
        a = await engine.start("trip", "same-key", {"n": 1})
        b = await engine.start("trip", "same-key", {"n": 2})
        assert a.saga_id == b.saga_id
        await engine.wait(a.saga_id, timeout=10)
        assert len(await engine.store.list_sagas()) == 1


async def test_start_many_returns_one_saga_per_business_key(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    async with embedded(tmp_path / "trip.db", [trip(calls)]) as engine:
        old = await engine.start("trip", "k0", {"n": 0})
        got = await engine.orchestrator.start_many(
            [("trip", "k1", {"n": 1}), ("trip", "k0", {"n": 9}), ("trip", "k1", {"n": 2})]
        )
        (k1, created1), (k0, created0), (k1_again, created_again) = got
        assert (created1, created0, created_again) == (True, False, False)
        assert k0.saga_id == old.saga_id and k1_again.saga_id == k1.saga_id
        assert k1.data == {"n": 1}
        for inst in (k0, k1):
            assert (await engine.wait(inst.saga_id, timeout=10)).state is SagaState.SUCCEEDED
        assert (await engine.store.count_sagas()) == {SagaState.SUCCEEDED: 2}


@pytest.mark.fault("F-PROCESS-RESTART")
async def test_sagas_resume_after_the_engine_stops_midway(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    definition = trip(calls)
    engine = embedded(tmp_path / "trip.db", [definition])
    await engine.open()
    started = await engine.start_many([("trip", f"t-{i}", {}) for i in range(50)])
    await engine.close()  # stops wherever the loops were
    async with embedded(tmp_path / "trip.db", [definition]) as engine2:
        for inst in started:
            done = await engine2.wait(inst.saga_id, timeout=20)
            assert done.state is SagaState.SUCCEEDED


async def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    from sagakit import DefinitionError, SagaNotFound

    async with embedded(tmp_path / "trip.db", [trip([])]) as engine:
        with pytest.raises(DefinitionError, match="no saga definition named 'nope'"):
            await engine.start("nope", "k")
        with pytest.raises(DefinitionError, match="business key"):
            await engine.start("trip", "")
        with pytest.raises(SagaNotFound):
            await engine.get("missing")


async def test_housekeeping_purges_old_inbox_rows_only(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    async with embedded(tmp_path / "trip.db", [trip(calls)], inbox_retention=3600) as engine:
        inst = await engine.start("trip", "trip-h")
        await engine.wait(inst.saga_id, timeout=10)
        assert await engine.housekeeping() == 0  # everything is recent
        assert await engine.store.inbox_ids("orchestrator.local")
        engine.inbox_retention = -1.0  # now every row is past the retention
        assert await engine.housekeeping() > 0
        assert not await engine.store.inbox_ids("orchestrator.local")


async def test_housekeeping_purges_published_outbox_rows_past_the_retention(
    tmp_path: Path,
) -> None:
    calls: list[tuple[str, str]] = []
    async with embedded(tmp_path / "trip.db", [trip(calls)], outbox_retention=3600) as engine:
        inst = await engine.start("trip", "trip-o")
        await engine.wait(inst.saga_id, timeout=10)
        # Local steps never touch the outbox: publish a fact (nobody subscribes, so the
        # relay parks it and marks the row published).
        fact = Envelope(
            message_id="fact-1",
            type="TripBooked",
            kind=MessageKind.EVENT,
            source="orchestrator",
            correlation_id=inst.saga_id,
            occurred_at=time.time(),
        )
        async with engine.store.transaction() as tx:
            await tx.outbox_add([fact], time.time())
        engine.wakeups.notify(f"outbox:{engine.store.name}")
        for _ in range(200):  # the relay may still be publishing the last transition's rows
            if not await engine.store.outbox_pending():
                break
            await asyncio.sleep(0.01)
        sent = await engine.store.outbox_all()
        assert sent and all(at is not None for _, at in sent)
        assert await engine.housekeeping() == 0  # everything is recent
        assert await engine.store.outbox_all() == sent
        engine.outbox_retention = -1.0  # now every published row is past the retention
        assert await engine.housekeeping() >= len(sent)
        assert await engine.store.outbox_all() == []
        assert (await engine.get(inst.saga_id)).state is SagaState.SUCCEEDED


async def test_periodic_jobs_run_while_the_engine_runs(tmp_path: Path) -> None:
    import asyncio

    ran: list[int] = []

    async def job() -> None:
        ran.append(1)
        if len(ran) == 2:
            raise RuntimeError("a failing run is logged, not fatal")

    engine = embedded(tmp_path / "trip.db", [trip([])])
    engine.every(0.05, "tick", job)
    async with engine:
        await asyncio.sleep(0.4)
    count = len(ran)
    assert count >= 3
    await asyncio.sleep(0.15)
    assert len(ran) == count  # stopped with the engine


# -- local commands skip the outbox and run inline -----------------------------------


async def test_local_steps_skip_the_outbox_and_the_mailbox_ends_empty(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    async with embedded(tmp_path / "trip.db", [trip(calls)]) as engine:
        assert engine.orchestrator.direct_local and engine.orchestrator.local.inline
        inst = await engine.start("trip", "trip-in")
        done = await engine.wait(inst.saga_id, timeout=10)
        assert done.state is SagaState.SUCCEEDED
        # Written into the mailbox in the transition's transaction, never to the outbox.
        assert await engine.store.outbox_all() == []
        assert await engine.store.queue_depth() == 0
        assert len(await engine.store.inbox_ids("orchestrator.local")) == 4
    assert [c[0] for c in calls] == ["book_hotel", "book_flight", "charge_card", "send_email"]


class CrashInline:
    """A fault hook that crashes the inline runner's first ``n`` commits."""

    def __init__(self, n: int) -> None:
        self.left = n

    def point(self, name: str, endpoint: str) -> None:
        if name == "before_commit" and endpoint == "orchestrator.local" and self.left > 0:
            self.left -= 1
            raise RuntimeError("crash before the inline commit")

    def wrap_transport(self, transport: Any) -> Any:
        return transport

    def wrap_consumer(self, endpoint: str, handler: Any) -> Any:
        return handler


async def test_a_failed_inline_commit_hands_the_command_to_the_mailbox_consumer(
    tmp_path: Path,
) -> None:
    calls: list[tuple[str, str]] = []
    faults = CrashInline(1)
    async with embedded(tmp_path / "trip.db", [trip(calls)], faults=faults) as engine:
        inst = await engine.start("trip", "trip-crash")
        done = await engine.wait(inst.saga_id, timeout=10)
        history = await engine.store.history(inst.saga_id)
        assert await engine.store.queue_depth() == 0
    assert faults.left == 0
    assert done.state is SagaState.SUCCEEDED
    # The callable ran again (at least once, same key); the transition applied once.
    assert [c[0] for c in calls] == [
        "book_hotel",
        "book_hotel",
        "book_flight",
        "charge_card",
        "send_email",
    ]
    assert calls[0][1] == calls[1][1]
    assert [h.event for h in history].count("step.succeeded") == 4


@pytest.mark.fault("F-PROCESS-RESTART")
async def test_commands_leased_to_a_runner_that_died_run_after_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from sagakit.stores.sqlite import SQLiteStore

    calls: list[tuple[str, str]] = []
    definition = trip(calls)
    engine = embedded(tmp_path / "trip.db", [definition])
    await engine.open()
    # The process "dies" right after the commit, before the runner gets the command.
    monkeypatch.setattr(engine.orchestrator.local, "hand_over", lambda items: None)
    inst = await engine.start("trip", "trip-dead")
    await engine.close()
    assert calls == []
    store = SQLiteStore(tmp_path / "trip.db")
    await store.open()
    try:  # leased to the dead runner: hidden from the consumer until a restart
        assert await store.queue_depth("orchestrator.local") == 1
        assert await store.queue_fetch("orchestrator.local", 10, time.time(), 30.0) == []
    finally:
        await store.close()
    async with embedded(tmp_path / "trip.db", [definition]) as engine2:
        done = await engine2.wait(inst.saga_id, timeout=10)
    assert done.state is SagaState.SUCCEEDED
    assert [c[0] for c in calls] == ["book_hotel", "book_flight", "charge_card", "send_email"]
