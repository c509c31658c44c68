"""Safe decisions over the API: the saga's version travels as an ETag and comes back in
``If-Match`` (a stale one is refused with 409 ``saga_moved``), irreversible actions need
``"confirm": true`` (422 ``confirmation_required`` says what they do), ``accept_partial``
with a hold still open needs ``"force": true`` (409 ``open_holds``), and a batch's dry
run says what the action would do to each saga."""

from __future__ import annotations

from pathlib import Path

from api_support import auth, running_api

from sagakit import SagaState
from sagakit.api.problems import PROBLEM_JSON

MARK = {"action": "mark_compensated", "reason": "hold released by phone, #4711"}


async def test_a_decision_on_a_stale_version_is_refused_with_409(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        case = await env.manual_case("stale")
        url = f"/sagas/{case['saga_id']}"
        got = await env.client.get(url, headers=auth("viewer"))
        version = got.json()["version"]
        assert got.headers["etag"] == f'W/"{version}"'

        stale = await env.client.post(
            url + "/actions",
            json={**MARK, "confirm": True},
            headers={**auth("operator"), "If-Match": f'W/"{version - 1}"'},
        )
        assert stale.status_code == 409, stale.text
        assert stale.headers["content-type"].startswith(PROBLEM_JSON)
        problem = stale.json()
        assert problem["type"] == "/problems/saga_moved" and problem["error"] == "saga_moved"
        assert problem["title"] == "The saga moved since the decision was made"
        assert f"version {version - 1}" in problem["detail"]
        assert f"at version {version} now" in problem["detail"]
        assert stale.headers["etag"] == f'W/"{version}"'  # the version now
        inst = await env.engine.get(case["saga_id"])
        assert inst.version == version and inst.state is SagaState.FAILED_NEEDS_MANUAL

        bad = await env.client.post(
            url + "/actions",
            json={**MARK, "confirm": True},
            headers={**auth("operator"), "If-Match": "yesterday"},
        )
        assert bad.status_code == 400 and "If-Match" in bad.json()["detail"]

        done = await env.client.post(
            url + "/actions",
            json={**MARK, "confirm": True},
            headers={**auth("operator"), "If-Match": f'"{version}"'},
        )
        assert done.status_code == 200, done.text
        assert done.json()["saga"]["version"] == version + 1
        assert done.headers["etag"] == f'W/"{version + 1}"'
        assert "nothing is sent" in done.json()["description"]
        # The same form sent again is stale now: no second decision.
        again = await env.client.post(
            url + "/actions",
            json={**MARK, "confirm": True},
            headers={**auth("operator"), "If-Match": f'W/"{version}"'},
        )
        assert again.status_code == 409 and again.json()["error"] == "saga_moved"
        trail = await env.client.get(f"/audit?saga_id={case['saga_id']}", headers=auth("admin"))
        outcomes = [r["outcome"] for r in trail.json()["items"] if r["action"] == MARK["action"]]
        assert sorted(outcomes) == ["applied", "saga_moved", "saga_moved"]


async def test_irreversible_actions_need_confirm_and_open_holds_need_force(
    tmp_path: Path,
) -> None:
    async with running_api(tmp_path) as env:
        case = await env.manual_case("holds")
        url = f"/sagas/{case['saga_id']}/actions"
        for action in ("mark_compensated", "accept_partial", "mark_done"):
            r = await env.client.post(
                url, json={"action": action, "reason": "sure"}, headers=auth("operator")
            )
            assert r.status_code == 422, r.text
            problem = r.json()
            assert problem["type"] == "/problems/confirmation_required"
            assert (
                "cannot be taken back" in problem["detail"] and "What it does:" in problem["detail"]
            )
            assert problem["fields"][0]["field"] == "confirm"
        forced_elsewhere = {"action": "retry", "reason": "x", "force": True}
        r = await env.client.post(url, json=forced_elsewhere, headers=auth("operator"))
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "force"

        accept = {"action": "accept_partial", "reason": "customer keeps it", "confirm": True}
        r = await env.client.post(url, json=accept, headers=auth("operator"))
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "open_holds"
        assert "authorize_payment undo failed" in r.json()["detail"]
        assert (await env.engine.get(case["saga_id"])).state is SagaState.FAILED_NEEDS_MANUAL

        r = await env.client.post(url, json={**accept, "force": True}, headers=auth("operator"))
        assert r.status_code == 200, r.text
        assert r.json()["saga"]["state"] == "PARTIAL_ACCEPTED"
        history = await env.engine.store.history(case["saga_id"])
        [resolved] = [h for h in history if h.event == "manual.resolved"]
        assert resolved.detail["forced"] is True
        assert "authorize_payment undo failed" in resolved.detail["holds_left_open"]


async def test_a_batch_dry_run_says_what_each_saga_would_do(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        cases = [await env.manual_case(f"b{i}") for i in range(2)]
        ids = [c["saga_id"] for c in cases]
        body = {
            "filter": {"saga_ids": ids},
            "action": "accept_partial",
            "reason": "customers keep their orders",
            "dry_run": True,
        }
        r = await env.client.post("/sagas/actions/batch", json=body, headers=auth("operator"))
        dry = r.json()
        assert r.status_code == 200, r.text
        assert dry["irreversible"] is True and "PARTIAL_ACCEPTED" in dry["description"]
        assert dry["would_apply"] == 0 and dry["would_refuse"] == 2
        assert {p["error"] for p in dry["previews"]} == {"open_holds"}
        versions = dry["versions"]
        assert set(versions) == set(ids)

        # Acting needs the confirmation; a saga that moved since the dry run is refused.
        act = {**body, "action": "mark_compensated", "dry_run": False}
        r = await env.client.post("/sagas/actions/batch", json=act, headers=auth("operator"))
        assert r.status_code == 422 and r.json()["error"] == "confirmation_required"
        dry = (
            await env.client.post(
                "/sagas/actions/batch", json={**act, "dry_run": True}, headers=auth("operator")
            )
        ).json()
        assert dry["would_apply"] == 2
        assert {p["state"] for p in dry["previews"]} == {"COMPENSATING"}
        await env.engine.resolve(
            ids[0], "retry", reason="someone else retried", actor="ops-2", expected_version=None
        )
        await env.engine.wait(ids[0], timeout=30)
        r = await env.client.post(
            "/sagas/actions/batch",
            json={**act, "confirm": True, "expected_versions": dry["versions"]},
            headers=auth("operator"),
        )
        assert r.status_code == 200, r.text
        results = {x["saga_id"]: x for x in r.json()["results"]}
        assert results[ids[0]]["error"] == "saga_moved"
        assert results[ids[1]]["ok"] is True


async def test_a_stale_cancel_is_refused(tmp_path: Path) -> None:
    roles = frozenset({"orchestrator", "timers", "relays"})  # nobody answers: it stays RUNNING
    async with running_api(tmp_path, roles=roles) as env:
        placed = (await env.place("to-cancel")).json()
        url = f"/sagas/{placed['saga_id']}"
        version = (await env.engine.get(placed["saga_id"])).version
        cancel = {"action": "cancel", "reason": "customer changed their mind"}
        stale = await env.client.post(
            url + "/actions",
            json=cancel,
            headers={**auth("operator"), "If-Match": f'"{version + 5}"'},
        )
        assert stale.status_code == 409 and stale.json()["error"] == "saga_moved"
        assert (await env.engine.get(placed["saga_id"])).state is SagaState.RUNNING
        ok = await env.client.post(
            url + "/actions", json=cancel, headers={**auth("operator"), "If-Match": "*"}
        )
        assert ok.status_code == 200 and ok.json()["saga"]["state"] == "COMPENSATING"
