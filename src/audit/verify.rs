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
//!
//! Memory does not grow with the log: the chains hold a head per workspace, and a replay that
//! outgrows its limit ([`FoldLimits`]) goes on in parts through temporary files
//! ([`crate::log::spill`]), folded one after another at the end. Its first bad record is then
//! found at the end rather than when it is pushed; the failure reported is the same, since
//! every check of a record depends only on the records before it (see
//! [`Verifier::push_batch`]): the first failing record is the one pushed first, whichever
//! check it fails. (Pushed first, not least sequence: a tampered log's sequences need not
//! increase, which is one thing the checks catch.)

use std::collections::HashMap;
use std::fmt;
use std::io;

use super::replay::{CompactReplay, ReplayError};
use crate::domain::{KeyId, KeyState};
use crate::log::chain::{Chains, Hash, LogRecord, canonical_bytes, chain};
use crate::log::fold::{self, Compared, FoldedKeys};
use crate::log::spill::{self, EventRef, FoldLimits, Item, Spill};

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
    replay: CompactReplay,
    events: u64,
    failure: Option<ReplayError>,
    /// Records pushed before the current batch: each record's position in the log as read.
    pushed: u64,
    /// The position of the record `failure` is about.
    failure_at: u64,
    expect_head: Option<(u64, Hash)>,
    /// What the stored projection's rows have shown so far ([`Verifier::check_rows`]).
    projection: ProjectionCheck,
    limits: FoldLimits,
    /// The replay, once it held more keys than `limits` allow.
    spilled: Option<Spilled>,
    /// Why the temporary files failed: the verification could not be finished.
    io_error: Option<io::Error>,
}

/// A replay gone to temporary files: its states and every later record, and the stored
/// projection's rows, each in its key's part.
#[derive(Debug)]
struct Spilled {
    records: Spill,
    rows: Option<Spill>,
}

/// Batches at least this long are hashed on a second thread while this one replays them.
const PARALLEL_BATCH: usize = 256;

/// The hashes one record must carry: the log chain's (`None` where it is not checked) and its
/// workspace chain's.
type Expected = (Option<Hash>, Hash);

impl Verifier {
    /// `expect_head`: a `(sequence, hash)` kept elsewhere (the log chain's, or the workspace
    /// chain's for a workspace scope); the log must reach it with exactly that hash.
    pub fn new(scope: Scope, expect_head: Option<(u64, Hash)>) -> Verifier {
        Verifier {
            expect_head,
            scope,
            chains: Chains::default(),
            replay: CompactReplay::default(),
            events: 0,
            pushed: 0,
            failure_at: 0,
            failure: None,
            projection: ProjectionCheck::default(),
            limits: FoldLimits::default(),
            spilled: None,
            io_error: None,
        }
    }

    /// Holds at most `limits.keys_in_memory` key states in memory (the rest in temporary
    /// files in `limits.temp_dir`, or the system's temporary directory).
    pub fn with_limits(mut self, limits: FoldLimits) -> Verifier {
        self.limits = limits;
        self
    }

    fn temp_dir(&self) -> std::path::PathBuf {
        self.limits.dir_or(&std::env::temp_dir())
    }

    /// Checks the next record. Returns false once a problem has been found.
    pub fn push(&mut self, record: &LogRecord) -> bool {
        self.push_batch(std::slice::from_ref(record))
    }

    /// Checks the next records, in order: exactly as pushing them one by one, with the
    /// hashing of a long batch on a second core while this one replays it. Returns false once
    /// a problem has been found.
    ///
    /// Every record is checked against the hashes the records before it carry, which is what
    /// recomputing the chains from genesis gives as long as no record before it failed; and
    /// the first failure ends the verification. So the hashes of a batch can be computed
    /// before any of its records is checked, and its replay can run ahead (each key's fold
    /// depends only on the key's earlier records); the checks then run in order and the first
    /// failing one is reported, as one record at a time would.
    pub fn push_batch(&mut self, records: &[LogRecord]) -> bool {
        if self.failure.is_some() || self.io_error.is_some() {
            return false;
        }
        let check_log = self.scope == Scope::Log;
        let jobs = predecessors(&self.chains, records, check_log);
        let (replay, spilled, pushed) = (&mut self.replay, &mut self.spilled, self.pushed);
        // Replayed here, or put in the parts of a spilled replay, replayed at the end.
        let mut replay_or_spill = || match spilled {
            None => Ok(replay_until_failure(replay, records)),
            Some(spilled) => spilled.push(records, pushed).map(|()| None),
        };
        let log_jobs = || jobs.iter().map(|(log, _)| *log);
        let workspace_jobs = || jobs.iter().map(|(_, workspace)| Some(*workspace));
        let (log, workspace, replayed) = if records.len() >= PARALLEL_BATCH {
            // Hashing costs more than replaying: each chain gets a thread of its own.
            std::thread::scope(|scope| {
                let log = scope.spawn(|| expected_hashes(records, log_jobs()));
                let workspace = scope.spawn(|| expected_hashes(records, workspace_jobs()));
                let replayed = replay_or_spill();
                let log = log.join().unwrap_or_default();
                let workspace = workspace.join().unwrap_or_default();
                (log, workspace, replayed)
            })
        } else {
            (
                expected_hashes(records, log_jobs()),
                expected_hashes(records, workspace_jobs()),
                replay_or_spill(),
            )
        };
        // A thread that failed left its list short: the records it misses fail below.
        let expected: Vec<Expected> = log
            .into_iter()
            .zip(workspace)
            .filter_map(|(log, workspace)| Some((log, workspace?)))
            .collect();
        let replayed = match replayed {
            Ok(replayed) => replayed,
            Err(e) => {
                self.io_error = Some(e);
                return false;
            }
        };
        for (i, record) in records.iter().enumerate() {
            let replay_failure = match &replayed {
                Some((at, e)) if *at == i => Some(e.clone()),
                _ => None,
            };
            self.failure_at = pushed + i as u64;
            let Some(&expected) = expected.get(i) else {
                self.failure = Some(ReplayError {
                    sequence: record.sequence,
                    reason: "hashing failed".into(),
                });
                return false;
            };
            if let Err(e) = self.check(record, expected, replay_failure) {
                self.failure = Some(e);
                return false;
            }
        }
        self.pushed += records.len() as u64;
        if self.spilled.is_none() && self.replay.keys.len() > self.limits.keys_in_memory {
            // Taken out, so that the map's own memory is freed with the states.
            let mut states = std::mem::take(&mut self.replay.keys);
            let spilled = Spill::new(&self.temp_dir()).and_then(|mut records| {
                for (key_id, encoded) in states.drain() {
                    records.state(key_id, &encoded)?;
                }
                Ok(Spilled {
                    records,
                    rows: None,
                })
            });
            match spilled {
                Ok(spilled) => self.spilled = Some(spilled),
                Err(e) => {
                    self.io_error = Some(e);
                    return false;
                }
            }
        }
        true
    }

    fn check(
        &mut self,
        r: &LogRecord,
        (hash, workspace_hash): Expected,
        replay_failure: Option<ReplayError>,
    ) -> Result<(), ReplayError> {
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
        if hash.is_some_and(|h| h != r.hash) {
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
            // Up to here every record carries the hash recomputed from genesis.
            let chained = if self.scope == Scope::Log {
                r.hash
            } else {
                r.workspace_hash
            };
            if chained != expected {
                return Err(fail(
                    seq,
                    "the hash at the expected head differs: the log up to it was rewritten".into(),
                ));
            }
        }
        if let Some(e) = replay_failure {
            return Err(e);
        }
        self.chains.advance(r);
        self.events += 1;
        Ok(())
    }

    /// Compares stored projection rows (`keys`) with the replay, once every record has been
    /// pushed; rows may come in any order and in as many calls as suit the reader. Uses up
    /// the replay's states as it goes.
    pub fn check_rows(&mut self, rows: Vec<KeyState>) {
        if self.io_error.is_some() {
            return;
        }
        let dir = self.temp_dir();
        let Some(spilled) = &mut self.spilled else {
            for row in rows {
                self.projection
                    .row(&mut self.replay.keys, row.key_id, &fold::encode(&row));
            }
            return;
        };
        // Each row goes to its key's part, to be compared once the part is replayed.
        let written = (|| {
            let parts = match &mut spilled.rows {
                Some(parts) => parts,
                None => spilled.rows.insert(Spill::new(&dir)?),
            };
            rows.iter()
                .try_for_each(|row| parts.state(row.key_id, &fold::encode(row)))
        })();
        if let Err(e) = written {
            self.io_error = Some(e);
        }
    }

    /// Finishes: replays the parts of a spilled replay; checks that the expected head was
    /// reached and, when given the stored projection's checkpoint, the projection: the
    /// checkpoint, then the rows passed to [`Verifier::check_rows`] against the replay. Fails
    /// only when the temporary files of a spilled replay do.
    pub fn finish(mut self, checkpoint: Option<u64>) -> io::Result<Report> {
        if let Some(e) = self.io_error.take() {
            return Err(e);
        }
        let head = match &self.scope {
            Scope::Log => (self.chains.last_sequence, self.chains.log),
            Scope::Workspace(w) => (self.chains.last_sequence, self.chains.workspace(w)),
        };
        let replayed = match self.spilled.take() {
            None => Replayed {
                keys: self.replay.keys.len(),
                failure: None,
                missing: checkpoint.and_then(|_| self.replay.keys.not_compared().min().copied()),
            },
            Some(spilled) => spilled.replay(&mut self.projection)?,
        };
        // The first failing record is the one pushed first; on the same record, the chains
        // are checked before the replay.
        if let Some((at, failure)) = replayed.failure
            && (self.failure.is_none() || at < self.failure_at)
        {
            self.failure = Some(failure);
        }
        let keys = replayed.keys;
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
                    checkpoint.and_then(|checkpoint| {
                        // With no failure every record was replayed: the log ends where the
                        // chains do.
                        self.projection.finish(
                            self.chains.last_sequence,
                            replayed.missing,
                            checkpoint,
                        )
                    })
                });
        }
        Ok(Report {
            scope: self.scope,
            events: self.events,
            keys,
            head,
            failure: self.failure,
        })
    }
}

/// What the replay found, in memory or part by part.
#[derive(Default)]
struct Replayed {
    keys: usize,
    /// The first record pushed that did not replay, with its position (a spilled replay
    /// finds it only at the end).
    failure: Option<(u64, ReplayError)>,
    /// The least key id replayed without a row in the projection.
    missing: Option<KeyId>,
}

impl Spilled {
    /// Puts `records`, the first at position `pushed`, in their parts.
    fn push(&mut self, records: &[LogRecord], pushed: u64) -> io::Result<()> {
        for (i, r) in records.iter().enumerate() {
            self.records.event(&EventRef::at(r, pushed + i as u64))?;
        }
        Ok(())
    }

    /// Replays each part, then compares the part's projection rows with its states: the parts
    /// spread over the cores, each holding its own part's keys.
    fn replay(self, projection: &mut ProjectionCheck) -> io::Result<Replayed> {
        let records = self.records.into_parts()?;
        // Each part of records with the same part of rows, if any.
        let mut rows = self
            .rows
            .map(Spill::into_parts)
            .transpose()?
            .map(Vec::into_iter);
        let work: Vec<(spill::Part, Option<spill::Part>)> = records
            .into_iter()
            .map(|part| (part, rows.as_mut().and_then(Iterator::next)))
            .collect();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let work = std::sync::Mutex::new(work);
        let next = || work.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let outcomes = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut replayed = Replayed::default();
                        let mut check = ProjectionCheck::default();
                        while let Some((part, part_rows)) = next() {
                            replay_part(part, part_rows, &mut replayed, &mut check)?;
                        }
                        Ok::<_, io::Error>((replayed, check))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("a replaying thread panicked")))
                })
                .collect::<io::Result<Vec<_>>>()
        })?;
        let mut replayed = Replayed::default();
        for (part, check) in outcomes {
            replayed.absorb(part);
            projection.absorb(check);
        }
        Ok(replayed)
    }
}

/// Replays one part, then compares its projection rows with its states; adds what it found to
/// `replayed` and `check`.
fn replay_part(
    part: spill::Part,
    rows: Option<spill::Part>,
    replayed: &mut Replayed,
    check: &mut ProjectionCheck,
) -> io::Result<()> {
    let mut replay = CompactReplay::default();
    let mut failure = None;
    part.for_each(|item| {
        let folded = match item {
            Item::State(key_id, encoded) => {
                replay.keys.put_encoded(key_id, encoded.into());
                Ok(())
            }
            Item::Event(e) => e
                .to_record()
                .map_err(|reason| ReplayError {
                    sequence: e.sequence,
                    reason,
                })
                .and_then(|record| replay.apply(&record))
                .map_err(|failure| (e.position, failure)),
        };
        // A part stops at its first bad record, as a replay in memory does.
        folded.map_err(|e| failure = Some(e)).is_ok()
    })?;
    if let Some(rows) = rows {
        rows.for_each(|item| {
            if let Item::State(key_id, encoded) = item {
                check.row(&mut replay.keys, key_id, encoded);
            }
            true
        })?;
    }
    replayed.absorb(Replayed {
        keys: replay.keys.len(),
        failure,
        missing: replay.keys.not_compared().min().copied(),
    });
    Ok(())
}

impl Replayed {
    /// Adds what another part of the replay found.
    fn absorb(&mut self, other: Replayed) {
        self.keys += other.keys;
        if let Some((at, failure)) = other.failure
            && self.failure.as_ref().is_none_or(|(first, _)| at < *first)
        {
            self.failure = Some((at, failure));
        }
        self.missing = least(self.missing, other.missing);
    }
}

fn least(a: Option<KeyId>, b: Option<KeyId>) -> Option<KeyId> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// For each record, the chain heads it must follow, from the hashes the records before it
/// carry: the log chain's (when checked) and its workspace's.
fn predecessors(chains: &Chains, records: &[LogRecord], check_log: bool) -> Vec<Expected> {
    let mut log = chains.log;
    let mut workspaces: HashMap<&str, Hash> = HashMap::new();
    records
        .iter()
        .map(|r| {
            let workspace = match workspaces.get(r.workspace_id.as_str()) {
                Some(h) => *h,
                None => chains.workspace(&r.workspace_id),
            };
            let previous = (check_log.then_some(log), workspace);
            log = r.hash;
            workspaces.insert(&r.workspace_id, r.workspace_hash);
            previous
        })
        .collect()
}

/// The hash each record must carry in one chain, after the head it follows there (none where
/// that chain is not checked).
fn expected_hashes(
    records: &[LogRecord],
    previous: impl Iterator<Item = Option<Hash>>,
) -> Vec<Option<Hash>> {
    records
        .iter()
        .zip(previous)
        .map(|(r, previous)| previous.map(|p| chain(&p, &canonical_bytes(r))))
        .collect()
}

/// Replays `records` in order up to the first that fails: its index and why.
fn replay_until_failure(
    replay: &mut CompactReplay,
    records: &[LogRecord],
) -> Option<(usize, ReplayError)> {
    records
        .iter()
        .enumerate()
        .find_map(|(i, r)| replay.apply(r).err().map(|e| (i, e)))
}

/// The stored projection's rows against the replay, a row at a time.
#[derive(Debug, Default)]
struct ProjectionCheck {
    /// The first key id (in key id order) whose row differs from the replay.
    differs: Option<KeyId>,
    /// The first key id of a row with no events in the log.
    extra: Option<KeyId>,
}

impl ProjectionCheck {
    /// Adds what the rows of another part showed.
    fn absorb(&mut self, other: ProjectionCheck) {
        self.differs = least(self.differs, other.differs);
        self.extra = least(self.extra, other.extra);
    }

    /// One row, `encoded` as [`fold::encode`] encodes it.
    fn row(&mut self, replayed: &mut FoldedKeys, key_id: KeyId, encoded: &[u8]) {
        let first = |slot: &mut Option<KeyId>, key_id: KeyId| {
            if slot.is_none_or(|k| key_id < k) {
                *slot = Some(key_id);
            }
        };
        match replayed.take_to_compare(&key_id) {
            Compared::Encoded(state) if *state == *encoded => {}
            // A second row for one key (the table is keyed by workspace and key) differs
            // from the replay as much as a wrong one does.
            Compared::Encoded(_) | Compared::Again => first(&mut self.differs, key_id),
            Compared::Absent => first(&mut self.extra, key_id),
        }
    }

    /// The first problem, in the order the checks were always made: the checkpoint; then the
    /// first key, in key id order, whose row is missing or differs from the replay; then a
    /// row whose key has no events. `missing`: the least key id replayed with no row.
    fn finish(
        &self,
        last_sequence: u64,
        missing: Option<KeyId>,
        checkpoint: u64,
    ) -> Option<ReplayError> {
        let projection_error = |reason: String| ReplayError {
            sequence: 0,
            reason: format!("keys table: {reason}"),
        };
        if checkpoint != last_sequence {
            return Some(projection_error(format!(
                "checkpoint is {checkpoint} but the log ends at {last_sequence}"
            )));
        }
        let first_bad = match (missing, self.differs) {
            (Some(m), Some(d)) if d < m => Some((d, "differs from the replay of its events")),
            (Some(m), _) => Some((m, "is missing")),
            (None, Some(d)) => Some((d, "differs from the replay of its events")),
            (None, None) => None,
        };
        first_bad
            .map(|(key_id, what)| projection_error(format!("{key_id} {what}")))
            .or_else(|| {
                self.extra
                    .map(|extra| projection_error(format!("{extra} has no events in the log")))
            })
    }
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
        verifier.finish(None).unwrap()
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

    // ------------------------------------------------------------------------------------
    // The batched, parallel verifier against the one-record-at-a-time verifier it replaced.

    use crate::audit::replay::Replay;

    /// The verifier as it was before batches: chains recomputed with `Chains::next`, a
    /// `Replay` of full states, the stored projection compared whole.
    struct Reference {
        scope: Scope,
        chains: Chains,
        replay: Replay,
        failure: Option<ReplayError>,
        expect_head: Option<(u64, Hash)>,
    }

    impl Reference {
        fn run(
            scope: Scope,
            expect_head: Option<(u64, Hash)>,
            records: &[LogRecord],
            projection: Option<(Vec<KeyState>, u64)>,
        ) -> Option<ReplayError> {
            let mut v = Reference {
                scope,
                chains: Chains::default(),
                replay: Replay::default(),
                failure: None,
                expect_head,
            };
            for r in records {
                if let Err(e) = v.check(r) {
                    v.failure = Some(e);
                    break;
                }
            }
            if v.failure.is_some() {
                return v.failure;
            }
            if let Some((seq, _)) = v
                .expect_head
                .filter(|(seq, _)| *seq > v.chains.last_sequence)
            {
                return Some(ReplayError {
                    sequence: v.chains.last_sequence + 1,
                    reason: format!(
                        "the log ends at {} before the expected head at {seq}: records were removed",
                        v.chains.last_sequence
                    ),
                });
            }
            let (stored, checkpoint) = projection?;
            let error = |reason: String| {
                Some(ReplayError {
                    sequence: 0,
                    reason: format!("keys table: {reason}"),
                })
            };
            if checkpoint != v.replay.last_sequence {
                return error(format!(
                    "checkpoint is {checkpoint} but the log ends at {}",
                    v.replay.last_sequence
                ));
            }
            let mut stored: HashMap<String, KeyState> = stored
                .into_iter()
                .map(|s| (s.key_id.to_string(), s))
                .collect();
            for (key_id, state) in &v.replay.keys {
                match stored.remove(key_id) {
                    None => return error(format!("{key_id} is missing")),
                    Some(row) if row != *state => {
                        return error(format!("{key_id} differs from the replay of its events"));
                    }
                    Some(_) => {}
                }
            }
            let extra = stored.into_keys().min()?;
            error(format!("{extra} has no events in the log"))
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
                    "workspace_hash does not match the workspace chain: the record or an \
                     earlier one of its workspace was altered, inserted or removed"
                        .into(),
                ));
            }
            if let Some((seq, _)) = self
                .expect_head
                .filter(|(seq, _)| *seq > self.chains.last_sequence && *seq < r.sequence)
            {
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
                        "the hash at the expected head differs: the log up to it was rewritten"
                            .into(),
                    ));
                }
            }
            self.replay.apply(r)?;
            self.chains.advance(r);
            Ok(())
        }
    }

    fn new_key(workspace: &str, at: i64) -> (KeyId, Event) {
        let key = ApiKey::generate(KeyType::Private, Environment::Production);
        let key_id = KeyId::generate(at);
        let new = NewKeyRequest {
            key_id,
            workspace_id: WorkspaceId::parse(workspace).unwrap(),
            name: KeyName::parse("k").unwrap(),
            key_type: KeyType::Private,
            environment: Environment::Production,
            expiration: Expiration::Days90,
            scopes: ScopeSet::parse(&["tickets:read"]).unwrap(),
            reveal_later: false,
            allowed_domains: vec![],
            secret_hash: key.hash(),
            masked: key.masked(),
            public_key: None,
        }
        .validate(at)
        .unwrap();
        (key_id, Event::KeyCreated(Box::new(new)))
    }

    /// A log of `n` records over four workspaces: creations, renames, scope changes, reveals
    /// and revocations, chained as the writer chains them.
    fn log(n: usize) -> Vec<LogRecord> {
        let mut chains = Chains::default();
        let mut keys: Vec<(KeyId, String, u64, bool)> = Vec::new();
        let mut records = Vec::with_capacity(n);
        for i in 0..n {
            let at = 1_767_225_600_000 + i as i64;
            let live: Vec<usize> = (0..keys.len()).filter(|&k| !keys[k].3).collect();
            let (key_id, workspace, stream_version, event) = if i % 3 == 0 || live.is_empty() {
                let workspace = format!("ws_{}", i % 4);
                let (key_id, event) = new_key(&workspace, at);
                keys.push((key_id, workspace.clone(), 1, false));
                (key_id, workspace, 1, event)
            } else {
                let k = live[(i * 7) % live.len()];
                let event = match i % 5 {
                    0 => Event::KeyRevoked,
                    1 => Event::KeyRevealed,
                    2 => Event::KeyScopesChanged {
                        scopes: ScopeSet::parse(&["teams:read"]).unwrap(),
                    },
                    _ => Event::KeyRenamed {
                        name: KeyName::parse(&format!("name {i}")).unwrap(),
                    },
                };
                keys[k].2 += 1;
                keys[k].3 = matches!(event, Event::KeyRevoked);
                (keys[k].0, keys[k].1.clone(), keys[k].2, event)
            };
            let encoded = encode_event(&event);
            let mut r = LogRecord {
                sequence: 0,
                key_id: key_id.to_string(),
                workspace_id: workspace,
                stream_version,
                event_type: encoded.event_type.into(),
                schema_version: encoded.schema_version,
                payload: encoded.payload,
                actor: format!("user_{}", i % 3),
                recorded_at_ms: at,
                hash: [0; 32],
                workspace_hash: [0; 32],
                caller_identity: None,
            };
            chains.append(&mut r);
            records.push(r);
        }
        records
    }

    /// Both chains recomputed from genesis over the records as they are.
    fn rechain(records: &mut [LogRecord]) {
        let mut chains = Chains::default();
        for r in records {
            (r.hash, r.workspace_hash) = chains.next(r);
            chains.advance(r);
        }
    }

    fn projection_of(records: &[LogRecord]) -> (Vec<KeyState>, u64) {
        let mut replay = Replay::default();
        for r in records {
            replay.apply(r).unwrap();
        }
        let last = replay.last_sequence;
        (replay.keys.into_values().collect(), last)
    }

    /// The new verifier, fed in batches of `batch` records, holding at most `keys_in_memory`
    /// keys' states in memory.
    fn batched(
        scope: Scope,
        expect_head: Option<(u64, Hash)>,
        records: &[LogRecord],
        projection: Option<(Vec<KeyState>, u64)>,
        (batch, keys_in_memory): (usize, usize),
    ) -> Option<ReplayError> {
        let temp = tempfile::tempdir().unwrap();
        let mut verifier = Verifier::new(scope, expect_head).with_limits(FoldLimits {
            keys_in_memory,
            temp_dir: Some(temp.path().to_owned()),
        });
        for chunk in records.chunks(batch) {
            if !verifier.push_batch(chunk) {
                break;
            }
        }
        let checkpoint = projection.map(|(rows, checkpoint)| {
            // In any order, in pieces.
            let mut rows = rows;
            rows.reverse();
            for piece in rows.chunks(7) {
                verifier.check_rows(piece.to_vec());
            }
            checkpoint
        });
        let report = verifier.finish(checkpoint).unwrap();
        // Nothing is left in the directory: the files were unlinked when made.
        assert_eq!(std::fs::read_dir(temp.path()).unwrap().count(), 0);
        report.failure
    }

    fn same_verdict(
        what: &str,
        scope: Scope,
        expect_head: Option<(u64, Hash)>,
        records: &[LogRecord],
        projection: Option<(Vec<KeyState>, u64)>,
    ) -> Option<ReplayError> {
        let expected = Reference::run(scope.clone(), expect_head, records, projection.clone());
        // Small batches, and one long enough to be hashed on a second thread; all in memory,
        // or spilled to temporary files after a few keys, or from the first batch on.
        let whole = records.len().max(PARALLEL_BATCH);
        for (batch, keys_in_memory) in [(7, usize::MAX), (whole, usize::MAX), (7, 5), (whole, 0)] {
            let got = batched(
                scope.clone(),
                expect_head,
                records,
                projection.clone(),
                (batch, keys_in_memory),
            );
            assert_eq!(
                got, expected,
                "{what}, batches of {batch}, {keys_in_memory} keys in memory"
            );
        }
        expected
    }

    #[test]
    fn batches_find_the_first_failure_the_record_by_record_verifier_found() {
        let original = log(280);
        let projection = projection_of(&original);
        let head = (280, original[279].hash);
        let k = 150;
        assert_eq!(
            same_verdict(
                "untouched",
                Scope::Log,
                Some(head),
                &original,
                Some(projection.clone())
            ),
            None
        );

        type Case = (&'static str, Vec<LogRecord>, Option<(u64, Hash)>);
        let mut cases: Vec<Case> = Vec::new();
        let mut t = original.clone();
        let last = t[k].payload.len() - 1;
        t[k].payload[last] ^= 1;
        cases.push(("flipped payload byte", t, None));
        let mut t = original.clone();
        t[k].actor = "user_mallory".into();
        cases.push(("changed actor", t, Some(head)));
        let mut t = original.clone();
        t.remove(k);
        cases.push(("deleted record", t, None));
        let mut t = original.clone();
        let a = k;
        let b = (k + 1..t.len())
            .find(|&b| t[b].payload != t[a].payload)
            .unwrap();
        let payload = t[a].payload.clone();
        t[a].payload = t[b].payload.clone();
        t[b].payload = payload;
        cases.push(("swapped payloads", t, None));
        let mut t = original.clone();
        t[k].workspace_hash[0] ^= 1;
        cases.push(("changed workspace hash", t, None));
        let mut t = original.clone();
        t[k].actor = "user_mallory".into();
        rechain(&mut t[..]);
        cases.push(("rewritten tail, no head", t.clone(), None));
        cases.push(("rewritten tail, kept head", t, Some(head)));
        let mut t = original.clone();
        t[k].stream_version += 5;
        rechain(&mut t[..]);
        cases.push(("rechained stream version", t, None));
        let mut t = original.clone();
        // A revoked key's later event, rechained: replays badly far after its creation.
        let revoked = t
            .iter()
            .position(|r| r.event_type == "KeyRevoked" && r.sequence > 100)
            .unwrap();
        let mut forged = t[revoked].clone();
        forged.event_type = "KeyRevealed".into();
        forged.stream_version += 1;
        t.insert(revoked + 30, forged);
        for (i, r) in t.iter_mut().enumerate() {
            r.sequence = i as u64 + 1;
        }
        rechain(&mut t[..]);
        cases.push(("event after revocation, rechained", t, None));
        let mut t = original.clone();
        t.truncate(260);
        cases.push(("tail cut before the kept head", t, Some(head)));
        cases.push((
            "a different hash at the kept head",
            original.clone(),
            Some((200, [1; 32])),
        ));
        let mut t = original.clone();
        t[k].key_id = t[k].key_id.to_lowercase();
        rechain(&mut t[..]);
        cases.push(("a stream spelled in lower case", t, None));
        // Sequences out of order: a record copied later into the log. Its replay fails under
        // its own (earlier) sequence, but it is the copy's place that fails first.
        let mut t = original.clone();
        t.insert(200, original[50].clone());
        cases.push(("an earlier record copied later", t, None));
        for (what, records, expect_head) in cases {
            let failure = same_verdict(
                what,
                Scope::Log,
                expect_head,
                &records,
                Some(projection.clone()),
            );
            if what != "rewritten tail, no head" {
                assert!(failure.is_some(), "{what} is caught");
            }
        }

        // The projection against the replay.
        let (rows, checkpoint) = projection.clone();
        let mut changed = rows.clone();
        changed[10].name = KeyName::parse("behind the log").unwrap();
        changed[3].version += 1;
        let mut missing = rows.clone();
        missing.remove(5);
        let mut extra = rows.clone();
        let (key_id, created) = new_key("ws_0", 1);
        let Event::KeyCreated(new) = created else {
            unreachable!()
        };
        let mut ghost = rows[0].clone();
        ghost.key_id = key_id;
        ghost.secret_hash = new.secret_hash;
        extra.push(ghost);
        for (what, projection) in [
            ("changed rows", (changed, checkpoint)),
            ("a missing row", (missing, checkpoint)),
            ("an extra row", (extra, checkpoint)),
            ("a stale checkpoint", (rows.clone(), checkpoint - 1)),
        ] {
            let failure = same_verdict(what, Scope::Log, None, &original, Some(projection));
            assert!(failure.is_some(), "{what} is caught");
        }

        // One workspace's records, as a workspace export holds them.
        let workspace: Vec<LogRecord> = original
            .iter()
            .filter(|r| r.workspace_id == "ws_1")
            .cloned()
            .collect();
        let w = Scope::Workspace("ws_1".into());
        let kept = workspace[50].sequence;
        let ws_head = (kept, workspace[50].workspace_hash);
        assert_eq!(
            same_verdict("workspace", w.clone(), Some(ws_head), &workspace, None),
            None
        );
        let mut t = workspace.clone();
        t.remove(50);
        assert!(
            same_verdict("workspace head removed", w.clone(), Some(ws_head), &t, None).is_some()
        );
        let mut t = workspace.clone();
        t.insert(40, original[0].clone());
        assert!(same_verdict("another workspace's record", w.clone(), None, &t, None).is_some());
        let mut t = workspace.clone();
        t.swap(30, 31);
        assert!(same_verdict("records out of order", w.clone(), None, &t, None).is_some());
        // A record that does not replay, then an earlier record copied in after it: the
        // replay's failure comes first, though the copy's sequence is smaller.
        let mut t = workspace.clone();
        t[30].stream_version += 5;
        rechain(&mut t[..]);
        t.insert(40, t[20].clone());
        let failure = same_verdict("a bad replay, then a copy", w, None, &t, None);
        assert_eq!(failure.map(|f| f.sequence), Some(t[30].sequence));
    }
}
