"""The travel app: every sagakit process loads it with ``--app travel.app:app``.

    sagakit demo    --app travel.app:app                   # every role, SQLite, faults
    sagakit serve   --app travel.app:app --data-dir DIR    # the same, with the HTTP API
    sagakit worker  --app travel.app:app --partners DIR    # orchestrator, local steps, timers
    sagakit relay   --app travel.app:app                   # outboxes -> broker
    sagakit service hotel --app travel.app:app             # the hotel service

The production commands take ``--store`` and ``--broker`` (or ``SAGAKIT_STORE_URL`` and
``SAGAKIT_BROKER_URL``). The app's name, ``travel``, names its PostgreSQL schemas
(``travel_orchestrator``, ``travel_hotel``), its NATS stream and its RabbitMQ queues.
"""

from __future__ import annotations

from sagakit import App, AppContext, AppOption, SagaDefinition

from .demo import invariants, load
from .hotel import hotel
from .trip import TripSteps, partners_of, trip_definition


def definitions(ctx: AppContext) -> list[SagaDefinition]:
    """The app's saga definitions, for the process described by ``ctx``."""
    steps = TripSteps(lambda: partners_of(ctx))
    return [trip_definition(steps)]


app = App(
    "travel",
    definitions,
    services=[hotel],
    options=[
        AppOption(
            "partners",
            "directory of the fake airline's, card provider's and mail service's files "
            "(default: the data directory)",
            env="TRAVEL_PARTNERS",
            commands=frozenset({"worker", "serve", "demo"}),
        ),
    ],
    load=load,
    invariants=invariants,
    description="the user guide's travel booking: flight, hotel, charge, e-mail",
)


def trip() -> SagaDefinition:
    """The latest trip definition, for tools that take a definition:
    ``sagakit graph travel.app:trip``."""
    return app.definitions()[-1]
