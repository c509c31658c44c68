"""The metrics registry: counters, histograms, commit-time recording, text format."""

from __future__ import annotations

import asyncio

import pytest

from sagakit.core.instance import HistoryEntry, SagaInstance, SagaState, StepState
from sagakit.metrics import (
    SAGAS_FINISHED,
    SAGAS_STARTED,
    STEP_SECONDS,
    Registry,
    deferred,
    format_value,
    on_commit,
    record_history,
)
from sagakit.stores.memory import MemoryStore


def test_counter_exposition_with_labels_and_escaping() -> None:
    reg = Registry()
    c = reg.counter("jobs_total", "Jobs done.", ("queue", "outcome"))
    c.labels("fast", "ok").inc()
    c.labels("fast", "ok").inc(2)
    c.labels('we"ird\\q\n', "failed").inc()
    assert c.value("fast", "ok") == 3
    assert c.value("never", "seen") == 0
    assert reg.exposition() == (
        "# HELP jobs_total Jobs done.\n"
        "# TYPE jobs_total counter\n"
        'jobs_total{queue="fast",outcome="ok"} 3\n'
        'jobs_total{queue="we\\"ird\\\\q\\n",outcome="failed"} 1\n'
    )


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    reg = Registry()
    h = reg.histogram("wait_seconds", "Waits.", ("step",), buckets=(0.1, 1, 10))
    cell = h.labels("pay")
    for value in (0.05, 0.1, 0.5, 1.0, 7.0, 99.0):
        cell.observe(value)
    assert h.snapshot("pay") == ([2, 4, 5, 6], pytest.approx(107.65), 6)
    assert h.snapshot("other") == ([0, 0, 0, 0], 0.0, 0)
    assert reg.exposition().splitlines()[2:] == [
        'wait_seconds_bucket{step="pay",le="0.1"} 2',
        'wait_seconds_bucket{step="pay",le="1.0"} 4',
        'wait_seconds_bucket{step="pay",le="10.0"} 5',
        'wait_seconds_bucket{step="pay",le="+Inf"} 6',
        'wait_seconds_sum{step="pay"} 107.65',
        'wait_seconds_count{step="pay"} 6',
    ]


def test_unlabelled_metrics_and_values() -> None:
    reg = Registry()
    reg.counter("up_total", "Ups.").labels().inc()
    reg.histogram("t_seconds", "T.", buckets=(1,)).labels().observe(0.25)
    lines = reg.exposition().splitlines()
    assert "up_total 1" in lines
    assert 't_seconds_bucket{le="1.0"} 1' in lines and "t_seconds_sum 0.25" in lines
    assert [format_value(v) for v in (3.0, 0.125, float("inf"), 1e20)] == [
        "3",
        "0.125",
        "+Inf",
        "1e+20",
    ]


def test_registry_refuses_a_name_reused_differently() -> None:
    reg = Registry()
    first = reg.counter("x_total", "X.", ("a",))
    assert reg.counter("x_total", "X.", ("a",)) is first
    with pytest.raises(ValueError, match="already registered"):
        reg.counter("x_total", "X.", ("b",))
    with pytest.raises(ValueError, match="already registered"):
        reg.histogram("x_total", "X.", ("a",), buckets=(1,))
    with pytest.raises(ValueError, match="takes labels"):
        first.labels("one", "two")
    with pytest.raises(ValueError, match="increasing"):
        reg.histogram("y", "Y.", buckets=(2, 1))


def test_deferred_recordings_count_only_when_committed() -> None:
    reg = Registry()
    c = reg.counter("c_total", "C.")
    with deferred() as pending:
        c.labels().inc()
        assert c.value() == 0  # held back until the transaction commits
        pending.commit()
    assert c.value() == 1
    with deferred():
        c.labels().inc(5)  # the transaction rolled back: never committed
    assert c.value() == 1
    c.labels().inc()  # outside any transaction: at once
    assert c.value() == 2


async def test_on_commit_counts_a_transaction_once_it_committed() -> None:
    reg = Registry()
    c = reg.counter("c_total", "C.")
    store = MemoryStore()
    await store.open()
    async with on_commit(store.transaction()) as tx:
        assert await tx.inbox_add("x", "m1", now=1.0)
        c.labels().inc()
        assert c.value() == 0
    assert c.value() == 1
    with pytest.raises(RuntimeError):
        async with on_commit(store.transaction()) as tx:
            await tx.inbox_add("x", "m2", now=1.0)
            c.labels().inc()
            raise RuntimeError("rolled back")
    assert c.value() == 1 and await store.inbox_ids("x") == {"m1"}
    c.labels().inc()  # after the block, recording is immediate again
    assert c.value() == 2
    await store.close()


async def test_deferral_is_per_task() -> None:
    reg = Registry()
    c = reg.counter("c_total", "C.")
    inside = asyncio.Event()

    async def transaction() -> None:
        with deferred():
            c.labels().inc()
            inside.set()
            await asyncio.sleep(0.01)  # rolls back after the other task recorded

    async def outside() -> None:
        await inside.wait()
        c.labels().inc()  # another task, no transaction: counts now

    await asyncio.gather(transaction(), outside())
    assert c.value() == 1


def _history(event: str, at: float, state: SagaState, step: str | None = None) -> HistoryEntry:
    return HistoryEntry("s1", 1, at, event, state, "X", step, {})


def test_record_history_counts_sagas_and_step_durations() -> None:
    inst = SagaInstance(
        saga_id="s1",
        definition="unit-metrics",
        definition_version=1,
        business_key="k",
        correlation_id="c",
        state=SagaState.SUCCEEDED,
        status="DONE",
        data={},
        steps=[StepState(started_at=10.0), StepState(started_at=12.0), StepState()],
        created_at=10.0,
        updated_at=15.5,
    )
    names = ["reserve", "pay", "ship"]
    before = STEP_SECONDS.snapshot("unit-metrics", "pay", "succeeded")
    record_history(
        inst,
        names,
        [
            _history("saga.started", 10.0, SagaState.RUNNING),
            _history("step.succeeded", 15.5, SagaState.RUNNING, "pay"),
            _history("step.failed", 15.5, SagaState.RUNNING, "ship"),  # never started: no time
            _history("step.succeeded", 15.5, SagaState.RUNNING, "unknown"),
            _history("saga.finished", 15.5, SagaState.SUCCEEDED),
        ],
    )
    assert SAGAS_STARTED.value("unit-metrics") >= 1
    assert SAGAS_FINISHED.value("unit-metrics", "SUCCEEDED") >= 1
    buckets, total, count = STEP_SECONDS.snapshot("unit-metrics", "pay", "succeeded")
    assert count == before[2] + 1 and total == pytest.approx(before[1] + 3.5)
    # 3.5 s falls in the 5 s bucket, not in the 2.5 s one.
    assert buckets[STEP_SECONDS.bounds.index(5.0)] - before[0][STEP_SECONDS.bounds.index(5.0)] == 1
    assert buckets[STEP_SECONDS.bounds.index(2.5)] == before[0][STEP_SECONDS.bounds.index(2.5)]
    assert STEP_SECONDS.snapshot("unit-metrics", "ship", "failed")[2] == 0
