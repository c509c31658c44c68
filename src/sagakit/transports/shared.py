"""What the transports (:mod:`~sagakit.transports.embedded`,
:mod:`~sagakit.transports.nats`, :mod:`~sagakit.transports.rabbitmq`) check alike:
which envelopes have a route, the error for those that have none, and what a
subscription may ask for."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sagakit.core.envelope import Envelope
from sagakit.errors import ConfigurationError, UnroutableMessage


def split_routable(
    envelopes: Sequence[Envelope], endpoints: Collection[str]
) -> tuple[list[Envelope], list[tuple[str, str | None]]]:
    """The envelopes whose destination is one of ``endpoints``, and (message id,
    destination) of the others, each in publishing order."""
    routable: list[Envelope] = []
    unroutable: list[tuple[str, str | None]] = []
    for env in envelopes:
        if env.destination is None or env.destination not in endpoints:
            unroutable.append((env.message_id, env.destination))
        else:
            routable.append(env)
    return routable, unroutable


def unroutable_error(
    unroutable: list[tuple[str, str | None]], endpoints: Collection[str]
) -> UnroutableMessage:
    """The error :meth:`publish` raises for ``unroutable`` (message id, destination)
    pairs, naming each missing destination once and the endpoints that exist."""
    destinations = sorted({repr(d) for _, d in unroutable})
    return UnroutableMessage(
        f"no route to {', '.join(destinations)} for {len(unroutable)} message(s); "
        f"known endpoints: {sorted(endpoints)}",
        unroutable,
    )


def check_subscription(
    endpoint: str, known: Sequence[str], batch_size: int, concurrency: int
) -> None:
    """Refuse a subscription to an endpoint outside ``known`` (listed in the error in
    the order given), or with a ``batch_size`` or ``concurrency`` below 1."""
    if endpoint not in known:
        raise UnroutableMessage(
            f"cannot subscribe: {endpoint!r} is not one of {list(known)}",
            [],
        )
    if batch_size < 1 or concurrency < 1:
        raise ConfigurationError(
            f"batch_size and concurrency must be >= 1, got {batch_size} and {concurrency}"
        )
