-- sagakit engine schema for PostgreSQL, step 7: the audit trail of people's decisions.

-- One row per decision a person took (a saga's manual action, a dead letter's replay
-- or discard) and per attempt the API refused, newest read first. A row is written in
-- the transaction of what it records, so the trail can neither miss a decision nor
-- show one that was rolled back. Read by GET /audit (sagakit.runtime.audit).
CREATE TABLE audit_trail (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             double precision NOT NULL,
    actor          text NOT NULL,
    role           text,
    action         text NOT NULL,
    outcome        text NOT NULL,
    saga_id        text,
    dead_letter_id bigint,
    reason         text,
    version_before bigint,
    version_after  bigint,
    detail         text NOT NULL  -- JSON object
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
-- forget it. The WHEN clause is checked without calling the function, so the other
-- history rows (nearly all of them) cost nothing more. One decision moves the saga's
-- version by exactly one.
CREATE FUNCTION audit_trail_decision() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    d jsonb := NEW.detail::jsonb;
BEGIN
    INSERT INTO audit_trail (at, actor, action, outcome, saga_id, reason,
                             version_before, version_after, detail)
    VALUES (NEW.at, COALESCE(d ->> 'actor', ''), COALESCE(d ->> 'action', 'manual'),
            'applied', NEW.saga_id, d ->> 'reason', NEW.version - 1, NEW.version,
            -- The step decided on, the rung chosen; a forced accept_partial says so,
            -- with the holds it left open. (The row's state is the saga's when the
            -- decision was logged, not where it led: the saga's page shows that.)
            jsonb_build_object('step', NEW.step,
                               'rung', d -> 'rung', 'forced', d -> 'forced',
                               'holds_left_open', d -> 'holds_left_open')::text);
    RETURN NULL;
END $$;

CREATE TRIGGER audit_trail_decision AFTER INSERT ON saga_history
    FOR EACH ROW WHEN (NEW.event = 'manual.resolved') EXECUTE FUNCTION audit_trail_decision();
