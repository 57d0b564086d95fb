-- The reaper's cost per round no longer grows with the backlog. Before, each round unnested the
-- ids of every pending callback to learn which expired objects a pending callback still names.
-- Now the reaper notes each pending callback's ids once, soon after it commits (pending_ids),
-- and an expired object it finds named there is marked (kept_for) instead of being examined
-- again every round.

-- The transaction that stored each callback: the reaper reads the callbacks committed since its
-- last look by this, exactly once whatever order concurrent transactions commit in (an id or a
-- time would miss a transaction that took its ids first and committed last). Needs PostgreSQL 13.
ALTER TABLE callbacks ADD COLUMN txid xid8;
ALTER TABLE callbacks ALTER COLUMN txid SET DEFAULT pg_current_xact_id();
UPDATE callbacks SET txid = pg_current_xact_id() WHERE done_at IS NULL;
CREATE INDEX callbacks_pending_txid ON callbacks (txid) WHERE done_at IS NULL;

-- The ids of callbacks that were pending when the reaper noted them, until they are older than
-- the TTL. Unlogged: a server crash empties it (and reaper_cursor with it), and the reaper's next
-- look notes every pending callback again.
CREATE UNLOGGED TABLE pending_ids (
    object_id   bigint NOT NULL,
    callback_id bigint NOT NULL,
    received_at timestamptz NOT NULL
);
CREATE INDEX pending_ids_object ON pending_ids (object_id);
CREATE INDEX pending_ids_received ON pending_ids (received_at);

-- The snapshot of the reaper's last look: what committed after it is new.
CREATE UNLOGGED TABLE reaper_cursor (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seen      pg_snapshot NOT NULL
);

-- The receive time of a pending callback that names an expired object: the object stays until
-- that time is past the TTL, or until a result or a dead letter for it clears the mark. The
-- reaper looks for work by GREATEST(last_seen, kept_for) (NULLs are ignored), so a kept object
-- leaves its range until its mark can matter again.
ALTER TABLE objects ADD COLUMN kept_for timestamptz;
DROP INDEX objects_last_seen;
CREATE INDEX objects_reap_at ON objects ((GREATEST(last_seen, kept_for)));
