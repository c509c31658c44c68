"""The reference checkout as a sagakit app: ``sagakit worker --app sagakit_checkout:app``.

Four services (order, payment, inventory, shipping), each with its own store, and the
orchestrated checkout saga. The payment service talks to the fake card provider, an
external system with storage of its own: ``--provider PATH|URL`` (env
``SAGAKIT_PROVIDER_DB``), a SQLite file or ``postgresql://...?schema=NAME``. By default
it is the schema ``<prefix>_card_provider`` next to the services' schemas when the
stores are on PostgreSQL (so every process, and every rerun, sees the same provider),
else ``provider.db`` in the data directory (the directory of a ``sqlite:///DIR`` store
URL, or ``sagakit serve``'s ``--data-dir``).

``sagakit demo`` and ``sagakit serve`` run this app by default; its ``--mode`` option
also runs the choreographed and hybrid checkouts (embedded only).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from sagakit import App, AppOption, Participant, SagaDefinition, Service, now
from sagakit.app import AppContext
from sagakit.errors import ConfigurationError
from sagakit.stores.base import SQLStore

from . import inventory, order, payment, proof, shipping
from .personal import CUSTOMERS_MIGRATIONS, CUSTOMERS_NAMESPACE, VAULT_MIGRATIONS, VAULT_NAMESPACE
from .provider import FakeCardProvider
from .sagas import checkout_definition

MODES = ("orchestration", "choreography", "hybrid")


def positive_seconds(text: str) -> float:
    """A positive, finite number of seconds (the type of ``--command-timeout``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def provider_of(ctx: AppContext) -> FakeCardProvider:
    """The card provider of this process: ``--provider``; else, with the stores on
    PostgreSQL, its own schema in their database (:func:`provider_url`); else
    ``provider.db`` in the data directory."""
    location: str | Path | None = ctx.options.get("provider")
    if location is None and ctx.store_url is not None:
        location = provider_url(ctx.store_url, ctx.app.name)
    if location is None and ctx.data_dir is not None:
        location = ctx.data_dir / "provider.db"
    if location is None:
        raise ConfigurationError(
            "the payment service needs the card provider's storage: --provider PATH or "
            "postgresql://...?schema=NAME (or SAGAKIT_PROVIDER_DB)"
        )
    if isinstance(location, str) and "://" not in location:
        location = Path(location)
    try:
        # sagakit.now(): the payment handlers' clock (virtual under the simulator).
        return FakeCardProvider(location, clock=now)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def provider_url(store_url: str, app_name: str) -> str | None:
    """Where the card provider lives next to PostgreSQL stores (None for other stores).

    The stores' database, in the schema ``<prefix>_card_provider``: an external system's
    storage of its own, beside the services' ``<prefix>_<service>`` schemas rather than
    in one of them, under the same ``?prefix=`` (default: the app's name) so that two
    deployments on one database keep apart.
    """
    parts = urlsplit(store_url)
    if parts.scheme not in ("postgresql", "postgres"):
        return None
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    prefix = params.pop("prefix", app_name)
    params["schema"] = f"{prefix}_card_provider".replace("-", "_")
    return urlunsplit(parts._replace(query=urlencode(params)))


def definitions(ctx: AppContext) -> list[SagaDefinition]:
    """The checkout saga; ``--command-timeout`` sets the first wait of every command."""
    timeout = ctx.options.get("command_timeout")
    return [checkout_definition() if timeout is None else checkout_definition(timeout=timeout)]


def _payment(store: SQLStore, ctx: AppContext) -> Participant:
    return payment.build_payment(store, provider_of(ctx))


def _serve(*args: Any, **kwargs: Any) -> Any:
    from .serving import served

    return served(*args, **kwargs)


def _demo(*args: Any, **kwargs: Any) -> Any:
    from .demo import run_for_app

    return run_for_app(*args, **kwargs)


app = App(
    "checkout",
    definitions,
    load=proof.load,
    setup=proof.setup,
    invariants=proof.invariants,
    description="the reference checkout: order, payment, inventory, shipping",
    options=[
        AppOption(
            "provider",
            "the fake card provider's SQLite file, or postgresql://...?schema=NAME "
            "(default: the schema <prefix>_card_provider when the stores are on "
            "PostgreSQL, else provider.db in the data directory)",
            env="SAGAKIT_PROVIDER_DB",
            commands=frozenset({"service", "relay", "serve"}),
        ),
        AppOption(
            "command_timeout",
            "seconds the first attempt of a command waits for its answer; later attempts "
            "wait longer (default 2)",
            env="SAGAKIT_COMMAND_TIMEOUT",
            type=positive_seconds,
            commands=frozenset({"worker", "serve"}),
        ),
        AppOption(
            "mode",
            "orchestrated saga, choreographed services, or orchestrated with a "
            "choreography inside shipping (the last two embedded only; default "
            "orchestration)",
            default="orchestration",
            choices=MODES,
            commands=frozenset({"demo", "serve"}),
        ),
    ],
    demo=_demo,
    serve=_serve,
)

app.add_service(
    Service(
        order.NAME,
        migrations={
            order.NAMESPACE: order.MIGRATIONS,
            CUSTOMERS_NAMESPACE: CUSTOMERS_MIGRATIONS,
        },
        build=lambda store, ctx: order.build_order(store),
    )
)
app.add_service(
    Service(
        payment.NAME,
        migrations={payment.NAMESPACE: payment.MIGRATIONS, VAULT_NAMESPACE: VAULT_MIGRATIONS},
        build=_payment,
    )
)
_inventory = app.add_service(
    Service(
        inventory.NAME,
        migrations={inventory.NAMESPACE: inventory.MIGRATIONS},
        build=lambda store, ctx: inventory.build_inventory(store),
    )
)
app.add_service(
    Service(
        shipping.NAME,
        migrations={shipping.NAMESPACE: shipping.MIGRATIONS},
        build=lambda store, ctx: shipping.build_shipping(store),
    )
)


async def _next_expiry(store: SQLStore) -> float | None:
    """When the next reservation runs out (None: none holds units)."""
    async with store.transaction() as tx:
        rows = await tx.fetchall(
            "SELECT min(expires_at) FROM reservations WHERE status = 'RESERVED'"
        )
    return None if rows[0][0] is None else float(rows[0][0])


@_inventory.every(5.0, "expire-reservations", due=_next_expiry)
async def _expire(store: SQLStore) -> int:
    """Return the units of reservations whose saga died (their TTL ran out)."""
    return await inventory.expire_reservations(store, now())
