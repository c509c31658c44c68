"""The notifications app: every sagakit process loads it with
``--app sagakit_notifications:app``.

    sagakit demo  --app sagakit_notifications:app --faults chaos --orders 100
    sagakit simulate --app sagakit_notifications:app --seeds 300
    sagakit worker --app sagakit_notifications:app --store ... --broker ...
    sagakit service email --app sagakit_notifications:app --store ... --broker ...

Its option ``--time-scale`` (``NOTIFICATIONS_TIME_SCALE``) multiplies the story's
durations (the saga's twenty-minute deadline, the backoff between two tries of a
notification, the providers' outages): 0.01 by default, so that a demo runs in
seconds of real time.
"""

from __future__ import annotations

from sagakit import App, AppContext, AppOption, SagaDefinition

from .invariants import invariants, watch
from .load import load, setup
from .mail import email_service
from .orders import orders_service
from .sagas import order_notifications
from .sms import sms_service

BUGS = ("retry_without_key",)
"""The bugs :mod:`.planted` can plant (each caught by an invariant)."""

TIME_SCALE = AppOption(
    "time_scale",
    "real seconds per story second (the deadline is 20 story minutes, the providers' "
    "outages minutes or hours); 1 runs the story in real time",
    env="NOTIFICATIONS_TIME_SCALE",
    default=0.01,
    type=float,
)


def definitions(ctx: AppContext) -> list[SagaDefinition]:
    """The app's saga definitions, at the time scale of the process's options."""
    return [order_notifications(time_scale=float(ctx.option("time_scale")))]


def build_app(*, bug: str | None = None) -> App:
    """The app; ``bug`` plants one of :data:`BUGS` in its real code."""
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; choose from {list(BUGS)}")
    return App(
        "notifications",
        definitions,
        services=[
            orders_service(),
            email_service(key_per_attempt=bug == "retry_without_key"),
            sms_service(),
        ],
        options=[TIME_SCALE],
        load=load,
        setup=setup,
        invariants=invariants,
        watch=watch,
        description="an order is placed (the pivot), then a confirmation e-mail and an "
        "SMS: retried through provider outages, never compensated, sent once",
    )


app = build_app()
