"""What ``sagakit serve`` runs: an app, embedded on SQLite files or on a deployment.

* Embedded (the default): the app on SQLite files in the data directory (one per
  store), every role in this process.
* Deployed (``store_url`` and ``broker_url``): the app on PostgreSQL (a schema per
  store) and a broker, either with every role in this process, or ``api_only``: no
  loop at all, next to ``sagakit worker|relay|service`` processes.

An app may shape this itself (``App(serve=...)``: the reference checkout adds its
order and ledger routes and its choreographed and hybrid modes); this module is the
generic shape every app gets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sagakit.api.http import OrderStarter
from sagakit.api.records import CheckoutStores
from sagakit.app import App
from sagakit.deployment import Deployment
from sagakit.errors import ConfigurationError
from sagakit.runtime.alerts import AlertSettings
from sagakit.runtime.engine import Engine

WAVE = 100
"""Sagas started per transaction by :attr:`Served.prepare`."""


@dataclass(frozen=True, slots=True)
class ServeRequest:
    """Where and how ``sagakit serve`` runs an app."""

    data_dir: Path
    store_url: str | None = None
    broker_url: str | None = None
    api_only: bool = False
    synchronous: str = "FULL"
    options: Mapping[str, Any] = field(default_factory=dict)
    alerts: AlertSettings | None = None
    """Webhooks for alerts (sagas that need a person, dead letters), in every engine."""


@dataclass(slots=True)
class Served:
    """One app ready to serve: its engine and what the API needs of it."""

    engine: Engine
    checkout: CheckoutStores | None
    """The services' stores for the order and ledger routes (None: no such routes)."""
    order_definition: str
    prepare: Callable[[int, int], Awaitable[object]]
    """``prepare(sagas, seed)`` once the engine is open: reference data, then that many
    sagas of the app's load driver (idempotent: a restart starts none again)."""
    where: str
    """Where the data lives, for the banner."""
    start_order: OrderStarter | None = None
    """How ``POST /orders`` starts an order (None: the ``order_definition`` saga)."""


def for_app(app: App, req: ServeRequest) -> Served:
    """What ``sagakit serve`` runs for ``app`` (its own shape if it has one)."""
    if req.store_url is None and (req.broker_url is not None or req.api_only):
        raise ConfigurationError("--broker and --api-only need --store (the deployment's stores)")
    if app.serve is not None:
        served: Served = app.serve(app, req)
        return served
    return generic(app, req)


def deploy(app: App, req: ServeRequest) -> tuple[Deployment, Engine, str]:
    """The deployment ``req`` names, its engine for ``serve`` and where the data lives:
    SQLite files in the data directory (every role here), or ``--store`` with
    ``--api-only`` (no loop) or with ``--broker`` (every role here)."""
    if req.store_url is None:
        # sqlite:///DIR names an absolute path: a relative --data-dir must be resolved.
        url = f"sqlite:///{req.data_dir.resolve()}?synchronous={req.synchronous}"
        dep = Deployment(app, url, options=req.options, data_dir=req.data_dir, alerts=req.alerts)
        return dep, dep.everything(), str(req.data_dir)
    if req.api_only:
        dep = Deployment(
            app, req.store_url, options=req.options, data_dir=req.data_dir, alerts=req.alerts
        )
        where = f"{shown_url(req.store_url)}, API only: run sagakit worker, relay and service"
        return dep, dep.api(), where
    if req.broker_url is None:
        raise ConfigurationError(
            "--store without --api-only runs every role here and needs --broker too "
            "(or SAGAKIT_BROKER_URL)"
        )
    dep = Deployment(
        app,
        req.store_url,
        req.broker_url,
        options=req.options,
        data_dir=req.data_dir,
        alerts=req.alerts,
    )
    where = f"{shown_url(req.store_url)} and {shown_url(req.broker_url)}, every role here"
    return dep, dep.everything(), where


def generic(app: App, req: ServeRequest) -> Served:
    """Every app's shape: the operator API over the app's engine, no order routes."""
    dep, engine, where = deploy(app, req)

    async def prepare(count: int, seed: int) -> None:
        if app.setup is not None:
            await app.setup(dep)
        if not count:
            return
        if app.load is None:
            raise ConfigurationError(
                f"--orders: app {app.name!r} ships no load driver (App(load=...))"
            )
        requests = list(app.load(count, seed))
        for i in range(0, len(requests), WAVE):
            await engine.start_many(requests[i : i + WAVE])

    definitions = dep.definitions
    return Served(engine, None, definitions[0].name if definitions else "", prepare, where)


def shown_url(url: str) -> str:
    """``url`` without its password, for banners and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return parts._replace(netloc=f"{user}@{netloc[-1]}").geturl()
