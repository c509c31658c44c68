"""Request validation: orders, operator actions, batch requests and saga filters.

Pure functions over parsed JSON and query strings; each collects *every* problem and
raises one 422 naming them all. Orders carry tokens, never personal data: a value that
looks like a name, an e-mail address or a card number is refused, so it never reaches
a saga's data, a message or a log. An operator's free-text reason is refused in the same
way when it holds an e-mail address, a card number or a street address
(:func:`reason_problem`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from sagakit.api.problems import ApiError, FieldProblem, invalid
from sagakit.core.instance import SagaState
from sagakit.core.machine import ManualAction
from sagakit.core.machine_manual import describe, irreversible
from sagakit.redaction import personal_data_in

TOKEN_PATTERN = r"^[a-z][a-z0-9]*-[A-Za-z0-9_.:\-]*[0-9][A-Za-z0-9_.:\-]*$"
"""A token: a lower-case kind, ``-``, an opaque id with a digit (``cust-000123``)."""
SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"
MAX_QTY = 10_000
MAX_AMOUNT = 100_000_000_000
"""Cents: a billion in the currency's main unit is beyond any checkout."""
MAX_REASON = 1000
MAX_BATCH = 1000
ORDER_FIELDS = ("sku", "qty", "amount", "currency", "customer", "card", "ship_to")
TOKEN_FIELDS = {"customer": "cust-000123", "card": "card-ok-42", "ship_to": "addr-ok-7"}
CANCEL = "cancel"
ACTIONS = (*(a.value for a in ManualAction), CANCEL)
"""What ``POST /sagas/{id}/actions`` takes: the manual actions, and ``cancel``."""

_TOKEN = re.compile(TOKEN_PATTERN)
_SKU = re.compile(SKU_PATTERN)
_CURRENCY = re.compile(CURRENCY_PATTERN)
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
# 13 to 19 digits, maybe grouped by spaces or dashes: a payment card number.
_CARD_NUMBER = re.compile(r"\d(?:[ \-]?\d){12,}")
_NAME_LIKE = re.compile(r"^[A-Z][a-z]+(?:[ ,'\-][A-Za-z]+)*$")


def personal_data_problem(value: str) -> str | None:
    """Why ``value`` looks like personal data (and must not be accepted), or None."""
    if _EMAIL.search(value):
        return "looks like an e-mail address; send the customer's token instead"
    if _CARD_NUMBER.search(value):
        return "looks like a card number; send the card token from the payment provider"
    if _NAME_LIKE.match(value) or any(c.isspace() for c in value) or "," in value:
        return "looks like a name or a postal address; send a token instead"
    return None


def reason_problem(value: object) -> str | None:
    """Why ``value`` cannot be an operator's ``reason``, or None.

    A reason is kept for good: in the saga's history, in ``api_audit``, in the log, on
    the console. One that holds personal data (:func:`~sagakit.redaction.personal_data_in`)
    is refused, not masked: the operator learns it at once and writes it again with the
    customer's token, a masked reason would lose what the operator meant, and orders
    already follow this rule. Checked before anything is stored or audited.
    """
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_REASON:
        return f"is required: why (1 to {MAX_REASON} characters; audited)"
    found = personal_data_in(value)
    if found is not None:
        return (
            f"holds {found}: a reason is kept for good in the saga's history and the audit, "
            "so write it without personal data and name the customer by their token "
            "(cust-000123)"
        )
    return None


def is_int(value: object) -> TypeGuard[int]:
    """True for a JSON integer (``True`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """A validated order: tokens and numbers only."""

    sku: str
    qty: int
    amount: int
    currency: str
    customer: str
    card: str
    ship_to: str

    def saga_data(self) -> dict[str, Any]:
        """The checkout saga's data."""
        return {f: getattr(self, f) for f in ORDER_FIELDS}

    def body_hash(self) -> str:
        """SHA-256 of the canonical body: equal for equal orders, whatever the JSON layout."""
        canonical = json.dumps(self.saga_data(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_order(raw: object) -> OrderRequest:
    """Validate a ``POST /orders`` body; 422 naming every refused field."""
    if not isinstance(raw, dict):
        raise invalid([FieldProblem("body", "must be a JSON object")], "the order")
    problems = [
        FieldProblem(k, f"unknown field; an order takes only {', '.join(ORDER_FIELDS)}")
        for k in sorted(raw)
        if k not in ORDER_FIELDS
    ]
    for name in ORDER_FIELDS:
        if name not in raw:
            problems.append(FieldProblem(name, "is required"))
    sku = raw.get("sku")
    if "sku" in raw and not (isinstance(sku, str) and _SKU.match(sku)):
        problems.append(FieldProblem("sku", f"must be a SKU matching {SKU_PATTERN}"))
    for name, most in (("qty", MAX_QTY), ("amount", MAX_AMOUNT)):
        value = raw.get(name)
        if name in raw and not (is_int(value) and 1 <= value <= most):
            unit = " (minor units, e.g. cents)" if name == "amount" else ""
            problems.append(FieldProblem(name, f"must be an integer from 1 to {most}{unit}"))
    currency = raw.get("currency")
    if "currency" in raw and not (isinstance(currency, str) and _CURRENCY.match(currency)):
        problems.append(FieldProblem("currency", "must be an ISO 4217 code such as EUR"))
    for name, example in TOKEN_FIELDS.items():
        value = raw.get(name)
        if name not in raw:
            continue
        if not isinstance(value, str) or not value:
            problems.append(FieldProblem(name, f"must be a token string such as {example!r}"))
            continue
        why = personal_data_problem(value)
        if why is None and (len(value) > 128 or not _TOKEN.match(value)):
            why = (
                f"must be a token such as {example!r}: a lower-case kind, '-', and an "
                "opaque id with at least one digit (at most 128 characters)"
            )
        if why is not None:
            problems.append(FieldProblem(name, why))
    if problems:
        raise invalid(problems, "the order")
    return OrderRequest(**{f: raw[f] for f in ORDER_FIELDS})


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """A validated operator action on one saga.

    ``confirm``: the caller confirmed an irreversible action (required for those, see
    :data:`~sagakit.core.machine_manual.IRREVERSIBLE`); ``force``: accept a partial
    saga although holds are open; ``expected_version``: the saga version the decision
    was made on (the ``If-Match`` header; None: not given).
    """

    action: str
    reason: str
    rung: int | None = None
    confirm: bool = False
    force: bool = False
    expected_version: int | None = None


ACTION_FIELDS = ("action", "reason", "rung", "confirm", "force")
"""The members of an action's body."""


def _action_problems(raw: Mapping[str, Any]) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    action = raw.get("action")
    if action not in ACTIONS:
        problems.append(FieldProblem("action", f"must be one of {', '.join(ACTIONS)}"))
    why = reason_problem(raw.get("reason"))
    if why is not None:
        problems.append(FieldProblem("reason", why))
    rung = raw.get("rung")
    if action == ManualAction.USE_RUNG.value:
        if not (is_int(rung) and 0 <= rung <= 100):
            problems.append(FieldProblem("rung", "use_rung needs the rung: an integer >= 0"))
    elif rung is not None:
        problems.append(FieldProblem("rung", "only use_rung takes a rung"))
    for flag in ("confirm", "force"):
        if flag in raw and not isinstance(raw[flag], bool):
            problems.append(FieldProblem(flag, "must be true or false"))
    if raw.get("force") is True and action != ManualAction.ACCEPT_PARTIAL.value:
        problems.append(FieldProblem("force", "only accept_partial takes force"))
    return problems


def confirmation_required(action: str, what: str = "the action") -> ApiError:
    """The 422 (``confirmation_required``) of an irreversible action sent without
    ``"confirm": true``: it says what the action would do."""
    message = (
        f'{what}: {action} cannot be taken back, so it needs "confirm": true. '
        f"What it does: {describe(action)}"
    )
    problem = FieldProblem("confirm", f'{action} is irreversible: send "confirm": true')
    return ApiError(422, message, code="confirmation_required", fields=[problem])


def _action_of(raw: Mapping[str, Any]) -> ActionRequest:
    return ActionRequest(
        raw["action"],
        raw["reason"].strip(),
        raw.get("rung"),
        confirm=raw.get("confirm") is True,
        force=raw.get("force") is True,
    )


def parse_action(raw: object) -> ActionRequest:
    """Validate a ``POST /sagas/{id}/actions`` body: 422 ``invalid_fields`` for bad
    members, 422 ``confirmation_required`` for an irreversible action not confirmed."""
    if not isinstance(raw, dict):
        raise invalid([FieldProblem("body", "must be a JSON object")], "the action")
    problems = [
        FieldProblem(k, f"unknown field; an action takes {', '.join(ACTION_FIELDS)}")
        for k in sorted(raw)
        if k not in ACTION_FIELDS
    ]
    problems += _action_problems(raw)
    if problems:
        raise invalid(problems, "the action")
    req = _action_of(raw)
    if irreversible(req.action) and not req.confirm:
        raise confirmation_required(req.action)
    return req


@dataclass(frozen=True, slots=True)
class SagaFilter:
    """Which sagas an operator means. Empty fields match everything."""

    states: tuple[SagaState, ...] = ()
    definition: str | None = None
    version: int | None = None
    step: str | None = None
    min_age: float | None = None
    max_age: float | None = None
    saga_ids: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when nothing narrows the selection."""
        return self == SagaFilter()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (unset criteria left out)."""
        out: dict[str, Any] = {}
        if self.states:
            out["state"] = [s.value for s in self.states]
        for key in ("definition", "version", "step", "min_age", "max_age"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.saga_ids:
            out["saga_ids"] = list(self.saga_ids)
        return out


def _filter_from(
    values: Mapping[str, Any], prefix: str, ids: bool
) -> tuple[SagaFilter, list[FieldProblem]]:
    problems: list[FieldProblem] = []
    states: list[SagaState] = []
    for raw_state in values.get("state") or []:
        try:
            states.append(SagaState(raw_state))
        except ValueError:
            problems.append(
                FieldProblem(
                    f"{prefix}state",
                    f"{raw_state!r} is not one of {', '.join(s.value for s in SagaState)}",
                )
            )
    text: dict[str, str | None] = {}
    for key in ("definition", "step"):
        v = values.get(key)
        if v is not None and not (isinstance(v, str) and 0 < len(v) <= 200):
            problems.append(FieldProblem(f"{prefix}{key}", "must be a name (1-200 characters)"))
            v = None
        text[key] = v
    version = values.get("version")
    if version is not None and not (is_int(version) and 1 <= version <= 2**31):
        problems.append(FieldProblem(f"{prefix}version", "must be an integer >= 1"))
        version = None
    ages: dict[str, float | None] = {}
    for key in ("min_age", "max_age"):
        v = values.get(key)
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if v is not None and not (ok and 0 <= v <= 10**10):
            problems.append(FieldProblem(f"{prefix}{key}", "must be a number of seconds >= 0"))
            v = None
        ages[key] = None if v is None else float(v)
    lo, hi = ages["min_age"], ages["max_age"]
    if lo is not None and hi is not None and lo > hi:
        problems.append(FieldProblem(f"{prefix}min_age", "must not exceed max_age"))
    saga_ids: list[str] = []
    if ids:
        raw_ids = values.get("saga_ids")
        if raw_ids is not None:
            if not (
                isinstance(raw_ids, list)
                and len(raw_ids) <= MAX_BATCH
                and all(isinstance(i, str) and 0 < len(i) <= 200 for i in raw_ids)
            ):
                problems.append(
                    FieldProblem(f"{prefix}saga_ids", f"must be a list of at most {MAX_BATCH} ids")
                )
            else:
                saga_ids = list(dict.fromkeys(raw_ids))
    flt = SagaFilter(
        tuple(dict.fromkeys(states)),
        text["definition"],
        version,
        text["step"],
        lo,
        hi,
        tuple(saga_ids),
    )
    return flt, problems


def parse_query_filter(query: Mapping[str, Sequence[str]]) -> tuple[SagaFilter, list[FieldProblem]]:
    """A filter from ``GET /sagas`` query parameters (``state`` repeated or comma-separated)."""
    values: dict[str, Any] = {}
    problems: list[FieldProblem] = []
    states = [s for item in query.get("state", []) for s in item.split(",") if s]
    values["state"] = states
    for key in ("definition", "step"):
        if query.get(key):
            values[key] = query[key][-1]
    converters = {"version": int, "min_age": float, "max_age": float}
    for key, conv in converters.items():
        if query.get(key):
            try:
                values[key] = conv(query[key][-1])
            except ValueError:
                problems.append(FieldProblem(key, f"must be a number, got {query[key][-1]!r}"))
    flt, more = _filter_from(values, "", ids=False)
    return flt, problems + more


def parse_paging(
    query: Mapping[str, Sequence[str]], *, default: int = 50, most: int = 500
) -> tuple[int, int, list[FieldProblem]]:
    """``limit`` (1..most) and ``offset`` (>= 0) from a query string."""
    problems: list[FieldProblem] = []
    out = {"limit": default, "offset": 0}
    bounds = {"limit": (1, most), "offset": (0, 10**9)}
    for key, (lo, hi) in bounds.items():
        if not query.get(key):
            continue
        raw = query[key][-1]
        if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
            problems.append(FieldProblem(key, f"must be an integer from {lo} to {hi}"))
        else:
            out[key] = int(raw)
    return out["limit"], out["offset"], problems


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """A validated batch: a filter, one action for every saga it matches, and a dry-run flag."""

    filter: SagaFilter
    action: ActionRequest
    dry_run: bool
    limit: int = 100
    expected_versions: dict[str, int] = field(default_factory=dict)
    """saga id -> the version the decision was made on (from the dry run); a saga
    listed here that moved since is refused (``saga_moved``), the others act as read."""


def parse_batch(raw: object) -> BatchRequest:
    """Validate a ``POST /sagas/actions/batch`` body."""
    if not isinstance(raw, dict):
        raise invalid([FieldProblem("body", "must be a JSON object")], "the batch")
    allowed = ("filter", *ACTION_FIELDS, "dry_run", "limit", "expected_versions")
    problems = [
        FieldProblem(k, f"unknown field; a batch takes {', '.join(allowed)}")
        for k in sorted(raw)
        if k not in allowed
    ]
    problems += _action_problems(raw)
    dry_run = raw.get("dry_run")
    if not isinstance(dry_run, bool):
        problems.append(
            FieldProblem("dry_run", "is required: true to count the matching sagas, false to act")
        )
    limit = raw.get("limit", 100)
    if not (is_int(limit) and 1 <= limit <= MAX_BATCH):
        problems.append(FieldProblem("limit", f"must be an integer from 1 to {MAX_BATCH}"))
    versions = raw.get("expected_versions", {})
    if not (
        isinstance(versions, dict)
        and len(versions) <= MAX_BATCH
        and all(is_int(v) and v >= 1 for v in versions.values())
    ):
        problems.append(
            FieldProblem(
                "expected_versions",
                f"must map saga ids to the versions the decision was made on (at most "
                f"{MAX_BATCH}): the dry run's versions",
            )
        )
        versions = {}
    raw_filter = raw.get("filter")
    flt = SagaFilter()
    if not isinstance(raw_filter, dict):
        problems.append(FieldProblem("filter", "is required: an object of criteria"))
    else:
        known = ("state", "definition", "version", "step", "min_age", "max_age", "saga_ids")
        problems += [
            FieldProblem(f"filter.{k}", f"unknown criterion; use {', '.join(known)}")
            for k in sorted(raw_filter)
            if k not in known
        ]
        states = raw_filter.get("state", [])
        if isinstance(states, str):
            states = [states]
        if not isinstance(states, list) or not all(isinstance(s, str) for s in states):
            problems.append(FieldProblem("filter.state", "must be a list of saga states"))
            states = []
        flt, more = _filter_from({**raw_filter, "state": states}, "filter.", ids=True)
        problems += more
        if flt.empty and not more:
            problems.append(
                FieldProblem("filter", "must narrow the selection (at least one criterion)")
            )
    if problems:
        raise invalid(problems, "the batch")
    action = _action_of(raw)
    if dry_run is False and irreversible(action.action) and not action.confirm:
        raise confirmation_required(action.action, "the batch")
    return BatchRequest(flt, action, dry_run is True, limit, dict(versions))


def parse_json(body: bytes) -> object:
    """Parse a request body; 400 saying why it is not JSON."""
    if not body.strip():
        raise ApiError(400, "the request needs a JSON body", code="malformed_json")

    def no_constants(name: str) -> object:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text", code="malformed_json") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="malformed_json") from None
