"""Result lines from the runs' raw measurements: what every report section derives with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from _common import Result


@dataclass(frozen=True)
class Row:
    """One result line read from one field of a benchmark's measurements."""

    suffix: str  # the line's name after its section's prefix
    metric: str
    unit: str
    field: str  # the key in each run's measured value
    better: str = "higher"
    note: str = ""


class ResultLines:
    """The result lines derived so far, and the measurements (per bench key) they read."""

    def __init__(self, by_key: dict[str, list[Any]], skipped: dict[str, str]) -> None:
        self.by_key = by_key
        self.skipped = skipped
        self.results: list[Result] = []

    def vals(self, key: str, field: str) -> list[float | None]:
        """``field`` of each run of ``key``: None where the run failed or lacks it."""
        out: list[float | None] = []
        for o in self.by_key.get(key, []):
            v = None if o.value is None else o.value.get(field)
            out.append(float(v) if isinstance(v, int | float) else None)
        return out

    def errors(self, key: str) -> str:
        """The distinct errors of the runs of ``key``, joined and cut short."""
        errs = [o.error for o in self.by_key.get(key, []) if o.error]
        return "; ".join(sorted(set(errs)))[:600]

    def skipped_reason(self, key: str) -> str:
        """Why ``key`` was not measured."""
        for k, why in self.skipped.items():
            if key.startswith(k) or k in key:
                return why
        return "not selected (--only)"

    def add(
        self,
        bench: str,
        name: str,
        metric: str,
        unit: str,
        values: list[float | None],
        *,
        key: str | None = None,
        note: str = "",
        better: str = "higher",
    ) -> None:
        """One line; its status says whether ``key`` was skipped or every run failed."""
        status = "ok"
        if key is not None and key not in self.by_key:
            status, note = "skipped", self.skipped_reason(key) or note
        elif not any(v is not None for v in values):
            status = "failed"
            note = (self.errors(key) if key else "") or note or "no value measured"
        elif key is not None and self.errors(key):
            note = (note + " " if note else "") + "some runs failed: " + self.errors(key)
        self.results.append(
            Result(bench, name, metric, unit, values, status=status, note=note, better=better)
        )

    def rows(self, bench: str, key: str, rows: Sequence[Row], *, prefix: str = "") -> None:
        """A line per row, each read from the runs of ``key``, named ``prefix/suffix``.

        The prefix is ``key`` unless given: only the checkout names its lines apart from
        its key (``checkout/...`` for ``checkout/postgres+nats``).
        """
        for r in rows:
            self.add(
                bench,
                f"{prefix or key}/{r.suffix}",
                r.metric,
                r.unit,
                self.vals(key, r.field),
                key=key,
                note=r.note,
                better=r.better,
            )

    def ratio(
        self,
        name: str,
        num: list[float | None],
        den: list[float | None],
        note: str,
        *,
        metric: str = "ratio",
    ) -> None:
        """A comparison line: ``num / den`` run by run."""
        vals_: list[float | None] = []
        for a, b in zip(num, den, strict=False):
            vals_.append(a / b if a is not None and b not in (None, 0) else None)
        if not any(v is not None for v in vals_):
            # A side that was not measured (DBOS not installed, a server missing) or that
            # failed has its own row saying so; the ratio itself is only not computable.
            self.results.append(
                Result(
                    "compare",
                    name,
                    metric,
                    "x",
                    vals_,
                    status="skipped",
                    note=note + "; a side was not measured (see its own row)",
                )
            )
            return
        self.add("compare", name, metric, "x", vals_, note=note)
