-- Every statement PostgresStore runs, by name. Each block starts with "-- name: <name>"
-- and runs as one statement with psycopg placeholders (%s, or %(name)s); comment lines
-- inside a block are dropped by the loader. Tables are unqualified: the pool sets the
-- store's schema as search_path on every connection. Variable-length id lists are
-- passed as one array (= ANY), so every statement text stays constant and psycopg
-- prepares each one once per connection.

-- name: schema_migrations_create
CREATE TABLE IF NOT EXISTS schema_migrations (
    namespace  text NOT NULL,
    step       integer NOT NULL,
    applied_at double precision NOT NULL,
    PRIMARY KEY (namespace, step)
)

-- name: schema_migrations_exists
SELECT to_regclass('schema_migrations') IS NOT NULL

-- name: schema_exists
SELECT 1 FROM pg_namespace WHERE nspname = %s

-- name: migration_lock
-- Held until the transaction ends: concurrent processes apply migrations one at a time.
SELECT pg_advisory_xact_lock(%s)

-- name: migration_steps
SELECT step FROM schema_migrations WHERE namespace = %s

-- name: migration_record
INSERT INTO schema_migrations (namespace, step, applied_at)
VALUES (%s, %s, extract(epoch FROM clock_timestamp())::float8)

-- name: database_time
SELECT extract(epoch FROM clock_timestamp())::float8

-- name: notify
SELECT pg_notify(%s, %s)

-- name: saga_get
-- FOR UPDATE: a second worker loading the same saga waits for this transaction, then
-- reads the version it committed.
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas WHERE saga_id = %s
FOR UPDATE

-- name: saga_read
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas WHERE saga_id = %s

-- name: saga_get_many
-- Locked in saga_id order: batches (and the timer transaction) sharing sagas wait for
-- each other in one order instead of deadlocking.
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas WHERE saga_id = ANY(%(ids)b::text[])
ORDER BY saga_id
FOR UPDATE

-- name: saga_get_by_key
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas WHERE definition = %s AND business_key = %s

-- name: saga_get_by_keys
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas WHERE definition = %(definition)s AND business_key = ANY(%(keys)b::text[])

-- name: saga_insert
-- DO NOTHING (no RETURNING row) instead of a unique violation, which would abort the
-- whole transaction; the store raises ConcurrencyError. Covers both unique keys.
INSERT INTO sagas (saga_id, definition, definition_version, business_key, state, status,
                   version, cursor, correlation_id, created_at, updated_at, deadline_at,
                   reason, cancel_requested, timed_out, data, steps)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING saga_id

-- name: saga_exists
SELECT version FROM sagas WHERE saga_id = %s

-- name: saga_list
-- Optional filters as "IS NULL OR" so that one prepared statement serves every
-- combination (console listing, not the hot path).
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas
WHERE (%(states)s::text[] IS NULL OR state = ANY(%(states)s::text[]))
  AND (%(definition)s::text IS NULL OR definition = %(definition)s::text)
ORDER BY created_at DESC, seq DESC
LIMIT %(limit)s OFFSET %(offset)s

-- name: saga_oldest_update
-- The metric of the oldest manual case: its rows found through sagas_state_created_idx.
SELECT min(updated_at) FROM sagas WHERE state = ANY(%(states)s::text[])

-- name: saga_count
-- The deltas of saga_counts (migration 0002), summed; "rows" says when to fold them.
SELECT state, sum(n)::bigint, count(*) AS rows FROM saga_counts GROUP BY state

-- name: saga_counts_fold
-- One row per state instead of the deltas. Concurrent writers' uncommitted deltas are
-- not seen, so not deleted; a concurrent fold waits, then skips the rows this one
-- deleted: the sum never changes.
WITH gone AS (DELETE FROM saga_counts RETURNING state, n)
INSERT INTO saga_counts (state, n)
SELECT state, sum(n) FROM gone GROUP BY state HAVING sum(n) <> 0

-- name: history
SELECT saga_id, version, at, event, state, status, step, detail, message_id
FROM saga_history WHERE saga_id = %s ORDER BY id

-- name: timers_take_due
-- SKIP LOCKED: timers another worker's open transaction took are passed over, so two
-- workers never take the same timer and neither waits for the other. The saga rows are
-- locked in the same statement: a reply transaction locks its saga and then its timers,
-- so taking timers first and sagas later would lock in the opposite order and deadlock;
-- a timer whose saga is busy is simply left for the next round. RETURNING yields rows
-- in no promised order; the caller sorts them. COLLATE "default": timers' ids are "C",
-- sagas' are not, and a comparison in "C" cannot use sagas_pkey: the planner then
-- hashed every saga and sorted every due timer for each batch (O(n) per 512 timers;
-- 100,000 timers fired at ~400/s). In sagas' collation it walks timers_due_idx and
-- probes sagas_pkey, a batch's own rows only.
DELETE FROM timers
WHERE (saga_id, name) IN (SELECT t.saga_id, t.name FROM timers t
                          JOIN sagas s ON s.saga_id = t.saga_id COLLATE "default"
                          WHERE t.due_at <= %s
                          ORDER BY t.due_at, t.saga_id, t.name LIMIT %s
                          FOR UPDATE OF t, s SKIP LOCKED)
RETURNING saga_id, name, due_at, fence

-- name: timers_take_due_orphans
DELETE FROM timers
WHERE (saga_id, name) IN (SELECT t.saga_id, t.name FROM timers t
                          WHERE t.due_at <= %s
                            AND NOT EXISTS (SELECT 1 FROM sagas s
                                            WHERE s.saga_id = t.saga_id COLLATE "default")
                          ORDER BY t.due_at, t.saga_id, t.name LIMIT %s
                          FOR UPDATE SKIP LOCKED)
RETURNING saga_id, name, due_at, fence

-- name: timer_next_due
SELECT min(due_at) FROM timers

-- name: inbox_add
INSERT INTO inbox (consumer, message_id, at) VALUES (%s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING 1

-- name: inbox_add_many
-- A batch's ids in one statement (binary text[]: no escaping); RETURNING names the new.
INSERT INTO inbox (consumer, message_id, at)
SELECT %(consumer)s, m, %(now)s FROM unnest(%(ids)b::text[]) AS m
ON CONFLICT DO NOTHING
RETURNING message_id

-- name: inbox_ids
SELECT message_id FROM inbox WHERE consumer = %s

-- name: inbox_has
SELECT 1 FROM inbox WHERE consumer = %s AND message_id = %s

-- name: inbox_purge
DELETE FROM inbox WHERE at < %s

-- name: idempotency_get
SELECT outcome, tombstone, at FROM idempotency WHERE consumer = %s AND key = %s

-- name: idempotency_get_many
SELECT key, outcome, tombstone, at FROM idempotency
WHERE consumer = %(consumer)s AND key = ANY(%(keys)b::text[])

-- name: outbox_claim_db_clock
-- One statement is one transaction: the subquery's row locks are held until the UPDATE
-- commits, and SKIP LOCKED passes over rows a concurrent claim is taking. Leases are
-- stamped and compared with the server's clock (statement_timestamp: one value for
-- the whole statement), so relays on hosts with skewed clocks agree on expiry.
UPDATE outbox SET claimed_until = extract(epoch FROM statement_timestamp())::float8 + %s
WHERE id IN (SELECT id FROM outbox
             WHERE published_at IS NULL
               AND (claimed_until IS NULL
                    OR claimed_until <= extract(epoch FROM statement_timestamp())::float8)
             ORDER BY id LIMIT %s
             FOR UPDATE SKIP LOCKED)
RETURNING id, body

-- name: outbox_claim_caller_clock
-- The same claim with the caller's clock (simulated clocks, the contract suite).
UPDATE outbox SET claimed_until = %s
WHERE id IN (SELECT id FROM outbox
             WHERE published_at IS NULL AND (claimed_until IS NULL OR claimed_until <= %s)
             ORDER BY id LIMIT %s
             FOR UPDATE SKIP LOCKED)
RETURNING id, body

-- name: outbox_lock_db_clock
-- The relay's batch inside its transaction (PostgresStore.outbox_locked): the rows stay
-- locked while they are published and are marked in the same transaction, one commit
-- per batch. Rows another relay locked are skipped; leases of outbox_claim are honoured.
SELECT id, body FROM outbox
WHERE published_at IS NULL
  AND (claimed_until IS NULL
       OR claimed_until <= extract(epoch FROM statement_timestamp())::float8)
ORDER BY id LIMIT %s
FOR UPDATE SKIP LOCKED

-- name: outbox_lock_caller_clock
SELECT id, body FROM outbox
WHERE published_at IS NULL AND (claimed_until IS NULL OR claimed_until <= %s)
ORDER BY id LIMIT %s
FOR UPDATE SKIP LOCKED

-- name: idle_in_transaction_timeout
-- For this transaction only: a relay stopped while it holds rows (SIGSTOP, a frozen
-- host) has its session ended by the server, so the rows go to another relay.
SELECT set_config('idle_in_transaction_session_timeout', %s, true)

-- name: outbox_mark_published
-- The first publication time is kept when a row is published twice (lease expired).
UPDATE outbox SET published_at = %s
WHERE id = ANY(%s::bigint[]) AND published_at IS NULL

-- name: outbox_purge
-- One batch, its own short transaction. created_at < cutoff is implied by
-- published_at < cutoff and lets the BRIN index skip recent pages; SKIP LOCKED never
-- waits for a relay that holds a row.
DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
                                WHERE created_at < %s AND published_at < %s
                                LIMIT %s FOR UPDATE SKIP LOCKED)

-- name: outbox_pending
SELECT count(*) FROM outbox WHERE published_at IS NULL

-- name: outbox_all
SELECT body, published_at FROM outbox ORDER BY id

-- name: dead_letter_add
INSERT INTO dead_letters (endpoint, message_id, body, reason, at) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING

-- name: dead_letters_page
-- The condition comes from stores/rows.py: dead_letter_where.
SELECT id, endpoint, message_id, body, reason, at, settlement, settled_by, settled_at, settle_reason
FROM dead_letters WHERE {where} ORDER BY id LIMIT %s OFFSET %s

-- name: dead_letter_get
SELECT id, endpoint, message_id, body, reason, at, settlement, settled_by, settled_at, settle_reason
FROM dead_letters WHERE id = %s

-- name: dead_letter_get_for_update
SELECT id, endpoint, message_id, body, reason, at, settlement, settled_by, settled_at, settle_reason
FROM dead_letters WHERE id = %s FOR UPDATE

-- name: dead_letter_settle
UPDATE dead_letters SET settlement = %s, settled_by = %s, settled_at = %s, settle_reason = %s
WHERE id = %s AND settled_at IS NULL

-- name: queue_push
-- One statement for the whole batch; ids follow the order of the bodies. The bodies
-- travel as a binary text[]: the text array format escapes every quote of every JSON
-- body with a regex. The notice (when asked for) is sent in the same implicit
-- transaction, so on commit.
WITH pushed AS (
    INSERT INTO queue (endpoint, body, enqueued_at, available_at)
    SELECT %(endpoint)s, body, %(now)s, %(at)s
    FROM unnest(%(bodies)b::text[]) WITH ORDINALITY AS b(body, n)
    ORDER BY n
    RETURNING 1
)
SELECT pg_notify(%(channel)s, %(endpoint)s) WHERE %(notify)s

-- name: queue_fetch
-- RETURNING yields rows in no promised order; the caller sorts them by id.
UPDATE queue SET deliveries = deliveries + 1, available_at = %s
WHERE id IN (SELECT id FROM queue WHERE endpoint = %s AND available_at <= %s
             ORDER BY id LIMIT %s
             FOR UPDATE SKIP LOCKED)
RETURNING id, endpoint, body, deliveries, enqueued_at

-- name: queue_ids
-- Identity values for Tx.queue_add, reserved a block at a time (see PostgresStore): the
-- mailbox rows of a transaction are then written with the rest of its buffered writes,
-- with no round trip for their ids. Reserved values are never reused (a block a
-- process did not use is a gap), so a late ack of an old id still deletes nothing else.
SELECT nextval(pg_get_serial_sequence('queue', 'id')::regclass)
FROM generate_series(1, %s)

-- name: queue_ack
DELETE FROM queue WHERE id = ANY(%s::bigint[])

-- name: queue_retry
UPDATE queue SET available_at = %s, last_error = %s WHERE id = %s

-- name: queue_reset_leases
-- Leased rows are those handed out at least once and still hidden; rows delayed at
-- push time (never delivered) keep their available_at.
UPDATE queue SET available_at = 0
WHERE endpoint = %s AND deliveries > 0 AND available_at > 0

-- name: queue_depth
SELECT count(*) FROM queue

-- name: queue_depth_of
SELECT count(*) FROM queue WHERE endpoint = %s

-- name: queue_next_visible
SELECT min(available_at) FROM queue WHERE endpoint = %s

-- Operators' reads (API, console, metrics); indexes in postgres_0002_listing.sql.

-- name: saga_find
-- The condition comes from a SagaQuery, built by stores/rows.py: saga_query_where; the
-- order (created_at or updated_at, ASC or DESC) from a SagaOrder: saga_find_statements.
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas
WHERE {where}
ORDER BY {column} {direction}, seq {direction}
LIMIT %s OFFSET %s

-- name: saga_find_count
SELECT count(*) FROM sagas WHERE {where}

-- name: outbox_of_saga
SELECT body, published_at FROM outbox WHERE saga_id = %s ORDER BY id

-- name: outbox_oldest_pending
-- Ids come from a sequence and commit out of order, so the oldest row by time is not
-- necessarily the lowest id: min(created_at) over the (small) unpublished tail.
SELECT min(created_at) FROM outbox WHERE published_at IS NULL

-- name: dead_letter_count
SELECT count(*) FROM dead_letters WHERE {where}

-- PostgresTx buffers a transaction's writes and sends them as ONE statement: the parts
-- below that have rows, each a data-modifying CTE named after its part that reads its
-- rows from "<part>_rows", which PostgresTx defines as the elements of one JSON array
-- of arrays (e, in order i): json.dumps in C, where a statement and a parameter per
-- table cost psycopg far more than the server spends on JSON. A final SELECT returns
-- the checked saga ids, or (with COMMIT right behind it) calls sagakit_refuse for rows
-- that were not written (migration 0005), and sends the commit's notifications. The
-- parts never touch the same row: the buffer merges a saga's insert and updates, and a
-- timer's set and cancel, before sending. ORDER BY i keeps rows' order, hence their ids.

-- name: write_sagas_new
-- ON CONFLICT DO NOTHING: a refused insert (either unique key) is missing from
-- RETURNING.
INSERT INTO sagas (saga_id, definition, definition_version, business_key, state, status,
                   version, cursor, correlation_id, created_at, updated_at, deadline_at,
                   reason, cancel_requested, timed_out, data, steps)
SELECT e->>0, e->>1, (e->>2)::integer, e->>3, e->>4, e->>5, (e->>6)::bigint,
       (e->>7)::integer, e->>8, (e->>9)::float8, (e->>10)::float8, (e->>11)::float8,
       e->>12, (e->>13)::boolean, (e->>14)::boolean, e->>15, e->>16
FROM write_sagas_new_rows
ORDER BY i
ON CONFLICT DO NOTHING
RETURNING saga_id

-- name: write_sagas_changed
-- Version-checked (saga_id, definition, business_key and created_at are fixed at
-- insert): a saga missing from RETURNING was at another version.
UPDATE sagas s
SET definition_version = (e->>0)::integer, state = e->>1, status = e->>2,
    version = (e->>3)::bigint, cursor = (e->>4)::integer, correlation_id = e->>5,
    updated_at = (e->>6)::float8, deadline_at = (e->>7)::float8, reason = e->>8,
    cancel_requested = (e->>9)::boolean, timed_out = (e->>10)::boolean, data = e->>11,
    steps = e->>12
FROM write_sagas_changed_rows
WHERE s.saga_id = e->>13 AND s.version = (e->>14)::bigint
RETURNING s.saga_id

-- name: write_inbox
-- Ids that must be new (PostgresTx.inbox_add_new): no ON CONFLICT, a duplicate fails.
INSERT INTO inbox (consumer, message_id, at)
SELECT e->>0, e->>1, (e->>2)::float8 FROM write_inbox_rows

-- name: write_idempotency
-- DO NOTHING: a key another transaction recorded first is missing from RETURNING.
INSERT INTO idempotency (consumer, key, outcome, tombstone, at)
SELECT e->>0, e->>1, e->>2, (e->>3)::boolean, (e->>4)::float8 FROM write_idempotency_rows
ON CONFLICT DO NOTHING
RETURNING consumer, key

-- name: write_history
INSERT INTO saga_history (saga_id, version, at, event, state, status, step, detail, message_id)
SELECT e->>0, (e->>1)::bigint, (e->>2)::float8, e->>3, e->>4, e->>5, e->>6, e->>7, e->>8
FROM write_history_rows
ORDER BY i

-- name: write_timers_gone
DELETE FROM timers t
USING write_timers_gone_rows
WHERE t.saga_id = e->>0 AND t.name = e->>1

-- name: write_timers_set
INSERT INTO timers (saga_id, name, due_at, fence)
SELECT e->>0, e->>1, (e->>2)::float8, e->>3 FROM write_timers_set_rows
ON CONFLICT (saga_id, name) DO UPDATE SET due_at = excluded.due_at, fence = excluded.fence

-- name: write_outbox
-- Ids in the messages' order: the relays publish in id order.
INSERT INTO outbox (message_id, destination, saga_id, body, created_at)
SELECT e->>0, e->>1, e->>2, e->>3, (e->>4)::float8
FROM write_outbox_rows
ORDER BY i

-- name: write_mailbox
-- Ids reserved beforehand (queue_ids): no answer needed.
INSERT INTO queue (id, endpoint, body, enqueued_at, available_at, deliveries)
OVERRIDING SYSTEM VALUE
SELECT (e->>0)::bigint, e->>1, e->>2, (e->>3)::float8, (e->>4)::float8, (e->>5)::integer
FROM write_mailbox_rows

-- name: write_acks
DELETE FROM queue WHERE id IN (SELECT e::bigint FROM write_acks_rows)

-- Inputs set aside for a missing definition version (postgres_0006_set_aside.sql).

-- name: set_aside_add
INSERT INTO set_aside (saga_id, definition, definition_version, kind, body, at)
VALUES (%s, %s, %s, %s, %s, %s)

-- name: set_aside_take
-- In the transaction that applies them: the ids still there. A row another transaction
-- is deleting is waited for, then left out if that one committed.
DELETE FROM set_aside WHERE id = ANY(%(ids)s::bigint[]) RETURNING id

-- name: set_aside_counts
SELECT definition, definition_version, count(*) FROM set_aside
GROUP BY definition, definition_version

-- name: set_aside_claim
-- The caller's clock (a lease only keeps two processes from running one local step
-- twice; a skewed clock costs at most that). The oldest first; rows another claim
-- holds locked are skipped, not waited for.
UPDATE set_aside SET claimed_until = %(until)s
WHERE id IN (SELECT id FROM set_aside
             WHERE (definition, definition_version) IN
                   (SELECT * FROM unnest(%(names)s::text[], %(versions)s::integer[]))
               AND (claimed_until IS NULL OR claimed_until <= %(now)s)
             ORDER BY id LIMIT %(limit)s
             FOR UPDATE SKIP LOCKED)
RETURNING id, saga_id, definition, definition_version, kind, body, at

-- name: set_aside_of_saga
SELECT id, saga_id, definition, definition_version, kind, body, at
FROM set_aside WHERE saga_id = %s ORDER BY id

-- name: saga_count_by_version
-- For `sagakit versions` (a deploy-time read): a scan, no index of its own to keep.
SELECT definition, definition_version, state, count(*)::bigint FROM sagas
GROUP BY definition, definition_version, state
