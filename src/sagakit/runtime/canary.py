"""Which definition version a new saga starts on (a canary release of a new version
sends a share of the new sagas to it), and what a start request must be to start.

``Engine(canary={"checkout": 0.1})`` starts 10% of new checkouts on the latest
registered version and the rest on the version before it, chosen by a stable hash of
the business key, so a key always lands on the same version, in every process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from sagakit.core.definition import SagaDefinition
from sagakit.core.machine import Machine
from sagakit.errors import ConfigurationError, DefinitionError

__all__ = ["admit", "canary_point", "checked_canary", "machines_for_starts", "previous_version"]

StartRequest = tuple[str, str, Mapping[str, Any]]
"""(definition name, business key, data)."""


def machines_for_starts(
    machines: Mapping[tuple[str, int], Machine],
    latest: Mapping[str, SagaDefinition],
    canary: Mapping[str, float],
    requests: Sequence[StartRequest],
    version: int | None,
) -> list[Machine]:
    """The machine each start request runs on: ``version`` if given, else the latest
    (or, for a key the canary keeps back, the version before it). A request with no
    key, data that is not a mapping or an unknown definition is a DefinitionError."""
    for _, key, data in requests:
        if not isinstance(key, str) or not key:
            raise DefinitionError(f"business key must be a non-empty string, got {key!r}")
        if not isinstance(data, Mapping):
            raise DefinitionError(f"saga data must be a mapping, got {type(data).__name__}")
    return [_machine_named(machines, latest, canary, n, version, k) for n, k, _ in requests]


def _machine_named(
    machines: Mapping[tuple[str, int], Machine],
    latest: Mapping[str, SagaDefinition],
    canary: Mapping[str, float],
    name: str,
    version: int | None,
    key: str,
) -> Machine:
    if version is None:
        d = latest.get(name)
        if d is None:
            raise DefinitionError(
                f"no saga definition named {name!r}; registered: {sorted(latest)}"
            )
        share = canary.get(name)
        if share is not None and canary_point(name, key) >= share:
            return machines[(name, previous_version(name, latest, machines))]
        return machines[(d.name, d.version)]
    try:
        return machines[(name, version)]
    except KeyError:
        raise DefinitionError(f"no saga definition {name}@{version}") from None


async def admit(
    machines: Sequence[Machine], requests: Sequence[StartRequest]
) -> list[StartRequest]:
    """The requests as they may be stored: each definition's personal-data rules
    applied to its data (see :mod:`sagakit.core.personal`), before any transaction;
    one refused start refuses the batch (:class:`~sagakit.errors.PersonalDataRefused`).
    """
    return [
        (name, key, await machine.definition.personal.admit(key, data))
        for machine, (name, key, data) in zip(machines, requests, strict=True)
    ]


def canary_point(definition: str, business_key: str) -> float:
    """Where ``business_key`` falls in [0, 1): a stable hash (sha256) of the key.

    The same key always gets the same point, in every process and release, so a
    canary share ``p`` starts the keys below ``p`` on the latest version.
    """
    digest = hashlib.sha256(f"{definition}\x00{business_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def previous_version(
    name: str, latest: Mapping[str, SagaDefinition], machines: Mapping[tuple[str, int], Machine]
) -> int:
    """The highest registered version of ``name`` below its latest (the canary's rest)."""
    newest = latest[name].version
    return max(v for n, v in machines if n == name and v < newest)


def checked_canary(
    canary: Mapping[str, float],
    latest: Mapping[str, SagaDefinition],
    machines: Mapping[tuple[str, int], Machine],
) -> dict[str, float]:
    """``canary`` (definition name -> share of new sagas on its latest version), checked
    against the registered definitions: a clear ConfigurationError for any bad entry."""
    for name, share in canary.items():
        if name not in latest:
            raise ConfigurationError(
                f"canary for {name!r}: no saga definition of that name is registered "
                f"(registered: {sorted(latest)})"
            )
        if isinstance(share, bool) or not isinstance(share, (int, float)):
            raise ConfigurationError(
                f"canary share of {name!r} must be a number between 0 and 1, got {share!r}"
            )
        if not 0 < share < 1:
            raise ConfigurationError(
                f"canary share of {name!r} must be between 0 and 1 (exclusive), got "
                f"{share}: 1 means no canary (start every saga on the latest version by "
                "dropping the entry), 0 means no new version (drop it from the app)"
            )
        versions = sorted(v for n, v in machines if n == name)
        if len(versions) < 2:
            raise ConfigurationError(
                f"canary for {name!r}: only {name}@{versions[0]} is registered; a canary "
                "needs the new version and the one before it"
            )
    return dict(canary)
