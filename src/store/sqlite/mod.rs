//! The SQLite backend: the log, the projection and the side tables in one database file,
//! WAL mode with `synchronous=FULL`, one writer connection and a small reader pool. The only
//! module that names a SQLite type.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};

mod bulk;
pub(super) use bulk::{FoldFailure, fold_one, fold_spilled};
pub mod rows;

use super::backend::{Answered, Backend, EachKeys, Effects, RebuildReport, Snapshot, WriteSession};
use super::{
    CREATE_REQUEST_WINDOW_MS, Cause, ExpiryCursor, Head, KeyUsage, ListFilter, RecordFilter,
    StoreError,
};
use crate::domain::{self, KeyId, KeyState, OriginClass, Recorded, WorkspaceId};
use crate::log::chain::{self, Chains, Hash, LogRecord};
use crate::log::events;
use crate::log::spill::FoldLimits;
use bulk::BulkSnapshot;
use rows::{KEY_COLUMNS, KeyRow};

/// A SQLite database opened for writing (holding its lock) or for reading only.
pub struct SqliteBackend {
    path: std::path::PathBuf,
    pool: SqlitePool,
    lock: Mutex<Option<DatabaseLock>>,
    /// The writer's `max_page_count`: a quota past which writes fail with SQLITE_FULL.
    max_pages: Option<u64>,
}

/// SQLite's default page size, which the quota is counted in.
const PAGE_BYTES: u64 = 4096;

impl SqliteBackend {
    /// Takes the database's lock, creates the database if needed and applies the migrations.
    pub async fn open(path: &Path) -> Result<SqliteBackend, StoreError> {
        SqliteBackend::open_with_quota(path, None).await
    }

    /// [`SqliteBackend::open`] with a size quota: once the database would grow past
    /// `max_bytes`, writes fail as storage full (RESOURCE_EXHAUSTED) and nothing is written,
    /// while reads and VerifyKey go on.
    pub async fn open_with_quota(
        path: &Path,
        max_bytes: Option<u64>,
    ) -> Result<SqliteBackend, StoreError> {
        let Opened { lock, pool, conn } = open_database(path).await?;
        conn.close().await?;
        Ok(SqliteBackend {
            path: path.to_owned(),
            pool,
            lock: Mutex::new(Some(lock)),
            max_pages: max_bytes.map(|b| (b / PAGE_BYTES).max(1)),
        })
    }

    /// Opens an existing database to read it, without its lock and without migrating it:
    /// for the audit tools, beside a running server.
    pub async fn open_read_only(path: &Path) -> Result<SqliteBackend, StoreError> {
        if !path.exists() {
            return Err(StoreError::Refused(format!(
                "no database at {}",
                path.display()
            )));
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(SqliteConnectOptions::new().filename(path).read_only(true))
            .await?;
        Ok(SqliteBackend {
            path: path.to_owned(),
            pool,
            lock: Mutex::new(None),
            max_pages: None,
        })
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn claim_master_key(&self, fingerprint: &str) -> Result<(), StoreError> {
        let mut conn = SqliteConnection::connect_with(&connect_options(&self.path)).await?;
        sqlx::query("INSERT OR IGNORE INTO meta (name, value) VALUES ('master_key_id', ?)")
            .bind(fingerprint)
            .execute(&mut conn)
            .await?;
        let stored: String =
            sqlx::query_scalar("SELECT value FROM meta WHERE name = 'master_key_id'")
                .fetch_one(&mut conn)
                .await?;
        conn.close().await?;
        if stored != fingerprint {
            return Err(StoreError::Refused(format!(
                "the master key (fingerprint {fingerprint}) is not the one this database was \
                 created with (fingerprint {stored}); start with the original master key"
            )));
        }
        Ok(())
    }

    async fn write_session(&self) -> Result<Box<dyn WriteSession>, StoreError> {
        let mut options = writer_options(&self.path);
        if let Some(pages) = self.max_pages {
            options = options.pragma("max_page_count", pages.to_string());
        }
        let conn = SqliteConnection::connect_with(&options).await?;
        Ok(Box::new(SqliteSession { conn }))
    }

    async fn read_records(
        &self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError> {
        read_records(&self.pool, after, limit, filter).await
    }

    async fn head(&self, workspace_id: Option<&str>) -> Result<(Head, Option<Head>), StoreError> {
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

    async fn get_key(
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
            .map_err(StoreError::Corrupt)
    }

    async fn list_keys(
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
        if filter.expires_before_ms.is_some() {
            sql.push_str(" AND expires_at IS NOT NULL AND expires_at < ?");
        }
        if filter.never_used {
            sql.push_str(
                " AND NOT EXISTS (SELECT 1 FROM key_usage u WHERE u.key_id = keys.key_id)",
            );
        }
        if filter.unused_since_ms.is_some() {
            sql.push_str(
                " AND NOT EXISTS (SELECT 1 FROM key_usage u \
                 WHERE u.key_id = keys.key_id AND u.last_used_at >= ?)",
            );
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
        if let Some(before) = filter.expires_before_ms {
            query = query.bind(before);
        }
        if let Some(since) = filter.unused_since_ms {
            query = query.bind(since);
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(KeyRow::into_state)
            .collect::<Result<_, _>>()
            .map_err(StoreError::Corrupt)
    }

    async fn sealed_secret(&self, key_id: KeyId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT sealed FROM sealed_secrets WHERE key_id = ?")
                .bind(key_id.to_string())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        // A connection of its own, not the writer's: a use is not a change to any key. It
        // waits for the writer's transaction (busy_timeout) and holds the lock briefly.
        let mut conn = SqliteConnection::connect_with(&connect_options(&self.path)).await?;
        let result = async {
            sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await?;
            for chunk in chunks(usage) {
                let values = vec!["(?, ?, ?)"; chunk.len()].join(", ");
                let sql = format!(
                    "INSERT INTO key_usage (key_id, last_used_at, last_used_origin) \
                     VALUES {values} ON CONFLICT (key_id) DO UPDATE SET \
                     last_used_at = excluded.last_used_at, \
                     last_used_origin = excluded.last_used_origin \
                     WHERE excluded.last_used_at > key_usage.last_used_at"
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for u in chunk {
                    query = query
                        .bind(u.key_id.to_string())
                        .bind(u.last_used_at_ms)
                        .bind(u.origin.as_str());
                }
                query.execute(&mut conn).await?;
            }
            sqlx::query("COMMIT").execute(&mut conn).await?;
            Ok::<(), sqlx::Error>(())
        }
        .await;
        let _ = conn.close().await;
        Ok(result?)
    }

    async fn key_usage(&self, key_ids: &[KeyId]) -> Result<Vec<KeyUsage>, StoreError> {
        let mut found = Vec::new();
        for chunk in key_ids.chunks(256) {
            let sql = format!(
                "SELECT key_id, last_used_at, last_used_origin FROM key_usage \
                 WHERE key_id IN ({})",
                vec!["?"; chunk.len()].join(", ")
            );
            let mut query = sqlx::query_as::<_, (String, i64, String)>(sqlx::AssertSqlSafe(sql));
            for key_id in chunk {
                query = query.bind(key_id.to_string());
            }
            for row in query.fetch_all(&self.pool).await? {
                found.push(usage_from_row(row)?);
            }
        }
        Ok(found)
    }

    async fn expiring(
        &self,
        workspace_id: Option<&WorkspaceId>,
        after: ExpiryCursor,
        up_to_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyState>, StoreError> {
        let mut sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE expires_at IS NOT NULL \
             AND revoked_at IS NULL AND rolled_to_key_id IS NULL \
             AND (expires_at > ? OR (expires_at = ? AND key_id > ?)) AND expires_at <= ?"
        );
        if workspace_id.is_some() {
            sql.push_str(" AND workspace_id = ?");
        }
        sql.push_str(" ORDER BY expires_at, key_id LIMIT ?");
        let mut query = sqlx::query_as::<_, KeyRow>(sqlx::AssertSqlSafe(sql))
            .bind(after.0)
            .bind(after.0)
            .bind(after.1.map(|k| k.to_string()).unwrap_or_default())
            .bind(up_to_ms);
        if let Some(w) = workspace_id {
            query = query.bind(w.as_str());
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(KeyRow::into_state)
            .collect::<Result<_, _>>()
            .map_err(StoreError::Corrupt)
    }

    async fn for_each_key(
        &self,
        each: &mut (dyn FnMut(KeyState) + Send),
    ) -> Result<u64, StoreError> {
        let mut rows = sqlx::query_as::<_, KeyRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys"
        )))
        .fetch(&self.pool);
        let mut count = 0;
        while let Some(row) = rows.try_next().await? {
            each(row.into_state().map_err(StoreError::Corrupt)?);
            count += 1;
        }
        Ok(count)
    }

    async fn for_each_key_concurrently(
        &self,
        each: std::sync::Arc<EachKeys>,
    ) -> Result<u64, StoreError> {
        bulk::for_each_key_concurrently(&self.path, each).await
    }

    async fn count_keys(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn snapshot(&self) -> Result<Box<dyn Snapshot>, StoreError> {
        // One read transaction for the whole view: the log and the projection are read from
        // the same snapshot even while a server keeps writing.
        Ok(Box::new(BulkSnapshot::open(&self.path).await?))
    }

    async fn rebuild(&self, limits: &FoldLimits) -> Result<RebuildReport, StoreError> {
        // Exclusive use: the rebuild leaves WAL mode for its one big transaction.
        self.pool.close().await;
        let (path, limits) = (self.path.clone(), limits.clone());
        tokio::task::spawn_blocking(move || bulk::rebuild(&path, &limits))
            .await
            .map_err(|e| StoreError::Invariant(format!("the rebuild failed: {e}")))?
    }

    async fn close_readers(&self) {
        self.pool.close().await;
    }

    async fn release(&self) {
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// The writer's own connection. Transactions are plain BEGIN/COMMIT statements: a session
/// whose transaction failed is closed, so nothing depends on the driver's idea of them.
struct SqliteSession {
    conn: SqliteConnection,
}

#[async_trait]
impl WriteSession for SqliteSession {
    async fn begin(&mut self) -> Result<(), StoreError> {
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn load_stream(&mut self, key_id: KeyId) -> Result<Option<KeyState>, StoreError> {
        load_stream(&mut self.conn, key_id).await
    }

    async fn answered_create(
        &mut self,
        workspace_id: &str,
        request_id: &str,
        since_ms: i64,
    ) -> Result<Option<Answered>, StoreError> {
        answered_create(&mut self.conn, workspace_id, request_id, since_ms).await
    }

    async fn write(&mut self, effects: &Effects) -> Result<bool, StoreError> {
        Ok(write_effects(&mut self.conn, effects).await?)
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        sqlx::query("COMMIT").execute(&mut self.conn).await?;
        Ok(())
    }

    async fn read_records(
        &mut self,
        after: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<LogRecord>, StoreError> {
        read_records(&mut self.conn, after, limit, filter).await
    }

    async fn chains(&mut self) -> Result<Chains, StoreError> {
        load_chains(&mut self.conn).await
    }

    async fn scrub(&mut self, wait: Duration) -> Result<bool, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA busy_timeout = {}",
            wait.as_millis()
        )))
        .execute(&mut self.conn)
        .await?;
        let row: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut self.conn)
                .await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA busy_timeout = {}",
            BUSY_TIMEOUT.as_millis()
        )))
        .execute(&mut self.conn)
        .await?;
        // The first column is 1 when readers of an older snapshot kept it from finishing.
        Ok(row?.0 == 0)
    }

    async fn close(self: Box<Self>) {
        // Closing rolls back whatever SQLite still holds open.
        let _ = self.conn.close().await;
    }
}

/// A `key_usage` row, validated.
pub(super) fn usage_from_row(
    (key_id, last_used_at, origin): (String, i64, String),
) -> Result<KeyUsage, StoreError> {
    Ok(KeyUsage {
        key_id: KeyId::parse(&key_id)
            .map_err(|e| StoreError::Corrupt(format!("key_usage key_id: {e}")))?,
        last_used_at_ms: last_used_at,
        origin: OriginClass::parse(&origin).ok_or_else(|| {
            StoreError::Corrupt(format!("key_usage of {key_id}: origin {origin:?}"))
        })?,
    })
}

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "kemon-keys.db";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The lock file beside a database: held by the one process that writes it.
pub fn lock_path(database: &Path) -> std::path::PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    name.into()
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

/// Tells SQLite's storage faults from refused statements.
pub(super) fn classify(e: sqlx::Error) -> StoreError {
    let primary = match &e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i64>().ok())
            .map(|c| c & 0xff),
        _ => None,
    };
    match (&e, primary) {
        (_, Some(SQLITE_FULL)) => StoreError::Full(Cause::new(e)),
        (
            _,
            Some(
                SQLITE_PERM | SQLITE_BUSY | SQLITE_LOCKED | SQLITE_NOMEM | SQLITE_READONLY
                | SQLITE_IOERR | SQLITE_CORRUPT | SQLITE_CANTOPEN | SQLITE_PROTOCOL | SQLITE_NOTADB,
            ),
        )
        | (
            sqlx::Error::Io(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed,
            _,
        ) => StoreError::Unavailable(Cause::new(e)),
        _ => StoreError::Database(Cause::new(e)),
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
            .map_err(|e| {
                StoreError::Unavailable(Cause::msg(format!("opening {}: {e}", path.display())))
            })?;
        match file.try_lock() {
            Ok(()) => Ok(DatabaseLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Refused(format!(
                "{} is in use by another kemon-keys process (it holds the lock {}); stop the \
                 server using it first, or give this one another data directory",
                database.display(),
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(Cause::msg(
                format!("locking {}: {e}", path.display()),
            ))),
        }
    }
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
        e => StoreError::Database(Cause::msg(format!("migrations failed: {e}"))),
    })?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(connect_options(path).read_only(true))
        .await?;
    Ok(Opened { lock, pool, conn })
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
                .map_err(|_| StoreError::Corrupt(format!("hash of {sequence} is not 32 bytes")))?,
        },
    })
}

/// The chain heads the writer continues from: the last record's, and each workspace's last.
async fn load_chains(conn: &mut SqliteConnection) -> Result<Chains, StoreError> {
    let last = log_head(conn).await?;
    // Workspace by workspace along events_by_workspace (two index seeks each) rather than a
    // GROUP BY over every entry: start-up reads a few pages per workspace, not the index.
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "WITH RECURSIVE workspaces(id) AS ( \
             SELECT MIN(workspace_id) FROM events \
             UNION ALL \
             SELECT (SELECT MIN(workspace_id) FROM events WHERE workspace_id > id) \
             FROM workspaces WHERE id IS NOT NULL) \
         SELECT id, (SELECT workspace_hash FROM events WHERE workspace_id = id \
                     ORDER BY sequence DESC LIMIT 1) \
         FROM workspaces WHERE id IS NOT NULL",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut workspaces = std::collections::HashMap::with_capacity(rows.len());
    for (workspace, hash) in rows {
        let hash: Hash = hash.try_into().map_err(|_| {
            StoreError::Corrupt(format!("workspace hash of {workspace} is not 32 bytes"))
        })?;
        workspaces.insert(workspace, hash);
    }
    Ok(Chains::new(last.sequence, last.hash, workspaces))
}

const RECORD_COLUMNS: &str = "sequence, key_id, workspace_id, stream_version, event_type, \
    schema_version, payload, actor, recorded_at, hash, workspace_hash, caller_identity";

/// A value bound to a statement built at run time.
enum Param {
    Int(i64),
    Text(String),
}

/// The statement reading up to `limit` records after `after` that match `filter`, in log
/// order, and its values: one text for the sqlx and the rusqlite readers.
fn records_query(after: u64, limit: u32, filter: &RecordFilter) -> (String, Vec<Param>) {
    let mut sql = format!("SELECT {RECORD_COLUMNS} FROM events WHERE sequence > ?");
    let mut params = vec![Param::Int(i64::try_from(after).unwrap_or(i64::MAX))];
    if let Some(w) = &filter.workspace_id {
        sql.push_str(" AND workspace_id = ?");
        params.push(Param::Text(w.clone()));
    }
    if let Some(k) = &filter.key_id {
        sql.push_str(" AND key_id = ?");
        params.push(Param::Text(k.clone()));
    }
    if let Some(last) = filter.up_to {
        sql.push_str(" AND sequence <= ?");
        params.push(Param::Int(i64::try_from(last).unwrap_or(i64::MAX)));
    }
    if !filter.event_types.is_empty() {
        sql.push_str(" AND event_type IN (");
        sql.push_str(&vec!["?"; filter.event_types.len()].join(", "));
        sql.push(')');
        params.extend(filter.event_types.iter().cloned().map(Param::Text));
    }
    sql.push_str(" ORDER BY sequence LIMIT ?");
    params.push(Param::Int(i64::from(limit)));
    (sql, params)
}

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
    let (sql, params) = records_query(after, limit, filter);
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for param in params {
        query = match param {
            Param::Int(v) => query.bind(v),
            Param::Text(v) => query.bind(v),
        };
    }
    let rows = query.fetch_all(executor).await?;
    rows.iter().map(record_from_row).collect()
}

fn record_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<LogRecord, StoreError> {
    let hash = |name: &str| -> Result<Hash, StoreError> {
        let bytes: Vec<u8> = row.try_get(name)?;
        bytes
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("{name} is not 32 bytes")))
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
        caller_identity: row.try_get("caller_identity")?,
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
        state = Some(domain::apply(state, &recorded).map_err(StoreError::Corrupt)?);
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
    .map_err(StoreError::Corrupt)?;
    Ok(Recorded {
        event,
        actor: row.try_get("actor")?,
        recorded_at_ms: row.try_get("recorded_at")?,
        stream_version: u64::try_from(row.try_get::<i64, _>("stream_version")?).unwrap_or(0),
    })
}

/// Recreates the `keys` projection from the event log alone, in one transaction: the table is
/// emptied, every event is folded with the service's own `apply`, and each key's final state
/// is written with the same row encoding the live path uses. Run it with the server stopped.
pub async fn rebuild(path: &Path, limits: &FoldLimits) -> Result<RebuildReport, StoreError> {
    SqliteBackend::open(path).await?.rebuild(limits).await
}

/// A read-only connection to an existing database, without migrating it: for the benchmark's
/// raw scans and for tests that inspect the files.
pub async fn open_read_only(path: &Path) -> Result<SqliteConnection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Corrupt(format!(
            "no database at {}",
            path.display()
        )));
    }
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    Ok(SqliteConnection::connect_with(&options).await?)
}

/// Opens a database for tools and tests that inspect it directly.
pub async fn connect(path: &Path) -> Result<SqliteConnection, StoreError> {
    Ok(SqliteConnection::connect_with(&connect_options(path)).await?)
}

/// The create request `request_id` of `workspace_id` made within the window, if any.
async fn answered_create(
    tx: &mut SqliteConnection,
    workspace_id: &str,
    request_id: &str,
    since_ms: i64,
) -> Result<Option<Answered>, StoreError> {
    let row: Option<(Vec<u8>, String, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT request_digest, key_id, sealed_secret FROM create_requests \
         WHERE workspace_id = ? AND request_id = ? AND created_at >= ?",
    )
    .bind(workspace_id)
    .bind(request_id)
    .bind(since_ms)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(|(digest, key_id, sealed_secret)| Answered {
        digest,
        key_id,
        sealed_secret,
    }))
}

/// Writes `effects`; true when an encrypted copy was destroyed (most revoked keys never had
/// one, and need no scrub).
async fn write_effects(tx: &mut SqliteConnection, effects: &Effects) -> Result<bool, sqlx::Error> {
    let mut destroyed = false;
    insert_records(tx, &effects.records).await?;
    project_many(tx, &effects.changed).await?;
    for (key_id, sealed) in &effects.sealed_inserts {
        sqlx::query("INSERT INTO sealed_secrets (key_id, sealed, master_key_id) VALUES (?, ?, ?)")
            .bind(key_id)
            .bind(&sealed.sealed)
            .bind(&sealed.master_key_id)
            .execute(&mut *tx)
            .await?;
    }
    for key_id in &effects.sealed_deletes {
        let deleted = sqlx::query("DELETE FROM sealed_secrets WHERE key_id = ?")
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        let cleared = sqlx::query(
            "UPDATE create_requests SET sealed_secret = NULL \
             WHERE key_id = ? AND sealed_secret IS NOT NULL",
        )
        .bind(key_id)
        .execute(&mut *tx)
        .await?;
        destroyed |= deleted.rows_affected() + cleared.rows_affected() > 0;
    }
    if !effects.create_requests.is_empty() {
        let now = effects.records.last().map_or(0, |r| r.recorded_at_ms);
        // Forget request ids past the window (and their sealed secrets) as new ones come.
        sqlx::query("DELETE FROM create_requests WHERE created_at < ?")
            .bind(now - CREATE_REQUEST_WINDOW_MS)
            .execute(&mut *tx)
            .await?;
        for (workspace_id, key_id, create) in &effects.create_requests {
            sqlx::query(
                "INSERT INTO create_requests (workspace_id, request_id, request_digest, key_id, \
                 sealed_secret, created_at) VALUES (?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (workspace_id, request_id) DO UPDATE SET \
                 request_digest = excluded.request_digest, key_id = excluded.key_id, \
                 sealed_secret = excluded.sealed_secret, created_at = excluded.created_at",
            )
            .bind(workspace_id)
            .bind(&create.request_id)
            .bind(&create.digest[..])
            .bind(key_id)
            .bind(&create.sealed_secret)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
    }
    if let Some(last) = effects.records.last() {
        sqlx::query("UPDATE projection_checkpoint SET last_sequence = ? WHERE id = 1")
            .bind(i64::try_from(last.sequence).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
    }
    Ok(destroyed)
}

/// Splits `rows` into chunks of 256, 64, 16, 4 and 1 rows. Multi-row statements save a round
/// trip to SQLite's thread per row (256 rows of the projection bind 5120 values, well under
/// SQLite's limit); keeping to five shapes keeps every statement in sqlx's prepared-statement
/// cache instead of preparing a new text for every batch size.
fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        let size = [256, 64, 16, 4, 1].into_iter().find(|&s| rows.len() >= s)?;
        let (chunk, rest) = rows.split_at(size);
        rows = rest;
        Some(chunk)
    })
}

async fn insert_records(
    conn: &mut SqliteConnection,
    records: &[LogRecord],
) -> Result<(), sqlx::Error> {
    for chunk in chunks(records) {
        let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO events (sequence, key_id, workspace_id, stream_version, event_type, \
             schema_version, payload, actor, recorded_at, hash, workspace_hash, \
             caller_identity) VALUES {values}"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            query = query
                .bind(i64::try_from(r.sequence).unwrap_or(i64::MAX))
                .bind(&r.key_id)
                .bind(&r.workspace_id)
                .bind(i64::try_from(r.stream_version).unwrap_or(i64::MAX))
                .bind(&r.event_type)
                .bind(i64::from(r.schema_version))
                .bind(&r.payload)
                .bind(&r.actor)
                .bind(r.recorded_at_ms)
                .bind(&r.hash[..])
                .bind(&r.workspace_hash[..])
                .bind(&r.caller_identity);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Writes keys' states into the projection, a few hundred rows per statement, with the one
/// row encoding ([`rows::values`]) that the rebuild ([`bulk`]) writes too.
async fn project_many(conn: &mut SqliteConnection, states: &[KeyState]) -> Result<(), sqlx::Error> {
    let columns = KEY_COLUMNS.split(',').count();
    let row = format!("({})", vec!["?"; columns].join(", "));
    let updates = KEY_COLUMNS
        .split(',')
        .map(str::trim)
        .filter(|c| !matches!(*c, "key_id" | "workspace_id"))
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    for chunk in chunks(states) {
        let values = vec![row.as_str(); chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO keys ({KEY_COLUMNS}) VALUES {values} \
             ON CONFLICT (workspace_id, key_id) DO UPDATE SET {updates}"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for state in chunk {
            query = rows::bind_state(query, state);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_use_five_shapes_and_cover_every_row() {
        let rows: Vec<usize> = (0..407).collect();
        let sizes: Vec<usize> = chunks(&rows).map(<[usize]>::len).collect();
        assert_eq!(sizes, [256, 64, 64, 16, 4, 1, 1, 1]);
        let flat: Vec<usize> = chunks(&rows).flatten().copied().collect();
        assert_eq!(flat, rows);
        assert_eq!(chunks::<u8>(&[]).count(), 0);
    }
}
