-- sagakit engine schema for SQLite, step 7: the audit trail of people's decisions.

-- One row per decision a person took (a saga's manual action, a dead letter's replay
-- or discard) and per attempt the API refused, newest read first. A row is written in
-- the transaction of what it records, so the trail can neither miss a decision nor
-- show one that was rolled back. Read by GET /audit (sagakit.runtime.audit).
-- AUTOINCREMENT: ids are never reused, so (at, id) orders rows for good.
CREATE TABLE audit_trail (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    at             REAL NOT NULL,
    actor          TEXT NOT NULL,
    role           TEXT,
    action         TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    saga_id        TEXT,
    dead_letter_id INTEGER,
    reason         TEXT,
    version_before INTEGER,
    version_after  INTEGER,
    detail         TEXT NOT NULL  -- JSON object
);
-- Every filter of GET /audit (saga, actor, action) is an equality followed by a time
-- range, newest first: one index each, plus one for time alone.
CREATE INDEX audit_trail_at_idx ON audit_trail (at, id);
CREATE INDEX audit_trail_saga_idx ON audit_trail (saga_id, at, id);
CREATE INDEX audit_trail_actor_idx ON audit_trail (actor, at, id);
CREATE INDEX audit_trail_action_idx ON audit_trail (action, at, id);

-- A saga's manual decision is the history row 'manual.resolved' (actor, action, reason
-- in its detail), written by whichever code decides (the orchestrator, a choreography's
-- tracker): the trigger copies it here in the same transaction, so no writer can
-- forget it. One decision moves the saga's version by exactly one.
CREATE TRIGGER audit_trail_decision AFTER INSERT ON saga_history
WHEN NEW.event = 'manual.resolved'
BEGIN
    INSERT INTO audit_trail (at, actor, action, outcome, saga_id, reason,
                             version_before, version_after, detail)
    VALUES (NEW.at,
            COALESCE(json_extract(NEW.detail, '$.actor'), ''),
            COALESCE(json_extract(NEW.detail, '$.action'), 'manual'),
            'applied',
            NEW.saga_id,
            json_extract(NEW.detail, '$.reason'),
            NEW.version - 1,
            NEW.version,
            -- The step decided on, the rung chosen; a forced accept_partial says so,
            -- with the holds it left open. (The row's state is the saga's when the
            -- decision was logged, not where it led: the saga's page shows that.)
            json_object('step', NEW.step,
                        'rung', json_extract(NEW.detail, '$.rung'),
                        'forced', CASE WHEN json_extract(NEW.detail, '$.forced')
                                       THEN json('true') END,
                        'holds_left_open',
                        json(json_extract(NEW.detail, '$.holds_left_open'))));
END;
