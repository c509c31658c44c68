"""The ride-hailing app: every sagakit process loads it with ``--app sagakit_ride:app``.

    sagakit demo    --app sagakit_ride:app --faults chaos     # every role, SQLite, faults
    sagakit simulate --app sagakit_ride:app --seeds 300      # the seeded simulator
    sagakit worker  --app sagakit_ride:app                   # orchestrator, timers
    sagakit service dispatch --app sagakit_ride:app          # drivers, riders, trips
    sagakit service payments --app sagakit_ride:app          # holds and captures

Two services, each with its own store: ``payments`` (holds on the riders' cards and
the fare's capture, :mod:`.payments`) and ``dispatch`` (drivers, rides, and the people
who act on them, :mod:`.dispatch`). The saga (:mod:`.sagas`) runs for minutes to hours
of the story's clock (:mod:`.timing`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from sagakit import App, AppContext, SagaDefinition
from sagakit.errors import ConfigurationError

from .dispatch import Dispatch
from .invariants import invariants, watch
from .load import load, setup
from .payments import build_payments
from .sagas import ride_definition
from .timing import DEMO_MINUTE, MINUTE_OPTION, minute_of

if TYPE_CHECKING:
    from sagakit.app_demo import DemoOutcome, DemoRequest

BUGS = ("cancel_after_start",)
"""The bugs :func:`build_app` can plant (see :mod:`.planted`)."""


def definitions(ctx: AppContext) -> list[SagaDefinition]:
    """The ride saga, its timeouts in the story minutes of the process (``ctx``)."""
    return [ride_definition(minute_of(ctx))]


async def demo(app: App, req: DemoRequest) -> DemoOutcome:
    """``sagakit demo --app sagakit_ride:app``: the generic demo, on the demo's clock.

    The demo runs on the real clock, so unless ``--minute-seconds`` says otherwise a
    story minute lasts :data:`~.timing.DEMO_MINUTE` seconds (an hour-long trip ends in
    seconds) instead of a real minute.
    """
    from sagakit.app_demo import run_generic_demo

    options = dict(req.options)
    if options.get(MINUTE_OPTION.name) is None:
        options[MINUTE_OPTION.name] = DEMO_MINUTE
    return await run_generic_demo(app, dataclasses.replace(req, options=options))


def build_app(*, bug: str | None = None) -> App:
    """The ride-hailing app; ``bug`` plants one of :data:`BUGS` (for the simulator to
    catch), None for the real app."""
    if bug is not None and bug not in BUGS:
        raise ConfigurationError(f"unknown bug {bug!r}; the ride app plants {list(BUGS)}")
    return App(
        "ride",
        definitions,
        services=[build_payments(), Dispatch(bug=bug).service],
        options=[MINUTE_OPTION],
        load=load,
        setup=setup,
        invariants=invariants,
        watch=watch,
        demo=demo,
        description="ride hailing: hold, driver, pickup (pivot), trip, fare",
    )


app = build_app()
