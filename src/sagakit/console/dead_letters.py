"""The console's dead-letter page: what is parked, why, and the replay/discard form.

The page lists the dead letters of every store of the engine (open ones by default),
each with its raw body behind a disclosure and, for people who may act, one form with
a required reason and two buttons. The broker's own dead letters (NATS ``_dlq``) are
listed below them, read-only. Settling goes through
:class:`~sagakit.runtime.dead_letters.DeadLetterDesk`, which keeps who, when and why.
"""

from __future__ import annotations

from collections.abc import Sequence

from sagakit.console import html as h
from sagakit.runtime.dead_letters import BrokerDeadLetter, DeadLetterPage, StoredDeadLetter

e = h.e
STATUSES = ("open", "settled", "all")
SETTLEMENTS = {"replay": "replayed", "discard": "discarded"}
"""The form's buttons, and the word for what they did."""
PAGE_SIZE = 50


def _form(base: str, found: StoredDeadLetter, csrf: str, next_url: str) -> str:
    d = found.letter
    action = f"{base}/dead-letters/{h.seg(found.store)}/{d.id}/settle"
    rid = f"reason-{e(found.store)}-{d.id}"
    return (
        f'<form class="decide" method="post" action="{e(action)}">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<input type="hidden" name="next" value="{e(next_url)}">'
        f'<label for="{rid}">Reason (kept with the dead letter)</label>'
        f'<textarea id="{rid}" name="reason" rows="2" required maxlength="1000" '
        'placeholder="why"></textarea><div class="buttons">'
        '<button type="submit" name="settlement" value="replay" class="act" '
        'data-action="replay">Replay</button>'
        '<button type="submit" name="settlement" value="discard" class="act danger" '
        'data-action="discard">Discard</button></div></form>'
    )


def _card(base: str, found: StoredDeadLetter, *, csrf: str, can_act: bool, next_url: str) -> str:
    d = found.letter
    if d.open:
        state = '<span class="badge state-FAILED_NEEDS_MANUAL">open</span>'
        tail = _form(base, found, csrf, next_url) if can_act else ""
    else:
        state = f'<span class="badge state-SUCCEEDED">{e(d.settlement or "")}</span>'
        tail = (
            f'<p class="muted">{e(d.settlement or "")} by <b>{e(d.settled_by or "")}</b> at '
            f"{e(h.fmt_time(d.settled_at))}: {e(d.settle_reason or '')}</p>"
        )
    return (
        f'<article class="case dead-letter" data-store="{e(found.store)}" data-id="{d.id}" '
        f'data-message="{e(d.message_id or "")}"><header>'
        f"<b>{e(found.store)}/{d.id}</b> {state} "
        f"<span>to {e(d.endpoint or '(no subscriber)')}</span> "
        f'<span class="muted">parked {e(h.fmt_time(d.at))}</span></header>'
        f"<p>message <code>{e(d.message_id or '(no id)')}</code></p>"
        f'<p class="error-text">{e(d.reason)}</p>'
        f"<details><summary>body</summary><pre>{e(d.body)}</pre></details>" + tail + "</article>"
    )


def _broker(letters: Sequence[BrokerDeadLetter], error: str | None) -> str:
    if error:
        return f'<h2>Parked by the broker</h2><p class="error-text">{e(error)}</p>'
    if not letters:
        return ""
    rows = [
        [e(b.transport), e(b.endpoint), f"<code>{e(b.message_id or '')}</code>", e(b.reason)]
        for b in letters
    ]
    return (
        "<h2>Parked by the broker</h2>"
        '<p class="muted">Messages the broker gave up on; listed here, settled with its tools.</p>'
        + h.table(["transport", "endpoint", "message", "reason"], rows, "broker-dead-letters")
    )


def dead_letters_page(
    base: str,
    *,
    page: DeadLetterPage,
    status: str,
    offset: int,
    broker: Sequence[BrokerDeadLetter],
    broker_error: str | None,
    csrf: str,
    can_act: bool,
    flash: str = "",
) -> str:
    """The dead-letter page: one card per dead letter, filters, paging, the broker's."""
    here = h.url(base, "/dead-letters", {"status": status, "offset": offset or None})
    tabs = " ".join(
        f'<a href="{e(h.url(base, "/dead-letters", {"status": s}))}"'
        f'{" class=current" if s == status else ""} data-status="{s}">{s}</a>'
        for s in STATUSES
    )
    cards = [_card(base, i, csrf=csrf, can_act=can_act, next_url=here) for i in page.items]
    shown = f"{offset + 1}-{offset + len(cards)} of {page.total}" if cards else f"0 of {page.total}"
    more = ""
    if offset + len(cards) < page.total:
        nxt = h.url(base, "/dead-letters", {"status": status, "offset": offset + PAGE_SIZE})
        more = f' <a href="{e(nxt)}">next page</a>'
    body = (
        f'<h1>Dead letters</h1><p class="counts">{tabs} \u00b7 {e(shown)}{more}</p>'
        + ("".join(cards) or f'<p class="empty">No {e(status)} dead letters.</p>')
        + _broker(broker, broker_error)
    )
    if not can_act and any(i.letter.open for i in page.items):
        body += '<p class="note">You may look but not act on these messages.</p>'
    return h.layout("Dead letters", body, base=base, nav="dead-letters", flash=flash)
