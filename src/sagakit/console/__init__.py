"""The operator web console: server-rendered pages over an :class:`~sagakit.Engine`.

Mount it inside your Starlette app (the HTTP API mounts it behind its authentication)::

    from starlette.routing import Mount
    from sagakit.console import console_routes

    Mount("/console", routes=console_routes(engine, actor=who, can_act=may_act))

``actor(request)`` names the person (recorded in history with each decision);
``can_act(request)`` says whether they may act: when it is false every form is
refused with a 403 page, and the pages show no forms.

Pages: ``/`` the saga list (counts per state, filters, order, age and time in state),
``/sagas/{id}`` a saga's detail (timeline, diagram, message flow, steps, history),
``/manual`` the manual queue (longest waiting first, paged, filtered, each case with
its wait, facts, open holds and decisions; :mod:`sagakit.console.manual`),
``/sagas/{id}/events`` and ``/events`` server-sent events for live refresh,
``/static/console.{css,js}``. Pages work without JavaScript; the small script only
refreshes them live. Every page's nav shows how many manual cases are open.

Decisions (:mod:`sagakit.console.decisions`): every form carries the saga version it
was rendered at and says what each decision does; a form whose saga moved since is
refused with 409 on a page that keeps the typed reason; mark_done, mark_compensated,
accept_partial and a dead letter's discard are confirmed on a page of their own first
(accept_partial with open holds only with its *force* box).

CSRF: every form carries a token, an HMAC of a random per-browser nonce (kept in an
``HttpOnly; SameSite=Strict`` cookie scoped to the console's path) and the actor's
name; a post is refused with 403 unless token, cookie and actor match and, when the
browser names the form's origin, it is the console's own host. Details in
:mod:`sagakit.console.http`. Every page is sent with a strict Content-Security-Policy.

Importing this package does not import Starlette: :mod:`sagakit.console.svg`
(timeline and message-flow pictures) works without the ``api`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sagakit.console.routes import console_routes

__all__ = ["console_routes"]


def __getattr__(name: str) -> Any:
    # Lazy, so that the SVG helpers can be imported without Starlette installed.
    if name == "console_routes":
        from sagakit.console.routes import console_routes

        return console_routes
    raise AttributeError(f"module 'sagakit.console' has no attribute {name!r}")
