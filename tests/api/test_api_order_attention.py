"""An order waiting for a person (NEEDS_ATTENTION) is not final: its status says so and
its event stream stays open until a person's decision makes it final."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from api_support import auth, running_api, sse_events

from sagakit import SagaState
from sagakit.api.views import order_final
from sagakit.core.instance import MANUAL_STATES


def _statuses(text: str) -> list[dict[str, Any]]:
    return [d for e, d, _ in sse_events(text) if e == "status" and d]


def test_final_means_terminal_and_no_person_can_move_it_on() -> None:
    for state in SagaState:
        assert order_final(state) is (state.terminal and state not in MANUAL_STATES), state
    assert not order_final(SagaState.FAILED_NEEDS_MANUAL)
    assert not order_final(SagaState.RUNNING)
    assert order_final(SagaState.COMPENSATED) and order_final(SagaState.PARTIAL_ACCEPTED)


async def test_an_order_waiting_for_a_person_is_not_terminal(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        case = await env.manual_case("attention")
        r = await env.client.get(f"/orders/{case['order_id']}", headers=auth("viewer"))
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "NEEDS_ATTENTION" and body["terminal"] is False, body


async def test_the_stream_stays_open_until_the_decision_then_ends(tmp_path: Path) -> None:
    # A stream long enough not to expire during the test: only a decision may end it.
    async with running_api(tmp_path, sse_heartbeat=0.05, sse_poll=0.02, sse_max_seconds=30) as env:
        case = await env.manual_case("stream")
        url = f"/orders/{case['order_id']}/events"
        stream = asyncio.create_task(env.client.get(url, headers=auth("viewer")))
        await asyncio.sleep(0.6)  # a dozen heartbeats
        assert not stream.done(), "the stream of an order waiting for a person ended"
        decided = await env.client.post(
            f"/sagas/{case['saga_id']}/actions",
            json={
                "action": "mark_compensated",
                "reason": "hold released by phone, #4711",
                "confirm": True,
            },
            headers=auth("operator"),
        )
        assert decided.status_code == 200, decided.text
        r = await asyncio.wait_for(stream, 30)
        assert r.status_code == 200
        events = sse_events(r.text)
        statuses = _statuses(r.text)
        names = [d["status"] for d in statuses]
        attention = names.index("NEEDS_ATTENTION")
        assert names[-1] == "CANCELLED" and attention < len(names) - 1, names
        # Every status before the last said "not final", NEEDS_ATTENTION included.
        assert [d["terminal"] for d in statuses] == [False] * (len(names) - 1) + [True]
        # Heartbeats kept the stream alive while the order waited for the person.
        at = next(
            i for i, (e, d, _) in enumerate(events) if d and d.get("status") == names[attention]
        )
        assert events[at + 1][0] == "comment", events
        assert events[-1] == (
            "end",
            {"order_id": case["order_id"], "status": "CANCELLED", "state": "COMPENSATED"},
            None,
        )


async def test_a_reconnect_after_the_decision_gets_the_final_status_and_end(
    tmp_path: Path,
) -> None:
    async with running_api(tmp_path, sse_heartbeat=0.05, sse_poll=0.02, sse_max_seconds=0.4) as env:
        case = await env.manual_case("reconnect")
        url = f"/orders/{case['order_id']}/events"
        # Waiting: the stream runs to its time limit (the client reconnects), no end.
        first = await env.client.get(url, headers=auth("viewer"))
        statuses = _statuses(first.text)
        assert statuses[-1]["status"] == "NEEDS_ATTENTION"
        assert not any(d["terminal"] for d in statuses)
        events = sse_events(first.text)
        assert not any(e == "end" for e, _, _ in events)
        assert any(e == "comment" for e, _, _ in events)
        seen = [i for e, _, i in events if e == "status" and i][-1]
        # A reconnect before the decision: nothing new, still no end.
        again = await env.client.get(url, headers={**auth("viewer"), "Last-Event-ID": seen})
        assert _statuses(again.text) == []
        assert not any(e == "end" for e, _, _ in sse_events(again.text))
        # The person decides through the engine: the order becomes final.
        # The card hold is still open (void and refund refused): a forced accept.
        await env.engine.resolve(
            case["saga_id"],
            "accept_partial",
            reason="customer keeps the hold",
            actor="ops-1",
            force=True,
        )
        assert (await env.engine.get(case["saga_id"])).state is SagaState.PARTIAL_ACCEPTED
        last = await env.client.get(url, headers={**auth("viewer"), "Last-Event-ID": seen})
        after = _statuses(last.text)
        assert [d["status"] for d in after] == ["PARTIALLY_COMPLETED"]
        assert after[0]["terminal"] is True
        assert sse_events(last.text)[-1] == (
            "end",
            {
                "order_id": case["order_id"],
                "status": "PARTIALLY_COMPLETED",
                "state": "PARTIAL_ACCEPTED",
            },
            None,
        )
        view = (await env.client.get(f"/orders/{case['order_id']}", headers=auth("viewer"))).json()
        assert view["status"] == "PARTIALLY_COMPLETED" and view["terminal"] is True
