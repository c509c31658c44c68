"""The reference checkout as a sagakit app: ``sagakit worker --app sagakit_checkout:app``.

Four services (order, payment, inventory, shipping), each with its own store, and the
orchestrated checkout saga. The payment service talks to the fake card provider, an
external system with a file of its own: ``--provider PATH`` (env
``SAGAKIT_PROVIDER_DB``), by default ``provider.db`` in the data directory (the
directory of a ``sqlite:///DIR`` store URL, or ``sagakit serve``'s ``--data-dir``).

``sagakit demo`` and ``sagakit serve`` run this app by default; its ``--mode`` option
also runs the choreographed and hybrid checkouts (embedded only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sagakit import App, AppOption, Participant, SagaDefinition, Service
from sagakit.app import AppContext
from sagakit.errors import ConfigurationError
from sagakit.stores.base import SQLStore

from . import inventory, order, payment, shipping
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
    """The card provider of this process: ``--provider``, else ``provider.db`` in the
    data directory."""
    path = ctx.options.get("provider")
    if path is None and ctx.data_dir is not None:
        path = ctx.data_dir / "provider.db"
    if path is None:
        raise ConfigurationError(
            "the payment service needs the card provider's file: --provider PATH "
            "(or SAGAKIT_PROVIDER_DB)"
        )
    return FakeCardProvider(Path(path))


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
    description="the reference checkout: order, payment, inventory, shipping",
    options=[
        AppOption(
            "provider",
            "the fake card provider's SQLite file (default: provider.db in the data directory)",
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


@_inventory.every(5.0, "expire-reservations")
async def _expire(store: SQLStore) -> int:
    """Return the units of reservations whose saga died (their TTL ran out)."""
    return await inventory.expire_reservations(store, time.time())
