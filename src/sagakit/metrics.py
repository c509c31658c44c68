"""In-process metrics: counters and histograms, written out in Prometheus text format.

No client library: a metric is a dict from label values to a small mutable cell, so
recording on the hot path is one dict lookup and one addition (the label text is
built once, when a label combination is first seen)::

    STARTED = REGISTRY.counter("sagakit_sagas_started_total", "Sagas started.", ("definition",))
    STARTED.labels("checkout").inc()
    text = REGISTRY.exposition()          # what GET /metrics serves

**Transactions.** The runtime records what a transaction did *inside* it, but a
transaction may roll back and be retried (a lost version race, a batch retried one
message at a time). Inside :func:`deferred` recordings are held back and applied by
:meth:`Deferred.commit` once the transaction committed, so nothing is counted twice.

**Concurrency.** Cells are updated on the event loop's thread without awaiting, so
asyncio tasks cannot interleave inside an update. Recording from other threads is not
supported (an update is a read-modify-write, not atomic across threads).

The process-wide :data:`REGISTRY` holds sagakit's own metrics (below); one process is
one Prometheus target, so several engines in one process add up, as they should.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Generic, TypeVar

from sagakit.core.instance import HistoryEntry, SagaInstance

__all__ = [
    "ALERTS_RAISED",
    "ALERT_DELIVERIES",
    "INBOX_DUPLICATES",
    "INPUTS_RESUMED",
    "INPUTS_SET_ASIDE",
    "REGISTRY",
    "SAGAS_FINISHED",
    "SAGAS_STARTED",
    "STEP_BUCKETS",
    "STEP_SECONDS",
    "Counter",
    "Deferred",
    "Histogram",
    "Registry",
    "deferred",
    "escape",
    "format_value",
    "label_text",
    "on_commit",
    "record_history",
]

_M = TypeVar("_M", bound="_Metric")
_T = TypeVar("_T")
_Recording = tuple[Callable[[float], None], float]
_pending: ContextVar[list[_Recording] | None] = ContextVar("sagakit_metrics_pending", default=None)


def _record(apply: Callable[[float], None], value: float) -> None:
    pending = _pending.get()
    if pending is None:
        apply(value)
    else:
        pending.append((apply, value))


class Deferred:
    """Recordings held back by :func:`deferred` until :meth:`commit`."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[_Recording] = []

    def commit(self) -> None:
        """Apply the held-back recordings (call it once the transaction committed)."""
        items, self.items = self.items, []
        for apply, value in items:
            apply(value)


@contextlib.contextmanager
def deferred() -> Iterator[Deferred]:
    """Hold back every recording made in this block, in this task, until ``commit()``.

    Recordings not committed when the block ends are dropped (the transaction they
    describe rolled back).
    """
    held = Deferred()
    token = _pending.set(held.items)
    try:
        yield held
    finally:
        _pending.reset(token)


def on_commit(inner: AbstractAsyncContextManager[_T]) -> AbstractAsyncContextManager[_T]:
    """Wrap a transaction so that what is recorded inside it counts once it commits.

    ``async with on_commit(store.transaction()) as tx:`` is :func:`deferred` around
    the block, committed when the transaction exits without an error.
    """
    return _OnCommit(inner)


class _OnCommit(AbstractAsyncContextManager[_T], Generic[_T]):
    # A class rather than @asynccontextmanager: it wraps every transaction of the
    # runtime, and a generator-based one costs several microseconds more each.

    __slots__ = ("_held", "_inner", "_token")

    def __init__(self, inner: AbstractAsyncContextManager[_T]) -> None:
        self._inner = inner
        self._held = Deferred()
        self._token: Token[list[_Recording] | None] | None = None

    async def __aenter__(self) -> _T:
        self._token = _pending.set(self._held.items)
        try:
            return await self._inner.__aenter__()
        except BaseException:
            _pending.reset(self._token)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._token is not None, "entered before exit"
        try:
            suppressed = await self._inner.__aexit__(exc_type, exc, tb)
        finally:
            _pending.reset(self._token)
        if exc_type is None:  # committed (an error would have been raised by the commit)
            self._held.commit()
        return suppressed


def escape(value: str) -> str:
    """A label value escaped as the exposition format wants (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_text(names: Sequence[str], values: Sequence[str]) -> str:
    """``a="x",b="y"``, values escaped."""
    return ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, values, strict=True))


def format_value(value: float) -> str:
    """A sample value: integers without a decimal point, ``+Inf``, else full precision."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class _CounterCell:
    __slots__ = ("apply", "labels", "value")

    def __init__(self, labels: str) -> None:
        self.labels = labels
        self.value = 0.0
        self.apply = self._add  # bound once: inc() runs on the hot path

    def _add(self, amount: float) -> None:
        self.value += amount

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (at commit, inside :func:`deferred`)."""
        _record(self.apply, amount)


class _HistogramCell:
    __slots__ = ("apply", "bounds", "buckets", "count", "labels", "sum")

    def __init__(self, labels: str, bounds: tuple[float, ...]) -> None:
        self.labels = labels
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.apply = self._observe

    def _observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = "<=").
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def observe(self, value: float) -> None:
        """Count one observation (at commit, inside :func:`deferred`)."""
        _record(self.apply, value)


class _Metric(ABC):
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)

    def _check(self, values: tuple[str, ...]) -> str:
        if len(values) != len(self.label_names):
            raise ValueError(
                f"{self.name} takes labels {self.label_names}, got {len(values)} value(s)"
            )
        return label_text(self.label_names, values)

    def lines(self) -> Iterator[str]:
        """The metric's exposition lines (HELP, TYPE, samples)."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        yield from self._samples()

    @abstractmethod
    def _samples(self) -> Iterator[str]:
        """The sample lines; each kind writes its own."""


class Counter(_Metric):
    """A count that only goes up, per combination of label values."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._cells: dict[tuple[str, ...], _CounterCell] = {}

    def labels(self, *values: str) -> _CounterCell:
        """The cell of these label values (created at first use); keep it if you can."""
        cell = self._cells.get(values)
        if cell is None:
            cell = self._cells.setdefault(values, _CounterCell(self._check(values)))
        return cell

    def value(self, *values: str) -> float:
        """The current count of these label values (0 if never recorded)."""
        cell = self._cells.get(values)
        return 0.0 if cell is None else cell.value

    def _samples(self) -> Iterator[str]:
        for cell in list(self._cells.values()):
            labels = f"{{{cell.labels}}}" if cell.labels else ""
            yield f"{self.name}{labels} {format_value(cell.value)}"


class Histogram(_Metric):
    """Observations counted in cumulative buckets (``le``), with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, help_text, label_names)
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be increasing numbers, got {buckets!r}")
        self.bounds = bounds
        self._cells: dict[tuple[str, ...], _HistogramCell] = {}

    def labels(self, *values: str) -> _HistogramCell:
        """The cell of these label values (created at first use)."""
        cell = self._cells.get(values)
        if cell is None:
            cell = self._cells.setdefault(values, _HistogramCell(self._check(values), self.bounds))
        return cell

    def snapshot(self, *values: str) -> tuple[list[int], float, int]:
        """``(cumulative bucket counts incl. +Inf, sum, count)`` of these label values."""
        cell = self._cells.get(values)
        if cell is None:
            return [0] * (len(self.bounds) + 1), 0.0, 0
        cumulative, total = [], 0
        for n in cell.buckets:
            total += n
            cumulative.append(total)
        return cumulative, cell.sum, cell.count

    def _samples(self) -> Iterator[str]:
        for cell in list(self._cells.values()):
            sep = "," if cell.labels else ""
            running = 0
            for bound, n in zip((*self.bounds, math.inf), cell.buckets, strict=True):
                running += n
                le = format_value(bound) if math.isinf(bound) else repr(bound)
                yield f'{self.name}_bucket{{{cell.labels}{sep}le="{le}"}} {running}'
            labels = f"{{{cell.labels}}}" if cell.labels else ""
            yield f"{self.name}_sum{labels} {format_value(cell.sum)}"
            yield f"{self.name}_count{labels} {cell.count}"


class Registry:
    """Named metrics, written out together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def counter(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> Counter:
        """The counter ``name`` (created, or the one registered before with the same labels)."""
        return self._get(Counter(name, help_text, label_names))

    def histogram(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> Histogram:
        """The histogram ``name`` (created, or the one registered before)."""
        return self._get(Histogram(name, help_text, label_names, buckets=buckets))

    def _get(self, metric: _M) -> _M:
        known = self._metrics.setdefault(metric.name, metric)
        if type(known) is not type(metric) or known.label_names != metric.label_names:
            raise ValueError(
                f"metric {metric.name} is already registered as a {known.kind} with labels "
                f"{known.label_names}"
            )
        return known

    def exposition(self) -> str:
        """Every metric in the text exposition format (0.0.4), one line each."""
        return "".join(line + "\n" for m in list(self._metrics.values()) for line in m.lines())


REGISTRY = Registry()
"""The process-wide registry of sagakit's metrics (served by ``GET /metrics``)."""

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
"""Seconds: from a local call (milliseconds) to a step that waits on retries (an hour)."""

SAGAS_STARTED = REGISTRY.counter(
    "sagakit_sagas_started_total", "Sagas started, by definition.", ("definition",)
)
SAGAS_FINISHED = REGISTRY.counter(
    "sagakit_sagas_finished_total",
    "Sagas that reached a terminal state, by definition and state (a saga a person "
    "resolves after FAILED_NEEDS_MANUAL counts again with its final state).",
    ("definition", "state"),
)
STEP_SECONDS = REGISTRY.histogram(
    "sagakit_step_duration_seconds",
    "Seconds from a step's first command to the reply that settled it (retries "
    "included), by definition, step and outcome (succeeded, failed, skipped).",
    ("definition", "step", "outcome"),
    buckets=STEP_BUCKETS,
)
INBOX_DUPLICATES = REGISTRY.counter(
    "sagakit_inbox_duplicates_total",
    "Deliveries skipped because their message id was already in the consumer's inbox.",
    ("consumer",),
)

INPUTS_SET_ASIDE = REGISTRY.counter(
    "sagakit_inputs_set_aside_total",
    "Saga inputs (kind: reply, local step, timer) set aside because this process does "
    "not have the saga's definition version, by definition and version (name@N).",
    ("waiting_for", "kind"),
)
INPUTS_RESUMED = REGISTRY.counter(
    "sagakit_inputs_resumed_total",
    "Saga inputs set aside for a missing definition version that this process applied.",
    ("waiting_for", "kind"),
)

ALERTS_RAISED = REGISTRY.counter(
    "sagakit_alerts_raised_total",
    "Alerts written to an alert mailbox, by kind (FAILED_NEEDS_MANUAL, TIMED_OUT, "
    "dead_letter); see sagakit.runtime.alerts.",
    ("kind",),
)
ALERT_DELIVERIES = REGISTRY.counter(
    "sagakit_alert_deliveries_total",
    "Alert posts by webhook and outcome: delivered (2xx), failed (to be retried), "
    "parked (a dead letter after the last attempt).",
    ("webhook", "outcome"),
)

_STEP_OUTCOMES = {"step.succeeded": "succeeded", "step.failed": "failed", "step.skipped": "skipped"}


def record_history(
    inst: SagaInstance,
    step_names: Sequence[str],
    history: Sequence[HistoryEntry],
    *,
    finishing: frozenset[str] = frozenset({"saga.finished"}),
) -> None:
    """Count what one transition's history says: started, finished, steps settled.

    ``inst`` is the instance after the transition; a step's duration runs from its
    ``started_at`` (its first command) to the history entry that settled it.
    ``finishing`` names the events that put a saga in a terminal state (the
    choreography tracker escalates with ``manual.escalated`` alone).
    """
    for h in history:
        event = h.event
        if event == "saga.started":
            SAGAS_STARTED.labels(inst.definition).inc()
        elif event in finishing:
            SAGAS_FINISHED.labels(inst.definition, h.state.value).inc()
        elif (outcome := _STEP_OUTCOMES.get(event)) is not None and h.step is not None:
            if h.step not in step_names:
                continue
            started = inst.steps[step_names.index(h.step)].started_at
            if started is not None:
                cell = STEP_SECONDS.labels(inst.definition, h.step, outcome)
                cell.observe(max(h.at - started, 0.0))
