-- sagakit engine schema for PostgreSQL, step 2: what the operators' reads need. Only
-- indexes on columns that a transition never changes, so saga updates stay HOT.

-- find_sagas filtered by definition (and version), newest first. No index covers the
-- cursor (the "step" filter): it changes at every step, and indexing it would make
-- every transition a non-HOT update; this one narrows first.
CREATE INDEX sagas_definition_created_idx
    ON sagas (definition, definition_version, created_at DESC, seq DESC);

-- outbox_of_saga: the saga id as a column, written by outbox_add. (An index on
-- (body::jsonb ->> 'saga_id') would parse every body on insert, several microseconds
-- of server time each, and make the insert fail for a body that is not strict JSON:
-- Python writes NaN as a bare word.)
ALTER TABLE outbox ADD COLUMN saga_id text;
-- Rows written before this step. If some body is not JSON PostgreSQL accepts, the
-- set-based update fails as a whole: then row by row, leaving those rows NULL.
DO $$
DECLARE
    r record;
BEGIN
    UPDATE outbox SET saga_id = body::jsonb ->> 'saga_id';
EXCEPTION WHEN invalid_text_representation THEN
    FOR r IN SELECT id, body FROM outbox LOOP
        BEGIN
            UPDATE outbox SET saga_id = r.body::jsonb ->> 'saga_id' WHERE id = r.id;
        EXCEPTION WHEN invalid_text_representation THEN
            NULL;
        END;
    END LOOP;
END
$$;
CREATE INDEX outbox_saga_idx ON outbox (saga_id, id) WHERE saga_id IS NOT NULL;
