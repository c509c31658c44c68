"""Apps: the one object a team writes, and that every sagakit process loads.

An :class:`App` holds a team's saga definitions (every version still in flight), its
services (participant endpoints with their handlers, business-table migrations and
periodic jobs), its options, and a name from which the default schema, stream and
queue-prefix names derive, so two apps on one PostgreSQL or broker never collide::

    app = App("travel", [trip_v1, trip_v2])
    hotel = app.service("hotel", migrations=["CREATE TABLE bookings (...)"])

    @hotel.handles("BookHotel")
    async def book_hotel(tx, env): ...

Every process command loads it by ``--app module:attribute`` (:func:`load_app`), the
way uvicorn or Celery load theirs::

    sagakit worker  --app travel.app:app --store postgresql://... --broker nats://...
    sagakit service hotel --app travel.app:app --store ... --broker ...

:class:`~sagakit.deployment.Deployment` turns an app and the URLs into the stores and
engines of each process role.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from sagakit.core.definition import SagaDefinition
from sagakit.core.instance import SagaInstance
from sagakit.errors import ConfigurationError, DefinitionError
from sagakit.service import Service

if TYPE_CHECKING:
    from sagakit.deployment import Deployment

__all__ = [
    "APP_COMMANDS",
    "App",
    "AppContext",
    "AppOption",
    "Invariants",
    "LoadDriver",
    "Service",
    "Setup",
    "StartRequest",
    "Watch",
    "load_app",
]

APP_COMMANDS = ("worker", "relay", "service", "serve", "demo", "versions")
"""The ``sagakit`` commands that load an app (``--app``)."""

_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")

StartRequest: TypeAlias = tuple[str, str, Mapping[str, Any]]
"""``(definition name, business key, data)``: one saga to start."""

LoadDriver: TypeAlias = Callable[[int, int], Sequence[StartRequest]]
"""``load(count, seed)``: the sagas ``sagakit demo --app`` starts (same seed, same list)."""

Invariants: TypeAlias = Callable[["Deployment"], Awaitable[Sequence[str]]]
"""Checks of an app's own ledgers after a run: one message per broken invariant."""

Watch: TypeAlias = Callable[["Deployment"], Awaitable[Sequence[str]]]
"""Checks that hold at every moment of a run, not only at its end (``App(watch=...)``).

``sagakit simulate`` calls them after every step of the scheduler (nothing moves
while they read); ``sagakit demo`` every fraction of a second while the services run,
so a check must hold whatever commits between two of its reads: read each store in
one ``async with store.snapshot() as tx`` (one state of that database; a plain
transaction on PostgreSQL is READ COMMITTED, where two SELECTs may see different
commits), and read a downstream ledger before the upstream one it follows (what the
downstream shows already happened upstream)."""

Setup: TypeAlias = Callable[["Deployment"], Awaitable[object]]
"""Prepares a demo run once the stores are open (seed reference data, idempotently)."""


@dataclass(frozen=True, slots=True)
class AppOption:
    """A command-line option an app adds to its process commands.

    ``sagakit worker --app x:app --NAME VALUE`` (or the environment variable ``env``)
    puts ``type(VALUE)`` into ``AppContext.options[name]``; the flag is ``name`` with
    dashes (``command_timeout`` -> ``--command-timeout``). ``commands`` limits it to
    some of :data:`APP_COMMANDS`.
    """

    name: str
    help: str
    env: str | None = None
    default: Any = None
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    commands: frozenset[str] = frozenset(APP_COMMANDS)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ConfigurationError(f"app option {self.name!r} must be a Python identifier")
        unknown = set(self.commands) - set(APP_COMMANDS)
        if unknown:
            raise ConfigurationError(
                f"app option {self.name!r}: unknown commands {sorted(unknown)}; "
                f"choose from {list(APP_COMMANDS)}"
            )

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--command-timeout``."""
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True, slots=True)
class AppContext:
    """What a process knows when it builds an app's parts: its URLs and options."""

    app: App
    store_url: str | None = None
    broker_url: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    data_dir: Path | None = None
    """A directory for the process's own files (``sagakit serve --data-dir``, the
    directory of a ``sqlite:///DIR`` store URL), or None."""

    def option(self, name: str) -> Any:
        """The value of the app option ``name`` (its default when not given)."""
        if name not in self.options:
            declared = sorted(o.name for o in self.app.options)
            raise ConfigurationError(
                f"app {self.app.name!r} has no option {name!r}; it declares {declared}"
            )
        return self.options[name]


DefinitionsFactory: TypeAlias = Callable[[AppContext], Sequence[SagaDefinition]]


class App:
    """A team's sagas and services, under one name. See the module docstring.

    ``definitions``: every version still in flight (a list), or a function of the
    :class:`AppContext` building them (e.g. timeouts from an app option).
    ``canary``: definition name -> share (0..1) of new sagas started on its latest
    version, the rest on the version before (chosen by a stable hash of the business
    key). ``load``, ``setup``, ``invariants`` and ``watch`` drive ``sagakit demo --app``
    and ``sagakit simulate --app``: the sagas to start, the reference data, the checks
    of the app's own ledgers at the end of a run, and those that hold at every moment
    (:data:`Watch`).
    ``demo`` and ``serve`` replace those commands' generic behaviour for this app.
    """

    def __init__(
        self,
        name: str,
        definitions: Sequence[SagaDefinition] | DefinitionsFactory = (),
        *,
        services: Sequence[Service] = (),
        options: Sequence[AppOption] = (),
        canary: Mapping[str, float] | None = None,
        load: LoadDriver | None = None,
        setup: Setup | None = None,
        invariants: Invariants | None = None,
        watch: Watch | None = None,
        description: str = "",
        demo: Callable[..., Any] | None = None,
        serve: Callable[..., Any] | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(
                f"app name {name!r} must be 1-40 lower case letters, digits or '_', starting "
                "with a letter (it names schemas, streams and queues)"
            )
        self.name = name
        self.description = description
        self._factory: DefinitionsFactory | None = None
        self._definitions: list[SagaDefinition] = []
        if callable(definitions):
            self._factory = definitions
        else:
            for d in definitions:
                self.saga(d)
        self._services: dict[str, Service] = {}
        for s in services:
            self.add_service(s)
        self.options: list[AppOption] = []
        for o in options:
            self.add_option(o)
        self.canary = dict(canary or {})
        for share in self.canary.values():
            if not 0 < share < 1:
                raise ConfigurationError(f"canary shares must be between 0 and 1, got {share}")
        self.load = load
        self.setup = setup
        self.invariants = invariants
        self.watch = watch
        self.demo = demo
        self.serve = serve

    def __repr__(self) -> str:
        return f"App({self.name!r}, services={list(self._services)})"

    # -- declaring ----------------------------------------------------------------------
    def saga(self, definition: SagaDefinition) -> SagaDefinition:
        """Add a saga definition (each name@version once); returns it."""
        if self._factory is not None:
            raise ConfigurationError(
                f"app {self.name!r} builds its definitions with a function; add them there"
            )
        if not isinstance(definition, SagaDefinition):
            raise ConfigurationError(
                f"app {self.name!r}: expected a SagaDefinition, got {type(definition).__name__}"
            )
        if any(d.key == definition.key for d in self._definitions):
            raise DefinitionError(f"app {self.name!r} has saga {definition.key} twice")
        self._definitions.append(definition)
        return definition

    def service(self, name: str, **kwargs: Any) -> Service:
        """Declare the service ``name`` (see :class:`Service` for the arguments)."""
        return self.add_service(Service(name, **kwargs))

    def add_service(self, service: Service) -> Service:
        """Add a :class:`Service` built elsewhere; returns it."""
        if service.name in self._services:
            raise ConfigurationError(f"app {self.name!r} has two services named {service.name!r}")
        self._services[service.name] = service
        return service

    def add_option(self, option: AppOption) -> AppOption:
        """Add an :class:`AppOption`; returns it."""
        if any(o.name == option.name for o in self.options):
            raise ConfigurationError(f"app {self.name!r} declares option {option.name!r} twice")
        self.options.append(option)
        return option

    # -- reading ------------------------------------------------------------------------
    def definitions(self, ctx: AppContext | None = None) -> list[SagaDefinition]:
        """The app's saga definitions (built from ``ctx`` when the app has a factory)."""
        if self._factory is None:
            return list(self._definitions)
        built = list(self._factory(ctx or self.context()))
        for d in built:
            if not isinstance(d, SagaDefinition):
                raise ConfigurationError(
                    f"app {self.name!r}: its definitions function returned "
                    f"{type(d).__name__}, not SagaDefinition"
                )
        return built

    @property
    def services(self) -> Mapping[str, Service]:
        """The services by name."""
        return dict(self._services)

    @property
    def store_names(self) -> list[str]:
        """Every store of a deployment: ``orchestrator`` and one per service."""
        return ["orchestrator", *self._services]

    @property
    def endpoints(self) -> list[str]:
        """Every endpoint a broker must serve: the orchestrator's two and the services'."""
        return ["orchestrator", "orchestrator.local", *self._services]

    def event_routes(self) -> dict[str, list[str]]:
        """Event type -> the services that react to it (what a relay fans out by)."""
        routes: dict[str, list[str]] = {}
        for s in self._services.values():
            for event_type in sorted(s.subscriptions):
                routes.setdefault(event_type, []).append(s.name)
        return routes

    def get_service(self, name: str) -> Service:
        """The service ``name``; a clear error naming the app's services otherwise."""
        try:
            return self._services[name]
        except KeyError:
            raise ConfigurationError(
                f"app {self.name!r} has no service {name!r}; its services: "
                f"{', '.join(self._services) or '(none)'}"
            ) from None

    # -- starting sagas in your own transaction ------------------------------------------
    def start(
        self,
        conn: object,
        definition: str,
        business_key: str,
        data: Mapping[str, Any] | None = None,
        *,
        prefix: str | None = None,
        version: int | None = None,
    ) -> SagaInstance:
        """Start a saga in YOUR transaction on ``conn``, in a process that runs no engine.

        For a sync web process (Flask, Django, a sync FastAPI route): ``conn`` is a
        ``sqlite3.Connection`` on the app's ``orchestrator.db``, a psycopg
        ``Connection`` or a SQLAlchemy ``Connection``/``Session`` on the deployment's
        database. The saga's rows join your transaction: commit it and the relays
        publish its first commands (the workers drive the rest); roll it back and no
        saga exists. Idempotent by business key; the definition's personal-data rules
        apply before anything is written (:class:`~sagakit.errors.PersonalDataRefused`,
        see :mod:`sagakit.core.personal`). ``prefix``: the deployment's schema
        prefix on PostgreSQL (default: the app's name). No event loop is needed; for an
        async connection use :meth:`start_async`. See :mod:`sagakit.runtime.own_tx`.
        """
        from sagakit.runtime.own_tx import run_sync

        return run_sync(
            self.start_async(
                conn, definition, business_key, data, prefix=prefix, version=version, sync=True
            ),
            "App.start",
        )

    async def start_async(
        self,
        conn: object,
        definition: str,
        business_key: str,
        data: Mapping[str, Any] | None = None,
        *,
        prefix: str | None = None,
        version: int | None = None,
        sync: bool = False,
    ) -> SagaInstance:
        """:meth:`start` for async connections (psycopg ``AsyncConnection``, SQLAlchemy
        ``AsyncConnection``/``AsyncSession``); sync ones work too. (``sync``: called
        from :meth:`start`, which drives it without an event loop.)"""
        from sagakit.runtime.own_tx import refuse_async, start_in

        if sync:
            refuse_async(conn, "App.start", "await app.start_async(...)")
        (inst,) = await start_in(
            conn,
            self.definitions(),
            [(definition, business_key, dict(data or {}))],
            schema=f"{prefix or self.name}_orchestrator",
            canary=self.canary or None,
            version=version,
        )
        return inst

    def context(
        self,
        *,
        store_url: str | None = None,
        broker_url: str | None = None,
        options: Mapping[str, Any] | None = None,
        data_dir: Path | None = None,
    ) -> AppContext:
        """An :class:`AppContext` with every option given a value: from ``options``,
        else the option's environment variable, else its default."""
        given = dict(options or {})
        unknown = set(given) - {o.name for o in self.options}
        if unknown:
            raise ConfigurationError(
                f"app {self.name!r} has no option(s) {sorted(unknown)}; it declares "
                f"{sorted(o.name for o in self.options)}"
            )
        values: dict[str, Any] = {}
        for o in self.options:
            if given.get(o.name) is not None:
                values[o.name] = given[o.name]
            elif o.env and os.environ.get(o.env):
                try:
                    values[o.name] = o.type(os.environ[o.env])
                except (TypeError, ValueError) as exc:
                    raise ConfigurationError(f"{o.env}={os.environ[o.env]!r}: {exc}") from None
            else:
                values[o.name] = o.default
        return AppContext(self, store_url, broker_url, values, data_dir)


def load_app(spec: str) -> App:
    """The :class:`App` named by ``module:attribute`` (an App, or a function returning one).

    Raises :class:`~sagakit.errors.ConfigurationError` with a one-line message when the
    module cannot be imported, the attribute is missing, or it is not an app.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(
            f"--app {spec!r}: expected module:attribute, e.g. myproject.sagas:app"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigurationError(
                f"--app {spec!r}: no module named {module_name!r} (is its directory on PYTHONPATH?)"
            ) from None
        raise ConfigurationError(f"--app {spec!r}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:
        raise ConfigurationError(
            f"--app {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                f"--app {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not isinstance(target, App) and callable(target) and not isinstance(target, type):
        # A factory: called with no arguments (uvicorn's --factory, Celery's app loaders).
        try:
            inspect.signature(target).bind()
        except TypeError:
            raise ConfigurationError(
                f"--app {spec!r} is a function that needs arguments, not a sagakit.App "
                "(or a function of no arguments returning one)"
            ) from None
        except ValueError:
            pass  # no signature to check (a builtin): just call it
        try:
            target = target()
        except Exception as exc:
            raise ConfigurationError(
                f"--app {spec!r}: calling {attr}() failed: {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(target, App):
        raise ConfigurationError(f"--app {spec!r} is a {type(target).__name__}, not a sagakit.App")
    return target
