-- sagakit engine schema for SQLite, step 4: settling dead letters.

-- A dead letter stays in the table once a person settled it, with who, when and why:
-- the table is also the audit trail of what became of every parked message.
ALTER TABLE dead_letters ADD COLUMN settlement TEXT;  -- 'replayed' or 'discarded'
ALTER TABLE dead_letters ADD COLUMN settled_by TEXT;
ALTER TABLE dead_letters ADD COLUMN settled_at REAL;
ALTER TABLE dead_letters ADD COLUMN settle_reason TEXT;

-- Parked at most once per endpoint *while open*: a redelivery after a crash is still
-- parked once, and a replayed message that fails again is parked anew.
DROP INDEX dead_letters_once;
CREATE UNIQUE INDEX dead_letters_open_once ON dead_letters (endpoint, message_id)
    WHERE message_id IS NOT NULL AND settled_at IS NULL;
-- The open ones are what the health check counts and the operators list first.
CREATE INDEX dead_letters_open_idx ON dead_letters (endpoint, id) WHERE settled_at IS NULL;
