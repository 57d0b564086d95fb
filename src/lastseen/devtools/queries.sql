-- The statements only the tools ask (the demo, the benchmark); the service's are in
-- storage/queries.sql.

-- name: empty_tables
-- Empties every table of a database that is the demo's own, so that it holds one run only.
TRUNCATE callbacks, objects, observations, dead_letters, pending_ids, reaper_cursor,
    idempotency_keys RESTART IDENTITY;

-- name: holds_data
-- Does the database hold any callback or object?
SELECT EXISTS (SELECT 1 FROM callbacks) OR EXISTS (SELECT 1 FROM objects);

-- name: server_version
-- The PostgreSQL server's version, for reports.
SHOW server_version;

-- name: wal_position
-- How many bytes of WAL the server has written so far, for reports of WAL per unit of work.
SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn;

-- name: count_callbacks
-- How many callbacks are stored, done or not.
SELECT count(*) FROM callbacks;

-- name: count_retries
-- Callbacks made by retrying dead letters, and how many of them are processed.
SELECT count(*), count(*) FILTER (WHERE done_at IS NOT NULL) FROM callbacks
WHERE retry_of IS NOT NULL;
