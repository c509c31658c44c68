"""``sagakit worker``, ``sagakit relay`` and ``sagakit service NAME``: the production processes.

Each runs one share of the reference checkout against PostgreSQL (or SQLite files)
and a broker, until SIGTERM or SIGINT, then finishes the batch in hand and exits.
Run any number of each: the database decides who applies a transition, the broker
who gets a message. URLs come from the options or from ``SAGAKIT_STORE_URL`` /
``SAGAKIT_BROKER_URL``.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagakit.errors import ConfigurationError, SagakitError, StoreError, TransportError
from sagakit.observability import JsonFormatter

if TYPE_CHECKING:
    from sagakit.runtime.engine import Engine

log = logging.getLogger(__name__)


def url_options(
    parser: argparse.ArgumentParser, store_help: str = "", broker_help: str = ""
) -> None:
    """``--store`` and ``--broker``, by default ``SAGAKIT_STORE_URL`` and ``SAGAKIT_BROKER_URL``."""
    parser.add_argument(
        "--store",
        default=os.environ.get("SAGAKIT_STORE_URL"),
        help="postgresql://user@host/db (a schema per service) or sqlite:///dir"
        f"{store_help} (env SAGAKIT_STORE_URL)",
    )
    parser.add_argument(
        "--broker",
        default=os.environ.get("SAGAKIT_BROKER_URL"),
        help=f"nats://host:4222 or amqp://user:pass@host:5672/{broker_help} "
        "(env SAGAKIT_BROKER_URL)",
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


def register(sub: Any) -> None:
    """Add the process commands to the ``sagakit`` parser."""
    worker = sub.add_parser("worker", help="run the orchestrator and its timers")
    _urls(worker)
    command_timeout_option(
        worker,
        "seconds the first attempt of a command waits for its answer; later attempts "
        "wait longer (default 2; env SAGAKIT_COMMAND_TIMEOUT)",
    )
    worker.set_defaults(func=_run, role="worker")

    relay = sub.add_parser("relay", help="publish the outboxes of the services' stores")
    _urls(relay)
    relay.add_argument(
        "--services",
        default="orchestrator,order,payment,inventory,shipping",
        help="comma-separated stores to relay (default: all five)",
    )
    relay.set_defaults(func=_run, role="relay")

    service = sub.add_parser("service", help="run one checkout service (a participant)")
    service.add_argument("name", choices=["order", "payment", "inventory", "shipping"])
    _urls(service)
    service.add_argument(
        "--provider",
        default=os.environ.get("SAGAKIT_PROVIDER_DB"),
        help="the fake card provider's SQLite file (payment only; env SAGAKIT_PROVIDER_DB)",
    )
    service.set_defaults(func=_run, role="service")


def _run(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if not args.store or not args.broker:
        print(f"sagakit {args.role}: --store and --broker are required", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(args))
    except (SagakitError, ValueError) as exc:
        print(f"sagakit {args.role}: {exc}", file=sys.stderr)
        return 2


def _builder(args: argparse.Namespace) -> Callable[[], Engine]:
    from sagakit_checkout import deploy

    if args.role == "worker":
        # argparse runs ``_seconds`` on a string default too (the environment's value).
        return lambda: deploy.build_worker(
            args.store, args.broker, command_timeout=args.command_timeout
        )
    if args.role == "relay":
        services = [s.strip() for s in args.services.split(",") if s.strip()]
        return lambda: deploy.build_relay(args.store, args.broker, services)
    provider = Path(args.provider) if args.provider else None
    return lambda: deploy.build_service(args.name, args.store, args.broker, provider)


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


async def _serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics: asyncio.Server | None = None
    if args.metrics_port is not None:
        metrics = await serve_metrics(args.metrics_host, args.metrics_port)
        log.warning("sagakit %s metrics on %s:%d", args.role, args.metrics_host, args.metrics_port)
    try:
        engine = await open_when_ready(
            _builder(args), role=args.role, wait=args.wait_for_servers, stop=stop
        )
        if engine is None:  # stopped while waiting for the servers
            return 0
        try:
            log.warning("sagakit %s running (pid %d)", args.role, os.getpid())
            print(f"sagakit {args.role} ready", file=sys.stderr, flush=True)
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
    parser = argparse.ArgumentParser(prog="sagakit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
