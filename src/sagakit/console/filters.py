"""What the saga list and the manual queue show: their filters, order and page, read
from the query string, checked, and turned into one store query.

The filters are GET forms, so a filtered view is a URL an operator can share. Bad
input is not guessed around: each problem comes back as a sentence that names the
form's field, and the page shows it instead of a list it did not ask for. The checks
are the API's (:func:`sagakit.api.validation.parse_query_filter`); the console adds
human durations (``90 s``, ``30 min``, ``2 h``, ``1 d 4 h``) where the API takes
seconds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sagakit.api.validation import SagaFilter, parse_query_filter
from sagakit.api.views import step_positions
from sagakit.core.instance import MANUAL_STATES, SagaState
from sagakit.runtime.engine import Engine
from sagakit.stores.base import SagaOrder, SagaQuery

PAGE_SIZE = 50
"""Sagas or cases per page."""

MAX_TEXT = 200
"""The longest text a filter takes (a name, a piece of a reason)."""

MAX_SECONDS = 10**10
"""The longest duration a filter takes (the API's bound)."""

LIST_SORTS: dict[str, tuple[SagaOrder, str]] = {
    "newest": (SagaOrder.NEWEST, "newest first"),
    "oldest": (SagaOrder.OLDEST, "oldest first (by age)"),
    "in_state": (SagaOrder.CHANGED_FIRST, "longest in state first"),
    "changed": (SagaOrder.CHANGED_LAST, "last changed first"),
}
"""The saga list's orders: query-string value -> (store order, label)."""

MANUAL_SORTS: dict[str, tuple[SagaOrder, str]] = {
    "oldest": (SagaOrder.CHANGED_FIRST, "waiting longest first"),
    "newest": (SagaOrder.CHANGED_LAST, "newest cases first"),
}
"""The manual queue's orders. A case's wait starts when it entered the queue, its last
change (``updated_at``): nothing but a person's decision changes a saga there."""

_UNITS = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
}
_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")
_SECONDS = re.compile(r"\s*\d+(?:\.\d+)?\s*")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a bare number of seconds (``90``) or numbers with units
    (``30 min``, ``2h``, ``1 d 4 h``, ``1.5 h``); ValueError saying what is expected."""
    expected = "a duration such as 90 s, 30 min, 2 h or 1 d 4 h"
    raw = text.strip().lower()
    if _SECONDS.fullmatch(raw):
        seconds = float(raw)
    else:
        seconds, at = 0.0, 0
        for part in _PART.finditer(raw):
            if part.start() != at or part[2] not in _UNITS:
                raise ValueError(f"must be {expected}, not {text.strip()[:40]!r}")
            seconds += float(part[1]) * _UNITS[part[2]]
            at = part.end()
        if at == 0 or at != len(raw):
            raise ValueError(f"must be {expected}, not {text.strip()[:40]!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"must be at most {MAX_SECONDS} seconds")
    return seconds


def human_duration(seconds: float) -> str:
    """How long, for a person: ``42 s``, ``12 min``, ``3 h 12 min``, ``2 d 4 h``."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s} s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 3600:
        return f"{minutes} min"
    if s < 86400:
        return f"{hours} h {minutes % 60} min" if minutes % 60 else f"{hours} h"
    return f"{days} d {hours % 24} h" if hours % 24 else f"{days} d"


def step_names(engine: Engine) -> list[str]:
    """The step names of every definition version this engine knows, sorted."""
    machines = engine.orchestrator.machines.values()
    return sorted({s.name for m in machines for s in m.definition.steps})


def definition_names(engine: Engine) -> list[str]:
    """The names of the definitions and choreographies this engine knows, sorted."""
    return sorted({name for name, _ in engine.orchestrator.machines} | set(engine.trackers))


@dataclass(frozen=True, slots=True)
class ListQuery:
    """The saga list's filters, order and page, as read from the query string.

    ``min_age``/``max_age`` are kept as typed (shown back in the form); ``problems``
    are the sentences that explain what in them is wrong.
    """

    state: SagaState | None = None
    definition: str | None = None
    search: str = ""
    offset: int = 0
    limit: int = PAGE_SIZE
    step: str | None = None
    min_age: str = ""
    max_age: str = ""
    sort: str = "newest"
    problems: tuple[str, ...] = ()

    @property
    def order(self) -> SagaOrder:
        """The store order of :attr:`sort`."""
        return LIST_SORTS[self.sort][0]

    @property
    def simple(self) -> bool:
        """Whether only a state or a definition narrows the list, newest first: the
        store's plain listing serves it, and the counts per state give its total."""
        return (self.step, self.min_age, self.max_age, self.sort) == (None, "", "", "newest")

    def params(self, **override: str | int | None) -> dict[str, str | int | None]:
        """The query-string parameters of this view, with some replaced."""
        out: dict[str, str | int | None] = {
            "state": self.state.value if self.state else None,
            "definition": self.definition,
            "step": self.step,
            "min_age": self.min_age,
            "max_age": self.max_age,
            "sort": None if self.sort == "newest" else self.sort,
            "q": self.search,
            "offset": self.offset or None,
        }
        out.update(override)
        return out


@dataclass(frozen=True, slots=True)
class ManualQuery:
    """The manual queue's filters, order and page, as read from the query string."""

    definition: str | None = None
    step: str | None = None
    reason: str = ""
    min_wait: str = ""
    sort: str = "oldest"
    offset: int = 0
    limit: int = PAGE_SIZE
    problems: tuple[str, ...] = ()
    waited: float | None = field(default=None, compare=False)
    """:attr:`min_wait` in seconds, once checked."""

    @property
    def order(self) -> SagaOrder:
        """The store order of :attr:`sort`."""
        return MANUAL_SORTS[self.sort][0]

    @property
    def filtered(self) -> bool:
        """Whether a filter narrows the queue (the order and page do not)."""
        return bool(self.definition or self.step or self.reason or self.min_wait)

    def params(self, **override: str | int | None) -> dict[str, str | int | None]:
        """The query-string parameters of this view, with some replaced."""
        out: dict[str, str | int | None] = {
            "definition": self.definition,
            "step": self.step,
            "reason": self.reason,
            "min_wait": self.min_wait,
            "sort": None if self.sort == "oldest" else self.sort,
            "offset": self.offset or None,
        }
        out.update(override)
        return out


_LABELS = {
    "state": "state",
    "definition": "definition",
    "step": "step",
    "min_age": "age at least",
    "max_age": "age at most",
    "offset": "page",
    "sort": "order",
    "reason": "reason contains",
    "min_wait": "waiting at least",
}


def _said(name: str, problem: str) -> str:
    return f"{_LABELS.get(name, name)}: {problem}"


def _text(params: Mapping[str, str], name: str) -> str:
    return params.get(name, "").strip()


def _offset(params: Mapping[str, str], problems: list[str]) -> int:
    raw = _text(params, "offset")
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()) or int(raw) > 10**6:
        problems.append(_said("offset", f"must be a whole number from 0 to 1000000, not {raw!r}"))
        return 0
    return int(raw)


def _sort(
    params: Mapping[str, str], sorts: Mapping[str, object], default: str, out: list[str]
) -> str:
    raw = _text(params, "sort") or default
    if raw not in sorts:
        out.append(_said("sort", f"must be one of {', '.join(sorts)}, not {raw[:40]!r}"))
        return default
    return raw


def _seconds(params: Mapping[str, str], name: str, problems: list[str]) -> str | None:
    """The duration ``name`` in seconds as text (what the API's parser takes), or None."""
    raw = _text(params, name)
    if not raw:
        return None
    try:
        return repr(parse_duration(raw))
    except ValueError as exc:
        problems.append(_said(name, str(exc)))
        return None


def _known_step(engine: Engine, step: str | None, problems: list[str]) -> None:
    if step is not None and len(step) <= MAX_TEXT and not step_positions(engine, step):
        problems.append(
            _said("step", f"no saga definition this console knows has a step {step[:60]!r}")
        )


def read_list_query(engine: Engine, params: Mapping[str, str]) -> tuple[ListQuery, SagaFilter]:
    """The saga list's view of ``params`` and the filter it asks for."""
    problems: list[str] = []
    raw_state = _text(params, "state")
    if "," in raw_state:  # the API takes several; the list's form shows one
        problems.append(_said("state", "choose one state (the counts above filter by each)"))
        raw_state = ""
    api: dict[str, list[str]] = {"state": [raw_state] if raw_state else []}
    for name in ("definition", "step"):
        if _text(params, name):
            api[name] = [_text(params, name)]
    for name in ("min_age", "max_age"):
        seconds = _seconds(params, name, problems)
        if seconds is not None:
            api[name] = [seconds]
    flt, refused = parse_query_filter(api)
    problems += [_said(p.field, p.problem) for p in refused]
    _known_step(engine, flt.step, problems)
    sort = _sort(params, LIST_SORTS, "newest", problems)
    query = ListQuery(
        state=flt.states[0] if flt.states else None,
        definition=_text(params, "definition")[:MAX_TEXT] or None,
        search=_text(params, "q")[:MAX_TEXT],
        offset=_offset(params, problems),
        step=_text(params, "step")[:MAX_TEXT] or None,
        min_age=_text(params, "min_age")[:40],
        max_age=_text(params, "max_age")[:40],
        sort=sort,
        problems=tuple(problems),
    )
    return query, flt


def read_manual_query(engine: Engine, params: Mapping[str, str]) -> ManualQuery:
    """The manual queue's view of ``params``."""
    problems: list[str] = []
    api: dict[str, list[str]] = {}
    for name in ("definition", "step"):
        if _text(params, name):
            api[name] = [_text(params, name)]
    flt, refused = parse_query_filter(api)
    problems += [_said(p.field, p.problem) for p in refused]
    _known_step(engine, flt.step, problems)
    reason = _text(params, "reason")
    if len(reason) > MAX_TEXT:
        problems.append(_said("reason", f"must be at most {MAX_TEXT} characters"))
    waited = _seconds(params, "min_wait", problems)
    return ManualQuery(
        definition=_text(params, "definition")[:MAX_TEXT] or None,
        step=_text(params, "step")[:MAX_TEXT] or None,
        reason=reason[:MAX_TEXT],
        min_wait=_text(params, "min_wait")[:40],
        sort=_sort(params, MANUAL_SORTS, "oldest", problems),
        offset=_offset(params, problems),
        problems=tuple(problems),
        waited=None if waited is None else float(waited),
    )


def list_store_query(engine: Engine, flt: SagaFilter, now: float) -> SagaQuery:
    """The store query of the saga list's filter; ages are measured back from ``now``
    (as the API measures them: since the saga started)."""
    return SagaQuery(
        states=flt.states or None,
        definition=flt.definition,
        version=flt.version,
        positions=None if flt.step is None else step_positions(engine, flt.step),
        created_from=None if flt.max_age is None else now - flt.max_age,
        created_until=None if flt.min_age is None else now - flt.min_age,
    )


def manual_store_query(engine: Engine, query: ManualQuery, now: float) -> SagaQuery:
    """The store query of the manual queue's view: its cases, filtered. The wait is
    measured back from ``now`` to the case's last change (when it entered the queue)."""
    return SagaQuery(
        states=MANUAL_STATES,
        definition=query.definition,
        positions=None if query.step is None else step_positions(engine, query.step),
        updated_until=None if query.waited is None else now - query.waited,
        reason_contains=query.reason or None,
    )
