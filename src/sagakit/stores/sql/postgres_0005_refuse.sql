-- A buffered write that did not apply, found by the statement that carries it
-- (PostgresTx sends a transaction's last writes and COMMIT together: the check must
-- fail the transaction itself, not wait for the client to read RETURNING). A saga not
-- written raises SQLSTATE SK001, which PostgresStore turns into ConcurrencyError with
-- this message; an idempotency key recorded before raises SK002 (StoreError).
-- `missing` holds the part's rows that were not written (JSON arrays in the order of
-- the write_* part's columns); the first one is reported.
-- PL/pgSQL runs each query with a fresh snapshot (READ COMMITTED), so the version it
-- reports is the one the winning transaction committed.
CREATE FUNCTION sagakit_refuse(verb text, missing jsonb) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    first jsonb := missing -> 0;
    found bigint;
BEGIN
    IF verb = 'idempotency' THEN
        RAISE EXCEPTION USING ERRCODE = 'SK002',
            MESSAGE = format('idempotency key %s of consumer %s is already recorded; read it '
                             'with idempotency_get before writing',
                             quote_literal(first ->> 1), quote_literal(first ->> 0));
    END IF;
    IF verb = 'insert' THEN
        IF EXISTS (SELECT 1 FROM sagas WHERE saga_id = first ->> 0) THEN
            RAISE EXCEPTION USING ERRCODE = 'SK001',
                MESSAGE = format('saga %s already exists', first ->> 0);
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'SK001',
            MESSAGE = format('a %s saga already exists for business key %s',
                             first ->> 1, quote_literal(first ->> 3));
    END IF;
    SELECT version INTO found FROM sagas WHERE saga_id = first ->> 13;
    RAISE EXCEPTION USING ERRCODE = 'SK001',
        MESSAGE = format('saga %s was not updated: expected version %s, but %s; reload it '
                         'and recompute the transition', first ->> 13, first ->> 14,
                         CASE WHEN found IS NULL THEN 'it does not exist'
                              ELSE 'it is at version ' || found END);
END $$;
