"""An app on concrete servers: its stores and the engine of each process role.

``Deployment(app, store_url, broker_url)`` is what ``sagakit worker|relay|service|serve``
build from ``--app``, ``--store`` and ``--broker``:

* ``sqlite:///DIR``: one SQLite file per store in ``DIR`` (``orchestrator.db``,
  ``<service>.db``); ``?synchronous=NORMAL`` trades power-loss safety for speed.
* ``postgresql://user@host/db``: one schema per store, ``<prefix>_orchestrator`` and
  ``<prefix>_<service>``; the prefix is the app's name unless the URL says
  ``?prefix=NAME`` (two deployments of one app on one database: give each a prefix).
* ``nats://host:4222``: the JetStream stream is named after the app (``?stream=NAME``).
* ``amqp://user:password@host:5672/``: queues and exchanges are prefixed with the
  app's name (``?prefix=NAME``).

Every role may run in any number of processes: the database decides who applies a
transition, the broker who gets a message.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from sagakit.app import App, AppContext
from sagakit.core.definition import SagaDefinition
from sagakit.errors import ConfigurationError
from sagakit.runtime.alerts import AlertSettings
from sagakit.runtime.engine import Engine
from sagakit.runtime.participant import Participant
from sagakit.service import Service
from sagakit.stores.base import SQLStore
from sagakit.transports.base import Transport
from sagakit.urls import store_from_url, transport_from_url

_MAX_SCHEMA = 63  # PostgreSQL's identifier limit, in bytes


class Deployment:
    """``app`` on the stores of ``store_url`` and the broker of ``broker_url``.

    ``options`` are the app's options (see :class:`~sagakit.app.AppOption`), filled from
    their environment variables and defaults where not given. ``alerts``: the webhooks
    to tell of sagas that need a person and of dead letters, for every role's engine.
    Stores are built once per deployment and opened by the engines that use them.
    """

    def __init__(
        self,
        app: App,
        store_url: str,
        broker_url: str | None = None,
        *,
        options: Mapping[str, Any] | None = None,
        data_dir: str | Path | None = None,
        alerts: AlertSettings | None = None,
    ) -> None:
        if not isinstance(app, App):
            raise ConfigurationError(f"Deployment needs a sagakit.App, got {type(app).__name__}")
        self.app = app
        self.alerts = alerts
        """Alert webhooks for every engine of this deployment (:mod:`sagakit.runtime.alerts`)."""
        self.store_url = store_url
        self.broker_url = broker_url
        parts = urlsplit(store_url)
        self._params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.scheme == "sqlite":
            self._dir: Path | None = Path(_sqlite_path(store_url))
            if data_dir is None:
                data_dir = self._dir
        elif parts.scheme in ("postgresql", "postgres"):
            self._dir = None
            if "schema" in self._params:
                raise ConfigurationError(
                    f"store URL {_shown(store_url)}: an app's stores each get their own schema "
                    f"(<prefix>_<store>); set the prefix with ?prefix=NAME, not ?schema="
                )
        else:
            raise ConfigurationError(
                f"store URL {_shown(store_url)} is not supported: use sqlite:///DIRECTORY or "
                "postgresql://user@host/db"
            )
        self.prefix = self._params.pop("prefix", app.name)
        self.ctx: AppContext = app.context(
            store_url=store_url,
            broker_url=broker_url,
            options=options,
            data_dir=Path(data_dir) if data_dir is not None else None,
        )
        self._stores: dict[str, SQLStore] = {}
        self._definitions = app.definitions(self.ctx)

    def __repr__(self) -> str:
        return f"Deployment({self.app.name!r}, {_shown(self.store_url)!r})"

    # -- parts --------------------------------------------------------------------------
    def schema(self, name: str) -> str:
        """The PostgreSQL schema of the store ``name`` (``<prefix>_<name>``)."""
        schema = f"{self.prefix}_{name}".replace("-", "_")
        if len(schema.encode()) > _MAX_SCHEMA:
            raise ConfigurationError(
                f"schema {schema!r} is longer than PostgreSQL's {_MAX_SCHEMA} bytes; "
                "use a shorter ?prefix= or service name"
            )
        return schema

    def store(self, name: str) -> SQLStore:
        """The store ``name`` (``orchestrator`` or a service), built once, not opened."""
        if name not in self.app.store_names:
            raise ConfigurationError(
                f"app {self.app.name!r} has no store {name!r}; its stores: "
                f"{', '.join(self.app.store_names)}"
            )
        store = self._stores.get(name)
        if store is None:
            if self._dir is not None:
                query = urlencode(self._params)
                url = f"sqlite://{(self._dir / f'{name}.db').resolve()}" + (
                    f"?{query}" if query else ""
                )
            else:
                parts = urlsplit(self.store_url)
                query = urlencode({**self._params, "schema": self.schema(name)})
                url = urlunsplit(parts._replace(query=query))
            # Both SQL adapters implement SQLStore; store_from_url is typed as Store.
            store = cast(SQLStore, store_from_url(url, name=name))
            self._stores[name] = store
        return store

    def stores(self, names: Iterable[str] | None = None) -> dict[str, SQLStore]:
        """The stores by name (all of them by default)."""
        return {n: self.store(n) for n in (self.app.store_names if names is None else names)}

    def transport(self) -> Transport:
        """A broker transport for every endpoint of the app (needs ``broker_url``)."""
        if not self.broker_url:
            raise ConfigurationError(
                "this role needs a broker: give --broker nats://... or amqp://... "
                "(or SAGAKIT_BROKER_URL)"
            )
        return transport_from_url(
            self.broker_url, endpoints=self.app.endpoints, default_name=self.app.name
        )

    def participant(self, name: str) -> Participant:
        """The participant of the service ``name`` on its store."""
        service = self.app.get_service(name)
        return service.participant(self.store(name), self.ctx)

    @property
    def definitions(self) -> list[SagaDefinition]:
        """The app's saga definitions as this deployment builds them."""
        return list(self._definitions)

    # -- engines per role ---------------------------------------------------------------
    def _engine(self, store: SQLStore, definitions: list[SagaDefinition], **kw: Any) -> Engine:
        if self.app.canary and definitions:
            kw.setdefault("canary", self.app.canary)
        kw.setdefault("event_routes", self.app.event_routes())
        if self.alerts is not None:
            kw.setdefault("alerts", self.alerts)
        return Engine(store, definitions, **kw)

    def worker(self, **engine_kw: Any) -> Engine:
        """The orchestrator (replies, local steps) and the timers, on the orchestrator store."""
        return self._engine(
            self.store("orchestrator"),
            self.definitions,
            transport=self.transport(),
            roles={"orchestrator", "timers"},
            **engine_kw,
        )

    def relay(self, services: Iterable[str] | None = None, **engine_kw: Any) -> Engine:
        """Relays for the outboxes of ``services`` (every store by default) and their
        housekeeping: retention, and the broker's own dead letters moved into them."""
        names = list(self.app.store_names if services is None else services)
        if not names:
            raise ConfigurationError("a relay needs at least one store")
        stores = [self.store(n) for n in names]
        return self._engine(
            stores[0],
            [],
            extra_stores=stores[1:],
            transport=self.transport(),
            roles={"relays", "housekeeping"},
            **engine_kw,
        )

    def service(self, name: str, **engine_kw: Any) -> Engine:
        """One service's participant; its migrations run before it consumes, its jobs
        run while it does."""
        service = self.app.get_service(name)
        store = self.store(name)
        engine = self._engine(
            store,
            [],
            participants=[service.participant(store, self.ctx)],
            transport=self.transport(),
            roles={"participants"},
            **engine_kw,
        )
        self._prepare(engine, [service])
        return engine

    def everything(self, *, jobs: bool = True, **engine_kw: Any) -> Engine:
        """Every role in one engine: with a broker URL over the broker, else over the
        embedded transport (each service's mailbox in its own store). ``jobs=False``:
        the services' periodic jobs are not scheduled (the testing kit runs them on its
        virtual clock)."""
        services = list(self.app.services.values())
        transport = self.transport() if self.broker_url else None
        engine = self._engine(
            self.store("orchestrator"),
            self.definitions,
            participants=[s.participant(self.store(s.name), self.ctx) for s in services],
            transport=transport,
            **engine_kw,
        )
        self._prepare(engine, services, jobs=jobs)
        return engine

    def api(self, **engine_kw: Any) -> Engine:
        """An engine that runs no loop: for an HTTP API beside the other processes.

        Starting a saga commits it and its first commands in the orchestrator store's
        outbox (the relays publish, the workers drive); the services' stores are held
        (and migrated) for reads.
        """
        engine = self._engine(
            self.store("orchestrator"),
            self.definitions,
            extra_stores=[self.store(n) for n in self.app.services],
            roles=frozenset(),
            **engine_kw,
        )
        self._prepare(engine, list(self.app.services.values()), jobs=False)
        return engine

    def _prepare(self, engine: Engine, services: list[Service], *, jobs: bool = True) -> None:
        for service in services:
            store = self.store(service.name)
            engine.before_start(functools.partial(service.migrate, store))
            if jobs:
                for seconds, name, job in service.jobs:
                    engine.every(seconds, f"{service.name}:{name}", functools.partial(job, store))


def _sqlite_path(url: str) -> str:
    path = url.split("?", 1)[0][len("sqlite:") :]
    if path.startswith("//"):
        path = path[2:]
    if path.startswith("//"):  # sqlite:////abs, e.g. f"sqlite:///{an_absolute_path}"
        path = "/" + path.lstrip("/")
    if not path:
        raise ConfigurationError(f"store URL {url!r} has no directory: use sqlite:///DIRECTORY")
    return path


def _shown(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = (parts.username or "") + ":***"
    return parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}").geturl()
