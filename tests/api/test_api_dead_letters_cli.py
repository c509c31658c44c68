"""``sagakit dead-letters list|show|replay|discard`` against a served API."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from test_api_serve_cli import run_cli, served


def park(db: Path, message_id: str, body: str) -> int:
    """Park a message beside the running server (SQLite lets a second writer in)."""
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "INSERT INTO dead_letters (endpoint, message_id, body, reason, at) "
            "VALUES ('payment', ?, ?, 'UnknownMessageType: no handler', 1700000000.0) "
            "RETURNING id",
            (message_id, body),
        ).fetchone()
    return int(row[0])


async def test_the_cli_lists_shows_replays_and_discards(tmp_path: Path) -> None:
    async with served(tmp_path / "data") as (url, info):
        base = ["--url", url, "--token", info["token"]]

        def cli(*argv: str) -> tuple[int, str, str]:
            return run_cli(["dead-letters", *argv, *base])

        garbage = park(tmp_path / "data" / "payment.db", "m-garbage", "not json")
        code, out, _ = await asyncio.to_thread(cli, "list")
        assert code == 0, out
        assert "m-garbage" in out and "payment" in out and "1 of 1 open" in out
        code, out, _ = await asyncio.to_thread(cli, "list", "--store", "payment", "--json")
        assert code == 0 and [i["id"] for i in json.loads(out)["items"]] == [garbage]
        code, out, _ = await asyncio.to_thread(cli, "show", "payment", str(garbage))
        assert code == 0 and "not an envelope" in out and "body: not json" in out
        # Nothing to send: the API's 409 is printed, exit 1, and the letter stays open.
        code, _, err = await asyncio.to_thread(
            cli, "replay", "payment", str(garbage), "--reason", "try"
        )
        assert code == 1 and "409" in err and "not a valid envelope" in err
        code, out, _ = await asyncio.to_thread(
            cli, "discard", "payment", str(garbage), "--reason", "junk", "--json"
        )
        assert code == 0, out
        settled = json.loads(out)["dead_letter"]
        assert (settled["status"], settled["settled_by"], settled["settle_reason"]) == (
            "discarded",
            "admin",
            "junk",
        )
        code, out, _ = await asyncio.to_thread(cli, "list")
        assert code == 0 and "0 of 0 open" in out
        code, out, _ = await asyncio.to_thread(cli, "show", "payment", str(garbage))
        assert "status discarded by admin" in out and ": junk" in out
        code, _, err = await asyncio.to_thread(cli, "show", "payment", "999")
        assert code == 1 and "404" in err
