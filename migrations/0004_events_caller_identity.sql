-- The authenticated calling service of each event (its mutual-TLS identity: a SPIFFE ID or a
-- DNS name), beside the actor it acted for. NULL for events recorded without one: every event
-- before this column existed, and calls over plaintext or TLS without client certificates.
-- Part of the hash chains only when present, so the canonical bytes, and so the hashes, of
-- every older event are unchanged (proto/kemon/keys/v1/audit.proto).
ALTER TABLE events ADD COLUMN caller_identity TEXT;
