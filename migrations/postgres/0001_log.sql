-- The PostgreSQL schema: the same log, projection and side tables as the SQLite one
-- (migrations/0001_events_and_keys.sql and 0002), for several replicas sharing one database.
-- Values are stored exactly as the SQLite backend stores them, so that the log's canonical
-- bytes, and so its hash chains and exports, are the same whichever database holds it.

-- The append-only event log: the source of truth.
CREATE TABLE events (
    -- Global order of the log: 1, 2, 3, ... with no gap (the trigger below checks it).
    sequence        BIGINT  PRIMARY KEY CHECK (sequence >= 1),
    key_id          TEXT    NOT NULL,
    workspace_id    TEXT    NOT NULL,
    stream_version  BIGINT  NOT NULL CHECK (stream_version >= 1),
    event_type      TEXT    NOT NULL,
    schema_version  BIGINT  NOT NULL,
    -- The protobuf-encoded event message (proto/kemon/keys/v1/events.proto).
    payload         BYTEA   NOT NULL,
    actor           TEXT    NOT NULL,
    -- Unix milliseconds.
    recorded_at     BIGINT  NOT NULL,
    hash            BYTEA   NOT NULL CHECK (length(hash) = 32),
    workspace_hash  BYTEA   NOT NULL CHECK (length(workspace_hash) = 32),
    UNIQUE (key_id, stream_version)
);

CREATE INDEX events_by_workspace ON events (workspace_id, sequence);

-- The database itself refuses to change history. (A role granted only SELECT and INSERT on
-- `events` refuses it a second time: see README, "PostgreSQL".)
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP;
END;
$$;

CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();

CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

-- Every appended record takes the next sequence: writers hold the log's lock through commit,
-- so a record's sequence is one past the last committed one, and a tailer that has read up
-- to N can never later find a record below N. (Rows earlier in the same INSERT are seen.)
CREATE FUNCTION events_next_sequence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last BIGINT;
BEGIN
    SELECT COALESCE(MAX(sequence), 0) INTO last FROM events;
    IF NEW.sequence <> last + 1 THEN
        RAISE EXCEPTION 'events are appended in order: sequence % after %', NEW.sequence, last;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER events_in_order BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_next_sequence();

-- The projection: every key's current state, a pure function of the log, updated in the
-- same transaction as each append.
CREATE TABLE keys (
    key_id          TEXT    PRIMARY KEY,
    workspace_id    TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    key_type        TEXT    NOT NULL,
    environment     TEXT    NOT NULL,
    scopes          TEXT    NOT NULL,
    full_access     BOOLEAN NOT NULL,
    -- SHA3-256 of the key string; not indexed (Verify uses the in-memory cache).
    secret_hash     BYTEA   NOT NULL,
    masked          TEXT    NOT NULL,
    public_key      TEXT,
    allowed_domains TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL,
    expires_at      BIGINT,
    revoked_at      BIGINT,
    reveal_later    BOOLEAN NOT NULL,
    version         BIGINT  NOT NULL,
    stream_version  BIGINT  NOT NULL,
    created_by      TEXT    NOT NULL,
    updated_at      BIGINT  NOT NULL,
    last_revealed_at BIGINT
);

CREATE INDEX keys_by_workspace ON keys (workspace_id, key_id);

CREATE TABLE projection_checkpoint (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    last_sequence   BIGINT  NOT NULL
);
INSERT INTO projection_checkpoint (id, last_sequence) VALUES (1, 0);

-- Encrypted copies of private keys created with reveal_later (outside the log on purpose:
-- revoking a key deletes its copy).
CREATE TABLE sealed_secrets (
    key_id          TEXT    PRIMARY KEY,
    sealed          BYTEA   NOT NULL,
    master_key_id   TEXT    NOT NULL
);

CREATE TABLE meta (
    name            TEXT    PRIMARY KEY,
    value           TEXT    NOT NULL
);

-- Idempotent CreateKey (AIP-155); see the SQLite migration 0002.
CREATE TABLE create_requests (
    workspace_id    TEXT    NOT NULL,
    request_id      TEXT    NOT NULL,
    request_digest  BYTEA   NOT NULL,
    key_id          TEXT    NOT NULL,
    sealed_secret   BYTEA,
    created_at      BIGINT  NOT NULL,
    PRIMARY KEY (workspace_id, request_id)
);

CREATE INDEX create_requests_by_age ON create_requests (created_at);
CREATE INDEX create_requests_by_key ON create_requests (key_id);

-- Live replicas: each publishes the last sequence its Verify cache has applied, and when it
-- last confirmed it had caught up with the log. Operational data, not history.
CREATE TABLE replicas (
    replica_id      TEXT    PRIMARY KEY,
    applied_sequence BIGINT NOT NULL,
    -- Unix milliseconds, by the database's clock.
    heartbeat_at    BIGINT  NOT NULL,
    started_at      BIGINT  NOT NULL
);
