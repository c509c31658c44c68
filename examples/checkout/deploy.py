"""The checkout app on PostgreSQL (or SQLite files) and a broker, as tests and benchmarks use it.

The processes are the generic ones (``sagakit worker|relay|service --app
sagakit_checkout:app``); this module only names the checkout's stores and builds the
same engines in-process through :class:`sagakit.Deployment`, plus
:func:`deployment`: every store and the card provider, e.g. to check the invariants
after a run. Each service owns its schema (``checkout_order``, ``checkout_payment``,
...), or its file in a ``sqlite:///DIR`` directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagakit import Deployment as AppDeployment
from sagakit import Engine
from sagakit.stores.base import SQLStore

from .app import app, provider_of

SERVICES = tuple(app.services)
STORES = tuple(app.store_names)
ENDPOINTS = tuple(app.endpoints)


def _on(store_url: str, broker_url: str | None = None, **options: Any) -> AppDeployment:
    return AppDeployment(app, store_url, broker_url, options=options)


def service_store(store_url: str, service: str) -> SQLStore:
    """The store of ``service``: its own schema on PostgreSQL, its own file on SQLite."""
    return _on(store_url).store(service)


def build_worker(
    store_url: str, broker_url: str, *, command_timeout: float | None = None, **engine_kw: Any
) -> Engine:
    """``sagakit worker --app sagakit_checkout:app``: orchestrator and timers."""
    return _on(store_url, broker_url, command_timeout=command_timeout).worker(**engine_kw)


def build_relay(
    store_url: str, broker_url: str, services: Sequence[str] = STORES, **engine_kw: Any
) -> Engine:
    """``sagakit relay --app sagakit_checkout:app``: relays and housekeeping."""
    return _on(store_url, broker_url).relay(services, **engine_kw)


def build_service(
    name: str,
    store_url: str,
    broker_url: str,
    provider_path: Path | str | None = None,
    **engine_kw: Any,
) -> Engine:
    """``sagakit service NAME --app sagakit_checkout:app``."""
    return _on(store_url, broker_url, provider=provider_path).service(name, **engine_kw)


@dataclass
class Deployment:
    """Every store of the checkout on one base URL, for drivers and invariant checks."""

    stores: dict[str, SQLStore]
    provider: Any

    @property
    def payment_store(self) -> SQLStore:
        """The payment service's store (the API's ledger routes read it)."""
        return self.stores["payment"]

    @property
    def inventory_store(self) -> SQLStore:
        """The inventory service's store."""
        return self.stores["inventory"]

    @property
    def shipping_store(self) -> SQLStore:
        """The shipping service's store."""
        return self.stores["shipping"]

    def invariant_stores(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~sagakit_checkout.invariants.check_invariants`."""
        return {f"{name}_store": s for name, s in self.stores.items()} | {"provider": self.provider}


def _checkout_of(dep: AppDeployment) -> Deployment:
    return Deployment(dep.stores(), provider_of(dep.ctx))


def deployment(store_url: str, provider_path: Path | str | None = None) -> Deployment:
    """Every store (not opened) and the provider, e.g. to check invariants afterwards.

    ``provider_path``: the provider's file or ``postgresql://`` URL; by default its own
    schema on PostgreSQL stores, ``provider.db`` beside SQLite ones."""
    return _checkout_of(_on(store_url, provider=provider_path))


def build_all(
    store_url: str, broker_url: str, provider_path: Path | str | None = None, **engine_kw: Any
) -> tuple[Engine, Deployment]:
    """Every role in one engine: the checkout on PostgreSQL and a broker, one process."""
    dep = _on(store_url, broker_url, provider=provider_path)
    return dep.everything(**engine_kw), _checkout_of(dep)


def build_api(
    store_url: str,
    provider_path: Path | str | None = None,
    *,
    command_timeout: float | None = None,
    **engine_kw: Any,
) -> tuple[Engine, Deployment]:
    """``sagakit serve --api-only``'s engine: no loop; starts sagas, reads the stores."""
    dep = _on(store_url, provider=provider_path, command_timeout=command_timeout)
    return dep.api(**engine_kw), _checkout_of(dep)
