-- The authenticated calling service (mutual TLS) of each event, beside the actor, as in the
-- SQLite migration 0004: NULL for events recorded without one. Part of the canonical bytes
-- only when present, so earlier records keep their hashes.
ALTER TABLE events ADD COLUMN caller_identity TEXT;
