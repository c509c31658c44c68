-- sagakit engine schema for PostgreSQL, step 1.
-- Applied by PostgresStore.open() in one transaction, under an advisory lock, in the
-- store's schema (search_path); recorded in schema_migrations under the namespace
-- "sagakit". Never edit a released step: add a new file instead.
--
-- Times are epoch seconds in double precision, as the runtime passes them; JSON is
-- kept as text (decoded by the store, as on SQLite): no parse on the hot write path,
-- and a value the caller wrote comes back byte for byte.

-- fillfactor: room on each page for HOT updates, since every transition rewrites its
-- saga row. No index covers updated_at, which changes on every update: an index on a
-- changing column would make every update a non-HOT one.
CREATE TABLE sagas (
    saga_id            text PRIMARY KEY,
    seq                bigint GENERATED ALWAYS AS IDENTITY,  -- insertion order for ties
    definition         text NOT NULL,
    definition_version integer NOT NULL,
    business_key       text NOT NULL,
    state              text NOT NULL,
    status             text NOT NULL,
    version            bigint NOT NULL,
    cursor             integer NOT NULL,
    correlation_id     text NOT NULL,
    created_at         double precision NOT NULL,
    updated_at         double precision NOT NULL,
    deadline_at        double precision,
    reason             text,
    cancel_requested   boolean NOT NULL DEFAULT false,
    timed_out          boolean NOT NULL DEFAULT false,
    data               text NOT NULL,  -- JSON object
    steps              text NOT NULL,  -- JSON array of per-step states
    UNIQUE (definition, business_key)
) WITH (fillfactor = 80);
CREATE INDEX sagas_created_idx ON sagas (created_at DESC, seq DESC);
CREATE INDEX sagas_state_created_idx ON sagas (state, created_at DESC, seq DESC);

-- Append-only. Identity values are never rolled back or reused.
CREATE TABLE saga_history (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id    text NOT NULL,
    version    bigint NOT NULL,
    at         double precision NOT NULL,
    event      text NOT NULL,
    state      text NOT NULL,
    status     text NOT NULL,
    step       text,
    detail     text NOT NULL,  -- JSON object
    message_id text
);
CREATE INDEX saga_history_saga_idx ON saga_history (saga_id, id);

-- COLLATE "C": ties on due_at are taken in (saga_id, name) byte order, the order of
-- the other stores, whatever the database's default collation.
CREATE TABLE timers (
    saga_id text COLLATE "C" NOT NULL,
    name    text COLLATE "C" NOT NULL,
    due_at  double precision NOT NULL,
    fence   text NOT NULL,
    PRIMARY KEY (saga_id, name)
);
-- Matches the ORDER BY of timers_take_due, so no sort step is needed.
CREATE INDEX timers_due_idx ON timers (due_at, saga_id, name);

-- Ids come from a sequence and commit out of order: the relay claims unpublished rows
-- with FOR UPDATE SKIP LOCKED, never "id > last seen".
CREATE TABLE outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    text NOT NULL,
    destination   text,
    body          text NOT NULL,  -- Envelope.to_json()
    created_at    double precision NOT NULL,
    claimed_until double precision,
    published_at  double precision
);
-- Only the unpublished tail is ever scanned by the relay; keep that index small.
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE inbox (
    consumer   text NOT NULL,
    message_id text NOT NULL,
    at         double precision NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
-- Rows arrive in roughly increasing "at": a BRIN index is tiny, nearly free to
-- maintain, and spares inbox_purge a full scan.
CREATE INDEX inbox_at_brin ON inbox USING brin (at);

CREATE TABLE idempotency (
    consumer  text NOT NULL,
    key       text NOT NULL,
    outcome   text NOT NULL,  -- JSON object
    tombstone boolean NOT NULL DEFAULT false,
    at        double precision NOT NULL,
    PRIMARY KEY (consumer, key)
);

-- Acknowledged rows are deleted; identity values are never reused, so a late ack of
-- an old id cannot delete a different message.
CREATE TABLE queue (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint     text NOT NULL,
    body         text NOT NULL,
    enqueued_at  double precision NOT NULL,
    available_at double precision NOT NULL,
    deliveries   integer NOT NULL DEFAULT 0,
    last_error   text
);
CREATE INDEX queue_endpoint_available_idx ON queue (endpoint, available_at);

CREATE TABLE dead_letters (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint   text NOT NULL,
    message_id text,
    body       text NOT NULL,
    reason     text NOT NULL,
    at         double precision NOT NULL
);
CREATE INDEX dead_letters_endpoint_idx ON dead_letters (endpoint, id);
-- A message is parked at most once per endpoint: a relay or consumer that dies after
-- parking and before acknowledging parks it again on redelivery, harmlessly.
CREATE UNIQUE INDEX dead_letters_once ON dead_letters (endpoint, message_id)
    WHERE message_id IS NOT NULL;
