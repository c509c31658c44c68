-- sagakit engine schema for PostgreSQL, step 2: indexes for the operators' reads.
-- Only new indexes on columns (or expressions of columns) that a transition never
-- changes, so saga updates stay HOT.

-- find_sagas filtered by definition (and version), newest first. No index covers the
-- cursor (the "step" filter): it changes at every step, and indexing it would make
-- every transition a non-HOT update; this one narrows first.
CREATE INDEX sagas_definition_created_idx
    ON sagas (definition, definition_version, created_at DESC, seq DESC);

-- outbox_of_saga: the saga id is inside the envelope (text), so the index is on that
-- expression (queries must spell it exactly so). It costs one JSON parse per outbox
-- insert, which is far below the commit it rides with.
CREATE INDEX outbox_saga_idx ON outbox (((body::jsonb) ->> 'saga_id'));
