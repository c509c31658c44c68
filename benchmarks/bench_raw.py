"""The limit: raw durable commits per second on this machine, in this run.

* SQLite, WAL + synchronous=FULL, one connection, one single-row INSERT per commit.
* PostgreSQL (synchronous_commit on), psycopg async, one single-row INSERT per commit
  in autocommit mode, from 1 client and from 8 concurrent clients (8 connections on
  one event loop in one process).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import time
from typing import Any

from _common import pg_drop_schema, pg_dsn, pg_exec, scratch_name


def sqlite_commits(seconds: float, synchronous: str = "FULL") -> float:
    with tempfile.TemporaryDirectory(prefix="sagakit-raw-") as d:
        conn = sqlite3.connect(os.path.join(d, "raw.db"), isolation_level=None)
        try:
            assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            n = 0
            t0 = time.perf_counter()
            end = t0 + seconds
            while True:
                conn.execute("INSERT INTO t (v) VALUES ('x')")  # autocommit: one commit
                n += 1
                if n % 16 == 0 and time.perf_counter() >= end:
                    break
            return n / (time.perf_counter() - t0)
        finally:
            conn.close()


async def pg_commits(seconds: float, clients: int, schema: str) -> float:
    import psycopg

    conns = [
        await psycopg.AsyncConnection.connect(pg_dsn(), autocommit=True) for _ in range(clients)
    ]
    counts = [0] * clients
    try:
        for c in conns:
            await c.execute(f'SET search_path TO "{schema}"')
            await c.execute("SET synchronous_commit TO on")
        end = time.perf_counter() + seconds

        async def client(i: int) -> None:
            c = conns[i]
            n = 0
            while time.perf_counter() < end:
                await c.execute("INSERT INTO t (v) VALUES ('x')")
                n += 1
            counts[i] = n

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return sum(counts) / (time.perf_counter() - t0)
    finally:
        for c in conns:
            await c.close()


def main(params: dict[str, Any]) -> dict[str, Any]:
    seconds: float = params["seconds"]
    out: dict[str, Any] = {"sqlite_full_commits_per_s": sqlite_commits(seconds)}
    if params.get("postgres", True):
        schema = scratch_name("bench_raw")
        try:
            pg_exec(f'CREATE SCHEMA "{schema}"')
            pg_exec(f'CREATE TABLE "{schema}".t (id bigserial PRIMARY KEY, v text NOT NULL)')
            out["pg_1_commits_per_s"] = asyncio.run(pg_commits(seconds, 1, schema))
            out["pg_8_commits_per_s"] = asyncio.run(pg_commits(seconds, 8, schema))
        finally:
            pg_drop_schema(schema)
    return out
