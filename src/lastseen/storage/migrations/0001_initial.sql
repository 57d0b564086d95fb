-- The inbox of received callbacks, the online objects, the newest observation per id, and dead letters.

-- One row per acknowledged callback. object_ids holds its distinct ids. A worker owns a row while
-- locked_until is in the future; a row whose lease ran out is claimable again, which is how a
-- crashed worker's callbacks are picked up. New rows get locked_until = now(), so claiming in
-- locked_until order is oldest-first for new and abandoned rows alike.
CREATE TABLE callbacks (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL,
    object_ids   bigint[] NOT NULL,
    locked_until timestamptz NOT NULL,
    locked_by    text,
    claims       integer NOT NULL DEFAULT 0,
    retry_of     bigint,
    done_at      timestamptz
);
CREATE INDEX callbacks_claimable ON callbacks (locked_until) WHERE done_at IS NULL;
CREATE INDEX callbacks_pending_received ON callbacks (received_at) WHERE done_at IS NULL;
CREATE INDEX callbacks_done ON callbacks (done_at) WHERE done_at IS NOT NULL;

-- Exactly the objects that are online now, with the receive time of the newest callback that
-- found them online.
CREATE TABLE objects (
    id        bigint PRIMARY KEY,
    last_seen timestamptz NOT NULL
);
CREATE INDEX objects_last_seen ON objects (last_seen);

-- The newest result per id, online or not. Results complete out of order; this row is what lets
-- an older result lose to a newer one, and its row lock serializes writers of one id across
-- instances. No index on seen_at, so that updates stay HOT; it is pruned by a periodic scan.
CREATE TABLE observations (
    id      bigint PRIMARY KEY,
    seen_at timestamptz NOT NULL,
    online  boolean NOT NULL
);

-- Ids that could not be looked up, one row per callback and id.
CREATE TABLE dead_letters (
    callback_id bigint NOT NULL,
    object_id   bigint NOT NULL,
    received_at timestamptz NOT NULL,
    reason      text NOT NULL,
    detail      text NOT NULL,
    attempts    integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (callback_id, object_id)
);
