//! The append-only event log and the `keys` projection: the writer and the store's surface,
//! whatever database holds them.
//!
//! All writes go through one writer task ([`writer`]) that commits waiting commands together
//! (group commit). The writer and the readers reach the database only through the narrow
//! [`Backend`] trait ([`backend`]); SQLite ([`sqlite`]) is its first implementation and the
//! only module that names a SQLite type.
//!
//! One process owns a database: a backend opened for writing holds the single-writer lock
//! (for SQLite an OS lock on `<database>.lock`) and refuses to open while another process
//! holds it. Readers (the audit tools) need no lock.

pub mod backend;
mod follow;
mod plan;
pub mod postgres;
pub mod sqlite;
mod writer;

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::domain::{
    Command, DomainError, Environment, KeyId, KeyState, KeyType, OriginClass, WorkspaceId,
};
use crate::log::chain::{Hash, LogRecord};
pub use backend::{
    Answered, Backend, EachKeys, Effects, RebuildReport, Replica, SharedLog, Snapshot, WriteSession,
};
pub use postgres::PgBackend;
pub use sqlite::{DATABASE_FILE, SqliteBackend, rebuild};
pub use writer::CommitListener;

/// Why a store call failed. Cheap to clone: a failed batch answers every caller in it.
/// Storage faults (`Full`, `Unavailable`, `OutcomeUnknown`) keep their cause as the error's
/// source, for the log; callers are told only the kind.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The domain refused the command; nothing was written.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// A CreateKey request id was used before, within the window, for a different request.
    #[error("the request id was used for a different request")]
    RequestIdReused,
    /// The storage is full (SQLITE_FULL, a file size limit); nothing was written.
    #[error("storage full")]
    Full(#[source] Cause),
    /// The storage failed (an I/O error, files read-only or locked, the database
    /// unreachable, the writer stopped); nothing was written. Worth retrying later.
    #[error("storage unavailable")]
    Unavailable(#[source] Cause),
    /// The commit itself failed and the writer could not read back whether it landed. The
    /// writer finds out when storage works again and brings the cache up to date then.
    #[error("storage failed while committing; outcome unknown")]
    OutcomeUnknown(#[source] Cause),
    /// The database refused a statement for a reason other than its storage (a constraint,
    /// a schema it does not have).
    #[error("the database refused a statement")]
    Database(#[source] Cause),
    /// The log or the projection holds something that does not decode or replay.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A rule of the service itself was broken (decide and apply disagree): a bug.
    #[error("invariant broken: {0}")]
    Invariant(String),
    /// The database cannot be used as asked: held by another process, made with another
    /// master key, missing. Said to the operator at start.
    #[error("{0}")]
    Refused(String),
}

impl StoreError {
    /// The temporary files of a replay in parts, in `dir`, could not be made, written or read.
    pub(crate) fn temp_files(dir: &Path, e: std::io::Error) -> StoreError {
        StoreError::Unavailable(Cause::msg(format!(
            "temporary files in {}: {e}",
            dir.display()
        )))
    }

    /// Whether the storage itself failed (as opposed to a refused command or a bug).
    pub fn is_storage_fault(&self) -> bool {
        matches!(
            self,
            StoreError::Full(_) | StoreError::Unavailable(_) | StoreError::OutcomeUnknown(_)
        )
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        let pg_code = match &e {
            sqlx::Error::Database(db) => db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .map(|pg| pg.code().to_owned()),
            _ => None,
        };
        match pg_code {
            Some(code) => postgres::classify(&code, e),
            None => sqlite::classify(e),
        }
    }
}

/// The underlying error of a [`StoreError`], shared by every caller of a failed batch.
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause(Arc::new(error))
    }

    /// A cause that is only a description.
    pub fn msg(message: impl Into<String>) -> Cause {
        Cause(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
            message.into(),
        )))
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A change to one key, as the writer receives it.
pub struct Write {
    pub workspace_id: WorkspaceId,
    pub key_id: KeyId,
    pub command: Command,
    pub actor: String,
    /// The authenticated calling service (mutual TLS), recorded beside the actor.
    pub caller_identity: Option<String>,
    /// For a create with reveal_later: the encrypted copy to keep beside the log. For a roll,
    /// the successor's, kept only if the old key was created with reveal_later.
    pub sealed_secret: Option<SealedSecret>,
    /// For a create (or a roll: the successor is a create) with a request id: what a retry
    /// needs to be answered like this call.
    pub create_request: Option<CreateRequest>,
}

/// How long a CreateKey request id is remembered: a retry within this window gets the first
/// call's answer.
pub const CREATE_REQUEST_WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

/// An idempotent create (AIP-155).
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub request_id: String,
    /// Digest of the request without its request id.
    pub digest: [u8; 32],
    /// The secret, sealed as revealable copies are, so that a retry can return it.
    pub sealed_secret: Vec<u8>,
}

/// What a write left: the key's state, and for a create (or roll) answered from an earlier
/// call with the same request id, that call's sealed secret.
#[derive(Debug, Clone)]
pub struct Written {
    pub state: KeyState,
    pub replayed: Option<Replayed>,
    /// For a roll: the old key as the roll left it (`state` is then the successor).
    pub previous: Option<KeyState>,
}

/// A create that an earlier call with the same request id already made.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// The first call's secret, sealed; `None` once the key was revoked.
    pub sealed_secret: Option<Vec<u8>>,
}

#[derive(Clone)]
pub struct SealedSecret {
    pub sealed: Vec<u8>,
    pub master_key_id: String,
}

/// Filters of [`Store::list_keys`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub key_type: Option<KeyType>,
    pub environment: Option<Environment>,
    pub include_revoked: bool,
    /// Only keys with no recorded use at or after this instant (a minute's start: uses are
    /// kept to the minute), never used ones included.
    pub unused_since_ms: Option<i64>,
    /// Only keys with no recorded use.
    pub never_used: bool,
    /// Only keys whose `expires_at` is before this instant.
    pub expires_before_ms: Option<i64>,
}

/// A key's last use as the database keeps it: operational data beside the projection, not
/// an event, not in the hash chains, and untouched by a rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: KeyId,
    /// The start of the minute of the last accepted Verify.
    pub last_used_at_ms: i64,
    pub origin: OriginClass,
}

/// Where a scan of keys by expiry resumes: after this (expires_at, key id).
pub type ExpiryCursor = (i64, Option<KeyId>);

/// How long a replica of a shared log may go without confirming it has caught up before it
/// refuses Verify: long enough that a database restart or failover of a few seconds does not
/// take Verify down everywhere, short enough that a revocation is never missed for long.
pub const DEFAULT_MAX_STALENESS: std::time::Duration = std::time::Duration::from_secs(5);

/// Tuning of the writer.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most commands committed in one transaction.
    pub max_batch: usize,
    /// Committed records buffered for live subscribers; one that falls further behind is
    /// told so and pages instead.
    pub live_buffer: usize,
    /// A quota on the database's size; writes past it fail as storage full.
    pub max_database_bytes: Option<u64>,
    /// For a shared log: how long this replica may go without confirming it has caught up
    /// before it refuses Verify.
    pub max_staleness: std::time::Duration,
    /// For a shared log: this replica's name in the live set.
    pub replica_id: String,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            max_batch: 256,
            live_buffer: 4096,
            max_database_bytes: None,
            max_staleness: DEFAULT_MAX_STALENESS,
            replica_id: ulid::Ulid::new().to_string(),
        }
    }
}

/// Which log records to read; `None` fields match everything.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    pub workspace_id: Option<String>,
    pub key_id: Option<String>,
    /// Each is one SQL variable of the read, so callers keep the list short (the API refuses
    /// long ones and drops repeats) and far under SQLite's limit on variables.
    pub event_types: Vec<String>,
    /// Only records at or before this sequence.
    pub up_to: Option<u64>,
}

impl RecordFilter {
    pub fn matches(&self, r: &LogRecord) -> bool {
        self.workspace_id
            .as_ref()
            .is_none_or(|w| *w == r.workspace_id)
            && self.key_id.as_ref().is_none_or(|k| *k == r.key_id)
            && self.up_to.is_none_or(|last| r.sequence <= last)
            && (self.event_types.is_empty() || self.event_types.contains(&r.event_type))
    }
}

/// The last record of the log: its sequence and hash (genesis for an empty log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub sequence: u64,
    pub hash: Hash,
}

/// The log and its projection. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    writes: mpsc::Sender<writer::Request>,
    committed: broadcast::Sender<Arc<LogRecord>>,
    /// Whether the last commit succeeded; see [`Store::writable`].
    writable: watch::Sender<bool>,
    writer: Arc<WriterHandle>,
    /// For a shared log: this replica's follower.
    follower: Option<Arc<follow::Follower>>,
}

/// Stopping and joining the writer task (and the tailer, for a shared log).
struct WriterHandle {
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    tailer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Store {
    /// Opens the SQLite store at `path` (taking its lock, applying migrations) and starts
    /// its writer; see [`Store::with_backend`].
    pub async fn open(
        path: &Path,
        master_key_id: &str,
        clock: Arc<dyn Clock>,
        listener: Arc<dyn CommitListener>,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let backend = SqliteBackend::open_with_quota(path, options.max_database_bytes).await?;
        Store::with_backend(Arc::new(backend), master_key_id, clock, listener, options).await
    }

    /// Starts the writer on `backend`. `master_key_id` is the fingerprint of the master key:
    /// recorded on first open, and required to match afterwards, so a server never runs with
    /// a master key that cannot open the stored copies.
    pub async fn with_backend(
        backend: Arc<dyn Backend>,
        master_key_id: &str,
        clock: Arc<dyn Clock>,
        listener: Arc<dyn CommitListener>,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        backend.claim_master_key(master_key_id).await?;
        let mut session = backend.write_session().await?;
        let heads = plan::Heads::new(session.chains().await?);
        let (tx, rx) = mpsc::channel(options.max_batch.max(1) * 4);
        let (committed, _) = broadcast::channel(options.live_buffer.max(1));
        let (writable, _) = watch::channel(true);
        let follower = backend.shared().map(|_| {
            Arc::new(follow::Follower::new(
                heads.chains.last_sequence,
                listener.clone(),
                committed.clone(),
                options.replica_id.clone(),
                options.max_staleness,
            ))
        });
        let writer = writer::Writer {
            session: Some(session),
            backend: backend.clone(),
            heads,
            writable: writable.clone(),
            scrub_pending: false,
            clock,
            listener,
            committed: committed.clone(),
            max_batch: options.max_batch.max(1),
            follower: follower.clone(),
        };
        let (stop, stopped) = watch::channel(false);
        let tailer = follower
            .clone()
            .map(|f| tokio::spawn(follow::run(f, backend.clone(), stopped.clone())));
        let task = tokio::spawn(writer::run(writer, rx, stopped));
        Ok(Store {
            backend,
            writes: tx,
            committed,
            writable,
            writer: Arc::new(WriterHandle {
                stop,
                task: std::sync::Mutex::new(Some(task)),
                tailer: std::sync::Mutex::new(tailer),
            }),
            follower,
        })
    }

    /// Whether the log is shared with other replicas (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.follower.is_some()
    }

    /// Whether this replica may answer Verify from its cache: always for a log only this
    /// process writes; for a shared log, while it has confirmed within the staleness bound
    /// that it has applied everything committed.
    pub fn fresh(&self) -> watch::Receiver<bool> {
        match &self.follower {
            Some(follower) => follower.fresh(),
            None => watch::channel(true).1,
        }
    }

    /// For a shared log: waits until every live replica has applied everything this replica
    /// has applied now (its own last commit included), at most the staleness bound. Past
    /// that bound a replica that has not applied it refuses Verify, so every replica that
    /// still answers Verify answers with it. Returns (replicas confirmed, replicas live), or
    /// `None` for a log only this process writes.
    pub async fn confirm_replicas(&self) -> Result<Option<(usize, usize)>, StoreError> {
        let Some(follower) = &self.follower else {
            return Ok(None);
        };
        let shared = self
            .backend
            .shared()
            .expect("a follower follows a shared log");
        let target = follower.position();
        let deadline = tokio::time::Instant::now() + follower.max_staleness;
        loop {
            let live = shared.replicas(follower.max_staleness).await?;
            let confirmed = live.iter().filter(|r| r.applied_sequence >= target).count();
            if confirmed == live.len() || tokio::time::Instant::now() >= deadline {
                return Ok(Some((confirmed, live.len())));
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// False from the first commit that storage failed until the next one that succeeds.
    /// Reads and VerifyKey go on regardless; the writer retries on every write.
    pub fn writable(&self) -> watch::Receiver<bool> {
        self.writable.subscribe()
    }

    /// Writes waiting for the writer (for metrics).
    pub fn queued_writes(&self) -> usize {
        self.writes.max_capacity() - self.writes.capacity()
    }

    /// Live subscribers of committed records (for metrics).
    pub fn live_subscribers(&self) -> usize {
        self.committed.receiver_count()
    }

    /// For a shared log: the last sequence this replica has applied (for metrics).
    pub fn applied_sequence(&self) -> Option<u64> {
        self.follower.as_ref().map(|f| f.position())
    }

    /// Records as they are committed, in order. Lagging receivers get `RecvError::Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LogRecord>> {
        self.committed.subscribe()
    }

    /// Up to `limit` records after `after`, in log order, matching `filter`.
    pub async fn read_records(
        &self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError> {
        self.backend.read_records(after, limit, filter).await
    }

    /// The log's head, and the head of one workspace's chain (sequence 0 and the workspace
    /// genesis when it has no events), from one snapshot of the log.
    pub async fn head(
        &self,
        workspace_id: Option<&str>,
    ) -> Result<(Head, Option<Head>), StoreError> {
        self.backend.head(workspace_id).await
    }

    /// Applies one command durably: answered once the transaction holding its events has
    /// committed and the commit listener has seen the new state.
    pub async fn write(&self, write: Write) -> Result<KeyState, StoreError> {
        Ok(self.create(write).await?.state)
    }

    /// [`Store::write`], telling also whether a create was answered from an earlier call with
    /// the same request id.
    pub async fn create(&self, write: Write) -> Result<Written, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(writer::Request {
                write,
                reply,
                span: tracing::Span::current(),
            })
            .await
            .map_err(|_| StoreError::Unavailable(Cause::msg("the writer has stopped")))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable(Cause::msg("the writer dropped the request")))?
    }

    pub async fn get_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: KeyId,
    ) -> Result<Option<KeyState>, StoreError> {
        self.backend.get_key(workspace_id, key_id).await
    }

    /// A page of a workspace's keys in key id order (oldest first), after `after`.
    pub async fn list_keys(
        &self,
        workspace_id: &WorkspaceId,
        filter: &ListFilter,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyState>, StoreError> {
        self.backend
            .list_keys(workspace_id, filter, after, limit)
            .await
    }

    /// Writes last uses, keeping for each key the latest of the stored one and the given one.
    pub async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        self.backend.record_usage(usage).await
    }

    /// The stored last uses of `key_ids` (keys never used have none).
    pub async fn key_usage(&self, key_ids: &[KeyId]) -> Result<Vec<KeyUsage>, StoreError> {
        if key_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.backend.key_usage(key_ids).await
    }

    /// Up to `limit` live keys (not revoked, not rolled) of `workspace_id` (or of every
    /// workspace) expiring after `after` and at or before `up_to_ms`, by (expires_at, key id).
    pub async fn expiring(
        &self,
        workspace_id: Option<&WorkspaceId>,
        after: ExpiryCursor,
        up_to_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyState>, StoreError> {
        self.backend
            .expiring(workspace_id, after, up_to_ms, limit)
            .await
    }

    /// The encrypted copy of a key's secret, if one is kept.
    pub async fn sealed_secret(&self, key_id: KeyId) -> Result<Option<Vec<u8>>, StoreError> {
        self.backend.sealed_secret(key_id).await
    }

    /// Streams every key's current state from the projection to `each` (for loading the
    /// verification cache without holding all rows at once). Returns how many there were.
    pub async fn for_each_key(
        &self,
        mut each: impl FnMut(KeyState) + Send,
    ) -> Result<u64, StoreError> {
        self.backend.for_each_key(&mut each).await
    }

    /// For loading the verification cache: what verification needs of every key, handed to
    /// `each` in batches. `each` may be called from several threads at once, in any order.
    /// Refuses a projection that does not hold the whole log (where the backend can tell).
    pub async fn for_each_key_concurrently(&self, each: Arc<EachKeys>) -> Result<u64, StoreError> {
        self.backend.for_each_key_concurrently(each).await
    }

    /// How many keys the projection holds.
    pub async fn count_keys(&self) -> Result<u64, StoreError> {
        self.backend.count_keys().await
    }

    /// Closes the readers, then stops the writer once it has committed every write already
    /// queued (later writes are refused) and waits for it, then releases the database. The
    /// writer is the last connection: for SQLite it checkpoints the WAL into the database
    /// file and SQLite removes the WAL, so a clean stop leaves one self-contained file.
    pub async fn close(self) {
        self.backend.close_readers().await;
        let _ = self.writer.stop.send(true);
        let task = self
            .writer
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "the writer task failed");
        }
        let tailer = self
            .writer
            .tailer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tailer) = tailer
            && let Err(e) = tailer.await
        {
            tracing::error!(error = %e, "the tailer task failed");
        }
        self.backend.release().await;
    }
}
