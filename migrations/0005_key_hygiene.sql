-- Rolling keys (RollKey): the projection links a successor to the key it replaced, and a
-- rolled key to its successor. NULL for every key that was never rolled, and for every key
-- from before rolls existed.
ALTER TABLE keys ADD COLUMN rolled_from_key_id TEXT;
ALTER TABLE keys ADD COLUMN rolled_to_key_id TEXT;

-- Keys by expiry, for WatchExpiring across workspaces; only keys that can still expire. Keys
-- are created in time order, so new entries land at the end of the index.
CREATE INDEX keys_by_expiry ON keys (expires_at, key_id)
    WHERE expires_at IS NOT NULL AND revoked_at IS NULL;

-- When each key was last accepted by VerifyKey, to the minute, and from which class of origin
-- ('none', 'localhost' or 'browser'). Operational data, not history: not an event, not part
-- of the hash chains, not rebuilt (nor emptied) by `kemon-keys rebuild`. Written in batches
-- from memory about once a minute; a crash loses at most that minute.
CREATE TABLE key_usage (
    key_id           TEXT    PRIMARY KEY,
    -- Unix milliseconds, the start of the minute.
    last_used_at     INTEGER NOT NULL,
    last_used_origin TEXT    NOT NULL
) WITHOUT ROWID;
