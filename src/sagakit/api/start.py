"""``POST /sagas``: start a saga of the served app.

The body names a saga definition this API serves, a business key, the saga's data and,
optionally, a definition version (default: the latest, or the version the app's canary
picks for the key)::

    {"definition": "trip", "business_key": "trip-42", "data": {"nights": 2}, "version": 2}

A start is idempotent by business key, as :meth:`~sagakit.runtime.engine.Engine.start`
is: the first request for a key starts the saga (201), a repeat answers 200 with the
saga that key already started, whatever its data or version. Both answer with the
saga's summary and its ``Location``.

Saga data travels in every command and is kept in the saga's history, so it carries
tokens, never personal data: every string value in it, at any depth, that looks like
an e-mail address, a card number, a name or a postal address is refused with 422 (the
rule of ``POST /orders``), as is a business key that looks like one. A field the
definition declares ``tokenise`` or ``public`` (``SagaDefinition(personal=...)``) is left
to the engine, which tokenises it before anything is stored; what the engine refuses
(:class:`~sagakit.errors.PersonalDataRefused`) is a 422 too. Every start is audited (a
structured log line and a row of ``api_audit``) with its outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sagakit.api.auth import Principal, Role
from sagakit.api.http import ApiContext, Endpoint, Reply, json_reply, principal, read_json
from sagakit.api.problems import FieldProblem, invalid
from sagakit.api.validation import is_int, personal_data_problem
from sagakit.api.views import saga_summary
from sagakit.core.instance import SagaInstance
from sagakit.core.personal import Handling
from sagakit.errors import ConcurrencyError, DefinitionError, PersonalDataRefused, SagakitError

audit_log = logging.getLogger("sagakit.api.audit")

FIELDS = ("definition", "business_key", "data", "version")
MAX_KEY = 200
"""Characters a business key may have."""
MAX_PROBLEMS = 20
"""Refused data values named in one answer (the rest are counted)."""
_TRIES = 3


@dataclass(frozen=True, slots=True)
class StartRequest:
    """A validated ``POST /sagas`` body."""

    definition: str
    business_key: str
    data: dict[str, Any]
    version: int | None = None


def served_definitions(ctx: ApiContext) -> dict[str, list[int]]:
    """The orchestrated definitions this API can start: name -> its versions, ascending."""
    out: dict[str, list[int]] = {}
    for name, version in sorted(ctx.engine.orchestrator.machines):
        out.setdefault(name, []).append(version)
    return out


def engine_fields(ctx: ApiContext) -> dict[str, set[str]]:
    """Definition name -> the data fields its versions declare ``tokenise`` or ``public``:
    the engine handles those (any version declaring one suffices here; the engine applies
    the version it starts)."""
    out: dict[str, set[str]] = {}
    for (name, _), machine in ctx.engine.orchestrator.machines.items():
        for path, field in machine.definition.personal.fields.items():
            if field.handling in (Handling.TOKENISE, Handling.PUBLIC):
                out.setdefault(name, set()).add(".".join(path))
    return out


def _text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text on every store (PostgreSQL refuses NUL)."""
    if "\x00" in value:
        return "must not contain a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it has an unpaired surrogate)"
    return None


def data_problems(data: Mapping[str, Any], engine: Collection[str] = ()) -> list[FieldProblem]:
    """Every string value of ``data`` (at any depth) that must not be stored.

    Personal data (:func:`~sagakit.api.validation.personal_data_problem`) and text no
    store can keep. Fields are named by their path: ``data.traveller``,
    ``data.rooms[1].guest``. Walked with a stack, not recursion: the JSON parser
    accepts nesting deeper than this function could recurse. ``engine``: dotted paths
    of fields the engine tokenises or takes as public (:func:`engine_fields`), not
    checked here.
    """
    problems: list[FieldProblem] = []
    refused = 0
    todo: list[tuple[str, object]] = [("data", data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                why = _text_problem(key)
                if why is not None:
                    refused += 1
                    problems.append(FieldProblem(f"{path} (a key)", why))
                if f"{path}.{key}"[len("data.") :] not in engine:
                    todo.append((f"{path}.{key}", item))
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, str):
            why = _text_problem(value) or personal_data_problem(value)
            if why is not None:
                refused += 1
                problems.append(FieldProblem(path, why))
        if len(problems) >= MAX_PROBLEMS:
            break
    if todo and len(problems) >= MAX_PROBLEMS:
        problems.append(
            FieldProblem("data", f"more values were not checked after {refused} refused ones")
        )
    return problems


def parse_start(
    raw: object,
    served: Mapping[str, list[int]],
    engine: Mapping[str, Collection[str]] | None = None,
) -> StartRequest:
    """Validate a ``POST /sagas`` body against the ``served`` definitions; 422 naming
    every refused field (``engine``: per definition, the fields the engine tokenises or
    takes as public, see :func:`engine_fields`)."""
    if not isinstance(raw, dict):
        raise invalid([FieldProblem("body", "must be a JSON object")], "the start")
    problems = [
        FieldProblem(k, f"unknown field; a start takes {', '.join(FIELDS)}")
        for k in sorted(raw)
        if k not in FIELDS
    ]
    names = ", ".join(served) or "none (this API starts no orchestrated saga)"
    given = raw.get("definition")
    definition: str | None = None
    if given is None or given == "":
        problems.append(FieldProblem("definition", f"is required: one of {names}"))
    elif not isinstance(given, str):
        problems.append(FieldProblem("definition", f"must be a name, one of {names}"))
    elif given not in served:
        problems.append(
            FieldProblem("definition", f"no saga definition {given[:100]!r}; served: {names}")
        )
    else:
        definition = given
    version = raw.get("version")
    if version is not None:
        if not (is_int(version) and 1 <= version <= 2**31):
            problems.append(FieldProblem("version", "must be an integer >= 1 (or left out)"))
        elif definition is not None and version not in served[definition]:
            known = ", ".join(map(str, served[definition]))
            problems.append(
                FieldProblem(
                    "version", f"{definition} has no version {version}; served versions: {known}"
                )
            )
    key = raw.get("business_key")
    if not isinstance(key, str) or not key.strip():
        problems.append(
            FieldProblem("business_key", "is required: a non-empty string, e.g. 'trip-42'")
        )
    elif len(key) > MAX_KEY or not key.isprintable():
        problems.append(
            FieldProblem(
                "business_key",
                f"must be 1 to {MAX_KEY} printable characters (no control characters)",
            )
        )
    else:
        why = personal_data_problem(key)
        if why is not None:
            problems.append(FieldProblem("business_key", why))
    data = raw.get("data", {})
    if not isinstance(data, dict):
        problems.append(FieldProblem("data", "must be a JSON object (the saga's data)"))
    else:
        problems += data_problems(data, (engine or {}).get(definition or "", ()))
    if problems:
        raise invalid(problems, "the start")
    assert isinstance(definition, str) and isinstance(key, str) and isinstance(data, dict)
    return StartRequest(definition, key, data, version)


async def start_saga(
    ctx: ApiContext, who: Principal, req: StartRequest
) -> tuple[SagaInstance, bool]:
    """Start the saga of ``req`` (or find the one its key started): ``(saga, created)``.

    Audited (log line and ``api_audit`` row) with the outcome ``created``, ``existing``,
    ``refused`` (its first step cannot be built from the data) or ``error``.
    """
    outcome, saga_id = "error", None
    detail: dict[str, Any] = {}
    try:
        for attempt in range(1, _TRIES + 1):
            try:
                # The orchestrator's start is what Engine.start runs, and also says whether
                # the saga is new: 201 or 200.
                inst, created = await ctx.engine.orchestrator.start(
                    req.definition, req.business_key, req.data, version=req.version
                )
                break
            except ConcurrencyError:
                # Another request started this key between our lookup and our insert:
                # the next try finds its saga.
                if attempt == _TRIES:
                    raise
            except DefinitionError as exc:
                outcome, detail = "refused", {"message": str(exc)}
                raise invalid([FieldProblem("definition", str(exc))], "the start") from None
            except PersonalDataRefused as exc:
                # The definition's own rules (a declared field, or data the API let
                # through for the engine): the message names the field, never the value.
                outcome, detail = "refused", {"message": str(exc)}
                raise invalid([FieldProblem(exc.where, str(exc))], "the start") from None
            except (LookupError, TypeError, ValueError, AttributeError) as exc:
                if isinstance(exc, SagakitError):
                    raise
                # The first step's payload builder (the app's code) read the data and
                # failed: what the data lacks is the caller's to fix, not a server fault.
                audit_log.warning(
                    "start of %s for key %s refused: its first command cannot be built",
                    req.definition,
                    req.business_key,
                    exc_info=exc,
                    extra={"actor": who.name, "action": "start_saga"},
                )
                why = (
                    f"the saga's first command cannot be built from this data "
                    f"({type(exc).__name__}: {str(exc)[:200]}); send the fields "
                    f"{req.definition} expects"
                )
                outcome, detail = "refused", {"message": why}
                raise invalid([FieldProblem("data", why)], "the start") from None
        outcome = "created" if created else "existing"
        saga_id = inst.saga_id
        detail = {"state": inst.state.value, "version": inst.version}
        return inst, created
    finally:
        definition = f"{req.definition}@{req.version or 'latest'}"
        audit_log.info(
            "start_saga %s key %s by %s: %s",
            definition,
            req.business_key,
            who.name,
            outcome,
            extra={
                "saga_id": saga_id,
                "actor": who.name,
                "action": "start_saga",
                "outcome": outcome,
            },
        )
        detail = {"definition": definition, "business_key": req.business_key, **detail}
        await ctx.records.audit(
            who, "start_saga", saga_id=saga_id, reason=None, outcome=outcome, detail=detail
        )


def endpoints(ctx: ApiContext) -> list[Endpoint]:
    """``POST /sagas``."""

    async def start(request: Request) -> Response:
        who = principal(request)
        req = parse_start(
            await read_json(request, ctx.max_body), served_definitions(ctx), engine_fields(ctx)
        )
        inst, created = await start_saga(ctx, who, req)
        return json_reply(
            saga_summary(ctx.engine, inst, time.time()),
            201 if created else 200,
            {"Location": f"/sagas/{inst.saga_id}"},
        )

    return [
        Endpoint(
            "POST",
            "/sagas",
            Role.OPERATOR,
            start,
            "startSaga",
            "Start a saga of the served app (idempotent by business key)",
            "sagas",
            {
                201: Reply("A new saga; it runs on after the answer.", "SagaSummary"),
                200: Reply(
                    "The saga this definition already started for the business key "
                    "(its data and version are the first request's).",
                    "SagaSummary",
                ),
            },
            body="StartSagaRequest",
            description="`definition` is one of the served app's saga definitions "
            "(`version` defaults to the latest, or to the one the app's canary picks for "
            "the key). Tokens only: every string value of `data`, at any depth, and the "
            "business key are refused with 422 when they look like a name, a postal "
            "address, an e-mail address or a card number, but for the fields the "
            "definition declares `tokenise` (the engine stores a token) or `public`. A "
            "422 also lists the served "
            "definitions or versions when the request names another, and says when the "
            "first step cannot build its command from the data.",
        )
    ]
