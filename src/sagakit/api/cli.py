"""The API's commands for the ``sagakit`` CLI: ``serve``, ``sagas ...``, ``manual-cases``.

``serve`` runs the checkout and the HTTP API (needs the ``api`` extra): embedded on
SQLite in one of three modes (``--mode``), or on the deployment's PostgreSQL stores
(``--store``/``--broker``, env ``SAGAKIT_STORE_URL``/``SAGAKIT_BROKER_URL``), with
every role in this process or ``--api-only`` next to ``sagakit worker|relay|service``.

``sagas list|show|start|retry|compensate|resolve|cancel`` and ``manual-cases`` talk to a
*running* API (``--url``, default ``$SAGAKIT_URL`` or http://127.0.0.1:8000) with a
bearer token (``--token``, default ``$SAGAKIT_TOKEN``), never to the databases
directly: every decision then goes through the same authentication, validation and
audit as the HTTP API, the actor recorded in the saga's history is the token's name,
and the data directory stays owned by the one process that serves it. They need only
the standard library. Every command takes ``--json`` to print the API's JSON answer.

A decision carries the saga version it was made on, so that it is refused (409) if the
saga moved since: ``--version N`` (the ``version`` that ``sagas show`` prints), else
the version the command reads just before it acts. The irreversible actions
(``mark_done``, ``mark_compensated``, ``accept_partial``) say what they would do and
act only with ``--yes``; ``accept_partial`` with a hold still open needs ``--force``.

Exit status: 0 on success, 1 when the API refused or failed (its message is printed
on stderr), 2 for usage errors, an unreachable API and an irreversible action not
confirmed (nothing was sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sagakit.core.machine_manual import describe, irreversible
from sagakit.redaction import personal_data_in

if TYPE_CHECKING:
    from sagakit.app import App

DEFAULT_URL = "http://127.0.0.1:8000"
STATES = (
    "RUNNING",
    "COMPENSATING",
    "SUCCEEDED",
    "COMPENSATED",
    "FAILED_NEEDS_MANUAL",
    "TIMED_OUT",
    "PARTIAL_ACCEPTED",
)
ACTIONS = (
    "retry",
    "mark_done",
    "compensate",
    "mark_compensated",
    "use_rung",
    "accept_partial",
    "cancel",
)


class CommandFailed(Exception):
    """The API answered with an error, or could not be reached (``code`` is the exit status)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One request to the API; the parsed JSON answer, or :class:`CommandFailed`."""
    return exchange(args, method, path, body)[1]


def exchange(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request to the API: ``(HTTP status, parsed JSON answer)``, or
    :class:`CommandFailed` for an error status or an unreachable API."""
    if not args.token:
        raise CommandFailed("no token: pass --token or set SAGAKIT_TOKEN", 2)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        args.url.rstrip("/") + path,
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {args.token}",
            "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {}),
            **(headers or {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["message"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace")[:500] or exc.reason
        raise CommandFailed(f"{exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandFailed(
            f"cannot reach {args.url} ({reason}); is `sagakit serve` running?", 2
        ) from None


def checked_reason(reason: str) -> str:
    """``--reason`` as given, or :class:`CommandFailed` (exit 2) when it holds personal
    data: the API would refuse it (422), and this way it never leaves this machine."""
    found = personal_data_in(reason)
    if found is not None:
        raise CommandFailed(
            f"--reason holds {found}: a reason is kept for good in the saga's history and "
            "the audit, so write it without personal data and name the customer by their "
            "token (cust-000123)",
            2,
        )
    return reason


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _table(items: list[dict[str, Any]], extra: str | None = None) -> str:
    cols = ["saga_id", "state", "status", "current_step", "age", "definition", "business_key"]
    rows = [
        [
            str(i["saga_id"]),
            i["state"],
            i["status"],
            str(i.get("current_step") or "-"),
            _age(float(i.get("age_s", 0.0))),
            f"{i['definition']}@{i['definition_version']}",
            str(i["business_key"]),
        ]
        + ([str(i.get(extra) or "")] if extra else [])
        for i in items
    ]
    header = cols + ([extra] if extra else [])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> Any:
    query: list[tuple[str, str]] = [("state", s) for s in args.state or []]
    for key in ("definition", "version", "step", "min_age", "max_age", "limit", "offset"):
        value = getattr(args, key)
        if value is not None:
            query.append((key, str(value)))
    page = call(args, "GET", "/sagas?" + urllib.parse.urlencode(query))
    counts = ", ".join(f"{k}={v}" for k, v in page["counts"].items() if v)
    text = f"{_table(page['items'])}\n{len(page['items'])} of {page['total']} ({counts or 'none'})"
    return page, text


def _show(args: argparse.Namespace) -> Any:
    s = call(args, "GET", f"/sagas/{urllib.parse.quote(args.saga_id, safe='')}")
    lines = [
        f"saga {s['saga_id']}  {s['definition']}@{s['definition_version']}  "
        f"key {s['business_key']}",
        f"state {s['state']}  status {s['status']}  version {s['version']}",
    ]
    if s.get("last_error"):
        lines.append(f"last error: {s['last_error']}")
    lines.append("steps:")
    for st in s["steps"]:
        err = f"  error: {st['error']}" if st.get("error") else ""
        lines.append(
            f"  {st['index']}. {st['name']:<20} {st['status']:<22} "
            f"attempt {st['attempt']} rung {st['rung']}{err}"
        )
    lines.append("history:")
    for h in s["history"]:
        lines.append(f"  v{h['version']:<3} {h['event']:<26} {h['state']:<20} {h['step'] or ''}")
    return s, "\n".join(lines)


def _start(args: argparse.Namespace) -> Any:
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise CommandFailed(f"--data is not JSON: {exc}", 2) from None
    if not isinstance(data, dict):
        raise CommandFailed("--data must be a JSON object, e.g. '{\"nights\": 2}'", 2)
    body: dict[str, Any] = {"definition": args.definition, "business_key": args.key, "data": data}
    if args.version is not None:
        body["version"] = args.version
    status, s = exchange(args, "POST", "/sagas", body)
    what = "started" if status == 201 else "already started for this key:"
    text = (
        f"{what} saga {s['saga_id']}  {s['definition']}@{s['definition_version']}  "
        f"key {s['business_key']}  {s['state']} ({s['status']})"
    )
    return s, text


def _act(args: argparse.Namespace) -> Any:
    """One decision, sent with ``If-Match``: the ``--version`` the person decided on, or
    the version read just before. An irreversible action without ``--yes`` only says
    what it would do, to which version, and how to confirm (exit 2, nothing sent)."""
    action = args.action_name or args.action
    reason = checked_reason(args.reason)
    body: dict[str, Any] = {"action": action, "reason": reason}
    if getattr(args, "rung", None) is not None:
        body["rung"] = args.rung
    if getattr(args, "force", False):
        body["force"] = True
    path = f"/sagas/{urllib.parse.quote(args.saga_id, safe='')}"
    version = args.saga_version
    unconfirmed = irreversible(action) and not getattr(args, "yes", False)
    if version is None or unconfirmed:
        saga = call(args, "GET", path)
        version = saga["version"] if version is None else version
        if unconfirmed:
            step = saga.get("current_step")
            at = f" at {step}" if step else ""
            confirm = (
                f"sagakit sagas {args.sagas_command} {args.saga_id}"
                + (f" --action {action}" if args.sagas_command == "resolve" else "")
                + (f" --rung {args.rung}" if getattr(args, "rung", None) is not None else "")
                + f" --reason {json.dumps(reason)} --version {version}"
                + (" --force" if getattr(args, "force", False) else "")
                + " --yes"
            )
            raise CommandFailed(
                f"{action} cannot be taken back; nothing was sent.\n"
                f"  saga {saga['saga_id']} ({saga['business_key']}) is {saga['state']}{at}, "
                f"version {saga['version']}\n"
                f"  {action}: {describe(action)}\n"
                f"To confirm it on version {version}:\n  {confirm}",
                2,
            )
    body["confirm"] = irreversible(action)
    res = exchange(args, "POST", path + "/actions", body, {"If-Match": f'"{version}"'})[1]
    saga = res["saga"]
    return res, f"{action} applied to {saga['saga_id']}: now {saga['state']} ({saga['status']})"


def _manual(args: argparse.Namespace) -> Any:
    page = call(args, "GET", f"/manual-cases?limit={args.limit}&offset={args.offset}")
    text = _table(page["items"], "reason") + f"\n{len(page['items'])} of {page['total']} waiting"
    return page, text


def _runner(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            data, text = fn(args)
        except CommandFailed as exc:
            print(f"sagakit: {exc}", file=sys.stderr)
            return exc.code
        print(json.dumps(data, indent=2) if args.json else text)
        return 0

    return run


def _serve(args: argparse.Namespace) -> int:
    from sagakit.api.serve import serve
    from sagakit.cli_alerts import alerts_from_args
    from sagakit.cli_app import loaded, options_of
    from sagakit.errors import SagakitError

    try:
        app = loaded(args, "serve")
        asyncio.run(
            serve(
                args.host,
                args.port,
                args.data_dir,
                args.tokens_file,
                args.orders,
                seed=args.seed,
                log_level=args.log_level,
                json_output=args.json,
                store_url=args.store or None,
                broker_url=args.broker or None,
                api_only=args.api_only,
                app=app,
                options=options_of(args, "serve", app),
                alerts=alerts_from_args(args),
                **_limits_of(args),
            )
        )
    except (SagakitError, ValueError) as exc:
        print(f"sagakit serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _limit_options(serve: argparse.ArgumentParser) -> None:
    """``serve``'s limits on connections, request rates and event streams."""
    group = serve.add_argument_group(
        "limits", "what one client may use (see docs/operations.md, Bounded resources)"
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open connections at most; beyond, the one waiting longest for its request "
        "header is closed, or a few more are let in for probes only (default: half of "
        "the open-file limit less 64, 16 to 1000)",
    )
    group.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a connection has to send a whole request header (default %(default)s)",
    )
    group.add_argument(
        "--keep-alive",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (default %(default)s)",
    )
    group.add_argument(
        "--max-header-bytes",
        type=int,
        default=16384,
        help="largest request line plus headers (default %(default)s)",
    )
    group.add_argument(
        "--backlog",
        type=int,
        default=1024,
        help="connections the kernel queues before they are accepted (default %(default)s)",
    )
    group.add_argument(
        "--limit-concurrency",
        type=int,
        default=None,
        help="connections plus requests in flight beyond which uvicorn answers 503 (default: off)",
    )
    group.add_argument(
        "--rate-limit",
        type=float,
        default=20.0,
        help="requests per second per token, sustained; 429 beyond (0: off; default "
        "%(default)s; /healthz, /readyz and /metrics are exempt)",
    )
    group.add_argument(
        "--rate-burst",
        type=int,
        default=40,
        help="requests a token may send at once (default %(default)s)",
    )
    group.add_argument(
        "--max-streams",
        type=int,
        default=8,
        help="event streams one token may hold open (0: no cap; default %(default)s)",
    )
    group.add_argument(
        "--console-session-hours",
        type=float,
        default=8.0,
        help="how long a console sign-in lasts (default %(default)s; the token's own "
        "expiry ends it sooner)",
    )
    group.add_argument(
        "--read-threads",
        type=int,
        default=2,
        help="threads running the SQLite stores' reads off the event loop (0: on the "
        "loop; default %(default)s)",
    )


def _limits_of(args: argparse.Namespace) -> dict[str, Any]:
    """``serve``'s keyword arguments for the limits flags."""
    from sagakit.api.connections import HttpLimits
    from sagakit.api.limits import Limits

    return {
        "http_limits": HttpLimits(
            max_connections=args.max_connections,
            header_timeout=args.header_timeout,
            keep_alive=args.keep_alive,
            max_header_bytes=args.max_header_bytes,
            backlog=args.backlog,
            limit_concurrency=args.limit_concurrency,
        ),
        "limits": Limits(rate=args.rate_limit, burst=args.rate_burst, streams=args.max_streams),
        "read_threads": args.read_threads,
        "console_session_seconds": args.console_session_hours * 3600.0,
    }


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("SAGAKIT_URL", DEFAULT_URL),
        help="the running API (default $SAGAKIT_URL or %(default)s)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("SAGAKIT_TOKEN"),
        help="bearer token (default $SAGAKIT_TOKEN)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def register(subparsers: Any, apps: Callable[[str], App | None] | None = None) -> None:
    """Add ``serve``, ``sagas``, ``manual-cases`` and ``dead-letters`` to the command line.

    ``apps(command)``: the app whose options ``serve`` gets as flags (default: the
    app ``serve`` runs without ``--app``).
    """
    # The same options as the processes.
    from sagakit.cli_app import add_app_argument, add_app_options, default_app

    apps = apps or default_app
    from sagakit.cli_alerts import alert_options
    from sagakit.cli_processes import url_options

    serve = subparsers.add_parser(
        "serve",
        help="run an app and the HTTP API (default: the reference checkout)",
        description="Run an app (--app; the reference checkout by default) and the HTTP "
        "API in one process: embedded (SQLite files in --data-dir), or on the "
        "deployment's stores (--store, --broker), every role here or --api-only next to "
        "sagakit worker/relay/service. Without configured tokens an admin token is "
        "generated and printed once.",
    )
    add_app_argument(serve, "serve")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", default=os.environ.get("SAGAKIT_DATA_DIR", "sagakit-data"))
    serve.add_argument(
        "--tokens-file",
        default=None,
        help="JSON file of {name, role, sha256} entries (default "
        "$SAGAKIT_TOKENS_FILE, else <data-dir>/tokens.json)",
    )
    serve.add_argument(
        "--orders",
        type=int,
        default=0,
        help="start N sagas of the app's load driver at start (the checkout: demo orders)",
    )
    serve.add_argument("--seed", type=int, default=0, help="seed of those sagas")
    serve.add_argument("--log-level", default=os.environ.get("SAGAKIT_LOG_LEVEL", "info"))
    url_options(
        serve,
        ": serve the deployment's stores instead of SQLite files in --data-dir",
        ": with --store, run every role here",
    )
    serve.add_argument(
        "--api-only",
        action="store_true",
        help="with --store: only the API and console; sagakit worker, relay and service "
        "processes carry the sagas (no broker needed)",
    )
    serve.add_argument(
        "--json",
        action="store_true",
        help="print the URL (and a generated token) as one JSON object",
    )
    _limit_options(serve)
    alert_options(serve.add_argument_group("alerts"))
    add_app_options(serve, "serve", apps("serve"))
    serve.set_defaults(func=_serve)

    sagas = subparsers.add_parser(
        "sagas",
        help="list, inspect and act on sagas (via the API)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = sagas.add_subparsers(dest="sagas_command", required=True)
    ls = sub.add_parser("list", help="sagas, newest first, filtered")
    ls.add_argument("--state", action="append", choices=STATES, help="repeat for several")
    ls.add_argument("--definition")
    ls.add_argument("--version", type=int)
    ls.add_argument("--step", help="the step at the saga's cursor")
    ls.add_argument("--min-age", dest="min_age", type=float, help="seconds")
    ls.add_argument("--max-age", dest="max_age", type=float, help="seconds")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--offset", type=int, default=0)
    _client_options(ls)
    ls.set_defaults(func=_runner(_list))
    show = sub.add_parser("show", help="one saga: steps, history, messages")
    show.add_argument("saga_id")
    _client_options(show)
    show.set_defaults(func=_runner(_show))
    start = sub.add_parser(
        "start",
        help="start a saga of the served app (idempotent by business key)",
        description="Start a saga through the running API (POST /sagas). A second start "
        "with the same definition and key shows the saga the first one started.",
    )
    start.add_argument("definition", help="a saga definition of the served app, e.g. trip")
    start.add_argument("key", help="the business key, e.g. trip-42 (a token, not personal data)")
    start.add_argument("--data", default="{}", help="the saga's data as a JSON object (default {})")
    start.add_argument("--version", type=int, help="the definition version (default: the latest)")
    _client_options(start)
    start.set_defaults(func=_runner(_start))
    for name, help_text in (
        ("retry", "try the stuck step again"),
        ("compensate", "undo the stuck step and the steps before it"),
        ("cancel", "cancel a running saga (before its point of no return)"),
        ("resolve", "any manual action (--action)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("saga_id")
        p.add_argument("--reason", required=True, help="why (recorded with your token's name)")
        p.add_argument(
            "--version",
            dest="saga_version",
            type=int,
            help="the saga version you decided on (as `sagas show` prints it); refused "
            "if the saga moved since (default: the version read just before acting)",
        )
        if name == "resolve":
            p.add_argument("--action", required=True, choices=ACTIONS)
            p.add_argument("--rung", type=int, help="for use_rung: the ladder rung")
            p.add_argument(
                "--yes",
                action="store_true",
                help="confirm an irreversible action (mark_done, mark_compensated, "
                "accept_partial); without it the command says what it would do",
            )
            p.add_argument(
                "--force",
                action="store_true",
                help="accept_partial although a compensation or a hold is still open",
            )
        _client_options(p)
        p.set_defaults(func=_runner(_act), action_name=None if name == "resolve" else name)
    manual = subparsers.add_parser("manual-cases", help="sagas waiting for a person (via the API)")
    manual.add_argument("--limit", type=int, default=50)
    manual.add_argument("--offset", type=int, default=0)
    _client_options(manual)
    manual.set_defaults(func=_runner(_manual))
    from sagakit.api.cli_dead_letters import register as register_dead_letters

    register_dead_letters(subparsers)
