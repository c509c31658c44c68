-- sagakit engine schema for SQLite, step 3: what the operators' reads need.

-- find_sagas filtered by definition (and version), newest first. No index covers the
-- cursor (the "step" filter): it changes at every step; this one narrows first.
CREATE INDEX sagas_definition_created_idx ON sagas (definition, definition_version, created_at);

-- outbox_of_saga: the saga id as a column, written by outbox_add. (An index on the
-- JSON expression would parse every body on insert, and make the insert fail for a
-- body that is not strict JSON: Python writes NaN as a bare word.)
ALTER TABLE outbox ADD COLUMN saga_id TEXT;
-- Rows written before this step; a body SQLite cannot parse keeps NULL.
UPDATE outbox SET saga_id = json_extract(body, '$.saga_id') WHERE json_valid(body);
CREATE INDEX outbox_saga_idx ON outbox (saga_id) WHERE saga_id IS NOT NULL;
