"""``sagakit dead-letters list|show|replay|discard``: parked messages, via the running API.

Like ``sagakit sagas``, these talk to the API (``--url``, ``--token``), so a replay or
discard goes through the same role check, validation and audit, and the settlement
records the token's name. A dead letter is named by its store and id, as listed.

    sagakit dead-letters list [--store S] [--endpoint E] [--status open|settled|all]
    sagakit dead-letters show STORE ID
    sagakit dead-letters replay STORE ID --reason "payment 2.1 fixed the parser"
    sagakit dead-letters discard STORE ID --reason "test message"
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from sagakit.api.cli import _client_options, _runner, call, checked_reason


def _when(at: float | None) -> str:
    return "-" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _cut(text: str, size: int = 60) -> str:
    return text if len(text) <= size else text[: size - 1] + "…"


def _list(args: argparse.Namespace) -> Any:
    query = [("status", args.status), ("limit", str(args.limit)), ("offset", str(args.offset))]
    query += [(k, getattr(args, k)) for k in ("store", "endpoint") if getattr(args, k)]
    page = call(args, "GET", "/dead-letters?" + urllib.parse.urlencode(query))
    rows = [
        [
            i["store"],
            str(i["id"]),
            i["endpoint"] or "-",
            i["message_id"] or "-",
            i["type"] or "-",
            _when(i["at"]),
            i["status"],
            _cut(i["reason"]),
        ]
        for i in page["items"]
    ]
    header = ["store", "id", "endpoint", "message_id", "type", "parked", "status", "reason"]
    text = f"{_columns(header, rows)}\n{len(rows)} of {page['total']} {page['status']}"
    if page.get("broker"):
        text += "\n\nparked by the broker (list only):\n" + _columns(
            ["transport", "endpoint", "message_id", "reason"],
            [
                [b["transport"], b["endpoint"], b["message_id"] or "-", _cut(b["reason"])]
                for b in page["broker"]
            ],
        )
    if page.get("broker_error"):
        text += f"\n{page['broker_error']}"
    return page, text


def _path(args: argparse.Namespace) -> str:
    return f"/dead-letters/{urllib.parse.quote(args.store, safe='')}/{args.id}"


def _describe(d: dict[str, Any]) -> str:
    lines = [
        f"dead letter {d['store']}/{d['id']}  endpoint {d['endpoint'] or '-'}  "
        f"message {d['message_id'] or '-'}  type {d['type'] or '-'}",
        f"parked {_when(d['at'])}: {d['reason']}",
    ]
    if d["status"] == "open":
        lines.append("status open")
    else:
        lines.append(
            f"status {d['status']} by {d['settled_by']} at {_when(d['settled_at'])}: "
            f"{d['settle_reason']}"
        )
    if d["envelope"] is not None:
        lines.append("envelope:\n" + json.dumps(d["envelope"], indent=2, sort_keys=True))
    else:
        lines += [f"not an envelope: {d['parse_error']}", f"body: {d['body']}"]
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> Any:
    d = call(args, "GET", _path(args))
    return d, _describe(d)


def _settle(args: argparse.Namespace) -> Any:
    body = {"reason": checked_reason(args.reason)}
    res = call(args, "POST", f"{_path(args)}/{args.settlement}", body)
    d = res["dead_letter"]
    return res, f"dead letter {d['store']}/{d['id']} {d['status']} by {d['settled_by']}"


def register(subparsers: Any) -> None:
    """Add ``dead-letters`` to the ``sagakit`` command line."""
    top = subparsers.add_parser(
        "dead-letters",
        help="list, inspect, replay and discard dead letters (via the API)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="dead_letters_command", required=True)
    ls = sub.add_parser("list", help="dead letters of every store, oldest first")
    ls.add_argument("--store", help="only this store's")
    ls.add_argument("--endpoint", help="only this endpoint's")
    ls.add_argument("--status", choices=("open", "settled", "all"), default="open")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--offset", type=int, default=0)
    _client_options(ls)
    ls.set_defaults(func=_runner(_list))
    show = sub.add_parser("show", help="one dead letter with its message")
    show.add_argument("store")
    show.add_argument("id", type=int)
    _client_options(show)
    show.set_defaults(func=_runner(_show))
    for name, help_text in (
        ("replay", "send the message again (same id and body)"),
        ("discard", "settle it without sending anything"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("store")
        p.add_argument("id", type=int)
        p.add_argument("--reason", required=True, help="why (kept with your token's name)")
        _client_options(p)
        p.set_defaults(func=_runner(_settle), settlement=name)
