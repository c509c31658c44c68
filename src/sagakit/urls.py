"""Stores and transports from URLs, for the command line and deployment code.

* ``sqlite:///absolute/path.db`` or ``sqlite:relative/path.db``: :class:`SQLiteStore`;
  the query string may set ``synchronous=FULL|NORMAL``.
* ``postgresql://user@host:port/db?schema=NAME``: :class:`PostgresStore`; ``schema``
  gives each service its own schema in one database (or point each service at its own
  database).
* ``nats://host:port?stream=NAME``: :class:`NatsTransport`.
* ``amqp://user:password@host:port/vhost?prefix=NAME``: :class:`RabbitMqTransport`.

Drivers are imported only when a URL needs them, so the embedded default stays
dependency-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from sagakit.errors import ConfigurationError
from sagakit.stores.base import Store
from sagakit.transports.base import Transport


def _query(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return parts.scheme, params


def with_params(url: str, **params: str) -> str:
    """``url`` with query parameters added or replaced (e.g. a schema per service)."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def store_from_url(url: str, *, name: str) -> Store:
    """A store for ``url``; ``name`` identifies it in logs and wake-up channels."""
    scheme, params = _query(url)
    if scheme == "sqlite":
        path = url.split("?", 1)[0][len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ConfigurationError(f"sqlite URL {url!r} has no file path")
        from sagakit.stores.sqlite import SQLiteStore

        return SQLiteStore(
            Path(path), name=name, synchronous=params.get("synchronous", "FULL").upper()
        )
    if scheme in ("postgresql", "postgres"):
        from sagakit.stores.postgres import PostgresStore

        schema = params.pop("schema", None)
        parts = urlsplit(url)
        dsn = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(params)))
        return PostgresStore(dsn, name=name, schema=schema)
    raise ConfigurationError(
        f"store URL {url!r} is not supported: use sqlite:///path.db or "
        "postgresql://user@host/db?schema=NAME"
    )


def transport_from_url(
    url: str, *, endpoints: Sequence[str], default_name: str = "sagakit"
) -> Transport:
    """A broker transport for ``url`` serving ``endpoints``.

    ``default_name`` names the NATS stream or prefixes the RabbitMQ queues when the URL
    does not (``?stream=``, ``?prefix=``); an app's deployment passes the app's name.
    """
    scheme, params = _query(url)
    base = url.split("?", 1)[0]
    if scheme == "nats":
        from sagakit.transports.nats import NatsTransport

        return NatsTransport(base, stream=params.get("stream", default_name), endpoints=endpoints)
    if scheme in ("amqp", "amqps"):
        from sagakit.transports.rabbitmq import RabbitMqTransport

        return RabbitMqTransport(
            base, prefix=params.get("prefix", default_name), endpoints=endpoints
        )
    raise ConfigurationError(
        f"broker URL {url!r} is not supported: use nats://host:4222 or "
        "amqp://user:password@host:5672/"
    )
