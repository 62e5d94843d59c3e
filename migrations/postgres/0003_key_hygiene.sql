-- Rolling keys, keys by expiry and last use, as in the SQLite migration 0005.
ALTER TABLE keys ADD COLUMN rolled_from_key_id TEXT;
ALTER TABLE keys ADD COLUMN rolled_to_key_id TEXT;

CREATE INDEX keys_by_expiry ON keys (expires_at, key_id)
    WHERE expires_at IS NOT NULL AND revoked_at IS NULL;

-- Operational data, not history: see the SQLite migration 0005. Every replica writes the uses
-- it saw; the latest wins.
CREATE TABLE key_usage (
    key_id           TEXT    PRIMARY KEY,
    -- Unix milliseconds, the start of the minute.
    last_used_at     BIGINT  NOT NULL,
    last_used_origin TEXT    NOT NULL
);
