"""The set-aside desk on its own: what it claims, applies, drops and parks."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from sagakit import SagaDefinition, SagaState, Step, StepContext
from sagakit.core.envelope import Envelope, reply_to, success
from sagakit.core.instance import Timer
from sagakit.errors import MessageError, VersionMissing
from sagakit.runtime.orchestrator import Orchestrator
from sagakit.runtime.set_aside import timer_from_json, timer_to_json
from sagakit.stores.memory import MemoryStore


def guide(ctx: StepContext) -> dict[str, str]:
    return {"guide": ctx.business_key}


def tour(version: int) -> SagaDefinition:
    return SagaDefinition("tour", version=version, steps=[Step("guide", guide)])


async def started() -> tuple[Orchestrator, str, Envelope]:
    """An orchestrator with tour@1 and one saga whose local command sits in the outbox."""
    o = Orchestrator(MemoryStore("orchestrator"), [tour(1)])
    await o.store.open()
    inst, _ = await o.start("tour", "t-1")
    ((command, _),) = await o.store.outbox_all()
    return o, inst.saga_id, command


def test_timers_round_trip_and_a_bad_body_is_a_message_error() -> None:
    timer = Timer("s1", "timeout", 12.5, "timeout:0:action:0:1:0")
    assert timer_from_json(timer_to_json(timer)) == timer
    for body in ("garbage", "{}", '{"saga_id": "s", "name": "n", "due_at": "x", "fence": "f"}'):
        with pytest.raises(MessageError, match="not a timer"):
            timer_from_json(body)


async def test_resume_applies_drops_and_parks_what_it_must(
    caplog: pytest.LogCaptureFixture,
) -> None:
    o, saga_id, command = await started()
    ghost = replace(reply_to(command, success({}), source="x", now=1.0), saga_id="ghost")
    poison = replace(command, message_id="m-poison", step="no-such-step")
    stale = Timer(saga_id, "timeout", 1.0, "timeout:0:action:0:9:0")
    async with o.store.transaction() as tx:
        add = tx.set_aside_add
        await add(saga_id, "tour", 1, "local", command.to_json(), now=1.0)  # runs, applies
        await add("ghost", "tour", 1, "reply", ghost.to_json(), now=2.0)  # saga gone: dropped
        await add(saga_id, "tour", 1, "local", poison.to_json(), now=3.0)  # not runnable
        await add(saga_id, "tour", 1, "reply", "garbage", now=4.0)  # unreadable
        await add(saga_id, "tour", 1, "timer", "{}", now=5.0)  # unreadable
        await add(saga_id, "tour", 1, "timer", timer_to_json(stale), now=6.0)  # stale
        await add("other", "tour", 9, "reply", "{}", now=7.0)  # not this process's version

    caplog.set_level(logging.INFO, logger="sagakit")
    assert await o.aside.waiting() == {("tour", 1): 6}
    assert await o.aside.resume() == 6
    assert await o.aside.resume() == 0  # only tour@9 is left, which this process lacks
    assert await o.store.set_aside_counts() == {("tour", 9): 1}

    inst = await o.store.get_saga(saga_id)
    assert inst is not None and inst.state is SagaState.SUCCEEDED
    assert inst.steps[0].result == {"guide": "t-1"}
    events = [h.event for h in await o.store.history(saga_id)]
    assert "timer.stale" in events
    letters = {(d.endpoint, d.message_id) for d in await o.store.dead_letters()}
    assert letters == {("orchestrator.local", "m-poison"), ("orchestrator", None)}
    text = caplog.text
    assert "saga is gone" in text and "timer set aside for saga" in text


async def test_inputs_of_a_missing_version_are_set_aside_and_manual_actions_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    o, saga_id, command = await started()
    newer = Orchestrator(o.store, [tour(2)])
    reply = reply_to(command, success({"guide": "x"}), source="orchestrator.local", now=1.0)
    caplog.set_level(logging.DEBUG, logger="sagakit")
    for n in range(3):
        async with newer.transaction() as tx:
            await newer.apply_replies(tx, [replace(reply, message_id=f"r{n}")], 1.0, "x")
    rows = await o.store.set_aside_of_saga(saga_id)
    assert [(r.kind, r.waiting_for) for r in rows] == [("reply", "tour@1")] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tour@1" in warnings[0].getMessage()
    with pytest.raises(VersionMissing, match="act on it from a process that has tour@1"):
        await newer.cancel(saga_id, "no")
    # The local command itself: recognised as needing tour@1 by the newer process.
    assert newer.aside.local_version(command) == ("tour", 1)
    assert o.aside.local_version(command) is None
