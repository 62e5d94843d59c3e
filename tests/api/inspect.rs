//! Looking at (and tampering with) a server's database behind its back: every direct read or
//! write of the storage the tests make goes through here, on either backend: the SQLite file
//! in the server's data directory, or the PostgreSQL schema of its database URL (a suite run
//! with `KEMON_TEST_BACKEND=postgres`). Both store the same values the same way (BLOB/BYTEA,
//! INTEGER/BIGINT, TEXT; `full_access` and `reveal_later` are 0/1 or BOOLEAN), so each
//! statement is written once, with `?` placeholders, and runs on both.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kemon_keys::log::chain::LogRecord;
use kemon_keys::log::spill::FoldLimits;
use kemon_keys::store::{self, Backend, PgBackend, RebuildReport, RecordFilter, StoreError};
use sqlx::{Connection, PgConnection, Row, SqliteConnection};

/// Which events a tampering statement is about.
#[derive(Clone, Copy, Debug)]
pub enum Events<'a> {
    All,
    Sequence(u64),
    Key(&'a str),
}

/// Every row of the projection (every column, quoted) in key id order, and its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    pub rows: Vec<Vec<String>>,
    pub checkpoint: i64,
}

/// One event as the log stores it, in a few columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub sequence: i64,
    pub workspace_id: String,
    pub stream_version: i64,
    pub event_type: String,
    pub actor: String,
    pub recorded_at: i64,
}

/// A database: a SQLite file or a PostgreSQL schema. Each call opens a connection of its own
/// and closes it before returning, so nothing is held open between calls (a rebuild, a copy
/// or a stop may follow any of them).
#[derive(Debug, Clone)]
pub struct Db {
    location: Location,
    read_only: bool,
    /// Keeps the directory of a copy alive as long as the copy is in use.
    _dir: Option<Arc<tempfile::TempDir>>,
}

#[derive(Debug, Clone)]
enum Location {
    /// A SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database URL; its `search_path` names the schema.
    Postgres(String),
}

/// What a refused statement said.
pub type Refusal = String;

/// An open connection of either backend.
enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// Runs `$body` with `$c` bound to a new connection to `$db`, then closes it. The body is
/// written once and compiled for each backend: `$c` is a `&mut SqliteConnection` in one arm
/// and a `&mut PgConnection` in the other.
macro_rules! on_connection {
    ($db:expr, |$c:ident| $body:expr) => {
        match $db.connect().await {
            Conn::Sqlite(mut conn) => {
                let out = {
                    let $c = &mut conn;
                    $body
                };
                conn.close().await.expect("close the database");
                out
            }
            Conn::Postgres(mut conn) => {
                let out = {
                    let $c = &mut conn;
                    $body
                };
                conn.close().await.expect("close the database");
                out
            }
        }
    };
}

/// `$query` with every [`Bind`] of `$binds` bound, in order.
macro_rules! bind_all {
    ($query:expr, $binds:expr) => {{
        let mut query = $query;
        for bind in $binds {
            query = match bind {
                Bind::Int(v) => query.bind(v),
                Bind::Text(v) => query.bind(v),
                Bind::Bytes(v) => query.bind(v),
            };
        }
        query
    }};
}

impl Db {
    /// The SQLite database file at `path`.
    pub fn at(path: &Path) -> Db {
        Db {
            location: Location::Sqlite(path.to_owned()),
            read_only: false,
            _dir: None,
        }
    }

    /// The PostgreSQL schema at `url` (its `search_path`).
    pub fn postgres(url: &str) -> Db {
        Db {
            location: Location::Postgres(url.to_owned()),
            read_only: false,
            _dir: None,
        }
    }

    /// The database of a server on `data_dir`: the schema of `database_url` if it has one,
    /// else the SQLite file in the directory.
    pub fn of_server(data_dir: &Path, database_url: Option<&str>) -> Db {
        match database_url {
            Some(url) => Db::postgres(url),
            None => Db::at(&data_dir.join(store::DATABASE_FILE)),
        }
    }

    /// This database opened read-only: for a stopped server's files, which reading must not
    /// change.
    pub fn read_only(&self) -> Db {
        Db {
            read_only: true,
            ..self.clone()
        }
    }

    /// Whether this is a SQLite file (rather than a PostgreSQL schema).
    pub fn is_sqlite(&self) -> bool {
        matches!(self.location, Location::Sqlite(_))
    }

    /// The SQLite file, if this is one.
    pub fn sqlite_file(&self) -> Option<&Path> {
        match &self.location {
            Location::Sqlite(path) => Some(path),
            Location::Postgres(_) => None,
        }
    }

    /// The arguments that name this database to `kemon-keys audit …`: `--db FILE` or
    /// `--database-url URL`.
    pub fn source_args(&self) -> Vec<String> {
        match &self.location {
            Location::Sqlite(path) => {
                vec!["--db".into(), path.to_string_lossy().into_owned()]
            }
            Location::Postgres(url) => vec!["--database-url".into(), url.clone()],
        }
    }

    /// A copy of this database, as a stopped server left it, to tamper with: the file (with
    /// its WAL and shared memory files, should there be any) in a directory of its own, or
    /// every row in a new schema made by the same migrations (append-only triggers included).
    pub async fn copy(&self) -> Db {
        match &self.location {
            Location::Sqlite(path) => {
                let dir = tempfile::tempdir().expect("temp dir");
                let copy = dir.path().join("copy.db");
                std::fs::copy(path, &copy).expect("copy the database");
                for suffix in ["-wal", "-shm"] {
                    let source = with_suffix(path, suffix);
                    if source.exists() {
                        std::fs::copy(&source, with_suffix(&copy, suffix)).expect("copy");
                    }
                }
                Db {
                    _dir: Some(Arc::new(dir)),
                    ..Db::at(&copy)
                }
            }
            Location::Postgres(_) => {
                let from = self.schema().await;
                let url = crate::helpers::fresh_postgres_schema().await;
                let migrated = PgBackend::open(&url).await.expect("migrate the copy");
                migrated.release().await;
                let copy = Db::postgres(&url);
                let tables: Vec<String> = on_connection!(self, |c| {
                    sqlx::query_scalar(
                        "SELECT table_name::text FROM information_schema.tables \
                         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' \
                         AND table_name NOT IN ('_sqlx_migrations', 'events') \
                         ORDER BY table_name",
                    )
                    .fetch_all(&mut *c)
                    .await
                    .expect("list the tables")
                });
                // The log first, in order (its trigger wants each row one past the last).
                copy.change(
                    format!("INSERT INTO events SELECT * FROM \"{from}\".events ORDER BY sequence"),
                    vec![],
                )
                .await
                .expect("copy the events");
                for table in tables {
                    for statement in [
                        format!("DELETE FROM \"{table}\""),
                        format!("INSERT INTO \"{table}\" SELECT * FROM \"{from}\".\"{table}\""),
                    ] {
                        copy.change(statement, vec![]).await.expect("copy a table");
                    }
                }
                copy
            }
        }
    }

    /// The PostgreSQL schema this database is.
    async fn schema(&self) -> String {
        on_connection!(self, |c| {
            sqlx::query_scalar("SELECT current_schema()::text")
                .fetch_one(&mut *c)
                .await
                .expect("the current schema")
        })
    }

    async fn connect(&self) -> Conn {
        match &self.location {
            Location::Sqlite(path) => Conn::Sqlite(
                if self.read_only {
                    store::sqlite::open_read_only(path).await
                } else {
                    store::sqlite::connect(path).await
                }
                .expect("open the database"),
            ),
            Location::Postgres(url) => {
                let mut conn = PgConnection::connect(url)
                    .await
                    .expect("connect to the PostgreSQL schema");
                if self.read_only {
                    sqlx::query("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                        .execute(&mut conn)
                        .await
                        .expect("read only");
                }
                Conn::Postgres(conn)
            }
        }
    }

    /// `sql` (written with `?` placeholders) as this backend takes it: PostgreSQL numbers
    /// them (`$1`, `$2`, …). No statement here has a `?` in a literal.
    fn dialect(&self, sql: &str) -> String {
        match self.location {
            Location::Sqlite(_) => sql.to_owned(),
            Location::Postgres(_) => {
                let mut out = String::with_capacity(sql.len() + 8);
                let mut n = 0;
                for ch in sql.chars() {
                    if ch == '?' {
                        n += 1;
                        out.push_str(&format!("${n}"));
                    } else {
                        out.push(ch);
                    }
                }
                out
            }
        }
    }

    async fn scalar_i64(&self, sql: &str, binds: Vec<Bind>) -> i64 {
        let sql = self.dialect(sql);
        on_connection!(self, |c| {
            let query = bind_all!(sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone())), binds);
            query.fetch_one(&mut *c).await.expect(&sql)
        })
    }

    /// Runs a changing statement; the rows it changed, or what refused it.
    async fn change(&self, sql: String, binds: Vec<Bind>) -> Result<u64, Refusal> {
        let sql = self.dialect(&sql);
        on_connection!(self, |c| {
            bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql)), binds)
                .execute(&mut *c)
                .await
                .map(|done| done.rows_affected())
                .map_err(|e| e.to_string())
        })
    }

    // ------------------------------------------------------------------------------------------
    // The event log

    /// How many events the log holds, of one key or of all.
    pub async fn event_count(&self, key_id: Option<&str>) -> i64 {
        match key_id {
            Some(id) => {
                self.scalar_i64(
                    "SELECT count(*) FROM events WHERE key_id = ?",
                    vec![Bind::Text(id.into())],
                )
                .await
            }
            None => self.scalar_i64("SELECT count(*) FROM events", vec![]).await,
        }
    }

    /// The last sequence of the log.
    pub async fn max_sequence(&self) -> i64 {
        self.scalar_i64("SELECT max(sequence) FROM events", vec![])
            .await
    }

    /// Every event (or one key's), in log order.
    pub async fn events(&self, key_id: Option<&str>) -> Vec<StoredEvent> {
        let mut sql = String::from(
            "SELECT sequence, workspace_id, stream_version, event_type, actor, recorded_at \
             FROM events",
        );
        let mut binds = vec![];
        if let Some(id) = key_id {
            sql.push_str(" WHERE key_id = ?");
            binds.push(Bind::Text(id.into()));
        }
        sql.push_str(" ORDER BY sequence");
        let sql = self.dialect(&sql);
        on_connection!(self, |c| {
            bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql)), binds)
                .fetch_all(&mut *c)
                .await
                .expect("read events")
                .iter()
                .map(|r| StoredEvent {
                    sequence: r.get("sequence"),
                    workspace_id: r.get("workspace_id"),
                    stream_version: r.get("stream_version"),
                    event_type: r.get("event_type"),
                    actor: r.get("actor"),
                    recorded_at: r.get("recorded_at"),
                })
                .collect()
        })
    }

    /// The stream versions recorded for a key, in log order.
    pub async fn stream_versions(&self, key_id: &str) -> Vec<i64> {
        self.events(Some(key_id))
            .await
            .into_iter()
            .map(|e| e.stream_version)
            .collect()
    }

    /// Every event, whole, in log order, as the audit code reads them.
    pub async fn records(&self) -> Vec<LogRecord> {
        match &self.location {
            Location::Sqlite(_) => {
                let Conn::Sqlite(mut conn) = self.connect().await else {
                    unreachable!("a SQLite file opens a SQLite connection")
                };
                let records =
                    store::sqlite::read_records(&mut conn, 0, 10_000, &RecordFilter::default())
                        .await
                        .expect("read the events");
                conn.close().await.expect("close the database");
                records
            }
            Location::Postgres(url) => {
                let backend = PgBackend::open_read_only(url)
                    .await
                    .expect("open the schema");
                let records = backend
                    .read_records(0, 10_000, &RecordFilter::default())
                    .await
                    .expect("read the events");
                backend.release().await;
                records
            }
        }
    }

    /// Sets the actor of events: refused by an intact log.
    pub async fn set_actor(&self, which: Events<'_>, actor: &str) -> Result<u64, Refusal> {
        let (filter, mut binds) = which.filter();
        binds.insert(0, Bind::Text(actor.into()));
        self.change(format!("UPDATE events SET actor = ?{filter}"), binds)
            .await
    }

    /// Deletes events: refused by an intact log.
    pub async fn delete_events(&self, which: Events<'_>) -> Result<u64, Refusal> {
        let (filter, binds) = which.filter();
        self.change(format!("DELETE FROM events{filter}"), binds)
            .await
    }

    /// Replaces the stored payload of an event.
    pub async fn set_payload(&self, sequence: u64, payload: &[u8]) -> Result<u64, Refusal> {
        self.change(
            "UPDATE events SET payload = ? WHERE sequence = ?".into(),
            vec![Bind::Bytes(payload.to_vec()), Bind::seq(sequence)],
        )
        .await
    }

    /// Replaces both stored hashes of an event.
    pub async fn set_hashes(
        &self,
        sequence: u64,
        hash: &[u8],
        workspace_hash: &[u8],
    ) -> Result<u64, Refusal> {
        self.change(
            "UPDATE events SET hash = ?, workspace_hash = ? WHERE sequence = ?".into(),
            vec![
                Bind::Bytes(hash.to_vec()),
                Bind::Bytes(workspace_hash.to_vec()),
                Bind::seq(sequence),
            ],
        )
        .await
    }

    /// Appends a row to the log as it is, hashes and all.
    pub async fn insert_event(&self, record: &LogRecord) -> Result<u64, Refusal> {
        self.change(
            "INSERT INTO events (sequence, key_id, workspace_id, stream_version, event_type, \
             schema_version, payload, actor, recorded_at, hash, workspace_hash) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                .into(),
            vec![
                Bind::seq(record.sequence),
                Bind::Text(record.key_id.clone()),
                Bind::Text(record.workspace_id.clone()),
                Bind::seq(record.stream_version),
                Bind::Text(record.event_type.clone()),
                Bind::Int(record.schema_version.into()),
                Bind::Bytes(record.payload.clone()),
                Bind::Text(record.actor.clone()),
                Bind::Int(record.recorded_at_ms),
                Bind::Bytes(record.hash.to_vec()),
                Bind::Bytes(record.workspace_hash.to_vec()),
            ],
        )
        .await
    }

    /// Takes away what keeps the log append-only, as someone with the file (or the schema's
    /// owner) could: on PostgreSQL also the check that each appended row is one past the
    /// last, so that rows can be forged anywhere.
    pub async fn drop_append_only_guards(&self) {
        let statements: &[&str] = match self.location {
            Location::Sqlite(_) => &[
                "DROP TRIGGER events_no_update",
                "DROP TRIGGER events_no_delete",
            ],
            Location::Postgres(_) => &[
                "DROP TRIGGER events_no_update ON events",
                "DROP TRIGGER events_no_truncate ON events",
                "DROP TRIGGER events_in_order ON events",
            ],
        };
        for statement in statements {
            self.change((*statement).into(), vec![])
                .await
                .expect(statement);
        }
    }

    // ------------------------------------------------------------------------------------------
    // Encrypted copies, stored hashes, and everything stored

    /// How many encrypted copies of a key's secret are stored.
    pub async fn sealed_count(&self, key_id: &str) -> i64 {
        self.scalar_i64(
            "SELECT count(*) FROM sealed_secrets WHERE key_id = ?",
            vec![Bind::Text(key_id.into())],
        )
        .await
    }

    /// The stored last use of a key (`key_usage.last_used_at`), 0 when none is stored.
    pub async fn last_used_at(&self, key_id: &str) -> i64 {
        self.scalar_i64(
            "SELECT coalesce(max(last_used_at), 0) FROM key_usage WHERE key_id = ?",
            vec![Bind::Text(key_id.into())],
        )
        .await
    }

    /// The stored encrypted copy of a key's secret.
    pub async fn sealed_copy(&self, key_id: &str) -> Vec<u8> {
        self.bytes("SELECT sealed FROM sealed_secrets WHERE key_id = ?", key_id)
            .await
    }

    /// The stored hash of a key's secret.
    pub async fn secret_hash(&self, key_id: &str) -> Vec<u8> {
        self.bytes("SELECT secret_hash FROM keys WHERE key_id = ?", key_id)
            .await
    }

    async fn bytes(&self, sql: &str, key_id: &str) -> Vec<u8> {
        let sql = self.dialect(sql);
        on_connection!(self, |c| {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                .bind(key_id.to_owned())
                .fetch_one(&mut *c)
                .await
                .expect(&sql)
        })
    }

    /// Everything the database holds, raw, as (where, bytes), for scans for what must not be
    /// stored. For SQLite, every file of the database's directory (the data directory: the
    /// database, its WAL, its lock file, …) whole; for PostgreSQL, every value of every text
    /// and bytea column of every table of the schema.
    pub async fn stored_bytes(&self) -> Vec<(String, Vec<u8>)> {
        match &self.location {
            Location::Sqlite(path) => {
                let files = all_files(path.parent().expect("the database's directory"));
                assert!(
                    files.iter().any(|(p, _)| p == path),
                    "the database file is among the files"
                );
                files
                    .into_iter()
                    .map(|(p, bytes)| (p.display().to_string(), bytes))
                    .collect()
            }
            Location::Postgres(_) => on_connection!(self, |c| {
                let columns: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT c.table_name::text, c.column_name::text, c.data_type::text \
                     FROM information_schema.columns c JOIN information_schema.tables t \
                     ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
                     WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' \
                     AND c.data_type IN ('text', 'bytea', 'character varying', 'character') \
                     ORDER BY c.table_name, c.ordinal_position",
                )
                .fetch_all(&mut *c)
                .await
                .expect("list the columns");
                assert!(
                    columns
                        .iter()
                        .any(|(t, c, _)| t == "events" && c == "payload"),
                    "the scan covers the log: {columns:?}"
                );
                let mut values = Vec::new();
                for (table, column, data_type) in columns {
                    let value = if data_type == "bytea" {
                        format!("\"{column}\"")
                    } else {
                        format!("convert_to(\"{column}\", 'UTF8')")
                    };
                    let rows: Vec<Vec<u8>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT {value} FROM \"{table}\" WHERE \"{column}\" IS NOT NULL"
                    )))
                    .fetch_all(&mut *c)
                    .await
                    .expect("read a column");
                    values.extend(rows.into_iter().map(|v| (format!("{table}.{column}"), v)));
                }
                values
            }),
        }
    }

    // ------------------------------------------------------------------------------------------
    // The projection

    /// Every row of the projection and its checkpoint.
    pub async fn projection(&self) -> Projection {
        let (list_columns, quote) = match self.location {
            Location::Sqlite(_) => (
                "SELECT name FROM pragma_table_info('keys') ORDER BY cid",
                "quote",
            ),
            Location::Postgres(_) => (
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = 'keys' \
                 ORDER BY ordinal_position",
                "quote_nullable",
            ),
        };
        let rows = on_connection!(self, |c| {
            let columns: Vec<String> = sqlx::query_scalar(list_columns)
                .fetch_all(&mut *c)
                .await
                .unwrap();
            assert!(columns.len() >= 18, "keys columns: {columns:?}");
            let select = columns
                .iter()
                .map(|c| format!("{quote}(\"{c}\")"))
                .collect::<Vec<_>>()
                .join(", ");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {select} FROM keys ORDER BY key_id"
            )))
            .fetch_all(&mut *c)
            .await
            .unwrap()
            .into_iter()
            .map(|row| {
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c}={}", row.get::<String, _>(i)))
                    .collect()
            })
            .collect()
        });
        Projection {
            rows,
            checkpoint: self.checkpoint().await,
        }
    }

    /// The last sequence the projection has applied.
    pub async fn checkpoint(&self) -> i64 {
        self.scalar_i64("SELECT last_sequence FROM projection_checkpoint", vec![])
            .await
    }

    pub async fn set_checkpoint(&self, sequence: i64) {
        self.change(
            "UPDATE projection_checkpoint SET last_sequence = ?".into(),
            vec![Bind::Int(sequence)],
        )
        .await
        .expect("set the checkpoint");
    }

    /// Deletes every projected key, or those of one type (`private`, `public`).
    pub async fn delete_key_rows(&self, key_type: Option<&str>) {
        let (sql, binds) = match key_type {
            Some(t) => (
                "DELETE FROM keys WHERE key_type = ?",
                vec![Bind::Text(t.into())],
            ),
            None => ("DELETE FROM keys", vec![]),
        };
        self.change(sql.into(), binds)
            .await
            .expect("delete key rows");
    }

    /// Renames a projected key (every key for `None`); the rows changed.
    pub async fn rename_key_rows(&self, key_id: Option<&str>, name: &str) -> u64 {
        let (filter, binds) = match key_id {
            Some(id) => (" WHERE key_id = ?", vec![Bind::Text(id.into())]),
            None => ("", vec![]),
        };
        let mut all = vec![Bind::Text(name.into())];
        all.extend(binds);
        self.change(format!("UPDATE keys SET name = ?{filter}"), all)
            .await
            .expect("rename key rows")
    }

    /// Puts text that is not UTF-8 in a projected key's `column` (SQLite stores the bytes as
    /// text).
    pub async fn corrupt_key_row_text(&self, key_id: &str, column: &str) -> u64 {
        self.change(
            format!("UPDATE keys SET {column} = CAST(X'6bff' AS TEXT) WHERE key_id = ?"),
            vec![Bind::Text(key_id.into())],
        )
        .await
        .expect("corrupt a key row")
    }

    /// Makes every projected key unrevoked and seven versions newer.
    pub async fn unrevoke_and_bump_key_rows(&self) {
        self.change(
            "UPDATE keys SET version = version + 7, revoked_at = NULL".into(),
            vec![],
        )
        .await
        .expect("tamper with key rows");
    }

    /// Gives every projected key full access.
    pub async fn grant_full_access_to_key_rows(&self) {
        self.change(
            "UPDATE keys SET scopes = '', full_access = TRUE".into(),
            vec![],
        )
        .await
        .expect("tamper with key rows");
    }

    /// Rebuilds the projection from the log, as `kemon-keys rebuild` does.
    pub async fn rebuild(&self) -> Result<RebuildReport, StoreError> {
        match &self.location {
            Location::Sqlite(path) => store::rebuild(path, &FoldLimits::default()).await,
            Location::Postgres(url) => {
                let backend = PgBackend::open(url).await?;
                let report = backend.rebuild(&FoldLimits::default()).await;
                backend.release().await;
                report
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // The schema

    /// The indexes on the projection, but those the storage makes for its own constraints.
    pub async fn key_indexes(&self) -> Vec<String> {
        let sql = match self.location {
            Location::Sqlite(_) => {
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'keys' \
                 AND name NOT LIKE 'sqlite_autoindex%' ORDER BY name"
            }
            Location::Postgres(_) => {
                "SELECT i.relname::text FROM pg_index x \
                 JOIN pg_class i ON i.oid = x.indexrelid \
                 JOIN pg_class t ON t.oid = x.indrelid \
                 WHERE t.relname = 'keys' AND t.relnamespace = current_schema()::regnamespace \
                 AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid) \
                 ORDER BY 1"
            }
        };
        on_connection!(self, |c| {
            sqlx::query_scalar(sql).fetch_all(&mut *c).await.unwrap()
        })
    }

    /// Puts the `keys` table back as migration 0001 made it (a rowid table keyed by key id,
    /// with `keys_by_workspace`), every row with it, and forgets migrations 3 and 5: the
    /// database as a server from before the projection was clustered by workspace left it.
    /// (Migration 5's two columns stay, at the end, all NULL, so that the rows compare equal;
    /// migration 3 drops them and 5 adds them back.)
    pub async fn unmigrate_clustered_keys(&self) {
        {
            assert!(self.is_sqlite(), "SQLite's schema");
            on_connection!(self, |c| {
                for statement in [
                    "CREATE TABLE keys_0001 (key_id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL, \
                 name TEXT NOT NULL, key_type TEXT NOT NULL, environment TEXT NOT NULL, \
                 scopes TEXT NOT NULL, full_access INTEGER NOT NULL, secret_hash BLOB NOT NULL, \
                 masked TEXT NOT NULL, public_key TEXT, allowed_domains TEXT NOT NULL, \
                 created_at INTEGER NOT NULL, expires_at INTEGER, revoked_at INTEGER, \
                 reveal_later INTEGER NOT NULL, version INTEGER NOT NULL, \
                 stream_version INTEGER NOT NULL, created_by TEXT NOT NULL, \
                 updated_at INTEGER NOT NULL, last_revealed_at INTEGER, \
                 rolled_from_key_id TEXT, rolled_to_key_id TEXT)",
                    "INSERT INTO keys_0001 SELECT * FROM keys ORDER BY key_id",
                    "DROP TABLE keys",
                    "ALTER TABLE keys_0001 RENAME TO keys",
                    "CREATE INDEX keys_by_workspace ON keys (workspace_id, key_id)",
                    "DROP TABLE key_usage",
                    "DELETE FROM _sqlx_migrations WHERE version IN (3, 5)",
                ] {
                    sqlx::query(statement)
                        .execute(&mut *c)
                        .await
                        .expect(statement);
                }
            })
        }
    }

    /// The definitions of the `keys` table and its indexes, as the schema holds them.
    pub async fn keys_schema(&self) -> Vec<(String, String, Option<String>)> {
        {
            assert!(self.is_sqlite(), "SQLite's schema");
            on_connection!(self, |c| {
                sqlx::query_as(
                    "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'keys' \
                 ORDER BY type, name",
                )
                .fetch_all(&mut *c)
                .await
                .unwrap()
            })
        }
    }

    /// SQLite's journal mode; PostgreSQL has none.
    pub async fn journal_mode(&self) -> Option<String> {
        match self.location {
            Location::Sqlite(_) => Some(on_connection!(self, |c| {
                sqlx::query_scalar("PRAGMA journal_mode")
                    .fetch_one(&mut *c)
                    .await
                    .unwrap()
            })),
            Location::Postgres(_) => None,
        }
    }
}

impl Events<'_> {
    fn filter(self) -> (&'static str, Vec<Bind>) {
        match self {
            Events::All => ("", vec![]),
            Events::Sequence(s) => (" WHERE sequence = ?", vec![Bind::seq(s)]),
            Events::Key(id) => (" WHERE key_id = ?", vec![Bind::Text(id.into())]),
        }
    }
}

enum Bind {
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Bind {
    fn seq(value: u64) -> Bind {
        Bind::Int(i64::try_from(value).unwrap())
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Every file under `dir`, recursively, with its bytes.
pub fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read the directory") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files.extend(all_files(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            files.push((path, bytes));
        }
    }
    files
}
