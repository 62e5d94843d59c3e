-- Idempotent CreateKey (AIP-155): a retry with the same request_id gets the first call's
-- answer instead of a second key. Operational data, not history: not an event, not part of
-- the hash chains, and not rebuilt by `kemon-keys rebuild`. Rows are kept for 24 hours.
CREATE TABLE create_requests (
    workspace_id    TEXT    NOT NULL,
    request_id      TEXT    NOT NULL,
    -- SHA3-256 of the request without its request_id: the same id with another request is
    -- refused rather than answered with the wrong key.
    request_digest  BLOB    NOT NULL,
    key_id          TEXT    NOT NULL,
    -- The secret, sealed with the master key as revealable copies are (key id as associated
    -- data), so that the retry can return it; NULL once the key is revoked.
    sealed_secret   BLOB,
    -- Unix milliseconds.
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, request_id)
) WITHOUT ROWID;

CREATE INDEX create_requests_by_age ON create_requests (created_at);
CREATE INDEX create_requests_by_key ON create_requests (key_id);
