"""Services: the participant endpoints of an :class:`~sagakit.app.App`, with their
handlers, business-table migrations and periodic jobs.

A service is declared on its app (``hotel = app.service("hotel", migrations=[...])``)
and its handlers registered with decorators; every process that runs the service
builds its :class:`~sagakit.runtime.participant.Participant` from it
(:meth:`Service.participant`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from sagakit.core.envelope import Envelope, Outcome
from sagakit.errors import ConfigurationError
from sagakit.runtime.participant import Handler, MessageSchemas, Participant

if TYPE_CHECKING:
    from sagakit.app import AppContext
    from sagakit.stores.base import SQLStore, Tx

_ENDPOINT = re.compile(r"[a-z][a-z0-9_-]{0,62}\Z")
_RESERVED = ("orchestrator",)

Job: TypeAlias = Callable[["SQLStore"], Awaitable[object]]
"""A periodic job of a service: called with the service's (open) store."""

JobDue: TypeAlias = Callable[["SQLStore"], Awaitable[float | None]]
"""When a service's job could next do something (its clock's time), None if nothing waits."""


class ParticipantFactory(Protocol):
    """Builds a service's participant on its store (for services that need more than
    handlers registered with decorators, e.g. a client of an external system)."""

    def __call__(self, store: SQLStore, ctx: AppContext) -> Participant:
        """The participant named like the service, on ``store``."""
        ...


class Service:
    """A participant endpoint of an app: handlers, business-table migrations, jobs.

    Register handlers with :meth:`handles` and :meth:`on_event` (the ``(tx, env)``
    handlers of :class:`~sagakit.runtime.participant.Participant`); ``migrations`` are
    SQL scripts applied once each, in order, to the service's store before it handles
    anything (append new ones, never edit applied ones), recorded under ``namespace``
    (default: the service's name), or a mapping namespace -> scripts for several
    independent sets. ``build`` replaces the plain participant by one of your own
    making (handlers registered here are added to it).
    """

    def __init__(
        self,
        name: str,
        *,
        migrations: Sequence[str] | Mapping[str, Sequence[str]] = (),
        namespace: str | None = None,
        build: ParticipantFactory | None = None,
        subscribes: Sequence[str] = (),
        schemas: MessageSchemas | None = None,
    ) -> None:
        if not _ENDPOINT.match(name) or name in _RESERVED:
            raise ConfigurationError(
                f"service name {name!r} must be lower case letters, digits, '_' or '-', "
                "start with a letter, and not be 'orchestrator'"
            )
        self.name = name
        if isinstance(migrations, str):
            raise ConfigurationError(
                f"service {name!r}: migrations must be a list of SQL scripts, not one string"
            )
        if isinstance(migrations, Mapping):
            if namespace is not None:
                raise ConfigurationError(
                    f"service {name!r}: give namespace= or a mapping of namespaces, not both"
                )
            self.migrations = {ns: list(steps) for ns, steps in migrations.items()}
        else:
            self.migrations = {namespace or name: list(migrations)}
        """Namespace (in ``schema_migrations``) -> the SQL scripts recorded under it."""
        self.build = build
        self.schemas = schemas
        self._handlers: list[tuple[str, Handler, bool]] = []
        self._subscribes = set(subscribes)
        self.jobs: list[tuple[float, str, Job]] = []
        self.job_due: dict[str, JobDue] = {}
        """Job name -> when it could next do something (see :meth:`every`)."""
        self._built: Participant | None = None

    def __repr__(self) -> str:
        return f"Service({self.name!r})"

    def handles(self, message_type: str) -> Callable[[Handler], Handler]:
        """Decorator: the handler of a command, compensation or status query type."""

        def register(fn: Handler) -> Handler:
            self._add(message_type, fn, event=False)
            return fn

        return register

    def on_event(self, event_type: str) -> Callable[[Handler], Handler]:
        """Decorator: react to the event ``event_type`` (choreography)."""

        def register(fn: Handler) -> Handler:
            self._add(event_type, fn, event=True)
            self._subscribes.add(event_type)
            return fn

        return register

    def every(
        self, seconds: float, name: str, *, due: JobDue | None = None
    ) -> Callable[[Job], Job]:
        """Decorator: run ``job(store)`` every ``seconds`` in the service's process.

        ``due(store)``: when the job could next do something (e.g. the earliest expiry
        of a hold a sweeper releases), None when nothing waits. The simulator and the
        testing kit then run the job exactly at that time on their virtual clock,
        instead of every ``seconds`` (which, over hours of virtual time, is many runs
        that find nothing). Jobs read the time with :func:`sagakit.now`.
        """
        if not seconds > 0:
            raise ConfigurationError(f"job {name!r} of {self.name}: interval must be > 0 seconds")
        if any(n == name for _, n, _ in self.jobs):
            raise ConfigurationError(f"{self.name}: a job named {name!r} already exists")

        def register(fn: Job) -> Job:
            self.jobs.append((seconds, name, fn))
            if due is not None:
                self.job_due[name] = due
            return fn

        return register

    def _add(self, message_type: str, fn: Handler, *, event: bool) -> None:
        if any(t == message_type for t, _, _ in self._handlers):
            raise ConfigurationError(f"{self.name}: {message_type!r} already has a handler")
        self._handlers.append((message_type, fn, event))

    @property
    def message_types(self) -> list[str]:
        """The types registered with :meth:`handles` and :meth:`on_event`."""
        return sorted(t for t, _, _ in self._handlers)

    @property
    def subscriptions(self) -> set[str]:
        """The event types this service reacts to (the relays fan events out by them)."""
        return set(self._subscribes)

    def participant(self, store: SQLStore, ctx: AppContext) -> Participant:
        """The service's participant on ``store`` (not opened)."""
        if self.build is not None:
            p = self.build(store, ctx)
            if p.name != self.name:
                raise ConfigurationError(
                    f"service {self.name!r}: its build function returned participant {p.name!r}"
                )
        else:
            p = Participant(self.name, store, schemas=self.schemas)
        for message_type, fn, event in self._handlers:
            if event:
                p.on_event(message_type)(fn)
            else:
                p.add_handler(message_type, fn)
        p.subscriptions |= self._subscribes
        self._built = p
        return p

    async def emit(
        self,
        tx: Tx,
        event_type: str,
        payload: Mapping[str, Any],
        *,
        now: float,
        cause: Envelope | None = None,
        correlation_id: str | None = None,
        business_key: str | None = None,
        version: int | None = None,
    ) -> Envelope:
        """From a handler: write the event ``event_type`` to the outbox in ``tx``, as
        :meth:`Participant.emit <sagakit.runtime.participant.Participant.emit>` does
        (pass the message being handled as ``cause`` to continue its trace)."""
        if self._built is None:
            raise ConfigurationError(
                f"service {self.name!r} emits before its participant was built: emit from "
                "its handlers, which run once a process built it"
            )
        return await self._built.emit(
            tx,
            event_type,
            payload,
            cause=cause,
            correlation_id=correlation_id,
            business_key=business_key,
            version=version,
            now=now,
        )

    async def answer(
        self, tx: Tx | object, command: Envelope, result: Outcome | Mapping[str, Any], now: float
    ) -> bool:
        """Answer a command whose handler returned :data:`~sagakit.runtime.participant.DEFER`
        (a human step: a driver accepts, a person approves), from a handler or a job of
        this service, as :meth:`Participant.answer
        <sagakit.runtime.participant.Participant.answer>` does. Keep the command as
        ``command.to_json()`` in your table when you defer it, and pass
        ``Envelope.from_json(...)`` here. False when it already has an answer (or a
        compensation came first)."""
        if self._built is None:
            raise ConfigurationError(
                f"service {self.name!r} answers before its participant was built: answer "
                "from its handlers or jobs, which run once a process built it"
            )
        return await self._built.answer(tx, command, result, now)

    async def migrate(self, store: SQLStore) -> None:
        """Apply the service's migrations to ``store`` (open); applied ones are skipped."""
        for namespace, steps in self.migrations.items():
            if steps:
                await store.apply_migrations(namespace, steps)
