-- sagakit engine schema for SQLite, step 3: indexes for the operators' reads.
-- Only new indexes: no column changes, so nothing on the transition path writes more
-- than the index entries themselves.

-- find_sagas filtered by definition (and version), newest first. No index covers the
-- cursor (the "step" filter): it changes at every step; this one narrows first.
CREATE INDEX sagas_definition_created_idx ON sagas (definition, definition_version, created_at);

-- outbox_of_saga: the saga id is inside the envelope, so the index is on that
-- expression (queries must spell it exactly so). It costs one JSON parse per outbox
-- insert, which is far below the commit it rides with.
CREATE INDEX outbox_saga_idx ON outbox (json_extract(body, '$.saga_id'));
