//! The tamper-evident hash chains over the event log (specified in
//! `proto/kemon/keys/v1/audit.proto`): one over the whole log, one per workspace.
//!
//! `hash = SHA3-256(previous hash ‖ canonical bytes of the record)`. Changing, removing,
//! inserting or reordering any record changes every hash after it; only someone who also
//! rewrites every later hash can hide it, and comparing the head with one kept elsewhere
//! catches that.

use sha3::{Digest, Sha3_256};

/// One event row of the log, exactly as stored. Plain strings rather than validated
/// values: an auditor must be able to hold, and report on, a record that was tampered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub sequence: u64,
    pub key_id: String,
    pub workspace_id: String,
    pub stream_version: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: Vec<u8>,
    pub actor: String,
    pub recorded_at_ms: i64,
    /// The authenticated calling service (its mutual-TLS identity), when there was one.
    /// Hashed only when present: see [`canonical_bytes`].
    pub caller_identity: Option<String>,
    pub hash: [u8; 32],
    pub workspace_hash: [u8; 32],
}

impl LogRecord {
    /// The record an API event came from, for verifying what a server sent.
    pub fn from_log_event(e: &crate::proto::v1::LogEvent) -> Result<LogRecord, String> {
        let hash = |bytes: &[u8], name: &str| {
            <[u8; 32]>::try_from(bytes)
                .map_err(|_| format!("sequence {}: {name} is not 32 bytes", e.sequence))
        };
        Ok(LogRecord {
            sequence: e.sequence,
            key_id: e.key_id.clone(),
            workspace_id: e.workspace_id.clone(),
            stream_version: e.stream_version,
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            payload: e.stored_payload.clone(),
            actor: e.actor.clone(),
            recorded_at_ms: e.recorded_at_ms,
            // No identity is empty: the proto's "" means none.
            caller_identity: (!e.caller_identity.is_empty()).then(|| e.caller_identity.clone()),
            hash: hash(&e.hash, "hash")?,
            workspace_hash: hash(&e.workspace_hash, "workspace_hash")?,
        })
    }
}

pub type Hash = [u8; 32];

/// The value before the first event of the log.
pub fn log_genesis() -> Hash {
    Sha3_256::digest(b"kemon-keys/events/genesis/v1").into()
}

/// The value before the first event of a workspace.
pub fn workspace_genesis(workspace_id: &str) -> Hash {
    let mut h = Sha3_256::new();
    h.update(b"kemon-keys/workspace/genesis/v1/");
    h.update(workspace_id.as_bytes());
    h.finalize().into()
}

/// The tag that introduces the caller identity after the fixed fields of the canonical bytes.
pub const CALLER_IDENTITY_TAG: u8 = 1;

/// The canonical bytes of a record: every field but the hashes, integers big-endian,
/// strings and bytes prefixed with their length as a big-endian u32. Optional fields follow
/// the fixed ones, each as a tag byte and its value, and only when present, so that a record
/// without them (every record written before they existed) has exactly the bytes, and the
/// hash, it always had. The layout starts with fixed-size and length-prefixed fields, so the
/// bytes of two different records never coincide.
pub fn canonical_bytes(r: &LogRecord) -> Vec<u8> {
    fn lp(out: &mut Vec<u8>, bytes: &[u8]) {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(96 + r.payload.len());
    out.extend_from_slice(&r.sequence.to_be_bytes());
    lp(&mut out, r.key_id.as_bytes());
    lp(&mut out, r.workspace_id.as_bytes());
    out.extend_from_slice(&r.stream_version.to_be_bytes());
    lp(&mut out, r.event_type.as_bytes());
    out.extend_from_slice(&r.schema_version.to_be_bytes());
    lp(&mut out, &r.payload);
    lp(&mut out, r.actor.as_bytes());
    out.extend_from_slice(&r.recorded_at_ms.to_be_bytes());
    if let Some(identity) = &r.caller_identity {
        out.push(CALLER_IDENTITY_TAG);
        lp(&mut out, identity.as_bytes());
    }
    out
}

/// The next chain value after `previous` for record `r`.
pub fn chain(previous: &Hash, canonical: &[u8]) -> Hash {
    let mut h = Sha3_256::new();
    h.update(previous);
    h.update(canonical);
    h.finalize().into()
}

/// The heads of both chains as of the last record folded in: the whole log's and each
/// workspace's. The one place a chain advances: the writer appends through it, and the
/// verifier and the benchmark seeder chain through it, so they cannot disagree.
#[derive(Debug, Clone)]
pub struct Chains {
    pub last_sequence: u64,
    /// The log chain's head.
    pub log: Hash,
    workspaces: std::collections::HashMap<String, Hash>,
}

impl Default for Chains {
    /// An empty log: both chains at genesis.
    fn default() -> Chains {
        Chains::new(0, log_genesis(), std::collections::HashMap::new())
    }
}

impl Chains {
    pub fn new(
        last_sequence: u64,
        log: Hash,
        workspaces: std::collections::HashMap<String, Hash>,
    ) -> Chains {
        Chains {
            last_sequence,
            log,
            workspaces,
        }
    }

    /// A workspace chain's head (its genesis before its first record).
    pub fn workspace(&self, workspace_id: &str) -> Hash {
        self.workspaces
            .get(workspace_id)
            .copied()
            .unwrap_or_else(|| workspace_genesis(workspace_id))
    }

    /// The `(hash, workspace_hash)` that `record` must carry to follow these heads; the
    /// hashes it carries are ignored.
    pub fn next(&self, record: &LogRecord) -> (Hash, Hash) {
        let canonical = canonical_bytes(record);
        (
            chain(&self.log, &canonical),
            chain(&self.workspace(&record.workspace_id), &canonical),
        )
    }

    /// Moves the heads past `record`, taking its sequence and hashes as they are. Returns the
    /// workspace's previous head (`None` at its genesis), for [`Chains::restore_workspace`].
    pub fn advance(&mut self, record: &LogRecord) -> Option<Hash> {
        self.last_sequence = record.sequence;
        self.log = record.hash;
        self.workspaces
            .insert(record.workspace_id.clone(), record.workspace_hash)
    }

    /// Gives `record` the next sequence and both hashes, and advances past it.
    pub fn append(&mut self, record: &mut LogRecord) -> Option<Hash> {
        record.sequence = self.last_sequence + 1;
        (record.hash, record.workspace_hash) = self.next(record);
        self.advance(record)
    }

    /// Puts a workspace head back as it was before an [`Chains::advance`].
    pub fn restore_workspace(&mut self, workspace_id: String, previous: Option<Hash>) {
        match previous {
            Some(hash) => self.workspaces.insert(workspace_id, hash),
            None => self.workspaces.remove(&workspace_id),
        };
    }
}

/// Parses `SEQ:HASH` (hash in hex), the form heads are written down in.
pub fn parse_head(s: &str) -> Result<(u64, Hash), String> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or_else(|| "expected SEQ:HASH, e.g. 42:3fa1…".to_owned())?;
    let seq = seq.parse().map_err(|_| format!("bad sequence {seq:?}"))?;
    Ok((seq, parse_hash(hash)?))
}

/// A hash as 64 hex characters (what `audit verify` prints) or base64 (what GetLogHead's
/// `bytes` look like through grpcurl or any protobuf JSON mapping), standard or URL-safe.
fn parse_hash(text: &str) -> Result<Hash, String> {
    use base64::Engine;
    let mut h = [0u8; 32];
    if text.len() == 64 && hex::decode_to_slice(text, &mut h).is_ok() {
        return Ok(h);
    }
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .and_then(|bytes| Hash::try_from(bytes).ok())
        .ok_or_else(|| "the hash must be 64 hex characters or the base64 of 32 bytes".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_from_hex_and_base64() {
        use base64::Engine;
        let hash: Hash = std::array::from_fn(|i| (i * 7) as u8);
        let hex = hex::encode(hash);
        let b64 = base64::engine::general_purpose::STANDARD.encode(hash);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash);
        for text in [&hex, &b64, &url] {
            assert_eq!(
                parse_head(&format!("118:{text}")),
                Ok((118, hash)),
                "{text}"
            );
        }
        assert!(parse_head("118").is_err());
        assert!(parse_head("x:00").is_err());
        assert!(parse_head(&format!("1:{}", &hex[..62])).is_err());
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        assert!(parse_head(&format!("1:{short}")).is_err());
    }

    fn record() -> LogRecord {
        LogRecord {
            sequence: 1,
            key_id: "key_01".into(),
            workspace_id: "ws".into(),
            stream_version: 1,
            event_type: "KeyRevoked".into(),
            schema_version: 1,
            payload: vec![8, 1],
            actor: "user".into(),
            recorded_at_ms: 5,
            caller_identity: None,
            hash: [0; 32],
            workspace_hash: [0; 32],
        }
    }

    #[test]
    fn canonical_bytes_follow_the_documented_layout() {
        let bytes = canonical_bytes(&record());
        let mut expected = Vec::new();
        expected.extend_from_slice(&1u64.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 6]);
        expected.extend_from_slice(b"key_01");
        expected.extend_from_slice(&[0, 0, 0, 2]);
        expected.extend_from_slice(b"ws");
        expected.extend_from_slice(&1u64.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 10]);
        expected.extend_from_slice(b"KeyRevoked");
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 2, 8, 1]);
        expected.extend_from_slice(&[0, 0, 0, 4]);
        expected.extend_from_slice(b"user");
        expected.extend_from_slice(&5i64.to_be_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let base = canonical_bytes(&record());
        let mut changes: Vec<LogRecord> = Vec::new();
        let mut r = record();
        r.sequence = 2;
        changes.push(r);
        let mut r = record();
        r.actor = "usex".into();
        changes.push(r);
        let mut r = record();
        r.payload = vec![8, 2];
        changes.push(r);
        let mut r = record();
        r.recorded_at_ms = 6;
        changes.push(r);
        let mut r = record();
        r.caller_identity = Some("spiffe://k/web".into());
        changes.push(r);
        let mut r = record();
        r.caller_identity = Some(String::new());
        changes.push(r);
        let mut r = record();
        // Moving a byte between adjacent fields must not give the same bytes.
        r.key_id = "key_0".into();
        r.workspace_id = "1ws".into();
        changes.push(r);
        for changed in changes {
            assert_ne!(canonical_bytes(&changed), base, "{changed:?}");
        }
    }

    #[test]
    fn a_caller_identity_follows_the_fixed_fields_and_changes_nothing_before_it() {
        let without = canonical_bytes(&record());
        let mut r = record();
        r.caller_identity = Some("spiffe://k/web".into());
        let with = canonical_bytes(&r);
        let mut expected = without.clone();
        expected.push(CALLER_IDENTITY_TAG);
        expected.extend_from_slice(&[0, 0, 0, 14]);
        expected.extend_from_slice(b"spiffe://k/web");
        assert_eq!(with, expected);
    }

    #[test]
    fn heads_parse_from_seq_and_hex() {
        let h = hex::encode(log_genesis());
        assert_eq!(parse_head(&format!("7:{h}")), Ok((7, log_genesis())));
        assert!(parse_head("7").is_err());
        assert!(parse_head("x:00").is_err());
        assert_ne!(workspace_genesis("a"), workspace_genesis("b"));
    }
}
