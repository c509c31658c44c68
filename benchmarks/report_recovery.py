"""The recovery section: a worker killed with sagas in flight, and a new one finishing them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from report_format import per_run
from report_lines import ResultLines, Row


def recovery_results(res: ResultLines, sizes: Any) -> None:
    """Time to recover after ``kill -9`` with ``sizes.recovery_n`` in flight, and duplicates."""
    key = "recovery/sqlite"
    n = sizes.recovery_n
    res.rows(
        "recovery",
        key,
        (
            Row(
                "recovery_s",
                f"kill -9 with {n} in flight: restart -> all terminal",
                "s",
                "recovery_s",
                "lower",
                "from spawning the new worker process (interpreter start included)",
            ),
            Row(
                "recovery_after_open_s",
                "engine open -> all terminal",
                "s",
                "recovery_after_open_s",
                "lower",
            ),
            Row(
                "in_flight_at_kill", "sagas not terminal when killed", "sagas", "in_flight_at_kill"
            ),
            Row(
                "participant_duplicates",
                "duplicate effects, participant steps",
                "effects",
                "participant_duplicates",
                "lower",
                "inbox + idempotency in the participant's transaction: must be 0",
            ),
            Row(
                "local_reruns",
                "re-runs of local steps (at least once, by design)",
                "effects",
                "local_reruns",
                "lower",
                "a local step whose effect committed but whose checkpoint did not runs again "
                "with the same idempotency key",
            ),
            Row("succeeded", "sagas SUCCEEDED after the restart", "sagas", "succeeded"),
        ),
    )


def _run_effects(i: int, v: dict[str, Any]) -> list[str]:
    return [
        f"- run {i}: at the kill {v['at_kill']}; after the restart "
        f"{v['local_effects']} local effects ({v['local_reruns']} re-runs) and "
        f"{v['participant_effects']} participant effects ({v['participant_duplicates']} "
        f"duplicates) for {v['expected_effects_each']} expected each"
    ]


def recovery_notes(outcomes: Sequence[Any]) -> list[str]:
    """Under the recovery table: the effects each run counted, against those expected."""
    return [*per_run(outcomes, _run_effects), ""]
