"""The report's closing section: the analysis and next steps, with this run's numbers."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from _common import Result
from report_format import fmt, median
from report_profile import area_share


def _m(by_name: Mapping[str, Result], name: str) -> str:
    """The median of result ``name`` as the report prints it."""
    return fmt(median(by_name, name))


def findings(by_name: dict[str, Result], profiles: list[dict[str, Any]], sizes: Any) -> str:
    """The analysis, with this run's numbers filled in."""
    m = functools.partial(_m, by_name)

    def pct(name: str) -> str:
        v = median(by_name, name)
        return "—" if v is None else f"{v * 100:.1f}%"

    cpu_ms = median(by_name, "checkout/cpu")
    cap = "—" if not cpu_ms else f"{2000 / cpu_ms:.0f}"
    vs_dbos = median(by_name, "compare/throughput/sagakit_pg_vs_dbos_pg")
    target = (
        "the 30x target: not measured"
        if vs_dbos is None
        else ("meeting the 30x target" if vs_dbos >= 30 else "short of the 30x target")
    )
    at_best = (
        " DBOS is measured at its best: its concurrent figures are those of the fastest of"
        " four ways of driving it (all at once, 32 in flight with asyncio or with threads, or"
        " a DBOS queue), each in its own row."
        if median(by_name, "dbos/postgres/ok/throughput_threads_32") is not None
        else ""
    )
    return f"""## Findings and next steps

Proposals with this run's evidence. In short: the databases' commit rates are not the
limit (sagakit commits in batches: it uses {pct("compare/limit/postgres_commit_rate_used")}
of PostgreSQL's and {pct("compare/limit/sqlite_commit_rate_used")} of SQLite's raw commit
rate while running flat out); CPU is, the client's Python per transition and, on
PostgreSQL, the server's own work per statement, on the same two cores; for the
distributed checkout, the time a message spends between two processes. sagakit beats DBOS
on throughput ({m("compare/throughput/sagakit_pg_vs_dbos_pg")}x on PostgreSQL,
{m("compare/throughput/sagakit_sqlite_vs_dbos_sqlite_wal")}x on SQLite WAL) and on CPU
({m("compare/cpu/dbos_pg_vs_sagakit_pg")}x less per saga), {target}.{at_best}

**Done since the first full run** (each measured side by side before and after when it
landed; see git log): local steps run inline (5 commits per 4-step saga instead of ~25,
no relay or mailbox hand-off), up to 4 batches at once (one's commit overlaps the next's
work: PostgreSQL ~920 -> ~1,360 sagas/s side by side); reply batches record their inbox
entries and lock their sagas in one round trip; a transaction's writes are buffered and
sent as one statement (one CTE per table, rows as a JSON array, mailbox ids reserved in
blocks) that checks its own saga writes, so COMMIT travels with it: a local step's
transaction is 5 statements in 2 round trips instead of 10 in 4 (sequential client CPU
-25% side by side); participants read inbox and idempotency records in one round
trip and write their record without waiting for an answer; the relay with NATS locks
its batch in the transaction that marks it (one commit per batch); steps are stored as
compact rows; tracing costs nothing without a provider; saga counts come from
per-state counters.

**Restructured without a loss** (2026-12-06, side by side in one session): the stores
became subpackages over shared SQL, the transports and the state machine smaller
modules. Two pairs of `--only engine --runs 3` (old code first, then new code first)
gave throughput old/new of 739/758 and 782/786 sagas/s on SQLite, 949/1,017 and
1,073/1,060 on PostgreSQL, and CPU per saga within 3% in every pair; sequential p50
and p99 moved both ways by up to 20% between pairs, which is this machine's noise.
The simulator's seeds/s stayed within 6% (orchestration 20.5 -> 22.4, choreography
37.2 -> 36.5, hybrid 18.5 -> 18.3, the wallet app 15.3 -> 14.5).

1. **Engine CPU: {m("engine/postgres/ok/cpu_per_saga")} ms per saga on PostgreSQL**
   (target 0.25; {m("engine/sqlite/ok/cpu_per_saga")} ms on SQLite). The profile spreads
   it thin: JSON {area_share(profiles, "postgres", "json")}, the state machine
   {area_share(profiles, "postgres", "sagakit state machine")}, instances (copy,
   decode) {area_share(profiles, "postgres", "sagakit instance")}, psycopg
   {area_share(profiles, "postgres", "psycopg (driver")}, and
   {area_share(profiles, "postgres", "idle")} of the wall time the process waits for
   the server. The server is the other half: PostgreSQL's own CPU is not measured by
   this suite, but read by hand from its processes (2026-11-28) it was about as much per
   saga as the client's, so on 2 cores the two together cap throughput well below the
   target (0.3 of the raw 8-client commit rate; this run:
   {m("compare/limit/postgres_sagas_vs_raw_8")}) whatever the client saves. **Next
   steps:** re-encode a saga's `data` only when a transition changed it (most do not);
   server work per transition (a state change updates an indexed column, so no HOT
   update; the per-state counter row; the timer upsert each step). Throughput also
   scales with worker processes against one database; on this 2-core machine they
   compete with PostgreSQL.
2. **Sequential latency: {m("engine/postgres/ok/seq_p50")} ms p50 on PostgreSQL,
   {m("engine/sqlite/ok/seq_p50")} ms on SQLite**: on PostgreSQL
   {m("compare/limit/postgres_seq_p50_in_commits")} times a single raw commit (target
   10). Commits alone set a floor of {m("compare/limit/postgres_seq_commit_floor_ms")} ms
   on PostgreSQL and {m("compare/limit/sqlite_seq_commit_floor_ms")} ms on SQLite at
   this machine's raw commit rates ({m("engine/sqlite/ok/commits_per_saga_seq")} commits
   per saga: one per step, each step's result durable before the next step runs); the
   rest is client CPU ({m("engine/postgres/ok/seq_cpu_per_saga")} ms per saga, target 1:
   psycopg and asyncio per statement and per wait, 5 statements and 2 round trips per
   transaction) and the server's work (the write statement, the commit's flush to
   disk). Running several local steps in one transaction would break that durability
   promise and is not proposed. Tried and dropped (side by side, 2026-11-28): ignoring
   the notifications the process itself sent (no change). **Next step:** the server's
   share, which is now half: a transition rewrites the saga row and, when its state
   changes, every index on it (no HOT update), and upserts the step's timer; fewer
   indexes and timers written per step.
3. **SQLite: {m("engine/sqlite/ok/throughput")} sagas/s**,
   {m("compare/limit/sqlite_sagas_vs_raw")}x the raw commit rate (target 1: several
   sagas per commit), one core busy and SQLite's own statement work about a third of it.
   Batches now load their sagas and record their inbox ids with one statement each.
   **Next steps:** a write-behind buffer like PostgreSQL's (one executemany per table
   per transaction instead of statements per transition); an instance cache (a saga this
   process wrote last is not read and decoded again; the version check still guards
   against another writer). **A cost paid on purpose** (side by side, 2026-12-05): local
   steps now run side by side, blocking ones in the engine's thread pool, so that a slow
   step never delays other sagas (a 3 s step beside 100 fast sagas: their p99 went from
   seconds to under 0.1 s). That costs SQLite 4-5% of its throughput and ~0.9 ms of
   sequential latency per 4-step saga (a thread hop and a task per step; PostgreSQL
   within noise). Long-lived threads that hand their results back in batches cut an
   initial 20% loss to this; pool designs, thread counts and the switch interval changed
   it by at most 1%. An opt-in for steps known to be fast (run on the loop) would win it
   back.
4. **Distributed checkout: {m("checkout/seq_p50")} ms for one order**, 14 messages
   one after the other: each waits {m("checkout/hop_outbox")} ms in the outbox (the rest
   of the writer's transaction and its commit, the NOTIFY, the relay's wake-up, lock and
   publish) and travels {m("checkout/hop_delivery")} ms from the broker's
   acknowledgement to its consumer. Under load, {m("checkout/throughput")} checkouts/s
   with <= {sizes.checkout_window} in flight and {m("checkout/burst_throughput")}/s for
   a burst; CPU is {m("checkout/cpu")} ms per checkout over the six processes, so two
   cores, even without PostgreSQL and NATS on them, cap it near {cap} checkouts/s.
   Tried and dropped (side by side, 2026-11-28): the worker and the services publishing
   their own outbox rows (the relay role in each) left the outbox wait unchanged and
   tripled the commits per checkout, so the hop is not the NOTIFY but the work around
   it: the rest of the writer's transaction and its flush to disk, the relay's lock and
   the broker's acknowledgement, on two cores shared by seven processes. **Next step:**
   a per-process profile of one hop, to see which of these to cut.
5. **Scale and recovery** (see the targets table): waiting sagas cost little in the
   worker (RSS {m("timers/sqlite/worker_rss_idle")} MB on SQLite and
   {m("timers/postgres/worker_rss_idle")} MB on PostgreSQL with every saga waiting; they
   live in the database); counting is {m("listing/sqlite/count_p99")} /
   {m("listing/postgres/count_p99")} ms p99 and every list query within
   {m("listing/sqlite/worst_list_p99")} / {m("listing/postgres/worst_list_p99")} ms;
   recovery after `kill -9` takes {m("recovery/sqlite/recovery_s")} s with
   {m("recovery/sqlite/participant_duplicates")} duplicate participant effects (local
   steps re-ran {m("recovery/sqlite/local_reruns")} times: the batch whose callables had
   run when the process died; at least once, with the same idempotency key, as
   documented).
"""
