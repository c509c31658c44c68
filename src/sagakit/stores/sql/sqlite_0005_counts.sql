-- Exact saga counts per state without scanning sagas: count_sagas() reads this table.
-- Kept by triggers in the transaction that changes a saga, so it can never drift from
-- the rows (whoever writes them); SQLite has one writer, so one row per state is no
-- contention. Filled from the rows already there.
CREATE TABLE saga_counts (
    state TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
);
INSERT INTO saga_counts (state, n) SELECT state, count(*) FROM sagas GROUP BY state;

CREATE TRIGGER sagas_count_insert AFTER INSERT ON sagas
BEGIN
    INSERT INTO saga_counts (state, n) VALUES (NEW.state, 1)
    ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER sagas_count_update AFTER UPDATE OF state ON sagas
WHEN OLD.state <> NEW.state
BEGIN
    UPDATE saga_counts SET n = n - 1 WHERE state = OLD.state;
    INSERT INTO saga_counts (state, n) VALUES (NEW.state, 1)
    ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER sagas_count_delete AFTER DELETE ON sagas
BEGIN
    UPDATE saga_counts SET n = n - 1 WHERE state = OLD.state;
END;
