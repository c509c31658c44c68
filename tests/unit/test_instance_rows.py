"""How stores keep a saga's steps: compact rows, and the older per-step objects."""

from __future__ import annotations

import json

from sagakit.core.instance import SagaInstance, StepState, StepStatus


def _step() -> StepState:
    return StepState(
        status=StepStatus.SUCCEEDED,
        attempt=2,
        rung=1,
        rung_attempt=3,
        result={"auth": "a-1"},
        error="declined once",
        next_retry_at=12.5,
        started_at=10.0,
        finished_at=11.25,
        queries=4,
        retry_base=1,
        fence_floor=7,
        manual_retries=2,
    )


def test_a_step_row_round_trips_through_json() -> None:
    step = _step()
    raw = json.loads(json.dumps(step.to_row()))
    assert StepState.from_row(raw) == step
    assert len(json.dumps(step.to_row())) < len(json.dumps(step.to_dict())) / 2


def test_rows_written_as_objects_are_still_read() -> None:
    step = _step()
    assert StepState.from_row(json.loads(json.dumps(step.to_dict()))) == step
    assert SagaInstance.steps_from_json([step.to_dict(), step.to_row()]) == [step, step]


def test_a_shorter_row_from_before_a_field_was_added_gets_the_defaults() -> None:
    old = _step().to_row()[:9]  # written before queries, retry_base, ... existed
    step = StepState.from_row(old)
    assert step.finished_at == 11.25
    assert (step.queries, step.retry_base, step.fence_floor, step.manual_retries) == (0, 0, 0, 0)
