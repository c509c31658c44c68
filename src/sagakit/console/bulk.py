"""Bulk decisions from the manual queue: one decision over a selection of cases or over
every case a filter matches, dry run first, one confirmation.

The queue page carries a form (:func:`selection_form`) and a box on every card
(:func:`case_checkbox`). Its post comes here (:func:`dry_run`), which writes nothing: it
says what the decision does and, for every saga, its version and what the decision
would make of it or why it would be refused (the engine's own
:meth:`~sagakit.runtime.engine.Engine.preview`, the one the API's dry run uses). The
page's single confirmation posts the sagas back with the versions it showed
(:func:`apply`): each decision goes through :meth:`Engine.resolve
<sagakit.runtime.engine.Engine.resolve>` as a single decision does, under the console
user's name and on that version only, so a saga that moved since is refused
(``saga_moved``) and reported, never decided on a state nobody looked at.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response

from sagakit.console import choreo, filters
from sagakit.console import html as h
from sagakit.console.decisions import moved
from sagakit.console.html import e, url
from sagakit.console.http import read_form_values
from sagakit.core.instance import MANUAL_STATES, SagaInstance
from sagakit.core.machine_manual import DESCRIPTIONS, irreversible
from sagakit.errors import (
    ConcurrencyError,
    DefinitionError,
    ManualActionRefused,
    NoDriver,
    OpenHolds,
    SagaMoved,
    SagaNotFound,
    VersionMissing,
)

if TYPE_CHECKING:
    from sagakit.console.routes import _Console

log = logging.getLogger(__name__)

BULK_ACTIONS = ("retry", "compensate", "mark_compensated", "mark_done", "accept_partial")
"""The decisions a bulk form offers: those of a manual case's own form, bar the ones
that need a choice per saga (a rung) or a second look at its holds (force)."""

MAX_BULK = 1000
"""The most sagas one bulk decision takes (a filter matching more takes its first)."""

MAX_BULK_FORM = 512 * 1024
"""Largest bulk form body accepted, in bytes (a thousand saga ids and versions)."""

FORM_ID = "bulk-form"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a decision would do (dry run) or did (apply) to one saga."""

    inst: SagaInstance | None
    saga_id: str
    version: int
    ok: bool
    code: str
    """``would_apply``/``applied``, or the refusal's code (the API's codes)."""
    message: str


# -- the queue page's part ---------------------------------------------------------------
def case_checkbox(inst: SagaInstance) -> str:
    """A case card's box: it belongs to the bulk form (a card holds its own form, and
    forms do not nest)."""
    return (
        f'<label class="pick"><input type="checkbox" name="saga" value="{e(inst.saga_id)}" '
        f'form="{FORM_ID}" aria-label="select {e(inst.business_key)}"> select</label>'
    )


def _decision_fields(action: str = "", reason: str = "") -> str:
    options = "".join(
        f'<option value="{a}"{" selected" if a == action else ""}>'
        f"{a}{' (irreversible)' if irreversible(a) else ''}</option>"
        for a in BULK_ACTIONS
    )
    return (
        '<label>decision <select name="action" required><option value="">choose\u2026</option>'
        f"{options}</select></label>"
        '<label>reason <textarea name="reason" rows="1" required maxlength="2000" '
        f'placeholder="why this decision, for every saga">{e(reason)}</textarea></label>'
    )


def selection_form(
    base: str,
    *,
    query: filters.ManualQuery,
    matched: int,
    cases: Sequence[SagaInstance],
    csrf: str,
) -> str:
    """The queue page's bulk form: a decision and a reason, *select all on this page*
    (the page's cases travel as hidden fields: no script needed), and two ways to go
    to the dry run: the boxes ticked, or every case the current filter matches."""
    if not cases:
        return ""
    hidden = {"csrf": csrf, "filter": urlencode(_filter_params(query))}
    inputs = "".join(
        f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in hidden.items()
    )
    inputs += "".join(
        f'<input type="hidden" name="page" value="{e(inst.saga_id)}">' for inst in cases
    )
    cap = ""
    if matched > MAX_BULK:
        cap = (
            f'<p class="note">{matched} cases match: a bulk decision takes the first '
            f"{MAX_BULK} in the queue's order; run it again for the rest.</p>"
        )
    count = min(matched, MAX_BULK)
    return (
        f'<form id="{FORM_ID}" class="bulk" method="post" action="{e(base)}/manual/bulk">'
        f"{inputs}<fieldset><legend>Decide several cases at once (dry run first)</legend>"
        f"{_decision_fields()}"
        '<label><input type="checkbox" name="all_page" value="yes"> select all on this '
        "page</label>"
        '<div class="buttons"><button type="submit" name="scope" value="selected">'
        "Dry run on the selected</button> "
        f'<button type="submit" name="scope" value="filter" data-matched="{matched}">'
        f"Dry run on all {count} matching this filter</button></div>{cap}"
        "</fieldset></form>"
    )


def _filter_params(query: filters.ManualQuery) -> dict[str, str]:
    """The filter and order of a queue view (not its page): what a bulk form carries."""
    params = query.params(offset=None)
    return {k: str(v) for k, v in params.items() if v not in (None, "")}


def _back(base: str, query: filters.ManualQuery) -> str:
    """The queue as the bulk form saw it (unfiltered when its filter has problems)."""
    return url(base, "/manual", {} if query.problems else _filter_params(query))


# -- reading the posts -------------------------------------------------------------------
async def _read(request: Request) -> dict[str, list[str]] | None:
    """The posted form, every value of each field (a bulk form repeats ``saga``), with
    limits of its own: a bulk post is far larger than the console's other forms."""
    return await read_form_values(request, max_bytes=MAX_BULK_FORM, max_fields=3 * MAX_BULK)


def _one(form: Mapping[str, list[str]], name: str) -> str:
    return (form.get(name) or [""])[0].strip()


@dataclass(frozen=True, slots=True)
class _Post:
    """A checked bulk post: who decides what, why, and the queue view it came from."""

    who: str
    action: str
    reason: str
    query: filters.ManualQuery
    form: Mapping[str, list[str]]


async def _checked(c: _Console, request: Request) -> _Post | Response:
    """The bulk post, or the page that refuses it (403, 400, 422): the same checks as
    a single decision's (permission, who, CSRF, decision, reason without personal data)."""
    if not c.can_act(request):
        why = "You may look at the manual queue but not decide on it."
        return await c.error(request, 403, "Not allowed", why)
    who = c.who(request)
    if not who:
        return await c.error(request, 403, "Who are you?", "Sign in before deciding.")
    form = await _read(request)
    if form is None:
        why = (
            "Send the form as application/x-www-form-urlencoded, at most "
            f"{MAX_BULK_FORM // 1024} KiB."
        )
        return await c.error(request, 400, "Unreadable form", why)
    if not c.csrf.check(request, _one(form, "csrf"), who):
        why = "This form did not come from this console, or it expired. Reload the page."
        return await c.error(request, 403, "Form refused", why)
    query = filters.read_manual_query(c.engine, dict(parse_qsl(_one(form, "filter")[:4000])))
    action, reason = _one(form, "action"), _one(form, "reason")
    if action not in BULK_ACTIONS:
        why = f"Choose the decision to apply: one of {', '.join(BULK_ACTIONS)}."
        return await _bad(c, request, query, 400, "Unknown decision", why)
    if not reason:
        why = "Every decision needs a reason; it is recorded in each saga's history."
        return await _bad(c, request, query, 400, "Reason missing", why)
    if (refused := await c.personal_data(request, reason)) is not None:
        return refused
    return _Post(who, action, reason[:2000], query, form)


async def _bad(
    c: _Console, request: Request, query: filters.ManualQuery, status: int, title: str, why: str
) -> Response:
    """A refused bulk post: what is wrong, and the way back to the queue as it was."""
    base = c.base(request)
    back = _back(base, query)
    body = (
        f'<section class="error"><h1>{status} \u00b7 {e(title)}</h1>'
        f'<p class="problem" role="alert">{e(why)} Nothing was applied.</p>'
        f'<p><a class="back" href="{e(back)}">Back to the manual queue</a></p></section>'
    )
    return await c.page(request, h.layout(title, body, base=base, nav="manual"), status)


# -- dry run -----------------------------------------------------------------------------
def _preview(c: _Console, who: str, inst: SagaInstance, action: str, reason: str) -> Outcome:
    """What ``action`` would make of ``inst``: the engine's dry run, nothing written."""

    def no(code: str, exc: Exception) -> Outcome:
        return Outcome(inst, inst.saga_id, inst.version, False, code, str(exc))

    if inst.state not in MANUAL_STATES:
        why = f"saga {inst.saga_id} is {inst.state.value}, no longer in the manual queue"
        return Outcome(inst, inst.saga_id, inst.version, False, "refused", why)
    try:
        after = c.engine.preview(inst, action, actor=who, reason=reason)
    except OpenHolds as exc:
        return no("open_holds", exc)
    except NoDriver as exc:
        return no("no_driver", exc)
    except VersionMissing as exc:
        return no("version_missing", exc)
    except (ManualActionRefused, DefinitionError) as exc:
        return no("refused", exc)
    said = f"would become {after.state.value} ({after.status})"
    return Outcome(inst, inst.saga_id, inst.version, True, "would_apply", said)


async def _selected(c: _Console, post: _Post) -> tuple[list[SagaInstance], list[str], str]:
    """``(the sagas chosen, ids not found, a note)``, or a problem in the note and no
    sagas: the boxes ticked (and the page's cases with *select all*), or the filter."""
    if _one(post.form, "scope") == "filter":
        if post.query.problems:
            return [], [], "The filter cannot be used: " + "; ".join(post.query.problems)
        found = await c.engine.store.find_sagas(
            filters.manual_store_query(c.engine, post.query, c.engine.clock()),
            limit=MAX_BULK,
            offset=0,
            order=post.query.order,
        )
        note = ""
        if found.total > MAX_BULK:
            note = (
                f"{found.total} cases match this filter: this dry run takes the first "
                f"{MAX_BULK} in the queue's order. Run it again for the rest."
            )
        return found.items, [], note
    ids = list(post.form.get("saga", []))
    if _one(post.form, "all_page") == "yes":
        ids += post.form.get("page", [])
    ids = list(dict.fromkeys(i for i in ids if i))
    if not ids:
        return [], [], "No saga is selected: tick the cases (or select all on this page)."
    if len(ids) > MAX_BULK:
        return [], [], f"{len(ids)} sagas are selected; a bulk decision takes at most {MAX_BULK}."
    sagas, missing = [], []
    for saga_id in ids:
        inst = await c.engine.store.get_saga(saga_id)
        if inst is None:
            missing.append(saga_id)
        else:
            sagas.append(inst)
    return sagas, missing, ""


async def dry_run(c: _Console, request: Request) -> Response:
    """The dry run of a bulk post: what the decision does, what it would make of each
    saga or why it would be refused, the counts, and the one confirmation."""
    post = await _checked(c, request)
    if isinstance(post, Response):
        return post
    sagas, missing, note = await _selected(c, post)
    if not sagas and not missing:
        return await _bad(c, request, post.query, 400, "Nothing to decide on", note)
    outcomes = []
    for i, inst in enumerate(sagas):
        if i and not i % 200:
            await asyncio.sleep(0)  # a dry run of a thousand never holds the loop
        outcomes.append(_preview(c, post.who, inst, post.action, post.reason))
    outcomes += [Outcome(None, s, 0, False, "not_found", f"no saga {s!r}") for s in missing]
    return await _dry_run_page(c, request, post, outcomes, note)


async def _dry_run_page(
    c: _Console,
    request: Request,
    post: _Post,
    outcomes: Sequence[Outcome],
    note: str,
    message: str = "",
    status: int = 200,
) -> Response:
    base = c.base(request)
    action = post.action
    applying = [o for o in outcomes if o.ok and o.inst is not None]
    parts = [f"<h1>Dry run: {e(action)} on {len(outcomes)} sagas</h1>"]
    if message:
        parts.append(f'<p class="problem" role="alert">{e(message)}</p>')
    parts.append(_described(action, post.reason))
    if note:
        parts.append(f'<p class="note">{e(note)}</p>')
    parts.append(_counts(len(applying), len(outcomes) - len(applying), "would apply"))
    parts.append(_table(c, base, outcomes))
    back = _back(base, post.query)
    if applying:
        token, nonce = c.csrf.issue(request, post.who)
        hidden = [("csrf", token), ("action", action), ("reason", post.reason)]
        hidden.append(("filter", urlencode(_filter_params(post.query))))
        # The versions shown: the decision applies to a saga at this version or not at all.
        hidden += [("saga", f"{o.saga_id}:{o.version}") for o in applying]
        inputs = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in hidden)
        confirm = ""
        if irreversible(action):
            confirm = (
                '<label class="confirm"><input type="checkbox" name="confirm" value="yes" '
                f"required> I confirm: {e(action)} cannot be taken back</label>"
            )
        parts.append(
            f'<form class="bulk-confirm" method="post" action="{e(base)}/manual/bulk/apply">'
            f'{inputs}{confirm}<div class="buttons">'
            f'<button type="submit" class="act danger" data-confirm="{e(action)}">'
            f"Apply {e(action)} to {len(applying)} sagas</button> "
            f'<a class="back" href="{e(back)}">Back, decide nothing</a></div></form>'
        )
    else:
        nonce = None
        parts.append(
            f'<p class="empty">The decision would apply to none of them.</p>'
            f'<p><a class="back" href="{e(back)}">Back to the manual queue</a></p>'
        )
    body = h.layout(f"Dry run: {action}", "".join(parts), base=base, nav="manual")
    return await c.page(request, body, status, nonce=nonce)


def _described(action: str, reason: str) -> str:
    undo = (
        "Irreversible: it asks for the confirmation box below."
        if irreversible(action)
        else "Not irreversible: no confirmation box is asked for."
    )
    return (
        f'<section class="what-it-does"><h2>What {e(action)} does</h2>'
        f"<p>{e(DESCRIPTIONS.get(action, ''))}</p>"
        f'<p class="irreversible" data-irreversible="{str(irreversible(action)).lower()}">'
        f"{e(undo)}</p><p>Reason, recorded in each saga's history: <q>{e(reason)}</q></p>"
        "</section>"
    )


def _counts(ok: int, refused: int, verb: str) -> str:
    no = "would be refused" if verb == "would apply" else "refused"
    return (
        f'<p class="bulk-counts"><b class="ok-count">{ok}</b> {verb}, '
        f'<b class="refused-count">{refused}</b> {no}.</p>'
    )


def _table(c: _Console, base: str, outcomes: Sequence[Outcome]) -> str:
    now = c.engine.clock()
    rows = []
    for o in outcomes:
        inst = o.inst
        if inst is None:
            cells = [e(o.saga_id), "", "", "", ""]
        else:
            definition = c.definition_of(inst)
            flow = c.flow_of(inst)
            step = h.current_step(definition, inst)
            if definition is None and flow is not None:
                step = choreo.view_step(flow, inst)[0]
            cells = [
                h.saga_link(base, inst, inst.saga_id),
                e(f"{inst.definition}@{inst.definition_version}"),
                e(step),
                e(filters.human_duration(now - inst.updated_at)),
                f'<span class="version">{o.version}</span>',
            ]
        verdict = e(o.message) if o.ok else f"<b>{e(o.code)}</b>: {e(o.message)}"
        rows.append([*cells, f'<span class="outcome {"ok" if o.ok else "no"}">{verdict}</span>'])
    head = "".join(
        f"<th>{t}</th>" for t in ("saga", "definition", "step", "waiting", "version", "outcome")
    )
    body = "".join(
        # Each row names its saga and verdict, for people scanning and for tests.
        f'<tr data-saga="{e(o.saga_id)}" data-ok="{str(o.ok).lower()}">'
        + "".join(f"<td>{cell}</td>" for cell in row)
        + "</tr>"
        for o, row in zip(outcomes, rows, strict=True)
    )
    return f'<table class="bulk"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# -- apply -------------------------------------------------------------------------------
def _versions(form: Mapping[str, list[str]]) -> list[tuple[str, int]] | None:
    """The ``(saga id, version)`` pairs a confirmation carries, or None if one is bad."""
    out: dict[str, int] = {}
    for raw in form.get("saga", []):
        saga_id, _, version = raw.rpartition(":")
        if not saga_id or not (version.isascii() and version.isdigit()) or len(version) > 18:
            return None
        out[saga_id] = int(version)
    return list(out.items())


async def _decide(c: _Console, post: _Post, saga_id: str, version: int) -> Outcome:
    """One saga's decision, as a single decision goes (:meth:`Engine.resolve`, the
    console user as actor, on ``version`` only)."""

    def no(code: str, message: str, inst: SagaInstance | None = None) -> Outcome:
        return Outcome(inst, saga_id, version, False, code, message)

    try:
        after = await c.engine.resolve(
            saga_id,
            post.action,
            reason=post.reason,
            actor=post.who,
            expected_version=version,
        )
    except SagaNotFound:
        return no("not_found", f"no saga {saga_id!r}")
    except SagaMoved:
        now = await c.engine.store.get_saga(saga_id)
        return no("saga_moved", moved(version, now).replace("; your reason is kept below", ""), now)
    except OpenHolds as exc:
        return no("open_holds", str(exc))
    except NoDriver as exc:
        return no("no_driver", str(exc))
    except VersionMissing as exc:
        return no("version_missing", str(exc))
    except ConcurrencyError:
        why = f"saga {saga_id} changed while this decision was applied; look at it again"
        return no("conflict", why)
    except (ManualActionRefused, DefinitionError) as exc:
        return no("refused", str(exc))
    said = f"now {after.state.value} ({after.status}), version {after.version}"
    return Outcome(after, saga_id, version, True, "applied", said)


async def apply(c: _Console, request: Request) -> Response:
    """Apply a confirmed dry run: the decision on each saga at the version shown, then
    the result page (applied, refused and why). A confirmation missing for an
    irreversible decision gets the dry run again (422), nothing applied."""
    post = await _checked(c, request)
    if isinstance(post, Response):
        return post
    pairs = _versions(post.form)
    if not pairs:
        why = "This confirmation names no saga and version; go back and run the dry run again."
        return await _bad(c, request, post.query, 400, "Nothing to decide on", why)
    if len(pairs) > MAX_BULK:
        why = f"A bulk decision takes at most {MAX_BULK} sagas."
        return await _bad(c, request, post.query, 400, "Too many sagas", why)
    if irreversible(post.action) and _one(post.form, "confirm") != "yes":
        outcomes = []
        for saga_id, _ in pairs:
            inst = await c.engine.store.get_saga(saga_id)
            outcomes.append(
                Outcome(None, saga_id, 0, False, "not_found", f"no saga {saga_id!r}")
                if inst is None
                else _preview(c, post.who, inst, post.action, post.reason)
            )
        why = f"{post.action} cannot be taken back: tick the confirmation box to apply it."
        return await _dry_run_page(c, request, post, outcomes, "", why, 422)
    results = []
    for saga_id, version in pairs:
        results.append(await _decide(c, post, saga_id, version))
        await asyncio.sleep(0)  # an in-memory store may not suspend: let others run
    done = sum(1 for r in results if r.ok)
    log.info(
        "bulk %s by %s from the console: %d of %d applied",
        post.action,
        post.who,
        done,
        len(results),
        extra={"actor": post.who, "action": post.action, "reason": post.reason},
    )
    base = c.base(request)
    back = _back(base, post.query)
    parts = [
        f"<h1>Bulk {e(post.action)}: {done} applied, {len(results) - done} refused</h1>",
        _counts(done, len(results) - done, "applied"),
        _table(c, base, results),
        f'<p><a class="back" href="{e(back)}">Back to the manual queue</a></p>',
    ]
    body = h.layout(f"Bulk {post.action}", "".join(parts), base=base, nav="manual")
    return await c.page(request, body)
