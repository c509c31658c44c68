-- sagakit engine schema for PostgreSQL, step 3: settling dead letters, outbox retention.

-- A dead letter stays in the table once a person settled it, with who, when and why:
-- the table is also the audit trail of what became of every parked message.
ALTER TABLE dead_letters
    ADD COLUMN settlement    text,  -- 'replayed' or 'discarded'
    ADD COLUMN settled_by    text,
    ADD COLUMN settled_at    double precision,
    ADD COLUMN settle_reason text;

-- Parked at most once per endpoint *while open*: a redelivery after a crash is still
-- parked once, and a replayed message that fails again is parked anew.
DROP INDEX dead_letters_once;
CREATE UNIQUE INDEX dead_letters_open_once ON dead_letters (endpoint, message_id)
    WHERE message_id IS NOT NULL AND settled_at IS NULL;
-- The open ones are what the health check counts and the operators list first.
CREATE INDEX dead_letters_open_idx ON dead_letters (endpoint, id) WHERE settled_at IS NULL;

-- outbox_purge finds old published rows through created_at (a row is published after
-- it is created). Rows arrive in increasing created_at: a BRIN index is tiny and nearly
-- free on the insert path, where a B-tree on published_at would cost every relay mark.
-- Building it is one sequential scan of the outbox, during which inserts wait: on an
-- outbox that already grew very large, apply this step in a quiet moment.
CREATE INDEX outbox_created_brin ON outbox USING brin (created_at);
