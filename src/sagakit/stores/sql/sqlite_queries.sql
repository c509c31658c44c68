-- Every statement SQLiteStore runs, by name. Each block starts with "-- name: <name>"
-- and runs as one statement with qmark parameters. Batches go through executemany, and
-- variable-length id lists are passed as one JSON array (json_each) so that every
-- statement text stays constant and prepared statements are reused from the cache.

-- name: schema_migrations_create
CREATE TABLE IF NOT EXISTS schema_migrations (
    namespace  TEXT NOT NULL,
    step       INTEGER NOT NULL,
    applied_at REAL NOT NULL,
    PRIMARY KEY (namespace, step)
)

-- name: migration_applied
SELECT 1 FROM schema_migrations WHERE namespace = ? AND step = ?

-- name: migration_steps
SELECT step FROM schema_migrations WHERE namespace = ?

-- name: migration_record
INSERT INTO schema_migrations (namespace, step, applied_at) VALUES (?, ?, ?)

-- name: saga_get
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas WHERE saga_id = ?

-- name: saga_read
-- A plain read by id (on SQLite the same text as saga_get: the writer's transaction
-- needs no lock clause).
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas WHERE saga_id = ?

-- name: saga_get_many
-- A batch's sagas in one statement (the ids as one JSON array): a statement per saga
-- cost more in Python than SQLite spent on it.
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas WHERE saga_id IN (SELECT value FROM json_each(?))

-- name: saga_get_by_key
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas WHERE definition = ? AND business_key = ?

-- name: saga_insert
INSERT INTO sagas (saga_id, definition, definition_version, business_key, state, status,
                   version, cursor, correlation_id, created_at, updated_at, deadline_at,
                   reason, cancel_requested, timed_out, data, steps)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)

-- name: saga_update
-- saga_id, definition, business_key and created_at are fixed at insert.
UPDATE sagas
SET definition_version = ?, state = ?, status = ?, version = ?, cursor = ?,
    correlation_id = ?, updated_at = ?, deadline_at = ?, reason = ?,
    cancel_requested = ?, timed_out = ?, data = ?, steps = ?
WHERE saga_id = ? AND version = ?

-- name: saga_list
-- Optional filters are written as ":x IS NULL OR ..." so that one prepared statement
-- serves every combination; the states filter is a JSON array. Named parameters, as
-- in PostgreSQL's text of it.
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas
WHERE (:states IS NULL OR state IN (SELECT value FROM json_each(:states)))
  AND (:definition IS NULL OR definition = :definition)
ORDER BY created_at DESC, rowid DESC
LIMIT :limit OFFSET :offset

-- name: saga_oldest_update
-- The metric of the oldest manual case: its rows found through sagas_state_created_idx.
SELECT min(updated_at) FROM sagas WHERE state IN (SELECT value FROM json_each(:states))

-- name: saga_count
-- Kept by triggers (migration 0003): no scan of sagas.
SELECT state, n FROM saga_counts WHERE n > 0

-- name: history_add
INSERT INTO saga_history (saga_id, version, at, event, state, status, step, detail, message_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)

-- name: history
SELECT saga_id, version, at, event, state, status, step, detail, message_id
FROM saga_history WHERE saga_id = ? ORDER BY id

-- name: timer_set
INSERT OR REPLACE INTO timers (saga_id, name, due_at, fence) VALUES (?, ?, ?, ?)

-- name: timer_cancel
DELETE FROM timers WHERE saga_id = ? AND name = ?

-- name: timers_take_due
-- RETURNING yields rows in no promised order; the caller sorts them.
DELETE FROM timers
WHERE rowid IN (SELECT rowid FROM timers WHERE due_at <= ?
                ORDER BY due_at, saga_id, name LIMIT ?)
RETURNING saga_id, name, due_at, fence

-- name: timer_next_due
SELECT min(due_at) FROM timers

-- name: inbox_add
INSERT OR IGNORE INTO inbox (consumer, message_id, at) VALUES (?, ?, ?)

-- name: inbox_add_many
-- RETURNING names the new ones; an id given twice conflicts with its first copy.
-- ("WHERE true": SQLite's parser needs it between a SELECT and ON CONFLICT.)
INSERT INTO inbox (consumer, message_id, at)
SELECT ?, value, ? FROM json_each(?) WHERE true
ON CONFLICT DO NOTHING
RETURNING message_id

-- name: inbox_ids
SELECT message_id FROM inbox WHERE consumer = ?

-- name: inbox_has
SELECT 1 FROM inbox WHERE consumer = ? AND message_id = ?

-- name: inbox_purge
DELETE FROM inbox WHERE at < ?

-- name: idempotency_get
SELECT outcome, tombstone, at FROM idempotency WHERE consumer = ? AND key = ?

-- name: idempotency_get_many
SELECT key, outcome, tombstone, at FROM idempotency
WHERE consumer = ? AND key IN (SELECT value FROM json_each(?))

-- name: idempotency_put
INSERT INTO idempotency (consumer, key, outcome, tombstone, at) VALUES (?, ?, ?, ?, ?)

-- name: outbox_add
INSERT INTO outbox (message_id, destination, saga_id, body, created_at) VALUES (?, ?, ?, ?, ?)

-- name: outbox_claim
-- RETURNING yields rows in no promised order; the caller sorts them by id.
UPDATE outbox SET claimed_until = ?
WHERE id IN (SELECT id FROM outbox
             WHERE published_at IS NULL AND (claimed_until IS NULL OR claimed_until <= ?)
             ORDER BY id LIMIT ?)
RETURNING id, body

-- name: outbox_mark_published
-- The first publication time is kept when a row is published twice (lease expired).
UPDATE outbox SET published_at = ?
WHERE id IN (SELECT value FROM json_each(?)) AND published_at IS NULL

-- name: outbox_purge
-- One batch, oldest first by rowid: old published rows sit at the front of the table.
-- created_at < cutoff follows from published_at < cutoff; it is there so that both
-- dialects take the same parameters (cutoff, cutoff, limit).
DELETE FROM outbox WHERE id IN (SELECT id FROM outbox
                                WHERE created_at < ? AND published_at < ?
                                ORDER BY id LIMIT ?)

-- name: outbox_pending
SELECT count(*) FROM outbox WHERE published_at IS NULL

-- name: outbox_all
SELECT body, published_at FROM outbox ORDER BY id

-- name: dead_letter_add
INSERT OR IGNORE INTO dead_letters (endpoint, message_id, body, reason, at) VALUES (?, ?, ?, ?, ?)

-- name: dead_letters_page
-- The condition comes from stores/rows.py: dead_letter_where.
SELECT id, endpoint, message_id, body, reason, at, settlement, settled_by, settled_at, settle_reason
FROM dead_letters WHERE {where} ORDER BY id LIMIT ? OFFSET ?

-- name: dead_letter_get
SELECT id, endpoint, message_id, body, reason, at, settlement, settled_by, settled_at, settle_reason
FROM dead_letters WHERE id = ?

-- name: dead_letter_settle
UPDATE dead_letters SET settlement = ?, settled_by = ?, settled_at = ?, settle_reason = ?
WHERE id = ? AND settled_at IS NULL

-- name: queue_push
INSERT INTO queue (endpoint, body, enqueued_at, available_at) VALUES (?, ?, ?, ?)

-- name: queue_add
-- Inside a transaction (Tx.queue_add); deliveries is 1 for a message its writer leases.
INSERT INTO queue (endpoint, body, enqueued_at, available_at, deliveries) VALUES (?, ?, ?, ?, ?)

-- name: queue_fetch
-- RETURNING yields rows in no promised order; the caller sorts them by id.
UPDATE queue SET deliveries = deliveries + 1, available_at = ?
WHERE id IN (SELECT id FROM queue WHERE endpoint = ? AND available_at <= ?
             ORDER BY id LIMIT ?)
RETURNING id, endpoint, body, deliveries, enqueued_at

-- name: queue_ack
DELETE FROM queue WHERE id IN (SELECT value FROM json_each(?))

-- name: queue_retry
UPDATE queue SET available_at = ?, last_error = ? WHERE id = ?

-- name: queue_reset_leases
-- Leased rows are those handed out at least once and still hidden; rows delayed at
-- push time (never delivered) keep their available_at.
UPDATE queue SET available_at = 0
WHERE endpoint = ? AND deliveries > 0 AND available_at > 0

-- name: queue_depth
SELECT count(*) FROM queue

-- name: queue_depth_of
-- Separate from queue_depth: an "? IS NULL OR" filter would keep the index unused.
SELECT count(*) FROM queue WHERE endpoint = ?

-- name: queue_next_visible
SELECT min(available_at) FROM queue WHERE endpoint = ?

-- Operators' reads (API, console, metrics); indexes in sqlite_0003_listing.sql.

-- name: saga_find
-- The condition comes from a SagaQuery, built by stores/rows.py: saga_query_where; the
-- order (created_at or updated_at, ASC or DESC) from a SagaOrder: saga_find_statements.
SELECT saga_id, definition, definition_version, business_key, state, status, version,
       cursor, correlation_id, created_at, updated_at, deadline_at, reason,
       cancel_requested, timed_out, data, steps
FROM sagas
WHERE {where}
ORDER BY {column} {direction}, rowid {direction}
LIMIT ? OFFSET ?

-- name: saga_find_count
SELECT count(*) FROM sagas WHERE {where}

-- name: outbox_of_saga
SELECT body, published_at FROM outbox WHERE saga_id = ? ORDER BY id

-- name: outbox_oldest_pending
-- The first row of the relay's partial index; ids grow with time.
SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1

-- name: dead_letter_count
SELECT count(*) FROM dead_letters WHERE {where}


-- Inputs set aside for a missing definition version (sqlite_0006_set_aside.sql).

-- name: set_aside_add
INSERT INTO set_aside (saga_id, definition, definition_version, kind, body, at)
VALUES (?, ?, ?, ?, ?, ?)

-- name: set_aside_take
-- In the transaction that applies them: the ids still there (another process may have
-- applied some after their lease ran out).
DELETE FROM set_aside WHERE id IN (SELECT value FROM json_each(?)) RETURNING id

-- name: set_aside_counts
SELECT definition, definition_version, count(*) FROM set_aside
GROUP BY definition, definition_version

-- name: set_aside_claim
-- The versions as one JSON array of [definition, version] pairs; the oldest first.
-- RETURNING yields rows in no promised order; the caller sorts them by id.
UPDATE set_aside SET claimed_until = ?
WHERE id IN (SELECT id FROM set_aside
             WHERE (definition, definition_version) IN
                   (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]')
                    FROM json_each(?))
               AND (claimed_until IS NULL OR claimed_until <= ?)
             ORDER BY id LIMIT ?)
RETURNING id, saga_id, definition, definition_version, kind, body, at

-- name: set_aside_of_saga
SELECT id, saga_id, definition, definition_version, kind, body, at
FROM set_aside WHERE saga_id = ? ORDER BY id

-- name: saga_count_by_version
-- For `sagakit versions` (a deploy-time read): a scan, no index of its own to keep.
SELECT definition, definition_version, state, count(*) FROM sagas
GROUP BY definition, definition_version, state
