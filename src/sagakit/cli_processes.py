"""``sagakit worker``, ``sagakit relay`` and ``sagakit service NAME``: the production processes.

Each runs one share of an app (``--app module:attribute``, env ``SAGAKIT_APP``)
against its stores (PostgreSQL, or SQLite files) and a broker, until SIGTERM or
SIGINT, then finishes the batch in hand and exits. Run any number of each: the
database decides who applies a transition, the broker who gets a message. URLs come
from the options or from ``SAGAKIT_STORE_URL`` / ``SAGAKIT_BROKER_URL``; the app's own
options (:class:`~sagakit.app.AppOption`) are flags of these commands too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sagakit.cli_alerts import alert_options, alerts_from_args
from sagakit.cli_app import add_app_argument, add_app_options, loaded, options_of
from sagakit.errors import ConfigurationError, SagakitError, StoreError, TransportError
from sagakit.observability import JsonFormatter
from sagakit.redaction import RedactPersonalData

if TYPE_CHECKING:
    from sagakit.app import App
    from sagakit.runtime.engine import Engine

log = logging.getLogger(__name__)


def store_option(parser: argparse.ArgumentParser, store_help: str = "") -> None:
    """``--store``, by default ``SAGAKIT_STORE_URL``."""
    parser.add_argument(
        "--store",
        default=os.environ.get("SAGAKIT_STORE_URL"),
        help="postgresql://user@host/db (a schema per store, ?prefix=NAME) or "
        f"sqlite:///DIRECTORY (a file per store){store_help} (env SAGAKIT_STORE_URL)",
    )


def url_options(
    parser: argparse.ArgumentParser, store_help: str = "", broker_help: str = ""
) -> None:
    """``--store`` and ``--broker``, by default ``SAGAKIT_STORE_URL`` and ``SAGAKIT_BROKER_URL``."""
    store_option(parser, store_help)
    parser.add_argument(
        "--broker",
        default=os.environ.get("SAGAKIT_BROKER_URL"),
        help=f"nats://host:4222 (?stream=NAME) or amqp://user:pass@host:5672/ (?prefix=NAME)"
        f"{broker_help} (env SAGAKIT_BROKER_URL)",
    )


def _urls(parser: argparse.ArgumentParser) -> None:
    url_options(parser)
    parser.add_argument("--log-level", default=os.environ.get("SAGAKIT_LOG_LEVEL", "WARNING"))
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=os.environ.get("SAGAKIT_METRICS_PORT"),
        metavar="PORT",
        help="serve this process's Prometheus metrics on http://HOST:PORT/metrics "
        "(env SAGAKIT_METRICS_PORT; off by default)",
    )
    parser.add_argument(
        "--metrics-host",
        default=os.environ.get("SAGAKIT_METRICS_HOST", "127.0.0.1"),
        help="address for --metrics-port (default 127.0.0.1; env SAGAKIT_METRICS_HOST)",
    )
    parser.add_argument(
        "--wait-for-servers",
        type=_wait_seconds,
        default=os.environ.get("SAGAKIT_WAIT_FOR_SERVERS", "60"),
        metavar="SECONDS",
        help="at start, keep trying to reach the database and the broker this long before "
        "giving up (0: try once; default 60; env SAGAKIT_WAIT_FOR_SERVERS)",
    )
    alert_options(parser)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _wait_seconds(text: str) -> float:
    """Zero or a positive, finite number of seconds (argparse type)."""
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, got {text!r}")
    return value


def command_timeout_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--command-timeout SECONDS`` (env ``SAGAKIT_COMMAND_TIMEOUT``), positive and finite."""
    parser.add_argument(
        "--command-timeout",
        type=_seconds,  # argparse applies it to a string default too (the environment's)
        default=os.environ.get("SAGAKIT_COMMAND_TIMEOUT"),
        help=help_text,
    )


def register(sub: Any, apps: Callable[[str], App | None] | None = None) -> None:
    """Add the process commands to the ``sagakit`` parser.

    ``apps(command)`` is the app whose options the command gets as flags (see
    :func:`sagakit.cli_app.prescan`); by default the app the command runs without
    ``--app`` (``SAGAKIT_APP``), if any.
    """
    from sagakit.cli_app import default_app

    apps = apps or default_app
    worker = sub.add_parser(
        "worker",
        help="run an app's orchestrator and its timers",
        description="Drive the app's sagas: consume replies, run local steps, fire timers.",
    )
    add_app_argument(worker, "worker")
    _urls(worker)
    add_app_options(worker, "worker", apps("worker"))
    worker.set_defaults(func=_run, role="worker")

    relay = sub.add_parser(
        "relay",
        help="publish the outboxes of an app's stores",
        description="Publish every store's outbox to the broker, and keep the stores' "
        "retention and the broker's dead letters.",
    )
    add_app_argument(relay, "relay")
    _urls(relay)
    relay.add_argument(
        "--services",
        default=None,
        help="comma-separated stores to relay (default: all of the app's: orchestrator "
        "and every service)",
    )
    add_app_options(relay, "relay", apps("relay"))
    relay.set_defaults(func=_run, role="relay")

    service = sub.add_parser(
        "service",
        help="run one service (a participant) of an app",
        description="Handle the commands (and events) of one of the app's services, in "
        "its own store; its migrations run first and its jobs run meanwhile.",
    )
    service.add_argument("name", help="the service, one of the app's (e.g. payment)")
    add_app_argument(service, "service")
    _urls(service)
    add_app_options(service, "service", apps("service"))
    service.set_defaults(func=_run, role="service")


def _run(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactPersonalData())  # as every log the CLI writes
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        builder = _builder(args)
    except (SagakitError, ValueError) as exc:
        print(f"sagakit {args.role}: {exc}", file=sys.stderr)
        return 2
    if not args.store or not args.broker:
        print(f"sagakit {args.role}: --store and --broker are required", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(args, builder))
    except (SagakitError, ValueError) as exc:
        print(f"sagakit {args.role}: {exc}", file=sys.stderr)
        return 2


def _builder(args: argparse.Namespace) -> Callable[[], Engine]:
    """What builds this process's engine: a fresh one per try (see open_when_ready)."""
    from sagakit.deployment import Deployment

    app = loaded(args, args.role)
    options = options_of(args, args.role, app)
    if args.role == "service":
        app.get_service(args.name)  # an unknown service is a usage error, said at once
    names: list[str] | None = None
    if args.role == "relay" and args.services:
        names = [s.strip() for s in args.services.split(",") if s.strip()]
        unknown = [n for n in names if n not in app.store_names]
        if unknown:
            raise ConfigurationError(
                f"--services: app {app.name!r} has no store(s) {', '.join(unknown)}; "
                f"its stores: {', '.join(app.store_names)}"
            )

    alerts = alerts_from_args(args)

    def build() -> Engine:
        dep = Deployment(app, args.store, args.broker, options=options, alerts=alerts)
        if args.role == "worker":
            return dep.worker()
        if args.role == "relay":
            return dep.relay(names)
        return dep.service(args.name)

    return build


def unreachable(exc: BaseException) -> bool:
    """True for "the server is not there (yet)": worth trying again; False for the rest.

    A broker that refuses connections, a PostgreSQL that refuses them or is starting up
    or shutting down (psycopg's ``OperationalError``) are transient; a bad URL, a
    missing option, a SQLite file that cannot be opened, a failed migration are not.
    """
    if isinstance(exc, ConfigurationError):
        return False
    if isinstance(exc, TransportError | OSError):
        return True
    cause = exc.__cause__
    try:
        import psycopg
    except ImportError:  # no PostgreSQL support installed: not a PostgreSQL error
        return False
    return isinstance(cause, psycopg.OperationalError)


async def open_when_ready(
    build: Callable[[], Engine], *, role: str, wait: float, stop: asyncio.Event
) -> Engine | None:
    """Build and open an engine, retrying while the database or broker is unreachable.

    Processes of a deployment often start before their servers (a reboot, a compose
    file, a failover): failing at once would leave the restart to a supervisor that
    may not exist. A configuration error (a bad URL, a missing option) fails at once,
    as does an unreachable server after ``wait`` seconds; ``None`` when ``stop`` is set
    meanwhile. Each try uses a fresh engine: a half-opened one is closed, not reused.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.25
    while True:
        engine = build()
        try:
            await engine.open()
            return engine
        except (StoreError, TransportError, OSError) as exc:
            if not unreachable(exc):
                raise
            with contextlib.suppress(Exception):
                await engine.close()
            left = deadline - loop.time()
            if left <= 0:
                raise
            pause = min(delay, left)
            log.warning("sagakit %s cannot start yet (%s); trying again in %.1fs", role, exc, pause)
            print(f"sagakit {role}: waiting for servers: {exc}", file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            if stop.is_set():
                return None
            delay = min(delay * 2, 5.0)


_MAX_REQUEST = 8192


async def _answer_metrics(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.0-style exchange: ``GET /metrics`` gets the registry, anything else 404."""
    from sagakit.metrics import REGISTRY

    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        method, target, *_ = head[:_MAX_REQUEST].decode("latin-1").split(" ", 2)
        if method == "GET" and target.split("?", 1)[0] == "/metrics":
            status, body = "200 OK", REGISTRY.exposition().encode()
            kind = "text/plain; version=0.0.4; charset=utf-8"
        else:
            status, body, kind = "404 Not Found", b"only GET /metrics here\n", "text/plain"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (
        TimeoutError,
        ValueError,
        ConnectionError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
    ):
        pass  # a client that does not speak HTTP (or hangs up) gets nothing; the process goes on
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve_metrics(host: str, port: int) -> asyncio.Server:
    """Serve :data:`sagakit.metrics.REGISTRY` at ``http://host:port/metrics``.

    Each worker, relay and service process counts its own sagas, steps and inbox
    duplicates; Prometheus scrapes every process (one target each) and adds them up.
    A minimal server on purpose: it answers one request per connection and nothing else.
    """
    return await asyncio.start_server(_answer_metrics, host, port, limit=_MAX_REQUEST)


async def _serve(args: argparse.Namespace, build: Callable[[], Engine]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics: asyncio.Server | None = None
    if args.metrics_port is not None:
        metrics = await serve_metrics(args.metrics_host, args.metrics_port)
        log.warning("sagakit %s metrics on %s:%d", args.role, args.metrics_host, args.metrics_port)
    try:
        engine = await open_when_ready(build, role=args.role, wait=args.wait_for_servers, stop=stop)
        if engine is None:  # stopped while waiting for the servers
            return 0
        try:
            log.warning("sagakit %s of app %s running (pid %d)", args.role, args.app, os.getpid())
            print(f"sagakit {args.role} ready (app {args.app})", file=sys.stderr, flush=True)
            await stop.wait()
            log.warning("sagakit %s stopping", args.role)
        finally:
            await engine.close()
    finally:
        if metrics is not None:
            metrics.close()
        with contextlib.suppress(NotImplementedError):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sagakit.cli_processes worker|relay|service ...`` (same as ``sagakit``)."""
    from sagakit.cli_app import prescan

    argv = list(sys.argv[1:] if argv is None else argv)
    scan = prescan(argv)
    if scan.error is not None:
        print(f"sagakit {scan.command}: {scan.error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="sagakit")
    register(parser.add_subparsers(dest="command", required=True), lambda command: scan.app)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
