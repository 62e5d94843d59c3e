//! Looking at (and tampering with) a server's database behind its back: every direct read or
//! write of the storage the tests make goes through here. The storage is SQLite today; pointing
//! the suite at another backend means changing this module only.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kemon_keys::log::chain::LogRecord;
use kemon_keys::store::{self, RecordFilter};
use sqlx::{Connection, Row, SqliteConnection};

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

/// A database file. Each call opens a connection of its own and closes it before returning,
/// so nothing is held open between calls (a rebuild, a copy or a stop may follow any of them).
#[derive(Debug, Clone)]
pub struct Db {
    path: PathBuf,
    read_only: bool,
}

/// What a refused statement said.
pub type Refusal = String;

impl Db {
    pub fn at(path: &Path) -> Db {
        Db {
            path: path.to_owned(),
            read_only: false,
        }
    }

    /// Opened read-only: for a stopped server's files, which reading must not change.
    pub fn read_only(path: &Path) -> Db {
        Db {
            path: path.to_owned(),
            read_only: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with<T>(&self, f: impl AsyncFnOnce(&mut SqliteConnection) -> T) -> T {
        let mut conn = if self.read_only {
            store::sqlite::open_read_only(&self.path).await
        } else {
            store::sqlite::connect(&self.path).await
        }
        .expect("open the database");
        let out = f(&mut conn).await;
        conn.close().await.expect("close the database");
        out
    }

    async fn scalar_i64(&self, sql: &'static str, bind: Option<&str>) -> i64 {
        self.with(async |c| {
            let mut query = sqlx::query_scalar(sql);
            if let Some(value) = bind {
                query = query.bind(value.to_owned());
            }
            query.fetch_one(c).await.expect(sql)
        })
        .await
    }

    /// Runs a changing statement; the rows it changed, or what refused it.
    async fn change(&self, sql: String, binds: Vec<Bind>) -> Result<u64, Refusal> {
        self.with(async |c| {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for bind in binds {
                query = match bind {
                    Bind::Int(v) => query.bind(v),
                    Bind::Text(v) => query.bind(v),
                    Bind::Bytes(v) => query.bind(v),
                };
            }
            query
                .execute(c)
                .await
                .map(|done| done.rows_affected())
                .map_err(|e| e.to_string())
        })
        .await
    }

    // ------------------------------------------------------------------------------------------
    // The event log

    /// How many events the log holds, of one key or of all.
    pub async fn event_count(&self, key_id: Option<&str>) -> i64 {
        match key_id {
            Some(_) => {
                self.scalar_i64("SELECT count(*) FROM events WHERE key_id = ?", key_id)
                    .await
            }
            None => self.scalar_i64("SELECT count(*) FROM events", None).await,
        }
    }

    /// The last sequence of the log.
    pub async fn max_sequence(&self) -> i64 {
        self.scalar_i64("SELECT max(sequence) FROM events", None)
            .await
    }

    /// Every event (or one key's), in log order.
    pub async fn events(&self, key_id: Option<&str>) -> Vec<StoredEvent> {
        let mut sql = String::from(
            "SELECT sequence, workspace_id, stream_version, event_type, actor, recorded_at \
             FROM events",
        );
        if key_id.is_some() {
            sql.push_str(" WHERE key_id = ?");
        }
        sql.push_str(" ORDER BY sequence");
        self.with(async |c| {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            if let Some(id) = key_id {
                query = query.bind(id.to_owned());
            }
            query
                .fetch_all(c)
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
        .await
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
        self.with(async |c| {
            store::sqlite::read_records(c, 0, 10_000, &RecordFilter::default())
                .await
                .expect("read the events")
        })
        .await
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

    /// Takes away what keeps the log append-only, as someone with the file could.
    pub async fn drop_append_only_guards(&self) {
        for statement in [
            "DROP TRIGGER events_no_update",
            "DROP TRIGGER events_no_delete",
        ] {
            self.change(statement.into(), vec![])
                .await
                .expect(statement);
        }
    }

    // ------------------------------------------------------------------------------------------
    // Encrypted copies and stored hashes

    /// How many encrypted copies of a key's secret are stored.
    pub async fn sealed_count(&self, key_id: &str) -> i64 {
        self.scalar_i64(
            "SELECT count(*) FROM sealed_secrets WHERE key_id = ?",
            Some(key_id),
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

    async fn bytes(&self, sql: &'static str, key_id: &str) -> Vec<u8> {
        self.with(async |c| {
            sqlx::query_scalar(sql)
                .bind(key_id.to_owned())
                .fetch_one(c)
                .await
                .expect(sql)
        })
        .await
    }

    // ------------------------------------------------------------------------------------------
    // The projection

    /// Every row of the projection and its checkpoint.
    pub async fn projection(&self) -> Projection {
        let rows = self
            .with(async |c| {
                let columns: Vec<String> =
                    sqlx::query_scalar("SELECT name FROM pragma_table_info('keys') ORDER BY cid")
                        .fetch_all(&mut *c)
                        .await
                        .unwrap();
                assert!(columns.len() >= 18, "keys columns: {columns:?}");
                let select = columns
                    .iter()
                    .map(|c| format!("quote(\"{c}\")"))
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
            })
            .await;
        Projection {
            rows,
            checkpoint: self.checkpoint().await,
        }
    }

    /// The last sequence the projection has applied.
    pub async fn checkpoint(&self) -> i64 {
        self.scalar_i64("SELECT last_sequence FROM projection_checkpoint", None)
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
            "UPDATE keys SET scopes = '', full_access = 1".into(),
            vec![],
        )
        .await
        .expect("tamper with key rows");
    }

    // ------------------------------------------------------------------------------------------
    // The schema

    /// The indexes on the projection, but those the storage makes for its own constraints.
    /// Puts the `keys` table back as migration 0001 made it (a rowid table keyed by key id,
    /// with `keys_by_workspace`), every row with it, and forgets migration 3: the database as
    /// a server from before the projection was clustered by workspace left it.
    pub async fn unmigrate_clustered_keys(&self) {
        self.with(async |c| {
            for statement in [
                "CREATE TABLE keys_0001 (key_id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL, \
                 name TEXT NOT NULL, key_type TEXT NOT NULL, environment TEXT NOT NULL, \
                 scopes TEXT NOT NULL, full_access INTEGER NOT NULL, secret_hash BLOB NOT NULL, \
                 masked TEXT NOT NULL, public_key TEXT, allowed_domains TEXT NOT NULL, \
                 created_at INTEGER NOT NULL, expires_at INTEGER, revoked_at INTEGER, \
                 reveal_later INTEGER NOT NULL, version INTEGER NOT NULL, \
                 stream_version INTEGER NOT NULL, created_by TEXT NOT NULL, \
                 updated_at INTEGER NOT NULL, last_revealed_at INTEGER)",
                "INSERT INTO keys_0001 SELECT * FROM keys ORDER BY key_id",
                "DROP TABLE keys",
                "ALTER TABLE keys_0001 RENAME TO keys",
                "CREATE INDEX keys_by_workspace ON keys (workspace_id, key_id)",
                "DELETE FROM _sqlx_migrations WHERE version = 3",
            ] {
                sqlx::query(statement)
                    .execute(&mut *c)
                    .await
                    .expect(statement);
            }
        })
        .await
    }

    /// The definitions of the `keys` table and its indexes, as the schema holds them.
    pub async fn keys_schema(&self) -> Vec<(String, String, Option<String>)> {
        self.with(async |c| {
            sqlx::query_as(
                "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'keys' \
                 ORDER BY type, name",
            )
            .fetch_all(c)
            .await
            .unwrap()
        })
        .await
    }

    pub async fn journal_mode(&self) -> String {
        self.with(async |c| {
            sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(c)
                .await
                .unwrap()
        })
        .await
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
