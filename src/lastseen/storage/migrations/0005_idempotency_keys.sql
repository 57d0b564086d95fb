-- Idempotency keys of POST /callback (the Idempotency-Key header, or the webhook-id of a signed
-- request): a repeated request answers the first one's callback id, across instances and
-- restarts, for LASTSEEN_IDEMPOTENCY_RETENTION (kept apart from the callbacks, which are pruned
-- sooner). digest: of the ids as sent, so that the same key with another body is told apart.
CREATE TABLE idempotency_keys (
    key         text PRIMARY KEY,
    callback_id bigint NOT NULL,
    digest      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
