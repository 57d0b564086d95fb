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

-- name: objects_up_to
-- The online objects, if there are at most $1 (one more tells there are more), for the demo's
-- events.
SELECT id, last_seen FROM objects ORDER BY id LIMIT $1 + 1;

-- name: recent_dead_letters
-- The newest dead letters, for the demo's events.
SELECT callback_id, object_id, reason FROM dead_letters ORDER BY created_at DESC LIMIT $1;

-- name: newest_callback
-- The newest callback's id (0 for none), for the demo's events.
SELECT coalesce(max(id), 0) FROM callbacks;

-- name: retries_after
-- Callbacks made by retrying dead letters, after callback $1, for the demo's events.
SELECT id, retry_of, object_ids FROM callbacks WHERE retry_of IS NOT NULL AND id > $1
ORDER BY id;

-- name: is_superuser
-- May this role change the server's configuration (ALTER SYSTEM)?
SELECT rolsuper FROM pg_roles WHERE rolname = current_user;

-- name: writable_session
-- This session takes writes whatever the server's default says (to undo a read-only fault).
SET default_transaction_read_only = off;

-- name: refuse_writes
-- Every new transaction on the server read-only (SQLSTATE 25006 on writes), once reloaded.
ALTER SYSTEM SET default_transaction_read_only = on;

-- name: take_writes
-- The server's default for read-only transactions back to its own, once reloaded.
ALTER SYSTEM RESET default_transaction_read_only;

-- name: reload_configuration
-- Every server process rereads the configuration (open sessions included).
SELECT pg_reload_conf();
