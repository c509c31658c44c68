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
from pathlib import Path
from typing import Any

from sagakit.errors import SagakitError
from sagakit.observability import JsonFormatter

log = logging.getLogger(__name__)


def _urls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get("SAGAKIT_STORE_URL"),
        help="postgresql://user@host/db (a schema per service) or sqlite:///dir "
        "(env SAGAKIT_STORE_URL)",
    )
    parser.add_argument(
        "--broker",
        default=os.environ.get("SAGAKIT_BROKER_URL"),
        help="nats://host:4222 or amqp://user:pass@host:5672/ (env SAGAKIT_BROKER_URL)",
    )
    parser.add_argument("--log-level", default=os.environ.get("SAGAKIT_LOG_LEVEL", "WARNING"))


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def register(sub: Any) -> None:
    """Add the process commands to the ``sagakit`` parser."""
    worker = sub.add_parser("worker", help="run the orchestrator and its timers")
    _urls(worker)
    worker.add_argument(
        "--command-timeout",
        type=_seconds,
        default=os.environ.get("SAGAKIT_COMMAND_TIMEOUT"),
        help="seconds the first attempt of a command waits for its answer; later attempts "
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


async def _serve(args: argparse.Namespace) -> int:
    from sagakit_checkout import deploy

    if args.role == "worker":
        # argparse runs ``_seconds`` on a string default too (the environment's value).
        engine = deploy.build_worker(args.store, args.broker, command_timeout=args.command_timeout)
    elif args.role == "relay":
        services = [s.strip() for s in args.services.split(",") if s.strip()]
        engine = deploy.build_relay(args.store, args.broker, services)
    else:
        provider = Path(args.provider) if args.provider else None
        engine = deploy.build_service(args.name, args.store, args.broker, provider)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with engine:
        log.warning("sagakit %s running (pid %d)", args.role, os.getpid())
        print(f"sagakit {args.role} ready", file=sys.stderr, flush=True)
        await stop.wait()
        log.warning("sagakit %s stopping", args.role)
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
