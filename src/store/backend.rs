//! The seam between the log's rules and a database.
//!
//! Everything above this trait (the writer's group commit and recovery, the batch planning,
//! the chains, the API and the audit tools) is the same for every backend; a backend only
//! stores and reads what it is given. It must:
//!
//! - serialise writers: SQLite holds a single-writer lock from open to [`Backend::release`]
//!   and refuses to open while another process holds it (an OS file lock); PostgreSQL lets
//!   every replica write, and [`WriteSession::begin`] takes the log's lock, held through
//!   COMMIT, so that each transaction continues from the last committed record;
//! - apply [`Effects`] atomically inside the session's transaction, and make the commit
//!   durable before [`WriteSession::commit`] returns;
//! - keep the log append-only by its own means (SQLite: triggers) and store records'
//!   bytes exactly, so that every backend's export verifies the same way;
//! - map its errors into [`StoreError`], telling storage faults (retryable, nothing written)
//!   from everything else.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    CreateRequest, ExpiryCursor, Head, KeyUsage, ListFilter, RecordFilter, SealedSecret, StoreError,
};
use crate::domain::{KeyId, KeyState, VerifyState, WorkspaceId};
use crate::log::chain::{Chains, LogRecord};
use crate::log::spill::FoldLimits;

/// How many keys' states a batch of [`Backend::for_each_key_concurrently`] holds at most.
pub const KEY_BATCH: usize = 4096;

/// What [`Backend::for_each_key_concurrently`] hands each batch of keys to.
pub type EachKeys = dyn for<'a> Fn(Vec<VerifyState<'a>>) + Send + Sync;

/// What a committed batch writes: appended records, the projection rows of the keys it
/// changed, and the side tables.
#[derive(Default)]
pub struct Effects {
    /// Chained records, in sequence order.
    pub records: Vec<LogRecord>,
    /// Final state of every key the batch changed, in first-touched order.
    pub changed: Vec<KeyState>,
    /// Encrypted copies of revealable keys to keep: (key id, copy).
    pub sealed_inserts: Vec<(String, SealedSecret)>,
    /// Keys whose encrypted copies are destroyed (revoked).
    pub sealed_deletes: Vec<String>,
    /// Creates made with a request id: (workspace id, key id, request).
    pub create_requests: Vec<(String, String, CreateRequest)>,
}

/// Statistics of a [`Backend::rebuild`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    pub events: u64,
    pub keys: u64,
    pub last_sequence: i64,
}

/// A create request id already answered, in the log or earlier in the batch.
#[derive(Debug, Clone)]
pub struct Answered {
    pub digest: Vec<u8>,
    pub key_id: String,
    pub sealed_secret: Option<Vec<u8>>,
}

/// A database holding a log and its projection.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Records the master key's fingerprint on first use, and refuses any other afterwards.
    async fn claim_master_key(&self, fingerprint: &str) -> Result<(), StoreError>;

    /// A new session for the writer: one connection, used by one task at a time.
    async fn write_session(&self) -> Result<Box<dyn WriteSession>, StoreError>;

    /// Up to `limit` records after `after`, in log order, matching `filter`.
    async fn read_records(
        &self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError>;

    /// The log's head, and one workspace's (sequence 0 and its genesis when it has no
    /// events), from one snapshot.
    async fn head(&self, workspace_id: Option<&str>) -> Result<(Head, Option<Head>), StoreError>;

    async fn get_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: KeyId,
    ) -> Result<Option<KeyState>, StoreError>;

    /// A page of a workspace's keys in key id order, after `after`.
    async fn list_keys(
        &self,
        workspace_id: &WorkspaceId,
        filter: &ListFilter,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyState>, StoreError>;

    async fn sealed_secret(&self, key_id: KeyId) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes last uses (upserts keeping the later of the stored and the given use), outside
    /// the log and without the writer: a short transaction of its own.
    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError>;

    /// The stored last uses of `key_ids`.
    async fn key_usage(&self, key_ids: &[KeyId]) -> Result<Vec<KeyUsage>, StoreError>;

    /// Live keys (neither revoked nor rolled) with `after < (expires_at, key_id)` and
    /// `expires_at <= up_to_ms`, in that order, at most `limit`.
    async fn expiring(
        &self,
        workspace_id: Option<&WorkspaceId>,
        after: ExpiryCursor,
        up_to_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyState>, StoreError>;

    /// Streams every key's state from the projection; returns how many there were.
    async fn for_each_key(
        &self,
        each: &mut (dyn FnMut(KeyState) + Send),
    ) -> Result<u64, StoreError>;

    /// For loading the verification cache at start-up: what verification needs of every key
    /// in the projection, handed to `each` in batches, possibly from several threads at once
    /// and in no particular order. Returns how many there were. A backend that can tell
    /// refuses (`Corrupt`) a projection that does not hold the whole log, rather than serve
    /// without some keys or revocations.
    ///
    /// Optional: the default is [`Backend::for_each_key`] on the calling task, in batches of
    /// [`KEY_BATCH`].
    async fn for_each_key_concurrently(&self, each: Arc<EachKeys>) -> Result<u64, StoreError> {
        let mut batch = Vec::with_capacity(KEY_BATCH);
        let count = self
            .for_each_key(&mut |state| {
                batch.push(state);
                if batch.len() == KEY_BATCH {
                    each(batch.iter().map(KeyState::verify_state).collect());
                    batch.clear();
                }
            })
            .await?;
        each(batch.iter().map(KeyState::verify_state).collect());
        Ok(count)
    }

    async fn count_keys(&self) -> Result<u64, StoreError>;

    /// Recreates the projection from the log alone, with the domain's own `apply`, in one
    /// transaction, holding at most as many keys' states in memory as `limits` allows.
    /// Only with no server running: the backend's readers are closed by it.
    async fn rebuild(&self, limits: &FoldLimits) -> Result<RebuildReport, StoreError>;

    /// A consistent read-only view of the whole database, for the audit tools.
    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError>;

    /// Closes the readers (before the writer's last session closes).
    async fn close_readers(&self);

    /// Gives up the single-writer lock.
    async fn release(&self);

    /// For a log that other processes append to as well (PostgreSQL replicas): how to follow
    /// it. `None` when this process is the only writer, whose own commits are then the only
    /// changes.
    fn shared(&self) -> Option<&dyn SharedLog> {
        None
    }
}

/// A log written by several replicas, which each follow it.
///
/// Records become visible in sequence order (writers hold the log's lock through commit),
/// so reading `sequence > applied` never skips a record that commits late.
#[async_trait]
pub trait SharedLog: Send + Sync {
    /// Up to `limit` records after `after`, and the current state of every key they touch,
    /// from one snapshot (so the states are at least as new as the records).
    async fn tail(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<LogRecord>, Vec<KeyState>), StoreError>;

    /// Wakeups when other replicas append (a hint only: followers also poll).
    async fn listen(&self) -> Result<Box<dyn Wakeups>, StoreError>;

    /// Publishes this replica's applied position, with the database's clock as heartbeat.
    async fn heartbeat(&self, replica_id: &str, applied: u64) -> Result<(), StoreError>;

    /// The replicas whose heartbeat is at most `live_within` old.
    async fn replicas(&self, live_within: Duration) -> Result<Vec<Replica>, StoreError>;

    /// Removes this replica from the live set (at a clean stop).
    async fn leave(&self, replica_id: &str) -> Result<(), StoreError>;
}

/// Notifications that the shared log has moved.
#[async_trait]
pub trait Wakeups: Send {
    /// Resolves at the next notification (or a reconnection, after which notifications sent
    /// meanwhile are lost). Errors when the database cannot be reached.
    async fn next(&mut self) -> Result<(), StoreError>;
}

/// A live replica, as it last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub replica_id: String,
    pub applied_sequence: u64,
    pub heartbeat_age: Duration,
}

/// The writer's connection. A session whose transaction failed is closed, never reused.
#[async_trait]
pub trait WriteSession: Send {
    async fn begin(&mut self) -> Result<(), StoreError>;

    /// One key's state, folded from its stream with the domain's `apply`.
    async fn load_stream(&mut self, key_id: KeyId) -> Result<Option<KeyState>, StoreError>;

    /// The create request `request_id` of `workspace_id` made at or after `since_ms`.
    async fn answered_create(
        &mut self,
        workspace_id: &str,
        request_id: &str,
        since_ms: i64,
    ) -> Result<Option<Answered>, StoreError>;

    /// Writes a batch's effects inside the open transaction. True when an encrypted copy was
    /// actually destroyed, so that [`WriteSession::scrub`] is due once committed.
    async fn write(&mut self, effects: &Effects) -> Result<bool, StoreError>;

    /// Commits durably. An error may mean the commit landed anyway: the writer reads the log
    /// back through a new session to find out.
    async fn commit(&mut self) -> Result<(), StoreError>;

    async fn read_records(
        &mut self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError>;

    /// The chains' heads as the log holds them.
    async fn chains(&mut self) -> Result<Chains, StoreError>;

    /// Makes destroyed content unrecoverable from the files (for SQLite: checkpoints and
    /// truncates the WAL), waiting at most `wait` for readers. False when it must be retried.
    async fn scrub(&mut self, wait: Duration) -> Result<bool, StoreError>;

    async fn close(self: Box<Self>);
}

/// A read-only view of one moment of the database.
#[async_trait]
pub trait Snapshot: Send {
    async fn read_records(
        &mut self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError>;

    /// Every projection row, in key id order, and the projection's checkpoint.
    async fn projection(&mut self) -> Result<(Vec<KeyState>, u64), StoreError>;

    /// The sequence of the log's last record.
    async fn log_end(&mut self) -> Result<u64, StoreError>;

    /// Every record up to sequence `up_to`, in log order, handed to `each` a batch at a time
    /// until it returns false: for reading a whole log at the speed of the database.
    ///
    /// Optional: the default pages through [`Snapshot::read_records`].
    async fn scan_records(
        &mut self,
        up_to: u64,
        each: &mut (dyn FnMut(Vec<LogRecord>) -> bool + Send),
    ) -> Result<(), StoreError> {
        let filter = RecordFilter {
            up_to: Some(up_to),
            ..RecordFilter::default()
        };
        let mut after = 0;
        loop {
            let page = self.read_records(after, SCAN_PAGE, &filter).await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = last.sequence;
            if !each(page) {
                return Ok(());
            }
        }
    }

    /// Every projection row, in any order, handed to `each` a batch at a time until it
    /// returns false; returns the projection's checkpoint. For comparing a projection of
    /// millions of rows with a replay without holding it whole.
    ///
    /// Optional: the default reads [`Snapshot::projection`] whole.
    async fn scan_projection(
        &mut self,
        each: &mut (dyn FnMut(Vec<KeyState>) -> bool + Send),
    ) -> Result<u64, StoreError> {
        let (states, checkpoint) = self.projection().await?;
        let mut states = states.into_iter().peekable();
        while states.peek().is_some() {
            if !each(states.by_ref().take(SCAN_PAGE as usize).collect()) {
                break;
            }
        }
        Ok(checkpoint)
    }
}

/// Records or rows per batch of the default [`Snapshot::scan_records`] and
/// [`Snapshot::scan_projection`].
const SCAN_PAGE: u32 = 1000;
