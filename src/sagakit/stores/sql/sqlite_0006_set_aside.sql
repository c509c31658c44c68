-- sagakit engine schema for SQLite, step 6: inputs set aside for a missing definition version.

-- A reply, a local step's command or a fired timer of a saga whose definition version
-- the process that got it does not have. It waits here (its inbox entry was recorded
-- in the same transaction, so duplicates are still recognised) until a process that
-- has the version claims it (claimed_until: a lease, so two such processes do not run
-- one local step twice) and applies it, deleting the row in the applying transaction.
-- kind: 'reply' and 'local' keep the message (Envelope.to_json()), 'timer' the timer.
-- AUTOINCREMENT: the order of a saga's inputs is their id order, never reused.
CREATE TABLE set_aside (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    saga_id            TEXT NOT NULL,
    definition         TEXT NOT NULL,
    definition_version INTEGER NOT NULL,
    kind               TEXT NOT NULL,
    body               TEXT NOT NULL,
    at                 REAL NOT NULL,
    claimed_until      REAL
);
CREATE INDEX set_aside_version_idx ON set_aside (definition, definition_version, id);
CREATE INDEX set_aside_saga_idx ON set_aside (saga_id, id);

