"""The story's clock: how many seconds a minute of the ride lasts.

A ride is told in minutes: a driver accepts within a minute or two, the saga gives up
after two minutes without one, a trip takes minutes to an hour. Those minutes are
``--minute-seconds`` seconds each (env ``RIDE_MINUTE_SECONDS``):

* 60 by default: real minutes, in production and under ``sagakit simulate`` and the
  testing kit, whose virtual clocks make an hour pass in no real time;
* :data:`DEMO_MINUTE` under ``sagakit demo``, which runs on the real clock: there a
  whole day of rides plays in well under a minute.

Every process of a deployment must use the same value: the worker's step timeouts
and the dispatch service's people read it.
"""

from __future__ import annotations

import argparse

from sagakit import AppContext, AppOption

DEFAULT_MINUTE = 60.0
"""Seconds of a story minute when nothing says otherwise: real minutes."""

DEMO_MINUTE = 0.2
"""Seconds of a story minute under ``sagakit demo`` (unless ``--minute-seconds``)."""


def positive_seconds(text: str) -> float:
    """A positive, finite number of seconds (the type of ``--minute-seconds``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


MINUTE_OPTION = AppOption(
    "minute_seconds",
    f"seconds of one minute of the ride story: step timeouts, drivers and riders follow "
    f"it (default {DEFAULT_MINUTE:g}: real minutes; sagakit demo: {DEMO_MINUTE:g})",
    env="RIDE_MINUTE_SECONDS",
    type=positive_seconds,
)
"""``--minute-seconds``; its default (None) means :data:`DEFAULT_MINUTE`, except in
``sagakit demo`` (:data:`DEMO_MINUTE`)."""


def minute_of(ctx: AppContext) -> float:
    """Seconds of a story minute in the process described by ``ctx``."""
    value = ctx.options.get(MINUTE_OPTION.name)
    return DEFAULT_MINUTE if value is None else float(value)
