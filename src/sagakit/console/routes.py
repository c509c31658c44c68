"""The console's Starlette routes: pages, decisions, live events, pictures, static files.

See :mod:`sagakit.console` for how to mount them and how forms are protected.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from sagakit.api.validation import SagaFilter
from sagakit.console import bulk, decisions, filters, pages
from sagakit.console import dead_letters as dl
from sagakit.console import html as h
from sagakit.console.decisions import ACTIONS
from sagakit.console.http import (
    HEADERS,
    Csrf,
    event_stream,
    html_response,
    read_form,
    static_file,
)
from sagakit.console.manual import manual_page
from sagakit.console.svg import flow_svg, timeline_svg
from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import MANUAL_STATES, SagaInstance, SagaState
from sagakit.errors import DeadLetterNotFound, DeadLetterRefused
from sagakit.graph import to_dot, to_mermaid, to_svg
from sagakit.redaction import personal_data_in
from sagakit.runtime.dead_letters import BrokerDeadLetter
from sagakit.runtime.engine import Engine
from sagakit.runtime.set_aside import waiting_for
from sagakit.runtime.tracker import TrackedFlow


class _Console:
    """The handlers, sharing the engine, the permission callables and the settings."""

    def __init__(
        self,
        engine: Engine,
        actor: Callable[[Request], str | None],
        can_act: Callable[[Request], bool],
        secret: bytes,
        poll_interval: float,
        stream_seconds: float,
        search_limit: int,
        sign_out: str | None = None,
        facts: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.engine = engine
        self.actor = actor
        self.can_act = can_act
        self.csrf = Csrf(secret)
        self.poll = poll_interval
        self.stream_seconds = stream_seconds
        self.search_limit = search_limit
        self.sign_out = sign_out
        self.facts = facts

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def base(request: Request) -> str:
        """Where the console is mounted (links are built from it)."""
        return str(request.scope.get("root_path", "")).rstrip("/")

    def definition_of(self, inst: SagaInstance) -> SagaDefinition | None:
        m = self.engine.orchestrator.machines.get((inst.definition, inst.definition_version))
        return None if m is None else m.definition

    def flow_of(self, inst: SagaInstance) -> TrackedFlow | None:
        """The choreography whose view ``inst`` is (None: an orchestrated saga)."""
        tracker = self.engine.trackers.get(inst.definition)
        if tracker is None or self.definition_of(inst) is not None:
            return None
        return tracker.flow

    def who(self, request: Request) -> str:
        return (self.actor(request) or "").strip()

    async def open_cases(self, counts: Mapping[SagaState, int] | None = None) -> int | None:
        """How many cases the manual queue holds (None if the store cannot say)."""
        if counts is None:
            try:
                counts = await self.engine.store.count_sagas()
            except Exception:  # an error page must not fail for want of a nav badge
                return None
        return sum(counts.get(s, 0) for s in MANUAL_STATES)

    async def page(
        self,
        request: Request,
        body: str,
        status: int = 200,
        nonce: str | None = None,
        counts: Mapping[SagaState, int] | None = None,
    ) -> Response:
        """The page ``body`` as a response: the nav says how many manual cases are open
        (from ``counts`` when the handler read them already), plus a *Sign out* button."""
        base = self.base(request)
        open_cases = await self.open_cases(counts)
        if open_cases is not None:
            body = h.with_open_cases(body, open_cases)
        if self.sign_out is not None:
            body = h.with_sign_out(body, base + self.sign_out, self.who(request))
        return html_response(request, body, base=base, status=status, nonce=nonce)

    async def error(self, request: Request, status: int, title: str, message: str) -> Response:
        body = h.error_page(self.base(request), status, title, message)
        return await self.page(request, body, status)

    @staticmethod
    def flash(request: Request) -> str:
        done = request.query_params.get("done", "")
        return f"Decision recorded: {done}." if done in ACTIONS else ""

    @staticmethod
    def tag_of(data: object) -> str:
        """A short fingerprint of what a list page shows; it changes when a saga moves."""
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]

    # -- pages ------------------------------------------------------------------------
    async def sagas(self, request: Request) -> Response:
        query, flt = filters.read_list_query(self.engine, request.query_params)
        counts = await self.engine.store.count_sagas()
        found: list[SagaInstance] = []
        more, total, tag = False, None, ""
        if not query.problems:
            found, more, total = await self.listing(query, flt)
            tag = self.list_tag(counts, found, total)
        body = pages.list_page(
            self.base(request),
            query=query,
            sagas=found,
            counts=counts,
            definitions=filters.definition_names(self.engine),
            definition_of=self.definition_of,
            tag=tag,
            more=more,
            flow_of=self.flow_of,
            steps=filters.step_names(self.engine),
            total=total,
            now=self.engine.clock(),
        )
        return await self.page(request, body, 400 if query.problems else 200, counts=counts)

    @staticmethod
    def list_tag(
        counts: Mapping[SagaState, int], found: Sequence[SagaInstance], total: int | None
    ) -> str:
        """The fingerprint of a saga list page: the counts, the total, its sagas."""
        return _Console.tag_of(
            [
                sorted((k.value, v) for k, v in counts.items()),
                total,
                [(s.saga_id, s.version) for s in found],
            ]
        )

    async def listing(
        self, query: pages.ListQuery, flt: SagaFilter
    ) -> tuple[list[SagaInstance], bool, int | None]:
        """``(sagas of the page, whether more follow, how many match or None)``."""
        store = self.engine.store
        states = list(flt.states) or None
        if query.search:
            found, more = await self.search(query, flt)
            return found, more, None
        if query.simple:
            # The plain listing, newest first: no COUNT over the table per page.
            page = await store.list_sagas(
                states=states,
                definition=query.definition,
                limit=query.limit + 1,
                offset=query.offset,
            )
            total = None
            if query.definition is None:
                counts = await store.count_sagas()
                total = sum(n for s, n in counts.items() if states is None or s in states)
            return page[: query.limit], len(page) > query.limit, total
        found_page = await store.find_sagas(
            filters.list_store_query(self.engine, flt, self.engine.clock()),
            limit=query.limit,
            offset=query.offset,
            order=query.order,
        )
        more = query.offset + len(found_page.items) < found_page.total
        return found_page.items, more, found_page.total

    async def search(
        self, query: pages.ListQuery, flt: SagaFilter
    ) -> tuple[list[SagaInstance], bool]:
        """Sagas whose business key or id contains the search text (case-insensitive),
        among the first ``search_limit`` (in the list's order) that match the filters."""
        needle = query.search.lower()
        hits: list[SagaInstance] = []
        sq = filters.list_store_query(self.engine, flt, self.engine.clock())
        exact = await self.engine.store.get_saga(query.search)
        if exact is not None and sq.matches(exact):
            hits.append(exact)
        scanned, size = 0, 500
        while scanned < self.search_limit:
            if query.simple:
                batch = await self.engine.store.list_sagas(
                    states=sq.states, definition=sq.definition, limit=size, offset=scanned
                )
            else:
                found = await self.engine.store.find_sagas(
                    sq, limit=size, offset=scanned, order=query.order
                )
                batch = found.items
            hits += [
                s
                for s in batch
                if (needle in s.business_key.lower() or needle in s.saga_id)
                and (exact is None or s.saga_id != exact.saga_id)
            ]
            scanned += len(batch)
            if len(batch) < size:
                break
        end = query.offset + query.limit
        return hits[query.offset : end], len(hits) > end

    async def detail(self, request: Request) -> Response:
        inst = await self.engine.store.get_saga(request.path_params["saga_id"])
        if inst is None:
            return await self.error(request, 404, "No such saga", "There is no saga with this id.")
        token, nonce = self.csrf.issue(request, self.who(request))
        body = pages.detail_page(
            self.base(request),
            inst=inst,
            definition=self.definition_of(inst),
            history=await self.engine.store.history(inst.saga_id),
            csrf=token,
            can_act=self.can_act(request),
            now=self.engine.clock(),
            flash=self.flash(request),
            flow=self.flow_of(inst),
            waiting_for=await waiting_for(self.engine.store, inst.saga_id),
        )
        return await self.page(request, body, nonce=nonce)

    async def manual(self, request: Request) -> Response:
        query = filters.read_manual_query(self.engine, request.query_params)
        counts = await self.engine.store.count_sagas()
        open_cases = await self.open_cases(counts) or 0
        now = self.engine.clock()
        cases: list[SagaInstance] = []
        matched, tag = 0, ""
        if not query.problems:
            matched, cases = await self.manual_cases(query, now)
            tag = self.manual_tag(open_cases, matched, cases)
        token, nonce = self.csrf.issue(request, self.who(request))
        body = manual_page(
            self.base(request),
            query=query,
            cases=cases,
            matched=matched,
            open_cases=open_cases,
            definitions=filters.definition_names(self.engine),
            steps=filters.step_names(self.engine),
            definition_of=self.definition_of,
            csrf=token,
            can_act=self.can_act(request),
            tag=tag,
            now=now,
            flash=self.flash(request),
            flow_of=self.flow_of,
            facts=self.facts,
        )
        status = 400 if query.problems else 200
        return await self.page(request, body, status, nonce=nonce, counts=counts)

    async def manual_cases(
        self, query: filters.ManualQuery, now: float
    ) -> tuple[int, list[SagaInstance]]:
        """``(how many cases the query selects, its page)``: filtered, ordered and
        paged by the store."""
        found = await self.engine.store.find_sagas(
            filters.manual_store_query(self.engine, query, now),
            limit=query.limit,
            offset=query.offset,
            order=query.order,
        )
        return found.total, found.items

    @staticmethod
    def manual_tag(open_cases: int, matched: int, cases: Sequence[SagaInstance]) -> str:
        """The fingerprint of a manual queue page: the counts and its cases."""
        return _Console.tag_of([open_cases, matched, [(s.saga_id, s.version) for s in cases]])

    async def picture(self, request: Request) -> Response:
        inst = await self.engine.store.get_saga(request.path_params["saga_id"])
        d = None if inst is None else self.definition_of(inst)
        if inst is None or d is None:
            return await self.error(request, 404, "No picture", "Unknown saga or definition.")
        name = request.path_params["name"]
        if name in ("diagram.mmd", "diagram.dot"):
            text = (to_mermaid if name.endswith("mmd") else to_dot)(d, inst)
            return Response(text, media_type="text/plain; charset=utf-8", headers=HEADERS)
        if name == "diagram.svg":
            return Response(to_svg(d, inst), media_type="image/svg+xml", headers=HEADERS)
        if name not in ("timeline.svg", "flow.svg"):
            return await self.error(request, 404, "No picture", f"There is no picture {name!r}.")
        history = await self.engine.store.history(inst.saga_id)
        draw = timeline_svg if name == "timeline.svg" else flow_svg
        return Response(draw(d, inst, history), media_type="image/svg+xml", headers=HEADERS)

    async def static(self, request: Request) -> Response:
        return static_file(request.path_params["name"])

    # -- decisions --------------------------------------------------------------------
    async def decision_form(
        self, request: Request, what: str
    ) -> tuple[str, dict[str, str]] | Response:
        """``(who, form)`` of a decision post, or the error page that refuses it."""
        if not self.can_act(request):
            why = f"You may look at {what} but not act on them."
            return await self.error(request, 403, "Not allowed", why)
        who = self.who(request)
        if not who:
            return await self.error(request, 403, "Who are you?", "Sign in before deciding.")
        form = await read_form(request)
        if form is None:
            why = "Send the form as application/x-www-form-urlencoded, at most 64 KiB."
            return await self.error(request, 400, "Unreadable form", why)
        if not self.csrf.check(request, form.get("csrf", ""), who):
            why = "This form did not come from this console, or it expired. Reload the page."
            return await self.error(request, 403, "Form refused", why)
        return who, form

    def back(self, request: Request, form: dict[str, str], fallback: str, done: str) -> Response:
        """Redirect to the form's ``next`` page (only inside the console), else ``fallback``.

        The page's query string is kept (the manual queue's filters, order and page),
        with ``done`` saying which decision was recorded.
        """
        base = self.base(request)
        target, _, query = form.get("next", "")[:4000].partition("?")
        # Only back into the console: never an open redirect.
        if not target.startswith(base + "/") or "//" in target or "\\" in target:
            target, query = base + fallback, ""
        params: dict[str, str | int | None] = {k: v for k, v in parse_qsl(query) if k != "done"}
        params["done"] = done
        return RedirectResponse(h.url("", target, params), status_code=303)

    async def personal_data(self, request: Request, reason: str) -> Response | None:
        """A 422 page when ``reason`` holds personal data (refused as the API refuses it:
        see :func:`sagakit.api.validation.reason_problem`), else None."""
        found = personal_data_in(reason)
        if found is None:
            return None
        why = (
            f"The reason holds {found}. A reason is kept for good in the history; write it "
            "without personal data and name the customer by their token (cust-000123)."
        )
        return await self.error(request, 422, "Personal data in the reason", why)

    async def act(self, request: Request) -> Response:
        return await decisions.act(self, request)

    async def bulk_dry_run(self, request: Request) -> Response:
        return await bulk.dry_run(self, request)

    async def bulk_apply(self, request: Request) -> Response:
        return await bulk.apply(self, request)

    async def dead_letters(self, request: Request) -> Response:
        p = request.query_params
        status = p.get("status", "open")
        status = status if status in dl.STATUSES else "open"
        offset = int(p["offset"]) if p.get("offset", "").isdigit() else 0
        desk = self.engine.dead_letters
        settled = {"open": False, "settled": True, "all": None}[status]
        found = await desk.find(settled=settled, limit=dl.PAGE_SIZE, offset=offset)
        broker: list[BrokerDeadLetter] = []
        broker_error = None
        if offset == 0 and status != "settled":
            try:
                broker = await desk.broker_dead_letters()
            except Exception as exc:  # a broker that is down must not hide the stores' list
                broker_error = f"Could not read the broker's dead letters: {exc!r}"
        done = p.get("done", "")
        token, nonce = self.csrf.issue(request, self.who(request))
        body = dl.dead_letters_page(
            self.base(request),
            page=found,
            status=status,
            offset=offset,
            broker=broker,
            broker_error=broker_error,
            csrf=token,
            can_act=self.can_act(request),
            flash=f"Dead letter {dl.SETTLEMENTS[done]}." if done in dl.SETTLEMENTS else "",
        )
        return await self.page(request, body, nonce=nonce)

    async def settle_dead_letter(self, request: Request) -> Response:
        checked = await self.decision_form(request, "dead letters")
        if isinstance(checked, Response):
            return checked
        who, form = checked
        settlement, reason = form.get("settlement", ""), form.get("reason", "").strip()
        if settlement not in dl.SETTLEMENTS:
            return await self.error(request, 400, "Unknown action", "Choose replay or discard.")
        if not reason:
            why = "Every replay or discard needs a reason; it is kept with the dead letter."
            return await self.error(request, 400, "Reason missing", why)
        if (refused := await self.personal_data(request, reason)) is not None:
            return refused
        store, raw_id = request.path_params["store"], request.path_params["id"]
        if not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 18:
            return await self.error(
                request, 404, "No such dead letter", "Dead letter ids are numbers."
            )
        if settlement == "discard" and form.get("confirm") != "yes":
            # A discard cannot be taken back: say what it does, then confirm.
            return await decisions.confirm_discard(self, request, form, store, int(raw_id))
        desk = self.engine.dead_letters
        run = desk.replay if settlement == "replay" else desk.discard
        try:
            await run(store, int(raw_id), actor=who, reason=reason[:1000])
        except DeadLetterNotFound as exc:
            return await self.error(request, 404, "No such dead letter", str(exc))
        except DeadLetterRefused as exc:
            return await self.error(request, 409, f"{settlement.capitalize()} refused", str(exc))
        return self.back(request, form, "/dead-letters", settlement)

    # -- live events ------------------------------------------------------------------
    async def saga_events(self, request: Request) -> Response:
        saga_id = request.path_params["saga_id"]

        async def tag() -> tuple[str, bool]:
            inst = await self.engine.store.get_saga(saga_id)
            if inst is None:
                return "gone", True
            # A saga in the manual queue still changes when someone decides.
            final = inst.terminal and inst.state is not SagaState.FAILED_NEEDS_MANUAL
            return str(inst.version), final

        return event_stream(tag, poll=self.poll, lifetime=self.stream_seconds)

    async def list_events(self, request: Request) -> Response:
        params = request.query_params
        manual = bool(params.get("manual"))
        list_query, flt = filters.read_list_query(self.engine, params)
        manual_query = filters.read_manual_query(self.engine, params)

        async def tag() -> tuple[str, bool]:
            # The same reads as the page's, so the tag changes exactly when it would.
            counts = await self.engine.store.count_sagas()
            if manual:
                if manual_query.problems:
                    return "", False
                matched, cases = await self.manual_cases(manual_query, self.engine.clock())
                open_cases = await self.open_cases(counts) or 0
                return self.manual_tag(open_cases, matched, cases), False
            if list_query.problems:
                return "", False
            found, _, total = await self.listing(list_query, flt)
            return self.list_tag(counts, found, total), False

        return event_stream(tag, poll=self.poll, lifetime=self.stream_seconds)


def console_routes(
    engine: Engine,
    *,
    actor: Callable[[Request], str | None],
    can_act: Callable[[Request], bool],
    secret: bytes | None = None,
    poll_interval: float = 0.5,
    stream_seconds: float = 300.0,
    search_limit: int = 5000,
    sign_out: str | None = None,
    facts: Mapping[str, Sequence[str]] | None = None,
) -> list[BaseRoute]:
    """The console's routes, to mount under a prefix of your app (``Mount("/console",
    routes=console_routes(...))``) behind your authentication.

    ``actor(request)`` names the person deciding (recorded in history); ``can_act``
    says whether they may decide at all (if not, forms are hidden and posts get 403).
    ``secret`` signs the CSRF tokens (default: random per process, so tokens expire on
    restart; give the same one to every process behind a load balancer).
    ``poll_interval`` is how often live event streams look at the store;
    ``search_limit`` bounds how many of the newest sagas a business-key search scans.
    ``sign_out``, the path (under the console's prefix) of your ``POST`` route that ends
    the person's session, puts a *Sign out* button in every page's header.
    ``facts`` maps a definition's name to the fields of its sagas' data that a manual
    case's card shows (dotted paths, in order); a definition left out shows its first
    fields. Fields the definition declares personal are never shown either way (see
    :func:`sagakit.console.manual.data_facts`).
    """
    c = _Console(
        engine,
        actor,
        can_act,
        secret or secrets.token_bytes(32),
        poll_interval,
        stream_seconds,
        search_limit,
        sign_out,
        facts,
    )
    return [
        Route("/", c.sagas, name="console_sagas"),
        Route("/manual", c.manual, name="console_manual"),
        Route("/manual/bulk", c.bulk_dry_run, methods=["POST"], name="console_bulk"),
        Route("/manual/bulk/apply", c.bulk_apply, methods=["POST"], name="console_bulk_apply"),
        Route("/events", c.list_events, name="console_events"),
        Route("/sagas/{saga_id}", c.detail, name="console_saga"),
        Route("/sagas/{saga_id}/act", c.act, methods=["POST"], name="console_act"),
        Route("/sagas/{saga_id}/events", c.saga_events, name="console_saga_events"),
        Route("/sagas/{saga_id}/pictures/{name}", c.picture, name="console_picture"),
        Route("/dead-letters", c.dead_letters, name="console_dead_letters"),
        Route(
            "/dead-letters/{store}/{id}/settle",
            c.settle_dead_letter,
            methods=["POST"],
            name="console_settle_dead_letter",
        ),
        Route("/static/{name}", c.static, name="console_static"),
    ]
