"""Databases, streams and queue prefixes of a test's own on the shared servers.

Several test runs share PostgreSQL, NATS and RabbitMQ: each test makes its own, with
a unique name, and removes it afterwards. (Importable from every test module: pytest
puts this directory, the root conftest's, on ``sys.path``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("SAGAKIT_TEST_NATS_URL", "nats://127.0.0.1:4222")
AMQP_URL = os.environ.get("SAGAKIT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def admin(statement: str, patience: float = 30.0) -> None:
    """Run ``statement`` on the shared server, waiting out a moment when every one of
    its connections is taken (other test runs share it), so no database is left over."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with _psycopg().connect(PG_DSN, autocommit=True) as conn:
                conn.execute(statement)
            return
        except _psycopg().OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextlib.contextmanager
def fresh_database(prefix: str = "sagakit_test") -> Iterator[str]:
    """The URL of a new, empty database on the shared server; dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}"')
    try:
        yield PG_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_broker(kind: str) -> Iterator[str]:
    """A broker URL with a stream (NATS) or queue prefix (RabbitMQ) of its own on the
    shared server; its stream or queues are deleted afterwards."""
    from sagakit_checkout.deploy import ENDPOINTS

    from sagakit.errors import TransportError

    name = f"sagakit_demo_{uuid.uuid4().hex[:10]}"
    transport: Any
    if kind == "nats":
        from sagakit.transports.nats import NatsTransport

        url = f"{NATS_URL}?stream={name}"
        transport = NatsTransport(NATS_URL, stream=name, endpoints=ENDPOINTS, connect_timeout=2.0)
    else:
        from sagakit.transports.rabbitmq import RabbitMqTransport

        url = f"{AMQP_URL}?prefix={name}"
        transport = RabbitMqTransport(AMQP_URL, prefix=name, endpoints=ENDPOINTS)
    try:
        yield url
    finally:
        with contextlib.suppress(TransportError):
            asyncio.run(transport.delete_topology())


def _psycopg() -> Any:
    import psycopg

    return psycopg
