"""``sagakit serve``: an app (by default the reference checkout) and the HTTP API in one process.

One data directory holds the app's SQLite files (``orchestrator.db`` and one per
service), the API's tables (in ``orchestrator.db``) and ``tokens.json``. When no
tokens are configured (no ``tokens_file``, no ``SAGAKIT_TOKENS_FILE``, no tokens in
``<data_dir>/tokens.json``), an admin token is generated, only its SHA-256 is
stored, and the token is printed once with the URL: keep it, it cannot be shown again
(delete ``tokens.json`` to get a new one). SIGTERM and SIGINT stop the server
gracefully: requests in flight finish, then the engine closes its stores (committed
work is kept; a restart resumes it).

With ``store_url`` (and ``broker_url``) the app runs on the deployment's PostgreSQL
stores instead, every role in this process or ``api_only`` next to ``sagakit
worker|relay|service`` processes (see :mod:`sagakit.api.serve_setup`). The data
directory then only holds the tokens, the console's key (``console.key``, which signs
its sign-in sessions and forms), the lock and the app's own files (the checkout's fake
card provider).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any, TextIO

import uvicorn
import uvicorn.config

from sagakit.api import serve_setup
from sagakit.api.app import DEFAULT_MAX_BODY, create_app
from sagakit.api.auth import (
    TOKENS_JSON,
    Role,
    TokenEntry,
    TokenStore,
    WatchedTokenStore,
    configured_tokens_file,
    generate_token,
    hash_token,
    tokens_file_lock,
    write_tokens_file,
)
from sagakit.api.connections import HttpLimits, listen_wider
from sagakit.api.console_session import CONSOLE_KEY, SESSION_LIFETIME, load_console_key
from sagakit.api.limits import Limits
from sagakit.app import App, load_app
from sagakit.errors import ConfigurationError
from sagakit.redaction import RedactPersonalData
from sagakit.runtime.alerts import AlertSettings
from sagakit.runtime.engine import Engine
from sagakit.runtime.lockfile import LockFile, data_dir_lock, private_dir

DEFAULT_APP = "sagakit_checkout:app"
"""What ``sagakit serve`` runs without ``--app``: the reference checkout."""
_EXTRAS = (
    "saga_id",
    "step",
    "actor",
    "action",
    "reason",
    "outcome",
    "rung",
    "batch_id",
    "version",
    "state",
    "attempt",
)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, with sagakit's ``extra`` fields (saga_id, actor...)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _EXTRAS:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def load_tokens(
    data_dir: Path, tokens_file: str | os.PathLike[str] | None
) -> tuple[TokenStore, str | None]:
    """The configured tokens, or a generated admin token: ``(store, token or None)``.

    The token is returned (to be shown once) only when it was generated now. The store
    re-reads the file when it changes (``sagakit tokens``), without a restart.
    """
    if tokens_file is not None:
        store = WatchedTokenStore(tokens_file)
        if not len(store):
            raise ConfigurationError(f"tokens file {tokens_file} lists no tokens; add one")
        return store, None
    path = data_dir / TOKENS_JSON
    with tokens_file_lock(path):  # not while `sagakit tokens add` writes it
        if path.exists():
            store = WatchedTokenStore(path)
            if len(store):
                return store, None
        token = generate_token()
        write_tokens_file(path, TokenStore([TokenEntry("admin", Role.ADMIN, hash_token(token))]))
    return WatchedTokenStore(path), token


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` stops it, then the engine."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Install nothing: :func:`serve` handles SIGTERM and SIGINT itself."""
        # uvicorn re-raises a caught SIGTERM once it stopped, which would kill the process
        # before the engine closed; serve() installs handlers that only ask it to exit.
        yield


def _lock(data_dir: Path) -> LockFile:
    """Create ``data_dir`` and hold its lock file (one process per data directory)."""
    private_dir(data_dir)  # 0700: databases, tokens and keys are the owner's
    lock = data_dir_lock(data_dir)
    lock.acquire()
    return lock


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging configuration with :class:`RedactPersonalData` on its
    ``default`` handler (``uvicorn`` and ``uvicorn.error``): an error it logs may quote
    a request. The access log is off (its formatter needs the record's raw args)."""
    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": RedactPersonalData}
    default = config["handlers"]["default"]
    default["filters"] = [*default.get("filters", []), "redact"]
    return config


def _configure_logging(level: str) -> Callable[[], None]:
    """JSON lines on stderr for sagakit's loggers, unless configured; returns the undo."""
    root = logging.getLogger("sagakit")
    if root.handlers:
        return lambda: None  # the caller configured logging
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    # E-mails, card numbers and addresses never reach a log line, as in the CLI's logs;
    # the filter masks the ``extra`` fields (a reason) that the JSON lines carry too.
    handler.addFilter(RedactPersonalData())
    saved = (root.level, root.propagate)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]

    return undo


async def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: str | os.PathLike[str] = "sagakit-data",
    tokens_file: str | os.PathLike[str] | None = None,
    orders: int = 0,
    *,
    seed: int = 0,
    max_body: int = DEFAULT_MAX_BODY,
    synchronous: str = "FULL",
    log_level: str = "info",
    out: TextIO | None = None,
    json_output: bool = False,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    mode: str | None = None,
    store_url: str | None = None,
    broker_url: str | None = None,
    api_only: bool = False,
    command_timeout: float | None = None,
    app: App | None = None,
    options: Mapping[str, Any] | None = None,
    http_limits: HttpLimits | None = None,
    limits: Limits | None = None,
    read_threads: int = 2,
    console_session_seconds: float = SESSION_LIFETIME,
    alerts: AlertSettings | None = None,
) -> None:
    """Run ``app`` (default: the reference checkout) and the API until SIGTERM/SIGINT
    (or ``stop`` is set).

    ``orders`` starts that many sagas of the app's load driver at start (the checkout:
    the demo's seeded mix of orders), once: a restart with the same ``seed`` does not
    start them again. The URL (and a generated token) are printed to ``out`` (stdout),
    as one JSON object with ``json_output``; ``on_ready`` gets the URL once serving.
    ``store_url``, ``broker_url`` and ``api_only`` select a deployment instead of SQLite
    files in ``data_dir``. ``options`` are the app's options; ``mode`` and
    ``command_timeout`` are shorthands for the checkout's. ``http_limits`` bound the
    connections (:class:`~sagakit.api.connections.HttpLimits`), ``limits`` each token's
    request rate and event streams (:class:`~sagakit.api.limits.Limits`); both have safe
    defaults. ``read_threads`` worker threads run the SQLite stores' plain reads, off
    the event loop (0: on the loop). A console sign-in lasts ``console_session_seconds``.
    ``alerts``: webhooks to tell of sagas that need a person and of dead letters.
    """
    if orders < 0:
        raise ConfigurationError("orders must be >= 0")
    if isinstance(read_threads, bool) or not isinstance(read_threads, int) or read_threads < 0:
        raise ConfigurationError(f"read_threads must be an integer >= 0, got {read_threads!r}")
    http_limits = http_limits or HttpLimits()
    app = app or load_app(DEFAULT_APP)
    given = dict(options or {})
    for name, value in (("mode", mode), ("command_timeout", command_timeout)):
        if value is not None:
            given[name] = value
    ctx = app.context(options=given)  # unknown options are refused here, before any I/O
    out = out or sys.stdout
    base = Path(data_dir)
    lock = _lock(base)
    undo_logging = _configure_logging(log_level)
    try:
        tokens, generated = load_tokens(base, configured_tokens_file(tokens_file))
        served = serve_setup.for_app(
            app,
            serve_setup.ServeRequest(
                base, store_url, broker_url, api_only, synchronous, ctx.options, alerts
            ),
        )
        async with served.engine as engine:
            _reads_off_loop(engine, read_threads)
            await served.prepare(orders, seed)
            asgi = create_app(
                engine,
                checkout=served.checkout,
                tokens=tokens,
                max_body=max_body,
                order_definition=served.order_definition,
                start_order=served.start_order,
                limits=Limits() if limits is None else limits,
                console_secret=load_console_key(base / CONSOLE_KEY),
                console_session_seconds=console_session_seconds,
            )
            config = uvicorn.Config(
                asgi,
                host=host,
                port=port,
                log_level=log_level.lower(),
                log_config=uvicorn_log_config(),
                access_log=False,
                lifespan="on",
                **http_limits.uvicorn_options(),
            )
            server = _Server(config)
            shown = (base, served.where)
            await _run(
                server,
                host,
                shown,
                generated,
                out,
                json_output,
                stop,
                on_ready,
                backlog=http_limits.backlog,
            )
    finally:
        undo_logging()
        lock.release()


def _reads_off_loop(engine: Engine, threads: int) -> None:
    """Move the SQLite stores' plain reads to worker threads: a page of hundreds of
    sagas, or a console refreshing, then leaves the event loop (and ``/healthz``) free."""
    for store in engine.stores:
        read_in_threads = getattr(store, "read_in_threads", None)
        if callable(read_in_threads):
            read_in_threads(threads)


async def _run(
    server: _Server,
    host: str,
    shown_data: tuple[Path, str],
    generated: str | None,
    out: TextIO,
    json_output: bool,
    stop: asyncio.Event | None,
    on_ready: Callable[[str], None] | None,
    *,
    backlog: int,
) -> None:
    loop = asyncio.get_running_loop()
    base, where = shown_data

    def request_exit() -> None:
        if server.should_exit:
            server.force_exit = True  # a second signal: stop waiting for open requests
        server.should_exit = True

    signals = (signal.SIGTERM, signal.SIGINT)
    installed = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, request_exit)
            installed.append(sig)
    task = asyncio.create_task(server.serve())
    watcher = asyncio.create_task(_watch(stop, request_exit)) if stop is not None else None
    try:
        while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn has a flag only
            await asyncio.sleep(0.02)
        if server.started:
            for listening in server.servers:
                listen_wider(listening.sockets, backlog)
            bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else 0
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{bound}"
            if json_output:
                info = {"url": url, "data_dir": str(base), "data": where, "token": generated}
                print(json.dumps(info), file=out)
            else:
                print(
                    f"sagakit API on {url} (data in {where}; OpenAPI at {url}/openapi.json; "
                    f"console at {url}/console/)",
                    file=out,
                )
                if generated is not None:
                    print(
                        f"admin token (shown once; only its hash is kept in "
                        f"{base / TOKENS_JSON}):\n  {generated}",
                        file=out,
                    )
            out.flush()
            if on_ready is not None:
                on_ready(url)
        await task
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        if not task.done():
            server.should_exit = True
            await task


async def _watch(stop: asyncio.Event, request_exit: Callable[[], None]) -> None:
    await stop.wait()
    request_exit()
