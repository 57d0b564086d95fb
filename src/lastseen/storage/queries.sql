-- Every statement lastseen runs, by name. The line after the name says what it is for.
-- Multi-row work takes arrays and unnests them: one round trip per batch, never one per row.

-- name: take_migration_lock
-- Serializes the migrations of instances that start together (until the transaction ends).
SELECT pg_advisory_xact_lock($1);

-- name: has_migrations_table
-- Whether the bookkeeping table exists: asked first, because CREATE TABLE IF NOT EXISTS needs
-- CREATE on the schema even when the table is there, which a serving role should not have.
SELECT to_regclass('lastseen_migrations') IS NOT NULL;

-- name: create_migrations_table
-- The bookkeeping of which migrations a database has.
CREATE TABLE IF NOT EXISTS lastseen_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
-- The versions this database has.
SELECT version FROM lastseen_migrations;

-- name: record_migration
-- Notes migration $1 (named $2) as applied.
INSERT INTO lastseen_migrations (version, name) VALUES ($1, $2);

-- name: insert_callbacks
-- Stores a group commit's callbacks: $1 receive times (epoch seconds), $2 each one's ids as an
-- array literal ('{1,2,3}'): one text value per callback is far cheaper to send than hundreds
-- of array elements.
INSERT INTO callbacks (received_at, object_ids, locked_until)
SELECT to_timestamp(r.received_at), r.ids::bigint[], now()
FROM unnest($1::float8[], $2::text[]) WITH ORDINALITY AS r(received_at, ids, ord)
ORDER BY r.ord
RETURNING id;

-- name: insert_keyed_callbacks
-- Stores callbacks that carry a unique key ($1 receive times in epoch seconds, $2 id array
-- literals, $3 keys: an imported file's position, or a spool key) unless a callback with the
-- same key is already stored, so that a repeated import or drain stores nothing twice.
-- Returns the stored.
INSERT INTO callbacks (received_at, object_ids, locked_until, source)
SELECT to_timestamp(r.received_at), r.ids::bigint[], now(), r.source
FROM unnest($1::float8[], $2::text[], $3::text[]) AS r(received_at, ids, source)
ON CONFLICT (source) WHERE source IS NOT NULL DO NOTHING
RETURNING id;

-- name: insert_idempotent_callbacks
-- Stores the keyed callbacks of a group commit ($1 receive times in epoch seconds, $2 id array
-- literals, $3 idempotency keys, all distinct, $4 the digests of the ids) whose keys are not
-- taken yet. Returns the key and callback id of each one stored now; a key already
-- taken has no row (ask keyed_callbacks then, in a statement of its own, which also sees a
-- transaction that committed while this one ran). Not a join with idempotency_keys here: with one,
-- PostgreSQL's CPU per signed request grew with the table (125, 191, 307 us over three bench
-- rounds; 86 to 96 us without it, docs/explanation/design-decisions.md).
WITH input AS (
    SELECT * FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[])
        AS r(received_at, ids, key, digest)
), claimed AS (
    INSERT INTO idempotency_keys (key, callback_id, digest)
    -- In key order: two batches that share keys then lock them in the same order, and one
    -- waits for the other instead of deadlocking.
    SELECT key, nextval('callbacks_id_seq'), digest FROM input
    ORDER BY key
    ON CONFLICT (key) DO NOTHING
    RETURNING key, callback_id
), stored AS (
    INSERT INTO callbacks (id, received_at, object_ids, locked_until)
    SELECT claimed.callback_id, to_timestamp(input.received_at), input.ids::bigint[], now()
    FROM claimed JOIN input USING (key)
    RETURNING id
)
SELECT key, callback_id FROM claimed;

-- name: keyed_callbacks
-- The callback id and digest stored under each of the idempotency keys $1.
SELECT key, callback_id, digest FROM idempotency_keys WHERE key = ANY($1::text[]);

-- name: notify_inbox
-- Wakes the workers. Its own transaction, with asynchronous commit: NOTIFY holds a cluster-wide
-- lock until its commit is flushed, which would serialize the durable commits if they notified.
BEGIN;
SET LOCAL synchronous_commit = off;
SELECT pg_notify('lastseen_inbox', '');
COMMIT;

-- name: claim_callbacks
-- Leases up to $2 claimable callbacks (new, released, or with a lapsed lease) to worker $1 for
-- $3 s, newest first: under a backlog the newest callbacks are the ones whose results matter
-- longest, and the older ones expire in bulk once past the TTL (freshness first).
WITH claimable AS (
    SELECT id FROM callbacks
    WHERE done_at IS NULL AND locked_until <= now()
    ORDER BY received_at DESC
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE callbacks AS c
SET locked_until = now() + make_interval(secs => $3), locked_by = $1, claims = c.claims + 1
FROM claimable
WHERE c.id = claimable.id
RETURNING c.id, c.received_at, c.object_ids, c.claims;

-- name: extend_leases
-- Renews worker $1's leases on the callbacks $2 for another $3 s; returns the ones it still holds.
-- Rows are locked in id order, like complete_callbacks, so the two cannot deadlock.
WITH mine AS (
    SELECT id FROM callbacks
    WHERE id = ANY($2::bigint[]) AND locked_by = $1 AND done_at IS NULL
    ORDER BY id FOR UPDATE
)
UPDATE callbacks AS c
SET locked_until = now() + make_interval(secs => $3)
FROM mine WHERE c.id = mine.id
RETURNING c.id;

-- name: release_callbacks
-- Hands worker $1's unfinished callbacks $2 back to the inbox at once (used on shutdown).
UPDATE callbacks
SET locked_until = now(), locked_by = NULL
WHERE id = ANY($2::bigint[]) AND locked_by = $1 AND done_at IS NULL;

-- name: release_holder
-- Hands back every unfinished callback leased to $1: what a crashed predecessor of that name
-- held, taken back at once instead of when its leases would run out. Returns how many.
WITH theirs AS (
    SELECT id FROM callbacks WHERE locked_by = $1 AND done_at IS NULL ORDER BY id FOR UPDATE
)
UPDATE callbacks AS c SET locked_until = now(), locked_by = NULL
FROM theirs WHERE c.id = theirs.id;

-- name: record_observations
-- Records results ($1 ids, $2 receive times in microseconds since the epoch, $3 online: array
-- literals, see result_arrays) that are newer than what is known for their id. The ids must be
-- distinct. Locks each id's row until the transaction ends.
INSERT INTO observations AS o (id, seen_at, online)
SELECT r.id, 'epoch'::timestamptz + r.us * interval '1 microsecond', r.online
FROM unnest($1::text::bigint[], $2::text::bigint[], $3::text::boolean[]) AS r(id, us, online)
ORDER BY r.id
ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, online = excluded.online
WHERE o.seen_at < excluded.seen_at;

-- name: apply_newest
-- Makes objects follow the results that are now the newest for their id (run right after
-- record_observations, in the same transaction): online -> upsert if newer than the cutoff $4,
-- offline -> delete. Returns (rows upserted, rows deleted).
WITH results AS (
    SELECT r.id, 'epoch'::timestamptz + r.us * interval '1 microsecond' AS seen_at, r.online
    FROM unnest($1::text::bigint[], $2::text::bigint[], $3::text::boolean[]) AS r(id, us, online)
), newest AS (
    SELECT r.id, r.seen_at, r.online
    FROM results AS r
    JOIN observations AS o ON o.id = r.id AND o.seen_at = r.seen_at AND o.online = r.online
    ORDER BY r.id
), gone AS (
    -- The row check matters when the observation that made the row was pruned meanwhile.
    DELETE FROM objects AS obj USING newest
    WHERE obj.id = newest.id AND NOT newest.online AND obj.last_seen <= newest.seen_at
    RETURNING 1
), seen AS (
    INSERT INTO objects AS obj (id, last_seen)
    SELECT id, seen_at FROM newest WHERE online AND seen_at > $4
    ON CONFLICT (id) DO UPDATE SET
        last_seen = excluded.last_seen,
        -- A mark from the callback this result answers, or an older one, has done its work.
        kept_for = CASE WHEN obj.kept_for > excluded.last_seen THEN obj.kept_for END
    WHERE obj.last_seen < excluded.last_seen
    RETURNING 1
)
SELECT (SELECT count(*) FROM seen) AS upserted, (SELECT count(*) FROM gone) AS deleted;

-- name: insert_dead_letters
-- Records ids that could not be looked up, one row per callback and id, and clears the reaper's
-- mark on those objects when it came from such a callback: their reaper decides again.
WITH letters AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[],
                         $6::int[])
        AS d(callback_id, object_id, received_at, reason, detail, attempts)
), stored AS (
    INSERT INTO dead_letters AS d
        (callback_id, object_id, received_at, reason, detail, attempts)
    SELECT * FROM letters
    ON CONFLICT (callback_id, object_id) DO UPDATE
    SET reason = excluded.reason, detail = excluded.detail, attempts = excluded.attempts,
        created_at = now()
), marked AS (
    SELECT obj.id FROM objects AS obj JOIN letters ON letters.object_id = obj.id
    WHERE obj.kept_for <= letters.received_at
    ORDER BY obj.id FOR UPDATE OF obj
)
UPDATE objects AS obj SET kept_for = NULL FROM marked WHERE obj.id = marked.id;

-- name: complete_callbacks
-- Marks callbacks done once every id has a result or a dead letter (locking in id order).
WITH finished AS (
    SELECT id FROM callbacks WHERE id = ANY($1::bigint[]) AND done_at IS NULL
    ORDER BY id FOR UPDATE
)
UPDATE callbacks AS c SET done_at = now(), locked_by = NULL
FROM finished WHERE c.id = finished.id;

-- name: expire_stale_callbacks
-- Completes up to $2 unclaimed callbacks received before $1 (the TTL's cutoff) without looking
-- them up: their results could create no row. After an outage or a burst, the backlog's stale
-- part costs the upstream nothing and goes in bulk. Returns how many.
WITH stale AS (
    SELECT id FROM callbacks
    WHERE done_at IS NULL AND received_at < $1 AND locked_until <= now()
    ORDER BY received_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), expired AS (
    UPDATE callbacks AS c SET done_at = now(), locked_by = NULL
    FROM stale WHERE c.id = stale.id
    RETURNING 1
)
SELECT count(*) FROM expired;

-- name: take_reaper_lock
-- One reaper at a time across instances: true for the transaction that gets this lock.
SELECT pg_try_advisory_xact_lock(hashtext('lastseen.reaper'));

-- name: note_pending_ids
-- Notes the ids of pending callbacks received since $1 (the TTL's cutoff) that committed after
-- the reaper's last look (all of them on a first look), each distinct id once per callback, and
-- makes this statement's snapshot the last look. Its cost follows what arrived since and is
-- still pending, not the size of the backlog. Returns how many.
WITH last AS (
    SELECT (SELECT seen FROM reaper_cursor) AS seen
), fresh AS (
    SELECT c.id, c.received_at, c.object_ids FROM callbacks AS c
    WHERE c.done_at IS NULL
      AND c.txid >= coalesce(pg_snapshot_xmin((SELECT seen FROM last)), '0'::xid8)
      AND NOT coalesce(pg_visible_in_snapshot(c.txid, (SELECT seen FROM last)), false)
      AND c.received_at >= $1
), noted AS (
    INSERT INTO pending_ids (object_id, callback_id, received_at)
    SELECT DISTINCT x.id, fresh.id, fresh.received_at
    FROM fresh CROSS JOIN LATERAL unnest(fresh.object_ids) AS x(id)
    RETURNING 1
), looked AS (
    INSERT INTO reaper_cursor (seen) VALUES (pg_current_snapshot())
    ON CONFLICT (singleton) DO UPDATE SET seen = excluded.seen
)
SELECT count(*) FROM noted;

-- name: forget_pending_ids
-- Drops the noted ids of callbacks received before $1 (the TTL's cutoff): they keep nothing now.
DELETE FROM pending_ids WHERE received_at < $1;

-- name: any_expired
-- Is any object due, last seen (and kept) before $1? One probe of objects_reap_at's first entry
-- (min() over the indexed expression), whatever the planner's statistics say (an EXISTS was
-- planned as a full scan on a table never analysed).
SELECT coalesce(min(GREATEST(last_seen, kept_for)) < $1, false) FROM objects;

-- name: reap_objects
-- Examines up to $2 objects due before $1 (the TTL's cutoff), oldest first: deletes them, except
-- those a pending callback received since $1 names (noted in pending_ids) and has not
-- dead-lettered, whose result decides about them. Those are marked with that callback's receive
-- time (kept_for), which takes them out of the reaper's range until it is past the TTL or their
-- result or dead letter clears it, so a round does not examine them again. Returns (deleted,
-- kept).
WITH examined AS (
    SELECT obj.id, (
        SELECT max(p.received_at)
        FROM pending_ids AS p JOIN callbacks AS c ON c.id = p.callback_id
        WHERE p.object_id = obj.id AND p.received_at >= $1 AND c.done_at IS NULL
          -- Its dead letter came before the object was due: no result of it will come.
          AND NOT EXISTS (
              SELECT 1 FROM dead_letters AS d
              WHERE d.callback_id = p.callback_id AND d.object_id = p.object_id)
    ) AS keep_until
    FROM objects AS obj
    WHERE GREATEST(obj.last_seen, obj.kept_for) < $1
    ORDER BY GREATEST(obj.last_seen, obj.kept_for)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM objects AS obj USING examined
    WHERE obj.id = examined.id AND examined.keep_until IS NULL
      AND GREATEST(obj.last_seen, obj.kept_for) < $1
    RETURNING 1
), kept AS (
    UPDATE objects AS obj SET kept_for = examined.keep_until FROM examined
    WHERE obj.id = examined.id AND examined.keep_until IS NOT NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deleted, (SELECT count(*) FROM kept) AS kept;

-- name: prune_callbacks
-- Deletes up to $2 callbacks that were done before $1 (the audit period is over).
DELETE FROM callbacks
WHERE id IN (SELECT id FROM callbacks WHERE done_at < $1 LIMIT $2);

-- name: prune_observations
-- Deletes up to $2 observations older than $1 (a result that old can no longer create a row),
-- skipping rows a results writer holds.
DELETE FROM observations
WHERE id IN (SELECT id FROM observations WHERE seen_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED);

-- name: prune_idempotency_keys
-- Deletes up to $2 idempotency keys recorded before $1 (their retention is over).
DELETE FROM idempotency_keys
WHERE key IN (SELECT key FROM idempotency_keys WHERE created_at < $1 LIMIT $2);

-- name: prune_dead_letters
-- Deletes up to $2 dead letters recorded before $1 (their retention is over).
DELETE FROM dead_letters
WHERE (callback_id, object_id) IN (
    SELECT callback_id, object_id FROM dead_letters WHERE created_at < $1 LIMIT $2);

-- name: inbox_stats
-- Pending callbacks and the oldest one's age in seconds, by the clock receive times are in.
SELECT count(*) AS pending, extract(epoch FROM clock_timestamp() - min(received_at))::float8
FROM callbacks WHERE done_at IS NULL;

-- name: count_objects
-- How many objects are online.
SELECT count(*) FROM objects;

-- name: list_objects_first
-- The first page of online objects ($1 of them), in id order, from the least int64.
SELECT id, last_seen FROM objects ORDER BY id LIMIT $1;

-- name: list_objects
-- One page of online objects with ids above $1, in id order.
SELECT id, last_seen FROM objects WHERE id > $1 ORDER BY id LIMIT $2;

-- name: get_object
-- One online object.
SELECT id, last_seen FROM objects WHERE id = $1;

-- name: callback_status
-- One callback: when it was received and done, how many ids (and distinct ids), how often it
-- was claimed.
SELECT id, received_at, done_at, cardinality(object_ids) AS ids,
       (SELECT count(DISTINCT x) FROM unnest(object_ids) AS x) AS distinct_ids, claims
FROM callbacks WHERE id = $1;

-- name: list_dead_letters
-- Up to $5 dead letters that match a filter (reason $1, callback $2, received before $3,
-- received at or after $4; a NULL matches anything), newest received first (as a user reads a
-- list of failures), after the page that ended at ($6, $7, $8) (received, callback, object;
-- NULLs: from the first).
SELECT callback_id, object_id, received_at, reason, detail, attempts, created_at
FROM dead_letters
WHERE ($1::text IS NULL OR reason = $1) AND ($2::bigint IS NULL OR callback_id = $2)
  AND ($3::timestamptz IS NULL OR received_at < $3)
  AND ($4::timestamptz IS NULL OR received_at >= $4)
  AND ($6::timestamptz IS NULL
       OR (received_at, callback_id, object_id) < ($6::timestamptz, $7::bigint, $8::bigint))
ORDER BY received_at DESC, callback_id DESC, object_id DESC LIMIT $5;

-- name: count_matching_dead_letters
-- How many dead letters match a filter (as in list_dead_letters).
SELECT count(*) FROM dead_letters
WHERE ($1::text IS NULL OR reason = $1) AND ($2::bigint IS NULL OR callback_id = $2)
  AND ($3::timestamptz IS NULL OR received_at < $3)
  AND ($4::timestamptz IS NULL OR received_at >= $4);

-- name: count_dead_letters
-- Dead letters by reason.
SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason ORDER BY reason;

-- name: retry_dead_letters
-- Moves up to $5 dead letters that match a filter (as in list_dead_letters) back into the
-- inbox, as new callbacks with the original receive times (one per original callback), and
-- deletes them. Returns the new callbacks' ids.
WITH taken AS (
    DELETE FROM dead_letters
    WHERE (callback_id, object_id) IN (
        SELECT callback_id, object_id FROM dead_letters
        WHERE ($1::text IS NULL OR reason = $1) AND ($2::bigint IS NULL OR callback_id = $2)
          AND ($3::timestamptz IS NULL OR received_at < $3)
          AND ($4::timestamptz IS NULL OR received_at >= $4)
        ORDER BY callback_id, object_id LIMIT $5 FOR UPDATE SKIP LOCKED)
    RETURNING callback_id, object_id, received_at
), stored AS (
    INSERT INTO callbacks (received_at, object_ids, locked_until, retry_of)
    SELECT received_at, array_agg(object_id ORDER BY object_id), now(), callback_id
    FROM taken GROUP BY callback_id, received_at
    RETURNING id
)
SELECT stored.id FROM stored CROSS JOIN (SELECT pg_notify('lastseen_inbox', '')) AS wake;

-- name: discard_dead_letters
-- Deletes up to $5 dead letters that match a filter (as in list_dead_letters): given up on.
-- Returns how many.
WITH gone AS (
    DELETE FROM dead_letters
    WHERE (callback_id, object_id) IN (
        SELECT callback_id, object_id FROM dead_letters
        WHERE ($1::text IS NULL OR reason = $1) AND ($2::bigint IS NULL OR callback_id = $2)
          AND ($3::timestamptz IS NULL OR received_at < $3)
          AND ($4::timestamptz IS NULL OR received_at >= $4)
        ORDER BY callback_id, object_id LIMIT $5 FOR UPDATE SKIP LOCKED)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: ping
-- Is the database there? Its clock, in epoch seconds (to measure this instance's skew).
SELECT extract(epoch FROM clock_timestamp())::float8;

-- name: probe_write
-- Does the database take the inbox's writes? An insert of no rows: a read-only server (a
-- standby after a failover, default_transaction_read_only) refuses even that.
INSERT INTO callbacks (received_at, object_ids, locked_until) SELECT now(), '{}', now() WHERE false;

-- name: now
-- The database's clock: the moment a REPEATABLE READ transaction sees.
SELECT now();

-- name: callback_fingerprints
-- Every callback with whether it is done and the md5 of its distinct ids in order (how
-- lastseen stores the ids, deduplicated or not, in which order, is its own business).
SELECT id, received_at, done_at IS NOT NULL,
       md5(ARRAY(SELECT DISTINCT x FROM unnest(object_ids) AS x ORDER BY x)::text)
FROM callbacks;

-- name: newest_processed_receipts
-- Per id: the receive time of the newest processed callback naming it that was not
-- dead-lettered for it.
SELECT x.id, max(c.received_at)
FROM callbacks AS c CROSS JOIN LATERAL unnest(c.object_ids) AS x(id)
WHERE c.done_at IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM dead_letters AS d WHERE d.callback_id = c.id AND d.object_id = x.id)
GROUP BY x.id;

-- name: pending_ids
-- Every id named by a callback that is not done.
SELECT DISTINCT unnest(object_ids) FROM callbacks WHERE done_at IS NULL;

-- name: all_objects
-- Every online object.
SELECT id, last_seen FROM objects;
