-- Exact saga counts per state without scanning sagas: count_sagas() sums this table.
-- Triggers append signed deltas in the transaction that changes a saga, so the sum can
-- never drift from the rows (whoever writes them). Appending, not updating one row per
-- state: concurrent transitions would queue on that row until each one's commit (and
-- could deadlock over several); inserts never wait. PostgresStore.count_sagas() folds
-- the deltas into one row per state once they pile up. Statement triggers for inserts
-- and deletes (a bulk load adds one delta per state, not per row); a row trigger for
-- updates, fired only when the state changes (most transitions keep it).
CREATE TABLE saga_counts (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state text NOT NULL,
    n     bigint NOT NULL
);
INSERT INTO saga_counts (state, n) SELECT state, count(*) FROM sagas GROUP BY state;

CREATE FUNCTION saga_counts_inserted() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO saga_counts (state, n) SELECT state, count(*) FROM new_rows GROUP BY state;
    RETURN NULL;
END $$;

CREATE FUNCTION saga_counts_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO saga_counts (state, n) SELECT state, -count(*) FROM old_rows GROUP BY state;
    RETURN NULL;
END $$;

CREATE FUNCTION saga_counts_moved() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO saga_counts (state, n) VALUES (OLD.state, -1), (NEW.state, 1);
    RETURN NULL;
END $$;

CREATE FUNCTION saga_counts_truncated() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM saga_counts;
    RETURN NULL;
END $$;

CREATE TRIGGER sagas_count_insert AFTER INSERT ON sagas
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION saga_counts_inserted();
CREATE TRIGGER sagas_count_delete AFTER DELETE ON sagas
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION saga_counts_deleted();
CREATE TRIGGER sagas_count_update AFTER UPDATE OF state ON sagas
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION saga_counts_moved();
CREATE TRIGGER sagas_count_truncate AFTER TRUNCATE ON sagas
    FOR EACH STATEMENT EXECUTE FUNCTION saga_counts_truncated();
