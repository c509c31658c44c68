"""``sagakit versions``: versions in flight per state, the app's versions marked, and the
exit status a deploy pipeline keys on (1: the app lacks a version still in use)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from versions_support import PG_DSN

from sagakit import Engine, SagaState, load_app
from sagakit.cli_versions import register
from sagakit.deployment import Deployment

APP_MODULE = """
from sagakit import App, SagaDefinition, Step

def _guide(ctx):
    return {"ok": True}

def tour(version):
    return SagaDefinition("tour", version=version, steps=[Step("guide", _guide)])

both = App("vtest", [tour(1), tour(2)])
only_new = App("vtest", [tour(2)])
nothing = App("vtest", [])
not_an_app = 42
"""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    module = f"versions_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(APP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SAGAKIT_TEST_APP_MODULE", module)
    monkeypatch.delenv("SAGAKIT_STORE_URL", raising=False)
    monkeypatch.delenv("SAGAKIT_APP", raising=False)
    if request.param == "sqlite":
        (tmp_path / "data").mkdir()
        yield f"sqlite:///{tmp_path / 'data'}"
        return
    prefix = f"vt_{uuid.uuid4().hex[:10]}"
    yield f"{PG_DSN}?prefix={prefix}"
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}_orchestrator" CASCADE')
    sys.modules.pop(module, None)


def versions(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``sagakit versions ARGV`` (the subcommand as registered); (status, out, err)."""
    parser = argparse.ArgumentParser(prog="sagakit")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["versions", *argv])
        code = int(args.func(args))
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def app(name: str) -> str:
    import os

    return f"{os.environ['SAGAKIT_TEST_APP_MODULE']}:{name}"


def test_versions_in_flight_refuse_an_app_that_dropped_one(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Synchronous: the command runs its own event loop, as it does in a shell.
    dep = Deployment(load_app(app("both")), store_url)

    async def start() -> None:
        async with Engine(dep.store("orchestrator"), dep.definitions, roles=frozenset()) as api:
            for i in range(3):
                await api.start("tour", f"old-{i}", version=1)
            await api.start("tour", "new-0")

    async def finish() -> None:
        async with Engine(dep.store("orchestrator"), dep.definitions) as worker:
            for inst in await worker.store.list_sagas():
                done = await worker.wait(inst.saga_id, timeout=20)
                assert done.state is SagaState.SUCCEEDED

    asyncio.run(start())

    code, out, _ = versions("--app", app("both"), "--store", store_url, capsys=capsys)
    assert code == 0, out
    assert out.splitlines()[0].split() == [
        "VERSION", "APP", "IN", "FLIGHT", "MANUAL", "FINISHED", "SET", "ASIDE", "STATES"
    ]  # fmt: skip
    assert out.splitlines()[1].split() == ["tour@1", "yes", "3", "0", "0", "0", "RUNNING=3"]
    assert out.splitlines()[2].split() == ["tour@2", "yes", "1", "0", "0", "0", "RUNNING=1"]
    assert out.strip().endswith("has every definition version its sagas still need")

    code, out, _ = versions("--app", app("only_new"), "--store", store_url, capsys=capsys)
    assert code == 1
    assert out.splitlines()[1].split()[:3] == ["tour@1", "MISSING", "3"]
    assert "refused: app 'vtest' lacks tour@1, which 3 saga(s) in flight" in out

    code, out, _ = versions("--app", app("only_new"), "--store", store_url, "--json", capsys=capsys)
    assert code == 1
    report = json.loads(out)
    assert (report["app"], report["ok"], report["missing"]) == ("vtest", False, ["tour@1"])
    old = next(v for v in report["versions"] if v["key"] == "tour@1")
    assert old == {
        "definition": "tour",
        "version": 1,
        "key": "tour@1",
        "in_app": False,
        "states": {"RUNNING": 3},
        "in_flight": 3,
        "manual": 0,
        "finished": 0,
        "set_aside": 0,
        "stranded": True,
    }

    # Once the v1 sagas finished, the app may drop tour@1.
    asyncio.run(finish())
    code, out, _ = versions("--app", app("only_new"), "--store", store_url, "--json", capsys=capsys)
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["missing"] == []
    old = next(v for v in report["versions"] if v["key"] == "tour@1")
    assert (old["in_app"], old["finished"], old["stranded"]) == (False, 3, False)


def test_a_version_with_inputs_set_aside_still_counts(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Deployment(load_app(app("both")), store_url).store("orchestrator")

    async def set_aside() -> None:
        await store.open()
        try:
            async with store.transaction() as tx:
                await tx.set_aside_add("s1", "tour", 1, "timer", "{}", now=1.0)
        finally:
            await store.close()

    asyncio.run(set_aside())
    code, out, _ = versions("--app", app("nothing"), "--store", store_url, capsys=capsys)
    assert code == 1
    assert out.splitlines()[1].split() == ["tour@1", "MISSING", "0", "0", "0", "1", "-"]


def test_usage_errors_exit_2(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = versions("--app", app("both"), capsys=capsys)
    assert code == 2 and "--store is required" in err
    code, _, err = versions("--store", store_url, capsys=capsys)
    assert code == 2 and "--app is required" in err
    code, _, err = versions("--app", app("not_an_app"), "--store", store_url, capsys=capsys)
    assert code == 2 and "not a sagakit.App" in err
    code, _, err = versions("--app", "no_such_module:app", "--store", store_url, capsys=capsys)
    assert code == 2 and "no module named" in err
    code, _, err = versions("--app", app("both"), "--store", "redis://x", capsys=capsys)
    assert code == 2 and "not supported" in err
    code, _, _ = versions("--app", app("both"), "--store", store_url, "--bogus", capsys=capsys)
    assert code == 2
