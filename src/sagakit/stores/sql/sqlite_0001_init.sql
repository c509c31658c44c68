-- sagakit engine schema for SQLite, step 1.
-- Applied by SQLiteStore.open() inside one transaction; recorded in schema_migrations
-- under the namespace "sagakit". Never edit a released step: add a new file instead.

CREATE TABLE sagas (
    saga_id            TEXT PRIMARY KEY,
    definition         TEXT NOT NULL,
    definition_version INTEGER NOT NULL,
    business_key       TEXT NOT NULL,
    state              TEXT NOT NULL,
    status             TEXT NOT NULL,
    version            INTEGER NOT NULL,
    cursor             INTEGER NOT NULL,
    correlation_id     TEXT NOT NULL,
    created_at         REAL NOT NULL,
    updated_at         REAL NOT NULL,
    deadline_at        REAL,
    reason             TEXT,
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    timed_out          INTEGER NOT NULL DEFAULT 0,
    data               TEXT NOT NULL,  -- JSON object
    steps              TEXT NOT NULL,  -- JSON array of per-step states
    UNIQUE (definition, business_key)
);
-- Listing is newest first; the rowid (implicitly in every index) breaks ties in
-- insertion order, which matters under simulated clocks where many sagas share a time.
CREATE INDEX sagas_state_created_idx ON sagas (state, created_at);
CREATE INDEX sagas_created_idx ON sagas (created_at);
-- For sweeps such as "running sagas not touched since ...".
CREATE INDEX sagas_updated_idx ON sagas (updated_at);

-- Append-only; never deleted, so a plain rowid alias already gives increasing ids
-- without AUTOINCREMENT's extra write per insert.
CREATE TABLE saga_history (
    id         INTEGER PRIMARY KEY,
    saga_id    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    at         REAL NOT NULL,
    event      TEXT NOT NULL,
    state      TEXT NOT NULL,
    status     TEXT NOT NULL,
    step       TEXT,
    detail     TEXT NOT NULL,  -- JSON object
    message_id TEXT
);
CREATE INDEX saga_history_saga_idx ON saga_history (saga_id, id);

CREATE TABLE timers (
    saga_id TEXT NOT NULL,
    name    TEXT NOT NULL,
    due_at  REAL NOT NULL,
    fence   TEXT NOT NULL,
    PRIMARY KEY (saga_id, name)
);
-- Matches the ORDER BY of timers_take_due, so no sort step is needed.
CREATE INDEX timers_due_idx ON timers (due_at, saga_id, name);

-- AUTOINCREMENT: ids are never reused, so a stale id held by a relay can never
-- designate a newer row.
CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id    TEXT NOT NULL,
    destination   TEXT,
    body          TEXT NOT NULL,  -- Envelope.to_json()
    created_at    REAL NOT NULL,
    claimed_until REAL,
    published_at  REAL
);
-- Only the unpublished tail is ever scanned by the relay; keep that index small.
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE inbox (
    consumer   TEXT NOT NULL,
    message_id TEXT NOT NULL,
    at         REAL NOT NULL,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;

CREATE TABLE idempotency (
    consumer  TEXT NOT NULL,
    key       TEXT NOT NULL,
    outcome   TEXT NOT NULL,  -- JSON object
    tombstone INTEGER NOT NULL DEFAULT 0,
    at        REAL NOT NULL,
    PRIMARY KEY (consumer, key)
);

-- AUTOINCREMENT: acknowledged rows are deleted, and a late ack of a reused id would
-- delete a different message.
CREATE TABLE queue (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint     TEXT NOT NULL,
    body         TEXT NOT NULL,
    enqueued_at  REAL NOT NULL,
    available_at REAL NOT NULL,
    deliveries   INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX queue_endpoint_available_idx ON queue (endpoint, available_at);

CREATE TABLE dead_letters (
    id         INTEGER PRIMARY KEY,
    endpoint   TEXT NOT NULL,
    message_id TEXT,
    body       TEXT NOT NULL,
    reason     TEXT NOT NULL,
    at         REAL NOT NULL
);
CREATE INDEX dead_letters_endpoint_idx ON dead_letters (endpoint, id);
