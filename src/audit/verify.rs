//! Verifying a log: the hash chains, the replay, and the projection built from it.
//!
//! Records are pushed in log order. The first problem found is kept, with the sequence it is
//! at; nothing after it is trusted. Checks, per record:
//! - full log: sequences run 1, 2, 3, … with no gap (a deleted record shows as missing);
//! - its `hash` equals the chain recomputed from genesis (a changed byte anywhere in the
//!   record, or a record moved, inserted or swapped, breaks it here);
//! - its `workspace_hash` equals the workspace's chain recomputed from the workspace genesis;
//! - it replays: decodes (upcasting old schemas) and folds with the service's own `apply`.
//!
//! At the end: the head against one kept elsewhere (`--expect-head`), which catches a tail
//! rewritten with recomputed hashes, and the stored `keys` table against the replay.

use std::collections::HashMap;
use std::fmt;

use super::replay::{Replay, ReplayError};
use crate::domain::KeyState;
use crate::log::chain::{Chains, Hash, LogRecord};

/// Which chain a set of records can be checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The whole log: both chains, no gaps allowed.
    Log,
    /// One workspace's events only (a workspace export): its chain, gaps in the global
    /// sequence expected.
    Workspace(String),
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub scope: Scope,
    pub events: u64,
    pub keys: usize,
    /// Sequence and hash of the last record (of the workspace chain for a workspace scope).
    pub head: (u64, Hash),
    pub failure: Option<ReplayError>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.scope {
            Scope::Log => "log".to_owned(),
            Scope::Workspace(w) => format!("workspace {w}"),
        };
        match &self.failure {
            None => write!(
                f,
                "OK: {what}: {} events, {} keys, head {}:{}",
                self.events,
                self.keys,
                self.head.0,
                hex::encode(self.head.1)
            ),
            Some(e) if e.sequence == 0 => write!(f, "FAILED: {what}: {}", e.reason),
            Some(e) => write!(
                f,
                "FAILED: {what}: first bad sequence {}: {}",
                e.sequence, e.reason
            ),
        }
    }
}

pub struct Verifier {
    scope: Scope,
    /// The heads as recomputed from the records seen; in a workspace scope only the
    /// workspace chain is checked (the log chain is followed as the records say).
    chains: Chains,
    replay: Replay,
    events: u64,
    failure: Option<ReplayError>,
    expect_head: Option<(u64, Hash)>,
}

impl Verifier {
    /// `expect_head`: a `(sequence, hash)` kept elsewhere (the log chain's, or the workspace
    /// chain's for a workspace scope); the log must reach it with exactly that hash.
    pub fn new(scope: Scope, expect_head: Option<(u64, Hash)>) -> Verifier {
        Verifier {
            expect_head,
            scope,
            chains: Chains::default(),
            replay: Replay::default(),
            events: 0,
            failure: None,
        }
    }

    /// Checks the next record. Returns false once a problem has been found.
    pub fn push(&mut self, record: &LogRecord) -> bool {
        if self.failure.is_some() {
            return false;
        }
        if let Err(e) = self.check(record) {
            self.failure = Some(e);
            return false;
        }
        true
    }

    fn check(&mut self, r: &LogRecord) -> Result<(), ReplayError> {
        let fail = |sequence: u64, reason: String| ReplayError { sequence, reason };
        match &self.scope {
            Scope::Log if r.sequence != self.chains.last_sequence + 1 => {
                return Err(fail(
                    self.chains.last_sequence + 1,
                    format!("missing: the next record is sequence {}", r.sequence),
                ));
            }
            Scope::Workspace(w) if *w != r.workspace_id => {
                return Err(fail(
                    r.sequence,
                    format!("belongs to workspace {}, not {w}", r.workspace_id),
                ));
            }
            _ if r.sequence <= self.chains.last_sequence => {
                return Err(fail(
                    r.sequence,
                    format!("out of order after sequence {}", self.chains.last_sequence),
                ));
            }
            _ => {}
        }
        let (hash, workspace_hash) = self.chains.next(r);
        if self.scope == Scope::Log && hash != r.hash {
            return Err(fail(
                r.sequence,
                "hash does not match the chain: the record or one before it was altered, \
                 inserted or removed"
                    .into(),
            ));
        }
        if workspace_hash != r.workspace_hash {
            return Err(fail(
                r.sequence,
                "workspace_hash does not match the workspace chain: the record or an earlier \
                 one of its workspace was altered, inserted or removed"
                    .into(),
            ));
        }
        if let Some((seq, _)) = self
            .expect_head
            .filter(|(seq, _)| *seq > self.chains.last_sequence && *seq < r.sequence)
        {
            // In a workspace export sequences have gaps, but the expected head is one of
            // this workspace's records: stepping over it means it was removed.
            return Err(fail(
                seq,
                "the record at the expected head is missing: records were removed".into(),
            ));
        }
        if let Some((seq, expected)) = self.expect_head.filter(|(seq, _)| *seq == r.sequence) {
            let chained = if self.scope == Scope::Log {
                hash
            } else {
                workspace_hash
            };
            if chained != expected {
                return Err(fail(
                    seq,
                    "the hash at the expected head differs: the log up to it was rewritten".into(),
                ));
            }
        }
        self.replay.apply(r)?;
        self.chains.advance(r);
        self.events += 1;
        Ok(())
    }

    /// Finishes: checks that the expected head was reached and, when given, the stored
    /// projection (`keys` rows and checkpoint) against the replay.
    pub fn finish(mut self, projection: Option<(Vec<KeyState>, u64)>) -> Report {
        let head = match &self.scope {
            Scope::Log => (self.chains.last_sequence, self.chains.log),
            Scope::Workspace(w) => (self.chains.last_sequence, self.chains.workspace(w)),
        };
        if self.failure.is_none() {
            self.failure = self
                .expect_head
                .filter(|(seq, _)| *seq > self.chains.last_sequence)
                .map(|(seq, _)| ReplayError {
                    sequence: self.chains.last_sequence + 1,
                    reason: format!(
                        "the log ends at {} before the expected head at {seq}: records were removed",
                        self.chains.last_sequence
                    ),
                })
                .or_else(|| {
                    projection.and_then(|(keys, checkpoint)| {
                        check_projection(&self.replay, keys, checkpoint)
                    })
                });
        }
        Report {
            scope: self.scope,
            events: self.events,
            keys: self.replay.keys.len(),
            head,
            failure: self.failure,
        }
    }
}

fn check_projection(
    replay: &Replay,
    stored: Vec<KeyState>,
    checkpoint: u64,
) -> Option<ReplayError> {
    let projection_error = |reason: String| ReplayError {
        sequence: 0,
        reason: format!("keys table: {reason}"),
    };
    if checkpoint != replay.last_sequence {
        return Some(projection_error(format!(
            "checkpoint is {checkpoint} but the log ends at {}",
            replay.last_sequence
        )));
    }
    let mut stored: HashMap<String, KeyState> = stored
        .into_iter()
        .map(|s| (s.key_id.to_string(), s))
        .collect();
    for (key_id, state) in &replay.keys {
        match stored.remove(key_id) {
            None => return Some(projection_error(format!("{key_id} is missing"))),
            Some(row) if row != *state => {
                return Some(projection_error(format!(
                    "{key_id} differs from the replay of its events"
                )));
            }
            Some(_) => {}
        }
    }
    stored
        .into_keys()
        .next()
        .map(|extra| projection_error(format!("{extra} has no events in the log")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::NewKeyRequest;
    use crate::domain::{
        ApiKey, Environment, Event, Expiration, KeyId, KeyName, KeyType, ScopeSet, WorkspaceId,
    };
    use crate::log::events::encode_event;

    /// One key created per sequence, all in workspace `ws`, chained as the writer chains them.
    fn workspace_records(sequences: &[u64]) -> Vec<LogRecord> {
        let mut chains = Chains::default();
        sequences
            .iter()
            .map(|&sequence| {
                let key = ApiKey::generate(KeyType::Private, Environment::Production);
                let key_id = KeyId::generate(1);
                let new = NewKeyRequest {
                    key_id,
                    workspace_id: WorkspaceId::parse("ws").unwrap(),
                    name: KeyName::parse("k").unwrap(),
                    key_type: KeyType::Private,
                    environment: Environment::Production,
                    expiration: Expiration::Never,
                    scopes: ScopeSet::EMPTY,
                    reveal_later: false,
                    allowed_domains: vec![],
                    secret_hash: key.hash(),
                    masked: key.masked(),
                    public_key: None,
                }
                .validate(1)
                .unwrap();
                let encoded = encode_event(&Event::KeyCreated(Box::new(new)));
                let mut r = LogRecord {
                    sequence,
                    key_id: key_id.to_string(),
                    workspace_id: "ws".into(),
                    stream_version: 1,
                    event_type: encoded.event_type.into(),
                    schema_version: encoded.schema_version,
                    payload: encoded.payload,
                    actor: "a".into(),
                    recorded_at_ms: 1,
                    caller_identity: None,
                    hash: [0; 32],
                    workspace_hash: [0; 32],
                };
                // Sequences with gaps, as in a workspace export: chained as given.
                (r.hash, r.workspace_hash) = chains.next(&r);
                chains.advance(&r);
                r
            })
            .collect()
    }

    fn verify(records: &[LogRecord], head: (u64, Hash)) -> Report {
        let mut verifier = Verifier::new(Scope::Workspace("ws".into()), Some(head));
        for r in records {
            if !verifier.push(r) {
                break;
            }
        }
        verifier.finish(None)
    }

    #[test]
    fn a_removed_expected_head_is_caught_even_when_later_records_rechain() {
        let original = workspace_records(&[2, 5, 9]);
        let head = (5, original[1].workspace_hash);
        assert!(verify(&original, head).ok(), "{}", verify(&original, head));
        // Record 5 removed and 9 chained straight after 2: a consistent chain without it.
        let tampered = workspace_records(&[2, 9]);
        let report = verify(&tampered, head);
        let failure = report.failure.expect("caught");
        assert_eq!(failure.sequence, 5);
        assert!(failure.reason.contains("missing"), "{failure:?}");
    }

    #[test]
    fn a_different_hash_at_the_expected_head_is_caught() {
        let original = workspace_records(&[3, 4]);
        let report = verify(&original, (4, [7; 32]));
        assert_eq!(report.failure.map(|f| f.sequence), Some(4));
    }
}
