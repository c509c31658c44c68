"""Alerts end to end: sagas and dead letters posted to a real HTTP receiver.

The receiver is a ``ThreadingHTTPServer`` on 127.0.0.1 started by each test; it can
refuse the first posts (500) to exercise the notifier's retries, and records every
post with its headers so the tests can count alerts per dedup key.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sagakit import SagaDefinition, SagaState, Step, StepContext, StepFailed, StepKind, embedded
from sagakit.errors import ConfigurationError
from sagakit.metrics import ALERT_DELIVERIES
from sagakit.runtime.alerts import ALERTS_ENDPOINT, AlertSettings, Webhook
from sagakit.runtime.engine import Engine

PG_DSN = os.environ.get("SAGAKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass
class Receiver:
    """What the test's webhook receiver got: (status it answered, headers, body)."""

    fail_first: int = 0
    always_fail: bool = False
    posts: list[tuple[int, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def answer(self, headers: dict[str, str], body: dict[str, Any]) -> int:
        with self.lock:
            failed = sum(1 for status, _, _ in self.posts if status >= 500)
            status = 500 if self.always_fail or failed < self.fail_first else 200
            self.posts.append((status, headers, body))
            return status

    def accepted(self) -> dict[str, list[dict[str, Any]]]:
        """The bodies a receiver kept, by ``Idempotency-Key``: repeats land on one key."""
        with self.lock:
            out: dict[str, list[dict[str, Any]]] = {}
            for status, headers, body in self.posts:
                if status == 200:
                    out.setdefault(headers["Idempotency-Key"], []).append(body)
            return out


@contextmanager
def receiver(**kw: Any) -> Iterator[Receiver]:
    rec = Receiver(**kw)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(length))
            status = rec.answer(dict(self.headers.items()), body)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok" if status == 200 else b"no")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


def shipping() -> SagaDefinition:
    """Charged (the pivot), then a carrier that refuses: a person must decide."""

    def charge(ctx: StepContext) -> dict[str, Any]:
        return {"charged": ctx.data["price"]}

    def ship(ctx: StepContext) -> dict[str, Any]:
        raise StepFailed("carrier refused the parcel")

    return SagaDefinition(
        "parcel",
        steps=[
            Step("charge", charge, kind=StepKind.PIVOT),
            Step("ship", ship, kind=StepKind.RETRIABLE),
        ],
    )


def slow_booking() -> SagaDefinition:
    """A step slower than the saga's deadline, before the pivot: the saga times out."""

    async def book(ctx: StepContext) -> dict[str, Any]:
        await asyncio.sleep(5)
        return {}

    return SagaDefinition("booking", steps=[Step("book", book)], deadline=0.2)


def settings(rec: Receiver, **kw: Any) -> AlertSettings:
    hook = Webhook(rec.url, format=kw.pop("format", "sagakit"), name="ops")
    kw.setdefault("initial_backoff", 0.05)
    kw.setdefault("max_backoff", 0.2)
    kw.setdefault("poll", 0.05)
    return AlertSettings([hook], console_url="https://ops.example.com", **kw)


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def quiet(engine: Engine) -> bool:
    """No alert left to post in the engine's stores."""
    for store in engine.stores:
        if await store.queue_depth(ALERTS_ENDPOINT) + await store.queue_depth(
            f"{ALERTS_ENDPOINT}.ops"
        ):
            return False
    return True


async def test_a_receiver_failing_twice_gets_exactly_one_alert_per_case(tmp_path: Path) -> None:
    with receiver(fail_first=2) as rec:
        before = ALERT_DELIVERIES.value("ops", "failed")
        alerts = settings(rec)
        async with embedded(tmp_path / "a.db", [shipping()], alerts=alerts) as engine:
            ids = []
            for n in range(3):
                inst = await engine.start("parcel", f"p-{n}", {"price": 10 + n})
                done = await engine.wait(inst.saga_id, timeout=10)
                assert done.state is SagaState.FAILED_NEEDS_MANUAL
                ids.append(done.saga_id)

            async def all_in() -> bool:
                return len(rec.accepted()) == 3 and await quiet(engine)

            await until(all_in)
            # The metric of the oldest case's age is served with the others.
            from sagakit.api.health import Metrics

            text = await Metrics(engine).text()
            age = next(
                float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("sagakit_manual_oldest_age_seconds ")
            )
            assert age >= 0
            oldest = await engine.store.oldest_update([SagaState.FAILED_NEEDS_MANUAL])
            first = await engine.get(ids[0])
            assert oldest == first.updated_at

        accepted = rec.accepted()
        assert all(len(bodies) == 1 for bodies in accepted.values()), accepted
        assert [status for status, _, _ in rec.posts].count(500) == 2
        assert len(rec.posts) == 5  # two refused, then one each: retried, never lost
        assert ALERT_DELIVERIES.value("ops", "failed") - before == 2
        by_saga = {bodies[0]["saga_id"]: (key, bodies[0]) for key, bodies in accepted.items()}
        assert sorted(by_saga) == sorted(ids)
        key, body = by_saga[ids[0]]
        assert key == body["key"] == f"saga:{ids[0]}:FAILED_NEEDS_MANUAL:{body['version']}"
        assert body["kind"] == "saga"
        assert body["definition"] == "parcel"
        assert body["state"] == "FAILED_NEEDS_MANUAL"
        assert body["step"] == "ship"
        assert "carrier refused the parcel" in body["reason"]
        assert body["link"] == f"https://ops.example.com/console/sagas/{ids[0]}"
        assert body["at_iso"].endswith("Z")
        assert "data" not in body and "business_key" not in body  # no business data


async def test_a_receiver_that_always_fails_ends_with_a_dead_letter(tmp_path: Path) -> None:
    with receiver(always_fail=True) as rec:
        alerts = settings(rec, max_attempts=3)
        async with embedded(tmp_path / "b.db", [shipping()], alerts=alerts) as engine:
            inst = await engine.start("parcel", "p-dead", {"price": 5})
            await engine.wait(inst.saga_id, timeout=10)

            async def parked() -> bool:
                return bool(await engine.store.dead_letters(f"{ALERTS_ENDPOINT}.ops"))

            await until(parked)
            (letter,) = await engine.store.dead_letters(f"{ALERTS_ENDPOINT}.ops")
            assert letter.open
            assert letter.message_id == json.loads(letter.body)["key"]
            assert letter.reason.startswith("webhook ops failed 3 attempts; last: HTTP 500")
            await asyncio.sleep(0.3)  # a few more passes: the alerts' dead letter raises none
            assert await quiet(engine)
            assert len(rec.posts) == 3
            assert {h["Idempotency-Key"] for _, h, _ in rec.posts} == {letter.message_id}

            # The receiver is fixed: a person replays the parked alert, and it is posted.
            rec.always_fail = False
            settled = await engine.dead_letters.replay(
                engine.store.name, letter.id, actor="ops:alice", reason="receiver fixed"
            )
            assert settled.letter.settlement == "replayed"

            async def delivered() -> bool:
                return len(rec.accepted()) == 1 and await quiet(engine)

            await until(delivered)
        assert list(rec.accepted()) == [letter.message_id]


async def test_each_webhook_is_retried_and_parked_on_its_own(tmp_path: Path) -> None:
    with receiver() as up, receiver(always_fail=True) as down:
        alerts = AlertSettings(
            [Webhook(up.url, name="ops"), Webhook(down.url, name="pager", format="alertmanager")],
            max_attempts=2,
            initial_backoff=0.05,
            max_backoff=0.1,
            poll=0.05,
        )
        async with embedded(tmp_path / "f.db", [shipping()], alerts=alerts) as engine:
            inst = await engine.start("parcel", "p-two", {"price": 1})
            await engine.wait(inst.saga_id, timeout=10)

            async def settled() -> bool:
                parked = await engine.store.dead_letters(f"{ALERTS_ENDPOINT}.pager")
                return bool(parked) and len(up.accepted()) == 1 and await quiet(engine)

            await until(settled)
            assert await engine.store.queue_depth() == 0
        assert len(up.posts) == 1  # the receiver that works got it at once
        assert len(down.posts) == 2
        assert down.posts[0][2]["alerts"][0]["labels"]["saga_id"] == inst.saga_id


async def test_alertmanager_payloads_for_a_timeout_and_a_dead_letter(tmp_path: Path) -> None:
    with receiver() as rec:
        alerts = settings(rec, format="alertmanager")
        async with embedded(tmp_path / "c.db", [slow_booking()], alerts=alerts) as engine:
            inst = await engine.start("booking", "b-1", {})
            done = await engine.wait(inst.saga_id, timeout=10)
            assert done.state is SagaState.TIMED_OUT
            # A malformed message: the orchestrator's consumer parks it.
            await engine.store.queue_push("orchestrator", ["not a message"], time.time())

            async def both() -> bool:
                return len(rec.accepted()) == 2 and await quiet(engine)

            await until(both)
            (letter,) = await engine.store.dead_letters("orchestrator")
        docs = {b[0]["alerts"][0]["labels"]["alertname"]: b[0] for b in rec.accepted().values()}
        assert set(docs) == {"SagakitSagaTimedOut", "SagakitDeadLetter"}
        for key, bodies in rec.accepted().items():
            doc = bodies[0]
            assert doc["version"] == "4" and doc["status"] == "firing"
            assert doc["receiver"] == "ops"
            assert doc["groupKey"].startswith("{}:")
            (alert,) = doc["alerts"]
            assert alert["status"] == "firing"
            assert alert["labels"]["dedup_key"] == key
            assert alert["startsAt"].endswith("Z") and alert["endsAt"].startswith("0001-")
            assert set(alert["annotations"]) == {"summary", "description"}
        timed = docs["SagakitSagaTimedOut"]["alerts"][0]
        assert timed["labels"]["saga_id"] == done.saga_id
        assert timed["labels"]["state"] == "TIMED_OUT"
        assert timed["generatorURL"] == f"https://ops.example.com/console/sagas/{done.saga_id}"
        dead = docs["SagakitDeadLetter"]["alerts"][0]
        assert dead["labels"]["dedup_key"] == f"dead-letter:orchestrator:{letter.id}"
        assert dead["labels"]["endpoint"] == "orchestrator"
        assert "malformed message" in dead["annotations"]["description"]


async def test_an_alert_written_before_a_stop_is_delivered_after_the_restart(
    tmp_path: Path,
) -> None:
    with receiver() as rec:
        alerts = settings(rec)
        # No relays role: nothing posts, the alert waits in the store's mailbox.
        async with embedded(
            tmp_path / "d.db", [shipping()], alerts=alerts, roles={"orchestrator", "timers"}
        ) as engine:
            assert engine.notifier is None
            inst = await engine.start("parcel", "p-restart", {"price": 7})
            await engine.wait(inst.saga_id, timeout=10)
            assert await engine.store.queue_depth(ALERTS_ENDPOINT) == 1
        assert rec.posts == []
        async with embedded(tmp_path / "d.db", [shipping()], alerts=alerts) as engine:

            async def delivered() -> bool:
                return len(rec.accepted()) == 1 and await quiet(engine)

            await until(delivered)
        (bodies,) = rec.accepted().values()
        assert bodies[0]["saga_id"] == inst.saga_id


async def test_dead_letters_are_alerted_once_across_restarts(tmp_path: Path) -> None:
    with receiver() as rec:
        alerts = settings(rec)
        for run in range(2):
            async with embedded(tmp_path / "e.db", [shipping()], alerts=alerts) as engine:
                if run == 0:
                    await engine.store.queue_push("orchestrator", ["{broken"], time.time())

                async def done() -> bool:
                    return len(rec.accepted()) == 1 and await quiet(engine)

                await until(done)
                await asyncio.sleep(0.2)  # more sweeps: the record keeps it from a repeat
        assert len(rec.posts) == 1


def test_bad_alert_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="http:// or https://"):
        Webhook("ftp://example.com/hook")
    with pytest.raises(ConfigurationError, match="format 'pagerduty' is unknown"):
        Webhook("https://example.com/hook", format="pagerduty")
    with pytest.raises(ConfigurationError, match="at least one webhook"):
        AlertSettings([])
    with pytest.raises(ConfigurationError, match="share a name"):
        AlertSettings([Webhook("http://a/x", name="x"), Webhook("http://b/y", name="x")])
    hook = Webhook("https://user:secret@example.com/hook?token=abc")
    assert "secret" not in repr(hook) and "abc" not in repr(hook)
    assert hook.name.startswith("hook-")


@pytest.mark.postgres
async def test_alerts_on_postgresql() -> None:
    """The alert row commits with the saga's transition on PostgreSQL too."""
    psycopg = pytest.importorskip("psycopg")
    from sagakit.stores.postgres import PostgresStore

    schema = f"sagakit_test_{uuid.uuid4().hex[:12]}"
    store = PostgresStore(PG_DSN, schema=schema, name="orchestrator")
    try:
        with receiver() as rec:
            engine = Engine(store, [shipping()], alerts=settings(rec))
            async with engine:
                inst = await engine.start("parcel", "p-pg", {"price": 3})
                await engine.wait(inst.saga_id, timeout=10)

                async def delivered() -> bool:
                    return len(rec.accepted()) == 1 and await quiet(engine)

                await until(delivered)
                assert (
                    await store.oldest_update([SagaState.FAILED_NEEDS_MANUAL])
                    == (await engine.get(inst.saga_id)).updated_at
                )
            (bodies,) = rec.accepted().values()
            assert bodies[0]["saga_id"] == inst.saga_id
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as pg:
            pg.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_a_choreography_view_escalated_to_a_person_raises_one_alert(tmp_path: Path) -> None:
    """The tracker writes the alert in the transaction that escalates the view: for a
    fact that needs a person, and for a view stuck past its SLA."""
    from sagakit_checkout.choreography import tracked_flow

    from sagakit import Envelope, MessageKind
    from sagakit.runtime.alerts import AlertWriter
    from sagakit.runtime.tracker import Tracker
    from sagakit.stores.sqlite import SQLiteStore

    def fact(type_: str, order: str, n: int, **payload: Any) -> Envelope:
        return Envelope(
            message_id=f"{order}-{n}",
            type=type_,
            version=1,
            kind=MessageKind.EVENT,
            source="test",
            correlation_id=order,
            saga_id=order,
            business_key=order,
            occurred_at=1000.0 + n,
            payload={"order_id": order, **payload},
        )

    store = SQLiteStore(tmp_path / "tracker.db", name="tracker", synchronous="NORMAL")
    clock = [1000.0]
    tracker = Tracker("tracker", store, tracked_flow(sla=60.0), clock=lambda: clock[0])
    tracker.alerts = AlertWriter(store)
    await store.open()
    try:
        facts = [
            fact("OrderCreated", "o-1", 0),
            fact("OrderCreated", "o-2", 0),
            fact("PaymentAuthorized", "o-2", 1),
            fact("PaymentReleaseFailed", "o-2", 2, reason="void refused"),
            fact("PaymentReleaseFailed", "o-2", 3, reason="void refused again"),  # already there
        ]
        for ev in facts:
            async with store.transaction() as tx:
                await tracker.observe(tx, await tx.saga_get(ev.correlation_id), ev)
        clock[0] = 1100.0
        assert await tracker.check_stuck() == 1  # o-1: no progress for 100 s
        queued = await store.queue_fetch(ALERTS_ENDPOINT, 10, clock[0], 5.0)
        alerts = [json.loads(m.body) for m in queued]
        assert [(a["saga_id"], a["state"]) for a in alerts] == [
            ("o-2", "FAILED_NEEDS_MANUAL"),
            ("o-1", "FAILED_NEEDS_MANUAL"),
        ]
        assert "void refused" in alerts[0]["reason"]
        assert "stuck" in alerts[1]["reason"]
        assert len({a["key"] for a in alerts}) == 2
    finally:
        await store.close()
