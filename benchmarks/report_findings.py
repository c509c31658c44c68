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

**One saga at a time, one round trip per transaction** (2026-12-06, three pairs of
`--only engine --runs 2` side by side, the code of the morning against the code of the
afternoon): the orchestrator keeps a copy of each saga it committed last, so the next
transition writes without loading it first (the version-checked write every transition
makes finds a copy another process made stale; redeliveries, the likely duplicates,
still load); a start inserts without looking its business key up first (the insert's
own check refuses a key taken before, and only then does it look); a transaction that
only writes is one statement in autocommit (BEGIN and pipeline mode wait for a first
statement); a commit tells the timer loops of a new timer only if it is due before the
one they were last told of, and the loop in the same process is not woken for it
either (every step sets a timeout later than the one before); connections go back to
the pool without a hop through its worker task; `Engine.wait` reads nothing at first
for a saga its own process committed last. A 4-step saga on PostgreSQL went from 11
round trips to 5: sequential p50 7.48/7.03/7.29 -> 4.91/5.09/5.25 ms and client CPU
3.24/3.04/3.25 -> 1.68/1.78/1.87 ms per saga (the failing variant 9.40/8.34/9.12 ->
7.19/5.86/6.33 ms); SQLite's sequential p50 2.17/2.23/2.29 -> 2.04/1.97/2.17 ms.
Concurrent throughput did not move beyond this machine's noise on PostgreSQL
(2,165/2,196/2,146 -> 1,942/2,126/2,243 sagas/s) and lost about 3% on SQLite
(1,766/1,817/1,795 -> 1,711/1,748/1,760). **Tried and changed:** making a copy for every
transaction cost about 10 us per transition (its data through JSON, so that a
transition computed from a copy is the one computed from a load) and 13% more client
CPU in the concurrent phase, where it saves nothing: a batch of hundreds loads them all
in one statement. Only transactions of at most 32 sagas now leave copies.

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
   {m("compare/limit/postgres_seq_p50_in_commits")} times a single raw commit (target 10).
   Commits alone set a floor of {m("compare/limit/postgres_seq_commit_floor_ms")} ms on
   PostgreSQL and {m("compare/limit/sqlite_seq_commit_floor_ms")} ms on SQLite at this machine's
   raw commit rates ({m("engine/sqlite/ok/commits_per_saga_seq")} commits per saga: one per
   step, each step's result durable before the next step runs); the rest is client CPU
   ({m("engine/postgres/ok/seq_cpu_per_saga")} ms per saga, target 1: psycopg and asyncio per
   statement and per wait, now one statement and one round trip per transaction, and a thread
   hop per blocking step) and the server's work (the write statement, the commit's flush to
   disk). Running several local steps in one transaction would break that durability promise and
   is not proposed. Tried and dropped (side by side, 2026-11-28): ignoring the notifications the
   process itself sent (no change). **Next step:** the server's share, which is now half: a
   transition rewrites the saga row and, when its state changes, every index on it (no HOT
   update), and upserts the step's timer; fewer indexes and timers written per step.
3. **SQLite: {m("engine/sqlite/ok/throughput")} sagas/s**,
   {m("compare/limit/sqlite_sagas_vs_raw")}x the raw commit rate (target 1: several sagas per
   commit), one core busy and SQLite's own statement work about a third of it. Batches now load
   their sagas and record their inbox ids with one statement each. **Next step:** a write-behind
   buffer like PostgreSQL's (one executemany per table per transaction instead of statements per
   transition). The copies of the sagas a process committed last (above) serve SQLite too, but
   its load runs in process and cost little: they bought its sequential path about 5%. **A cost
   paid on purpose** (side by side, 2026-12-05): local steps now run side by side, blocking ones
   in the engine's thread pool, so that a slow step never delays other sagas (a 3 s step beside
   100 fast sagas: their p99 went from seconds to under 0.1 s). That costs SQLite 4-5% of its
   throughput and ~0.9 ms of sequential latency per 4-step saga (a thread hop and a task per
   step; PostgreSQL within noise). Long-lived threads that hand their results back in batches
   cut an initial 20% loss to this; pool designs, thread counts and the switch interval changed
   it by at most 1%. An opt-in for steps known to be fast (run on the loop) would win it back.
4. **Distributed checkout: {m("checkout/seq_p50")} ms for one order**, 14 messages
   one after the other: each waits {m("checkout/hop_outbox")} ms in the outbox (the rest
   of the writer's transaction and its commit, the NOTIFY, the relay's wake-up, lock and
   publish) and travels {m("checkout/hop_delivery")} ms from the broker's
   acknowledgement to its consumer. Under load, {m("checkout/throughput")} checkouts/s
   with <= {sizes.checkout_window} in flight and {m("checkout/burst_throughput")}/s for
   a burst; CPU is {m("checkout/cpu")} ms per checkout over the six processes (worker
   {m("checkout/cpu_worker")}, relay {m("checkout/cpu_relay")}, order
   {m("checkout/cpu_order")}, payment {m("checkout/cpu_payment")}, inventory
   {m("checkout/cpu_inventory")}, shipping {m("checkout/cpu_shipping")} ms), so two
   cores, even without PostgreSQL and NATS on them, cap it near {cap} checkouts/s. The
   per-process profile (py-spy, in the checkout section) shows every process idle most
   of the time under the steady load: with at most {sizes.checkout_window} orders in
   flight the checkout is bound by the waits between processes, not by their CPU (the
   burst, with everything in flight, goes faster). Where a process is busy, it is in
   psycopg's pipeline, asyncio's socket writes and JSON encoding, and in payment the
   provider's own SQLite. Tried and dropped (side by side, 2026-11-28): the worker and
   the services publishing their own outbox rows (the relay role in each) left the
   outbox wait unchanged and tripled the commits per checkout, so the hop is not the
   NOTIFY but the work around it. **Next step:** stamp each part of one hop (the
   writer's commit, the relay's wake-up, its claim, the broker's acknowledgement) to
   find the wait that the idle processes spend, then cut it; the engine's one round
   trip per transaction (above) applies to the worker's replies too.
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
