//! The append-only event log and the `keys` projection, on SQLite.
//!
//! All writes go through one writer task ([`writer`]) that commits waiting commands together
//! (group commit); reads use a small pool. The seam a PostgreSQL backend will fill is this
//! module's public surface: [`Store::open`], [`Store::write`], the read methods and
//! [`rebuild`]. Nothing outside `store` sees SQL.
//!
//! One process owns a database: [`Store::open`], [`rebuild`] and [`create_database`] hold an
//! OS lock on `<database>.lock` for as long as they write, and refuse to start while another
//! process holds it. Readers (the audit tools) need no lock.

pub mod rows;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::domain::{
    self, Command, DomainError, Environment, KeyId, KeyState, KeyType, Recorded, WorkspaceId,
};
use crate::log::chain::{self, Hash, LogRecord};
use crate::log::events;
use rows::{KEY_COLUMNS, KeyRow};
pub use writer::CommitListener;

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "kemon-keys.db";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The lock file beside a database: held by the one process that writes it.
pub fn lock_path(database: &Path) -> std::path::PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    name.into()
}

/// Why a store call failed. Cheap to clone: a failed batch answers every caller in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The domain refused the command; nothing was written.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The storage is full (SQLITE_FULL, a file size limit); nothing was written.
    #[error("storage full: {0}")]
    Full(String),
    /// The storage failed (an I/O error, files read-only or locked, the database
    /// unreachable); nothing was written. Worth retrying later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A CreateKey request id was used before, within the window, for a different request.
    #[error("the request id was used for a different request")]
    RequestIdReused,
    /// The commit itself failed and the writer could not read back whether it landed. The
    /// writer finds out when storage works again and brings the cache up to date then.
    #[error("storage failed while committing; outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The database holds something it should not, or refused a statement for a reason
    /// other than its storage; logged, hidden from callers.
    #[error("storage failure: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether the storage itself failed (as opposed to a refused command or a bug).
    pub fn is_storage_fault(&self) -> bool {
        matches!(
            self,
            StoreError::Full(_) | StoreError::Unavailable(_) | StoreError::OutcomeUnknown(_)
        )
    }
}

/// SQLite's primary result codes that mean the storage, not the statement, failed
/// (<https://www.sqlite.org/rescode.html>).
const SQLITE_PERM: i64 = 3;
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;
const SQLITE_NOMEM: i64 = 7;
const SQLITE_READONLY: i64 = 8;
const SQLITE_IOERR: i64 = 10;
const SQLITE_CORRUPT: i64 = 11;
const SQLITE_FULL: i64 = 13;
const SQLITE_CANTOPEN: i64 = 14;
const SQLITE_PROTOCOL: i64 = 15;
const SQLITE_NOTADB: i64 = 26;

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        let primary = match &e {
            sqlx::Error::Database(db) => db
                .code()
                .and_then(|c| c.parse::<i64>().ok())
                .map(|c| c & 0xff),
            _ => None,
        };
        match (&e, primary) {
            (_, Some(SQLITE_FULL)) => StoreError::Full(e.to_string()),
            (
                _,
                Some(
                    SQLITE_PERM | SQLITE_BUSY | SQLITE_LOCKED | SQLITE_NOMEM | SQLITE_READONLY
                    | SQLITE_IOERR | SQLITE_CORRUPT | SQLITE_CANTOPEN | SQLITE_PROTOCOL
                    | SQLITE_NOTADB,
                ),
            )
            | (
                sqlx::Error::Io(_)
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed,
                _,
            ) => StoreError::Unavailable(e.to_string()),
            _ => StoreError::Internal(e.to_string()),
        }
    }
}

/// The exclusive right to write one database, held until dropped (an OS file lock, released
/// by the kernel if the process dies).
#[derive(Debug)]
pub struct DatabaseLock {
    _file: std::fs::File,
}

impl DatabaseLock {
    /// Takes the lock beside `database`, or says which process to stop.
    pub fn acquire(database: &Path) -> Result<DatabaseLock, StoreError> {
        let path = lock_path(database);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::Unavailable(format!("opening {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(DatabaseLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Internal(format!(
                "{} is in use by another kemon-keys process (it holds the lock {}); stop the \
                 server using it first, or give this one another data directory",
                database.display(),
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
                "locking {}: {e}",
                path.display()
            ))),
        }
    }
}

/// A change to one key, as the writer receives it.
pub struct Write {
    pub workspace_id: WorkspaceId,
    pub key_id: KeyId,
    pub command: Command,
    pub actor: String,
    /// For a create with reveal_later: the encrypted copy to keep beside the log.
    pub sealed_secret: Option<SealedSecret>,
    /// For a create with a request id: what a retry needs to be answered like this call.
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

/// What a write left: the key's state, and for a create answered from an earlier call with
/// the same request id, that call's sealed secret.
#[derive(Debug, Clone)]
pub struct Written {
    pub state: KeyState,
    pub replayed: Option<Replayed>,
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
}

/// Tuning of the writer.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most commands committed in one transaction.
    pub max_batch: usize,
    /// Committed records buffered for live subscribers; one that falls further behind is
    /// told so and pages instead.
    pub live_buffer: usize,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            max_batch: 256,
            live_buffer: 4096,
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
    pool: SqlitePool,
    writes: mpsc::Sender<writer::Request>,
    committed: broadcast::Sender<Arc<LogRecord>>,
    /// Whether the last commit succeeded; see [`Store::writable`].
    writable: watch::Sender<bool>,
    writer: Arc<WriterHandle>,
}

/// Stopping and joining the writer task.
struct WriterHandle {
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How long a statement waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
        // Deleted content is overwritten with zeros, so a revoked key's encrypted copy does
        // not linger in free space (the writer also checkpoints the WAL after a revoke).
        .pragma("secure_delete", "ON")
        // Statement journals (one per multi-row statement inside a transaction) stay in
        // memory instead of going through a temporary file.
        .pragma("temp_store", "MEMORY")
}

/// The writer's connection options: it keeps the hot index pages of the log and the
/// projection in memory.
fn writer_options(path: &Path) -> SqliteConnectOptions {
    connect_options(path).pragma("cache_size", "-65536")
}

/// A database opened for writing: its lock, a reader pool, and the writer's connection.
struct Opened {
    lock: DatabaseLock,
    pool: SqlitePool,
    conn: SqliteConnection,
}

/// Takes the database's lock, opens (creating if needed) the database and applies the
/// embedded migrations.
async fn open_database(path: &Path) -> Result<Opened, StoreError> {
    let lock = DatabaseLock::acquire(path)?;
    let mut conn = SqliteConnection::connect_with(&writer_options(path)).await?;
    MIGRATOR.run(&mut conn).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
        e => StoreError::Internal(format!("migrations failed: {e}")),
    })?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(connect_options(path).read_only(true))
        .await?;
    Ok(Opened { lock, pool, conn })
}

impl Store {
    /// Opens the store at `path` and starts its writer. `master_key_id` is the fingerprint of
    /// the master key: recorded on first open, and required to match afterwards, so a server
    /// never runs with a master key that cannot open the stored copies.
    pub async fn open(
        path: &Path,
        master_key_id: &str,
        clock: Arc<dyn Clock>,
        listener: Arc<dyn CommitListener>,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let Opened {
            lock,
            pool,
            mut conn,
        } = open_database(path).await?;
        sqlx::query("INSERT OR IGNORE INTO meta (name, value) VALUES ('master_key_id', ?)")
            .bind(master_key_id)
            .execute(&mut conn)
            .await?;
        let stored: String =
            sqlx::query_scalar("SELECT value FROM meta WHERE name = 'master_key_id'")
                .fetch_one(&mut conn)
                .await?;
        if stored != master_key_id {
            return Err(StoreError::Internal(format!(
                "the master key (fingerprint {master_key_id}) is not the one this database was \
                 created with (fingerprint {stored}); start with the original master key"
            )));
        }
        let heads = load_heads(&mut conn).await?;
        let (tx, rx) = mpsc::channel(options.max_batch.max(1) * 4);
        let (committed, _) = broadcast::channel(options.live_buffer.max(1));
        let (writable, _) = watch::channel(true);
        let writer = writer::Writer {
            conn: Some(conn),
            connect: writer_options(path),
            _lock: lock,
            heads,
            writable: writable.clone(),
            scrub_pending: false,
            clock,
            listener,
            committed: committed.clone(),
            max_batch: options.max_batch.max(1),
        };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(writer::run(writer, rx, stopped));
        Ok(Store {
            pool,
            writes: tx,
            committed,
            writable,
            writer: Arc::new(WriterHandle {
                stop,
                task: std::sync::Mutex::new(Some(task)),
            }),
        })
    }

    /// False from the first commit that storage failed until the next one that succeeds.
    /// Reads and VerifyKey go on regardless; the writer retries on every write.
    pub fn writable(&self) -> watch::Receiver<bool> {
        self.writable.subscribe()
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
        read_records(&self.pool, after, limit, filter).await
    }

    /// The log's head, and the head of one workspace's chain (sequence 0 and the workspace
    /// genesis when it has no events).
    pub async fn head(
        &self,
        workspace_id: Option<&str>,
    ) -> Result<(Head, Option<Head>), StoreError> {
        // One read transaction: both heads from the same snapshot of the log.
        let mut tx = self.pool.begin().await?;
        let log = log_head(&mut tx).await?;
        let workspace = match workspace_id {
            None => None,
            Some(w) => {
                let row: Option<(i64, Vec<u8>)> = sqlx::query_as(
                    "SELECT sequence, workspace_hash FROM events WHERE workspace_id = ? \
                     ORDER BY sequence DESC LIMIT 1",
                )
                .bind(w)
                .fetch_optional(&mut *tx)
                .await?;
                Some(head_from(row, chain::workspace_genesis(w))?)
            }
        };
        tx.commit().await?;
        Ok((log, workspace))
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
            .send(writer::Request { write, reply })
            .await
            .map_err(|_| StoreError::Internal("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Internal("the writer dropped the request".into()))?
    }

    pub async fn get_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: KeyId,
    ) -> Result<Option<KeyState>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE key_id = ? AND workspace_id = ?"
        )))
        .bind(key_id.to_string())
        .bind(workspace_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(KeyRow::into_state)
            .transpose()
            .map_err(StoreError::Internal)
    }

    /// A page of a workspace's keys in key id order (oldest first), after `after`.
    pub async fn list_keys(
        &self,
        workspace_id: &WorkspaceId,
        filter: &ListFilter,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyState>, StoreError> {
        let mut sql =
            format!("SELECT {KEY_COLUMNS} FROM keys WHERE workspace_id = ? AND key_id > ?");
        if filter.key_type.is_some() {
            sql.push_str(" AND key_type = ?");
        }
        if filter.environment.is_some() {
            sql.push_str(" AND environment = ?");
        }
        if !filter.include_revoked {
            sql.push_str(" AND revoked_at IS NULL");
        }
        sql.push_str(" ORDER BY key_id LIMIT ?");
        let mut query = sqlx::query_as::<_, KeyRow>(sqlx::AssertSqlSafe(sql))
            .bind(workspace_id.as_str())
            .bind(after.map(|k| k.to_string()).unwrap_or_default());
        if let Some(t) = filter.key_type {
            query = query.bind(t.as_str());
        }
        if let Some(e) = filter.environment {
            query = query.bind(e.as_str());
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(KeyRow::into_state)
            .collect::<Result<_, _>>()
            .map_err(StoreError::Internal)
    }

    /// The encrypted copy of a key's secret, if one is kept.
    pub async fn sealed_secret(&self, key_id: KeyId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT sealed FROM sealed_secrets WHERE key_id = ?")
                .bind(key_id.to_string())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Streams every key's current state from the projection to `each` (for loading the
    /// verification cache without holding all rows at once). Returns how many there were.
    pub async fn for_each_key(&self, mut each: impl FnMut(KeyState)) -> Result<u64, StoreError> {
        let mut rows = sqlx::query_as::<_, KeyRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys"
        )))
        .fetch(&self.pool);
        let mut count = 0;
        while let Some(row) = rows.try_next().await? {
            each(row.into_state().map_err(StoreError::Internal)?);
            count += 1;
        }
        Ok(count)
    }

    /// How many keys the projection holds.
    pub async fn count_keys(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Closes the reader pool, then stops the writer once it has committed every write
    /// already queued (later writes are refused) and waits for it. The writer is the last
    /// connection: it checkpoints the WAL into the database file and SQLite removes the
    /// WAL, so a clean stop leaves one self-contained file.
    pub async fn close(self) {
        self.pool.close().await;
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
    }
}

/// The last record's sequence and hash (genesis for an empty log).
async fn log_head(conn: &mut SqliteConnection) -> Result<Head, StoreError> {
    let row: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT sequence, hash FROM events ORDER BY sequence DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    head_from(row, chain::log_genesis())
}

fn head_from(row: Option<(i64, Vec<u8>)>, genesis: Hash) -> Result<Head, StoreError> {
    Ok(match row {
        None => Head {
            sequence: 0,
            hash: genesis,
        },
        Some((sequence, hash)) => Head {
            sequence: u64::try_from(sequence).unwrap_or(0),
            hash: hash
                .try_into()
                .map_err(|_| StoreError::Internal(format!("hash of {sequence} is not 32 bytes")))?,
        },
    })
}

/// The chain heads the writer continues from: the last record's, and each workspace's last.
async fn load_heads(conn: &mut SqliteConnection) -> Result<writer::Heads, StoreError> {
    let last = log_head(conn).await?;
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT workspace_id, workspace_hash FROM events WHERE sequence IN \
         (SELECT MAX(sequence) FROM events GROUP BY workspace_id)",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut workspaces = std::collections::HashMap::with_capacity(rows.len());
    for (workspace, hash) in rows {
        let hash: Hash = hash.try_into().map_err(|_| {
            StoreError::Internal(format!("workspace hash of {workspace} is not 32 bytes"))
        })?;
        workspaces.insert(workspace, hash);
    }
    Ok(writer::Heads::new(chain::Chains::new(
        last.sequence,
        last.hash,
        workspaces,
    )))
}

const RECORD_COLUMNS: &str = "sequence, key_id, workspace_id, stream_version, event_type, \
    schema_version, payload, actor, recorded_at, hash, workspace_hash";

/// Reads records in log order from any connection or pool.
pub async fn read_records<'c, E>(
    executor: E,
    after: u64,
    limit: u32,
    filter: &RecordFilter,
) -> Result<Vec<LogRecord>, StoreError>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let mut sql = format!("SELECT {RECORD_COLUMNS} FROM events WHERE sequence > ?");
    if filter.workspace_id.is_some() {
        sql.push_str(" AND workspace_id = ?");
    }
    if filter.key_id.is_some() {
        sql.push_str(" AND key_id = ?");
    }
    if filter.up_to.is_some() {
        sql.push_str(" AND sequence <= ?");
    }
    if !filter.event_types.is_empty() {
        sql.push_str(" AND event_type IN (");
        sql.push_str(&vec!["?"; filter.event_types.len()].join(", "));
        sql.push(')');
    }
    sql.push_str(" ORDER BY sequence LIMIT ?");
    let mut query =
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(i64::try_from(after).unwrap_or(i64::MAX));
    if let Some(w) = &filter.workspace_id {
        query = query.bind(w.clone());
    }
    if let Some(k) = &filter.key_id {
        query = query.bind(k.clone());
    }
    if let Some(last) = filter.up_to {
        query = query.bind(i64::try_from(last).unwrap_or(i64::MAX));
    }
    for t in &filter.event_types {
        query = query.bind(t.clone());
    }
    let rows = query.bind(i64::from(limit)).fetch_all(executor).await?;
    rows.iter().map(record_from_row).collect()
}

fn record_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<LogRecord, StoreError> {
    let hash = |name: &str| -> Result<Hash, StoreError> {
        let bytes: Vec<u8> = row.try_get(name)?;
        bytes
            .try_into()
            .map_err(|_| StoreError::Internal(format!("{name} is not 32 bytes")))
    };
    Ok(LogRecord {
        sequence: u64::try_from(row.try_get::<i64, _>("sequence")?).unwrap_or(0),
        key_id: row.try_get("key_id")?,
        workspace_id: row.try_get("workspace_id")?,
        stream_version: u64::try_from(row.try_get::<i64, _>("stream_version")?).unwrap_or(0),
        event_type: row.try_get("event_type")?,
        schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?).unwrap_or(u32::MAX),
        payload: row.try_get("payload")?,
        actor: row.try_get("actor")?,
        recorded_at_ms: row.try_get("recorded_at")?,
        hash: hash("hash")?,
        workspace_hash: hash("workspace_hash")?,
    })
}

/// Reads one key's stream inside a connection or transaction and folds it with [`apply`].
async fn load_stream(
    conn: &mut SqliteConnection,
    key_id: KeyId,
) -> Result<Option<KeyState>, StoreError> {
    let rows = sqlx::query(
        "SELECT stream_version, event_type, schema_version, payload, actor, recorded_at \
         FROM events WHERE key_id = ? ORDER BY stream_version",
    )
    .bind(key_id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let mut state = None;
    for row in rows {
        let recorded = recorded_from_row(&row)?;
        state = Some(domain::apply(state, &recorded).map_err(StoreError::Internal)?);
    }
    Ok(state)
}

fn recorded_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Recorded, StoreError> {
    let event_type: String = row.try_get("event_type")?;
    let schema_version: i64 = row.try_get("schema_version")?;
    let payload: Vec<u8> = row.try_get("payload")?;
    let event = events::decode_event(
        &event_type,
        u32::try_from(schema_version).unwrap_or(u32::MAX),
        &payload,
    )
    .map_err(StoreError::Internal)?;
    Ok(Recorded {
        event,
        actor: row.try_get("actor")?,
        recorded_at_ms: row.try_get("recorded_at")?,
        stream_version: u64::try_from(row.try_get::<i64, _>("stream_version")?).unwrap_or(0),
    })
}

/// Statistics of a [`rebuild`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    pub events: u64,
    pub keys: u64,
    pub last_sequence: i64,
}

/// Recreates the `keys` projection from the event log alone, in one transaction: the table is
/// emptied, every event is folded with the service's own `apply`, and each key's final state
/// is written with the same row encoding the live path uses. Run it with the server stopped.
pub async fn rebuild(path: &Path) -> Result<RebuildReport, StoreError> {
    let Opened {
        lock: _lock,
        pool,
        mut conn,
    } = open_database(path).await?;
    pool.close().await;
    let started = std::time::Instant::now();
    // A rebuild rewrites the whole table in one transaction. Through the WAL every page
    // would be written twice (log, then checkpoint); a rollback journal writes the new pages
    // once and journals only the old ones. Switching modes needs exclusive use of the
    // database, so this also refuses to run beside a live server.
    let mode: Result<String, _> = sqlx::query_scalar("PRAGMA journal_mode = TRUNCATE")
        .fetch_one(&mut conn)
        .await;
    if !mode.is_ok_and(|m| m.eq_ignore_ascii_case("truncate")) {
        return Err(StoreError::Internal(
            "the database is in use: stop the server before rebuilding".into(),
        ));
    }
    let mut tx = conn.begin().await?;
    // Sized for the worst case (one key per event). Capacity that is never written is
    // never touched, so the over-estimate costs address space, not memory.
    let max_sequence: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(sequence), 0) FROM events")
        .fetch_one(&mut *tx)
        .await?;
    let capacity = usize::try_from(max_sequence).unwrap_or(0);
    let mut index: std::collections::HashMap<KeyId, usize> =
        std::collections::HashMap::with_capacity(capacity);
    let mut states: Vec<Option<KeyState>> = Vec::with_capacity(capacity);
    let mut events = 0u64;
    let mut last_sequence = 0i64;
    {
        let mut rows = sqlx::query(
            "SELECT sequence, key_id, stream_version, event_type, schema_version, payload, \
             actor, recorded_at FROM events ORDER BY sequence",
        )
        .fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            let sequence: i64 = row.try_get("sequence")?;
            let key_id: &str = row.try_get("key_id")?;
            let key_id = KeyId::parse(key_id)
                .map_err(|e| StoreError::Internal(format!("sequence {sequence}: key_id {e}")))?;
            let recorded = recorded_from_row(&row)?;
            let slot = *index.entry(key_id).or_insert_with(|| {
                states.push(None);
                states.len() - 1
            });
            let state = domain::apply(states[slot].take(), &recorded)
                .map_err(|e| StoreError::Internal(format!("sequence {sequence}: {e}")))?;
            states[slot] = Some(state);
            events += 1;
            last_sequence = sequence;
        }
    }
    let folded = started.elapsed();
    sqlx::query("DELETE FROM keys").execute(&mut *tx).await?;
    // Building the secondary index once, by sorting, is cheaper than maintaining it for
    // every row inserted; the migration's definition is repeated here.
    sqlx::query("DROP INDEX keys_by_workspace")
        .execute(&mut *tx)
        .await?;
    let mut keys = Vec::with_capacity(index.len());
    drop(index);
    keys.extend(states.into_iter().flatten());
    // In key id order the primary key index fills sequentially. In place: no second copy.
    keys.sort_unstable_by_key(|s| s.key_id);
    let states = keys;
    writer::project_many(&mut tx, &states).await?;
    sqlx::query("CREATE INDEX keys_by_workspace ON keys (workspace_id, key_id)")
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE projection_checkpoint SET last_sequence = ? WHERE id = 1")
        .bind(last_sequence)
        .execute(&mut *tx)
        .await?;
    let written = started.elapsed();
    tx.commit().await?;
    sqlx::query("PRAGMA journal_mode = WAL")
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let report = RebuildReport {
        events,
        keys: states.len() as u64,
        last_sequence,
    };
    tracing::debug!(
        ?report,
        fold_ms = folded.as_millis() as u64,
        write_ms = (written - folded).as_millis() as u64,
        commit_and_close_ms = (started.elapsed() - written).as_millis() as u64,
        "rebuild phases"
    );
    Ok(report)
}

/// Creates (or opens) a database and applies the migrations: for tools that fill one
/// directly, such as the benchmark seeder. The lock must be held while writing.
pub async fn create_database(path: &Path) -> Result<(SqliteConnection, DatabaseLock), StoreError> {
    let Opened { lock, pool, conn } = open_database(path).await?;
    pool.close().await;
    Ok((conn, lock))
}

/// Opens an existing database read-only, without migrating it: for auditors' tools.
pub async fn open_read_only(path: &Path) -> Result<SqliteConnection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Internal(format!(
            "no database at {}",
            path.display()
        )));
    }
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    Ok(SqliteConnection::connect_with(&options).await?)
}

/// The stored projection: every `keys` row and the checkpoint.
pub async fn read_projection(
    conn: &mut SqliteConnection,
) -> Result<(Vec<KeyState>, u64), StoreError> {
    let rows: Vec<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {KEY_COLUMNS} FROM keys ORDER BY key_id"
    )))
    .fetch_all(&mut *conn)
    .await?;
    let states = rows
        .into_iter()
        .map(KeyRow::into_state)
        .collect::<Result<_, _>>()
        .map_err(StoreError::Internal)?;
    let checkpoint: i64 =
        sqlx::query_scalar("SELECT last_sequence FROM projection_checkpoint WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
    Ok((states, u64::try_from(checkpoint).unwrap_or(0)))
}

/// Opens a database for tools and tests that inspect it directly.
pub async fn connect(path: &Path) -> Result<SqliteConnection, StoreError> {
    Ok(SqliteConnection::connect_with(&connect_options(path)).await?)
}
