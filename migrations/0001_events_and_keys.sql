-- The append-only event log: the source of truth.
CREATE TABLE events (
    -- Global order of the log.
    sequence        INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The stream: one key's events.
    key_id          TEXT    NOT NULL,
    workspace_id    TEXT    NOT NULL,
    -- 1 for KeyCreated, then +1 per event of the stream.
    stream_version  INTEGER NOT NULL CHECK (stream_version >= 1),
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    -- The protobuf-encoded event message (proto/kemon/keys/v1/events.proto).
    payload         BLOB    NOT NULL,
    actor           TEXT    NOT NULL,
    -- Unix milliseconds.
    recorded_at     INTEGER NOT NULL,
    -- SHA3-256 chain over the whole log, and over this workspace's events
    -- (canonical bytes and genesis values: proto/kemon/keys/v1/audit.proto).
    hash            BLOB    NOT NULL,
    workspace_hash  BLOB    NOT NULL,
    UNIQUE (key_id, stream_version)
);

CREATE INDEX events_by_workspace ON events (workspace_id, sequence);

-- The database itself refuses to change history.
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: UPDATE refused');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: DELETE refused');
END;

-- The projection: every key's current state, a pure function of the log. Updated in the same
-- transaction as each append; `kemon-keys rebuild` recreates it from the log alone.
CREATE TABLE keys (
    key_id          TEXT    PRIMARY KEY,
    workspace_id    TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    -- 'private' | 'public'
    key_type        TEXT    NOT NULL,
    -- 'production' | 'test'
    environment     TEXT    NOT NULL,
    -- Scope names separated by spaces, in catalog order; '' for full access.
    scopes          TEXT    NOT NULL,
    full_access     INTEGER NOT NULL,
        -- SHA3-256 of the key string. Deliberately not indexed: nothing looks a key up by its
    -- hash in SQL (Verify uses the in-memory cache), and an index on uniformly random values
    -- would cost a random page write per created key. Uniqueness follows from the 190 random
    -- bits of every key string.
    secret_hash     BLOB    NOT NULL,
    masked          TEXT    NOT NULL,
    -- The key string of a public key (not secret); NULL for private keys.
    public_key      TEXT,
    -- Allowed domains separated by spaces; '' for none.
    allowed_domains TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER,
    revoked_at      INTEGER,
    reveal_later    INTEGER NOT NULL,
    -- Changes (what expected_version compares with), and all events of the stream.
    version         INTEGER NOT NULL,
    stream_version  INTEGER NOT NULL,
    created_by      TEXT    NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_revealed_at INTEGER
);

CREATE INDEX keys_by_workspace ON keys (workspace_id, key_id);

-- The last sequence the projection has applied (one row).
CREATE TABLE projection_checkpoint (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    last_sequence   INTEGER NOT NULL
);
INSERT INTO projection_checkpoint (id, last_sequence) VALUES (1, 0);

-- Encrypted copies of private keys created with reveal_later. Outside the log on purpose:
-- revoking a key deletes its copy, which an immutable log could not do.
CREATE TABLE sealed_secrets (
    key_id          TEXT    PRIMARY KEY,
    -- XChaCha20-Poly1305: nonce ‖ ciphertext ‖ tag, key id as associated data.
    sealed          BLOB    NOT NULL,
    -- Fingerprint of the master key that sealed it.
    master_key_id   TEXT    NOT NULL
);

-- Server-wide facts, such as the fingerprint of the master key in use.
CREATE TABLE meta (
    name            TEXT    PRIMARY KEY,
    value           TEXT    NOT NULL
);
