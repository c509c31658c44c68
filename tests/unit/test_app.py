"""The app object: declaring sagas, services and options, loading by ``module:attribute``,
and where a deployment puts each store."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sagakit import App, AppOption, Deployment, SagaDefinition, Service, Step, load_app
from sagakit.errors import ConfigurationError, DefinitionError
from sagakit.stores.postgres import PostgresStore
from sagakit.stores.sqlite import SQLiteStore


def trip(version: int = 1) -> SagaDefinition:
    return SagaDefinition("trip", version=version, steps=[Step("flight", lambda ctx: None)])


def test_an_app_holds_every_version_and_its_services() -> None:
    app = App("travel", [trip(1), trip(2)])
    hotel = app.service("hotel", migrations=["CREATE TABLE bookings (trip TEXT)"])
    assert [d.key for d in app.definitions()] == ["trip@1", "trip@2"]
    assert app.services == {"hotel": hotel}
    assert app.store_names == ["orchestrator", "hotel"]
    assert app.endpoints == ["orchestrator", "orchestrator.local", "hotel"]
    assert hotel.migrations == {"hotel": ["CREATE TABLE bookings (trip TEXT)"]}


@pytest.mark.parametrize("name", ["", "Travel", "9lives", "a-b", "x" * 41, "with space"])
def test_app_names_are_safe_for_schemas_streams_and_queues(name: str) -> None:
    with pytest.raises(ConfigurationError, match="app name"):
        App(name)


@pytest.mark.parametrize("name", ["orchestrator", "Hotel", "", "a b", "a.local"])
def test_service_names_are_endpoint_names(name: str) -> None:
    with pytest.raises(ConfigurationError, match="service name"):
        Service(name)


def test_duplicates_are_refused() -> None:
    app = App("travel", [trip()])
    with pytest.raises(DefinitionError, match="trip@1 twice"):
        app.saga(trip())
    app.service("hotel")
    with pytest.raises(ConfigurationError, match="two services named 'hotel'"):
        app.service("hotel")
    hotel = app.services["hotel"]

    @hotel.handles("BookHotel")
    def book(tx: object, env: object) -> None:
        return None

    with pytest.raises(ConfigurationError, match="already has a handler"):
        hotel.handles("BookHotel")(book)
    with pytest.raises(ConfigurationError, match="expected a SagaDefinition"):
        app.saga("trip")  # type: ignore[arg-type]


def test_a_service_builds_its_participant_with_the_handlers_and_events(tmp_path: Path) -> None:
    hotel = Service("hotel", subscribes=["TripCancelled"])

    @hotel.handles("BookHotel")
    async def book(tx: object, env: object) -> dict[str, str]:
        return {}

    @hotel.on_event("FlightDelayed")
    async def delayed(tx: object, env: object) -> None:
        return None

    app = App("travel", services=[hotel])
    p = hotel.participant(SQLiteStore(tmp_path / "hotel.db"), app.context())
    assert p.name == "hotel"
    assert p.message_types == ["BookHotel", "FlightDelayed"]
    assert p.subscriptions == {"FlightDelayed", "TripCancelled"}
    assert app.event_routes() == {"FlightDelayed": ["hotel"], "TripCancelled": ["hotel"]}


def test_a_build_function_must_return_the_service_s_participant(tmp_path: Path) -> None:
    from sagakit import Participant

    wrong = Service("hotel", build=lambda store, ctx: Participant("other", store))
    with pytest.raises(ConfigurationError, match="returned participant 'other'"):
        wrong.participant(SQLiteStore(tmp_path / "h.db"), App("travel").context())


def test_migrations_forms() -> None:
    assert Service("a", migrations=["x"], namespace="ns").migrations == {"ns": ["x"]}
    assert Service("a", migrations={"n1": ["x"], "n2": ["y"]}).migrations == {
        "n1": ["x"],
        "n2": ["y"],
    }
    with pytest.raises(ConfigurationError, match="list of SQL scripts"):
        Service("a", migrations="CREATE TABLE t (x INT)")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not both"):
        Service("a", migrations={"n": ["x"]}, namespace="m")
    with pytest.raises(ConfigurationError, match="interval"):
        Service("a").every(0, "job")


def test_definitions_may_be_built_from_the_context() -> None:
    app = App(
        "travel",
        lambda ctx: [trip(ctx.option("version"))],
        options=[AppOption("version", "the version", type=int, default=3)],
    )
    assert [d.version for d in app.definitions()] == [3]
    assert [d.version for d in app.definitions(app.context(options={"version": 5}))] == [5]
    with pytest.raises(ConfigurationError, match="builds its definitions with a function"):
        app.saga(trip())


def test_options_come_from_the_caller_then_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = App("travel", options=[AppOption("limit", "a number", env="TRAVEL_LIMIT", type=int)])
    assert app.context().options == {"limit": None}
    monkeypatch.setenv("TRAVEL_LIMIT", "7")
    assert app.context().option("limit") == 7
    assert app.context(options={"limit": 9}).option("limit") == 9
    monkeypatch.setenv("TRAVEL_LIMIT", "many")
    with pytest.raises(ConfigurationError, match="TRAVEL_LIMIT='many'"):
        app.context()
    with pytest.raises(ConfigurationError, match=r"no option\(s\) \['other'\]"):
        app.context(options={"other": 1})
    with pytest.raises(ConfigurationError, match="has no option 'other'"):
        app.context(options={"limit": 1}).option("other")


def test_app_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="Python identifier"):
        AppOption("max-size", "x")
    with pytest.raises(ConfigurationError, match="unknown commands"):
        AppOption("size", "x", commands=frozenset({"deploy"}))
    assert AppOption("command_timeout", "x").flag == "--command-timeout"
    with pytest.raises(ConfigurationError, match="twice"):
        App("travel", options=[AppOption("a", "x"), AppOption("a", "y")])
    with pytest.raises(ConfigurationError, match="canary"):
        App("travel", [trip(1), trip(2)], canary={"trip": 1.5})


# -- load_app ---------------------------------------------------------------------------


@pytest.fixture
def on_path(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("ext_app_")]:
            del sys.modules[name]


def test_load_app_takes_an_app_or_a_function_returning_one(on_path: Path) -> None:
    (on_path / "ext_app_ok.py").write_text(
        textwrap.dedent(
            """
            from sagakit import App
            app = App("ext")
            def make():
                return App("made")
            def needs(x):
                return App("never")
            def fails():
                raise KeyError("TRAVEL_DB")
            not_an_app = 42
            """
        )
    )
    assert load_app("ext_app_ok:app").name == "ext"
    assert load_app("ext_app_ok:make").name == "made"
    with pytest.raises(ConfigurationError, match=r"is a int, not a sagakit\.App"):
        load_app("ext_app_ok:not_an_app")
    with pytest.raises(ConfigurationError, match="has no attribute 'nope'"):
        load_app("ext_app_ok:nope")
    with pytest.raises(ConfigurationError, match="a function that needs arguments"):
        load_app("ext_app_ok:needs")
    with pytest.raises(ConfigurationError, match=r"calling fails\(\) failed: KeyError"):
        load_app("ext_app_ok:fails")
    with pytest.raises(ConfigurationError, match="is a type, not"):
        load_app("ext_app_ok:App")


def test_load_app_errors_are_one_line_and_say_what_was_wrong(on_path: Path) -> None:
    (on_path / "ext_app_broken.py").write_text("import not_installed_anywhere_xyz\n")
    (on_path / "ext_app_raises.py").write_text("raise RuntimeError('boom at import')\n")
    cases = {
        "ext_app_missing:app": "no module named 'ext_app_missing'",
        "ext_app_broken:app": "importing ext_app_broken failed",
        "ext_app_raises:app": "RuntimeError: boom at import",
        "ext_app_broken": "expected module:attribute",
        ":app": "expected module:attribute",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigurationError, match=message) as info:
            load_app(spec)
        assert "\n" not in str(info.value)


# -- deployment ---------------------------------------------------------------------------


def test_sqlite_deployment_puts_each_store_in_its_own_file(tmp_path: Path) -> None:
    app = App("travel", [trip()])
    app.service("hotel")
    dep = Deployment(app, f"sqlite:///{tmp_path}?synchronous=NORMAL")
    stores = dep.stores()
    assert list(stores) == ["orchestrator", "hotel"]
    hotel = stores["hotel"]
    assert isinstance(hotel, SQLiteStore)
    assert Path(hotel.path) == (tmp_path / "hotel.db").resolve()
    assert hotel.synchronous == "NORMAL"
    assert dep.store("hotel") is hotel  # built once
    assert dep.ctx.data_dir == tmp_path
    with pytest.raises(ConfigurationError, match="no store 'car'"):
        dep.store("car")


def test_postgres_deployment_gives_each_store_a_schema_named_after_the_app() -> None:
    app = App("travel", [trip()])
    app.service("hotel-eu")
    dep = Deployment(app, "postgresql://postgres@127.0.0.1:5432/test")
    store = dep.store("orchestrator")
    assert isinstance(store, PostgresStore)
    assert store.schema == "travel_orchestrator"
    assert dep.store("hotel-eu").schema == "travel_hotel_eu"  # type: ignore[attr-defined]
    staging = Deployment(app, "postgresql://postgres@127.0.0.1/test?prefix=travel_staging")
    assert staging.store("orchestrator").schema == "travel_staging_orchestrator"  # type: ignore[attr-defined]
    assert "prefix" not in staging.store("orchestrator").dsn  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match=r"\?prefix=NAME, not \?schema="):
        Deployment(app, "postgresql://postgres@127.0.0.1/test?schema=x")
    with pytest.raises(ConfigurationError, match="longer than PostgreSQL"):
        Deployment(app, f"postgresql://h/db?prefix={'p' * 60}").store("orchestrator")


def test_a_deployment_refuses_urls_it_cannot_use(tmp_path: Path) -> None:
    app = App("travel", [trip()])
    with pytest.raises(ConfigurationError, match="not supported"):
        Deployment(app, "mysql://localhost/x")
    with pytest.raises(ConfigurationError, match="has no directory"):
        Deployment(app, "sqlite://")
    with pytest.raises(ConfigurationError, match="needs a broker"):
        Deployment(app, f"sqlite:///{tmp_path}").worker()
    with pytest.raises(ConfigurationError, match=r"needs a sagakit\.App"):
        Deployment("travel", f"sqlite:///{tmp_path}")  # type: ignore[arg-type]


def test_broker_names_derive_from_the_app_name(tmp_path: Path) -> None:
    from sagakit.transports.nats import NatsTransport
    from sagakit.transports.rabbitmq import RabbitMqTransport

    app = App("travel", [trip()])
    app.service("hotel")
    nats = Deployment(app, f"sqlite:///{tmp_path}", "nats://127.0.0.1:4222").transport()
    assert isinstance(nats, NatsTransport) and nats.stream == "travel"
    named = Deployment(app, f"sqlite:///{tmp_path}", "nats://127.0.0.1:4222?stream=t2")
    assert named.transport().stream == "t2"  # type: ignore[attr-defined]
    amqp = Deployment(app, f"sqlite:///{tmp_path}", "amqp://guest:guest@127.0.0.1/").transport()
    assert isinstance(amqp, RabbitMqTransport) and amqp.prefix == "travel"


def test_each_role_gets_its_share(tmp_path: Path) -> None:
    app = App("travel", [trip()])
    app.service("hotel")
    app.service("car")
    dep = Deployment(app, f"sqlite:///{tmp_path}", "nats://127.0.0.1:4222")
    worker = dep.worker()
    assert worker.roles == {"orchestrator", "timers"} and not worker.participants
    assert list(worker.orchestrator.machines) == [("trip", 1)]
    relay = dep.relay(["orchestrator", "hotel"])
    assert relay.roles == {"relays", "housekeeping"}
    assert [s.name for s in relay.stores] == ["orchestrator", "hotel"]
    hotel = dep.service("hotel")
    assert hotel.roles == {"participants"}
    assert [p.name for p in hotel.participants] == ["hotel"]
    with pytest.raises(ConfigurationError, match="no service 'bus'; its services: hotel, car"):
        dep.service("bus")
    api = dep.api()
    assert api.roles == frozenset() and {s.name for s in api.stores} == {
        "orchestrator",
        "hotel",
        "car",
    }
    everything = Deployment(app, f"sqlite:///{tmp_path}").everything()
    assert {p.name for p in everything.participants} == {"hotel", "car"}
